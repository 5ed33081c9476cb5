"""MD engine physics: energy conservation, thermostats and barostat sample their targets, exact restarts,
Verlet list == fresh list, model deviation as DeePMD-kit defines it, safety stops, input validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import DEEPMD_REF, EXAMPLE, make_model
from dpmd.errors import ConfigError, DpmdError
from dpmd.geometry.graph import build_graph
from dpmd.md import MDStopError, Simulation, normalize_md_config, run_md
from dpmd.md.units import NKTV2P
from dpmd.model import evaluate, load_model

WATER_MODEL = DEEPMD_REF / "model.ckpt.pt"
needs_water_model = pytest.mark.skipif(not WATER_MODEL.is_file(), reason="DeePMD-kit water model not available")


@pytest.fixture(scope="module")
def water_model():
    return load_model(WATER_MODEL)


def small_water(frame=24, origin=(4 / 7, 6 / 7, 0.0)):
    """8 whole water molecules of an example frame in a cell of half the edge (24 atoms, 6.2 Å, liquid density).

    The origin is chosen so that no two molecules overlap across the new cell faces (closest 1.8 Å)."""
    from dpmd.data import load_system

    s = load_system(EXAMPLE, ["O", "H"])
    c, L, at = s.coord[frame].reshape(-1, 3), s.box[frame].reshape(3, 3)[0, 0], s.atype
    O, H = np.where(at == 0)[0], np.where(at == 1)[0]
    d = c[H][:, None] - c[O][None]
    d -= L * np.round(d / L)
    owner = O[np.linalg.norm(d, axis=-1).argmin(1)]
    mols = []
    for o in O[(((c[O] - np.array(origin) * L) % L) < L / 2).all(1)]:
        h = c[H[owner == o]]
        mols.append(np.vstack([c[o], c[o] + (h - c[o] - L * np.round((h - c[o]) / L))]))
    return np.concatenate(mols), ["O", "H", "H"] * len(mols), np.eye(3) * L / 2


def gas(nframes=2, n=32, L=14.0, seed=0):
    """Oxygen 'gas' on a jittered lattice, 3.5 Å apart (rcut 4 Å, so every atom has neighbours)."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(4)] * 3, indexing="ij"), -1).reshape(-1, 3)[:n] * (L / 4)
    return np.stack([grid + rng.normal(0, 0.3, grid.shape) for _ in range(nframes)]), ["O"] * n, np.eye(3) * L


class SoftSpheres(torch.nn.Module):
    """A purely repulsive pair potential A (1 - r/rc)^2 behind the same model interface (atomic_energy ->
    dpmd.model.evaluate), for the thermostat and barostat tests: the random DeepPot has an attractive core
    that collapses pairs within a few hundred steps, which no thermostat test should depend on."""

    type_map, sel = ["O", "H"], [100, 100]
    ntypes = 2

    def __init__(self, rcut=4.0, a=0.5):
        super().__init__()
        self.rcut = rcut
        self.register_buffer("a", torch.tensor(a, dtype=torch.float64))

    def atomic_energy(self, edge_vec, center, center_type, neighbor_type):
        e = 0.5 * self.a * (1.0 - edge_vec.norm(dim=-1) / self.rcut).clamp(min=0) ** 2
        return torch.zeros(center_type.shape[0], dtype=e.dtype).index_add(0, center, e)


def test_small_water_is_whole_molecules():
    pos, sym, box = small_water()
    assert len(sym) == 24
    d = pos[:, None] - pos[None]
    d -= box[0, 0] * np.round(d / box[0, 0])
    r = np.linalg.norm(d, axis=-1) + np.eye(24) * 9
    assert r.min() > 0.9


