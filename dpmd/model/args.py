"""The `model` section of a training input: DeePMD-kit 3's keys, defaults and aliases (deepmd/utils/argcheck.py),
for the se_e2_a descriptor and the energy fitting net, checked with dpmd.schema.

Leaving a key out builds what DeePMD-kit builds.  A DeePMD-kit key dpmd does not implement is accepted at its
default only (`fixed`); another descriptor, fitting or model type is refused by name.
"""

from __future__ import annotations

import copy

from dpmd.errors import ConfigError
from dpmd.model.compress import normalize_compress
from dpmd.model.descriptor import TYPES, descriptor_module, sections
from dpmd.model.descriptor.econf import check_elements
from dpmd.model.keys import activation_key, neuron_key, precision_key, seed_key, sel_factor, valid_seed  # noqa: F401 (re-exported)
from dpmd.schema import REQUIRED, UNSET, choice, key, normalize, section

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
        neuron_key([120, 120, 120], "Widths of the fitting net's hidden layers (a layer of the same width as the "
                                 "previous one gets a skip connection).", alias=["n_neuron"]),
        activation_key("Activation function of the fitting net."),
        precision_key("Precision of the fitting net ('default' is float64)."),
        key("resnet_dt", bool, True, "Whether skip connections carry a trainable timestep."),
        key("trainable", [list[bool], bool], True,
            "Whether the fitting nets' weights are trained; a list (one entry per layer) trains them only when "
            "all entries are true, as DeePMD-kit's PyTorch backend does."),
        key("rcond", [float, None], None, "rcond of the least-squares fit of the per-type energy bias "
                                          "(numpy.linalg.lstsq)."),
        seed_key("Random seed of the fitting nets' initial weights (none: random)."),
        key("atom_ener", list[float | None], [], "Energy of each type's isolated atom.", fixed=True),
        key("layer_name", list[str], UNSET, "Names of layers shared between fitting nets.", fixed=True),
        key("use_aparam_as_mask", bool, False, "Use the atomic parameter as a mask.", fixed=True),
    ]


def model_args() -> object:
    kinds = [key(kind, dict, REQUIRED, alias=aliases, doc=descriptor_module(kind).__doc__.split("\n\n")[0],
                 sub=descriptor_module(kind).args()) for kind, (_, _, aliases) in TYPES.items()]
    descriptor = key("descriptor", dict, REQUIRED, "The descriptor of the atomic environment.",
                     variants=[choice("descriptor", kinds, default="se_e2_a",
                                      doc="The type of the descriptor (dpmd: may be left out for se_e2_a; DeePMD-kit "
                                          "requires it).")])
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
        key("data_stat_nbatch", int, 10, "Batches per system (the first of a shuffle, as DeePMD-kit reads them) "
            "used for the data statistics.",
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


MODEL_ARGS = model_args()


def normalize_model_config(config: dict) -> dict:
    """The model section with every default filled in, validated."""
    config = copy.deepcopy(config)
    if isinstance(config, dict) and config.get("info") is None and "info" in config:
        config["info"] = {}  # configs saved by earlier dpmd versions hold info: null
    cfg = normalize(MODEL_ARGS, config, "model")
    d, f, ntypes = cfg["descriptor"], cfg["fitting_net"], len(cfg["type_map"])
    descriptor_module(d["type"]).check_config(d, ntypes)
    if any(s.get("use_econf_tebd") for s in sections(d)):  # the elements' configurations: type_map names elements
        check_elements(cfg["type_map"])
    if isinstance(f["trainable"], list) and len(f["trainable"]) != len(f["neuron"]) + 1:
        raise ConfigError(f"'model.fitting_net.trainable' lists {len(f['trainable'])} layers; the fitting net has "
                          f"{len(f['neuron']) + 1} (neuron + the output layer)")
    if f["default_fparam"] is not None and f["numb_fparam"] > 0 and len(f["default_fparam"]) != f["numb_fparam"]:
        raise ConfigError(f"'model.fitting_net.default_fparam' = {f['default_fparam']} has {len(f['default_fparam'])} "
                          f"value(s); numb_fparam is {f['numb_fparam']}")
    cfg["compress"] = normalize_compress(cfg["compress"], ntypes)
    return cfg


def set_precision(config: dict, precision: str) -> None:
    """Every `precision` key of a model section (descriptor, a hybrid's descriptors, fitting net) set to
    `precision`, in place (mixed precision training keeps the nets' weights in its output_prec)."""
    def visit(node):
        if isinstance(node, dict):
            if "precision" in node:
                node["precision"] = precision
            for value in node.values():
                visit(value)
        elif isinstance(node, list):
            for value in node:
                visit(value)

    visit(config.get("descriptor"))
    visit(config.get("fitting_net"))
