"""DeepPot-SE with a three-body embedding of the angles between pairs of neighbours (`se_e3`).

DeePMD-kit's DescrptSeT (aliases se_at, se_a_3be, se_t), evaluated on an edge list instead of a padded
neighbour matrix:

  environment row of neighbour j of atom i as se_e2_a's, normalised per centre type: R_j = (row - mean) / std;
  a_j = R_j[1:4], its angular part;  for every pair of neighbours (j, k) of atom i:  x_jk = a_j . a_k;
  D_i = sum_{t <= u} 1 / (sel_t sel_u) sum_{j of type t, k of type u} x_jk G_tu(x_jk)      (M = neuron[-1]),
  G_tu one embedding net per unordered pair of neighbour types (DeePMD-kit builds ntypes^2 nets and uses
  those with t <= u; the others never enter its energy, so they are not kept here).

An empty neighbour slot (DeePMD's padding), an edge at or beyond rcut and an excluded pair (exclude_types:
rows zeroed) all have a_j = 0, since the angular mean is zero (DeePMD-kit's statistics, dpmd.model.stats,
set it so; deepmd_state refuses a checkpoint otherwise): x = 0 adds x G(x) = 0.  So only real pairs are
evaluated, with no padding term.  Within a same-type block x is symmetric: the pairs j < k count twice.

Compressed (dpmd.model.compress, as DeePMD-kit's `dp compress`): G_tu(x) is read from a table over x in
[-end, end] (dpmd.model.descriptor.table.EmbeddingTable).  |x_jk| <= |a_j| |a_k|, so checking each edge's
|a_j|^2 against the tables guarantees every pair of the edge is inside them.
"""

from __future__ import annotations

import re
from typing import List, Optional

import torch
from torch import nn

from dpmd.errors import DpmdError
from dpmd.model.descriptor import se_a
from dpmd.model.descriptor.common import check_sizes, excluded_pair_codes, per_type_rows, resolved_sel
from dpmd.model.descriptor.se_a import DescriptorSeA
from dpmd.model.descriptor.table import EmbeddingTable
from dpmd.model.keys import DTYPES, check_type_split
from dpmd.model.network import MLP, child_seed
from dpmd.ops import Backend


def args() -> list:
    """The keys of a `se_e3` section: se_e2_a's (DeePMD-kit's argcheck has the same ones, defaults and
    aliases) without axis_neuron and type_one_side."""
    return [k for k in se_a.args() if k.name not in ("axis_neuron", "type_one_side")]


def check_config(d: dict, ntypes: int) -> None:
    """Checks across the keys of a normalised section."""
    check_type_split(d, ntypes)


