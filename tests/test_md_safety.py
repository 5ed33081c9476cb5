"""The MD force providers (checked, MPI's domain provider) share one set of stop messages (dpmd.md.safety) and
one Langevin thermostat; checkpoints keep the generator state as a host byte tensor; a run whose masses are
all given never imports ASE."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_model
from dpmd.errors import MDStopError
from dpmd.md import Simulation
from dpmd.md.engine import element_mass
from dpmd.md.state import MDState
from dpmd.model import DeepPot


def gas(n=32, L=14.0, seed=0):
    """Oxygen atoms on a jittered lattice 3.5 Å apart (rcut 4 Å: every atom has neighbours)."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(4)] * 3, indexing="ij"), -1).reshape(-1, 3)[:n] * (L / 4)
    return grid + rng.normal(0, 0.3, grid.shape), ["O"] * n, np.eye(3) * L


class Pairs(torch.nn.Module):
    """A repulsive pair potential behind the model interface; once `armed`, the atomic energy of every H
    atom is NaN (its forces stay finite: a model blowing up on one atom)."""

    type_map, ntypes = ["O", "H"], 2

    def __init__(self, sel=(100, 100), rcut=4.0):
        super().__init__()
        self.sel, self.rcut, self.armed = list(sel), rcut, False
        self.register_buffer("a", torch.tensor(0.5, dtype=torch.float64))

    def atomic_energy(self, edge_vec, center, center_type, neighbor_type):
        e = 0.5 * self.a * (1.0 - edge_vec.norm(dim=-1) / self.rcut).clamp(min=0) ** 2
        e = torch.zeros(center_type.shape[0], dtype=e.dtype).index_add(0, center, e)
        return e.index_fill(0, (center_type == 1).nonzero().reshape(-1), float("nan")) if self.armed else e


def one_rank():
    """MPI's provider on a world of one rank (no mpiexec: mpi4py's singleton world)."""
    pytest.importorskip("mpi4py")
    from mpi4py import MPI

    from dpmd.md.parallel import ParallelSimulation

    return lambda *args, **kw: ParallelSimulation(*args, comm=MPI.COMM_WORLD, **kw)


def stop_message(make, model, pos, sym, box, before=None, steps=5, **kw) -> str:
    sim = make(model, pos, sym, box, ensemble="nve", thermo_freq=0, log=None, **kw)
    if before is not None:
        sim.run(2)
        before(sim)
    with pytest.raises(MDStopError) as err:
        sim.run(steps)
    return str(err.value)


def test_langevin_on_the_domain_provider_follows_the_serial_run():
    """One Langevin implementation: under MPI its noise is drawn for every atom in global order (the hook
    MDState.atom_noise), so the domain provider on one rank follows the serial trajectory and random stream."""
    pos, sym, box = gas()
    kw = dict(ensemble="nvt", thermostat={"type": "langevin", "damp": 0.05}, temperature=300, timestep=1.0,
              skin=0.5, seed=3, thermo_freq=0, log=None)
    serial = Simulation(make_model(), pos, sym, box, **kw)
    mpi = one_rank()(make_model(), pos, sym, box, **kw)
    serial.run(10)
    mpi.run(10)
    assert mpi.state.natoms_global == len(sym) and torch.equal(mpi.state.gid, torch.arange(len(sym)))
    for key in ("positions", "velocities", "forces"):
        err = float((getattr(serial.state, key) - getattr(mpi.state, key)).abs().max())
        assert err < 1e-10, (key, err)
    assert torch.equal(serial.state.rng.get_state(), mpi.state.rng.get_state())


def stop_cases() -> dict:
    """name: (model, positions, symbols, what happens after 2 steps (or None), the expected stop message)."""
    pos, sym, _ = gas()
    close = pos.copy()
    close[5] = close[4] + [0.3, 0.0, 0.0]
    hydrogen = list(sym)
    hydrogen[11] = "H"

    def lose(sim):   # atom 7's velocity (under MPI: on the rank that holds it)
        rows = (sim.state.gid == 7).nonzero().reshape(-1).tolist() if hasattr(sim.state, "gid") else [7]
        sim.state.velocities[0, rows] = float("nan")

    def arm(sim):
        sim.models[0].armed = True

    return {"close": (Pairs(), close, sym, None, r"^step 0: atoms closer than min_distance 0.5 Å: "
                                                 r"atom 4 \(O\) and 5 at 0.300 Å$"),
            "lost": (Pairs(), pos, sym, lose, r"^step 3: lost atoms \(non-finite positions\): atom 7 \(O\)$"),
            "overflow": (Pairs(sel=(2, 2)), pos, sym, None,
                         r"^step 0: neighbour overflow: atom 0 \(type O\) has \d+ neighbours of type O within "
                         r"rcut but sel allows 2 \(\d+ atom\(s\) over the limit\); raise descriptor.sel"),
            "nan": (Pairs(), pos, hydrogen, arm, r"^step 3: non-finite energy or forces at atom 11 \(H\)$"),
            # a hybrid's model sel holds, its se_e2_a entry's own sel within its own rcut does not
            "entry overflow": (hybrid(), pos, sym, None,
                               r"^step 0: neighbour overflow: atom 0 \(type O\) has \d+ neighbours of type O within "
                               r"descriptor.list\[0\]'s rcut 3.8 but sel allows 2 \(\d+ atom\(s\) over the limit\); "
                               r"raise descriptor.list\[0\].sel")}


