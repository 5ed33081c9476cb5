"""Model compression (dpmd.model.compress, `dpmd compress`): tables vs nets, compressed vs uncompressed model,
files, out-of-table detection, and the fused kernels (C++ op, Triton) vs the PyTorch reference."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from conftest import DEEPMD_REF, EXAMPLE, REPO, SHARED, make_model
from dpmd import ops
from dpmd.errors import DpmdError
from dpmd.geometry.graph import build_graph
from dpmd.model import DeepPot, load_model, save_model
from dpmd.model.compress import compress_model, net_derivatives, table_nodes
from dpmd.model.forces import evaluate

WATER_DATA = SHARED / "data" / "water"
WATER_MODEL = DEEPMD_REF / "model.ckpt.pt"
needs_shared = pytest.mark.skipif(not WATER_MODEL.is_file() or not WATER_DATA.is_dir(),
                                  reason="shared DeePMD water model/data not present")


@pytest.fixture(scope="module")
def small():
    model = make_model()
    return model, compress_model(model, min_nbor_dist=0.9)


@pytest.fixture(scope="module")
def water_models():
    model = load_model(WATER_MODEL)
    return model, compress_model(model, min_nbor_dist=0.885)  # `dpmd neighbor-stat` of the shared data


def water_frame(system="data_0", frame=0):
    from dpmd.data import load_system

    s = load_system(WATER_DATA / system if system else EXAMPLE, type_map=["O", "H"])
    return torch.tensor(s.coord[frame]), torch.tensor(s.atype), torch.tensor(s.box[frame])


def example_frame(frame=0):
    from dpmd.data import load_system

    s = load_system(EXAMPLE, type_map=["O", "H"])
    return torch.tensor(s.coord[frame]), torch.tensor(s.atype), torch.tensor(s.box[frame])


def table_derivatives(descriptor, net: int, x: torch.Tensor):
    """Tabulated G and its first and second derivative (autograd through the polynomial)."""
    x = x.clone().requires_grad_()
    g = descriptor._tabulate(net, x)
    d1 = torch.stack([torch.autograd.grad(g[:, k].sum(), x, create_graph=True)[0] for k in range(g.shape[1])], 1)
    d2 = torch.stack([torch.autograd.grad(d1[:, k].sum(), x, retain_graph=True)[0] for k in range(g.shape[1])], 1)
    return g.detach(), d1.detach(), d2


# ---- tables ---------------------------------------------------------------------------------------

def test_table_matches_net_at_nodes_and_midpoints(small):
    model, comp = small
    d = comp.descriptor
    layout = comp.config["compress"]
    nodes = table_nodes(layout)
    pick = torch.cat([nodes[:40], nodes[layout["n_fine"] - 5: layout["n_fine"] + 5], nodes[-20:-1]])
    mids = torch.cat([0.5 * (nodes[:-1] + nodes[1:])[:40], 0.5 * (nodes[:-1] + nodes[1:])[-20:]])
    for i, net in enumerate(model.descriptor.embeddings):
        for x, tol in ((pick, (1e-12, 1e-10, 1e-8)), (mids, (1e-9, 1e-7, 1e-5))):
            want = net_derivatives(net, x)
            got = table_derivatives(d, i, x)
            for w, g, t in zip(want, got, tol):
                assert torch.allclose(g, w, rtol=0, atol=t * max(1.0, float(w.abs().max()))), (i, t)
    # the second derivative is really used: a finite difference of the net agrees with it at a midpoint
    x = mids[5:6]
    h = 1e-4
    fd2 = (model.descriptor.embeddings[0](x[:, None] + h) - 2 * model.descriptor.embeddings[0](x[:, None])
           + model.descriptor.embeddings[0](x[:, None] - h)) / h ** 2
    assert torch.allclose(table_derivatives(d, 0, x)[2], fd2.detach(), atol=1e-5)


def test_tables_are_c2_across_nodes(small):
    _, comp = small
    d, layout = comp.descriptor, comp.config["compress"]
    h = (table_nodes(layout)[1:] - table_nodes(layout)[:-1]).unsqueeze(1)  # (intervals, 1)
    powers = torch.arange(6, dtype=torch.float64)
    for table in d.table:  # (intervals, 6, M)
        def at_end(order):  # k-th derivative of each interval's polynomial at its right node
            coef = torch.ones(6, dtype=torch.float64)
            for j in range(order):
                coef = coef * (powers - j).clamp(min=0)
            tp = h.unsqueeze(1) ** (powers - order).clamp(min=0).view(1, 6, 1)
            return (table * (coef.view(1, 6, 1) * tp)).sum(1)
        for order in range(3):
            left = at_end(order)[:-1]
            right = table[1:, order] * [1.0, 1.0, 2.0][order]  # k-th derivative at t = 0: k! c_k
            assert torch.allclose(left, right, atol=1e-9 * (1 + float(right.abs().max()))), order


def test_layout_covers_the_data_range(small):
    model, comp = small
    spec = comp.config["compress"]
    d = model.descriptor
    from dpmd.model.compress import switched_s

    s_max = switched_s(0.9, d.rcut_smth, d.rcut)  # s is largest at the smallest distance
    xs = [(s_max - float(d.mean[t, 0])) / float(d.std[t, 0]) for t in range(2)]
    assert spec["lower"] <= min(-float(d.mean[t, 0] / d.std[t, 0]) for t in range(2)) + 1e-12
    assert spec["upper"] >= max(xs) > spec["upper"] - spec["step"]
    assert spec["end"] >= spec["extrapolate"] * max(xs)
    assert spec["n_fine"] == round((spec["upper"] - spec["lower"]) / spec["step"])
    assert all(r < 0.9 for r in spec["rmin"])


# ---- compressed model vs uncompressed -------------------------------------------------------------

@needs_shared
@pytest.mark.parametrize("system,frame", [("data_0", 0), ("data_1", 3), ("data_2", 7)])
def test_water_compressed_matches_uncompressed(water_models, system, frame):
    model, comp = water_models
    coord, atype, box = water_frame(system, frame)
    ref, out = model(coord, atype, box), comp(coord, atype, box)
    assert abs(float(out["energy"] - ref["energy"])) <= 1e-6
    assert float((out["force"] - ref["force"]).abs().max()) <= 1e-6
    assert float((out["virial"] - ref["virial"]).abs().max()) <= 1e-5
    assert float((out["atom_energy"] - ref["atom_energy"]).abs().max()) <= 1e-7


def test_compressed_forces_are_minus_the_energy_gradient(small):
    _, comp = small
    coord, atype, box = example_frame()
    keep = torch.arange(0, 192, 8)  # a 24-atom open cluster
    coord, atype = coord[keep], atype[keep]
    out = comp(coord, atype, None)
    h = 1e-5
    for i, k in ((0, 0), (5, 1), (17, 2)):
        plus, minus = coord.clone(), coord.clone()
        plus[i, k] += h
        minus[i, k] -= h
        fd = -(comp(plus, atype, None)["energy"] - comp(minus, atype, None)["energy"]) / (2 * h)
        assert abs(float(fd - out["force"][i, k])) < 1e-7


def test_compress_keeps_the_input_model_and_refuses_twice(small):
    model, comp = small
    assert not model.descriptor.compressed and model.config["compress"] is None
    assert "descriptor.table" not in model.state_dict()
    with pytest.raises(DpmdError, match="already compressed"):
        compress_model(comp, 0.9)


# ---- files ----------------------------------------------------------------------------------------

def test_save_load_freeze_roundtrip(small, tmp_path):
    _, comp = small
    path = tmp_path / "model-c.pth"
    save_model(comp, path)
    loaded = load_model(path)
    assert loaded.descriptor.compressed and loaded.config["compress"] == comp.config["compress"]
    assert torch.equal(loaded.descriptor.table, comp.descriptor.table)
    frozen = torch.jit.load(str(path))
    coord, atype, box = example_frame(1)
    ref = comp(coord, atype, box)
    for out in (loaded(coord, atype, box), frozen(coord, atype, box)):
        assert abs(float(out["energy"] - ref["energy"])) < 1e-10
        assert float((out["force"] - ref["force"]).abs().max()) < 1e-10
        assert float((out["virial"] - ref["virial"]).reshape(-1).abs().max()) < 1e-10
    blob = tmp_path / "model-c.pt"  # the plain torch.save form rebuilds the compressed model too
    save_model(comp, blob, deployable=False)
    assert torch.equal(load_model(blob).descriptor.table, comp.descriptor.table)


def test_cli_compress(tmp_path, small):
    from dpmd.cli import main

    model, comp = small
    src = tmp_path / "model.pth"
    save_model(model, src)
    # a two-frame training set so that -t scans little
    data = tmp_path / "data"
    (data / "set.000").mkdir(parents=True)
    for name in ("type.raw", "type_map.raw"):
        (data / name).write_text((EXAMPLE / name).read_text())
    for name in ("coord", "box", "energy", "force"):
        np.save(data / "set.000" / f"{name}.npy", np.load(EXAMPLE / "set.000" / f"{name}.npy")[:2])
    text = (REPO / "configs" / "water_se_e2_a.yaml").read_text().replace("examples/water/data_0", str(data))
    (tmp_path / "input.yaml").write_text(text)
    out = tmp_path / "out" / "model-c.pth"
    assert main(["compress", "-i", str(src), "-o", str(out), "-t", str(tmp_path / "input.yaml"),
                 "--step", "0.02", "--extrapolate", "4"]) == 0
    spec = load_model(out).config["compress"]
    from dpmd.geometry.neighbor import neighbor_stat

    frames = [(np.load(data / "set.000/coord.npy")[f].reshape(-1, 3), np.loadtxt(data / "type.raw", dtype=int),
               np.load(data / "set.000/box.npy")[f].reshape(3, 3)) for f in range(2)]
    assert spec["min_nbor_dist"] == pytest.approx(neighbor_stat(frames, model.rcut, 2)[1])
    assert spec["step"] == 0.02 and spec["extrapolate"] == 4.0 and spec["step_coarse"] == pytest.approx(0.2)
    assert not list(out.parent.glob(".model-c.pth.*"))  # atomic write leaves no temp file


def test_cli_compress_errors(tmp_path, small, capsys):
    from dpmd.cli import main

    model, comp = small
    src, done = tmp_path / "model.pth", tmp_path / "model-c.pth"
    save_model(model, src)
    save_model(comp, done)
    assert main(["compress", "-i", str(src), "-o", str(tmp_path / "x.pth")]) == 1
    assert "-t input.yaml" in capsys.readouterr().err
    assert main(["compress", "-i", str(done), "-o", str(tmp_path / "x.pth"), "--min-nbor-dist", "0.9"]) == 1
    assert "already compressed" in capsys.readouterr().err
    assert main(["compress", "-i", str(src), "-o", str(tmp_path / "x.pth"), "--min-nbor-dist", "0.9",
                 "--step", "0"]) == 1
    err = capsys.readouterr().err
    assert "--step must be > 0" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.pth").exists()


# ---- out-of-table detection -----------------------------------------------------------------------

def too_close(rmin: float):
    coord, atype, box = example_frame()
    coord = coord.clone()
    o = int((atype == 0).nonzero()[0])
    h = int((atype == 1).nonzero()[3])
    coord[h] = coord[o] + torch.tensor([0.9 * rmin, 0.0, 0.0], dtype=torch.float64)
    return coord, atype, box, o, h


def test_edge_outside_the_tables_is_an_error_naming_the_atoms(small, tmp_path):
    _, comp = small
    coord, atype, box, o, h = too_close(comp.config["compress"]["rmin"][0])
    with pytest.raises(DpmdError, match=rf"atom {o} \(O\) and its neighbour {h} \(H\) at distance .* outside"):
        comp(coord, atype, box)
    with pytest.raises(RuntimeError, match="outside the embedding tables"):  # callers of evaluate (MD)
        evaluate(comp, build_graph(coord, atype, box, comp.rcut))
    save_model(comp, tmp_path / "c.pth")
    frozen = torch.jit.load(str(tmp_path / "c.pth"))
    with pytest.raises(Exception, match=rf"atom {o} \(O\) and its neighbour {h} \(H\)"):
        frozen(coord, atype, box)


def test_check_frequency_warns_about_the_extrapolated_range(small):
    model, _ = small
    comp = compress_model(model, min_nbor_dist=0.9, check_frequency=2)
    coord, atype, box = example_frame()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        comp(coord, atype, box)  # the data's own distances: inside the fine tables, no warning
        comp(coord, atype, box)
    coord, atype, box, o, h = too_close(0.75 / 0.9)  # an O-H pair at 0.75 Å: in the coarse range
    comp(coord, atype, box)  # evaluation 3: not checked
    with pytest.warns(UserWarning, match=r"[1-9]\d* edges in the coarse .* evaluation 4"):
        comp(coord, atype, box)


# ---- fused kernels vs reference ------------------------------------------------------------------

def random_block(descriptor, n=40, ncent=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    d = descriptor
    center = torch.sort(torch.randint(0, ncent, (n,), generator=g)).values
    center[center == 2] = 3  # an edgeless centre
    rows = torch.rand(n, 4, generator=g, dtype=torch.float64) * 2 - 1
    rows[:, 0] = d.table_lower + torch.rand(n, generator=g, dtype=torch.float64) * (d.table_upper - d.table_lower)
    rows[-3:, 0] = d.table_upper + torch.tensor([0.03, 1.37, 0.9 * (d.table_end - d.table_upper)])  # coarse
    return rows, center, ncent


def grid_of(d):
    return (d.table_lower, d.table_upper, d.table_step, d.table_step_coarse, d.table_fine, d.table_coarse)


def ops_available():
    from dpmd import ops

    return ops.available()


@pytest.mark.skipif(not ops_available(), reason="kernel library not built (dpmd build-ops)")
def test_cpp_op_matches_reference(small):
    _, comp = small
    d = comp.descriptor
    rows, center, ncent = random_block(d)
    for net in range(len(d.embeddings)):
        r1, r2 = rows.clone().requires_grad_(), rows.clone().requires_grad_()
        fast = torch.ops.dpmd.tabulate_fusion_se_a(d.table[net], r1, center, ncent, *grid_of(d))
        with ops.reference_only():
            ref = d._block(r2, d._tabulate(net, r2[:, 0]), center, ncent)
        assert torch.allclose(fast, ref, rtol=0, atol=1e-12)
        w = torch.randn(fast.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(net))
        (g1,) = torch.autograd.grad((fast * w).sum(), r1)
        (g2,) = torch.autograd.grad((ref * w).sum(), r2)
        assert torch.allclose(g1, g2, rtol=0, atol=1e-12)
    small_rows = rows[:12].clone().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda r: torch.ops.dpmd.tabulate_fusion_se_a(d.table[0], r, center[:12], ncent, *grid_of(d)), (small_rows,))


@pytest.mark.skipif(not ops_available(), reason="kernel library not built (dpmd build-ops)")
@pytest.mark.parametrize("type_one_side", [True, False])
def test_compressed_model_with_ops_matches_reference(type_one_side):
    """The fused descriptor op (CPU) against the PyTorch reference: energy, atomic energies, forces, virial,
    with the atoms in data order and shuffled (the model regroups the centres by type)."""
    comp = compress_model(make_model(type_one_side=type_one_side), min_nbor_dist=0.9)
    coord, atype, box = example_frame(2)
    shuffle = torch.randperm(len(atype), generator=torch.Generator().manual_seed(1))
    calls = []
    real_op = torch.ops.dpmd.se_a_tabulated_descriptor

    class Spy:  # counts the fused op's calls, so the test knows the fast path ran
        def __call__(self, *args):
            calls.append(1)
            return real_op(*args)

    from unittest import mock

    for order in (torch.arange(len(atype)), shuffle):
        graph = build_graph(coord[order], atype[order], box, comp.rcut)
        ref = evaluate(comp, graph, create_graph=True)  # training mode: always the PyTorch reference
        with mock.patch.object(torch.ops.dpmd, "se_a_tabulated_descriptor", Spy()):
            fast = evaluate(comp, graph, atom_virial=True)  # forces only: the fused op runs
        assert calls, "the compressed model did not use the kernel library"
        for key in ("energy", "atom_energy", "force", "virial"):
            assert float((fast[key] - ref[key].detach()).abs().max()) < 1e-10, key


@pytest.mark.skipif(not ops_available(), reason="kernel library not built (dpmd build-ops)")
def test_fused_descriptor_op_gradcheck(small):
    """d(descriptor)/d(edge vectors) of the fused op by finite differences, on a few atoms' edges, centres
    given out of order (as the model passes them after grouping by type)."""
    _, comp = small
    d = comp.descriptor
    coord, atype, box = example_frame()
    graph = build_graph(coord, atype, box, comp.rcut)
    keep = graph["center"] < 3
    center = torch.tensor([2, 0, 1])[graph["center"][keep]]  # centre runs 0, 1, 2 renumbered to 2, 0, 1
    vec = (coord[graph["neighbor"][keep]] - coord[graph["center"][keep]]
           + graph["shift"][keep].to(coord.dtype) @ box).requires_grad_()
    ntype = atype[graph["neighbor"][keep]]
    ctype = atype[:3][torch.tensor([1, 2, 0])]  # types in the new numbering
    grid = [d.rcut_smth, d.rcut, d.table_lower, d.table_upper, d.table_step, d.table_step_coarse, d.table_end,
            d._table_slack()]

    def fused(v):
        return torch.ops.dpmd.se_a_tabulated_descriptor(v, center, ctype, ntype, d.mean, d.std, d.table, d.sel, grid,
                                                        d.table_fine, d.table_coarse, True, d.axis_neuron)[0]

    with ops.reference_only():
        ref = d(vec, center, ctype, ntype)
    assert torch.allclose(fused(vec), ref, rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(fused, (vec,))


TRITON_SCRIPT = r"""
import sys, torch
sys.path.insert(0, sys.argv[1])
from conftest import make_model
from dpmd.model.compress import compress_model
from dpmd import ops
from dpmd.ops import triton_tabulate
from test_compress import grid_of, random_block
d = compress_model(make_model(), 0.9).descriptor
rows, center, ncent = random_block(d, n=16, ncent=5)
for net in range(2):
    r1, r2 = rows.clone().requires_grad_(), rows.clone().requires_grad_()
    fast = triton_tabulate.tabulate_fusion(d.table[net], r1, center, ncent, grid_of(d))
    with ops.reference_only():
        ref = d._block(r2, d._tabulate(net, r2[:, 0]), center, ncent)
    w = torch.randn(fast.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(net))
    g1, = torch.autograd.grad((fast * w).sum(), r1)
    g2, = torch.autograd.grad((ref * w).sum(), r2)
    print(float((fast - ref).abs().max()), float((g1 - g2).abs().max()))
