"""Training input: DeePMD-kit 3's keys (YAML or JSON), validated in full before any work starts.

The schema is DeePMD-kit 3.2's (deepmd/utils/argcheck.py) for the se_e2_a descriptor, the energy fitting
net, the exp learning rate, Adam and the ener loss: the same defaults and aliases, so an input builds and
trains what `dp --pt train` builds and trains.  Older inputs are converted first as DeePMD-kit converts them
(`upgrade`).  `dpmd doc-train-input` prints every key.  `--set a.b.c=value` overrides a value (parsed as
YAML) before validation.
"""

from __future__ import annotations

import copy
import math
import re
from pathlib import Path

from dpmd.errors import ConfigError
from dpmd.model.args import MODEL_ARGS, normalize_model_config, valid_seed
from dpmd.model.descriptor import sections
from dpmd.schema import (REQUIRED, UNSET, apply_overrides, check_number, choice, key, normalize, read_file,
                         section)

__all__ = ["TRAIN_ARGS", "check_number", "normalize_input", "read_input", "apply_overrides"]


def _positive(what="positive"):
    return {"check": lambda v: v > 0, "expect": what}


def _non_negative():
    return {"check": lambda v: v >= 0, "expect": ">= 0"}


def _one_of(*values):
    return {"check": lambda v: v in values, "expect": "one of " + ", ".join(values)}


def _is_device(v: str) -> bool:
    return v in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", v) is not None


def learning_rate_args():
    exp = key("exp", dict, REQUIRED, "lr(t) = start_lr * decay_rate ** (t // decay_steps), never below stop_lr.", sub=[
        key("decay_steps", int, 5000, "Steps between decays (shrunk as DeePMD-kit does when it exceeds the "
                                      "decay phase and decay_rate is not given).", **_positive()),
        key("decay_rate", [float, None], None, "The decay factor; default: the one that reaches stop_lr at the last "
                                               "step.", check=lambda v: 0 < v <= 1, expect="in (0, 1]"),
        key("smooth", bool, False, "Decay at every step (start_lr * decay_rate ** (t / decay_steps))."),
    ])
    return section("learning_rate", [
        key("start_lr", float, REQUIRED, "Learning rate at the start (after warmup).", **_positive()),
        key("stop_lr", [float, None], None, "Learning rate at the end; default 5e-8 unless stop_lr_ratio is given.",
            **_positive()),
        key("stop_lr_ratio", [float, None], None, "stop_lr as a fraction of start_lr.", **_positive()),
        key("warmup_steps", int, 0, "Steps of linear warmup from warmup_start_factor * start_lr to start_lr.",
            **_non_negative()),
        key("warmup_ratio", [float, None], None, "warmup_steps as a fraction of the training steps.",
            check=lambda v: 0 <= v < 1, expect="in [0, 1)"),
        key("warmup_start_factor", float, 0.0, "The warmup's first learning rate, as a fraction of start_lr.",
            **_non_negative()),
        key("scale_by_worker", str, "linear", "How data-parallel training scales the learning rate with the "
                                              "number of workers.", **_one_of("linear", "sqrt", "none")),
    ], "The learning rate schedule.", default=UNSET,
        variants=[choice("learning rate", [exp], default="exp", doc="The type of the schedule.")])


def optimizer_args():
    adam = key("Adam", dict, REQUIRED, "Adam.", sub=[
        key("adam_beta1", float, 0.9, "Decay of the first moment.", check=lambda v: 0 <= v < 1, expect="in [0, 1)"),
        key("adam_beta2", float, 0.999, "Decay of the second moment.", check=lambda v: 0 <= v < 1,
            expect="in [0, 1)"),
        key("weight_decay", float, 0.0, "L2 penalty added to the gradients (torch.optim.Adam's weight_decay).",
            **_non_negative()),
    ])
    return section("optimizer", [], "The optimizer (AdamW, LKF, AdaMuon and HybridMuon are not supported yet).",
                   default=UNSET, variants=[choice("optimizer", [adam], default="Adam", doc="The optimizer.")])