@needs_water_model
def test_nve_conserves_energy(water_model):
    """Velocity Verlet with the DeePMD water model: 100 steps of 0.5 fs; the conserved energy stays flat
    while the kinetic energy swings (the small cell is far from the model's equilibrium)."""
    pos, sym, box = small_water()
    sim = Simulation(water_model, pos, sym, box, ensemble="nve", timestep=0.5, temperature=300, seed=2,
                     thermo_freq=0)
    etot, ke = [], []
    for k in range(1, 21):
        sim.run(5)
        th = sim.thermo()
        etot.append(th["econserve"][0])
        ke.append(th["ke"][0])
    etot, ke = np.array(etot), np.array(ke)
    assert np.ptp(ke) > 0.5                                        # real dynamics: KE changes by > 0.5 eV
    # measured: ptp 3.5e-4 eV/atom, std ratio 0.0025; both fall 4x at 0.25 fs (second order)
    assert np.ptp(etot) / len(sym) < 5e-4, np.ptp(etot)            # eV/atom over 50 fs
    assert abs(etot[-1] - etot[0]) / len(sym) < 2e-4
    assert np.std(etot) < 0.005 * np.std(ke)
    # drift: slope of a linear fit of the conserved energy, per atom per ps (times of the samples in ps)
    drift = np.polyfit(np.arange(1, 21) * 5 * 0.5e-3, etot / len(sym), 1)[0]
    assert abs(drift) < 5e-3, drift                                # eV/atom/ps; measured -5.5e-4


SMALL_MODEL = EXAMPLE.parent / "model_small.pth"   # trained on the water data (examples/water/README.md)


@pytest.mark.slow
def test_nve_conserves_energy_over_a_picosecond():
    """1 ps (2000 steps of 0.5 fs) of the 192-atom water box with the repository's trained water model:
    the conserved energy stays flat (drift per atom per ps bounded) while the kinetic energy swings."""
    from dpmd.data import load_system

    s = load_system(EXAMPLE, ["O", "H"])
    sym = [["O", "H"][t] for t in s.atype]
    sim = Simulation(load_model(SMALL_MODEL), s.coord[0].reshape(-1, 3), sym, s.box[0].reshape(3, 3),
                     ensemble="nve", timestep=0.5, temperature=300, seed=2, thermo_freq=0)
    etot, ke = [], []
    for k in range(1, 51):
        sim.run(40)
        th = sim.thermo()
        etot.append(th["econserve"][0] / len(sym))
        ke.append(th["ke"][0])
    etot, times = np.array(etot), np.arange(1, 51) * 40 * 0.5e-3   # ps
    assert np.ptp(ke) > 0.5                                          # real dynamics (measured 1.2 eV)
    drift = np.polyfit(times, etot, 1)[0]
    assert abs(drift) < 5e-5, drift                                  # eV/atom/ps; measured 5.0e-6
    assert np.ptp(etot) < 5e-4, np.ptp(etot)                         # eV/atom; measured 8.9e-5


@pytest.mark.parametrize("kind", ["langevin", "csvr", "nose_hoover"])
def test_thermostat_reaches_target_temperature(kind):
    """Eight systems (batched) start at 100 K; the thermostat holds them at 300 K within 2 % on average."""
    pos, sym, box = gas(nframes=8)
    sim = Simulation(SoftSpheres(), pos, sym, box, ensemble="nvt", thermostat={"type": kind, "damp": 0.05},
                     timestep=2.0, temperature=300, seed=3, thermo_freq=0)
    sim.state.velocities = sim.state.velocities * (1 / 3) ** 0.5
    assert np.allclose(sim.thermo()["temp"], 100.0)
    econs, ke = [sim.thermo()["econserve"]], [sim.thermo()["ke"]]
    temps = []
    for k in range(1, 151):  # 3 ps; average over the last 2.4 ps of all eight systems
        sim.run(10)
        th = sim.thermo()
        if k > 30:
            temps.append(th["temp"])
        econs.append(th["econserve"])
        ke.append(th["ke"])
    assert abs(np.mean(temps) - 300.0) < 0.02 * 300.0, np.mean(temps)
    # the heat the thermostat exchanged is booked: econserve stays flat while the energy doubles
    econs, ke = np.array(econs), np.array(ke)
    assert ke[-1].mean() > 2.5 * ke[0].mean()
    ratio = np.ptp(econs, axis=0) / np.ptp(ke, axis=0)
    print(kind, ratio.max())
    assert (ratio < 2e-3).all(), ratio    # measured 5e-5 (csvr) to 2e-4 (nose_hoover)
    # zero total momentum is preserved by every thermostat
    p = (sim.state.masses.unsqueeze(-1) * sim.state.velocities).sum(1)
    assert p.abs().max() < 1e-9


