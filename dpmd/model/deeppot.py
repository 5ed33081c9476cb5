"""DeepPot-SE: descriptor + per-type fitting net, built from DeePMD-kit's `model` config section."""

from __future__ import annotations

import copy
import math
import re
from typing import List, Optional

import torch
from torch import nn

from dpmd.errors import ConfigError
from dpmd.geometry.graph import build_graph
from dpmd.model.compress import check_graph, normalize_compress
from dpmd.model.descriptor import DescriptorSeA
from dpmd.model.fitting import EnergyFitting, group_by_type
from dpmd.model.forces import evaluate

PRECISIONS = {"float64": torch.float64, "float32": torch.float32, "default": torch.float64}

# Accepted keys with their defaults; a key that DeePMD-kit has but whose only supported
# value is its default is listed in _FIXED and refused with another value.
DESCRIPTOR_DEFAULTS = {
    "type": "se_e2_a", "sel": None, "rcut": 6.0, "rcut_smth": 0.5, "neuron": [25, 50, 100], "axis_neuron": 16,
    "resnet_dt": False, "type_one_side": True, "precision": "float64", "seed": None,
    "activation_function": "tanh", "trainable": True, "exclude_types": [], "env_protection": 0.0,
    "set_davg_zero": False,
}
FITTING_DEFAULTS = {
    "type": "ener", "neuron": [240, 240, 240], "resnet_dt": True, "precision": "float64", "seed": None,
    "activation_function": "tanh", "trainable": True, "numb_fparam": 0, "numb_aparam": 0, "rcond": None,
    "atom_ener": [], "dim_case_embd": 0, "use_aparam_as_mask": False, "default_fparam": None,
}
MODEL_DEFAULTS = {
    "type_map": None, "descriptor": None, "fitting_net": None, "data_stat_nbatch": 10, "data_stat_protect": 0.01,
    "data_bias_nsample": 10, "pair_exclude_types": [], "atom_exclude_types": [], "preset_out_bias": None,
    "srtab_add_bias": True, "type": "standard", "info": None, "model_branch_alias": [], "bridging_method": "None",
    "bridging_r_inner": 0.5, "bridging_r_outer": 0.8, "compress": None,
}
_FIXED = {
    "descriptor": {"trainable": True, "exclude_types": [], "env_protection": 0.0, "set_davg_zero": False},
    "fitting_net": {"trainable": True, "numb_fparam": 0, "numb_aparam": 0, "atom_ener": [], "dim_case_embd": 0,
                    "use_aparam_as_mask": False, "default_fparam": None},
    "model": {"pair_exclude_types": [], "atom_exclude_types": [], "preset_out_bias": None, "type": "standard",
              "bridging_method": "None"},
}


SEED_MAX = 2**63 - 1  # torch.Generator.manual_seed takes up to 2**64 - 1; the training seed + 1 must fit too


def _complete(section: dict | None, defaults: dict, where: str) -> dict:
    """Fill defaults; unknown keys and unsupported values are errors naming the key."""
    if section is not None and not isinstance(section, dict):
        raise ConfigError(f"'{where}' must be a mapping of keys, got a {type(section).__name__}: {section!r:.60}")
    section = {k: v for k, v in (section or {}).items() if not k.startswith("_")}  # DeePMD's "_comment"s
    for key in section:
        if key not in defaults:
            raise ConfigError(f"unknown key '{where}.{key}'; valid keys: {', '.join(sorted(defaults))}")
    name = where.split(".")[-1]
    for key, allowed in _FIXED.get(name, {}).items():
        if key in section and section[key] != allowed:
            raise ConfigError(f"'{where}.{key}' = {section[key]!r} is not supported yet (only {allowed!r})")
    out = copy.deepcopy(defaults)
    out.update(section)
    return out


