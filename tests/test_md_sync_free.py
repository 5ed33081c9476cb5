"""Sync-free stepping (the MD engine's mode on a GPU, run here on the CPU): ordinary steps read nothing back
from the device, the trajectory is the checked path's, restarts are exact, and every safety stop still
fires, a couple of steps late, with the checked path's message."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

from conftest import EXAMPLE, REPO, make_model
from dpmd import ops
from dpmd.errors import ConfigError, DpmdError
from dpmd.md import MDStopError, Simulation, normalize_md_config
from dpmd.md.host_sync import count_host_syncs
from dpmd.model import load_model
from dpmd.model.compress import compress_model

SMALL_MODEL = REPO / "examples" / "water" / "model_small.pth"


@pytest.fixture(scope="module")
def water_model():
    return load_model(SMALL_MODEL)


def water(nframes=1):
    """192-atom liquid water frames of the example data."""
    from dpmd.data import load_system

    s = load_system(EXAMPLE, ["O", "H"])
    return s.coord[:nframes].reshape(nframes, -1, 3), [["O", "H"][t] for t in s.atype], s.box[0].reshape(3, 3)


def pair(model, **kw):
    """The same run, checked and sync-free."""
    pos, sym, box = kw.pop("system", None) or water()
    args = dict(ensemble="nvt", thermostat={"type": "langevin", "damp": 0.05}, timestep=1.0, skin=2.0,
                thermo_freq=0, seed=5, log=None)
    args.update(kw)
    return [Simulation(model, pos, sym, box, sync_free=sf, **args) for sf in (False, True)]


def test_ordinary_steps_read_nothing_back(water_model):
    checked, free = pair(water_model, thermo_freq=10)
    with count_host_syncs() as c:
        checked.run(10)
    assert c.count >= 5 * 10   # the counter sees the checked path's reads (about a dozen per step)
    free.run(2)
    builds = free.verlet.builds
    with count_host_syncs() as c:
        free.run(30)
    assert c.count == 0, c.sites
    assert c.expected["output"] == 4                     # steps 10, 20, 30 (thermo) and 32 (the end)
    assert c.expected.get("host rebuild", 0) == free.verlet.builds - builds > 0   # from the lagged positions
    assert c.expected["lagged flags"] >= 30 - 3 * 2      # one flag read per step, less what the drains took


@pytest.mark.parametrize("ensemble, thermostat, barostat", [("nve", None, None), ("nvt", "csvr", None),
                                                           ("nvt", "nose_hoover", None), ("npt", "langevin", "iso"),
                                                           ("npt", "csvr", "tri")])
def test_every_ensemble_steps_without_reading_back(water_model, ensemble, thermostat, barostat):
    _, free = pair(water_model, ensemble=ensemble, thermostat={"type": thermostat} if thermostat else None,
                   barostat={"mode": barostat} if barostat else None, pressure=[1.0, 500.0], temperature=[300.0, 330.0],
                   steps=20)
    free.run(3)
    with count_host_syncs() as c:
        free.run(6)
    assert c.count == 0, c.sites


@pytest.mark.parametrize("case", ["nvt", "npt_batch", "compressed", "two_side", "reference"])
def test_sync_free_follows_the_checked_trajectory(water_model, case):
    """reference: the PyTorch path (no kernel library; on a GPU without it), the padded blocks as dense bmm."""
    model, kw = water_model, {}
    if case == "npt_batch":
        kw = dict(system=water(2), ensemble="npt", barostat={"mode": "tri", "damp": 0.2}, pressure=1000.0)
    elif case == "compressed":
        model = compress_model(water_model, min_nbor_dist=0.885)
    elif case == "two_side":   # a net per pair of types: centres grouped by type inside the model
        model = make_model(type_one_side=False, rcut=4.0, sel=(30, 60))
        kw = dict(timestep=0.25, min_distance=0.05)   # (a random model keeps no O-H bond: an H may pass its O)
    checked, free = pair(model, **kw)
    with ops.reference_only() if case == "reference" else contextlib.nullcontext():
        checked.run(100)
        free.run(100)
    assert free.verlet.builds >= 2   # the lists were rebuilt along the way
    a, b = checked.state, free.state
    assert torch.allclose(a.positions, b.positions, rtol=0, atol=1e-11)
    assert torch.allclose(a.forces, b.forces, rtol=0, atol=1e-9)
    assert torch.allclose(a.energy, b.energy, rtol=1e-13, atol=0)
    assert torch.allclose(a.virial, b.virial, rtol=0, atol=1e-8)
    if case == "npt_batch":
        assert torch.allclose(a.box, b.box, rtol=0, atol=1e-12) and not torch.equal(b.box[0], b.box[1])


def test_restart_continues_bit_for_bit(water_model, tmp_path):
    _, whole = pair(water_model)
    whole.run(30)
    _, first = pair(water_model, output_dir=tmp_path, checkpoint_freq=15, traj_freq=0)
    first.run(15)
    _, second = pair(water_model)
    second.restore(tmp_path / "checkpoint.pt")
    second.run(15)
    assert torch.equal(whole.state.positions, second.state.positions)
    assert torch.equal(whole.state.velocities, second.state.velocities)


def test_model_deviation_on_output_steps(water_model):
    other = compress_model(water_model, min_nbor_dist=0.885)
    checked, free = pair([water_model, other], model_devi_freq=5)
    checked.run(20)
    free.run(20)
    for (s1, d1), (s2, d2) in zip(checked.devi_history, free.devi_history):
        assert s1 == s2 and np.allclose(d1, d2, rtol=1e-8, atol=1e-12)
    assert len(free.devi_history) == 5 and free.devi_history[-1][1][0, 3] > 0   # max_devi_f of two models


def test_safety_stops_name_the_atoms_a_few_steps_late(water_model, tmp_path):
    _, free = pair(water_model, output_dir=tmp_path / "lost", traj_freq=0, checkpoint_freq=0)
    free.run(2)
    free.state.velocities[0, 7] = float("nan")
    with pytest.raises(MDStopError, match=r"step 5: lost atoms \(non-finite positions\): atom 7 \(O\) "
                                          r"\(first seen at step 3\).*crash.extxyz"):
        free.run(10)
    _, free = pair(make_model(sel=(2, 4)))   # too few slots for liquid water within 4 Å
    with pytest.raises(MDStopError, match=r"step 0: neighbour overflow: atom \d+ \(type [OH]\) has.*"
                                          r"\(first seen at step 0\)"):
        free.run(5)
    pos, sym, box = water()
    pos[0, 1] = pos[0, 0] + [0.3, 0.0, 0.0]
    _, free = pair(water_model, system=(pos, sym, box))
    with pytest.raises(MDStopError, match=r"atoms closer than min_distance 0.5 Å: atom 0 \(O\) and 1.*"
                                          r"\(first seen at step 0\)"):
        free.run(5)


def test_a_stale_list_stops_the_run(water_model, monkeypatch):
    """The look-ahead keeps lists fresh; should it fail, the exact test stops the run rather than use a list
    that may miss a neighbour."""
    _, free = pair(water_model, skin=0.3, timestep=2.0, temperature=600.0)
    monkeypatch.setattr(free._sync_free, "reach", lambda steps, speed, accel: 0.0 * speed)   # no look-ahead
    with pytest.raises(MDStopError, match=r"stale neighbour list at step \d+; increase the skin"):
        free.run(200)


def test_a_skin_too_thin_to_look_ahead_is_refused(water_model):
    _, free = pair(water_model, skin=0.02)
    with pytest.raises(MDStopError, match=r"skin 0.02 Å is too thin for sync-free stepping.*increase the skin"):
        free.run(20)
    # chosen by auto (on a GPU): one line, and the run goes on with the checked path, on the same trajectory
    lines = []
    checked, free = pair(water_model, skin=0.3, log=lines.append)
    free._sync_free.strict = False
    checked.run(20)
    free.run(20)
    assert not free.sync_free and len(lines) == 1
    assert "too thin for sync-free stepping" in lines[0] and "continuing without sync-free stepping" in lines[0]
    assert torch.allclose(checked.state.positions, free.state.positions, rtol=0, atol=1e-12)


def test_sync_free_inputs(water_model):
    base = {"structure": "x.xyz", "models": ["m.pth"], "steps": 10}
    assert normalize_md_config(base)["sync_free"] == "auto"
    with pytest.raises(ConfigError, match="sync_free: expected auto, true or false, got 'yes please'"):
        normalize_md_config({**base, "sync_free": "yes please"})
    pos, sym, box = water()
    assert not Simulation(water_model, pos, sym, box).sync_free   # auto: on CUDA devices only
    with pytest.raises(DpmdError, match="sync_free: a bias potential is not supported"):
        Simulation(water_model, pos, sym, box, sync_free=True, bias=lambda models, graph, out: out)