@pytest.mark.parametrize("mode", ["iso", "aniso"])
def test_npt_volume_goes_to_target_pressure(mode):
    """Stochastic cell rescaling on a soft-sphere gas at half its ideal-gas pressure: the volume grows
    (beyond the ideal gas's N kT / P0, the spheres repel) and the instantaneous pressure fluctuates around P0."""
    pos, sym, box = gas()
    n, kT = len(sym), 8.617343e-5 * 300
    p_init = n * kT / np.linalg.det(box) * NKTV2P
    p0 = 0.5 * p_init
    sim = Simulation(SoftSpheres(), pos, sym, box, ensemble="npt", thermostat={"type": "csvr", "damp": 0.05},
                     barostat={"damp": 0.1, "mode": mode, "compressibility": 1.0 / p0}, pressure=p0,
                     timestep=2.0, temperature=300, seed=5, thermo_freq=0)
    vols, press = [], []
    for k in range(1, 101):
        sim.run(4)
        if k > 40:
            th = sim.thermo()
            vols.append(th["vol"])
            press.append(th["press"])
    v_ideal = n * kT / (p0 / NKTV2P)
    assert v_ideal < np.mean(vols) < 1.6 * v_ideal, (np.mean(vols), v_ideal)
    assert abs(np.mean(press) / p0 - 1) < 0.15, (np.mean(press), p0)
    if mode == "iso":  # the cell keeps its shape
        b = sim.state.box[0]
        assert torch.allclose(b / b[0, 0], torch.eye(3, dtype=b.dtype))


def _md_config(tmp, steps, **kw):
    pos, sym, box = small_water()
    tmp.mkdir(exist_ok=True)
    from ase import Atoms
    from ase.io import write

    write(tmp / "water24.extxyz", Atoms(sym, positions=pos, cell=box, pbc=True))
    cfg = {"structure": str(tmp / "water24.extxyz"), "models": [str(WATER_MODEL)], "ensemble": "npt",
           "thermostat": {"type": "langevin", "damp": 0.05}, "barostat": {"damp": 0.2, "mode": "aniso"},
           "pressure": 1000.0, "temperature": 300, "timestep": 0.5, "steps": steps, "seed": 7, "skin": 0.5,
           "thermo_freq": 1, "traj_freq": 5, "traj_format": ["extxyz", "lammps"], "checkpoint_freq": 10,
           "output_dir": str(tmp / "out")}
    cfg.update(kw)
    return cfg


@needs_water_model
def test_restart_is_bit_for_bit(tmp_path):
    """20 steps in one go == 10 steps, a job killed at step 13, then `dpmd md --restart` from the step-10
    checkpoint to 20 (Langevin + anisotropic barostat, so the RNG state matters): same state, same files."""
    import shutil

    import yaml

    from dpmd.cli import main
    from dpmd.md.config import build_simulation

    run_md(_md_config(tmp_path / "a", 20), log=None)
    cfg_b = _md_config(tmp_path / "b", 20)
    sim = build_simulation(normalize_md_config(cfg_b), log=None)
    sim.run(10)
    shutil.copy(tmp_path / "b/out/checkpoint.pt", tmp_path / "b/ckpt10.pt")
    sim.run(3)                        # the job goes on past the checkpoint, then dies
    sim.close()
    (tmp_path / "b/input.yaml").write_text(yaml.safe_dump(cfg_b))
    assert main(["md", str(tmp_path / "b/input.yaml"), "--restart", str(tmp_path / "b/ckpt10.pt")]) == 0

    a = torch.load(tmp_path / "a/out/checkpoint.pt", weights_only=True)["state"]
    b = torch.load(tmp_path / "b/out/checkpoint.pt", weights_only=True)["state"]
    assert a["step"] == b["step"] == 20
    for key in ("positions", "velocities", "forces", "box", "virial", "energy", "ext_work", "rng_state"):
        assert torch.equal(a[key], b[key]), key
    for name in ("thermo.log", "traj.extxyz", "dump.lammpstrj"):
        assert (tmp_path / "a/out" / name).read_bytes() == (tmp_path / "b/out" / name).read_bytes(), name
    assert len((tmp_path / "a/out/thermo.log").read_text().splitlines()) == 1 + 21

    nvt = {k: v for k, v in cfg_b.items() if k not in ("barostat", "pressure")}
    other = build_simulation(normalize_md_config({**nvt, "ensemble": "nvt"}), log=None)
    with pytest.raises(DpmdError, match=r"ckpt10.pt: written by a npt langevin aniso run, this input is nvt langevin"):
        other.restore(tmp_path / "b/ckpt10.pt")


