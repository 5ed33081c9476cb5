"""`elt import-dpgen param.json [machine.json] -o campaign.yaml`: a DP-GEN `run` as an elt campaign file.

Every key of param.json, of its model_devi_jobs entries and of machine.json has one row in PARAM, JOB or
MACHINE: mapped onto the campaign, or dropped with a one-line reason.  The campaign file opens with a comment
header listing the dropped keys and what to check by hand.

What changes on the way:
- paths: DP-GEN's are relative to param.json's folder (where `dpgen run` runs), the campaign's to its own file;
- sys_configs: DP-GEN system i (a list of globs, expanded now) becomes the structure group `sys<i>`; formats
  other than POSCAR are converted to extxyz beside the campaign (elt reads structures with ASE, DP-GEN with dpdata);
- model_devi_jobs: job j becomes explore stage `job<j>`, run in iteration j only, and the campaign stops after the
  last one; model_devi_dt ps -> timestep fs; LAMMPS's fix nvt -> a Nose-Hoover chain (damp taut), fix npt's
  barostat -> stochastic cell rescaling (damp taup); a job with a LAMMPS `template` (and PLUMED's, with
  model_devi_plumed) becomes a stage with engine lammps: the templates as they are, rev_mat's V_TEMP, V_PRES and
  V_NSTEPS as the stage's temperatures, pressures and steps, its other placeholders as lammps.rev_mat;
- machine.json: fp -> dispatcher (dpdispatcher's machine and resources) and labeller.command; train ->
  train.dispatcher and model_devi -> every explore[].dispatcher (cluster jobs running dpmd's Python, `python`,
  instead of DP-GEN's dp and lmp commands; model_devi's command becomes lammps.command of the LAMMPS stages).
"""

from __future__ import annotations

import copy
import glob
import json
import os
import re
from pathlib import Path

import yaml

from dpmd.errors import ConfigError

ENSEMBLES = {   # DP-GEN's ensemble (its LAMMPS fix) -> (elt ensemble, barostat mode)
    "nvt": ("nvt", None), "nve": ("nve", None),
    "npt": ("npt", "iso"), "npt-i": ("npt", "iso"), "npt-iso": ("npt", "iso"),
    "npt-a": ("npt", "aniso"), "npt-aniso": ("npt", "aniso"), "npt-t": ("npt", "tri"), "npt-tri": ("npt", "tri")}
TAUT, TAUP = 0.1, 0.5           # ps: DP-GEN's thermostat and barostat times when a job gives none
FP_STYLES = {"vasp": "vasp", "pwscf": "qe", "cp2k": "cp2k", "abacus": "abacus", "gaussian": "gaussian"}
FP_PATHS = {"fp_incar", "fp_pp_path", "external_input_path", "fp_kpt_file"}   # the others are under fp_pp_path
ASE_FORMATS = {"vasp/poscar": "vasp", "vasp/contcar": "vasp"}   # sys_format ASE reads as it is
VIRIAL_OFF = 1e10               # DP-GEN's default virial trust levels: no virial criterion
LABEL_TIMEOUT = 86400.0         # s: DP-GEN has no time limit per labelling task; elt's default (600 s) kills DFT
TRUST_KEYS = {"model_devi_f_trust_lo": "lo", "model_devi_f_trust_hi": "hi",
              "model_devi_v_trust_lo": "v_lo", "model_devi_v_trust_hi": "v_hi"}
# what DP-GEN users append to machine.json's fp command: the labeller adds its own input and output
COMMAND_TAILS = {"qe": r"(<\s*input|-(in|inp|input|i)\s+input)", "cp2k": r"-i\s+input\.inp(\s+-o\s+output)?",
                 "gaussian": r"<\s*input"}


# ---------------------------------------------------------------------------------------------- table rows
def ignored(reason):
    """A key with nothing to carry over to elt."""
    return lambda imp, key, value: imp.drop(key, reason, needed=False)


def unsupported(reason, unless=...):
    """A key elt cannot honour, dropped with its reason unless it holds DP-GEN's no-op value `unless`."""
    def row(imp, key, value):
        if value != unless:
            imp.drop(key, reason)
    return row


def used_by(other):
    """A key read by another key's row."""
    return lambda imp, key, value: None


def labeller_key(imp, key, value):
    """fp keys: the labeller's own keys (explore_label_train/dft: CODES[code].keys) go into labeller as they are,
    file paths rebased; a key the code does not take is dropped."""
    from explore_label_train.dft import CODES

    why = FP_UNSUPPORTED.get((imp.code, key))
    if why:
        imp.drop(key, why)
    elif key in CODES[imp.code].keys:
        imp.doc["labeller"][key] = imp.rel(value) if key in FP_PATHS else copy.deepcopy(value)
    else:
        imp.drop(key, f"not used by fp_style {imp.param['fp_style']}", needed=False)


FP_UNSUPPORTED = {
    ("vasp", "fp_params"): "DP-GEN 0.x's INCAR made from fp_params: write the INCAR and give labeller.fp_incar",
    ("qe", "fp_params"): "pw.x input made from fp_params (ecut, ediff, smearing, sigma, kspacing): give "
                         "labeller.user_fp_params {control, system, electrons, kspacing} instead",
    ("cp2k", "user_fp_params"): "CP2K input dictionaries: write the input as a template file and give "
                                "labeller.external_input_path",
    ("cp2k", "fp_params"): "CP2K input dictionaries: write the input as a template file and give "
                           "labeller.external_input_path",
}