def loss_args():
    def pref(name, default, what, fixed=False):
        return key(name, float, default, what, fixed=fixed, **_non_negative())

    ener = key("ener", dict, REQUIRED, "Energy, force and virial loss.", alias=["ener_hess"], sub=[
        pref("start_pref_e", 0.02, "Energy prefactor at the start."),
        pref("limit_pref_e", 1.0, "Energy prefactor at the end (it follows the learning rate in between)."),
        pref("start_pref_f", 1000, "Force prefactor at the start."),
        pref("limit_pref_f", 1.0, "Force prefactor at the end."),
        pref("start_pref_v", 0.0, "Virial prefactor at the start."),
        pref("limit_pref_v", 0.0, "Virial prefactor at the end."),
        pref("start_pref_h", 0.0, "Hessian prefactor at the start.", fixed=True),
        pref("limit_pref_h", 0.0, "Hessian prefactor at the end.", fixed=True),
        pref("start_pref_ae", 0.0, "Atomic energy prefactor at the start.", fixed=True),
        pref("limit_pref_ae", 0.0, "Atomic energy prefactor at the end.", fixed=True),
        pref("start_pref_pf", 0.0, "Atomic prefactor force prefactor at the start.", fixed=True),
        pref("limit_pref_pf", 0.0, "Atomic prefactor force prefactor at the end.", fixed=True),
        key("use_default_pf", bool, False, "atom_pref 1 where the data have none (with the pf prefactors)."),
        key("relative_f", [float, None], UNSET, "Force errors relative to |F| + relative_f.", fixed=True),
        key("enable_atom_ener_coeff", bool, False, "Energy as sum_i c_i E_i (atom_ener_coeff.npy).", fixed=True),
        pref("start_pref_gf", 0.0, "Generalized force prefactor at the start.", fixed=True),
        pref("limit_pref_gf", 0.0, "Generalized force prefactor at the end.", fixed=True),
        key("numb_generalized_coord", int, 0, "Number of generalized coordinates.", fixed=True),
        key("use_huber", bool, False, "Huber instead of squared errors.", fixed=True),
        key("loss_func", str, "mse", "mse (squared errors) or mae.", fixed=True),
        key("f_use_norm", bool, False, "Force errors as vector norms (with mae or use_huber)."),
        key("huber_delta", [float, list[float]], 0.01, "Huber threshold (with use_huber)."),
        key("intensive_ener_virial", bool, False, "Energy and virial terms normalised by 1/N^2 instead of 1/N."),
    ])
    return section("loss", [], "The loss.", default=UNSET,
                   variants=[choice("loss", [ener], default="ener", doc="The type of the loss.")])


def _data_args(name: str, validation: bool):
    fields = [
        key("systems", [list[str], str], REQUIRED, "DeePMD-kit data systems (directories with type.raw and set.*), "
                                                   "relative to the working directory."),
        key("rglob_patterns", [list[str], None], None, "Patterns to collect systems below `systems`.", fixed=True),
        key("batch_size", [list[int], int, str], "auto",
            "Frames per batch: an int, one per system, 'auto' (at least 32 atoms), 'auto:N' (at least N atoms) or "
            "'max:N' (at most N atoms, at least one frame); DeePMD-kit's mixed:, filter: and mix: are not "
            "supported yet."),
        key("auto_prob", str, "prob_sys_size",
            "How often each system is drawn: prob_uniform, prob_sys_size (by number of batches) or "
            "'prob_sys_size;start:end:weight;...' (blocks of systems with weights).", alias=["auto_prob_style"]),
        key("sys_probs", [list[float], None], None,
            "Probability of each system (overrides auto_prob); negative entries share what the others leave, "
            "by number of batches.", alias=["sys_weights"]),
        key("set_prefix", str, "set", "Removed in DeePMD-kit 2 (data are read from set.*).", fixed=True),
    ]
    if validation:
        fields.append(key("numb_btch", int, 1, "Batches per validation.", alias=["numb_batch"], **_positive()))
    else:
        fields.append(key("min_pair_dist", float, 0.0, "Drop frames with a pair closer than this (Å).", fixed=True))
    what = "Validation data (shown in lcurve.out)." if validation else "Training data."
    return key(name, [dict, None] if validation else dict, None if validation else REQUIRED, what, sub=fields)


