"""On a CUDA GPU (`pytest -m cuda`; skipped without one): the kernel library's CUDA ops and the Triton kernels
against the PyTorch reference, training steps, sync-free MD with no host synchronisation, the ASE calculator.
benchmarks/gpu_check.py runs these first.  The CPU side of the same paths is tests/test_fake_cuda.py.

Every comparison is against the host's PyTorch reference in the same precision; the GPU adds edges with
atomics in any order, so they agree to rounding (1e-10 in float64), not bit for bit.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import REPO, make_model
from dpmd import ops
from test_fake_cuda import training_input, water_frame

GPU = torch.device("cuda", 0)
SMALL_MODEL = REPO / "examples" / "water" / "model_small.pth"


def gpu(test):
    """A CUDA test: marked `cuda`, skipped where this torch sees no GPU."""
    return pytest.mark.cuda(pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")(test))


@pytest.fixture(params=["reference", "kernels"])
def path(request, monkeypatch):
    """reference: dpmd's PyTorch reference (reference_only()); kernels: the library's CUDA kernels, which conftest
    built at session start (a library without CUDA kernels here is a failure, not a skip)."""
    if request.param == "kernels":
        request.getfixturevalue("lib")
        assert ops.has_cuda(), f"the kernel library {ops.library_path()} has no CUDA kernels"
        return contextlib.nullcontext
    return ops.reference_only


def on_host_reference(model, coord, atype, box):
    with ops.reference_only():
        return model(coord, atype, box, atom_virial=True)


@gpu
@pytest.mark.parametrize("precision", ["float64", "float32"])
def test_model_on_cuda(path, precision):
    model = make_model(precision=precision)
    coord, atype, box = water_frame()
    ref = on_host_reference(model, coord, atype, box)
    with path():
        out = model.to(GPU)(coord.to(GPU), atype.to(GPU), box.to(GPU), atom_virial=True)
    tol = 1e-10 if precision == "float64" else 1e-4
    for k in ref:
        assert out[k].device == GPU
        torch.testing.assert_close(out[k].cpu(), ref[k], rtol=tol, atol=tol * max(1.0, float(ref[k].abs().max())))


@gpu
@pytest.mark.parametrize("kernel", ["library", "triton", "reference"])
def test_compressed_model_on_cuda(kernel, monkeypatch):
    """The tabulated embedding: the library's CUDA op, Triton (what runs without the library), PyTorch."""
    from dpmd.model.compress import compress_model
    from dpmd.ops import triton_tabulate

    if kernel == "library":
        assert ops.available() and ops.has_cuda(), "the kernel library has no CUDA kernels"
    if kernel == "triton":
        if not triton_tabulate.available():
            pytest.skip("triton is not installed")
        monkeypatch.setattr(ops, "has_cuda", lambda: False)   # the library's ops step aside for Triton
    model = compress_model(make_model(), 0.9)
    coord, atype, box = water_frame()
    ref = on_host_reference(model, coord, atype, box)
    with ops.reference_only() if kernel == "reference" else contextlib.nullcontext():
        out = model.to(GPU)(coord.to(GPU), atype.to(GPU), box.to(GPU), atom_virial=True)
    for k in ref:
        torch.testing.assert_close(out[k].cpu(), ref[k], rtol=1e-10, atol=1e-10)