def _type_map(imp, key, value):
    if not isinstance(value, list) or not value or not all(isinstance(t, str) for t in value):
        imp.fail(key, f"must be a list of element symbols, got {value!r}")
    imp.doc["type_map"] = list(value)


def _mass_map(imp, key, value):
    if value == "auto":
        return
    if not isinstance(value, list) or len(value) != len(imp.type_map):
        imp.fail(key, f"must be 'auto' or one mass per type_map element {imp.type_map}, got {value!r}")
    imp.doc["masses"] = {el: float(m) for el, m in zip(imp.type_map, value)}


def _init_data_sys(imp, key, value):
    prefix = imp.param.get("init_data_prefix", "")
    if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
        imp.fail(key, f"must be a list of data paths, got {value!r}")
    imp.doc["initial"]["data"] = [imp.rel(os.path.join(prefix, p)) for p in value]


def _sys_configs(imp, key, value):
    if not isinstance(value, list) or not all(isinstance(g, list) and g and all(isinstance(p, str) for p in g)
                                              for g in value):
        imp.fail(key, f"must be a list of lists of file patterns (one list per system), got {value!r}")
    prefix = imp.param.get("sys_configs_prefix", "")
    fmt = imp.param.get("sys_format", "vasp/poscar")
    for i, patterns in enumerate(value):
        files = []
        for pattern in patterns:   # DP-GEN: glob each pattern relative to its folder, then sort the system's files
            found = glob.glob(os.path.join(prefix, os.path.expanduser(pattern)), root_dir=imp.base)
            if not found:
                imp.fail(f"{key}[{i}]", f"{pattern} matches no file (looked in {imp.base})")
            files += found
        files = sorted(set(files))
        if fmt in ASE_FORMATS:
            entry = {"files": [imp.rel(f) for f in files], "format": ASE_FORMATS[fmt]}
        else:
            entry = {"files": [imp.convert(str(imp.base / f), fmt, f"sys{i}_{k}") for k, f in enumerate(files)]}
        imp.doc["structures"][f"sys{i}"] = entry


def _default_training_param(imp, key, value):
    from dpmd.train.config import NUMB_STEPS_NAMES, upgrade   # numb_steps and its aliases

    if not isinstance(value, dict) or not isinstance(value.get("training", {}), dict):
        imp.fail(key, "must be a DeePMD-kit training input (a mapping)")
    template = copy.deepcopy(value)
    (template.get("model") or {}).pop("type_map", None)   # DP-GEN, and elt, fill in type_map
    training = template.setdefault("training", {})
    # DP-GEN adds the data systems (training.systems for DeePMD-kit 1, else training_data.systems): with them,
    # data keys its examples leave in `training` (set_prefix, batch_size) move into training_data, as in dp train
    if "training_data" not in training:
        training["systems"] = []
    try:
        template = upgrade(template)
    except ConfigError as err:
        imp.fail(key, str(err))
    training = template["training"]
    training.get("training_data", {}).pop("systems", None)
    # the campaign sets numb_steps in every member's input: an alias left in the template would clash with it
    steps = [training.pop(k) for k in NUMB_STEPS_NAMES if k in training]
    train = imp.doc["train"]
    train["template"] = template
    if steps:
        train["numb_steps"] = training["numb_steps"] = steps[0]
    imp.check_template(template, train.get("numb_steps", 1))


def _numb_models(imp, key, value):
    imp.doc["train"]["ensemble_size"] = value


def init_from_previous(imp):
    """DP-GEN trains every iteration from scratch unless training_init_model (from iteration 1 on, and at 0 from
    training_iter0_model_path) or training_reuse_iter (from that iteration on, for training_reuse_numb_steps)."""
    param, train = imp.param, imp.doc["train"]
    reuse = param.get("training_reuse_iter")
    if param.get("training_init_model"):
        train["init_from_previous"] = True
        if param.get("training_iter0_model_path"):
            _init_models(imp, "training_iter0_model_path", param["training_iter0_model_path"])
    elif reuse is not None:
        train["init_from_previous"] = True if reuse <= 1 else int(reuse)
        steps = param.get("training_reuse_numb_steps", param.get("training_reuse_stop_batch"))
        if steps is not None:
            train["reuse_numb_steps"] = steps
    else:
        train["init_from_previous"] = False


def _init_models(imp, key, value):
    if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
        imp.fail(key, f"must be a list of model paths, one per model, got {value!r}")
    imp.doc["train"]["init_models"] = [imp.rel(p) for p in value]
    if key == "training_finetune_model":
        imp.doc["train"]["finetune"] = True


def _model_devi_engine(imp, key, value):
    if value != "lammps":
        imp.fail(key, f"{value!r}: only DP-GEN's LAMMPS exploration (model_devi_jobs of MD runs) has an elt "
                      "counterpart")


def _trust(imp, key, value):
    """Global trust levels: a number, or one per system (a list indexed like sys_configs, or a dict keyed by
    the index).  elt's global level is system 0's; the others go to trust.structures where they differ."""
    name = TRUST_KEYS[key]
    if imp.adaptive and name in ("lo", "v_lo"):
        imp.drop(key, ADAPTIVE_LO, needed=False)
        return
    per_system = imp.per_system(key, value)
    if not per_system:
        return
    trust = imp.doc["trust"]
    trust[name] = per_system.get("sys0", next(iter(per_system.values())))
    for sys_name, level in per_system.items():
        if level != trust[name]:
            trust.setdefault("structures", {}).setdefault(sys_name, {})[name] = level


