"""`dpmd md input.yaml`: the input keys (a dpmd.schema tree), their validation, structure reading, and the run.

Every key is checked before anything runs; an unknown or bad key is one line naming it.  `dpmd md --set
KEY=VALUE` overrides a value first, as `dpmd train --set` does.
"""

from __future__ import annotations

import logging
from pathlib import Path

from dpmd.errors import ConfigError, DpmdError
from dpmd.md.barostats import MODES
from dpmd.schema import REQUIRED, UNSET, apply_overrides, check_number, choice, key, normalize, read_file, section

TRAJ_FORMATS = ("extxyz", "lammps")
ENSEMBLES = ("nve", "nvt", "npt")
log = logging.getLogger("dpmd.md")


def _non_negative():
    return {"check": lambda v: v >= 0, "expect": ">= 0"}


def _damp(default: float, doc: str):
    return key("damp", float, default, doc, check=lambda v: v > 0, expect="positive")


def thermostat_args():
    """The `thermostat` section (nvt and npt); a campaign's exploration stages can share it."""
    damp = _damp(0.1, "Time constant (ps): 1/gamma for langevin, tau for csvr, Tdamp for nose_hoover.")
    kinds = [key("langevin", dict, REQUIRED, "Langevin dynamics (OBABO).", sub=[damp]),
             key("csvr", dict, REQUIRED, "Canonical sampling through velocity rescaling (Bussi).", sub=[damp]),
             key("nose_hoover", dict, REQUIRED, "A Nose-Hoover chain (as LAMMPS fix nvt).", sub=[
                 damp, key("chain", int, 3, "Chain length.", check=lambda v: v > 0, expect="positive")])]
    return key("thermostat", [dict, None], UNSET,
               "nvt and npt: {type: langevin|csvr|nose_hoover, damp: ps, chain: N}; also written `langevin` or "
               "{langevin: {damp: 0.1}} (default: langevin, damp 0.1 ps).",
               what="a mapping such as {type: langevin, damp: 0.1}, or a name such as langevin", sub=[],
               variants=[choice("thermostat", kinds, default="langevin", doc="The thermostat.")])


def barostat_args():
    """The `barostat` section (npt)."""
    scr = key("scr", dict, REQUIRED, "Stochastic cell rescaling (Bernetti and Bussi 2020).",
              alias=["stochastic_cell_rescaling", "c-rescale"], sub=[])
    return key("barostat", [dict, None], UNSET, "npt: stochastic cell rescaling.",
               what="a mapping such as {damp: 1.0, mode: iso}", sub=[_damp(1.0, "Time constant (ps)."),
                    key("mode", str, "iso", "iso: one scale factor; aniso: three; tri: the full cell."),
                    key("compressibility", float, 4.5e-5, "Isothermal compressibility (1/bar; water's by default).",
                        check=lambda v: v > 0, expect="positive"),
                    key("pressure", [float, list[float], None], UNSET, "Target pressure (bar), instead of the "
                                                                       "top-level pressure.")],
               variants=[choice("barostat", [scr], default="scr", doc="The barostat.")])


def _ramp(name: str, default, doc: str, unit: str):
    return key(name, [float, list[float]] + ([] if default is not UNSET else [None]), default,
               f"{doc} ({unit}); [start, end] ramps linearly over the run.", what=f"a number ({unit}) or [start, end]")


