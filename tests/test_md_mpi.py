"""`mpiexec -n N dpmd md`: the domain-decomposed run follows the serial trajectory (float64, 1e-10 after
100 steps), writes the same files, and its checkpoints restart on any number of ranks."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import make_model

pytest.importorskip("mpi4py")


def _mpiexec():
    beside = Path(sys.executable).parent / "mpiexec"       # the one the pip `mpich` package installs
    return str(beside) if beside.is_file() else shutil.which("mpiexec")


MPIEXEC = _mpiexec()
pytestmark = pytest.mark.skipif(MPIEXEC is None, reason="mpiexec not found")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def lattice(n=6, spacing=3.0, shear=False, seed=0):
    """n^3 O/H atoms on a jittered cubic lattice (the random test model has no repulsive core, so liquid
    water would collapse within 100 steps); `shear` makes the cell triclinic."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(n)] * 3, indexing="ij"), -1).reshape(-1, 3) * spacing
    pos, box = grid + rng.normal(0, 0.2, grid.shape), np.eye(3) * spacing * n
    if shear:
        strain = np.array([[1.0, 0.0, 0.0], [0.2, 1.0, 0.0], [0.1, -0.15, 1.0]])
        pos, box = pos @ strain, box @ strain
    return pos, list(rng.choice(["O", "H"], len(pos))), box


def write_case(tmp: Path, name: str, steps: int, shear=False, n=6, models=("a",), **kw) -> Path:
    from ase import Atoms
    from ase.io import write

    from dpmd.model import save_model

    d = tmp / name
    d.mkdir(parents=True, exist_ok=True)
    pos, sym, box = lattice(n=n, shear=shear)
    write(d / "start.extxyz", Atoms(sym, positions=pos, cell=box, pbc=True))
    files = []
    for m in models:
        path = tmp / f"model_{m}.pth"
        if not path.is_file():
            save_model(make_model(rcut=4.0 if m == "a" else 3.5), path)
        files.append(str(path))
    cfg = {"structure": str(d / "start.extxyz"), "models": files, "ensemble": "nvt",
           "thermostat": {"type": "langevin", "damp": 0.05}, "temperature": 300, "timestep": 0.5, "steps": steps,
           "seed": 11, "skin": 0.5, "min_distance": 0.1, "thermo_freq": 10, "traj_freq": 50,
           "checkpoint_freq": 50, "output_dir": str(d / "out")}
    cfg.update(kw)
    (d / "input.yaml").write_text(yaml.safe_dump(cfg))
    return d


def run_serial(d: Path, *extra):
    from dpmd.cli import main

    assert main(["md", str(d / "input.yaml"), *extra]) == 0


def run_mpi(d: Path, ranks: int, *extra):
    cmd = [MPIEXEC, "-n", str(ranks), sys.executable, "-m", "dpmd.cli", "md", str(d / "input.yaml"), *extra]
    proc = subprocess.run(cmd, cwd=d, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def checkpoint(d: Path, name="checkpoint.pt"):
    return torch.load(d / "out" / name, weights_only=True)


def assert_same_run(a: Path, b: Path, files=("thermo.log",)):
    sa, sb = checkpoint(a)["state"], checkpoint(b)["state"]
    assert sa["step"] == sb["step"]
    for key in ("positions", "velocities", "forces", "box", "virial", "energy"):
        err = float((sa[key] - sb[key]).abs().max())
        assert err < 1e-10, (key, err)
    assert torch.equal(sa["rng_state"], sb["rng_state"])          # the same random numbers were drawn
    for name in files:
        assert (a / "out" / name).read_text() == (b / "out" / name).read_text(), name


@pytest.fixture(scope="module")
def serial_nvt(tmp_path_factory):
    d = write_case(tmp_path_factory.mktemp("mpi"), "serial", 100)
    run_serial(d)
    return d


def test_two_ranks_match_serial(serial_nvt):
    """216 atoms, Langevin NVT, 100 steps on 2 ranks: positions/velocities/forces within 1e-10 of the serial run,
    the same thermo log, the same trajectory frames (rank 0 writes them, atoms in the serial order)."""
    from ase.io import read

    d = write_case(serial_nvt.parent, "mpi2", 100)
    out = run_mpi(d, 2)
    assert out.count("md: 100 steps") == 1                          # rank 0 alone reports
    assert_same_run(serial_nvt, d)
    a, b = read(serial_nvt / "out/traj.extxyz", ":"), read(d / "out/traj.extxyz", ":")
    assert len(a) == len(b) == 3
    for fa, fb in zip(a, b):
        assert fa.get_chemical_symbols() == fb.get_chemical_symbols()
        assert np.abs(fa.positions - fb.positions).max() < 1e-8


def test_checkpoint_from_two_ranks_restarts_serially(serial_nvt):
    """50 steps on 2 ranks, then `dpmd md --restart` on 1 rank to step 100: the serial trajectory."""
    d = write_case(serial_nvt.parent, "restart", 100)
    cfg = yaml.safe_load((d / "input.yaml").read_text())
    (d / "half.yaml").write_text(yaml.safe_dump({**cfg, "steps": 50}))
    proc = subprocess.run([MPIEXEC, "-n", "2", sys.executable, "-m", "dpmd.cli", "md", str(d / "half.yaml")],
                          env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert checkpoint(d)["state"]["step"] == 50
    run_serial(d, "--restart", str(d / "out/checkpoint.pt"))
    assert_same_run(serial_nvt, d)


def test_triclinic_npt_three_ranks_with_model_devi(tmp_path):
    """A sheared 9 Å cell on 3 ranks (bricks 3 Å thick, thinner than rcut + skin: ghosts are several images
    deep), NPT (the cell changes every step), and a second model with another rcut for model_devi.out;
    then a serial checkpoint restarted on 2 ranks."""
    kw = dict(ensemble="npt", barostat={"damp": 0.2, "mode": "aniso"}, pressure=1000.0, model_devi_freq=10,
              models=("a", "b"), shear=True, n=3)
    ref = write_case(tmp_path, "serial", 100, **kw)
    run_serial(ref)
    d = write_case(tmp_path, "mpi3", 100, **kw)
    run_mpi(d, 3)
    assert_same_run(ref, d, files=("thermo.log",))
    da, db = np.loadtxt(ref / "out/model_devi.out"), np.loadtxt(d / "out/model_devi.out")
    assert da.shape == db.shape == (11, 8) and da[:, 4].max() > 0
    np.testing.assert_allclose(db, da, rtol=1e-5, atol=1e-12)     # the file holds 7 significant digits

    r = write_case(tmp_path, "restart", 100, **kw)                 # serial 0 -> 50, 2 ranks 50 -> 100
    cfg = yaml.safe_load((r / "input.yaml").read_text())
    (r / "half.yaml").write_text(yaml.safe_dump({**cfg, "steps": 50}))
    from dpmd.cli import main

    assert main(["md", str(r / "half.yaml")]) == 0
    run_mpi(r, 2, "--restart", str(r / "out/checkpoint.pt"))
    assert_same_run(ref, r, files=("thermo.log",))