ADAPTIVE_LO = ("DP-GEN's adaptive lower trust level (model_devi_adapt_trust_lo) does not read it: trust.lo 0, "
               "every frame below hi may join the pool")
CANDI = {"model_devi_numb_candi_f": 10, "model_devi_perc_candi_f": 0.0,   # DP-GEN's defaults
         "model_devi_numb_candi_v": 0, "model_devi_perc_candi_v": 0.0}


def _adapt_trust_lo(imp, key, value):
    """DP-GEN's adaptive lower level: select.method adaptive, its pool sized by the model_devi_*_candi_* keys
    (DP-GEN's defaults where absent), from every frame below hi: DP-GEN reads no lower level, so trust.lo is 0."""
    if not isinstance(value, bool):
        imp.fail(key, f"must be true or false, got {value!r}")
    if not value:
        return
    sel = imp.doc["select"]
    sel["method"] = "adaptive"
    for name, default in CANDI.items():
        number = imp.param.get(name, default)
        integer = name.startswith("model_devi_numb")
        if isinstance(number, bool) or not isinstance(number, int if integer else (int, float)) or number < 0 \
                or (not integer and number > 100):
            imp.fail(name, f"must be {'a count >= 0' if integer else 'a percentage, 0 to 100'}, got {number!r}")
        sel[name.removeprefix("model_devi_")] = number
    imp.doc["trust"] = {"lo": 0.0, **imp.doc["trust"]}


def _candi(imp, key, value):
    if not imp.adaptive:   # else read by _adapt_trust_lo
        imp.drop(key, "read by DP-GEN only with model_devi_adapt_trust_lo: true", needed=False)


def _model_devi_jobs(imp, key, value):
    if not isinstance(value, list) or not value:
        imp.fail(key, "must be a non-empty list of exploration jobs (one per iteration)")
    imp.doc["explore"] = [imp.stage(j, job) for j, job in enumerate(value)]
    # DP-GEN runs job j in iteration j and stops after the last one, whatever the accuracy
    imp.doc["convergence"].update(accurate_ratio=None, max_iterations=len(value))


def _fp_task_max(imp, key, value):
    """Per DP-GEN system and iteration: elt's budget is per iteration, or per structure with per_structure
    (needed only when a job explores several systems)."""
    jobs = imp.param.get("model_devi_jobs") or []
    imp.doc["select"]["budget"] = value
    # no cap besides DP-GEN's own: fp_task_max for every system of every job
    imp.doc["convergence"]["max_labels"] = value * sum(len(job.get("sys_idx", [])) for job in jobs)
    if any(len(job.get("sys_idx", [])) > 1 for job in jobs):
        imp.doc["select"]["per_structure"] = True


def _fp_task_min(imp, key, value):
    """DP-GEN labels nothing for a system with fewer candidates, and reuses the models untrained after an
    iteration in which no system reached it."""
    if value and value > 0:
        imp.doc["select"]["min_labels"] = value
        imp.doc["train"]["min_new_labels"] = value


def _ratio_failed(imp, key, value):
    imp.doc["convergence"]["max_failed_ratio"] = value


def _use_ele_temp(imp, key, value):
    if value:
        imp.drop(key, "electron temperature as a frame or atom parameter is not supported by elt's labellers")