@needs_water_model
def test_verlet_list_gives_the_same_forces_as_a_fresh_list(water_model):
    """Skin 1 Å, rebuilt only when needed: forces equal those on a fresh rcut list at every step."""
    pos, sym, box = small_water()
    sim = Simulation(water_model, pos, sym, box, ensemble="nvt", thermostat={"type": "langevin", "damp": 0.1},
                     temperature=600, timestep=1.0, skin=1.0, seed=4, thermo_freq=0)
    for _ in range(30):
        sim.run(1)
        s = sim.state
        ref = evaluate(water_model, build_graph(s.positions[0], s.atype[0], s.box[0], water_model.rcut))
        assert torch.allclose(s.forces[0], ref["force"], rtol=0, atol=1e-10)
        assert torch.allclose(s.virial[0], ref["virial"][0], rtol=0, atol=1e-9)
    assert 2 <= sim.verlet.builds < 30


def test_verlet_list_rebuilds_on_box_change():
    """A strained cell invalidates the list even when no atom moved relative to the cell."""
    from dpmd.md.neighbors import VerletList

    pos, sym, box = gas(nframes=1)
    x, h = torch.tensor(pos), torch.tensor(box).unsqueeze(0)
    nl = VerletList(4.0, 1.0)
    nl.build(x, h)
    assert not nl.needs_rebuild(x, h).any()
    assert not nl.needs_rebuild(x * 1.05, h * 1.05).any()     # 2 d + 5 * 0.087 < 1
    assert nl.needs_rebuild(x * 1.15, h * 1.15).all()


@needs_water_model
def test_model_devi(tmp_path, water_model):
    """Two identical models: zero deviation.  The water model and a random one (different rcut, so their
    own neighbour lists): DeePMD-kit's formulas computed directly from each model's output."""
    pos, sym, box = small_water()
    sim = Simulation([water_model, water_model], pos, sym, box, ensemble="nve", timestep=0.5, seed=1,
                     thermo_freq=0, model_devi_freq=5, output_dir=tmp_path / "same", log=None)
    sim.run(10)
    sim.close()
    rows = np.loadtxt(tmp_path / "same/model_devi.out")
    assert rows.shape == (3, 8) and np.all(rows[:, 1:] == 0.0)
    assert (tmp_path / "same/model_devi.out").read_text().startswith(
        "#       step         max_devi_v         min_devi_v         avg_devi_v         max_devi_f")

    other = make_model()
    sim = Simulation([water_model, other], pos, sym, box, ensemble="nve", timestep=0.5, seed=1,
                     thermo_freq=0, model_devi_freq=5, output_dir=tmp_path / "diff", log=None)
    sim.run(5)
    sim.close()
    row = np.loadtxt(tmp_path / "diff/model_devi.out")[-1]
    s = sim.state
    outs = [m(s.positions[0], s.atype[0], s.box[0]) for m in (water_model, other)]
    f = np.stack([o["force"].detach().numpy() for o in outs])
    v = np.stack([o["virial"].detach().numpy() for o in outs]) / 24
    e = np.stack([float(o["energy"]) for o in outs]) / 24
    devi_f = np.linalg.norm(np.std(f, axis=0), axis=-1)
    devi_v = np.std(v, axis=0)
    expect = [devi_v.max(), devi_v.min(), np.linalg.norm(devi_v) / 3, devi_f.max(), devi_f.min(), devi_f.mean(),
              np.std(e)]
    assert row[0] == 5
    np.testing.assert_allclose(row[1:], expect, rtol=2e-6)    # the file holds 7 significant digits


def test_batched_systems_match_single_runs():
    """Two systems advanced together (one model call per step) follow the same trajectories as alone."""
    pos, sym, box = gas(nframes=2)
    model = make_model()
    batch = Simulation(model, pos, sym, box, ensemble="nve", timestep=2.0, seed=1, thermo_freq=0)
    v0 = batch.state.velocities.clone()
    batch.run(20)
    for f in range(2):
        one = Simulation(model, pos[f], sym, box, ensemble="nve", timestep=2.0, velocities=v0[f], thermo_freq=0)
        one.run(20)
        assert torch.allclose(one.state.positions[0], batch.state.positions[f], rtol=0, atol=1e-10)


