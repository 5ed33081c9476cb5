"""A list of descriptors whose outputs are concatenated (`hybrid`): DeePMD-kit's DescrptHybrid.

    {"type": "hybrid", "list": [{"type": "se_e2_a", ...}, {"type": "se_e2_r", ...}]}

Each entry is a full descriptor section (any registered type but hybrid), built with build_descriptor; the
output is the entries' outputs side by side, in list order.  The model's rcut is the largest of the entries';
each entry sees only the edges within its own rcut (a filter of the edge list, which keeps its centre-sorted
order), computes its own statistics and keeps its own sel.

sel: DeePMD-kit's, the largest count of each neighbour type over the entries (one total when an entry mixes
types).  Counts within the model's rcut at most that sel are necessary, not sufficient: each entry's own sel
must hold within its own rcut, which check_sel checks (and, for the padded layout, its builder:
dpmd.model.forces.sel_limits).

Padded layout (the MD engine's sync-free path, where every entry takes it): the rows carry the hybrid's sel
within the model's rcut; each entry gets its own padded layout of them, re-slotted to its sel within its rcut
(dpmd.geometry.neighbor.sel_slots: fixed shapes, nothing read back from the device).

DeePMD-kit hands each entry the sel[t] nearest type-t neighbours within the largest rcut; a neighbour beyond the
entry's own rcut then has a zero environment row, the same as an empty slot, except for an excluded pair of
exclude_types: that one fills the slot as an excluded neighbour (see _excluded_beyond, which reproduces it).  So
with exclude_types in an entry whose rcut is smaller than the model's, such a pair changes the energy when it
crosses the model's rcut, as in DeePMD-kit (an excluded pair crossing a descriptor's own rcut does so too).

Compressed (dpmd.model.compress): every entry tabulated with its own layout (the `compress` section's `list`);
an edge is outside the model's tables when it is outside an entry's within that entry's rcut.
"""

from __future__ import annotations

import re
from typing import List, Optional

import torch
from torch import nn

from dpmd.errors import ConfigError, DpmdError
from dpmd.geometry.graph import edge_vectors
from dpmd.geometry.neighbor import check_sel, first_over_sel, sel_group_name, sel_overflow_message, sel_slots
from dpmd.model.descriptor import build_descriptor, descriptor_module
from dpmd.model.descriptor.table import max_rmin, outside_table_message
from dpmd.ops import Backend
from dpmd.schema import REQUIRED, key, normalize


def args() -> list:
    """The keys of a `hybrid` section (DeePMD-kit's argcheck descrpt_hybrid_args)."""
    return [key("list", list[dict], REQUIRED,
                "The descriptors, each a full descriptor section with its own `type` (any but hybrid); their "
                "outputs are concatenated in this order.", check=lambda v: len(v) > 0,
                expect="a non-empty list of descriptor sections")]


def _descriptor_schema():
    """The schema of one descriptor section: model.descriptor's own (imported here: dpmd.model.args builds its
    schema from this module's args())."""
    from dpmd.model.args import MODEL_ARGS

    return MODEL_ARGS.sub_variants["type"].choice_dict["standard"].sub_fields["descriptor"]


def check_config(d: dict, ntypes: int) -> None:
    """Normalises each entry of `list` in place (defaults, aliases; the schema of `list` takes the sections as
    they come) and checks it as its own type does; messages name the entry (model.descriptor.list[i])."""
    schema, entries = _descriptor_schema(), []
    for i, sub in enumerate(d["list"]):
        where = f"model.descriptor.list[{i}]"
        entry = normalize(schema, sub, where)
        if entry["type"] == "hybrid":
            raise ConfigError(f"'{where}.type' is hybrid: the entries of a hybrid descriptor cannot be hybrids")
        try:
            descriptor_module(entry["type"]).check_config(entry, ntypes)
        except ConfigError as err:
            raise ConfigError(str(err).replace("model.descriptor", where)) from None
        entries.append(entry)
    d["list"] = entries