PARAM = {   # one row per DP-GEN param.json key, in the order they are mapped
    # basics and data
    "type_map": _type_map,
    "mass_map": _mass_map,
    "use_ele_temp": _use_ele_temp,
    "init_data_prefix": used_by("init_data_sys"),
    "init_data_sys": _init_data_sys,
    "init_batch_size": unsupported("batch sizes per data system: the campaign's systems change every iteration; "
                                   "set train.template's training.training_data.batch_size (auto by default)"),
    "init_multi_systems": ignored("dpmd searches data folders recursively"),
    "sys_configs_prefix": used_by("sys_configs"),
    "sys_format": used_by("sys_configs"),
    "sys_configs": _sys_configs,
    "sys_batch_size": unsupported("batch sizes per data system: the campaign's systems change every iteration; "
                                  "set train.template's training.training_data.batch_size (auto by default)"),
    "sys_charges": unsupported("charges per system are not passed to the labeller"),
    # training
    "mlp_engine": unsupported("only DeePMD-kit models (dpmd)", unless="dp"),
    "train_backend": ignored("dpmd trains in PyTorch; DeePMD-kit's backend choice does not apply"),
    "numb_models": _numb_models,
    "default_training_param": _default_training_param,
    "training_reuse_iter": used_by("train.init_from_previous"),
    "training_reuse_numb_steps": used_by("train.init_from_previous"),
    "training_reuse_stop_batch": used_by("train.init_from_previous"),
    "training_init_model": used_by("train.init_from_previous"),
    "training_iter0_model_path": used_by("train.init_from_previous"),
    "training_init_frozen_model": _init_models,
    "training_finetune_model": _init_models,
    "training_reuse_old_ratio": unsupported("no weighting of old against new data in reused iterations"),
    "training_reuse_start_lr": unsupported("reused iterations train with train.template's learning rate", unless=None),
    "training_reuse_start_pref_e": unsupported("reused iterations train with train.template's loss prefactors",
                                               unless=None),
    "training_reuse_start_pref_f": unsupported("reused iterations train with train.template's loss prefactors",
                                               unless=None),
    "dp_train_skip_neighbor_stat": ignored("dpmd counts neighbours only for sel: auto"),
    "dp_compress": unsupported("the campaign does not compress its models: run `dpmd compress` on the final ones",
                               unless=False),
    "model_devi_activation_func": unsupported("every ensemble member has train.template's activation functions",
                                              unless=None),
    "srtab_file_path": unsupported("pair tables (DP-ZBL) are not supported by dpmd"),
    "one_h5": ignored("elt writes deepmd/npy data"),
    # exploration
    "model_devi_engine": _model_devi_engine,
    "model_devi_dt": used_by("model_devi_jobs"),
    "model_devi_skip": used_by("model_devi_jobs"),
    "model_devi_f_trust_lo": _trust,
    "model_devi_f_trust_hi": _trust,
    "model_devi_v_trust_lo": _trust,
    "model_devi_v_trust_hi": _trust,
    "model_devi_jobs": _model_devi_jobs,
    "model_devi_adapt_trust_lo": _adapt_trust_lo,
    **{k: _candi for k in CANDI},
    "model_devi_f_avg_relative": unsupported("force deviations normalised by the mean force", unless=False),
    "use_relative": unsupported("relative force deviations (DeePMD-kit's model_devi relative)", unless=False),
    "epsilon": unsupported("used with use_relative"),
    "use_relative_v": unsupported("relative virial deviations", unless=False),
    "epsilon_v": unsupported("used with use_relative_v"),
    "model_devi_clean_traj": ignored("elt keeps one npz of frames per exploration task; nothing to clean"),
    "model_devi_merge_traj": ignored("elt keeps one npz of frames per exploration task"),
    "model_devi_nopbc": unsupported("open boundaries come from the structure files (a file without a cell)",
                                    unless=False),
    "model_devi_plumed": used_by("model_devi_jobs[].template.plm -> explore[].lammps.plumed"),
    "model_devi_plumed_path": unsupported("no PLUMED bias", unless=False),
    "shuffle_poscar": unsupported("atoms of the start structures are not shuffled", unless=False),
    # labelling
    "fp_style": used_by("every fp key: labeller.code"),
    "fp_task_max": _fp_task_max,
    "fp_task_min": _fp_task_min,
    "ratio_failed": _ratio_failed,
    "fp_accurate_threshold": unsupported("no per-system label cut by accuracy; the campaign stops at "
                                         "convergence.accurate_ratio", unless=1),
    "fp_accurate_soft_threshold": unsupported("no per-system label cut by accuracy"),
    "fp_cluster_vacuum": unsupported("no vacuum check of clusters; see filters"),
    "fp_skip_bad_box": unsupported("DP-GEN's box checks: use filters (min_cell_angle, max_cell_length, "
                                   "volume_per_atom)"),
    "detailed_report_make_fp": ignored("every frame's class and reason are in campaign.db (elt report)"),
    "cvasp": unsupported("Custodian-controlled VASP runs", unless=False),
    "use_clusters": unsupported("cluster labels cut from periodic frames", unless=False),
    "cluster_cutoff": unsupported("used with use_clusters"),
    "cluster_cutoff_hard": unsupported("used with use_clusters"),
    "cluster_minify": unsupported("used with use_clusters", unless=False),
    **{k: labeller_key for k in ("fp_pp_path", "fp_pp_files", "fp_incar", "fp_aniso_kspacing", "fp_orb_files",
                                 "fp_kpt_file", "fp_dpks_descriptor", "k_points", "user_fp_params", "fp_params",
                                 "external_input_path")},
}


def _mapped(target):
    return lambda imp, key, value: None


JOB = {   # one row per key of a model_devi_jobs entry; stage() maps them
    "sys_idx": _mapped("explore[].structures"),
    "temps": _mapped("explore[].temperatures"),
    "press": _mapped("explore[].pressures"),
    "trj_freq": _mapped("explore[].traj_interval"),
    "t_freq": _mapped("explore[].traj_interval"),
    "traj_freq": _mapped("explore[].traj_interval"),
    "nsteps": _mapped("explore[].steps"),
    "ensemble": _mapped("explore[].ensemble"),
    "taut": _mapped("explore[].thermostat.damp"),
    "taup": _mapped("explore[].barostat.damp"),
    **{k: _mapped("explore[].trust") for k in TRUST_KEYS},
    "neidelay": ignored("dpmd builds its own neighbour lists"),
    "nbeads": unsupported("path-integral MD"),
    "template": _mapped("explore[].engine lammps, explore[].lammps.template / plumed"),
    "rev_mat": _mapped("explore[].temperatures / pressures / steps, explore[].lammps.rev_mat"),
    "sys_rev_mat": unsupported("placeholders per system: an elt stage fills one set for all its structures; split "
                               "the job into one per system"),
}

MACHINE = {   # one row per machine.json key
    "api_version": ignored("DP-GEN's machine format 1.0, the one read here"),
    "deepmd_version": ignored("dpmd trains and explores"),
    "train": lambda imp, key, value: imp.stage_dispatch(key, value),
    "model_devi": lambda imp, key, value: imp.stage_dispatch(key, value),
    "fp": lambda imp, key, value: imp.dispatch(value),
}
STAGE_TARGETS = {"train": "train.dispatcher", "model_devi": "explore[].dispatcher"}
SECTION = {"command", "machine", "resources"}   # keys of a machine.json section mapped; the others below
SECTION_UNSUPPORTED = {"user_forward_files": "elt's jobs send the files they need (a labeller its task folder's "
                                             "inputs; training and exploration read work_dir in place)",
                       "user_backward_files": "elt's jobs fetch the files they write"}