MD_ARGS = section("dpmd md input", [
    key("structure", [str, dict, list], REQUIRED,
        "The start: a file ASE reads (extxyz, POSCAR, cif, LAMMPS data: types in the model's type_map order), "
        "{file, format}, {system: deepmd/npy directory, frame: N}, or a list of them (a batch of equal-sized "
        "systems run side by side)."),
    key("models", [str, list[str]], REQUIRED, "Model files (frozen models, dpmd or DeePMD-kit checkpoints); the "
                                              "first drives the dynamics, all give the model deviation.",
        what="a model file or a list of them", check=lambda v: len(v) > 0, expect="at least one model file"),
    key("ensemble", str, "nve", f"One of {', '.join(ENSEMBLES)}."),
    thermostat_args(),
    barostat_args(),
    key("timestep", float, 0.5, "Time step (fs).", check=lambda v: v > 0, expect="positive"),
    key("steps", int, REQUIRED, "Steps of the run in total (a restart continues to this step).",
        **_non_negative()),
    _ramp("temperature", 300.0, "Temperature of the thermostat and of the initial velocities", "K"),
    _ramp("pressure", UNSET, "npt: target pressure", "bar"),
    key("seed", int, 1, "Seed of the initial velocities and the thermostat's noise.", **_non_negative()),
    key("skin", float, 2.0, "Neighbour-list skin (Å): lists are rebuilt when an atom moved half of it.",
        **_non_negative()),
    key("thermo_freq", int, 100, "Steps between lines of thermo.log (0: none).", **_non_negative()),
    key("traj_freq", int, 100, "Steps between trajectory frames (0: none).", **_non_negative()),
    key("traj_format", [str, list[str]], "extxyz", f"Trajectory format(s): {', '.join(TRAJ_FORMATS)}."),
    key("model_devi_freq", int, 0, "Steps between lines of model_devi.out (0: none).", **_non_negative()),
    key("checkpoint_freq", int, 1000, "Steps between checkpoints (output_dir/checkpoint.pt; 0: none).",
        **_non_negative()),
    key("output_dir", str, ".", "Directory of the output files."),
    key("min_distance", float, 0.5, "Stop when two atoms come closer than this (Å).", **_non_negative()),
    key("device", str, "cpu", "cpu, cuda or cuda:N."),
    key("sync_free", [str, bool], "auto", "CUDA: check the neighbour list on the GPU without a host sync each "
                                          "step (auto: on CUDA devices)."),
    key("masses", [dict, None], None, "Masses (amu) of elements instead of ASE's, e.g. {H: 2.014} for deuterium."),
    key("fparam", [list[float], None], None, "Frame parameters of models that take them (numb_fparam values), "
                                             "constant through the run; none: the model's default_fparam."),
    key("aparam", [list[float], list[list[float]], None], None,
        "Atomic parameters of models that take them: numb_aparam values for every atom, or one list per atom (in "
        "the structure's order), constant through the run."),
], "The input of `dpmd md`.")


def check_masses(value, type_map=None, where="masses") -> dict:
    """{element: amu} overriding ASE's masses (deuterium: {H: 2.014}), checked; {} for None.  With type_map,
    every element must be one of it."""
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise ConfigError(f"{where}: expected element: mass in amu, e.g. {{H: 2.014}}, got {value!r}")
    for name, mass in value.items():
        check_number(mass, f"{where}.{name}", positive=True)
        if type_map is not None and name not in type_map:
            raise ConfigError(f"{where}: {name} is not in the type_map {list(type_map)}")
    return {name: float(mass) for name, mass in value.items()}


def thermostat_form(value):
    """`langevin` and {langevin: {damp: 0.1}} as {type: langevin, damp: 0.1}, for thermostat_args() (a campaign's
    stages take the same forms)."""
    if isinstance(value, str):
        return {"type": value}
    if isinstance(value, dict) and "type" not in value and len(value) == 1 and isinstance(next(iter(value)), str) \
            and isinstance(next(iter(value.values())), (dict, type(None))):
        kind, params = next(iter(value.items()))
        return {"type": kind, **(params or {})}
    return value


def _schedule(value, name: str, unit: str):
    if isinstance(value, list) and len(value) != 2:
        raise ConfigError(f"{name}: expected a number or [start, end], got {value!r}")
    values = value if isinstance(value, list) else [value]
    if min(values) < 0:
        raise ConfigError(f"{name}: must be >= 0 {unit}, got {value!r}")
    return [float(v) for v in value] if isinstance(value, list) else float(value)