"""


def test_triton_kernel_matches_reference_in_interpreter():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-c", TRITON_SCRIPT, str(REPO / "tests")], env=env, capture_output=True,
                         text=True, timeout=600, cwd=REPO)
    assert res.returncode == 0, res.stderr[-2000:]
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 2
    for line in lines:
        value_err, grad_err = map(float, line.split())
        assert value_err < 1e-12 and grad_err < 1e-12


# ---- precision ------------------------------------------------------------------------------------

@needs_shared
def test_float32_compressed_model(water_models):
    model, _ = water_models
    cfg = copy.deepcopy(model.config)
    cfg["descriptor"]["precision"] = cfg["fitting_net"]["precision"] = "float32"
    model32 = DeepPot(cfg)
    model32.load_state_dict(model.state_dict())  # copies convert to float32
    comp32 = compress_model(model32, min_nbor_dist=0.885)
    assert comp32.descriptor.table.dtype == torch.float32
    coord, atype, box = water_frame("data_0", 0)
    ref, out32, net32 = model(coord, atype, box), comp32(coord, atype, box), model32(coord, atype, box)
    err = float((out32["force"] - ref["force"]).abs().max())
    err_net = float((net32["force"] - ref["force"]).abs().max())
    print(f"float32 compressed vs float64: max |dF| = {err:.2e} eV/Å (float32 uncompressed: {err_net:.2e})")
    assert err < 5e-3 and err < 5 * err_net + 1e-4  # compression adds nothing beyond float32 rounding
    assert abs(float(out32["energy"] - ref["energy"])) / len(atype) < 1e-4
    # mixed: float64 tables (descriptor), float32 fitting net -- the fitting net dominates a compressed model
    cfg["descriptor"]["precision"] = "float64"
    mixed = DeepPot(cfg)
    mixed.load_state_dict(model.state_dict())
    out_mixed = compress_model(mixed, min_nbor_dist=0.885)(coord, atype, box)
    err_mixed = float((out_mixed["force"] - ref["force"]).abs().max())
    print(f"float64 tables + float32 fitting vs float64: max |dF| = {err_mixed:.2e} eV/Å")
    assert err_mixed < 5e-3