class DescriptorHybrid(nn.Module):
    __constants__ = ["compressed"]  # a TorchScript constant: code for compressed models is not compiled
    __jit_unused_properties__ = ["layouts"]

    def __init__(self, descriptors: List[nn.Module]):
        super().__init__()
        if not descriptors:
            raise ValueError("a hybrid descriptor needs at least one descriptor")
        self.descriptors = nn.ModuleList(descriptors)
        self.ntypes = descriptors[0].ntypes
        self.rcut = max(float(d.rcut) for d in descriptors)
        self.rcut_smth = min(float(d.rcut_smth) for d in descriptors)  # (DeePMD-kit's get_rcut_smth)
        self.entry_rcut: List[float] = [float(d.rcut) for d in descriptors]
        self.entry_mixed: List[bool] = [bool(d.mixed_types) for d in descriptors]
        self.entry_sel: List[List[int]] = [list(d.sel) for d in descriptors]
        # each entry's excluded (centre type * ntypes + neighbour type) codes, [-1] without exclude_types
        self.entry_excluded: List[List[int]] = [list(getattr(d, "excluded_pairs", [-1])) for d in descriptors]
        self.mixed_types = any(self.entry_mixed)
        if self.mixed_types:
            self.sel: List[int] = [max(sum(d.sel) for d in descriptors)]
        else:
            self.sel = [max(s) for s in zip(*(d.sel for d in descriptors))]
        self.nnei = sum(self.sel)
        self.dim_out = sum(int(d.dim_out) for d in descriptors)
        self.compressed = False
        self.table_rmin = [0.0] * self.ntypes  # compressed: per centre type, the shortest distance every entry covers

    @property
    def layouts(self) -> tuple:
        """What forward takes (dpmd.model.forces.layouts): edge lists, and DeePMD's padded layout where every
        entry takes it."""
        return ("edges", "padded") if all("padded" in d.layouts for d in self.descriptors) else ("edges",)

    @classmethod
    def from_config(cls, d: dict, ntypes: int) -> "DescriptorHybrid":
        return cls([build_descriptor(sub, ntypes) for sub in d["list"]])

    @torch.jit.unused
    def deepmd_state(self, state: dict, source: str) -> dict:
        """DeePMD-kit's `descrpt_list.<i>.*` entries, each mapped by its own descriptor's deepmd_state."""
        parts: List[dict] = [{} for _ in self.descriptors]
        for name, value in state.items():
            m = re.fullmatch(r"descrpt_list\.(\d+)\.(.+)", name)
            if m is None or int(m[1]) >= len(parts):
                raise DpmdError(f"{source}: descriptor.{name} is not an entry of this hybrid descriptor "
                                f"({len(parts)} descriptors)")
            parts[int(m[1])][m[2]] = value
        ours = {}
        for i, (sub, part) in enumerate(zip(self.descriptors, parts)):
            ours.update({f"descriptors.{i}.{k}": v for k, v in sub.deepmd_state(part, source).items()})
        return ours

    def enable_compression(self, spec: dict, check_frequency: int = -1) -> None:
        """Tabulate every entry with its layout of spec["list"] (dpmd.model.compress)."""
        if "list" not in spec:
            raise ConfigError("'model.compress' of a hybrid descriptor needs `list`, one table layout per descriptor")
        if len(spec["list"]) != len(self.descriptors):
            raise ConfigError(f"'model.compress.list' has {len(spec['list'])} layouts for {len(self.descriptors)} "
                              f"descriptors")
        for i, (sub, layout) in enumerate(zip(self.descriptors, spec["list"])):
            if not hasattr(sub, "enable_compression"):
                raise ConfigError(f"'model.compress.list[{i}]': descriptor.list[{i}] has no tabulated form")
            try:
                sub.enable_compression(layout, check_frequency)
            except DpmdError as err:  # an entry that refuses its tables (e.g. se_atten with attention): name it
                raise type(err)(f"compress: descriptor.list[{i}]: {str(err).removeprefix('compress: ')}") from None
        self.compressed = True
        self.table_rmin = max_rmin(list(self.descriptors), self.ntypes)

    def edge_outside_table(self, edge_vec: torch.Tensor, center_type_of_edge: torch.Tensor) -> int:
        """Index of the first edge outside an entry's tables (within the entry's rcut), -1 if none."""
        for i, sub in enumerate(self.descriptors):
            keep = self.entry_edges(i, edge_vec)
            k = sub.edge_outside_table(edge_vec.index_select(0, keep), center_type_of_edge.index_select(0, keep))
            if k >= 0:
                return int(keep[k])
        return -1

    def table_message(self, where: str, r: float, center_type: int) -> str:
        """One line for an edge outside the tables (`where` names the atoms)."""
        return outside_table_message(where, r, self.table_rmin[center_type], center_type)

    def entry_edges(self, i: int, edge_vec: torch.Tensor) -> torch.Tensor:
        """Indices (ascending) of the edges within entry i's rcut."""
        rc = self.entry_rcut[i]
        return torch.nonzero((edge_vec * edge_vec).sum(-1) < rc * rc).squeeze(1)

    def forward(self, edge_vec, center, center_type, neighbor_type, backend: Optional[Backend] = None,
                type_counts: Optional[List[int]] = None):
        """The descriptors' outputs side by side (n_centers, dim_out); each gets the edges within its rcut.
        type_counts: None for an edge list; given, the edges are in DeePMD's padded layout (_forward_padded)."""
        if type_counts is not None and not torch.jit.is_scripting():  # (scripted: read as the edge list it also is)
            return self._forward_padded(edge_vec, center_type, neighbor_type, type_counts, backend)
        outs: List[torch.Tensor] = []
        for i, sub in enumerate(self.descriptors):
            keep = self.entry_edges(i, edge_vec)
            vec, c, nt = edge_vec.index_select(0, keep), center.index_select(0, keep), neighbor_type.index_select(0, keep)
            if len(self.entry_excluded[i]) > 1 and self.entry_rcut[i] < self.rcut and not self.entry_mixed[i]:
                vec, c, nt = self._excluded_beyond(i, edge_vec, center, center_type, neighbor_type, vec, c, nt)
            outs.append(sub(vec, c, center_type, nt, backend))
        return torch.cat(outs, 1)

    @torch.jit.unused
    def _forward_padded(self, edge_vec, center_type, neighbor_type, type_counts: List[int],
                        backend: Optional[Backend]):
        """forward() for DeePMD's padded layout of the hybrid's own sel (forces.evaluate, padded: the MD
        engine's sync-free path): each entry gets its own padded layout of these rows, re-slotted by sel_slots to
        its sel within its rcut (fixed shapes: nothing read back from the device; a non-mixed entry's slots take
        their block's type, as its own layout has them).  A count beyond an entry's sel is the layout builder's to
        flag (dpmd.model.forces.sel_limits), as any count beyond sel."""
        ncent, device = center_type.shape[0], edge_vec.device
        vec = edge_vec.view(ncent, self.nnei, 3)
        d2 = (vec * vec).sum(-1).detach()
        types = neighbor_type.view(ncent, self.nnei)
        outs: List[torch.Tensor] = []
        for i, sub in enumerate(self.descriptors):
            rc, sel = self.entry_rcut[i], self.entry_sel[i]
            if sel == self.sel and rc >= self.rcut:  # the hybrid's own layout
                vec_i, types_i = edge_vec, neighbor_type
            elif len(self.entry_excluded[i]) > 1 and rc < self.rcut and not self.entry_mixed[i]:
                vec_i, types_i = self._excluded_beyond_padded(i, vec, d2, types, center_type)
            else:
                vec_i, types_i, _ = sel_slots(vec, types, center_type, d2 < rc * rc, types, sel, rc,
                                              self.entry_mixed[i])
            if not self.entry_mixed[i]:
                types_i = sub.slot_types(device).repeat(ncent)
            center_i = torch.arange(ncent, device=device).repeat_interleave(sum(sel))
            outs.append(sub(vec_i, center_i, center_type, types_i, backend, type_counts))
        return torch.cat(outs, 1)

    @torch.jit.unused
    def _excluded_beyond_padded(self, i: int, vec, d2, types, center_type):
        """Entry i's padded layout (edge_vec, neighbour types) from the hybrid's rows vec (R, K, 3), d2, types
        (R, K), with _excluded_beyond's excluded pairs between the entry's rcut and the model's in the free slots:
        the candidates put in order (stable: the real neighbours first in slot order, then those pairs nearest
        first), which sel_slots then fills; such a pair holds the stand-in vector (it adds nothing but its slot)."""
        rc, ntypes = self.entry_rcut[i], self.ntypes
        inside = d2 < rc * rc
        pair = center_type.unsqueeze(1) * ntypes + types
        excluded = torch.zeros_like(inside)
        for code in self.entry_excluded[i]:
            excluded = excluded | (pair == code)
        far = excluded & ~inside & (d2 < self.rcut * self.rcut)
        key = torch.where(inside, torch.zeros_like(d2),
                          torch.where(far, 1.0 + d2 / (self.rcut * self.rcut), torch.full_like(d2, 3.0)))
        order = torch.argsort(key, dim=1, stable=True)
        vec = torch.gather(vec, 1, order.unsqueeze(-1).expand_as(vec))
        types, inside, far = (torch.gather(x, 1, order) for x in (types, inside, far))
        stand_in = torch.zeros_like(vec)
        stand_in[..., 0] = 0.5 * rc
        vec = torch.where(far.unsqueeze(-1), stand_in, vec)
        vec_i, types_i, _ = sel_slots(vec, types, center_type, inside | far, types, self.entry_sel[i], rc)
        return vec_i, types_i

    @torch.jit.unused
    def slot_types(self, device) -> torch.Tensor:
        """(nnei,) the neighbour type of each slot of the padded layout of a hybrid without mixed-type entries."""
        return torch.cat([torch.full([s], t, dtype=torch.long, device=device) for t, s in enumerate(self.sel)])

    def _excluded_beyond(self, i: int, edge_vec, center, center_type, neighbor_type, vec, c, nt):
        """Entry i's edges (vec, c, nt) plus DeePMD-kit's excluded neighbours beyond its rcut: DeePMD-kit hands the
        entry the sel[t] nearest type-t neighbours within the model's rcut, so an excluded pair between the two
        cut-offs fills one of the entry's free slots as an excluded neighbour, not as an empty slot.  They are
        added with a stand-in vector within the entry's rcut (what an excluded neighbour adds does not depend on
        its vector), in centre order."""
        ntypes, rc, ncent = self.ntypes, self.entry_rcut[i], center_type.shape[0]
        r2 = (edge_vec * edge_vec).sum(-1)
        pair = center_type.index_select(0, center) * ntypes + neighbor_type
        excluded = torch.zeros_like(pair, dtype=torch.bool)
        for code in self.entry_excluded[i]:
            excluded = excluded | (pair == code)
        far = torch.nonzero(excluded & (r2 >= rc * rc) & (r2 < self.rcut * self.rcut)).squeeze(1)
        if far.shape[0] == 0:
            return vec, c, nt
        # nearest first within each (centre, neighbour type) group; each takes its group's free slots
        group = center.index_select(0, far) * ntypes + neighbor_type.index_select(0, far)
        order = torch.argsort(r2.index_select(0, far), stable=True)
        order = order.index_select(0, torch.argsort(group.index_select(0, order), stable=True))
        far, group = far.index_select(0, order), group.index_select(0, order)
        size = torch.bincount(group, minlength=ncent * ntypes)
        rank = torch.arange(far.shape[0], device=far.device) - (torch.cumsum(size, 0) - size).index_select(0, group)
        free = (torch.tensor(self.entry_sel[i], device=far.device).index_select(0, group % ntypes)
                - torch.bincount(c * ntypes + nt, minlength=ncent * ntypes).index_select(0, group))
        far = far.index_select(0, torch.nonzero(rank < free).squeeze(1))
        stand_in = edge_vec.new_zeros([far.shape[0], 3])
        stand_in[:, 0] = 0.5 * rc
        c = torch.cat([c, center.index_select(0, far)])
        order = torch.argsort(c, stable=True)
        return (torch.cat([vec, stand_in]).index_select(0, order), c.index_select(0, order),
                torch.cat([nt, neighbor_type.index_select(0, far)]).index_select(0, order))

    def entry_counts(self, i: int, edge_vec, center, neighbor_type, ncenters: int) -> torch.Tensor:
        """(ncenters, ntypes) neighbours of each type within entry i's rcut."""
        keep = self.entry_edges(i, edge_vec)
        key = center.index_select(0, keep) * self.ntypes + neighbor_type.index_select(0, keep)
        return torch.bincount(key, minlength=ncenters * self.ntypes).reshape(ncenters, self.ntypes)

    @torch.jit.export
    def sel_overflow(self, edge_vec, center, neighbor_type, ncenters: int) -> List[int]:
        """[entry, centre, sel group, its count, centres over] of the first entry with a centre over its own sel
        within its own rcut, or [] (TorchScript-compilable, for a frozen model's own check; overflow_message)."""
        for i in range(len(self.entry_sel)):
            found = first_over_sel(self.entry_counts(i, edge_vec, center, neighbor_type, ncenters), self.entry_sel[i])
            if len(found) > 0:
                return [i] + found
        return []

    @torch.jit.export
    def overflow_message(self, found: List[int], atom: str, atom_type: str, type_map: List[str]) -> str:
        """The one sel-overflow text (dpmd.geometry.neighbor) of a finding of sel_overflow, the atom named as the
        caller numbers atoms."""
        i, t = found[0], found[2]
        sel = self.entry_sel[i]
        return sel_overflow_message(atom, atom_type, found[3], sel_group_name(t, sel, type_map), sel[t], found[4], i,
                                    self.entry_rcut[i])

    @torch.jit.unused
    def check_sel(self, graph: dict, type_map: List[str]) -> None:
        """Each entry's neighbours within its own rcut against its own sel, for a graph of dpmd.geometry.graph
        built with the model's rcut: a NeighborOverflowError naming the atom (and its frame) and the entry."""
        atype, vec = graph["atype"], edge_vectors(graph)
        neighbor_type = atype.index_select(0, graph["neighbor"])
        for i in range(len(self.entry_sel)):
            check_sel(self.entry_counts(i, vec, graph["center"], neighbor_type, atype.numel()), atype,
                      self.entry_sel[i], type_map, graph.get("natoms", 0), i, self.entry_rcut[i])