def normalize_md_config(config: dict) -> dict:
    """Defaults filled in, every key checked; raises ConfigError (one line) on the first problem.  A normalised
    config passes unchanged."""
    if not isinstance(config, dict):
        raise ConfigError(f"md input: expected a mapping of keys, got {type(config).__name__}")
    given = dict(config)
    if "thermostat" in given:
        given["thermostat"] = thermostat_form(given["thermostat"])
    if "masses" in given:  # check_masses' words (it checks a campaign's masses too)
        given["masses"] = check_masses(given["masses"])
    cfg = normalize(MD_ARGS, given)
    if isinstance(cfg["models"], str):
        cfg["models"] = [cfg["models"]]
    if cfg["ensemble"] not in ENSEMBLES:
        raise ConfigError(f"ensemble: expected nve, nvt or npt, got {cfg['ensemble']!r}")
    if cfg["ensemble"] == "nve" and cfg["thermostat"] is not None:
        raise ConfigError("thermostat: given for ensemble nve; use nvt or npt, or remove it")
    if cfg["ensemble"] != "nve" and cfg["thermostat"] is None:
        cfg["thermostat"] = normalize(MD_ARGS.sub_fields["thermostat"], {}, "thermostat")
    if cfg["ensemble"] != "npt" and cfg["barostat"] is not None:
        raise ConfigError(f"barostat: given for ensemble {cfg['ensemble']}; use npt, or remove it")
    if cfg["ensemble"] == "npt":
        baro = cfg["barostat"] or normalize(MD_ARGS.sub_fields["barostat"], {}, "barostat")
        if baro["mode"] not in MODES:
            raise ConfigError(f"barostat.mode: expected {', '.join(MODES[:-1])} or {MODES[-1]}, got {baro['mode']!r}")
        if baro["pressure"] is not None and cfg["pressure"] is not None:
            raise ConfigError("pressure: given both at the top level and in barostat; keep one")
        cfg["pressure"] = cfg["pressure"] if baro["pressure"] is None else baro["pressure"]
        cfg["barostat"] = {k: v for k, v in baro.items() if k != "pressure"}
        if cfg["pressure"] is None:
            raise ConfigError("pressure: required for ensemble npt (bar, a number or [start, end])")
    if cfg["sync_free"] not in ("auto", True, False):
        raise ConfigError(f"sync_free: expected auto, true or false, got {cfg['sync_free']!r}")
    cfg["temperature"] = _schedule(cfg["temperature"], "temperature", "K")
    if cfg["pressure"] is not None:
        cfg["pressure"] = _schedule(cfg["pressure"], "pressure", "bar")
    fmt = [cfg["traj_format"]] if isinstance(cfg["traj_format"], str) else cfg["traj_format"]
    if not all(f in TRAJ_FORMATS for f in fmt):
        raise ConfigError(f"traj_format: expected one or a list of {', '.join(TRAJ_FORMATS)}, "
                          f"got {cfg['traj_format']!r}")
    cfg["traj_format"] = fmt
    cfg["masses"] = cfg["masses"] or {}
    for s in cfg["structure"] if isinstance(cfg["structure"], list) else [cfg["structure"]]:
        if isinstance(s, dict):
            allowed = {"system", "frame"} if "system" in s else {"file", "format"}
            for name in s:
                if name not in allowed:
                    raise ConfigError(f"structure: unknown key {name!r}; valid: {{file, format}} or {{system, frame}}")
        elif not isinstance(s, str):
            raise ConfigError(f"structure: expected a file, {{file, format}} or {{system, frame}}, got {s!r}")
    return cfg