def hybrid():
    """se_e2_a (rcut 3.8, sel [2, 2]) + se_e2_r (rcut 4, sel [40, 40]), tiny nets."""
    entry = {"rcut_smth": 0.5, "neuron": [2, 4], "seed": 1}
    return DeepPot({"type_map": ["O", "H"], "fitting_net": {"neuron": [4], "seed": 1}, "descriptor": {
        "type": "hybrid", "list": [{"type": "se_e2_a", "sel": [2, 2], "rcut": 3.8, "axis_neuron": 2, **entry},
                                   {"type": "se_e2_r", "sel": [40, 40], "rcut": 4.0, **entry}]}}).double()


def stop_messages(make) -> dict:
    box = gas()[2]
    return {name: stop_message(make, model, p, s, box, before) for name, (model, p, s, before, _) in stop_cases().items()}


def test_every_provider_stops_with_the_same_message():
    """Close atoms, lost atoms, neighbour overflow (of the model's sel, of a hybrid's entry's) and a NaN atomic
    energy: the checked provider and MPI's
    domain provider (one rank here, two under mpiexec) stop at the same step with the same line."""
    serial, mpi = stop_messages(Simulation), stop_messages(one_rank())
    for name, (*_, expected) in stop_cases().items():
        assert re.match(expected, serial[name]), (name, serial[name])
        assert mpi[name] == serial[name], name
    mpiexec = shutil.which("mpiexec", path=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
    if mpiexec is None:
        pytest.skip("mpiexec not found")
    script = (f"import json, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); from mpi4py import MPI; "
              "from dpmd.md.parallel import ParallelSimulation; from test_md_safety import stop_messages; "
              "out = stop_messages(lambda *a, **k: ParallelSimulation(*a, comm=MPI.COMM_WORLD, **k)); "
              "print(json.dumps(out)) if MPI.COMM_WORLD.rank == 0 else None")
    proc = subprocess.run([mpiexec, "-n", "2", sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == serial


def test_checkpoint_generator_state_is_a_host_byte_tensor():
    """The state is kept as a CPU uint8 tensor with the kind of device it came from: the same kind continues
    the stream; another kind (a CUDA run restarted on the CPU, or the reverse: different generators) gets a
    new stream seeded from the saved state, the same at every restart, instead of an error."""
    rng = torch.Generator()
    rng.manual_seed(3)
    torch.randn(5, generator=rng)
    zeros = torch.zeros(1, 2, 3, dtype=torch.float64)
    state = MDState(positions=zeros, velocities=zeros, masses=torch.ones(1, 2, dtype=torch.float64),
                    atype=torch.zeros(1, 2, dtype=torch.long), box=None, ext_work=torch.zeros(1), rng=rng)
    saved = state.tensors()
    assert saved["rng_state"].dtype == torch.uint8 and saved["rng_state"].device.type == "cpu"
    assert saved["rng_device"] == "cpu"
    expected = torch.randn(4, generator=torch.Generator().set_state(saved["rng_state"]))
    for d in (saved, {k: v for k, v in saved.items() if k != "rng_device"}):   # (older checkpoints: no device)
        assert torch.equal(torch.randn(4, generator=MDState.from_tensors(d, "cpu").rng), expected)
    philox = {**saved, "rng_state": torch.arange(16, dtype=torch.uint8), "rng_device": "cuda"}
    a, b = (torch.randn(4, generator=MDState.from_tensors(philox, "cpu").rng) for _ in range(2))
    assert torch.equal(a, b) and not torch.equal(a, expected)
    relabelled = {**saved, "rng_device": "cuda"}   # a host state said to be a device's: not taken as ours
    assert not torch.equal(torch.randn(4, generator=MDState.from_tensors(relabelled, "cpu").rng), expected)


def test_given_masses_need_no_ase(monkeypatch):
    monkeypatch.setitem(sys.modules, "ase.data", None)   # importing ase.data now fails
    assert element_mass("H", {"H": 2.014}) == 2.014
    pos, sym, box = gas(n=8)
    sim = Simulation(Pairs(), pos, sym, box, masses={"O": 15.999}, thermo_freq=0, log=None)
    assert torch.all(sim.state.masses == 15.999)
    with pytest.raises(ImportError):   # a mass to look up: only then
        element_mass("H")