def test_run_n_advances_n_more_steps_and_upto_reaches_a_total():
    """run(n) is ASE's dyn.run(n) and LAMMPS's `run n`: two blocks of run(20) advance 40 steps.  run(upto=N) is
    the step N in total (LAMMPS's `run N upto`): the same trajectory; a total behind the run is refused."""
    pos, sym, box = gas(nframes=1)
    model = make_model()
    kw = dict(ensemble="nve", timestep=2.0, seed=1, thermo_freq=0, log=None)
    blocks = Simulation(model, pos[0], sym, box, **kw)
    assert blocks.run(20)["steps"] == 20 and blocks.run(20)["steps"] == 20 and blocks.state.step == 40
    totals = Simulation(model, pos[0], sym, box, **kw)
    assert totals.run(upto=15)["steps"] == 15 and totals.run(upto=40)["steps"] == 25
    assert torch.equal(blocks.state.positions, totals.state.positions)
    assert blocks.run(upto=40)["steps"] == 0 and blocks.run(0)["steps"] == 0
    with pytest.raises(DpmdError, match=r"^run: upto=30 is behind the current step 40 \(upto is the step to reach "
                                        r"in total; run\(30\) advances 30 more steps\)$"):
        blocks.run(upto=30)
    with pytest.raises(DpmdError, match=r"^run: give steps \(how many more\) or upto"):
        blocks.run(5, upto=50)
    for bad in (-1, 2.5, True):
        with pytest.raises(DpmdError, match=rf"^run: steps must be a whole number >= 0, got {bad!r}$"):
            blocks.run(bad)
    with pytest.raises(DpmdError, match=r"^run: no steps given and none configured"):
        blocks.run()

    configured = Simulation(model, pos[0], sym, box, steps=12, **kw)   # run(): up to `steps` in total, as dpmd md
    assert configured.run()["steps"] == 12 and configured.run()["steps"] == 0
    configured.run(3)
    with pytest.raises(DpmdError, match=r"^steps: 12 in total, but the run is already at step 15"):
        configured.run()


def test_stops_on_close_atoms(tmp_path):
    pos, sym, box = gas(nframes=1)
    pos = pos[0]
    pos[5] = pos[4] + [0.3, 0.0, 0.0]
    sim = Simulation(make_model(), pos, sym, box, ensemble="nve", output_dir=tmp_path, thermo_freq=0, log=None)
    with pytest.raises(MDStopError, match=r"step 0: atoms closer than min_distance 0.5 Å: atom 4 \(O\) and 5 "
                                          r"at 0.300 Å.*crash.checkpoint.pt.*crash.extxyz"):
        sim.run(10)
    assert (tmp_path / "crash.checkpoint.pt").is_file() and (tmp_path / "crash.extxyz").is_file()


def test_stops_on_lost_atoms_and_overflow(tmp_path):
    pos, sym, box = gas(nframes=1)
    sim = Simulation(make_model(), pos[0], sym, box, ensemble="nve", thermo_freq=0, log=None,
                     output_dir=tmp_path / "lost")
    sim.run(2)
    sim.state.velocities[0, 7] = float("nan")
    with pytest.raises(MDStopError, match=r"step 3: lost atoms \(non-finite positions\): atom 7 \(O\).*crash.extxyz"):
        sim.run(5)
    dense = small_water()
    sim = Simulation(make_model(sel=(2, 4)), *dense, ensemble="nve", thermo_freq=0, log=None,
                     output_dir=tmp_path / "overflow")
    with pytest.raises(MDStopError, match=r"step 0: neighbour overflow: atom \d+ \(type [OH]\) has.*crash.extxyz"):
        sim.run(5)
    for case in ("lost", "overflow"):   # the last state, readable
        assert torch.load(tmp_path / case / "crash.checkpoint.pt", weights_only=True)["format"] == "dpmd-md-checkpoint"
        assert len(read_xyz(tmp_path / case / "crash.extxyz")) == len(sym if case == "lost" else dense[1])


def read_xyz(path):
    from ase.io import read

    return read(path)


class NaNAt(SoftSpheres):
    """Soft spheres whose atom `bad` gets a NaN energy once `armed` (a model blowing up on one atom)."""

    def __init__(self, bad):
        super().__init__()
        self.bad, self.armed = bad, False

    def atomic_energy(self, edge_vec, center, center_type, neighbor_type):
        e = super().atomic_energy(edge_vec, center, center_type, neighbor_type)
        return e.index_fill(0, torch.tensor([self.bad]), float("nan")) if self.armed else e


