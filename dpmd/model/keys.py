"""Keys that several sections of the model input share (dpmd.schema), with DeePMD-kit's defaults and checks."""

from __future__ import annotations

import math
import re

import torch

from dpmd.errors import ConfigError

from dpmd.model.network import ACTIVATIONS, parse_activation
from dpmd.schema import UNSET, key

SEED_MAX = 2**63 - 1  # torch.Generator.manual_seed takes up to 2**64 - 1; the training seed + 1 must fit too
# the `precision` keys ("default": DeePMD-kit's interface precision, float64)
DTYPES = {"default": torch.float64, "float64": torch.float64, "float32": torch.float32}
PRECISIONS = tuple(DTYPES)


def valid_seed(v) -> bool:
    return 0 <= v <= SEED_MAX


def positive_ints(v) -> bool:
    return len(v) > 0 and all(x > 0 for x in v)


def seed_key(doc: str):
    return key("seed", [int, None], UNSET, doc, check=valid_seed, expect="an integer in [0, 2**63-1]")


def known_activation(name: str) -> bool:
    try:
        parse_activation(name)
    except ValueError:
        return False
    return True


def activation_key(doc: str):
    return key("activation_function", str, "tanh", doc, check=known_activation,
               expect=f"one of {', '.join(ACTIVATIONS)} (or silut:<threshold>)")


def precision_key(doc: str):
    return key("precision", str, "default", doc, check=lambda v: v in PRECISIONS,
               expect=f"one of {', '.join(PRECISIONS)}")


def neuron_key(default, doc: str, alias=()):
    return key("neuron", list[int], default, doc, alias=alias, check=positive_ints,
               expect="a non-empty list of positive integers")


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


def check_sel(sel, ntypes: int, where: str = "model.descriptor") -> None:
    """`sel`: 'auto' / 'auto:<factor>', or one non-negative count per type, not all zero."""
    if isinstance(sel, str):
        sel_factor(sel)
    elif any(x < 0 for x in sel):
        raise ConfigError(f"'{where}.sel' must list non-negative integers, got {sel!r}")
    elif not any(sel):
        raise ConfigError(f"'{where}.sel' = {sel}: every count is 0, so the model would see no neighbours")
    elif len(sel) != ntypes:
        raise ConfigError(f"{where}.sel has {len(sel)} entries but model.type_map has {ntypes}")


def check_cutoffs(d: dict, where: str = "model.descriptor") -> None:
    if not 0 <= d["rcut_smth"] < d["rcut"]:
        raise ConfigError(f"'{where}.rcut_smth' must be in [0, rcut = {d['rcut']}), got {d['rcut_smth']!r}")


def check_exclude_types(pairs, ntypes: int, where: str = "model.descriptor") -> None:
    for pair in pairs:
        if max(pair) >= ntypes:
            raise ConfigError(f"'{where}.exclude_types' = {pairs}: type {max(pair)} is not in model.type_map "
                              f"({ntypes} types)")


# ---- keys several descriptors share (DeePMD-kit's argcheck: the same names, defaults and aliases)
def sel_per_type_key():
    return key("sel", [list[int], str], "auto",
               "Neighbours kept per type within rcut: a list with one count per type of type_map, or 'auto' / "
               "'auto:<factor>': the largest count in the training data times factor (1.1 for 'auto'), rounded up "
               "to a multiple of 4.")


def cutoff_keys() -> list:
    return [key("rcut", float, 6.0, "The cut-off radius (Å).", check=lambda v: v > 0, expect="a positive distance (Å)"),
            key("rcut_smth", float, 0.5, "Where the smooth switch-off of 1/r starts (Å); it reaches 0 at rcut.")]


def axis_neuron_key():
    return key("axis_neuron", int, 4, "Columns of the embedding matrix G used for the descriptor (M2).",
               alias=["n_axis_neuron"], check=lambda v: v > 0, expect="a positive integer")


def exclude_types_key(effect: str = "their environment-matrix rows are zeroed"):
    return key("exclude_types", list[list[int]], [],
               f"Pairs of type indices that do not see each other, e.g. [[0, 1]]: {effect} (they still occupy their "
               f"neighbour slots).",
               check=lambda v: all(len(p) == 2 and min(p) >= 0 for p in v), expect="a list of [type, type] pairs")


def env_protection_key():
    return key("env_protection", float, 0.0, "Protection against division by zero in the environment matrix.",
               fixed=True)


def set_davg_zero_key(default: bool = False):
    return key("set_davg_zero", bool, default, "Keep the environment matrix's mean at zero (only its std comes "
                                               "from the data statistics).")


def check_type_split(d: dict, ntypes: int) -> None:
    """The checks across keys of a descriptor with one sel per neighbour type (se_e2_a, se_e2_r, se_e3)."""
    check_cutoffs(d)
    check_sel(d["sel"], ntypes)
    check_exclude_types(d["exclude_types"], ntypes)