def read_md_input(path, overrides: list[str] | None = None) -> dict:
    """The md input file, with `--set KEY=VALUE` overrides applied, checked; problems name the file."""
    raw = read_file(path, "md input")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the md input must be a mapping of keys, got {type(raw).__name__}")
    try:
        return normalize_md_config(apply_overrides(raw, overrides, example="steps=200"))
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def read_structure(spec, type_map: list[str]):
    """(positions (N, 3), symbols, box (3, 3) or None) from a file ASE reads or a DeePMD system frame."""
    import numpy as np

    if isinstance(spec, dict) and "system" in spec:
        from dpmd.data import load_system

        system = load_system(spec["system"], type_map=type_map)
        frame = int(spec.get("frame", 0))
        if not -system.nframes <= frame < system.nframes:
            raise DpmdError(f"structure: {spec['system']} has {system.nframes} frames, frame {frame} asked for")
        box = None if system.box is None else np.asarray(system.box[frame]).reshape(3, 3)
        return (np.asarray(system.coord[frame]).reshape(-1, 3), [system.type_map[t] for t in system.atype], box)
    from ase.io import read

    path, fmt = (spec["file"], spec.get("format")) if isinstance(spec, dict) else (spec, None)
    if not Path(path).is_file():
        raise DpmdError(f"structure: {path}: file not found")
    kwargs = {}
    if fmt == "lammps-data" or (fmt is None and Path(path).suffix in (".data", ".lmp", ".lammps")):
        from ase.data import atomic_numbers

        fmt = "lammps-data"
        kwargs = {"Z_of_type": {i + 1: atomic_numbers[s] for i, s in enumerate(type_map)}, "atom_style": "atomic"}
    try:
        # every rank reads for itself: ASE's default parallel mode broadcasts over mpi4py's world, a collective
        # the ranks do not make together (rank 0 alone writes trajectories)
        atoms = read(path, format=fmt, parallel=False, **kwargs)
    except Exception as err:
        raise DpmdError(f"structure: {path}: ASE cannot read it ({err.__class__.__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else ''})") from None
    if len(atoms) == 0:
        raise DpmdError(f"structure: {path}: no atoms")
    if fmt == "lammps-data":
        _check_lammps_types(path, atoms, type_map)
    pbc = atoms.get_pbc()
    if pbc.any() and not pbc.all():
        raise DpmdError(f"structure: {path}: pbc={pbc.tolist()}; use fully periodic or fully open boundaries")
    box = np.asarray(atoms.cell, dtype=float) if pbc.all() else None
    return atoms.positions.copy(), atoms.get_chemical_symbols(), box


def _check_lammps_types(path, atoms, type_map: list[str]) -> None:
    """LAMMPS types are the model's type_map in order (type 1 = type_map[0], as DeePMD's pair style); a
    Masses section that says otherwise (e.g. H as type 1 for type_map [O, H]) is an error, not a mis-typed run."""
    import numpy as np
    from ase.data import atomic_masses, chemical_symbols

    types = atoms.arrays["type"]
    if types.max() > len(type_map):
        raise DpmdError(f"structure: {path}: LAMMPS type {types.max()} but the model's type_map {type_map} has "
                        f"{len(type_map)} types (type i is type_map[i-1])")
    if "masses" not in atoms.arrays:
        return
    for t in np.unique(types):
        mass = float(atoms.arrays["masses"][types == t][0])
        nearest = chemical_symbols[int(np.argmin(np.abs(atomic_masses[1:] - mass))) + 1]
        if nearest != type_map[t - 1]:
            raise DpmdError(f"structure: {path}: LAMMPS type {t} has mass {mass:.3f} ({nearest}) but type_map[{t - 1}] "
                            f"is {type_map[t - 1]}; order the LAMMPS types as the model's type_map {type_map}")