def test_stops_on_nan_energy_naming_the_atom(tmp_path):
    pos, sym, box = gas(nframes=1)
    model = NaNAt(bad=11)
    sim = Simulation(model, pos[0], sym, box, ensemble="nve", thermo_freq=0, log=None, output_dir=tmp_path)
    sim.run(3)
    model.armed = True
    with pytest.raises(MDStopError, match=r"step 4: non-finite energy or forces at atom 11 \(O\).*crash.extxyz"):
        sim.run(10)
    assert (tmp_path / "crash.checkpoint.pt").is_file() and len(read_xyz(tmp_path / "crash.extxyz")) == len(sym)


def test_temperature_ramp_is_followed():
    """temperature [start, end] ramps linearly over `steps`: a tightly coupled CSVR run follows it."""
    pos, sym, box = gas(nframes=8)
    sim = Simulation(SoftSpheres(), pos, sym, box, ensemble="nvt", thermostat={"type": "csvr", "damp": 0.02},
                     temperature=[200.0, 600.0], steps=400, timestep=2.0, seed=3, thermo_freq=0, log=None)
    assert sim.temperature(0) == 200.0 and sim.temperature(100) == 300.0 and sim.temperature(400) == 600.0
    temps = []
    for step in range(10, 401, 10):
        sim.run(10)
        temps.append((step, sim.thermo()["temp"].mean()))
    lag = 10   # steps: the thermostat follows the target with its time constant (damp / timestep)
    for lo, hi in ((100, 160), (340, 400)):   # window means against the ramp's mean over the window
        got = np.mean([t for s, t in temps if lo < s <= hi])
        want = np.mean([200.0 + 400.0 * (s - lag) / 400 for s, _ in temps if lo < s <= hi])
        assert abs(got / want - 1) < 0.06, (lo, hi, got, want)


