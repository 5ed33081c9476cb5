"""Training input: DeePMD-kit's keys (YAML or JSON), validated in full before any work starts.

Every section is completed with defaults; an unknown key is an error naming the key and the
valid ones; a DeePMD-kit key we do not support yet says so.  `--set a.b.c=value` overrides
a value (parsed as YAML) before validation.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import yaml

from dpmd.errors import ConfigError
from dpmd.model.deeppot import _complete, check_seed, normalize_model_config

LR_DEFAULTS = {"type": "exp", "start_lr": 1e-3, "stop_lr": 1e-8, "decay_steps": 5000, "scale_by_worker": "linear",
               "decay_rate": None}
LOSS_DEFAULTS = {"type": "ener", "start_pref_e": 0.02, "limit_pref_e": 1.0, "start_pref_f": 1000.0,
                 "limit_pref_f": 1.0, "start_pref_v": 0.0, "limit_pref_v": 0.0, "start_pref_ae": 0.0,
                 "limit_pref_ae": 0.0, "start_pref_pf": 0.0, "limit_pref_pf": 0.0, "relative_f": None,
                 "enable_atom_ener_coeff": False, "start_pref_gf": 0.0, "limit_pref_gf": 0.0, "numb_generalized_coord": 0}
DATA_DEFAULTS = {"systems": None, "batch_size": "auto", "auto_prob": "prob_sys_size", "sys_probs": None,
                 "numb_btch": 1, "rglob_patterns": None}
TRAINING_DEFAULTS = {"training_data": None, "validation_data": None, "numb_steps": None, "seed": None,
                     "disp_file": "lcurve.out", "disp_freq": 1000, "save_freq": 1000, "save_ckpt": "model.ckpt",
                     "max_ckpt_keep": 5, "disp_training": True, "time_training": True, "profiling": False,
                     "profiling_file": "timeline.json", "enable_profiler": False, "tensorboard": False,
                     "tensorboard_log_dir": "log", "tensorboard_freq": 1, "change_bias_after_training": False,
                     "gradient_max_norm": None, "stat_file": None, "mixed_precision": None, "opt_type": "Adam",
                     "warmup_steps": 0, "num_workers": 0}
TOP_DEFAULTS = {"model": None, "learning_rate": None, "loss": None, "training": None}
_UNSUPPORTED = {
    "loss": {"start_pref_ae": 0.0, "limit_pref_ae": 0.0, "start_pref_pf": 0.0, "limit_pref_pf": 0.0,
             "relative_f": None, "enable_atom_ener_coeff": False, "start_pref_gf": 0.0, "limit_pref_gf": 0.0,
             "numb_generalized_coord": 0},
    "training": {"profiling": False, "enable_profiler": False, "tensorboard": False, "mixed_precision": None,
                 "opt_type": "Adam", "change_bias_after_training": False, "stat_file": None, "warmup_steps": 0},
    "learning_rate": {"decay_rate": None},
    "training_data": {"sys_probs": None, "rglob_patterns": None},
    "validation_data": {"sys_probs": None, "rglob_patterns": None},
}


def _check_unsupported(section: dict, name: str, where: str) -> None:
    for key, default in _UNSUPPORTED.get(name, {}).items():
        if section.get(key, default) != default:
            raise ConfigError(f"'{where}.{key}' = {section[key]!r} is not supported yet")


def check_number(value, where: str, *, integer=False, positive=False, minimum=None, allow_none=False):
    """A number (or integer) with optional bounds, else a one-line ConfigError naming `where`."""
    if value is None and allow_none:
        return None
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind):
        raise ConfigError(f"'{where}' must be {'an integer' if integer else 'a number'}, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"'{where}' must be a finite number, got {value!r}")
    if positive and value <= 0:
        raise ConfigError(f"'{where}' must be positive, got {value!r}")
    if minimum is not None and value < minimum:
        raise ConfigError(f"'{where}' must be >= {minimum}, got {value!r}")
    return value


def _data_section(section, where: str, base: Path, required: bool) -> dict | None:
    if section is None:
        if required:
            raise ConfigError(f"'{where}' is required (with 'systems')")
        return None
    if not isinstance(section, dict):
        raise ConfigError(f"'{where}' must be a mapping with 'systems', got {section!r}")
    name = where.split(".")[-1]
    sec = _complete(section, DATA_DEFAULTS, where)
    _check_unsupported(sec, name, where)
    systems = sec["systems"]
    if isinstance(systems, str):
        systems = [systems]
    if not systems or not isinstance(systems, list) or not all(isinstance(s, str) for s in systems):
        raise ConfigError(f"'{where}.systems' must be a path or a list of paths, got {sec['systems']!r}")
    resolved = []
    for s in systems:
        p = Path(s)
        p = p if p.is_absolute() else base / p
        path_part = str(p).split("#")[0]
        if not Path(path_part).exists():
            raise ConfigError(f"'{where}.systems': {s} does not exist (looked in {p})")
        resolved.append(str(p))
    sec["systems"] = resolved
    bs = sec["batch_size"]
    ok = (isinstance(bs, int) and not isinstance(bs, bool) and bs > 0) or (
        isinstance(bs, list) and all(isinstance(b, int) and b > 0 for b in bs)) or (
        isinstance(bs, str) and (bs == "auto" or (bs.startswith("auto:") and bs[5:].isdigit())))
    if not ok:
        raise ConfigError(f"'{where}.batch_size' must be a positive int, a list of them, 'auto' or 'auto:N', got {bs!r}")
    if isinstance(bs, list) and len(bs) != len(resolved):
        raise ConfigError(f"'{where}.batch_size' lists {len(bs)} sizes for {len(resolved)} systems")
    ap = sec["auto_prob"]
    if not isinstance(ap, str) or not (ap in ("prob_uniform", "prob_sys_size") or ap.startswith("prob_sys_size;")):
        raise ConfigError(f"'{where}.auto_prob' must be prob_uniform, prob_sys_size or prob_sys_size;..., got {ap!r}")
    check_number(sec["numb_btch"], f"{where}.numb_btch", integer=True, positive=True)
    return sec


def normalize_input(config: dict, base_dir: str | Path = ".") -> dict:
    """The whole training input, validated, with defaults filled and data paths resolved against base_dir."""
    if not isinstance(config, dict):
        raise ConfigError("the input must be a mapping with model, learning_rate, loss and training")
    base = Path(base_dir)
    cfg = _complete(config, TOP_DEFAULTS, "input")
    for key in ("model", "training"):
        if cfg[key] is None:
            raise ConfigError(f"'{key}' section is missing")
    cfg["model"] = normalize_model_config(cfg["model"])
    lr = cfg["learning_rate"] = _complete(cfg["learning_rate"], LR_DEFAULTS, "learning_rate")
    _check_unsupported(lr, "learning_rate", "learning_rate")
    if lr["type"] != "exp":
        raise ConfigError(f"'learning_rate.type' = {lr['type']!r} is not supported yet (only exp)")
    for k in ("start_lr", "stop_lr"):
        check_number(lr[k], f"learning_rate.{k}", positive=True)
    check_number(lr["decay_steps"], "learning_rate.decay_steps", integer=True, positive=True)
    loss = cfg["loss"] = _complete(cfg["loss"], LOSS_DEFAULTS, "loss")
    _check_unsupported(loss, "loss", "loss")
    if loss["type"] != "ener":
        raise ConfigError(f"'loss.type' = {loss['type']!r} is not supported yet (only ener)")
    prefs = [f"{when}_pref_{term}" for term in "efv" for when in ("start", "limit")]
    for k in prefs:
        check_number(loss[k], f"loss.{k}", minimum=0)
    if not any(loss[k] for k in prefs):
        raise ConfigError(f"'loss': every prefactor ({', '.join(prefs)}) is 0, so there is nothing to train")
    tr = cfg["training"] = _complete(cfg["training"], TRAINING_DEFAULTS, "training")
    _check_unsupported(tr, "training", "training")
    if tr["numb_steps"] is None:
        raise ConfigError("'training.numb_steps' is required")
    check_number(tr["numb_steps"], "training.numb_steps", integer=True, positive=True)
    for k in ("disp_freq", "save_freq", "max_ckpt_keep"):
        check_number(tr[k], f"training.{k}", integer=True, positive=True)
    check_seed(tr["seed"], "training.seed")
    if tr["gradient_max_norm"] is not None:
        check_number(tr["gradient_max_norm"], "training.gradient_max_norm", positive=True)
    tr["training_data"] = _data_section(tr["training_data"], "training.training_data", base, required=True)
    tr["validation_data"] = _data_section(tr["validation_data"], "training.validation_data", base, required=False)
    return cfg


def parse_value(text: str, item: str):
    """A --set value as plain YAML (safe_load: a tag such as !!python/object is an error, never code)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {item!r}: not a plain YAML value ({str(err).splitlines()[0]})") from None


def apply_overrides(config: dict, overrides: list[str]) -> dict:
    """Apply `section.key=value` overrides (value parsed as YAML)."""
    config = copy.deepcopy(config)
    for item in overrides or []:
        key, eq, value = item.partition("=")
        if not eq or not key or "" in key.split("."):
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. training.numb_steps=200")
        node, parts = config, key.split(".")
        for i, part in enumerate(parts[:-1]):
            if node.get(part) is None:  # absent, or `section:` left empty (defaults)
                node[part] = {}
            node = node[part]
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: '{'.'.join(parts[:i + 1])}' is not a section")
        node[parts[-1]] = parse_value(value, item)
    return config


def read_input(path: str | Path, overrides: list[str] | None = None) -> dict:
    """Read a YAML or JSON input file, apply overrides and validate; data paths resolve against the cwd
    (as in DeePMD-kit)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: input file not found")
    text = path.read_text()
    try:
        raw = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        raise ConfigError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}: "
                          f"{str(err).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the input must be a mapping with model, learning_rate, loss and training")
    try:
        return normalize_input(apply_overrides(raw, overrides), base_dir=Path.cwd())
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
