"""`mpiexec -n N dpmd md`: the domain-decomposed run follows the serial trajectory (float64, 1e-10 after
100 steps) in every ensemble and on 1-, 2- and 3-D rank grids, writes the same files, and its checkpoints
restart on any number of ranks."""

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


def run_serial(d: Path, *extra, config="input.yaml"):
    from dpmd.cli import main

    assert main(["md", str(d / config), *extra]) == 0


def run_many(ranks: int, *commands: list[str]) -> str:
    """Several `dpmd md ARGS...` in one mpiexec launch (start-up, mostly importing torch, dominates a run)."""
    script = ("import json, sys; from dpmd.cli import main; "
              "sys.exit(max(main(['md', *a]) for a in json.loads(sys.argv[1])))")
    proc = subprocess.run([MPIEXEC, "-n", str(ranks), sys.executable, "-c", script, json.dumps(commands)],
                          env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout + proc.stderr


def run_mpi(d: Path, ranks: int, *extra, config="input.yaml"):
    return run_many(ranks, [str(d / config), *extra])


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


def write_half(d: Path) -> Path:
    """half.yaml beside input.yaml: the same run stopped at step 50 (its checkpoint restarts input.yaml)."""
    cfg = yaml.safe_load((d / "input.yaml").read_text())
    (d / "half.yaml").write_text(yaml.safe_dump({**cfg, "steps": 50}))
    return d / "half.yaml"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Serial runs by name (made once per module): reference(name, **write_case keywords) -> case folder."""
    root, made = tmp_path_factory.mktemp("mpi"), {}

    def get(name, **kw):
        if name not in made:
            made[name] = write_case(root, name, 100, **kw)
            run_serial(made[name])
        return made[name]

    return get


THERMOSTATS = {"nve": dict(ensemble="nve", thermostat=None),
               "csvr": dict(thermostat={"type": "csvr", "damp": 0.05}),
               "nose_hoover": dict(thermostat={"type": "nose_hoover", "damp": 0.05, "chain": 3})}


@pytest.fixture(scope="module")
def ensemble_runs(reference):
    """{(ensemble, ranks): case} for each ensemble on 2 and 3 ranks, and a Nose-Hoover chain run checkpointed at
    step 50 on 3 ranks then restarted on 2: one mpiexec launch per rank count."""
    root = reference("nve", **THERMOSTATS["nve"]).parent
    runs = {(e, r): write_case(root, f"{e}_{r}", 100, **kw) for e, kw in THERMOSTATS.items() for r in (2, 3)}
    restart = write_case(root, "restart_3_2", 100, **THERMOSTATS["nose_hoover"])
    run_many(3, *[[str(d / "input.yaml")] for (_, r), d in runs.items() if r == 3], [str(write_half(restart))])
    assert checkpoint(restart)["state"]["step"] == 50
    run_many(2, *[[str(d / "input.yaml")] for (_, r), d in runs.items() if r == 2],
             [str(restart / "input.yaml"), "--restart", str(restart / "out/checkpoint.pt")])
    runs["restart"] = restart
    return runs


@pytest.mark.parametrize("ranks", [2, 3])
@pytest.mark.parametrize("ensemble", list(THERMOSTATS))
def test_ensembles_match_serial(reference, ensemble_runs, ensemble, ranks):
    """216 atoms, 100 steps of NVE, CSVR (Bussi) or Nose-Hoover chain NVT on 2 or 3 ranks: the serial run."""
    assert_same_run(reference(ensemble, **THERMOSTATS[ensemble]), ensemble_runs[ensemble, ranks])


def test_checkpoint_from_three_ranks_restarts_on_two(reference, ensemble_runs):
    """Nose-Hoover chain NVT, 50 steps on 3 ranks, then --restart on 2 ranks to step 100: the serial trajectory
    (the chain's variables travel in the checkpoint)."""
    assert_same_run(reference("nose_hoover", **THERMOSTATS["nose_hoover"]), ensemble_runs["restart"])


def test_four_ranks_on_a_2d_grid_triclinic(reference):
    """A sheared 216-atom cell on 4 ranks: the processor grid is 2-D (bricks meet across edges and corners,
    diagonal neighbours exchange ghosts), Langevin NVT follows the serial run."""
    from dpmd.md.domain import choose_grid

    _, _, box = lattice(shear=True)
    assert sorted(choose_grid(box, 4)) == [1, 2, 2]
    ref = reference("triclinic", shear=True)
    d = write_case(ref.parent, "triclinic_4", 100, shear=True)
    run_mpi(d, 4)
    assert_same_run(ref, d)


@pytest.fixture(scope="module")
def serial_nvt(reference):
    return reference("langevin")


def test_two_ranks_match_serial(serial_nvt):
    """216 atoms, Langevin NVT, 100 steps on 2 ranks: positions/velocities/forces within 1e-10 of the serial run,
    the same thermo log, the same trajectory frames (rank 0 writes them, atoms in the serial order)."""
    from ase.io import read

    d = write_case(serial_nvt.parent, "mpi2", 100)
    out = run_mpi(d, 2)
    assert out.count("md: 100 steps") == 1                          # rank 0 alone logs
    assert_same_run(serial_nvt, d)
    a, b = read(serial_nvt / "out/traj.extxyz", ":"), read(d / "out/traj.extxyz", ":")
    assert len(a) == len(b) == 3
    for fa, fb in zip(a, b):
        assert fa.get_chemical_symbols() == fb.get_chemical_symbols()
        assert np.abs(fa.positions - fb.positions).max() < 1e-8


def test_checkpoint_from_two_ranks_restarts_serially(serial_nvt):
    """50 steps on 2 ranks, then `dpmd md --restart` on 1 rank to step 100: the serial trajectory."""
    d = write_case(serial_nvt.parent, "restart_2_1", 100)
    run_mpi(d, 2, config=write_half(d).name)
    assert checkpoint(d)["state"]["step"] == 50
    run_serial(d, "--restart", str(d / "out/checkpoint.pt"))
    assert_same_run(serial_nvt, d)


def test_triclinic_npt_three_ranks_with_model_devi(tmp_path):
    """A sheared 9 Å cell on 3 ranks (bricks 3 Å thick, thinner than rcut + skin: ghosts are several images
    deep), fully flexible NPT (the cell shears every step), and a second model with another rcut for model_devi.out;
    then a serial checkpoint restarted on 2 ranks."""
    kw = dict(ensemble="npt", barostat={"damp": 0.2, "mode": "tri"}, pressure=1000.0, model_devi_freq=10,
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
    run_serial(r, config=write_half(r).name)
    run_mpi(r, 2, "--restart", str(r / "out/checkpoint.pt"))
    assert_same_run(ref, r, files=("thermo.log",))