def test_bad_input_is_one_line(tmp_path, capsys):
    from dpmd.cli import main

    with pytest.raises(ConfigError, match="^unknown key 'tempreature'; valid keys: .*temperature, thermo_freq"):
        normalize_md_config({"structure": "x", "models": ["m"], "steps": 1, "tempreature": 300})
    with pytest.raises(ConfigError, match=r"^unknown key 'thermostat.tau'; valid keys: damp, type$"):
        normalize_md_config({"structure": "x", "models": ["m"], "steps": 1, "ensemble": "nvt",
                             "thermostat": {"type": "csvr", "tau": 0.1}})
    with pytest.raises(ConfigError, match="pressure: required for ensemble npt"):
        normalize_md_config({"structure": "x", "models": ["m"], "steps": 1, "ensemble": "npt"})
    (tmp_path / "in.yaml").write_text("structure: x.xyz\nmodels: [m.pth]\nsteps: 10\nskinn: 1\n")
    assert main(["md", str(tmp_path / "in.yaml")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown key 'skinn'" in err


def test_trajectory_files_read_back(tmp_path):
    """extxyz and the LAMMPS dump read back with ASE: same wrapped positions and cell, types 1-based."""
    from ase.io import read

    pos, sym, box = gas(nframes=1)
    box = box @ np.array([[1.0, 0.0, 0.0], [0.2, 1.0, 0.0], [0.1, -0.15, 1.0]])   # triclinic
    pos = pos[0] @ np.linalg.inv(np.eye(3) * 14.0) @ box
    sim = Simulation(make_model(), pos, sym, box, ensemble="nve", traj_freq=5, traj_format=["extxyz", "lammps"],
                     thermo_freq=5, output_dir=tmp_path, log=None)
    sim.run(5)
    sim.close()
    xyz = read(tmp_path / "traj.extxyz", index=-1)
    dump = read(tmp_path / "dump.lammpstrj", index=-1, format="lammps-dump-text")
    assert np.allclose(xyz.cell.array, sim.state.box[0].numpy())
    assert np.allclose(dump.cell.cellpar(), xyz.cell.cellpar())
    assert np.allclose(dump.get_all_distances(mic=True), xyz.get_all_distances(mic=True), atol=1e-6)
    assert np.allclose(xyz.get_forces(), sim.state.forces[0].numpy())


@pytest.mark.parametrize("case, message", [
    ({"ensemble": "nvx"}, "ensemble: expected nve, nvt or npt, got 'nvx'"),
    ({"models": ["nope.pth"]}, "nope.pth: model file not found"),
    ({"structure": "ch4.xyz"}, "element C is not in the model's type_map"),
    ({"timestep": 0}, "'timestep' must be positive, got 0"),
    ({"structure": "nothere.xyz"}, "nothere.xyz: file not found"),
    ({"output_dir": "afile/out"}, "output_dir: "),
    pytest.param({"device": "cuda"}, "device: cuda asked for, but this PyTorch sees no CUDA GPU",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")),
])
def test_bad_md_inputs_give_one_line_errors(tmp_path, capsys, case, message):
    import yaml
    from ase.build import molecule
    from ase.io import write

    from dpmd.cli import main
    from dpmd.model import save_model

    for name, formula in (("water.xyz", "H2O"), ("ch4.xyz", "CH4")):
        atoms = molecule(formula)
        atoms.center(vacuum=5.0)
        atoms.pbc = True
        write(tmp_path / name, atoms)
    save_model(make_model(), tmp_path / "m.pth")
    cfg = {"structure": str(tmp_path / "water.xyz"), "models": [str(tmp_path / "m.pth")], "steps": 2,
           "output_dir": str(tmp_path / "out")}
    cfg.update({k: ([str(tmp_path / x) for x in v] if k == "models" else
                    str(tmp_path / v) if k in ("structure", "output_dir") else v) for k, v in case.items()})
    (tmp_path / "afile").write_text("a file, not a directory")
    (tmp_path / "in.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["md", str(tmp_path / "in.yaml")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def _write_structures(tmp_path):
    """small_water in every format the md input reads: (spec, expected symbols)."""
    from ase import Atoms
    from ase.io import write

    from dpmd.data import load_system

    pos, sym, box = small_water()
    atoms = Atoms(sym, positions=pos, cell=box, pbc=True)
    specs = {}
    for name, fmt in (("w.extxyz", "extxyz"), ("POSCAR", "vasp"), ("w.cif", "cif")):
        write(tmp_path / name, atoms, format=fmt)
        specs[name] = str(tmp_path / name)
    write(tmp_path / "w.data", atoms, format="lammps-data", specorder=["O", "H"], masses=True)
    specs["lammps-data"] = str(tmp_path / "w.data")
    specs["deepmd frame"] = {"system": str(EXAMPLE), "frame": 24}
    ref = load_system(EXAMPLE, ["O", "H"])
    return specs, (pos, sym, box), ref


@pytest.mark.parametrize("which", ["w.extxyz", "POSCAR", "w.cif", "lammps-data", "deepmd frame"])
def test_structure_formats_read_the_same_atoms(tmp_path, which):
    from dpmd.md.config import read_structure

    specs, (pos, sym, box), ref = _write_structures(tmp_path)
    got_pos, got_sym, got_box = read_structure(specs[which], ["O", "H"])
    if which == "deepmd frame":
        pos, box = ref.coord[24].reshape(-1, 3), ref.box[24].reshape(3, 3)
        sym = [["O", "H"][t] for t in ref.atype]
    assert got_sym == list(sym)
    assert np.allclose(got_box, box, atol=1e-6)
    frac = lambda x, b: x @ np.linalg.inv(b)   # noqa: E731  (CIF may wrap into the cell)
    d = frac(got_pos, got_box) - frac(np.asarray(pos), box)
    assert np.allclose(d - np.round(d), 0, atol=1e-6)


def test_structure_errors_name_the_problem(tmp_path):
    from ase import Atoms
    from ase.io import write

    from dpmd.md.config import read_structure

    pos, sym, box = small_water()
    write(tmp_path / "swapped.data", Atoms(sym, positions=pos, cell=box, pbc=True), format="lammps-data",
          specorder=["H", "O"], masses=True)
    with pytest.raises(DpmdError, match=r"LAMMPS type 1 has mass 1.008 \(H\) but type_map\[0\] is O"):
        read_structure(str(tmp_path / "swapped.data"), ["O", "H"])
    (tmp_path / "empty.xyz").write_text("0\n\n")
    with pytest.raises(DpmdError, match="empty.xyz: no atoms"):
        read_structure(str(tmp_path / "empty.xyz"), ["O", "H"])
