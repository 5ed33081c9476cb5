"""`dpmd md input.yaml`: the input keys, their validation, structure reading, and the run.

Every key is checked before anything runs; an unknown or bad key is one line naming it.
"""

from __future__ import annotations

import numbers
from pathlib import Path

from dpmd.errors import ConfigError, DpmdError
from dpmd.md.barostats import MODES
from dpmd.train.config import check_number

DEFAULTS = {
    "structure": None, "models": None, "ensemble": "nve", "thermostat": None, "barostat": None,
    "timestep": 0.5, "steps": None, "temperature": 300.0, "pressure": None, "seed": 1, "skin": 2.0,
    "thermo_freq": 100, "traj_freq": 100, "traj_format": "extxyz", "model_devi_freq": 0,
    "checkpoint_freq": 1000, "output_dir": ".", "min_distance": 0.5, "device": "cpu", "sync_free": "auto",
    "masses": None,
}
REQUIRED = ("structure", "models", "steps")
THERMOSTAT_KEYS = {"langevin": {"damp"}, "csvr": {"damp"}, "nose_hoover": {"damp", "chain"}}
BAROSTAT_KEYS = {"type", "damp", "mode", "compressibility", "pressure"}
TRAJ_FORMATS = ("extxyz", "lammps")


def _valid(keys) -> str:
    return ", ".join(sorted(keys))


def _number(cfg: dict, key: str, where: str, positive=False, nonneg=False, integer=False):
    return check_number(cfg[key], f"{where}{key}", integer=integer, positive=positive, minimum=0 if nonneg else None)


def _schedule(cfg: dict, key: str):
    v = cfg[key]
    if v is None:
        return None
    if isinstance(v, (list, tuple)):
        if len(v) != 2 or not all(isinstance(x, numbers.Real) and not isinstance(x, bool) for x in v):
            raise ConfigError(f"{key}: expected a number or [start, end], got {v!r}")
        return [float(x) for x in v]
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise ConfigError(f"{key}: expected a number or [start, end], got {v!r}")
    return float(v)


def _thermostat(v) -> dict:
    if isinstance(v, str):
        v = {"type": v}
    if not isinstance(v, dict):
        raise ConfigError(f"thermostat: expected e.g. {{type: langevin, damp: 0.1}}, got {v!r}")
    if "type" not in v and len(v) == 1 and next(iter(v)) in THERMOSTAT_KEYS:   # {langevin: {damp: 0.1}}
        kind, params = next(iter(v.items()))
        v = {"type": kind, **(params or {})}
    kind = v.get("type", "langevin")
    if kind not in THERMOSTAT_KEYS:
        raise ConfigError(f"thermostat.type: unknown {kind!r}; valid: {_valid(THERMOSTAT_KEYS)}")
    for key in v:
        if key != "type" and key not in THERMOSTAT_KEYS[kind]:
            raise ConfigError(f"thermostat: unknown key {key!r} for {kind}; valid: {_valid(THERMOSTAT_KEYS[kind] | {'type'})}")
    out = {"type": kind, "damp": 0.1, "chain": 3, **v}
    _number(out, "damp", "thermostat.", positive=True)
    _number(out, "chain", "thermostat.", positive=True, integer=True)
    return out


def _barostat(v) -> dict:
    if v is None:
        v = {}
    if not isinstance(v, dict):
        raise ConfigError(f"barostat: expected e.g. {{damp: 1.0, mode: iso}}, got {v!r}")
    for key in v:
        if key not in BAROSTAT_KEYS:
            raise ConfigError(f"barostat: unknown key {key!r}; valid: {_valid(BAROSTAT_KEYS)}")
    out = {"type": "scr", "damp": 1.0, "mode": "iso", "compressibility": 4.5e-5, **v}
    if out["type"] not in ("scr", "stochastic_cell_rescaling", "c-rescale"):
        raise ConfigError(f"barostat.type: unknown {out['type']!r}; valid: scr (stochastic cell rescaling)")
    if out["mode"] not in MODES:
        raise ConfigError(f"barostat.mode: expected {', '.join(MODES[:-1])} or {MODES[-1]}, got {out['mode']!r}")
    _number(out, "damp", "barostat.", positive=True)
    _number(out, "compressibility", "barostat.", positive=True)
    return out


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