@gpu
def test_force_loss_gradients_on_cuda(path):
    """Training's force loss differentiates forces by the weights: the any-order contraction and the fused
    linearised nets on CUDA against the host's reference."""
    from dpmd.geometry.graph import build_graph
    from dpmd.model.forces import evaluate

    def grads(model, graph, context):
        model.zero_grad()
        with context(), ops.weight_gradients_only():
            out = evaluate(model, graph, create_graph=True)
            (out["energy"].sum() + (out["force"] ** 2).sum()).backward()
        return [p.grad.to("cpu", copy=True) for p in model.parameters()]   # (a copy: .to(GPU) moves .grad)

    coord, atype, box = water_frame()
    model = make_model()
    graph = build_graph(coord, atype, box, model.rcut)
    ref = grads(model, graph, ops.reference_only)
    on_gpu = {k: v.to(GPU) if torch.is_tensor(v) else v for k, v in graph.items()}
    for a, b in zip(grads(model.to(GPU), on_gpu, path), ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@gpu
def test_training_on_cuda(tmp_path, monkeypatch):
    """`training.device: cuda` where this dpmd has it, else the training loop with the model on the GPU and
    each batch handed over (what tests/test_fake_cuda.py runs on its fake device): the host's learning curve."""
    from dpmd.errors import ConfigError
    from dpmd.train.config import normalize_input
    from dpmd.train.trainer import Trainer

    Trainer(normalize_input(training_input(steps=2)), out_dir=tmp_path / "host", progress=False).run()
    cfg = training_input(steps=2)
    cfg["training"]["device"] = "cuda"
    try:
        trainer = Trainer(normalize_input(cfg), out_dir=tmp_path / "gpu", progress=False)
    except ConfigError:   # no training.device yet
        trainer = Trainer(normalize_input(training_input(steps=2)), out_dir=tmp_path / "gpu", progress=False)
        trainer.model.to(GPU)
        for store in (trainer.train_store, trainer.valid_store):
            batch = store.batch
            on_gpu = lambda d: {k: v.to(GPU) if torch.is_tensor(v) else v for k, v in d.items()}  # noqa: E731
            monkeypatch.setattr(store, "batch", lambda i, f, batch=batch: tuple(map(on_gpu, batch(i, f))))
    trainer.run()
    assert {p.device for p in trainer.model.parameters()} == {GPU}
    # (lcurve.out's 7 digits: the GPU's rounding differences may show in the last)
    curves = [np.loadtxt(tmp_path / run / "lcurve.out") for run in ("gpu", "host")]
    np.testing.assert_allclose(*curves, rtol=1e-5)


def trained_ensemble(n: int) -> list:
    """The small trained water model and n - 1 copies with slightly different weights."""
    from dpmd.model import load_model

    models = [load_model(SMALL_MODEL) for _ in range(n)]
    with torch.no_grad():
        for k, m in enumerate(models):
            for p in m.parameters():
                p.mul_(1.0 + 1e-3 * k)
    return models


@gpu
def test_sync_free_md_on_cuda():
    """`auto` steps sync-free on CUDA: no host read or blocking copy between output steps (the counter), and
    the trajectory of the host's checked path, with an ensemble's deviation."""
    from dpmd.md import Simulation
    from dpmd.md.host_sync import count_host_syncs

    from test_md_sync_free import water

    pos, sym, box = water()
    args = dict(ensemble="npt", thermostat={"type": "langevin", "damp": 0.05}, barostat={"mode": "tri", "damp": 0.2},
                pressure=[1.0, 500.0], steps=40, timestep=0.5, skin=2.0, thermo_freq=10, model_devi_freq=5,
                seed=5, log=None)
    host_run = Simulation(trained_ensemble(2), pos, sym, box, sync_free=False, **args)
    host_run.run(30)
    sim = Simulation([m.to(GPU) for m in trained_ensemble(2)], pos, sym, box, **args)
    assert sim.sync_free
    sim.run(3)
    with count_host_syncs() as syncs:
        sim.run(27)
    assert syncs.count == 0, syncs.sites
    torch.testing.assert_close(sim.state.positions.cpu(), host_run.state.positions, rtol=0, atol=1e-8)
    for (step, devi), (host_step, host_devi) in zip(sim.devi_history, host_run.devi_history, strict=True):
        assert step == host_step
        np.testing.assert_allclose(devi, host_devi, rtol=1e-7, atol=1e-10)


@gpu
def test_ase_calculator_on_cuda():
    pytest.importorskip("ase")
    from ase import Atoms

    from dpmd.calculator import DP

    coord, atype, box = water_frame()
    atoms = Atoms([["O", "H"][t] for t in atype], positions=coord.numpy(), cell=box.numpy(), pbc=True)
    atoms.calc = DP(SMALL_MODEL)
    ref = atoms.get_forces(), atoms.get_stress(), atoms.get_potential_energy()
    atoms.calc = DP(SMALL_MODEL, device="cuda")
    assert atoms.calc.device.type == "cuda"
    for a, b in zip((atoms.get_forces(), atoms.get_stress(), atoms.get_potential_energy()), ref):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-9)


# ---- the GPU check itself, here on the CPU ----

def test_gpu_check_dry_run(tmp_path):
    """benchmarks/gpu_check.py --dry-run: every section on the CPU with tiny sizes and budgets, the table on
    the screen and in the file."""
    table = tmp_path / "check.txt"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    res = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--dry-run", "--out", str(table)],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    text = table.read_text()
    assert text.strip() in res.stdout
    assert "dry run" in text.splitlines()[0]
    for row in ("torch", "kernel library", "pytest -m cuda", "inference", "training", "MD", "DeePMD-kit"):
        assert row in text, row
    assert "error" not in text.lower(), text