def training_args():
    freq = _positive()
    return section("training", [
        _data_args("training_data", False),
        _data_args("validation_data", True),
        key("stat_file", str, UNSET, "Where the data statistics are saved, and read from when present: an .h5 / "
                                     ".hdf5 file or a directory, in DeePMD-kit's layout (docs/training.md)."),
        key("stat_file_mode", str, "update", "update: compute and save what the file lacks; read: the file must "
                                             "hold everything.", **_one_of("update", "read")),
        key("device", str, "auto", "Where training runs (dpmd's own key): auto (cuda when torch sees a GPU for every "
                                   "worker of this node, else cpu), cpu, cuda or cuda:N; under torchrun each worker "
                                   "takes cuda:LOCAL_RANK.  `dpmd train --device` overrides it.",
            check=_is_device, expect="auto, cpu, cuda or cuda:N"),
        key("mixed_precision", [dict, None], None, "Mixed precision training, as DeePMD-kit's TensorFlow backend does it: the "
                                            "nets' weights in output_prec, their matrix products and activations in "
                                            "compute_prec during training (the frozen model computes in output_prec).",
            sub=[key("output_prec", str, "float32", "Precision of the nets' weights and outputs (float32 only, as in "
                                                    "DeePMD-kit).", **_one_of("float32")),
                 key("compute_prec", str, REQUIRED, "Precision of the nets' arithmetic during training.",
                     **_one_of("float16", "bfloat16"))]),
        key("numb_steps", int, UNSET, "Training steps (one batch each); or give numb_epoch.",
            alias=["stop_batch", "num_step", "num_steps", "numb_step"], **_positive()),
        key("numb_epoch", float, UNSET, "Training length in epochs: numb_steps = ceil(numb_epoch * "
                                        "max_i(batches_i / p_i)), p_i the probability of system i.",
            alias=["num_epochs", "num_epoch", "numb_epochs"], **_positive()),
        key("seed", [int, None], UNSET, "Seed of the batch order.", check=valid_seed,
            expect="an integer in [0, 2**63-1]"),
        key("disp_file", str, "lcurve.out", "The learning curve file."),
        key("disp_freq", int, 1000, "Steps between learning curve lines.", **freq),
        key("save_freq", int, 1000, "Steps between checkpoints.", **freq),
        key("save_dir", [str, None], None, "Directory of the checkpoints.", fixed=True),
        key("save_ckpt", str, "model.ckpt", "Prefix of the checkpoint files."),
        key("max_ckpt_keep", int, 5, "Checkpoints kept.", **freq),
        key("ckpt_keep_ratio", [float, None], None, "Checkpoints kept, as a fraction of all.", fixed=True),
        key("enable_ema", bool, False, "Exponential moving average of the weights.", fixed=True),
        key("ema_decay", float, 0.999, "Decay of the moving average (with enable_ema)."),
        key("ema_ckpt_keep", [int, None], None, "Moving-average checkpoints kept (with enable_ema)."),
        key("change_bias_after_training", bool, False, "Re-fit the energy bias after training.", fixed=True),
        key("disp_training", bool, True, "Show progress while training."),
        key("time_training", bool, True, "Time the training."),
        key("disp_avg", bool, False, "Show the loss averaged over the display interval.", fixed=True),
        key("profiling", bool, False, "Profile the training.", fixed=True),
        key("profiling_file", str, "timeline.json", "The profile's file (with profiling)."),
        key("enable_profiler", bool, False, "Run the backend profiler.", fixed=True),
        key("tensorboard", bool, False, "Write TensorBoard logs.", fixed=True),
        key("tensorboard_log_dir", str, "log", "TensorBoard's directory (with tensorboard)."),
        key("tensorboard_freq", int, 1, "Steps between TensorBoard entries (with tensorboard)."),
        key("gradient_max_norm", float, UNSET, "Clip the gradient norm to this (0 or none: no clipping).",
            **_non_negative()),
        key("acc_freq", int, 1, "Steps of gradient accumulation.", fixed=True),
        key("zero_stage", int, 0, "ZeRO / FSDP stage of distributed training.", fixed=True),
        key("neighbor_graph_method", str, "auto", "Neighbour-graph builder of DeePMD-kit's pt_expt backend "
                                                  "(no effect here).", **_one_of("auto", "dense", "nv")),
        key("enable_compile", bool, False, "Compile the model.", fixed=True),
        key("enable_tf32", bool, False, "TF32 matrix products on CUDA.", fixed=True),
    ], "The training run.")


def validating_args():
    return section("validating", [
        key("full_validation", bool, False, "Validate on all validation data periodically.", fixed=True),
        key("ema_full_validation", bool, False, "Full validation of the moving-average weights.", fixed=True),
        key("validation_freq", int, 5000, "Steps between full validations (with full_validation)."),
        key("save_best", bool, True, "Keep the best checkpoint (with full_validation)."),
        key("save_best_dir", [str, None], None, "Directory of the best checkpoints (with full_validation)."),
        key("max_best_ckpt", int, 1, "Best checkpoints kept (with full_validation)."),
        key("validation_metric", str, "E:MAE", "Metric of the best checkpoint (with full_validation)."),
        key("full_val_file", str, "val.log", "Full validation log (with full_validation)."),
        key("full_val_start", float, 0.5, "When full validation starts (with full_validation)."),
        key("compiled_infer", bool, False, "Compiled inference in full validation.", fixed=True),
        key("tf32_infer", bool, False, "TF32 inference in full validation.", fixed=True),
        key("amp_infer", bool, False, "Mixed precision inference in full validation.", fixed=True),
    ], "Full validation during training (not supported yet).", default={})


