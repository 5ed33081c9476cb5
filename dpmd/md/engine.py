"""The MD engine: one loop over (init, step) pieces, a force provider (dpmd.md.provider), outputs, checkpoints.

    sim = Simulation(models, positions (F, N, 3), symbols, box (F, 3, 3) or None, ensemble="nvt", ...)
    sim.run(1000)          # 1000 more steps; sim.run(upto=5000): on to step 5000 in total

F independent systems of N atoms each advance together, with one model evaluation per step over
all of them.  The first model drives the dynamics; all models give the deviation.
"""

from __future__ import annotations

import numbers
import time
from pathlib import Path

import numpy as np
import torch

from dpmd.errors import DpmdError, MDStopError
from dpmd.geometry.graph import build_graph
from dpmd.md import devi as devi_mod
from dpmd.md import host_sync
from dpmd.md import output as out_mod
from dpmd.md.barostats import pressure_tensor, stochastic_cell_rescaling
from dpmd.md.integrator import velocity_verlet
from dpmd.md.neighbors import VerletList
from dpmd.md.provider import CheckedForces
from dpmd.md.safety import Safety
from dpmd.md.state import MDState, kinetic_energy, maxwell_boltzmann, volume
from dpmd.md.sync_free import SyncFreeForces
from dpmd.md.thermostats import make_thermostat
from dpmd.md.units import BOLTZ, FS
from dpmd.model.ensemble import evaluate_ensemble
from dpmd.model.forces import evaluate, layouts

CHECKPOINT_FORMAT = "dpmd-md-checkpoint"


def _ramp(value, total_steps: int, device=None):
    """A constant, or [start, end] ramped linearly over total_steps: a function of the step."""
    if value is None:
        return lambda step: None
    if isinstance(value, (np.ndarray, torch.Tensor)):   # one constant per system of a batch
        per_system = torch.as_tensor(value, dtype=torch.float64, device=device).reshape(-1)
        return lambda step: per_system
    if isinstance(value, (list, tuple)):
        a, b = float(value[0]), float(value[1])
        return lambda step: a + (b - a) * min(step, total_steps) / max(total_steps, 1)
    v = float(value)
    return lambda step: v


def element_mass(name: str, masses: dict | None = None) -> float:
    """amu: masses[name] where given (e.g. {"H": 2.014}: deuterium), else ASE's standard atomic mass."""
    if masses and name in masses:
        return float(masses[name])
    from ase.data import atomic_masses, atomic_numbers   # (only when a mass must be looked up)

    if name not in atomic_numbers:
        raise DpmdError(f"masses: {name!r} is not an element, so it has no standard mass; give one: "
                        f"masses: {{{name}: amu}}")
    return float(atomic_masses[atomic_numbers[name]])


