"""The campaign file: YAML, validated in full before any work starts.

Every section is completed with defaults; an unknown key is a one-line error naming it and
listing the valid keys; a missing file is an error naming the path.  Relative paths resolve
against the campaign file's directory.  `load_campaign(path)` returns a plain dict (see SCHEMA).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from pathlib import Path

import yaml

from dpmd.errors import ConfigError

TOP = {"work_dir": None, "type_map": None, "masses": None, "structures": {}, "initial": {}, "train": None,
       "explore": None, "trust": None, "select": {}, "filters": {}, "labeller": {}, "dispatcher": {}, "convergence": {},
       "threads": None}
# threads: the cores the campaign uses at once (null: the cores this process may use, dpmd.runtime.usable_cores).
# Work in the campaign process gets up to that many torch threads (one for small systems); the ensemble trains
# in as many single-member processes as fit (one thread each for small models); each local label worker gets
# threads / dispatcher.workers threads (at least one).
STRUCTURE = {"file": None, "format": None, "index": 0, "bulk": None, "crystalstructure": None, "a": None,
             "c": None, "cubic": False, "orthorhombic": False, "repeat": None,
             "molecule": None, "copies": 1, "spacing": 3.0, "seed": 0}
INITIAL = {"data": [], "structures": [], "perturb": 4, "displacement": 0.05, "cell_strain": 0.02, "seed": 0}
TRAIN = {"template": None, "ensemble_size": 4, "numb_steps": None, "reuse_numb_steps": None,
         "init_from_previous": True, "seed": 1}
STAGE = {"name": None, "structures": None, "ensemble": "nvt", "temperatures": None, "pressures": [1.0],
         "steps": None, "traj_interval": 10, "timestep": 1.0, "thermostat": {"type": "langevin", "damp": 0.1},
         "barostat": {"damp": 1.0, "mode": "iso", "compressibility": 4.5e-5}, "iterations": None, "seed": 1,
         "min_distance": 0.5, "bias": None}
BIAS = {"strength": None, "scale": None}   # E_bias = -strength * tanh(sigma / scale): see explore_label_train/bias.py
TRUST = {"lo": None, "hi": None}
# holdout: the fraction of each labelling stage's new labels kept out of training as the test set
# (test_data/; at least one label once a stage has 5): see explore_label_train/selection.py, holdout_count
SELECT = {"budget": 10, "method": "fps", "stratify": False, "holdout": 0.1}
# frames before labelling: min_distance (Å), volume_per_atom ([min, max] Å^3), min_cell_angle (degrees),
# max_cell_length (Å); labels after it, sanity bounds far beyond any physical frame: max_force (eV/Å, any
# atom) and max_energy_deviation (eV/atom from the median of the labels of the same composition).  A label
# over a bound is a failed task naming the value and the atom; null switches a filter off.
FILTERS = {"min_distance": 1.0, "volume_per_atom": None, "min_cell_angle": 30.0, "max_cell_length": None,
           "max_force": 1000.0, "max_energy_deviation": 10.0}
LABELLER = {"calculator": "emt", "kwargs": {}}
DISPATCHER = {"backend": "local", "workers": 1, "timeout": 600.0, "start_method": "spawn", "machine": None,
              "resources": None, "retries": 3, "retry_wait": 30.0}
CONVERGENCE = {"accurate_ratio": 0.95, "max_iterations": 5, "max_labels": 1000}

SCHEMA = {"": TOP, "structures.*": STRUCTURE, "initial": INITIAL, "train": TRAIN, "explore[]": STAGE,
          "trust": TRUST, "select": SELECT, "filters": FILTERS, "labeller": LABELLER, "dispatcher": DISPATCHER,
          "convergence": CONVERGENCE}


def complete(section, defaults: dict, where: str) -> dict:
    if section is None:
        section = {}
    if not isinstance(section, dict):
        raise ConfigError(f"'{where}' must be a mapping, got {section!r}")
    for key in section:
        if key not in defaults:
            label = f"'{where}.{key}'" if where else f"'{key}'"
            raise ConfigError(f"unknown key {label}; valid keys: {', '.join(sorted(defaults))}")
    out = copy.deepcopy(defaults)
    out.update(copy.deepcopy(section))
    return out


def _num(value, where, *, integer=False, positive=False, minimum=None, allow_none=False):
    from dpmd.train.config import check_number  # lazily: labelling workers import this module without torch

    value = check_number(value, where, integer=integer, positive=positive, minimum=minimum, allow_none=allow_none)
    return value if value is None or integer else float(value)


def _numbers(value, where, *, positive=False, minimum=None):
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, list) or not value:
        raise ConfigError(f"'{where}' must be a number or a non-empty list of numbers, got {value!r}")
    return [_num(v, f"{where}[{i}]", positive=positive, minimum=minimum) for i, v in enumerate(value)]


def _path(value, where, base: Path, must_exist=True) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"'{where}' must be a path, got {value!r}")
    p = Path(value).expanduser()
    p = Path(os.path.normpath(p if p.is_absolute() else base / p))
    if must_exist and not Path(str(p).split("#")[0]).exists():
        raise ConfigError(f"'{where}': {value} does not exist (looked in {p})")
    return str(p)


def _names(value, where, known: dict) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"'{where}' must be a structure name or a list of them, got {value!r}")
    for v in value:
        if v not in known:
            raise ConfigError(f"'{where}': unknown structure {v!r}; defined in 'structures': "
                              f"{', '.join(sorted(known)) or '(none)'}")
    return value


def _structure(spec, name: str, base: Path, type_map: list[str]) -> dict:
    where = f"structures.{name}"
    if isinstance(spec, str):
        spec = {"file": spec}
    s = complete(spec, STRUCTURE, where)
    if sum(s[k] is not None for k in ("file", "bulk", "molecule")) != 1:
        raise ConfigError(f"'{where}' needs exactly one of 'file' (any file ASE reads), 'bulk' (an element) or "
                          f"'molecule' (an ASE molecule name, with copies and spacing: a cluster)")
    if s["molecule"] is not None:
        _num(s["copies"], f"{where}.copies", integer=True, positive=True)
        s["spacing"] = _num(s["spacing"], f"{where}.spacing", positive=True)
        _num(s["seed"], f"{where}.seed", integer=True, minimum=0)
    if s["file"] is not None:
        s["file"] = _path(s["file"], f"{where}.file", base)
    if s["repeat"] is not None:
        r = s["repeat"]
        if isinstance(r, int) and not isinstance(r, bool):
            r = [r, r, r]
        if not isinstance(r, list) or len(r) != 3 or not all(isinstance(x, int) and x > 0 for x in r):
            raise ConfigError(f"'{where}.repeat' must be a positive integer or three of them, got {s['repeat']!r}")
        s["repeat"] = r
    return s


def _template(value, base: Path) -> dict:
    if isinstance(value, str):
        path = Path(_path(value, "train.template", base))
        try:
            text = path.read_text()
            value = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        except (OSError, json.JSONDecodeError, yaml.YAMLError) as err:
            raise ConfigError(f"{path}: not a readable training input ({str(err).splitlines()[0]})") from None
    if not isinstance(value, dict):
        raise ConfigError("'train.template' must be a `dpmd train` input (a path or an inline mapping with "
                          "model, learning_rate, loss, training)")
    return value


def training_input(campaign: dict, systems: list[str], numb_steps: int, member: int, iteration: int) -> dict:
    """The `dpmd train` input of one ensemble member: the template with type_map, data, steps and seeds filled."""
    from dpmd.train.config import normalize_input

    cfg = copy.deepcopy(campaign["train"]["template"])
    model = cfg.setdefault("model", {})
    model["type_map"] = list(campaign["type_map"])
    seed = campaign["train"]["seed"] + 1000 * member
    model.setdefault("descriptor", {})["seed"] = seed
    model.setdefault("fitting_net", {})["seed"] = seed + 1
    tr = cfg.setdefault("training", {})
    tr["seed"] = seed + 2 + 7919 * iteration
    data = dict(tr.get("training_data") or {})
    data["systems"] = list(systems)
    tr["training_data"] = data
    tr["numb_steps"] = int(numb_steps)
    tr["disp_freq"] = min(tr.get("disp_freq", numb_steps), numb_steps)
    tr["save_freq"] = min(tr.get("save_freq", numb_steps), numb_steps)
    return normalize_input(cfg, base_dir=campaign["base_dir"])


def normalize_campaign(raw, base_dir: Path, source: str = "campaign") -> dict:
    base = Path(base_dir).resolve()
    c = complete(raw, TOP, "")
    # type map, and the masses of the exploration MD (ASE's, or {element: amu} given: DP-GEN's mass_map)
    from ase.data import atomic_numbers

    from dpmd.md.config import check_masses
    from dpmd.md.engine import element_mass

    tm = c["type_map"]
    if not isinstance(tm, list) or not tm or not all(isinstance(t, str) for t in tm):
        raise ConfigError(f"'type_map' must be a list of element symbols, e.g. [Cu], got {tm!r}")
    for t in tm:
        if t not in atomic_numbers:
            raise ConfigError(f"'type_map': {t!r} is not an element symbol")
    masses = check_masses(c["masses"], tm)
    c["masses"] = [element_mass(t, masses) for t in tm]   # in type_map order
    c["base_dir"] = str(base)
    c["source"] = source
    stem = Path(source).stem if source else "campaign"
    c["work_dir"] = _path(c["work_dir"] or stem, "work_dir", base, must_exist=False)
    # structures
    if not isinstance(c["structures"], dict):
        raise ConfigError("'structures' must map names to {file: ...} or {bulk: Cu, ...}")
    c["structures"] = {str(k): _structure(v, str(k), base, tm) for k, v in c["structures"].items()}
    # initial
    ini = c["initial"] = complete(c["initial"], INITIAL, "initial")
    data = ini["data"]
    if isinstance(data, str):
        data = [data]
    if not isinstance(data, list):
        raise ConfigError(f"'initial.data' must be a path or a list of deepmd/npy systems, got {data!r}")
    ini["data"] = [_path(d, f"initial.data[{i}]", base) for i, d in enumerate(data)]
    ini["structures"] = _names(ini["structures"], "initial.structures", c["structures"])
    _num(ini["perturb"], "initial.perturb", integer=True, positive=True)
    ini["displacement"] = _num(ini["displacement"], "initial.displacement", minimum=0)
    ini["cell_strain"] = _num(ini["cell_strain"], "initial.cell_strain", minimum=0)
    _num(ini["seed"], "initial.seed", integer=True, minimum=0)
    if not ini["data"] and not ini["structures"]:
        raise ConfigError("'initial' needs 'data' (deepmd/npy systems) and/or 'structures' (to label first)")
    # train
    if c["train"] is None:
        raise ConfigError("'train' section is missing (template, numb_steps, ensemble_size)")
    tr = c["train"] = complete(c["train"], TRAIN, "train")
    if tr["template"] is None:
        raise ConfigError("'train.template' is required (a `dpmd train` input: a path or a mapping)")
    tr["template"] = _template(tr["template"], base)
    _num(tr["ensemble_size"], "train.ensemble_size", integer=True, minimum=2)
    if tr["numb_steps"] is None:
        tr["numb_steps"] = (tr["template"].get("training") or {}).get("numb_steps")
    _num(tr["numb_steps"], "train.numb_steps", integer=True, positive=True)
    if tr["reuse_numb_steps"] is None:
        tr["reuse_numb_steps"] = tr["numb_steps"]
    _num(tr["reuse_numb_steps"], "train.reuse_numb_steps", integer=True, positive=True)
    _num(tr["seed"], "train.seed", integer=True, minimum=0)
    if not isinstance(tr["init_from_previous"], bool):
        raise ConfigError(f"'train.init_from_previous' must be true or false, got {tr['init_from_previous']!r}")
    tmpl_model = tr["template"].get("model") if isinstance(tr["template"].get("model"), dict) else {}
    if tmpl_model.get("type_map") not in (None, tm):
        raise ConfigError(f"'train.template' model.type_map {tmpl_model.get('type_map')} differs from type_map {tm}")
    # validate the whole training input now (data paths: the campaign directory stands in)
    try:
        training_input(c, [str(base)], tr["numb_steps"], 0, 0)
    except ConfigError as err:
        raise ConfigError(f"train.template: {err}") from None
    # explore
    stages = c["explore"]
    if not isinstance(stages, list) or not stages:
        raise ConfigError("'explore' must be a non-empty list of stages (structures, temperatures, steps, ...)")
    seen = set()
    for i, st in enumerate(stages):
        where = f"explore[{i}]"
        s = stages[i] = complete(st, STAGE, where)
        s["name"] = str(s["name"] if s["name"] is not None else f"stage{i}")
        if s["name"] in seen or not s["name"].replace("_", "").replace("-", "").isalnum():
            raise ConfigError(f"'{where}.name' {s['name']!r} must be unique and alphanumeric (with - or _)")
        seen.add(s["name"])
        if s["structures"] is None:
            raise ConfigError(f"'{where}.structures' is required (names from 'structures')")
        s["structures"] = _names(s["structures"], f"{where}.structures", c["structures"])
        if s["ensemble"] not in ("nvt", "npt", "nve"):
            raise ConfigError(f"'{where}.ensemble' must be nvt, npt or nve, got {s['ensemble']!r}")
        if s["temperatures"] is None:
            raise ConfigError(f"'{where}.temperatures' is required (K)")
        s["temperatures"] = _numbers(s["temperatures"], f"{where}.temperatures", minimum=0)
        s["pressures"] = _numbers(s["pressures"], f"{where}.pressures")
        if s["ensemble"] != "npt":
            s["pressures"] = [s["pressures"][0]]
        if s["steps"] is None:
            raise ConfigError(f"'{where}.steps' is required")
        _num(s["steps"], f"{where}.steps", integer=True, positive=True)
        _num(s["traj_interval"], f"{where}.traj_interval", integer=True, positive=True)
        s["timestep"] = _num(s["timestep"], f"{where}.timestep", positive=True)
        _num(s["seed"], f"{where}.seed", integer=True, minimum=0)
        s["min_distance"] = _num(s["min_distance"], f"{where}.min_distance", minimum=0)
        s["thermostat"] = complete(s["thermostat"], {"type": "langevin", "damp": 0.1, "chain": 3},
                                   f"{where}.thermostat")
        s["barostat"] = complete(s["barostat"], STAGE["barostat"], f"{where}.barostat")
        its = s["iterations"]
        if its is not None:
            if isinstance(its, int) and not isinstance(its, bool):
                its = [its]
            if not isinstance(its, list) or not all(isinstance(x, int) and x >= 0 for x in its):
                raise ConfigError(f"'{where}.iterations' must list iteration numbers (0, 1, ...), got {its!r}")
            s["iterations"] = its
    # trust levels
    t = c["trust"] = complete(c["trust"], TRUST, "trust")
    for k in ("lo", "hi"):
        if t[k] is None:
            raise ConfigError(f"'trust.{k}' is required (max force deviation, eV/Å)")
        t[k] = _num(t[k], f"trust.{k}", minimum=0)
    if not t["lo"] < t["hi"]:
        raise ConfigError(f"'trust.lo' ({t['lo']}) must be smaller than 'trust.hi' ({t['hi']})")
    for i, s in enumerate(stages):   # uncertainty-biased exploration ("reinforced dynamics")
        if s["bias"] is not None:
            b = s["bias"] = complete(s["bias"], BIAS, f"explore[{i}].bias")
            b["strength"] = _num(b["strength"], f"explore[{i}].bias.strength", positive=True)
            b["scale"] = _num(t["hi"] if b["scale"] is None else b["scale"], f"explore[{i}].bias.scale", positive=True)
    sel = c["select"] = complete(c["select"], SELECT, "select")
    _num(sel["budget"], "select.budget", integer=True, minimum=0)
    if sel["method"] not in ("fps", "random", "devi"):
        raise ConfigError(f"'select.method' must be fps, random or devi, got {sel['method']!r}")
    if not isinstance(sel["stratify"], bool):
        raise ConfigError(f"'select.stratify' must be true or false, got {sel['stratify']!r}")
    sel["holdout"] = _num(sel["holdout"], "select.holdout", minimum=0)
    if sel["holdout"] > 0.5:
        raise ConfigError(f"'select.holdout' is the fraction of each iteration's labels kept for testing, at most "
                          f"0.5, got {sel['holdout']}")
    f = c["filters"] = complete(c["filters"], FILTERS, "filters")
    f["min_distance"] = _num(f["min_distance"], "filters.min_distance", minimum=0, allow_none=True)
    f["min_cell_angle"] = _num(f["min_cell_angle"], "filters.min_cell_angle", minimum=0, allow_none=True)
    f["max_cell_length"] = _num(f["max_cell_length"], "filters.max_cell_length", positive=True, allow_none=True)
    f["max_force"] = _num(f["max_force"], "filters.max_force", positive=True, allow_none=True)
    f["max_energy_deviation"] = _num(f["max_energy_deviation"], "filters.max_energy_deviation", positive=True,
                                     allow_none=True)
    if f["volume_per_atom"] is not None:
        v = f["volume_per_atom"]
        if not isinstance(v, list) or len(v) != 2:
            raise ConfigError(f"'filters.volume_per_atom' must be [min, max] in Å^3, got {v!r}")
        f["volume_per_atom"] = [_num(x, "filters.volume_per_atom", positive=True) for x in v]
    lab = c["labeller"] = complete(c["labeller"], LABELLER, "labeller")
    if not isinstance(lab["calculator"], str) or not isinstance(lab["kwargs"], dict):
        raise ConfigError("'labeller' needs 'calculator' (a name: emt, lj, tblite, pyscf, or module:attr) "
                          "and 'kwargs' (a mapping)")
    from explore_label_train.labelers import check_labeller

    check_labeller(lab)
    d = c["dispatcher"] = complete(c["dispatcher"], DISPATCHER, "dispatcher")
    if d["backend"] not in ("local", "dpdispatcher"):
        raise ConfigError(f"'dispatcher.backend' must be local or dpdispatcher, got {d['backend']!r}")
    _num(d["workers"], "dispatcher.workers", integer=True, positive=True)
    d["timeout"] = _num(d["timeout"], "dispatcher.timeout", positive=True)
    _num(d["retries"], "dispatcher.retries", integer=True, minimum=0)
    d["retry_wait"] = _num(d["retry_wait"], "dispatcher.retry_wait", minimum=0)
    if d["start_method"] not in ("spawn", "forkserver", "fork"):
        raise ConfigError(f"'dispatcher.start_method' must be spawn, forkserver or fork, got {d['start_method']!r}")
    if d["backend"] == "dpdispatcher":
        from explore_label_train.dispatch import check_dpdispatcher

        check_dpdispatcher(d)
    _num(c["threads"], "threads", integer=True, positive=True, allow_none=True)
    cv = c["convergence"] = complete(c["convergence"], CONVERGENCE, "convergence")
    cv["accurate_ratio"] = _num(cv["accurate_ratio"], "convergence.accurate_ratio", minimum=0)
    if cv["accurate_ratio"] > 1:
        raise ConfigError(f"'convergence.accurate_ratio' must be <= 1, got {cv['accurate_ratio']}")
    _num(cv["max_iterations"], "convergence.max_iterations", integer=True, positive=True)
    _num(cv["max_labels"], "convergence.max_labels", integer=True, minimum=0)
    return c


def load_campaign(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: campaign file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a campaign file must be a mapping (type_map, initial, train, explore, trust, ...)")
    try:
        return normalize_campaign(raw, path.parent, source=str(path))
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def settings_hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]