TRAIN_ARGS = section("dpmd train input", [
    MODEL_ARGS, learning_rate_args(), optimizer_args(), loss_args(), training_args(), validating_args(),
    key("nvnmd", dict, UNSET, "Non-von Neumann MD (TensorFlow backend).", fixed=True),
], "The input of `dpmd train` (DeePMD-kit 3's keys).")

DEFAULT_STOP_LR = 5e-8  # DeePMD-kit's stop_lr when neither stop_lr nor stop_lr_ratio is given
_V1_DATA_KEYS = ("systems", "set_prefix", "batch_size", "sys_prob", "sys_probs", "auto_prob", "sys_weights",
                 "auto_prob_style")
_V31_OPTIMIZER_KEYS = ("opt_type", "kf_blocksize", "kf_start_pref_e", "kf_limit_pref_e", "kf_start_pref_f",
                       "kf_limit_pref_f", "weight_decay", "momentum", "muon_momentum", "adam_beta1", "adam_beta2",
                       "lr_adjust", "lr_adjust_coeff", "muon_2d_only", "min_2d_dim")
NUMB_STEPS_NAMES = ("numb_steps", "stop_batch", "num_step", "num_steps", "numb_step")


def upgrade(config: dict) -> dict:
    """An input of an older DeePMD-kit in today's layout, as `dp train` converts it (deepmd/utils/compat.py):
    v1 data keys in `training` -> training.training_data (a v1 decay_rate becomes stop_lr); numb_test dropped;
    warmup keys in `training` -> learning_rate; optimizer keys in `training` (DeePMD-kit 3.1) -> optimizer."""
    config = copy.deepcopy(config)
    tr, lr = config.get("training"), config.get("learning_rate")
    if not isinstance(tr, dict):
        return config
    if "systems" in tr:
        if "training_data" in tr:
            raise ConfigError("'training.systems' (DeePMD-kit 1) and 'training.training_data' are both given")
        tr["training_data"] = {k: tr.pop(k) for k in _V1_DATA_KEYS if k in tr}
        if isinstance(lr, dict) and "decay_rate" in lr:
            steps = next((tr[k] for k in NUMB_STEPS_NAMES if k in tr), None)
            try:
                lr["stop_lr"] = math.exp(math.log(lr.pop("decay_rate")) * steps / lr["decay_steps"]) * lr["start_lr"]
            except (KeyError, TypeError, ValueError):
                raise ConfigError("a DeePMD-kit 1 'learning_rate.decay_rate' needs numb_steps, decay_steps and "
                                  "start_lr to become stop_lr") from None
    tr.pop("numb_test", None)
    warmup = [k for k in ("warmup_steps", "warmup_ratio", "warmup_start_factor") if k in tr]
    if warmup and isinstance(lr, dict):
        both = [k for k in warmup if k in lr]
        if both:
            raise ConfigError(f"'training.{both[0]}' and 'learning_rate.{both[0]}' are both given; give it in "
                              f"learning_rate")
        lr.update({k: tr.pop(k) for k in warmup})
    legacy = {k: tr.pop(k) for k in _V31_OPTIMIZER_KEYS if k in tr}
    if legacy:
        if "opt_type" in legacy:
            legacy["type"] = legacy.pop("opt_type")
        opt = config.get("optimizer")
        config["optimizer"] = {**(opt if isinstance(opt, dict) else {}), **legacy}
    return config


