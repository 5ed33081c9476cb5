"""DeepPot-SE descriptor, two-body embedding with full radial and angular information (`se_e2_a`).

DeePMD-kit's definition, evaluated on an edge list instead of a padded neighbour matrix:

  environment row of neighbour j of atom i:  (s, s x/r, s y/r, s z/r)  with s = sw(r)/r,
      sw the quintic switch from 1 at rcut_smth to 0 at rcut;
  normalised per centre type:                R = (row - mean[t_i]) / std[t_i];
  embedding of every neighbour:              G = net_{t_j}(R[:, 0])  (net_{t_i,t_j} if not type_one_side);
  T_i = (1/nnei) sum_j R_j^T G_j   (4 x M),  D_i = T_i^T T_i[:, :axis_neuron]   (M x axis_neuron).

DeePMD pads every neighbour list to `sel` slots; an empty slot has a zero row, which
normalisation turns into the constant -mean/std and so still feeds T_i.  Padded slots are
kept out of the arithmetic here: their total contribution is (sel - count) times one
embedding evaluation per (centre type, net), which reproduces DeePMD-kit's numbers exactly.

exclude_types (DeePMD-kit's): the rows of an excluded (centre type, neighbour type) pair are zeroed after
normalisation, so such a neighbour adds nothing to T yet still fills its slot (not a padding term).

The sums sum_j R_j^T G_j of each net are dpmd.model.descriptor.table.EmbeddingTable's embedding_block: for
forces and training the nets linearised in s (dpmd.model.network: same value and first derivative, no double
differentiation of the nets); in a compressed descriptor (dpmd.model.compress) G from piecewise quintic tables of
the nets (buffer `table`), the sum in the kernel library's fused op when it is loaded, in Triton on CUDA, or in
the pure-PyTorch reference.  On CPU with the kernel library a compressed forward is one op (_fused_tabulated).
"""

from __future__ import annotations

import re
from typing import List, Optional

import torch
from torch import nn

from dpmd import ops
from dpmd.errors import ConfigError
from dpmd.model import deferred
from dpmd.model.descriptor.common import (WeightCache, cached_on_weights, check_sizes, excluded_pair_codes,
                                          per_type_rows, resolved_sel)
from dpmd.model.descriptor.table import EmbeddingTable
from dpmd.model.keys import (DTYPES, activation_key, axis_neuron_key, check_type_split, cutoff_keys,
                             env_protection_key, exclude_types_key, neuron_key, precision_key, seed_key,
                             sel_per_type_key, set_davg_zero_key)
from dpmd.model.network import MLP, child_seed
from dpmd.ops import Backend
from dpmd.schema import key


def args() -> list:
    """The keys of a `se_e2_a` section (DeePMD-kit's argcheck: defaults, aliases)."""
    return [
        sel_per_type_key(),
        *cutoff_keys(),
        neuron_key([10, 20, 40], "Widths of the embedding net's hidden layers (a layer of the same or twice the "
                              "previous width gets a skip connection)."),
        axis_neuron_key(),
        activation_key("Activation function of the embedding net."),
        key("resnet_dt", bool, False, "Whether skip connections carry a trainable timestep."),
        key("type_one_side", bool, False,
            "True: one embedding net per neighbour type; false: one per (centre type, neighbour type) pair."),
        precision_key("Precision of the embedding net ('default' is float64)."),
        key("trainable", bool, True, "Whether the embedding nets' weights are trained."),
        seed_key("Random seed of the embedding nets' initial weights (none: random)."),
        exclude_types_key(),
        env_protection_key(),
        set_davg_zero_key(),
    ]

def check_config(d: dict, ntypes: int) -> None:
    """Checks across the keys of a normalised section."""
    check_type_split(d, ntypes)
    if d["axis_neuron"] > d["neuron"][-1]:
        raise ConfigError(f"'model.descriptor.axis_neuron' = {d['axis_neuron']} exceeds the last embedding width "
                          f"{d['neuron'][-1]}")