# ---------------------------------------------------------------------------------------------- the import
def read_input(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"{path}: file not found")
    try:
        text = path.read_text()
        value = yaml.safe_load(text) if path.suffix in (".yaml", ".yml") else json.loads(text)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, yaml.YAMLError) as err:
        raise ConfigError(f"{path}: not a readable DP-GEN input ({str(err).splitlines()[0]})") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: a DP-GEN input must be a mapping of keys")
    return value


def _plain(value):
    """Without DP-GEN's comment keys (`_comment`, `_idx`, ...), at any depth."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items() if not str(k).startswith("_")}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


class Import:
    """One import: `Import(param, machine, output).doc` is the campaign; `header()` its comment lines."""

    def __init__(self, param_path, machine_path=None, output="campaign.yaml"):
        self.param_path, self.machine_path = Path(param_path), machine_path and Path(machine_path)
        self.out = Path(output)
        self.base = self.param_path.resolve().parent
        self.out_dir = self.out.resolve().parent
        self.param = read_input(self.param_path)
        self.adaptive = self.param.get("model_devi_adapt_trust_lo") is True
        self.where = self.param_path
        self.dropped, self.notes, self.conversions, self.stage_jobs = [], [], [], []
        self.doc = {"type_map": None, "masses": None, "structures": {}, "initial": {}, "train": {}, "explore": [],
                    "trust": {}, "select": {"method": "random"}, "labeller": {}, "dispatcher": {},
                    "convergence": {}}
        for key in ("type_map", "sys_configs", "model_devi_jobs", "fp_style"):
            if key not in self.param:
                self.fail(key, "is required")
        self.type_map = self.param["type_map"]
        style = self.param["fp_style"]
        if style not in FP_STYLES:
            self.fail("fp_style", f"{style!r} has no elt labeller; valid: {', '.join(FP_STYLES)}")
        self.code = FP_STYLES[style]
        self.doc["labeller"]["code"] = self.code
        for key, value in self.param.items():
            if not str(key).startswith("_") and key not in PARAM:
                self.drop(key, "not a DP-GEN run key known to elt import-dpgen")
        for key, row in PARAM.items():
            if key in self.param:
                row(self, key, _plain(self.param[key]))
        init_from_previous(self)
        self.labeller_defaults()
        self.doc["dispatcher"] = {"backend": "local", "workers": 1, "timeout": LABEL_TIMEOUT}
        if self.machine_path:
            self.machine(read_input(self.machine_path))
        self.doc = {k: v for k, v in self.doc.items() if v not in (None, {}, [])}

    # -- bookkeeping
    def fail(self, key, message):
        raise ConfigError(f"{self.where}: '{key}' {message}")

    def drop(self, key, reason, needed=True):
        self.dropped.append((self.where.name, key, reason, needed))

    def rel(self, path: str) -> str:
        """A DP-GEN path (relative to param.json's folder) as the campaign's (relative to the campaign file)."""
        p = Path(os.path.expanduser(path))
        if p.is_absolute():
            return os.path.normpath(p)
        return os.path.relpath(os.path.normpath(self.base / p), self.out_dir)

    def convert(self, path: str, fmt: str, name: str) -> str:
        """A structure file of a format ASE does not read as DP-GEN meant it: converted to extxyz at write time."""
        target = self.out_dir / f"{self.out.stem}_structures" / f"{name}.extxyz"
        self.conversions.append((path, fmt, target))
        return os.path.relpath(target, self.out_dir)

    def per_system(self, key, value) -> dict:
        """{sys<i>: level} from a number (every system), a list (by sys_configs index) or a dict (keyed by the
        index); {} for DP-GEN's "no virial criterion"."""
        n = len(self.param.get("sys_configs") or [])
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return {} if value >= VIRIAL_OFF else {f"sys{i}": value for i in range(max(n, 1))}
        if isinstance(value, list) and len(value) == n:
            return {f"sys{i}": v for i, v in enumerate(value)}
        if isinstance(value, dict) and all(str(k).isdigit() for k in value):
            return {f"sys{int(k)}": v for k, v in value.items()}
        self.fail(key, f"must be a number, one per system of sys_configs ({n}), or {{index: number}}, got {value!r}")

    def check_template(self, template, steps):
        """Is DP-GEN's training input one dpmd trains with?  A refusal is a note: the user fixes train.template."""
        from explore_label_train.config import training_input

        try:
            training_input({"train": {"template": template, "seed": 1}, "type_map": self.type_map,
                            "base_dir": str(self.base)}, [str(self.base)], steps, 0, 0)
        except ConfigError as err:
            why = str(err).split("; valid keys")[0]
            self.notes.append(f"train.template: dpmd refuses DP-GEN's default_training_param ({why}); fix it here")

    # -- exploration
    def stage(self, j: int, job) -> dict:
        where = f"model_devi_jobs[{j}]"
        if not isinstance(job, dict):
            self.fail(where, f"must be a mapping, got {job!r}")
        job = _plain(job)
        for key, value in job.items():
            row = JOB.get(key)
            if row is None:
                self.drop(f"{where}.{key}", "not a DP-GEN model_devi_jobs key known to elt import-dpgen")
            else:
                row(self, f"{where}.{key}", value)
        freq = next((job[k] for k in ("trj_freq", "t_freq", "traj_freq") if k in job), None)
        if "template" in job:
            return self.template_stage(j, job, freq)
        for key in ("sys_idx", "temps", "nsteps", "trj_freq", "ensemble"):
            if (freq if key == "trj_freq" else job.get(key)) is None:
                self.fail(f"{where}.{key}", "is required (in a job without a LAMMPS template)")
        ensemble = job["ensemble"]
        if ensemble not in ENSEMBLES:
            self.fail(f"{where}.ensemble", f"{ensemble!r}: valid: {', '.join(ENSEMBLES)}")
        kind, mode = ENSEMBLES[ensemble]
        stage = {"name": f"job{j}", "structures": self.job_structures(where, job["sys_idx"]), "ensemble": kind,
                 "temperatures": job["temps"], "steps": job["nsteps"], "traj_interval": freq,
                 "timestep": self.timestep(), "iterations": [j]}
        if kind == "npt":
            if "press" not in job:
                self.fail(f"{where}.press", f"is required for ensemble {ensemble}")
            stage["pressures"] = job["press"]
            # LAMMPS's Nose-Hoover barostat has no dpmd counterpart; stochastic cell rescaling reaches the same
            # ensemble, its relaxation set by the compressibility (water's by default)
            stage["barostat"] = {"damp": job.get("taup", TAUP), "mode": mode}
        if kind != "nve":
            stage["thermostat"] = {"type": "nose_hoover", "damp": job.get("taut", TAUT), "chain": 3}   # fix nvt's
        return self.job_trust(where, job, stage)

    def job_structures(self, where: str, sys_idx) -> list[str]:
        n = len(self.param.get("sys_configs") or [])
        if not isinstance(sys_idx, list):
            self.fail(f"{where}.sys_idx", f"must be a list of sys_configs indices, got {sys_idx!r}")
        bad = [i for i in sys_idx if not (isinstance(i, int) and 0 <= i < n)]
        if bad:
            self.fail(f"{where}.sys_idx", f"{bad[0]!r} is not a system of sys_configs (0 to {n - 1})")
        return [f"sys{i}" for i in sys_idx]

    def timestep(self) -> float:
        dt = self.param.get("model_devi_dt")
        if not isinstance(dt, (int, float)) or dt <= 0:
            self.fail("model_devi_dt", f"must be the MD time step in ps, got {dt!r}")
        return round(dt * 1000, 9)

    def template_stage(self, j: int, job: dict, freq) -> dict:
        """A job run through DP-GEN's LAMMPS template (and PLUMED's, with model_devi_plumed): engine lammps with
        the templates as they are; rev_mat's V_TEMP, V_PRES, V_NSTEPS are the stage's temperatures, pressures and
        steps (elt fills them), its other placeholders take one value each (DP-GEN's product of several values
        has no elt counterpart beyond temperatures x pressures)."""
        where = f"model_devi_jobs[{j}]"
        template, rev = job["template"], job.get("rev_mat") or {}
        if not isinstance(template, dict) or not isinstance(template.get("lmp"), str):
            self.fail(f"{where}.template", f"must be {{lmp: LAMMPS input[, plm: PLUMED input]}}, got {template!r}")
        plumed = template.get("plm") if self.param.get("model_devi_plumed") else None
        if template.get("plm") and plumed is None:
            self.drop(f"{where}.template.plm", "model_devi_plumed is false: DP-GEN does not use it either",
                      needed=False)
        if not isinstance(rev, dict) or not all(isinstance(rev.get(k, {}), dict) for k in ("lmp", "plm")):
            self.fail(f"{where}.rev_mat", f"must be {{lmp: {{placeholder: [values]}}, plm: {{...}}}}, got {rev!r}")
        values = {}
        for part in ("lmp", "plm") if plumed else ("lmp",):
            for name, value in (rev.get(part) or {}).items():
                value = value if isinstance(value, list) else [value]
                if name in values and values[name] != value:
                    self.fail(f"{where}.rev_mat.{part}.{name}", f"{value} differs from rev_mat.lmp.{name} "
                              f"{values[name]}: elt fills a placeholder with one value in both files")
                values[name] = value
        temps, press = values.pop("V_TEMP", job.get("temps")), values.pop("V_PRES", job.get("press"))
        steps = values.pop("V_NSTEPS", None) or ([job["nsteps"]] if "nsteps" in job else None)
        for key, value in (("sys_idx", job.get("sys_idx")), ("temps", temps), ("trj_freq", freq)):
            if value is None:
                self.fail(f"{where}.{key}", "is required (a job run through a LAMMPS template needs it"
                          + (", or rev_mat.lmp.V_TEMP: elt starts every trajectory's velocities at its temperature)"
                             if key == "temps" else ")"))
        if steps is None or len(steps) != 1:
            self.fail(f"{where}.rev_mat.lmp.V_NSTEPS", f"must be one number of steps (or nsteps), got {steps!r}")
        rev_mat = {}
        for name, value in values.items():
            if len(value) != 1:
                self.fail(f"{where}.rev_mat.{name}", f"{len(value)} values: elt explores temperatures x pressures "
                          "only; other placeholders take one value per stage (split the job)")
            rev_mat[name] = value[0]
        lammps = {"template": self.rel(template["lmp"])}
        if plumed:
            lammps["plumed"] = self.rel(plumed)
        if rev_mat:
            lammps["rev_mat"] = rev_mat
        stage = {"name": f"job{j}", "structures": self.job_structures(where, job["sys_idx"]), "engine": "lammps",
                 "lammps": lammps, "temperatures": temps, "steps": steps[0], "traj_interval": freq,
                 "iterations": [j]}
        if press is not None:
            stage["pressures"] = press
        if "model_devi_dt" in self.param:   # V_DT; the template's own timestep rules the run
            stage["timestep"] = self.timestep()
        if job.get("ensemble") in ENSEMBLES:   # the template decides; for the stage's checks only
            stage["ensemble"] = ENSEMBLES[job["ensemble"]][0]
        return self.job_trust(where, job, stage)

    def job_trust(self, where: str, job: dict, stage: dict) -> dict:
        """The stage with model_devi_skip and the job's trust levels."""
        skip = self.param.get("model_devi_skip", 0)
        if skip:
            stage["skip_steps"] = skip
        trust = {}
        for key, name in TRUST_KEYS.items():
            if key in job and self.adaptive and name in ("lo", "v_lo"):
                self.drop(f"{where}.{key}", ADAPTIVE_LO, needed=False)
            elif key in job:
                for sys_name, level in self.per_system(f"{where}.{key}", job[key]).items():
                    if isinstance(job[key], dict):
                        trust.setdefault("structures", {}).setdefault(sys_name, {})[name] = level
                    else:
                        trust[name] = level
        if trust:
            stage["trust"] = trust
        return stage

    # -- labelling and dispatch
    def labeller_defaults(self):
        from explore_label_train.dft import CODES

        lab = self.doc["labeller"]
        if "fp_pp_path" in CODES[self.code].keys and "fp_pp_path" not in lab:
            lab["fp_pp_path"] = self.rel(".")   # DP-GEN's default: param.json's folder
        files = lab.get("fp_pp_files")
        if isinstance(files, list):
            for el, name in zip(self.type_map, files):
                # a file named after another element of type_map is most likely listed out of order
                named = re.match(r"([A-Z][a-z]?)[._-]", Path(name).name)
                if named and named[1] in self.type_map and named[1] != el:
                    self.notes.append(f"labeller.fp_pp_files: {name} is listed for {el} (type_map order "
                                      f"{self.type_map}) but is named after {named[1]}")

    def machine(self, machine: dict):
        self.where = self.machine_path
        old = sorted(k for k in machine if k.endswith(("_machine", "_resources")) or k == "deepmd_path")
        if old or str(machine.get("api_version", "0")) < "1":
            self.fail(old[0] if old else "api_version", "DP-GEN's machine format before api_version 1.0 is not "
                      "read: write train, model_devi and fp sections (command, machine, resources)")
        for key, value in machine.items():
            if str(key).startswith("_"):
                continue
            row = MACHINE.get(key)
            if row is None:
                self.drop(key, "not a DP-GEN machine.json key known to elt import-dpgen")
            else:
                row(self, key, _plain(value))

    def section(self, name: str, value) -> dict:
        """A machine.json section (train, model_devi, fp): the first entry of a list (DP-GEN's choice too),
        which must hold dpdispatcher's machine and resources."""
        if isinstance(value, list):
            for k in range(1, len(value)):
                self.drop(f"{name}[{k}]", f"DP-GEN uses the first {name} entry only")
            value = value[0] if value else {}
        if not isinstance(value, dict) or not isinstance(value.get("machine"), dict) \
                or not isinstance(value.get("resources"), dict):
            self.fail(name, "must hold command, machine and resources (dpdispatcher's)")
        for key in value:
            if key in SECTION_UNSUPPORTED:
                self.drop(f"{name}.{key}", SECTION_UNSUPPORTED[key])
            elif key not in SECTION:
                self.drop(f"{name}.{key}", f"not a DP-GEN machine.json {name} key known to elt import-dpgen")
        return value

    def dispatch(self, fp):
        """machine.json fp: the label dispatcher; its command is the labeller's."""
        fp = self.section("fp", fp)
        self.doc["dispatcher"].update(backend="dpdispatcher", machine=fp["machine"], resources=fp["resources"])
        if "command" in fp:
            command = re.sub(r"\s*\|\|\s*(:|true)\s*$", "", fp["command"])   # elt records the exit status itself
            tail = COMMAND_TAILS.get(self.code)
            if tail:
                command = re.sub(rf"\s*{tail}(\s*>\s*output)?\s*$", "", command)
            self.doc["labeller"]["command"] = command
            if command != fp["command"]:
                self.notes.append(f"labeller.command: {self.machine_path.name} fp.command {fp['command']!r} without "
                                  "DP-GEN's input/output redirection (the labeller adds its own)")

    def stage_dispatch(self, name: str, value):
        """machine.json train / model_devi: train.dispatcher / every explore[].dispatcher, cluster jobs running
        dpmd's Python (`python`) instead of DP-GEN's command (dp, lmp)."""
        value = self.section(name, value)
        stages = self.doc["explore"] if name == "model_devi" else []
        lammps = [s for s in stages if s.get("engine") == "lammps"]
        if "command" in value:
            for stage in lammps:   # DP-GEN's lmp command runs the LAMMPS stages, on the input elt appends
                stage["lammps"]["command"] = value["command"]
            if name == "train" or len(lammps) < len(stages):
                self.drop(f"{name}.command", f"{value['command']!r}: elt's jobs run dpmd through "
                          f"{STAGE_TARGETS[name]}.python (see Check)", needed=False)
        block = {"backend": "dpdispatcher", "machine": value["machine"], "resources": value["resources"],
                 "python": "python"}
        if name == "train":
            self.doc["train"]["dispatcher"] = block
        for stage in self.doc["explore"] if name == "model_devi" else []:
            stage["dispatcher"] = copy.deepcopy(block)   # one block each: no YAML anchors in the campaign
        self.stage_jobs.append(STAGE_TARGETS[name])

    # -- output
    def header(self) -> list[str]:
        lines = [f"elt campaign imported from DP-GEN by `elt import-dpgen`: {self.param_path.resolve()}"
                 + (f", {self.machine_path.resolve()}" if self.machine_path else "")]
        for title, needed in (("Not supported (dropped):", True), ("Nothing to carry over:", False)):
            rows = [f"  {f} {key}: {why}" for f, key, why, n in self.dropped if n == needed]
            lines += [title] + rows if rows else []
        notes = self.notes + [
            f"dispatcher.timeout {LABEL_TIMEOUT:g} s per labelling task (DP-GEN has no limit): set yours",
            "select.holdout: elt keeps 10 % of each iteration's new labels out of training as a test set (DP-GEN "
            "has none); 0 trains on all",
            "select.method adaptive with DP-GEN's pool (model_devi_*_candi_*) from every frame below trust.hi "
            "(trust.lo 0), as model_devi_adapt_trust_lo" if self.adaptive else
            "select.method random, as DP-GEN; fps spreads the labels over the candidates"]
        if self.code == "gaussian":
            notes.append("structures: the gaussian labeller takes molecules (no cell); DP-GEN gave Gaussian its "
                         "periodic frames without their cell")
        if self.stage_jobs:
            notes.append(f"{' and '.join(j + '.python' for j in self.stage_jobs)}: `python` must start a Python "
                         "with dpmd in the cluster job's environment (resources.source_list / module_list, or e.g. "
                         "`conda run -n dpmd python`); these jobs read and write work_dir in place, so the cluster "
                         "must see it at the same path")
        if any(s.get("engine") == "lammps" for s in self.doc.get("explore", [])):
            notes.append("explore[].lammps: the templates' `pair_style deepmd` line runs dpmd's `pair_style dpmd` "
                         "plugin on the campaign's models (LAMMPS_PLUGIN_PATH; `dpmd build-lammps-plugin`); "
                         "their `read_data` must read conf.lmp")
        if any(s.get("ensemble") == "npt" and s.get("engine") != "lammps" for s in self.doc.get("explore", [])):
            notes.append("explore[].barostat.compressibility: water's by default; set the material's")
        return lines + ["Check:"] + [f"  {n}" for n in notes]

    def write(self) -> Path:
        from dpmd.files import atomic_write

        for path, fmt, target in self.conversions:
            atoms = _read_dpdata(path, fmt, self.type_map, self.param_path)
            atomic_write(target, lambda fh, a=atoms: a.write(fh, format="extxyz"), mode="w")
        body = yaml.dump(self.doc, Dumper=_Dumper, sort_keys=False, width=120, allow_unicode=True)
        text = "".join(f"# {line}\n".replace("# \n", "#\n") for line in self.header()) + "\n" + body
        atomic_write(self.out, lambda fh: fh.write(text), mode="w")
        return self.out


class _Dumper(yaml.SafeDumper):
    """Short lists and mappings of plain values on one line ([H, C], {lo: 0.05, hi: 0.15}), the rest in blocks."""

    def represent_list(self, data):
        return self.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=_short(data))

    def represent_dict(self, data):
        return self.represent_mapping("tag:yaml.org,2002:map", data.items(), flow_style=_short(data))