def _data_section(sec: dict | None, where: str, base: Path) -> dict | None:
    if sec is None:
        return None
    systems = [sec["systems"]] if isinstance(sec["systems"], str) else sec["systems"]
    if not systems:
        raise ConfigError(f"'{where}.systems' must be a path or a list of paths, got []")
    resolved = []
    for s in systems:
        p = Path(s)
        p = p if p.is_absolute() else base / p
        if not Path(str(p).split("#")[0]).exists():
            raise ConfigError(f"'{where}.systems': {s} does not exist (looked in {p})")
        resolved.append(str(p))
    sec["systems"] = resolved
    bs = sec["batch_size"]
    rule, _, n = bs.partition(":") if isinstance(bs, str) else ("", "", "")
    ok = (isinstance(bs, int) and bs > 0) or (isinstance(bs, list) and all(b > 0 for b in bs)) or bs == "auto" or (
        rule in ("auto", "max") and n.isdigit() and int(n) > 0)
    if rule in ("mixed", "filter", "mix"):
        raise ConfigError(f"'{where}.batch_size' = {bs!r} is not supported yet (an int, a list, 'auto', 'auto:N' or "
                          f"'max:N')")
    if not ok:
        raise ConfigError(f"'{where}.batch_size' must be a positive int, a list of them, 'auto', 'auto:N' or 'max:N', "
                          f"got {bs!r}")
    for name, value in (("batch_size", bs), ("sys_probs", sec["sys_probs"])):
        if isinstance(value, list) and len(value) != len(resolved):
            raise ConfigError(f"'{where}.{name}' lists {len(value)} values for {len(resolved)} systems")
    ap = sec["auto_prob"]
    if not (ap in ("prob_uniform", "prob_sys_size") or ap.startswith("prob_sys_size;")):
        raise ConfigError(f"'{where}.auto_prob' must be prob_uniform, prob_sys_size or prob_sys_size;..., got {ap!r}")
    probs = sec["sys_probs"]
    if probs is not None:
        assigned = sum(p for p in probs if p >= 0)
        if assigned > 1 + 1e-8 or (all(p >= 0 for p in probs) and not math.isclose(assigned, 1.0)):
            raise ConfigError(f"'{where}.sys_probs' = {probs}: the non-negative entries must sum to 1 (or to less, "
                              f"with negative entries sharing the rest)")
    return sec


def normalize_input(config: dict, base_dir: str | Path = ".") -> dict:
    """The whole training input, validated, with defaults filled and data paths resolved against base_dir."""
    if not isinstance(config, dict):
        raise ConfigError("the input must be a mapping with model, learning_rate, loss and training")
    cfg = normalize(TRAIN_ARGS, upgrade(config))
    cfg["model"] = normalize_model_config(cfg["model"])
    lr = cfg["learning_rate"]
    if lr["stop_lr"] is not None and lr["stop_lr_ratio"] is not None:
        raise ConfigError("'learning_rate.stop_lr' and 'learning_rate.stop_lr_ratio' are both given; give one")
    if lr["stop_lr"] is None and lr["stop_lr_ratio"] is None:
        lr["stop_lr"] = DEFAULT_STOP_LR
    if lr["warmup_steps"] and lr["warmup_ratio"] is not None:
        raise ConfigError("'learning_rate.warmup_steps' and 'learning_rate.warmup_ratio' are both given; give one")
    loss = cfg["loss"]
    prefs = [f"{when}_pref_{term}" for term in "efv" for when in ("start", "limit")]
    if not any(loss[k] for k in prefs):
        raise ConfigError(f"'loss': every prefactor ({', '.join(prefs)}) is 0, so there is nothing to train")
    tr = cfg["training"]
    if (tr["numb_steps"] is None) == (tr["numb_epoch"] is None):
        raise ConfigError("'training.numb_steps' (or numb_epoch) is required" if tr["numb_steps"] is None else
                          "'training.numb_steps' and 'training.numb_epoch' are both given; give one")
    if tr["stat_file_mode"] == "read" and tr["stat_file"] is None:
        raise ConfigError("'training.stat_file_mode' is read but no 'training.stat_file' is given")
    if tr["gradient_max_norm"] == 0:
        tr["gradient_max_norm"] = None  # DeePMD-kit: 0 means no clipping
    d, f = cfg["model"]["descriptor"], cfg["model"]["fitting_net"]
    trains_descriptor = any(s.get("trainable", True) for s in sections(d))  # (a hybrid's: any of its entries)
    if not trains_descriptor and not (all(f["trainable"]) if isinstance(f["trainable"], list) else f["trainable"]):
        raise ConfigError("'model.descriptor.trainable' and 'model.fitting_net.trainable' are both false: there is "
                          "nothing to train")
    base = Path(base_dir)
    tr["training_data"] = _data_section(tr["training_data"], "training.training_data", base)
    tr["validation_data"] = _data_section(tr["validation_data"], "training.validation_data", base)
    return cfg


def read_input(path: str | Path, overrides: list[str] | None = None) -> dict:
    """Read a YAML or JSON input file, apply overrides and validate; data paths resolve against the cwd
    (as in DeePMD-kit)."""
    raw = read_file(path)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the input must be a mapping with model, learning_rate, loss and training")
    try:
        return normalize_input(apply_overrides(raw, overrides), base_dir=Path.cwd())
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