def smooth_switch(r: torch.Tensor, rmin: float, rmax: float) -> torch.Tensor:
    """1 below rmin, 0 above rmax, C2-continuous quintic in between: DeePMD-kit's u^3 (-6 u^2 + 15 u - 10) + 1,
    factored as (1 - u)^3 (1 + 3 u + 6 u^2) so that it keeps its relative accuracy near rmax (DeePMD-kit's form
    cancels to ~1e-13 with a rounding of ~1e-16 there, which se_atten's normalised directions amplify)."""
    u = ((r - rmin) / (rmax - rmin)).clamp(0.0, 1.0)
    v = 1.0 - u
    return v * v * v * (1.0 + 3.0 * u + 6.0 * u * u)


class DescriptorSeA(WeightCache, EmbeddingTable, nn.Module):
    # TorchScript constants: the compressed code (and its `table` buffer) is compiled only for a compressed
    # model, the torch.ops.dpmd.* calls only when scripted with the kernel library loaded (use_ops)
    __constants__ = ["compressed", "use_ops", "has_exclusion"]
    # what forward takes: an edge list, or (type_counts given) DeePMD's padded layout (dpmd.model.forces.layouts)
    layouts = ("edges", "padded")

    def __init__(self, ntypes: int, sel: list[int], rcut: float, rcut_smth: float, neuron=(25, 50, 100),
                 axis_neuron: int = 16, resnet_dt: bool = False, type_one_side: bool = True,
                 activation_function: str = "tanh", dtype=torch.float64, seed=None, exclude_types=()):
        super().__init__()
        check_sizes(ntypes, sel, rcut, rcut_smth)
        if axis_neuron > neuron[-1]:
            raise ValueError(f"descriptor.axis_neuron={axis_neuron} exceeds the last embedding width {neuron[-1]}")
        self.ntypes, self.sel, self.rcut, self.rcut_smth = ntypes, list(sel), float(rcut), float(rcut_smth)
        self.axis_neuron, self.type_one_side = axis_neuron, type_one_side
        self.nnei = sum(sel)
        self.mixed_types = False  # one embedding net per neighbour type (or pair): neighbours split by type
        self.width = neuron[-1]
        nnets = ntypes if type_one_side else ntypes * ntypes
        # net index: neighbour type, or neighbour type * ntypes + centre type (DeePMD's order); DeePMD-kit seeds the
        # nets in the transposed order (itertools.product over the key it stores at key[0] + key[1] * ntypes)
        self.embeddings = nn.ModuleList(
            MLP(1, list(neuron), activation=activation_function, resnet_dt=resnet_dt, dtype=dtype,
                seed=child_seed(seed, k if type_one_side else (k % ntypes) * ntypes + k // ntypes))
            for k in range(nnets)
        )
        self.register_buffer("mean", torch.zeros(ntypes, 4, dtype=dtype))
        self.register_buffer("std", torch.ones(ntypes, 4, dtype=dtype))
        self.excluded_pairs = excluded_pair_codes(ntypes, exclude_types)
        self.has_exclusion = len(self.excluded_pairs) > 1
        self._init_table(ntypes)  # model compression (EmbeddingTable.enable_compression adds the buffer `table`)
        self.use_ops = False  # set on the copy that dpmd.model.export scripts with the kernel library loaded

    @classmethod
    def from_config(cls, d: dict, ntypes: int) -> "DescriptorSeA":
        out = cls(ntypes, resolved_sel(d), d["rcut"], d["rcut_smth"], d["neuron"], d["axis_neuron"], d["resnet_dt"],
                  d["type_one_side"], d["activation_function"], dtype=DTYPES[d["precision"]], seed=d["seed"],
                  exclude_types=d["exclude_types"])
        out.embeddings.requires_grad_(d["trainable"])
        return out

    @staticmethod
    def deepmd_state(state: dict, source: str) -> dict:
        """DeePMD-kit's `sea.*` entries as ours (its statistics hold one row per neighbour slot, equal per type)."""
        ours = {}
        for name, value in state.items():
            if (n := re.fullmatch(r"sea\.filter_layers\.networks\.(\d+)\.layers\.(\d+)\.(\w+)", name)):
                ours[f"embeddings.{n[1]}.layers.{n[2]}.{n[3]}"] = value
            elif name in ("sea.mean", "sea.stddev"):
                ours["mean" if name.endswith("mean") else "std"] = per_type_rows(name, value, source)
        return ours

    @property
    def dim_out(self) -> int:
        return self.width * self.axis_neuron

    def env_rows(self, edge_vec: torch.Tensor, backend: Optional[Backend] = None) -> torch.Tensor:
        """Un-normalised environment rows (E, 4) from edge vectors (E, 3)."""
        if self.use_ops:  # frozen with the kernel library
            return torch.ops.dpmd.env_mat(edge_vec, self.rcut_smth, self.rcut)
        if not torch.jit.is_scripting():
            if self.resolve_backend(backend, edge_vec).kernels:  # kernel library, first derivatives only (see dpmd.ops)
                return ops.env_rows(edge_vec, self.rcut_smth, self.rcut)
        r = torch.linalg.vector_norm(edge_vec, 2.0, dim=-1, keepdim=True)  # = Tensor.norm(dim=-1); scriptable
        s = smooth_switch(r, self.rcut_smth, self.rcut) / r
        return torch.cat([s, s * edge_vec / r], dim=-1)

    def forward(self, edge_vec, center, center_type, neighbor_type, backend: Optional[Backend] = None,
                type_counts: Optional[List[int]] = None):
        """Descriptors (n_centers, M * axis_neuron).

        edge_vec (E, 3) vectors from centre to neighbour; center (E,) index in [0, n_centers);
        center_type (n_centers,); neighbor_type (E,).  backend: which implementation runs (dpmd.ops.resolve;
        None: as the caller's context says).  type_counts: None for an edge list sorted by centre; given, the
        edges are in DeePMD's padded layout with the centres grouped by type in these counts (_forward_padded).
        """
        if type_counts is not None and not torch.jit.is_scripting():  # (scripted: read as the edge list it also is)
            return self._forward_padded(edge_vec, center, center_type, neighbor_type, type_counts, backend)
        if not torch.jit.is_scripting():
            backend = self.resolve_backend(backend, edge_vec)
        dtype = self.mean.dtype
        fused = self._fused_tabulated(edge_vec, center, center_type, neighbor_type, backend)
        if fused is not None:
            return fused
        ncent = center_type.shape[0]
        ct_edge = center_type.index_select(0, center)
        rows = self.env_rows(edge_vec.to(dtype), backend)
        slot_center, slot_type = center, neighbor_type  # every edge fills a slot, excluded or not
        if self.has_exclusion:  # an excluded edge adds nothing: leave it out
            kept = torch.nonzero(self.kept_edges(rows, ct_edge, neighbor_type)).squeeze(1)
            rows, edge_vec, ct_edge = rows.index_select(0, kept), edge_vec.index_select(0, kept), ct_edge.index_select(0, kept)
            center, neighbor_type = center.index_select(0, kept), neighbor_type.index_select(0, kept)
        rows = (rows - self.mean.index_select(0, ct_edge)) / self.std.index_select(0, ct_edge)
        key = neighbor_type if self.type_one_side else neighbor_type * self.ntypes + ct_edge
        self._check_table(rows[:, 0], edge_vec, center, center_type, neighbor_type)
        # Edges grouped by net, then by centre: each group becomes a dense (centre, slot)
        # block padded only to the largest real count, so T is one batched matmul per net.
        order = torch.argsort(key * ncent + center)
        counts: List[int] = torch.bincount(key, minlength=len(self.embeddings)).tolist()
        rows, center_sorted = rows.index_select(0, order), center.index_select(0, order)

        T = rows.new_zeros([ncent, 4, self.width])
        start = 0
        for i in range(len(self.embeddings)):  # (no continue: TorchScript-compilable)
            n, end = counts[i], start + counts[i]
            if n > 0:
                T = T + self.embedding_block(i, rows[start:end], center_sorted[start:end], ncent, 0, backend)
            start = end
        T = T + self._padding(slot_center, center_type, slot_type, backend)
        return self._descriptor_from_T(T, ncent)

    def kept_edges(self, rows: torch.Tensor, center_type_of_edge: torch.Tensor, neighbor_type: torch.Tensor):
        """(E,) bool: the edges whose (un-normalised) rows count, i.e. all but those of exclude_types.  An edge
        at or beyond rcut (a zero row: DeePMD-kit's empty slot) is kept: it is padding either way."""
        pair = center_type_of_edge * self.ntypes + neighbor_type
        included = torch.ones_like(pair, dtype=torch.bool)
        for code in self.excluded_pairs:
            included = included & (pair != code)
        return included | (rows[:, 0] == 0)

    def _descriptor_from_T(self, T: torch.Tensor, ncent: int) -> torch.Tensor:
        """D = T^T T[:, :axis_neuron] of the summed T (n_centers, 4, M), flattened (n_centers, M * axis_neuron)."""
        T = T / self.nnei
        D = torch.bmm(T.transpose(1, 2), T[:, :, : self.axis_neuron])
        return D.reshape(ncent, -1)

    @torch.jit.unused
    def _forward_padded(self, edge_vec, center, center_type, neighbor_type, type_counts: List[int],
                        backend: Optional[Backend] = None):
        """forward() for edges in DeePMD's own padded layout, which the MD engine uses on a GPU: every centre
        has nnei = sum(sel) edges, centre-major, in blocks of sel[t] slots for neighbour type t (center and
        neighbor_type say so edge by edge, for the kernels and messages); an empty slot holds a vector beyond
        rcut (a zero environment row: DeePMD's padding).  The centres are grouped by type with these counts.
        Every shape is then known on the host, so nothing is read back from the device; an edge outside a
        compressed model's tables is recorded with dpmd.model.deferred when a caller collects such flags (else
        it is an error at once).  (Eager only: the frozen model takes edge lists.)"""
        backend = self.resolve_backend(backend, edge_vec)
        dtype = self.mean.dtype
        ncent, nnei, nt = center_type.shape[0], self.nnei, self.ntypes
        fused = self._fused_tabulated(edge_vec, center, center_type, neighbor_type, backend, padded=True)
        if fused is not None:
            return fused
        raw = self.env_rows(edge_vec.to(dtype), backend)
        rows = raw.view(ncent, nnei, 4)
        rows = (rows - self.mean.index_select(0, center_type).unsqueeze(1)) / self.std.index_select(0, center_type).unsqueeze(1)
        self._check_table(rows[:, :, 0].reshape(-1), edge_vec, center, center_type, neighbor_type, True)
        if self.has_exclusion:  # zeroed rows add nothing to T (DeePMD-kit's exclusion mask)
            kept = self.kept_edges(raw, center_type.index_select(0, center), neighbor_type)
            rows = rows * kept.view(ncent, nnei, 1).to(dtype)
        slot0 = [sum(self.sel[:t]) for t in range(nt)]
        type0 = [sum(type_counts[:t]) for t in range(nt)]
        T = rows.new_zeros([ncent, 4, self.width])
        for i in range(len(self.embeddings)):
            tn = i if self.type_one_side else i // nt
            c0, nc = (0, ncent) if self.type_one_side else (type0[i % nt], type_counts[i % nt])
            k = self.sel[tn]
            if nc == 0 or k == 0:
                continue
            r = rows[c0:c0 + nc, slot0[tn]:slot0[tn] + k].reshape(-1, 4)
            c = torch.arange(nc, device=r.device).repeat_interleave(k)
            block = self.embedding_block(i, r, c, nc, k, backend)
            T = T + (block if nc == ncent else nn.functional.pad(block, (0, 0, 0, 0, c0, ncent - c0 - nc)))
        return self._descriptor_from_T(T, ncent)

    @torch.jit.unused
    def slot_types(self, device) -> torch.Tensor:
        """(nnei,) the neighbour type of each slot of DeePMD's padded layout: sel[0] zeros, sel[1] ones, ..."""
        return torch.cat([torch.full([s], t, dtype=torch.long, device=device) for t, s in enumerate(self.sel)])

    def _padding(self, center, center_type, neighbor_type, backend: Optional[Backend] = None):
        """Contribution of DeePMD's empty neighbour slots, (n_centers, 4, M)."""
        ncent, nt = center_type.shape[0], self.ntypes
        count = torch.bincount(center * nt + neighbor_type, minlength=ncent * nt).reshape(ncent, nt)
        n_pad = (torch.tensor(self.sel, device=count.device) - count).to(self.mean.dtype)  # (ncent, nt)
        per_slot = None
        if not torch.jit.is_scripting():
            per_slot = self._cached_padding_per_slot(self.resolve_backend(backend, center_type).forces_only)
        if per_slot is None:
            per_slot = self._padding_per_slot()
        return (n_pad.unsqueeze(-1).unsqueeze(-1) * per_slot.index_select(0, center_type)).sum(1)

    def _padding_per_slot(self) -> torch.Tensor:
        """(nt_centre, nt_neighbour, 4, M): what one empty slot adds to T, per pair of types."""
        nt = self.ntypes
        pad_row = -self.mean / self.std  # (nt_center, 4): a zero row, normalised
        # per_pair[tc * nt + tn]: one padded slot of centre type tc in the block of neighbour type tn
        per_pair: List[torch.Tensor] = [pad_row.new_empty(0)] * (nt * nt)
        for i in range(len(self.embeddings)):  # net i serves neighbour type i, or pair (i // nt, i % nt)
            for tc in range(nt):
                if self.type_one_side or tc == i % nt:
                    tn = i if self.type_one_side else i // nt
                    g = self.embed(i, pad_row[tc, :1])[0]
                    per_pair[tc * nt + tn] = pad_row[tc].unsqueeze(1) * g.unsqueeze(0)
        return torch.stack(per_pair).reshape(nt, nt, 4, self.width)

    @torch.jit.unused
    def _cached_padding_per_slot(self, forces_only: bool):
        """_padding_per_slot, computed once per set of weights while only forces are asked for (dpmd.ops'
        Backend.forces_only: no gradient to the weights is needed) of a model in eval mode; None otherwise
        (training, whose optimizer may update the weights without bumping their version counters; vmap)."""
        if not forces_only or self.training:
            return None
        tensors = [self.mean, self.std] + list(self.embeddings.parameters()) + self._tables()
        return cached_on_weights(self, "_padding_cache", tensors, self._padding_per_slot)

    # ---- compressed model (the table itself: EmbeddingTable) ------------------------------------

    def edge_table_input(self, edge_vec: torch.Tensor, center_type_of_edge: torch.Tensor) -> torch.Tensor:
        """The table input (normalised s) of each edge, (E,)."""
        ct = center_type_of_edge
        return (self.env_rows(edge_vec)[:, 0] - self.mean[ct, 0]) / self.std[ct, 0]

    def _fused_tabulated(self, edge_vec, center, center_type, neighbor_type, backend: Optional[Backend],
                         padded: bool = False) -> Optional[torch.Tensor]:
        """This whole forward of a compressed model in one kernel-library op (CPU; forces, not training): the same
        numbers, without the edge-sized intermediate tensors.  None where it does not apply."""
        if self.compressed and edge_vec.device.type == "cpu" and not self.has_exclusion:
            applies = self.use_ops  # frozen with the kernel library
            if not torch.jit.is_scripting():
                applies = applies or (backend is not None and backend.kernels)
            if applies:
                edge_vec = edge_vec.to(self.mean.dtype)
                grid = [self.rcut_smth, self.rcut, self.table_lower, self.table_upper, self.table_step,
                        self.table_step_coarse, self.table_end, self._table_slack()]
                D, stats = torch.ops.dpmd.se_a_tabulated_descriptor(
                    edge_vec, center, center_type, neighbor_type, self.mean, self.std, self.table, self.sel, grid,
                    self.table_fine, self.table_coarse, self.type_one_side, self.axis_neuron)
                if padded:
                    self._report_or_defer(stats, edge_vec, center, center_type, neighbor_type)
                else:
                    self._report_table(int(stats[0]), stats[1:], edge_vec, center, center_type, neighbor_type)
                return D
        return None

    @torch.jit.unused
    def _report_or_defer(self, stats, edge_vec, center, center_type, neighbor_type):
        """stats[0] >= 0 (an edge outside the tables) as a deferred flag when a caller collects them."""
        if not deferred.record(stats[0] >= 0):
            self._report_table(int(stats[0]), stats[1:], edge_vec, center, center_type, neighbor_type)