def _short(data) -> bool:
    values = data.values() if isinstance(data, dict) else data
    return all(not isinstance(v, (dict, list)) for v in values) and len(str(data)) <= 90


_Dumper.add_representer(list, _Dumper.represent_list)
_Dumper.add_representer(dict, _Dumper.represent_dict)


def _read_dpdata(path, fmt, type_map, source):
    import dpdata

    try:
        system = dpdata.System(path, fmt=fmt, type_map=type_map)
        return system.to("ase/structure")[0]
    except Exception as err:  # noqa: BLE001 - dpdata's readers raise anything
        raise ConfigError(f"{source}: 'sys_configs': dpdata cannot read {path} as {fmt} "
                          f"({type(err).__name__}: {str(err).strip()[:200]})") from None


def add_arguments(parser) -> None:
    parser.add_argument("param", help="DP-GEN's param.json (JSON or YAML)")
    parser.add_argument("machine", nargs="?", help="DP-GEN's machine.json: its train, model_devi and fp sections "
                        "become the dispatchers of training, exploration and labelling")
    parser.add_argument("-o", "--output", default="campaign.yaml", help="campaign file to write (default: "
                        "campaign.yaml); relative paths in it start at its folder")
    parser.add_argument("--force", action="store_true", help="replace an existing output file")


def run(args) -> None:
    out = Path(args.output)
    if out.exists() and not args.force:
        raise ConfigError(f"{out}: exists; pass --force to replace it")
    imp = Import(args.param, args.machine, out)
    imp.write()
    doc = imp.doc
    files = sum(len(s["files"]) for s in doc.get("structures", {}).values())
    unsupported_keys = sum(1 for *_, needed in imp.dropped if needed)
    print(f"wrote {out}: {len(doc.get('structures', {}))} structure groups ({files} files), "
          f"{len(doc.get('explore', []))} explore stages; {unsupported_keys} DP-GEN keys not supported (listed at "
          f"the top of {out})")
    # what DP-GEN's inputs leave out (an INCAR made from 0.x's fp_params, a CP2K template) stops `elt run`: say it now
    from explore_label_train.config import load_campaign

    try:
        load_campaign(out)
    except ConfigError as err:
        print(f"{err} (edit it before `elt run`)")
