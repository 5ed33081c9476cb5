"""The `model` section of a training input: DeePMD-kit 3's keys, defaults and aliases (deepmd/utils/argcheck.py),
for the se_e2_a descriptor and the energy fitting net, checked with dpmd.schema.

Leaving a key out builds what DeePMD-kit builds.  A DeePMD-kit key dpmd does not implement is accepted at its
default only (`fixed`); another descriptor, fitting or model type is refused by name.
"""

from __future__ import annotations

import copy
import math
import re

from dpmd.errors import ConfigError
from dpmd.model.compress import normalize_compress
from dpmd.model.network import ACTIVATIONS, parse_activation
from dpmd.schema import REQUIRED, UNSET, choice, key, normalize, section

SEED_MAX = 2**63 - 1  # torch.Generator.manual_seed takes up to 2**64 - 1; the training seed + 1 must fit too
PRECISIONS = ("default", "float64", "float32")  # "default": DeePMD-kit's interface precision, float64


def valid_seed(v) -> bool:
    return 0 <= v <= SEED_MAX


def check_seed(value, where: str):
    """A seed torch's generators accept (None: unseeded), else a one-line error naming `where`."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not valid_seed(value)):
        raise ConfigError(f"'{where}' must be an integer in [0, 2**63-1], got {value!r}")
    return value


def _positive_ints(v) -> bool:
    return len(v) > 0 and all(x > 0 for x in v)


def _seed(doc: str):
    return key("seed", [int, None], UNSET, doc, check=valid_seed, expect="an integer in [0, 2**63-1]")


def _known_activation(name: str) -> bool:
    try:
        parse_activation(name)
    except ValueError:
        return False
    return True


def _activation(doc: str):
    return key("activation_function", str, "tanh", doc, check=_known_activation,
               expect=f"one of {', '.join(ACTIVATIONS)} (or silut:<threshold>)")


def _precision(doc: str):
    return key("precision", str, "default", doc, check=lambda v: v in PRECISIONS,
               expect=f"one of {', '.join(PRECISIONS)}")


def _neuron(default, doc: str, alias=()):
    return key("neuron", list[int], default, doc, alias=alias, check=_positive_ints,
               expect="a non-empty list of positive integers")


def se_e2_a_args() -> list:
    return [
        key("sel", [list[int], str], "auto",
            "Neighbours kept per type within rcut: a list with one count per type of type_map, or 'auto' / "
            "'auto:<factor>': the largest count in the training data times factor (1.1 for 'auto'), rounded up "
            "to a multiple of 4."),
        key("rcut", float, 6.0, "The cut-off radius (Å).", check=lambda v: v > 0, expect="a positive distance (Å)"),
        key("rcut_smth", float, 0.5, "Where the smooth switch-off of 1/r starts (Å); it reaches 0 at rcut."),
        _neuron([10, 20, 40], "Widths of the embedding net's hidden layers (a layer of the same or twice the "
                              "previous width gets a skip connection)."),
        key("axis_neuron", int, 4, "Columns of the embedding matrix G used for the descriptor (M2).",
            alias=["n_axis_neuron"], check=lambda v: v > 0, expect="a positive integer"),
        _activation("Activation function of the embedding net."),
        key("resnet_dt", bool, False, "Whether skip connections carry a trainable timestep."),
        key("type_one_side", bool, False,
            "True: one embedding net per neighbour type; false: one per (centre type, neighbour type) pair."),
        _precision("Precision of the embedding net ('default' is float64)."),
        key("trainable", bool, True, "Whether the embedding nets' weights are trained."),
        _seed("Random seed of the embedding nets' initial weights (none: random)."),
        key("exclude_types", list[list[int]], [],
            "Pairs of type indices that do not see each other, e.g. [[0, 1]]: their environment-matrix rows are "
            "zeroed (they still occupy their neighbour slots).",
            check=lambda v: all(len(p) == 2 and min(p) >= 0 for p in v), expect="a list of [type, type] pairs"),
        key("env_protection", float, 0.0, "Protection against division by zero in the environment matrix.",
            fixed=True),
        key("set_davg_zero", bool, False, "Keep the environment matrix's mean at zero (only its std comes from "
                                          "the data statistics)."),
    ]


def ener_fitting_args() -> list:
    return [
        key("numb_fparam", int, 0, "Values per frame of the frame parameter input (set.*/fparam.npy; given to the "
                                   "ASE calculator, MD and LAMMPS as fparam), normalised by its training-data mean "
                                   "and deviation and appended to every atom's descriptor.",
            check=lambda v: v >= 0, expect="a non-negative integer"),
        key("numb_aparam", int, 0, "Values per atom of the atomic parameter input (set.*/aparam.npy; aparam in the "
                                   "ASE calculator, MD and LAMMPS), normalised like numb_fparam and appended after "
                                   "the frame parameters.", check=lambda v: v >= 0, expect="a non-negative integer"),
        key("default_fparam", [list[float], None], None, "The frame parameter of systems without fparam.npy (and of "
                                                         "evaluations given no fparam); numb_fparam values."),
        key("dim_case_embd", int, 0, "Size of the case embedding (multi-task).", fixed=True),
        _neuron([120, 120, 120], "Widths of the fitting net's hidden layers (a layer of the same width as the "
                                 "previous one gets a skip connection).", alias=["n_neuron"]),
        _activation("Activation function of the fitting net."),
        _precision("Precision of the fitting net ('default' is float64)."),
        key("resnet_dt", bool, True, "Whether skip connections carry a trainable timestep."),
        key("trainable", [list[bool], bool], True,
            "Whether the fitting nets' weights are trained; a list (one entry per layer) trains them only when "
            "all entries are true, as DeePMD-kit's PyTorch backend does."),
        key("rcond", [float, None], None, "rcond of the least-squares fit of the per-type energy bias "
                                          "(numpy.linalg.lstsq)."),
        _seed("Random seed of the fitting nets' initial weights (none: random)."),
        key("atom_ener", list[float | None], [], "Energy of each type's isolated atom.", fixed=True),
        key("layer_name", list[str], UNSET, "Names of layers shared between fitting nets.", fixed=True),
        key("use_aparam_as_mask", bool, False, "Use the atomic parameter as a mask.", fixed=True),
    ]


def model_args() -> object:
    descriptor = key("descriptor", dict, REQUIRED, "The descriptor of the atomic environment.",
                     variants=[choice("descriptor", [key("se_e2_a", dict, REQUIRED, alias=["se_a"],
                                                         doc="DeepPot-SE, two-body embedding with radial and "
                                                             "angular information.", sub=se_e2_a_args())],
                                      default="se_e2_a",
                                      doc="The type of the descriptor (dpmd: may be left out, se_e2_a being the "
                                          "only one; DeePMD-kit requires it).")])
    fitting = key("fitting_net", dict, REQUIRED, "The fitting net.",
                  variants=[choice("fitting net", [key("ener", dict, REQUIRED, "Energy fitting.",
                                                       sub=ener_fitting_args())],
                                   default="ener", doc="The type of the fitting net.")])
    standard = key("standard", dict, REQUIRED, "A descriptor and a fitting net.", sub=[
        descriptor, fitting,
        key("model_branch_alias", list[str], [], "Names of this branch of a multi-task model (no effect here)."),
        key("info", [dict, None], {}, "Metadata stored with the model."),
        key("bridging_method", str, "None", "Short-range bridging to a pair potential.", fixed=True),
        key("bridging_r_inner", float, 0.5, "Inner radius of the bridging (with bridging_method)."),
        key("bridging_r_outer", float, 0.8, "Outer radius of the bridging (with bridging_method)."),
    ])
    return section("model", [
        key("type_map", list[str], REQUIRED, "Element names of the atom types, e.g. [O, H] (dpmd requires it).",
            check=lambda v: len(v) > 0 and all(v), expect="a list of element names, e.g. [O, H]",
            what="a list of element names, e.g. [O, H]"),
        key("data_stat_nbatch", int, 10, "Frames per system used for the data statistics.",
            check=lambda v: v > 0, expect="positive"),
        key("data_stat_protect", float, 1e-2, "Smallest standard deviation of the environment statistics.",
            check=lambda v: v > 0, expect="positive"),
        key("data_bias_nsample", int, 10, "Frames per system used to re-fit the energy bias (--finetune).",
            check=lambda v: v > 0, expect="positive"),
        key("use_srtab", str, UNSET, "A tabulated short-range pair interaction added to the model.", fixed=True),
        key("smin_alpha", float, UNSET, "Softmin parameter of use_srtab.", fixed=True),
        key("sw_rmin", float, UNSET, "Lower switch radius of use_srtab.", fixed=True),
        key("sw_rmax", float, UNSET, "Upper switch radius of use_srtab.", fixed=True),
        key("pair_exclude_types", list, [], "Type pairs that are not neighbours at all.", fixed=True),
        key("atom_exclude_types", list, [], "Types without an atomic contribution.", fixed=True),
        key("preset_out_bias", [dict, None], None, "Preset energy bias per type.", fixed=True),
        key("srtab_add_bias", bool, True, "Whether the energy bias is added to use_srtab's energies."),
        key("type_embedding", dict, UNSET, "A type embedding (TensorFlow backend).", fixed=True),
        key("modifier", dict, UNSET, "A modifier of the model's output.", fixed=True),
        key("compress", [dict, None], UNSET, "dpmd: the tables' layout of a compressed model, written by "
                                             "`dpmd compress` (DeePMD-kit's TensorFlow-only section of this name "
                                             "is not supported)."),
        key("spin", dict, UNSET, "Magnetic spins.", fixed=True),
        key("finetune_head", str, UNSET, "The branch of a multi-task model to fine-tune.", fixed=True),
    ], "The model.", variants=[choice("model", [standard], default="standard", doc="The type of the model.")])


def sel_factor(sel: str) -> float:
    """The factor of an automatic sel: 'auto' (1.1) or 'auto:<factor>'."""
    m = re.fullmatch(r"auto(?::(.+))?", sel)
    try:
        factor = 1.1 if m and m[1] is None else float(m[1]) if m else math.nan
    except ValueError:
        factor = math.nan
    if not (math.isfinite(factor) and factor > 0):
        raise ConfigError(f"'model.descriptor.sel' = {sel!r}: expected a list with one count per type, 'auto' "
                          f"or 'auto:<factor>' (e.g. auto:1.2)")
    return factor


MODEL_ARGS = model_args()


def normalize_model_config(config: dict) -> dict:
    """The model section with every default filled in, validated."""
    config = copy.deepcopy(config)
    if isinstance(config, dict) and config.get("info") is None and "info" in config:
        config["info"] = {}  # configs saved by earlier dpmd versions hold info: null
    cfg = normalize(MODEL_ARGS, config, "model")
    d, f, ntypes = cfg["descriptor"], cfg["fitting_net"], len(cfg["type_map"])
    if not 0 <= d["rcut_smth"] < d["rcut"]:
        raise ConfigError(f"'model.descriptor.rcut_smth' must be in [0, rcut = {d['rcut']}), got {d['rcut_smth']!r}")
    if d["axis_neuron"] > d["neuron"][-1]:
        raise ConfigError(f"'model.descriptor.axis_neuron' = {d['axis_neuron']} exceeds the last embedding width "
                          f"{d['neuron'][-1]}")
    sel = d["sel"]
    if isinstance(sel, str):
        sel_factor(sel)
    elif any(x < 0 for x in sel):
        raise ConfigError(f"'model.descriptor.sel' must list non-negative integers, got {sel!r}")
    elif not any(sel):
        raise ConfigError(f"'model.descriptor.sel' = {sel}: every count is 0, so the model would see no neighbours")
    elif len(sel) != ntypes:
        raise ConfigError(f"model.descriptor.sel has {len(sel)} entries but model.type_map has {ntypes}")
    for pair in d["exclude_types"]:
        if max(pair) >= ntypes:
            raise ConfigError(f"'model.descriptor.exclude_types' = {d['exclude_types']}: type {max(pair)} is not "
                              f"in model.type_map ({ntypes} types)")
    if isinstance(f["trainable"], list) and len(f["trainable"]) != len(f["neuron"]) + 1:
        raise ConfigError(f"'model.fitting_net.trainable' lists {len(f['trainable'])} layers; the fitting net has "
                          f"{len(f['neuron']) + 1} (neuron + the output layer)")
    if f["default_fparam"] is not None and f["numb_fparam"] > 0 and len(f["default_fparam"]) != f["numb_fparam"]:
        raise ConfigError(f"'model.fitting_net.default_fparam' = {f['default_fparam']} has {len(f['default_fparam'])} "
                          f"value(s); numb_fparam is {f['numb_fparam']}")
    cfg["compress"] = normalize_compress(cfg["compress"], ntypes)
    return cfg
