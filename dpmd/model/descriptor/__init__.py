"""Descriptors: an atom's environment (its edges) -> one feature vector per atom, DeePMD-kit's family.

Every descriptor is an nn.Module, TorchScript-compilable, in its own module here, and implements once:

  attributes  ntypes, rcut, rcut_smth, sel (List[int]: neighbours kept per neighbour type, or one total for a
              descriptor with mixed_types), nnei = sum(sel), dim_out, mixed_types (bool: neighbours are not split
              by type, DeePMD-kit's se_atten), compressed (bool), mean / std (statistics buffers)
  forward(edge_vec (E, 3), center (E,), center_type (n_centers,), neighbor_type (E,), backend=None
          [, type_counts=None])
              -> (n_centers, dim_out); edges sorted by centre, center indexes the centres, an edge at or beyond
              rcut counts as an empty neighbour slot (DeePMD-kit's padding); backend: dpmd.ops.resolve's choice;
              type_counts (where layouts has "padded"): the edges are DeePMD's padded rows, centres grouped by
              type in these counts (eager only)
  layouts     class attribute: the edge layouts forward takes, ("edges",) or ("edges", "padded")
  env_rows(edge_vec) -> (E, 4)   the un-normalised environment rows (s, s x/r, s y/r, s z/r), or, for a
              one-column descriptor, env_values(edge_vec) -> (E,) s; with kept_edges(rows, center_type_of_edge,
              neighbor_type) (exclude_types): what dpmd.model.stats takes DeePMD-kit's statistics of, for mean /
              std (a hybrid: `descriptors` and entry_edges(i, edge_vec), each entry's own)
  from_config(d, ntypes)  classmethod: the module of a normalised `model.descriptor` section
  deepmd_state(state, source)  a static or @torch.jit.unused method: DeePMD-kit 3 checkpoint entries below `descriptor.` -> this
              module's state_dict entries (a one-line DpmdError for what does not map)
and the module defines `args()`: the section's keys with DeePMD-kit's defaults, aliases and docs
(dpmd.schema.key), and may define `check_config(d, ntypes)` for checks across keys.

Forces, virials, chunking and backends live in dpmd.model.forces: a descriptor only maps edges to features.
"""

from __future__ import annotations

import importlib

# type -> (module, class, DeePMD-kit's aliases of the type); imported on first use
TYPES = {
    "se_e2_a": ("se_a", "DescriptorSeA", ["se_a"]),
    "se_atten": ("se_atten", "DescriptorSeAtten", ["dpa1"]),
    "se_atten_v2": ("se_atten_v2", "DescriptorSeAttenV2", []),
    "se_e2_r": ("se_r", "DescriptorSeR", ["se_r"]),
    "hybrid": ("hybrid", "DescriptorHybrid", []),
    "se_e3": ("se_t", "DescriptorSeT", ["se_at", "se_a_3be", "se_t"]),
}


def descriptor_module(kind: str):
    return importlib.import_module(f"{__name__}.{TYPES[kind][0]}")


def descriptor_class(kind: str):
    return getattr(descriptor_module(kind), TYPES[kind][1])


def build_descriptor(d: dict, ntypes: int):
    """The descriptor of a normalised `model.descriptor` section."""
    return descriptor_class(d["type"]).from_config(d, ntypes)


def sections(d: dict) -> list[dict]:
    """The descriptor sections of a normalised `model.descriptor`: itself, or a hybrid's entries (recursively)."""
    return [s for sub in d["list"] for s in sections(sub)] if d["type"] == "hybrid" else [d]


def config_rcut(d: dict) -> float:
    """The model's cut-off of a `model.descriptor` section (a hybrid's: the largest of its entries')."""
    return max(float(s["rcut"]) for s in sections(d))


def auto_sel_pending(d: dict) -> list[str]:
    """The `sel` values still to count from data ('auto', 'auto:<factor>')."""
    return [s["sel"] for s in sections(d) if isinstance(s.get("sel"), str)]


def resolve_auto_sel(d: dict, max_counts) -> None:
    """Replace every `sel: auto[:factor]` of a normalised section (in place) by DeePMD-kit's rule: the largest
    count in the data times factor, rounded up to a multiple of 4.  max_counts(rcut, mixed) -> the largest count
    per neighbour type within rcut, or [the largest total] for a mixed-type descriptor (se_atten: one sel)."""
    from dpmd.geometry.neighbor import auto_sel
    from dpmd.model.keys import sel_factor

    for s in sections(d):
        if isinstance(s.get("sel"), str):
            mixed = getattr(descriptor_class(s["type"]), "MIXED_TYPES", False)
            sel = auto_sel(max_counts(float(s["rcut"]), mixed), sel_factor(s["sel"]))
            s["sel"] = sel[0] if mixed else sel


from dpmd.model.descriptor.se_a import DescriptorSeA, smooth_switch  # noqa: E402  (the se_e2_a names of old)

__all__ = ["TYPES", "auto_sel_pending", "build_descriptor", "config_rcut", "descriptor_class", "descriptor_module",
           "resolve_auto_sel", "sections", "DescriptorSeA", "smooth_switch"]