class DescriptorSeT(EmbeddingTable, nn.Module):
    # TorchScript constants: dpmd.model.export compiles its compressed-model branches only where compressed is True
    __constants__ = ["compressed", "use_ops", "has_exclusion"]

    layouts = ("edges", "padded")  # what forward takes (type_counts given: DeePMD's padded layout)
    # se_e2_a's environment rows, exclusion rule, statistics and padded slot layout are this descriptor's too
    env_rows = DescriptorSeA.env_rows
    kept_edges = DescriptorSeA.kept_edges
    slot_types = DescriptorSeA.slot_types

    def __init__(self, ntypes: int, sel: List[int], rcut: float, rcut_smth: float, neuron=(24, 48, 96),
                 resnet_dt: bool = False, activation_function: str = "tanh", dtype=torch.float64, seed=None,
                 exclude_types=()):
        super().__init__()
        check_sizes(ntypes, sel, rcut, rcut_smth)
        self.ntypes, self.sel, self.rcut, self.rcut_smth = ntypes, list(sel), float(rcut), float(rcut_smth)
        self.nnei = sum(sel)
        self.dim_out = self.width = int(neuron[-1])
        self.mixed_types = False
        self._init_table(ntypes)  # model compression (EmbeddingTable)
        self.use_ops = False  # set on the copy that dpmd.model.export scripts with the kernel library loaded
        # net i serves the neighbour-type pair (pair_t[i], pair_u[i]), t <= u, in DeePMD-kit's order (its net
        # index t + u * ntypes ascending); DeePMD-kit seeds the net of (t, u) with index t * ntypes + u
        pairs = [(t, u) for u in range(ntypes) for t in range(u + 1)]
        self.pair_t, self.pair_u = [p[0] for p in pairs], [p[1] for p in pairs]
        self.embeddings = nn.ModuleList(
            MLP(1, list(neuron), activation=activation_function, resnet_dt=resnet_dt, dtype=dtype,
                seed=child_seed(seed, t * ntypes + u))
            for t, u in pairs
        )
        self.register_buffer("mean", torch.zeros(ntypes, 4, dtype=dtype))
        self.register_buffer("std", torch.ones(ntypes, 4, dtype=dtype))
        self.excluded_pairs = excluded_pair_codes(ntypes, exclude_types)
        self.has_exclusion = len(self.excluded_pairs) > 1

    @classmethod
    def from_config(cls, d: dict, ntypes: int) -> "DescriptorSeT":
        out = cls(ntypes, resolved_sel(d), d["rcut"], d["rcut_smth"], d["neuron"], d["resnet_dt"], d["activation_function"],
                  dtype=DTYPES[d["precision"]], seed=d["seed"], exclude_types=d["exclude_types"])
        out.embeddings.requires_grad_(d["trainable"])
        return out

    @staticmethod
    def deepmd_state(state: dict, source: str) -> dict:
        """DeePMD-kit's `seat.*` entries as ours: the nets of type pairs t <= u, and the statistics (one row
        per neighbour slot there, equal per type, with a zero angular mean)."""
        if "seat.mean" not in state:
            raise DpmdError(f"{source}: no descriptor.seat.mean: not a DeePMD-kit se_e3 descriptor")
        nt = state["seat.mean"].shape[0]
        ours = {}
        for name, value in state.items():
            if (n := re.fullmatch(r"seat\.filter_layers\.networks\.(\d+)\.layers\.(\d+)\.(\w+)", name)):
                t, u = int(n[1]) % nt, int(n[1]) // nt
                if t <= u:  # DeePMD-kit's net t + u * ntypes; ours are numbered u (u + 1) / 2 + t
                    ours[f"embeddings.{u * (u + 1) // 2 + t}.layers.{n[2]}.{n[3]}"] = value
            elif name in ("seat.mean", "seat.stddev"):
                rows = per_type_rows(name, value, source)
                if name == "seat.mean" and bool(rows[:, 1:].ne(0).any()):
                    raise DpmdError(f"{source}: descriptor.seat.mean has a non-zero angular part; not supported "
                                    f"(DeePMD-kit's statistics give zero)")
                ours["mean" if name.endswith("mean") else "std"] = rows
            elif re.fullmatch(r"seat\.compress_(info|data)\.\d+", name) and value.numel() > 0:
                raise DpmdError(f"{source}: a compressed se_e3 descriptor; not supported (import the model "
                                f"before `dp compress`)")
        return ours

    def edge_table_input(self, edge_vec: torch.Tensor, center_type_of_edge: torch.Tensor) -> torch.Tensor:
        """|a_j|^2 (E,) of each edge: it bounds |x| of every pair the edge is in."""
        ct = center_type_of_edge
        a = ((self.env_rows(edge_vec) - self.mean.index_select(0, ct)) / self.std.index_select(0, ct))[:, 1:]
        return (a * a).sum(1)

    def forward(self, edge_vec, center, center_type, neighbor_type, backend: Optional[Backend] = None,
                type_counts: Optional[List[int]] = None):
        """Descriptors (n_centers, M).  edge_vec (E, 3) vectors from centre to neighbour, sorted by centre;
        center (E,) index in [0, n_centers); center_type (n_centers,); neighbor_type (E,).  backend: which
        implementation runs (dpmd.ops.resolve; None: as the caller's context says).  type_counts: None for an
        edge list; given, the edges are in DeePMD's padded layout with the centres grouped by type in these
        counts (_forward_padded)."""
        if type_counts is not None and not torch.jit.is_scripting():  # (scripted: read as the edge list it also is)
            return self._forward_padded(edge_vec, center, center_type, neighbor_type, type_counts, backend)
        if not torch.jit.is_scripting():
            backend = self.resolve_backend(backend, edge_vec)
        ncent, nt = center_type.shape[0], self.ntypes
        if ncent == 0:
            return self.mean.new_zeros([0, self.dim_out])
        ct_edge = center_type.index_select(0, center)
        rows = self.env_rows(edge_vec.to(self.mean.dtype), backend)
        if self.has_exclusion:  # an excluded edge adds nothing: leave it out
            kept = torch.nonzero(self.kept_edges(rows, ct_edge, neighbor_type)).squeeze(1)
            rows, ct_edge = rows.index_select(0, kept), ct_edge.index_select(0, kept)
            center, neighbor_type = center.index_select(0, kept), neighbor_type.index_select(0, kept)
            edge_vec = edge_vec.index_select(0, kept)
        a = ((rows - self.mean.index_select(0, ct_edge)) / self.std.index_select(0, ct_edge))[:, 1:]
        self._check_table((a * a).sum(1), edge_vec, center, center_type, neighbor_type)
        # edges grouped by (centre, neighbour type): group centre * nt + t holds count[c, t] edges from start[c, t]
        group = center * nt + neighbor_type
        a = a.index_select(0, torch.sort(group, stable=True)[1])
        count = torch.bincount(group, minlength=ncent * nt)
        start = (torch.cumsum(count, 0) - count).view(ncent, nt)
        count = count.view(ncent, nt)
        # pairs per centre and net: n_t (n_t + 1) / 2 (j <= k) for t = u, n_t n_u otherwise; one host read
        per_pair: List[torch.Tensor] = []
        for i in range(len(self.pair_t)):
            t, u = self.pair_t[i], self.pair_u[i]
            per_pair.append(count[:, t] * (count[:, t] + 1) // 2 if t == u else count[:, t] * count[:, u])
        per = torch.stack(per_pair)
        sizes: List[int] = torch.cat([per.sum(1), count.max(0)[0]]).tolist()
        centers = torch.arange(ncent, device=a.device)
        out = a.new_zeros([ncent, self.dim_out])
        for i in range(len(self.embeddings)):
            t, u, total = self.pair_t[i], self.pair_u[i], sizes[i]
            if total > 0:
                c = torch.repeat_interleave(centers, per[i], output_size=total)
                q = torch.arange(total, device=a.device) - (torch.cumsum(per[i], 0) - per[i]).index_select(0, c)
                if t == u:  # the triangle j <= k in column order: a centre's pairs are the first n (n + 1) / 2
                    n = sizes[len(per_pair) + t]
                    col = torch.repeat_interleave(torch.arange(n, device=a.device),
                                                  torch.arange(1, n + 1, device=a.device))
                    row = torch.arange(col.shape[0], device=a.device) - col * (col + 1) // 2
                    j, k = row.index_select(0, q), col.index_select(0, q)
                    weight = 2.0 - (j == k).to(a.dtype)
                else:
                    nu = count[:, u].index_select(0, c)
                    j, k = torch.div(q, nu, rounding_mode="floor"), torch.remainder(q, nu)
                    weight = torch.ones_like(q, dtype=a.dtype)
                e1 = start[:, t].index_select(0, c) + j
                e2 = start[:, u].index_select(0, c) + k
                x = (a.index_select(0, e1) * a.index_select(0, e2)).sum(1)
                scaled = x * weight * (1.0 / (self.sel[t] * self.sel[u]))
                out = self.embedding_sum(out, i, x, scaled, c, backend)
        return out

    @torch.jit.unused
    def _forward_padded(self, edge_vec, center, center_type, neighbor_type, type_counts: List[int],
                        backend: Optional[Backend] = None):
        """forward() for edges in DeePMD's own padded layout (the MD engine's on a GPU): every centre has nnei
        = sum(sel) edges, centre-major, in blocks of sel[t] slots for neighbour type t; an empty slot holds a
        vector beyond rcut.  DeePMD-kit's dense blocks (every slot pair), so nothing is read back from the
        device.  (Eager only: the frozen model takes edge lists.)"""
        backend = self.resolve_backend(backend, edge_vec)
        ncent, nnei = center_type.shape[0], self.nnei
        raw = self.env_rows(edge_vec.to(self.mean.dtype), backend)
        rows = raw.view(ncent, nnei, 4)
        rows = (rows - self.mean.index_select(0, center_type).unsqueeze(1)) / self.std.index_select(0, center_type).unsqueeze(1)
        a = rows[:, :, 1:]
        if self.has_exclusion:
            kept = self.kept_edges(raw, center_type.index_select(0, center), neighbor_type)
            a = a * kept.view(ncent, nnei, 1).to(a.dtype)
        self._check_table((a * a).sum(-1).reshape(-1), edge_vec, center, center_type, neighbor_type, True)
        sec = [sum(self.sel[:t]) for t in range(self.ntypes + 1)]
        out = a.new_zeros([ncent, self.dim_out])
        for i in range(len(self.embeddings)):
            t, u = self.pair_t[i], self.pair_u[i]
            if self.sel[t] * self.sel[u] == 0:
                continue
            x = torch.bmm(a[:, sec[t]:sec[t + 1]], a[:, sec[u]:sec[u + 1]].transpose(1, 2)).reshape(ncent, -1)
            g = self.embed(i, x.reshape(-1), backend).view(ncent, x.shape[1], self.dim_out)
            out = out + torch.bmm(x.unsqueeze(1), g)[:, 0] / (self.sel[t] * self.sel[u])
        return out