def _check_types(sec: dict, where: str, numbers=(), ints=(), int_lists=(), bools=()) -> None:
    for key in numbers:
        if isinstance(sec[key], bool) or not isinstance(sec[key], (int, float)):
            raise ConfigError(f"'{where}.{key}' must be a number, got {sec[key]!r}")
    for key in ints:
        if isinstance(sec[key], bool) or not isinstance(sec[key], int) or sec[key] <= 0:
            raise ConfigError(f"'{where}.{key}' must be a positive integer, got {sec[key]!r}")
    for key in int_lists:
        v = sec[key]
        if not isinstance(v, list) or not v or not all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in v):
            raise ConfigError(f"'{where}.{key}' must be a list of positive integers, got {v!r}")
    for key in bools:
        if not isinstance(sec[key], bool):
            raise ConfigError(f"'{where}.{key}' must be true or false, got {sec[key]!r}")


def check_seed(value, where: str):
    """A seed torch's generators accept (None: unseeded), else a one-line error naming `where`."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= SEED_MAX):
        raise ConfigError(f"'{where}' must be an integer in [0, 2**63-1], got {value!r}")
    return value


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


def normalize_model_config(config: dict) -> dict:
    """The model section with every default filled in, validated."""
    cfg = _complete(config, MODEL_DEFAULTS, "model")
    cfg["descriptor"] = _complete(cfg["descriptor"], DESCRIPTOR_DEFAULTS, "model.descriptor")
    cfg["fitting_net"] = _complete(cfg["fitting_net"], FITTING_DEFAULTS, "model.fitting_net")
    d, f = cfg["descriptor"], cfg["fitting_net"]
    tm = cfg["type_map"]
    if not isinstance(tm, list) or not tm or not all(isinstance(t, str) and t for t in tm):
        raise ConfigError(f"'model.type_map' must be a list of element names, e.g. [O, H], got {tm!r}")
    if d["type"] not in ("se_e2_a", "se_a"):
        raise ConfigError(f"model.descriptor.type = {d['type']!r} is not supported yet (only se_e2_a)")
    if f["type"] != "ener":
        raise ConfigError(f"model.fitting_net.type = {f['type']!r} is not supported yet (only ener)")
    for where, sec in (("descriptor", d), ("fitting_net", f)):
        if sec["precision"] not in PRECISIONS:
            raise ConfigError(f"model.{where}.precision = {sec['precision']!r}; expected one of {sorted(PRECISIONS)}")
    _check_types(d, "model.descriptor", numbers=("rcut", "rcut_smth"), int_lists=("neuron",),
                 ints=("axis_neuron",), bools=("resnet_dt", "type_one_side"))
    _check_types(f, "model.fitting_net", int_lists=("neuron",), bools=("resnet_dt",))
    if not (math.isfinite(d["rcut"]) and d["rcut"] > 0):
        raise ConfigError(f"'model.descriptor.rcut' must be a positive, finite distance (Å), got {d['rcut']!r}")
    if not 0 <= d["rcut_smth"] < d["rcut"]:
        raise ConfigError(f"'model.descriptor.rcut_smth' must be in [0, rcut = {d['rcut']}), got {d['rcut_smth']!r}")
    for where, sec in (("descriptor", d), ("fitting_net", f)):
        check_seed(sec["seed"], f"model.{where}.seed")
    sel = d["sel"]
    if isinstance(sel, list) and not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in sel):
        raise ConfigError(f"'model.descriptor.sel' must list non-negative integers, got {sel!r}")
    if isinstance(sel, str):
        sel_factor(sel)
    elif not isinstance(sel, list):
        raise ConfigError(f"'model.descriptor.sel' must be a list with one count per type, or 'auto', got {sel!r}")
    elif not any(sel):
        raise ConfigError(f"'model.descriptor.sel' = {sel}: every count is 0, so the model would see no neighbours")
    if isinstance(sel, list) and len(sel) != len(cfg["type_map"]):
        raise ConfigError(f"model.descriptor.sel has {len(sel)} entries but model.type_map has {len(cfg['type_map'])}")
    cfg["compress"] = normalize_compress(cfg["compress"], len(cfg["type_map"]))
    return cfg


class DeepPot(nn.Module):
    """Maps atomic environments to atomic energies; forces and virial come from dpmd.model.forces."""

    def __init__(self, config: dict):
        super().__init__()
        cfg = normalize_model_config(config)
        d, f = cfg["descriptor"], cfg["fitting_net"]
        if isinstance(d["sel"], str):
            raise ConfigError("model.descriptor.sel is 'auto': resolve it from data first (dpmd.train does)")
        self.config = cfg
        self.type_map = list(cfg["type_map"])
        gen = torch.Generator().manual_seed(d["seed"]) if d["seed"] is not None else None
        self.descriptor = DescriptorSeA(
            len(self.type_map), d["sel"], d["rcut"], d["rcut_smth"], d["neuron"], d["axis_neuron"], d["resnet_dt"],
            d["type_one_side"], d["activation_function"], dtype=PRECISIONS[d["precision"]], generator=gen)
        gen = torch.Generator().manual_seed(f["seed"]) if f["seed"] is not None else None
        self.fitting = EnergyFitting(len(self.type_map), self.descriptor.dim_out, f["neuron"], f["resnet_dt"],
                                     f["activation_function"], dtype=PRECISIONS[f["precision"]], generator=gen)
        if cfg["compress"] is not None:  # tabulated embeddings (dpmd.model.compress); the table comes with the weights
            self.descriptor.enable_compression(cfg["compress"], cfg["compress"]["check_frequency"])

    @property
    def rcut(self) -> float:
        return self.descriptor.rcut

    @property
    def sel(self) -> list[int]:
        return self.descriptor.sel

    @property
    def ntypes(self) -> int:
        return len(self.type_map)

    def atomic_energy(self, edge_vec, center, center_type, neighbor_type,
                      type_counts: Optional[List[int]] = None) -> torch.Tensor:
        """Atomic energies (n_centers,) of an edge list (dpmd.model.forces), or, with type_counts, of edges in
        DeePMD's padded layout with the centres grouped by type (DescriptorSeA.forward_padded)."""
        if type_counts is not None:
            desc = self.descriptor.forward_padded(edge_vec, center, center_type, neighbor_type, type_counts)
            return self.fitting(desc.to(self.fitting.energy_bias.dtype), center_type, type_counts)
        center, center_type, position = group_by_type(center, center_type)
        desc = self.descriptor(edge_vec, center, center_type, neighbor_type)
        return self.fitting(desc.to(self.fitting.energy_bias.dtype), center_type).index_select(0, position)

    def forward(self, coord, atype, box=None, neighbors=None, *, atom_virial=False, chunk_atoms=None) -> dict:
        """Energy, atomic energies, forces and virial of one frame (coord (N, 3)) or several (F, N, 3).

        Returns a dict of tensors shaped like the input: energy (F,), atom_energy (F, N),
        force (F, N, 3), virial (F, 9) in DeePMD's row-major order, without the F axis
        for a single frame.
        """
        coord = torch.as_tensor(coord)
        single = coord.dim() == 2
        graph = build_graph(coord, atype, box, self.rcut, neighbors)
        if self.descriptor.compressed:  # an edge beyond the tables: one line naming the atoms
            check_graph(self, graph)
        out = evaluate(self, graph, atom_virial=atom_virial, chunk_atoms=chunk_atoms)
        nf, n = graph["box"].shape[0], graph["natoms"]
        out["atom_energy"] = out["atom_energy"].reshape(nf, n)
        out["force"] = out["force"].reshape(nf, n, 3)
        out["virial"] = out["virial"].reshape(nf, 9)
        if atom_virial:
            out["atom_virial"] = out["atom_virial"].reshape(nf, n, 9)
        return {k: v[0] for k, v in out.items()} if single else out