class Simulation:
    def __init__(self, models, positions, symbols, box=None, *, masses=None, ensemble: str = "nve",
                 thermostat: dict | None = None, barostat: dict | None = None, timestep: float = 0.5,
                 temperature=300.0, pressure=1.0, steps: int | None = None, seed: int = 1, skin: float = 2.0,
                 min_distance: float = 0.5, velocities=None, thermo_freq: int = 100, traj_freq: int = 0,
                 traj_format=("extxyz",), model_devi_freq: int = 0, checkpoint_freq: int = 0,
                 output_dir=None, log=print, bias=None, sync_free=None, fparam=None, aparam=None):
        """models: a DeepPot or a list (the first drives the dynamics).
        positions: (N, 3) or (F, N, 3) Å; symbols: N element names (or F lists); box: (3, 3), (F, 3, 3) or None.
        masses: amu, per atom ((N,) or (F, N)), or {element: amu} overriding ASE's masses (None: ASE's).
        timestep in fs, temperature in K, pressure in bar ([start, end] ramps linearly over `steps`),
        temperature / pressure as a numpy array or tensor of shape (F,): one constant per system.
        bias: None, or bias(models, graph, out) -> out with energy, force and virial of an added potential
        (e.g. explore_label_train.bias.DeviationBias); the deviation is always that of the unbiased models.
        thermostat {type: langevin|csvr|nose_hoover, damp: ps, chain: 3},
        barostat {damp: ps, mode: iso|aniso|tri, compressibility: 1/bar} (stochastic cell rescaling).
        output_dir None writes no files.
        sync_free: step without the host waiting for the device except on output steps
        (dpmd.md.sync_free); None: on CUDA devices (not with a bias, nor with fparam / aparam).
        fparam, aparam: the frame and atomic parameters of models that take them (numb_fparam, numb_aparam),
        constant through the run: fparam numb_fparam values (every system) or (F, numb_fparam); aparam
        numb_aparam values (every atom), (N, numb_aparam) or (F, N, numb_aparam).  A model with a default_fparam
        uses it when fparam is None.
        """
        self.models = list(models) if isinstance(models, (list, tuple)) else [models]
        model = self.models[0]
        self.device = next(iter([*model.parameters(), *model.buffers()]), torch.zeros(0)).device
        self.dtype = torch.float64
        pos = torch.as_tensor(np.asarray(positions, dtype=np.float64), device=self.device)
        if pos.dim() == 2:
            pos = pos.unsqueeze(0)
        nf, n = pos.shape[:2]
        if isinstance(symbols[0], str):
            symbols = [list(symbols)] * nf
        self.symbols = [list(s) for s in symbols]
        if len(self.symbols) != nf or any(len(s) != n for s in self.symbols):
            raise DpmdError(f"symbols must give {n} element names for each of the {nf} systems")
        self.atypes = [self._types(m) for m in self.models]
        # each model's graph entries fparam / aparam (dpmd.geometry.graph); a test's pair potential takes none
        self.params = [m.graph_params(nf, n, fparam, aparam) if hasattr(m, "graph_params") else {}
                       for m in self.models]
        if box is not None:
            box = torch.as_tensor(np.asarray(box, dtype=np.float64), device=self.device).reshape(-1, 3, 3)
            box = box.expand(nf, 3, 3).clone()
        if masses is None or isinstance(masses, dict):
            masses = [[element_mass(s, masses) for s in row] for row in self.symbols]
        masses = torch.as_tensor(np.asarray(masses, dtype=np.float64), device=self.device).reshape(-1, n)
        masses = masses.expand(nf, n).clone()

        self.ensemble = ensemble
        if ensemble not in ("nve", "nvt", "npt"):
            raise DpmdError(f"ensemble must be nve, nvt or npt, got {ensemble!r}")
        if ensemble == "npt" and box is None:
            raise DpmdError("npt needs a periodic box")
        thermostat = dict(thermostat or {})
        if ensemble == "nve":
            self.thermostat = make_thermostat(None)
        else:
            self.thermostat = make_thermostat(thermostat.get("type", "langevin"), thermostat.get("damp", 0.1),
                                              thermostat.get("chain", 3))
        self.barostat, mode = None, None
        if ensemble == "npt":
            b = dict(barostat or {})
            mode = b.get("mode", "iso")
            self.barostat = stochastic_cell_rescaling(b.get("damp", 1.0), b.get("compressibility", 4.5e-5), mode)
        # what a checkpoint's extended variables belong to (restore refuses another kind of run)
        self.dynamics = {"ensemble": ensemble,
                         "thermostat": None if ensemble == "nve" else thermostat.get("type", "langevin"),
                         "barostat": mode}
        self.dt = float(timestep) * FS
        self.total_steps = steps
        self.temperature = _ramp(temperature, steps or 0, self.device)
        self.pressure = _ramp(pressure, steps or 0, self.device)
        self.min_distance = float(min_distance)
        self.thermo_freq, self.traj_freq = int(thermo_freq), int(traj_freq)
        self.model_devi_freq, self.checkpoint_freq = int(model_devi_freq), int(checkpoint_freq)
        self.traj_format = [traj_format] if isinstance(traj_format, str) else list(traj_format)
        self.output_dir = None if output_dir is None else Path(output_dir)
        self.log = log or (lambda *a, **k: None)
        self.bias = bias
        self.verlet = VerletList(model.rcut, skin)
        self.safety = Safety(self.symbols, self.min_distance)
        if sync_free and bias is not None:
            raise DpmdError("sync_free: a bias potential is not supported in sync-free mode; set sync_free: false")
        # sync-free stepping takes DeePMD's padded layout: every descriptor type has it (a test's pair potential
        # takes edge lists only)
        padded = "padded" in layouts(model)
        use = (self.device.type == "cuda" and bias is None and padded) if sync_free is None else bool(sync_free)
        if use and not padded:
            raise DpmdError("sync_free: needs a model with DeePMD's padded layout (a model with a descriptor); "
                            "set sync_free: false")
        # the force provider (dpmd.md.provider): checked, or sync-free around the checked one; chosen by auto,
        # a skin too thin for sync-free's look-ahead falls back to the checked path (else: an error)
        self.provider = CheckedForces(self.models, self.params[0], self.verlet, self.safety, bias)
        if use:
            self.provider = SyncFreeForces(self.provider, self.device, self.dt, strict=sync_free is not None,
                                           log=self.log)
        self.outputs: list[out_mod.SystemOutput] = []
        self.devi_history: list[tuple[int, np.ndarray]] = []   # (step, (F, 7)) for the Python API

        rng = torch.Generator(device=self.device)
        rng.manual_seed(int(seed))
        state = MDState(positions=pos, velocities=None, masses=masses, atype=self.atypes[0], box=box,
                        ext_work=torch.zeros(nf, dtype=self.dtype, device=self.device), rng=rng)
        if velocities is not None:
            v = torch.as_tensor(np.asarray(velocities, dtype=np.float64), device=self.device).reshape(nf, n, 3)
            state.velocities = v.clone()
        else:
            t0 = self.temperature(0)
            if torch.is_tensor(t0):   # per system: drawn at exactly 1 K, then scaled
                scale = t0.to(self.device).sqrt().view(-1, 1, 1)
                state.velocities = maxwell_boltzmann(masses, 1.0, rng, state.dof) * scale
            else:
                state.velocities = maxwell_boltzmann(masses, 0.0 if t0 is None else t0, rng, state.dof)
        self.state = state
        self._init, self._step = velocity_verlet(lambda s: self.provider(s), self.dt, self.thermostat, self.barostat)
        self._initialised = False

    # ---------------------------------------------------------------- pieces
    def _types(self, model) -> torch.Tensor:
        index = {name: t for t, name in enumerate(model.type_map)}
        try:
            return torch.tensor([[index[s] for s in row] for row in self.symbols], device=self.device)
        except KeyError:
            missing = next(s for row in self.symbols for s in row if s not in index)
            raise DpmdError(f"element {missing} is not in the model's type_map {model.type_map}") from None

    @property
    def sync_free(self) -> bool:
        """Are the safety flags read steps late (sync-free stepping)?"""
        return self.provider.lag > 0

    @property
    def _sync_free(self) -> SyncFreeForces | None:
        """The sync-free provider (None for the checked path)."""
        return self.provider if isinstance(self.provider, SyncFreeForces) else None

    def kT(self, step: int):
        t = self.temperature(step)
        return None if t is None else BOLTZ * t

    def _ensure_init(self) -> None:
        if not self._initialised:
            self.state = self._init(self.state)
            self._initialised = True

    def thermo(self) -> dict:
        """Per-system thermodynamic quantities (numpy arrays of shape (F,)), LAMMPS metal units."""
        self._ensure_init()
        s = self.state
        ke = kinetic_energy(s)
        pe = s.energy
        kT = self.kT(s.step)
        kT = 0.0 if kT is None else kT
        p0 = self.pressure(s.step) if self.barostat is not None else None
        conserved = pe + ke - s.ext_work + self.thermostat.energy(s, kT)
        if self.barostat is not None:
            conserved = conserved + self.barostat.energy(s, p0)
        press = pressure_tensor(s).diagonal(dim1=1, dim2=2).mean(-1)
        vals = torch.stack([pe, ke, 2.0 * ke / (s.dof * BOLTZ), press, volume(s), pe + ke, conserved], 1)
        vals = vals.detach().cpu().numpy()
        return {k: vals[:, i] for i, k in enumerate(out_mod.THERMO_COLUMNS[2:])}

    def deviation(self) -> np.ndarray:
        """(F, 7) model deviation of the current positions (DeePMD's columns after `step`)."""
        self._ensure_init()
        s = self.state
        forces, virials, energies = [s.forces], [s.virial], [s.energy]
        # models on the driving model's graph (same rcut and types) go through one ensemble call
        shared = [k for k in range(1, len(self.models)) if self.models[k].rcut == self.models[0].rcut
                  and torch.equal(self.atypes[k], self.atypes[0]) and self._same_params(k)]
        graph = self.provider.graph(s)
        outs = dict(zip(shared, evaluate_ensemble([self.models[k] for k in shared], dict(graph))))
        for k in range(1, len(self.models)):
            if k not in outs:
                graph_k = build_graph(s.positions, self.atypes[k], s.box, self.models[k].rcut)
                outs[k] = evaluate(self.models[k], {**graph_k, **self.params[k]})
        for k in range(1, len(self.models)):
            out = outs[k]
            forces.append(out["force"].reshape(s.nframes, s.natoms, 3))
            virials.append(out["virial"])
            energies.append(out["energy"])
        d = devi_mod.model_deviation(torch.stack(forces), torch.stack(virials), torch.stack(energies), s.natoms)
        return d.detach().cpu().numpy()

    def _same_params(self, k: int) -> bool:
        """Does model k take the same fparam / aparam as the driving model (so it can share its graph)?"""
        mine, first = self.params[k], self.params[0]
        return mine.keys() == first.keys() and all(torch.equal(mine[key], first[key]) for key in mine)

    # ---------------------------------------------------------------- output
    def _open_outputs(self, restart: bool) -> None:
        if self.output_dir is None or self.outputs:
            return
        nf = self.state.nframes
        dirs = [self.output_dir] if nf == 1 else [self.output_dir / f"sys.{f:03d}" for f in range(nf)]
        with_devi = self.model_devi_freq > 0
        self.outputs = [out_mod.SystemOutput(d, self.traj_format, with_devi, restart) for d in dirs]

    def _write(self, step: int) -> None:
        due = lambda freq: freq > 0 and step % freq == 0  # noqa: E731
        if due(self.model_devi_freq):
            d = self.deviation()
            self.devi_history.append((step, d))
            for f, o in enumerate(self.outputs):
                o.devi.write(devi_mod.format_row(step, d[f]) + "\n")
        if not self.outputs:
            return
        if due(self.thermo_freq):
            th = self.thermo()
            for f, o in enumerate(self.outputs):
                o.thermo.write(out_mod.thermo_row(step, step * self.dt, [th[k][f] for k in out_mod.THERMO_COLUMNS[2:]]))
        if due(self.traj_freq):
            self._write_frame(step)

    def _write_frame(self, step: int) -> None:
        s = self.state
        pos = s.positions.detach().cpu().numpy()
        vel = s.velocities.detach().cpu().numpy()
        frc = None if s.forces is None else s.forces.detach().cpu().numpy()
        en = None if s.energy is None else s.energy.detach().cpu().numpy()
        box = None if s.box is None else s.box.detach().cpu().numpy()
        types = s.atype.cpu().numpy()
        for f, o in enumerate(self.outputs):
            b = None if box is None else box[f]
            if "extxyz" in o.traj:
                o.traj["extxyz"].write(out_mod.extxyz_frame(step, self.symbols[f], pos[f], b, vel[f],
                                                            None if frc is None else frc[f],
                                                            None if en is None else float(en[f])))
            if "lammps" in o.traj:
                o.traj["lammps"].write(out_mod.lammps_frame(step, types[f], pos[f], b))

    # ---------------------------------------------------------------- checkpoints
    def checkpoint(self, path=None) -> Path:
        from dpmd.model.io import atomic_torch_save

        path = Path(path) if path is not None else self.output_dir / "checkpoint.pt"
        state = {k: (v.detach().cpu() if torch.is_tensor(v) else v) for k, v in self.state.tensors().items()}
        state["thermostat"] = {k: v.cpu() for k, v in state["thermostat"].items()}
        state["barostat"] = {k: v.cpu() for k, v in state["barostat"].items()}
        atomic_torch_save({"format": CHECKPOINT_FORMAT, "version": 1, "state": state, "dynamics": self.dynamics,
                           "files": out_mod.sizes(self.outputs), "symbols": self.symbols}, path)
        return path

    def restore(self, path) -> None:
        """Continue from a checkpoint: state, RNG and output files cut back to the checkpoint's step."""
        from dpmd.model.io import read_torch_file

        expected = "expected a dpmd md checkpoint (output_dir/checkpoint.pt)"
        blob = read_torch_file(path, expected)   # plain data only: never unpickles code
        if not isinstance(blob, dict) or blob.get("format") != CHECKPOINT_FORMAT:
            raise DpmdError(f"{path}: not a dpmd md checkpoint; {expected}")
        st = blob["state"]
        if tuple(st["positions"].shape) != tuple(self.state.positions.shape):
            raise DpmdError(f"{path}: holds {tuple(st['positions'].shape)} positions, this run has "
                            f"{tuple(self.state.positions.shape)}")
        if blob.get("symbols") != self.symbols:
            raise DpmdError(f"{path}: the checkpoint's elements differ from this run's structure")
        written = blob.get("dynamics", self.dynamics)   # (checkpoints before this key: not checked)
        if written != self.dynamics:
            describe = lambda d: " ".join(str(v) for v in d.values() if v is not None)  # noqa: E731
            raise DpmdError(f"{path}: written by a {describe(written)} run, this input is {describe(self.dynamics)}; "
                            f"its thermostat/barostat state belongs to the other")
        self.state = MDState.from_tensors(st, self.device)
        self._initialised = False
        self.provider.reset()
        if self.output_dir is not None:
            out_mod.truncate(blob.get("files", {}))
            self._open_outputs(restart=True)

    # ---------------------------------------------------------------- loop
    def run(self, steps: int | None = None, *, upto: int | None = None) -> dict:
        """Advance `steps` more steps (as ASE's dyn.run(n) and LAMMPS's `run n`), or up to step `upto` in
        total (LAMMPS's `run n upto`); with neither, up to the configured `steps` in total (so that a
        restarted `dpmd md` stops where its input says).  Returns a summary."""
        target = self._target(steps, upto)
        fresh = self.state.step == 0 and not self.outputs
        self._open_outputs(restart=not fresh)
        start_step, t0 = self.state.step, time.perf_counter()
        builds0 = self.verlet.builds
        try:
            self._ensure_init()
            if fresh:
                self.provider.drain(self.state)
                self._write(self.state.step)
            while self.state.step < target:
                self.state = self._step(self.state, self.kT(self.state.step), self.pressure(self.state.step))
                step = self.state.step
                if step == target or self._output_step(step):
                    with host_sync.expected("output"):
                        self.provider.drain(self.state)   # (every pending flag read before a file is written)
                        self._write(step)
                        if self.output_dir is not None and self.checkpoint_freq > 0 and step % self.checkpoint_freq == 0:
                            self.checkpoint()
                        if self.thermo_freq > 0 and step % self.thermo_freq == 0:
                            self._progress(start_step, step, target, t0)
        except MDStopError as err:
            self._on_stop(err)
        if self.output_dir is not None:
            self.checkpoint()
            for o in self.outputs:
                o.flush()
        elapsed = time.perf_counter() - t0
        done = self.state.step - start_step
        return {"steps": done, "seconds": elapsed, "steps_per_second": done / elapsed if elapsed > 0 else float("inf"),
                "ns_per_day": done * self.dt * 1e-3 / elapsed * 86400 if elapsed > 0 else float("inf"),
                "neighbor_builds": self.verlet.builds - builds0}

    def _target(self, steps, upto) -> int:
        """The step a run(steps, upto=...) call ends at."""
        def count(value, name):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
                raise DpmdError(f"run: {name} must be a whole number >= 0, got {value!r}")
            return int(value)

        if steps is not None and upto is not None:
            raise DpmdError("run: give steps (how many more) or upto (the step to reach in total), not both")
        if steps is not None:
            return self.state.step + count(steps, "steps")
        if upto is not None:
            upto = count(upto, "upto")
            if upto < self.state.step:   # (LAMMPS's `run N upto` refuses a step in the past too)
                raise DpmdError(f"run: upto={upto} is behind the current step {self.state.step} (upto is the "
                                f"step to reach in total; run({upto}) advances {upto} more steps)")
            return upto
        if self.total_steps is None:
            raise DpmdError("run: no steps given and none configured; run(n) advances n steps")
        if self.total_steps < self.state.step:   # e.g. a restart from a checkpoint past the input's steps
            raise DpmdError(f"steps: {self.total_steps} in total, but the run is already at step {self.state.step} "
                            f"(a restart continues up to steps in total)")
        return self.total_steps

    def _output_step(self, step: int) -> bool:
        """Does this step write or log anything?"""
        freqs = [self.model_devi_freq, self.thermo_freq]
        if self.output_dir is not None:
            freqs += [self.traj_freq, self.checkpoint_freq]
        return any(f > 0 and step % f == 0 for f in freqs)

    def _progress(self, start_step: int, step: int, target: int, t0: float) -> None:
        elapsed = time.perf_counter() - t0
        rate = (step - start_step) / elapsed if elapsed > 0 else float("inf")
        ns_day = rate * self.dt * 1e-3 * 86400
        eta = (target - step) / rate if rate > 0 else 0.0
        temp = self.thermo()["temp"]
        self.log(f"step {step}/{target}  T {' '.join(f'{t:.1f}' for t in temp)} K  {rate:.2f} steps/s  "
                 f"{ns_day:.3f} ns/day  ETA {int(eta // 3600)}:{int(eta % 3600 // 60):02d}:{int(eta % 60):02d}")

    def _on_stop(self, err: MDStopError):
        written = []
        if self.output_dir is not None:
            try:
                if not self.outputs:
                    self._open_outputs(restart=False)
                written.append(str(self.checkpoint(self.output_dir / "crash.checkpoint.pt")))
                frame = self.output_dir / "crash.extxyz"
                self._write_crash_frame(frame)
                written.append(str(frame))
                for o in self.outputs:
                    o.flush()
            except Exception as exc:  # the stop message matters more than the post-mortem files
                written.append(f"(could not write the crash files: {exc})")
        suffix = f"; wrote {' and '.join(written)}" if written else ""
        raise MDStopError(f"{err}{suffix}") from None

    def _write_crash_frame(self, path) -> None:
        from dpmd.files import atomic_write

        s = self.state
        text = "".join(out_mod.extxyz_frame(
            s.step, self.symbols[f], s.positions[f].detach().cpu().numpy(),
            None if s.box is None else s.box[f].detach().cpu().numpy()) for f in range(s.nframes))
        atomic_write(path, lambda fh: fh.write(text), mode="w")

    def close(self) -> None:
        for o in self.outputs:
            o.close()
        self.outputs = []