def _read_inputs(cfg: dict, comm):
    """The models (on this rank's device) and the structures of a normalised config: (models, read, box)."""
    import numpy as np
    import torch

    from dpmd.md.parallel import rank_device
    from dpmd.model import load_model

    try:
        device = torch.device(cfg["device"])
    except (RuntimeError, TypeError):
        raise DpmdError(f"device: expected cpu, cuda or cuda:N, got {cfg['device']!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DpmdError(f"device: {cfg['device']} asked for, but this PyTorch sees no CUDA GPU; use device: cpu")
    device = rank_device(cfg["device"], comm)   # under MPI, `cuda` is each rank's node-local GPU
    models = [load_model(m, device=device) for m in cfg["models"]]
    check_masses(cfg["masses"], models[0].type_map)
    structs = cfg["structure"] if isinstance(cfg["structure"], list) else [cfg["structure"]]
    read = [read_structure(s, models[0].type_map) for s in structs]
    if len({len(r[1]) for r in read}) > 1:
        raise DpmdError(f"structure: a batch needs equal atom counts, got {[len(r[1]) for r in read]}")
    if len({r[2] is None for r in read}) > 1:
        raise DpmdError("structure: a batch must be all periodic or all open")
    box = None if read[0][2] is None else np.stack([r[2] for r in read])
    return models, read, box


def build_simulation(cfg: dict, log=log.info):
    """A Simulation from a normalised config (models loaded, structure read)."""
    import numpy as np

    from dpmd.md.engine import Simulation
    from dpmd.md.parallel import mpi_world

    comm = mpi_world()   # started by mpiexec with > 1 rank: domain decomposition (dpmd.md.parallel)
    if comm is None:
        models, read, box = _read_inputs(cfg, comm)
    else:   # every rank reads; a rank that cannot (a file it does not see) stops them all with its message,
        try:  # instead of leaving the others waiting in the first collective
            models, read, box = _read_inputs(cfg, comm)
            failed = None
        except DpmdError as err:
            failed = str(err)
        first = next((f"rank {r}: {m}" if r else m for r, m in enumerate(comm.allgather(failed)) if m), None)
        if first is not None:
            raise DpmdError(first)
    make = Simulation
    if comm is not None:
        from functools import partial

        from dpmd.md.parallel import ParallelSimulation

        make = partial(ParallelSimulation, comm=comm)
    sim = make(models, np.stack([r[0] for r in read]), [r[1] for r in read], box,
                      ensemble=cfg["ensemble"], thermostat=cfg["thermostat"], barostat=cfg["barostat"],
                      masses=cfg["masses"], timestep=cfg["timestep"], temperature=cfg["temperature"],
                      pressure=cfg["pressure"], steps=cfg["steps"], seed=cfg["seed"], skin=cfg["skin"],
                      min_distance=cfg["min_distance"], thermo_freq=cfg["thermo_freq"], traj_freq=cfg["traj_freq"],
                      traj_format=cfg["traj_format"], model_devi_freq=cfg["model_devi_freq"],
                      checkpoint_freq=cfg["checkpoint_freq"], output_dir=cfg["output_dir"], log=log,
                      sync_free=None if cfg["sync_free"] == "auto" else cfg["sync_free"],
                      fparam=cfg["fparam"], aparam=cfg["aparam"])
    try:   # only now that models, structure and settings are checked: a refused run leaves no folder behind
        Path(cfg["output_dir"]).mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DpmdError(f"output_dir: {cfg['output_dir']}: cannot create it ({err.strerror})") from None
    return sim


def run_md(config, restart=None, log=log.info, threads: int | None = None) -> dict:
    """Run MD from an input file path or a config dict; `restart` continues from a checkpoint.  threads: torch's
    threads (default: dpmd.runtime's choice for the atoms of one step, models x frames x atoms)."""
    from dpmd.runtime import configure_threads

    cfg = read_md_input(config) if isinstance(config, (str, Path)) else normalize_md_config(config)
    sim = build_simulation(cfg, log=log)
    configure_threads(threads, work=len(cfg["models"]) * sim.state.nframes * sim.state.natoms)
    if restart is not None:
        sim.restore(restart)
    try:
        result = sim.run()
    finally:
        sim.close()
    result["final_step"] = sim.state.step
    return result