def normalize_md_config(config: dict) -> dict:
    """Defaults filled in, every key checked; raises ConfigError (one line) on the first problem."""
    if not isinstance(config, dict):
        raise ConfigError(f"md input: expected a mapping of keys, got {type(config).__name__}")
    for key in config:
        if key not in DEFAULTS:
            raise ConfigError(f"unknown key {key!r} in md input; valid keys: {_valid(DEFAULTS)}")
    cfg = {**DEFAULTS, **config}
    for key in REQUIRED:
        if cfg[key] is None:
            raise ConfigError(f"md input: missing required key {key!r}")
    models = cfg["models"]
    if isinstance(models, str):
        models = [models]
    if not isinstance(models, list) or not models or not all(isinstance(m, str) for m in models):
        raise ConfigError(f"models: expected a list of model files, got {cfg['models']!r}")
    cfg["models"] = models
    if cfg["ensemble"] not in ("nve", "nvt", "npt"):
        raise ConfigError(f"ensemble: expected nve, nvt or npt, got {cfg['ensemble']!r}")
    if cfg["ensemble"] == "nve":
        if cfg["thermostat"] is not None:
            raise ConfigError("thermostat: given for ensemble nve; use nvt or npt, or remove it")
    else:
        cfg["thermostat"] = _thermostat(cfg["thermostat"] if cfg["thermostat"] is not None else "langevin")
    if cfg["ensemble"] != "npt" and config.get("barostat") is not None:
        raise ConfigError(f"barostat: given for ensemble {cfg['ensemble']}; use npt, or remove it")
    if cfg["ensemble"] == "npt":
        cfg["barostat"] = _barostat(cfg["barostat"])
        if "pressure" in cfg["barostat"] and config.get("pressure") is not None:
            raise ConfigError("pressure: given both at the top level and in barostat; keep one")
        if "pressure" in cfg["barostat"]:
            cfg["pressure"] = cfg["barostat"].pop("pressure")
        if cfg["pressure"] is None:
            raise ConfigError("pressure: required for ensemble npt (bar, a number or [start, end])")
    for key in ("timestep", "skin", "min_distance"):
        _number(cfg, key, "", positive=key == "timestep", nonneg=True)
    if cfg["sync_free"] not in ("auto", True, False):
        raise ConfigError(f"sync_free: expected auto, true or false, got {cfg['sync_free']!r}")
    for key in ("steps", "thermo_freq", "traj_freq", "model_devi_freq", "checkpoint_freq", "seed"):
        _number(cfg, key, "", nonneg=True, integer=True)
    cfg["temperature"] = _schedule(cfg, "temperature")
    cfg["pressure"] = _schedule(cfg, "pressure")
    if cfg["temperature"] is None or min(cfg["temperature"] if isinstance(cfg["temperature"], list)
                                         else [cfg["temperature"]]) < 0:
        raise ConfigError(f"temperature: must be >= 0 K, got {cfg['temperature']!r}")
    fmt = cfg["traj_format"]
    fmt = [fmt] if isinstance(fmt, str) else fmt
    if not isinstance(fmt, list) or not all(f in TRAJ_FORMATS for f in fmt):
        raise ConfigError(f"traj_format: expected one or a list of {', '.join(TRAJ_FORMATS)}, got {cfg['traj_format']!r}")
    cfg["traj_format"] = fmt
    cfg["masses"] = check_masses(cfg["masses"])
    structs = cfg["structure"] if isinstance(cfg["structure"], list) else [cfg["structure"]]
    for s in structs:
        if isinstance(s, dict):
            allowed = {"system", "frame"} if "system" in s else {"file", "format"}
            for key in s:
                if key not in allowed:
                    raise ConfigError(f"structure: unknown key {key!r}; valid: {{file, format}} or {{system, frame}}")
        elif not isinstance(s, str):
            raise ConfigError(f"structure: expected a file, {{file, format}} or {{system, frame}}, got {s!r}")
    if not isinstance(cfg["output_dir"], str):
        raise ConfigError(f"output_dir: expected a directory name, got {cfg['output_dir']!r}")
    return cfg


def read_md_input(path) -> dict:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise DpmdError(f"{path}: input file not found")
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    return normalize_md_config(config)


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
        atoms = read(path, format=fmt, **kwargs)
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


def build_simulation(cfg: dict, log=print):
    """A Simulation from a normalised config (models loaded, structure read)."""
    import numpy as np

    from dpmd.md.engine import Simulation
    from dpmd.model import load_model

    import torch

    try:
        device = torch.device(cfg["device"])
    except (RuntimeError, TypeError):
        raise DpmdError(f"device: expected cpu, cuda or cuda:N, got {cfg['device']!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DpmdError(f"device: {cfg['device']} asked for, but this PyTorch sees no CUDA GPU; use device: cpu")
    models = [load_model(m, device=cfg["device"]) for m in cfg["models"]]
    check_masses(cfg["masses"], models[0].type_map)
    structs = cfg["structure"] if isinstance(cfg["structure"], list) else [cfg["structure"]]
    read = [read_structure(s, models[0].type_map) for s in structs]
    if len({len(r[1]) for r in read}) > 1:
        raise DpmdError(f"structure: a batch needs equal atom counts, got {[len(r[1]) for r in read]}")
    if len({r[2] is None for r in read}) > 1:
        raise DpmdError("structure: a batch must be all periodic or all open")
    box = None if read[0][2] is None else np.stack([r[2] for r in read])
    from dpmd.md.parallel import mpi_world

    comm = mpi_world()   # started by mpiexec with > 1 rank: domain decomposition (dpmd.md.parallel)
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
                      sync_free=None if cfg["sync_free"] == "auto" else cfg["sync_free"])
    try:   # only now that models, structure and settings are checked: a refused run leaves no folder behind
        Path(cfg["output_dir"]).mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DpmdError(f"output_dir: {cfg['output_dir']}: cannot create it ({err.strerror})") from None
    return sim


def run_md(config, restart=None, log=print) -> dict:
    """Run MD from an input file path or a config dict; `restart` continues from a checkpoint."""
    cfg = read_md_input(config) if isinstance(config, (str, Path)) else normalize_md_config(config)
    sim = build_simulation(cfg, log=log)
    if restart is not None:
        sim.restore(restart)
    try:
        result = sim.run()
    finally:
        sim.close()
    result["final_step"] = sim.state.step
    return result
