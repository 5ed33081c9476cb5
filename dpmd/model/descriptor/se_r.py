"""DeepPot-SE descriptor with radial information only (`se_e2_r`, alias `se_r`): DeePMD-kit's DescrptSeR.

DeePMD-kit's definition (deepmd/pt/model/descriptor/se_r.py), evaluated on an edge list:

  environment value of neighbour j of atom i:  s = sw(r)/r  (se_e2_a's switch, dpmd.model.descriptor.se_a);
  normalised per centre type:                  x = (s - mean[t_i]) / std[t_i];
  one embedding net per neighbour type:        G_j = net_{t_j}(x_j)  (M = neuron[-1] values);
  D_i = (1/5) (1/nnei) sum of G over the nnei = sum(sel) slots of atom i   (M values; 1/5 is DeePMD-kit's
  fixed rescale of this descriptor).

An empty slot (DeePMD's padding, s = 0) adds net_t(-mean[t_i]/std[t_i]) for each of the sel[t] - count slots of
neighbour type t; it is added in closed form here, one net evaluation per (centre type, neighbour type).  An
edge at or beyond rcut has s = 0 exactly, so it is such an empty slot without special treatment.
exclude_types: the normalised value of an excluded (centre type, neighbour type) pair is zeroed, so the neighbour
adds net(0) and still fills its slot (DeePMD-kit's exclusion mask; an edge beyond rcut stays padding).
type_one_side: accepted either way; DeePMD-kit's PyTorch backend builds one net per neighbour type whatever its
value, and so does this module.

Compressed (dpmd.model.compress, as DeePMD-kit's `dp compress`): net_t(x) is read from net t's table over x
(dpmd.model.descriptor.table.EmbeddingTable, se_e2_a's layout).
"""

from __future__ import annotations

import re
from typing import List, Optional, Tuple

import torch
from torch import nn

from dpmd.model.descriptor.common import check_sizes, excluded_pair_codes, per_type_rows, resolved_sel
from dpmd.model.descriptor.se_a import DescriptorSeA, smooth_switch
from dpmd.model.descriptor.table import EmbeddingTable
from dpmd.model.keys import (DTYPES, activation_key, check_type_split, cutoff_keys, env_protection_key,
                             exclude_types_key, neuron_key, precision_key, seed_key, sel_per_type_key,
                             set_davg_zero_key)
from dpmd.model.network import MLP, child_seed
from dpmd.ops import Backend
from dpmd.schema import key


def args() -> list:
    """The keys of a `se_e2_r` section (DeePMD-kit 3.2's argcheck descrpt_se_r_args: defaults, aliases)."""
    return [
        sel_per_type_key(),
        *cutoff_keys(),
        neuron_key([10, 20, 40], "Widths of the embedding net's hidden layers (a layer of the same or twice the "
                                 "previous width gets a skip connection); the last is the descriptor's size."),
        activation_key("Activation function of the embedding net."),
        key("resnet_dt", bool, False, "Whether skip connections carry a trainable timestep."),
        key("type_one_side", bool, False,
            "Accepted for DeePMD-kit inputs; its PyTorch backend (and dpmd) use one embedding net per neighbour "
            "type either way."),
        precision_key("Precision of the embedding net ('default' is float64)."),
        key("trainable", bool, True, "Whether the embedding nets' weights are trained."),
        seed_key("Random seed of the embedding nets' initial weights (none: random)."),
        exclude_types_key("their normalised environment values are zeroed"),
        env_protection_key(),
        set_davg_zero_key(),
    ]


def check_config(d: dict, ntypes: int) -> None:
    """Checks across the keys of a normalised section."""
    check_type_split(d, ntypes)


class DescriptorSeR(EmbeddingTable, nn.Module):
    # TorchScript constants: the compressed-model code is compiled only for a compressed model, the kernel
    # library's calls only when scripted with it loaded (use_ops, set by dpmd.model.export)
    __constants__ = ["compressed", "use_ops"]
    layouts = ("edges", "padded")  # what forward takes (type_counts given: DeePMD's padded layout)
    linearize_nets = False  # small nets: differentiated as they are, any number of times (EmbeddingTable)

    def __init__(self, ntypes: int, sel: List[int], rcut: float, rcut_smth: float, neuron=(10, 20, 40),
                 resnet_dt: bool = False, activation_function: str = "tanh", dtype=torch.float64, seed=None,
                 exclude_types=()):
        super().__init__()
        check_sizes(ntypes, sel, rcut, rcut_smth)
        self.ntypes, self.sel, self.rcut, self.rcut_smth = ntypes, list(sel), float(rcut), float(rcut_smth)
        self.nnei = sum(sel)
        self.width = neuron[-1]
        self.mixed_types = False  # one embedding net per neighbour type: neighbours split by type
        self._init_table(ntypes)  # model compression (EmbeddingTable)
        self.use_ops = False
        # net t serves neighbour type t; DeePMD-kit seeds it with child_seed(seed, t)
        self.embeddings = nn.ModuleList(
            MLP(1, list(neuron), activation=activation_function, resnet_dt=resnet_dt, dtype=dtype,
                seed=child_seed(seed, t)) for t in range(ntypes))
        self.register_buffer("mean", torch.zeros(ntypes, 1, dtype=dtype))
        self.register_buffer("std", torch.ones(ntypes, 1, dtype=dtype))
        self.excluded_pairs = excluded_pair_codes(ntypes, exclude_types)

    @classmethod
    def from_config(cls, d: dict, ntypes: int) -> "DescriptorSeR":
        out = cls(ntypes, resolved_sel(d), d["rcut"], d["rcut_smth"], d["neuron"], d["resnet_dt"], d["activation_function"],
                  dtype=DTYPES[d["precision"]], seed=d["seed"], exclude_types=d["exclude_types"])
        out.embeddings.requires_grad_(d["trainable"])
        return out

    @staticmethod
    def deepmd_state(state: dict, source: str) -> dict:
        """DeePMD-kit's DescrptSeR entries (`filter_layers.networks.*`, `mean`, `stddev`) as ours; its statistics
        hold one row per neighbour slot, equal per type.  (`filter_layers._networks` repeats the nets and the
        empty `compress_*` entries are a compression's tables: neither is needed.)"""
        ours = {}
        for name, value in state.items():
            if (n := re.fullmatch(r"filter_layers\.networks\.(\d+)\.layers\.(\d+)\.(\w+)", name)):
                ours[f"embeddings.{n[1]}.layers.{n[2]}.{n[3]}"] = value
            elif name in ("mean", "stddev"):
                ours["mean" if name == "mean" else "std"] = per_type_rows(name, value, source)
        return ours

    @property
    def dim_out(self) -> int:
        return self.width

    def env_values(self, edge_vec: torch.Tensor) -> torch.Tensor:
        """Un-normalised s = sw(r)/r (E,) of edge vectors (E, 3); exactly 0 at and beyond rcut."""
        r = torch.linalg.vector_norm(edge_vec, 2.0, dim=-1)
        return smooth_switch(r, self.rcut_smth, self.rcut) / r

    # se_e2_a's: exclude_types as the (centre type, neighbour type) codes in excluded_pairs, rows (E, 1) here
    kept_edges = DescriptorSeA.kept_edges

    def edge_table_input(self, edge_vec: torch.Tensor, center_type_of_edge: torch.Tensor) -> torch.Tensor:
        """The normalised value x (E,) of each edge: the embedding nets' input (and the tables')."""
        return self._normalized(self.env_values(edge_vec), center_type_of_edge)

    def _normalized(self, s: torch.Tensor, ct: torch.Tensor) -> torch.Tensor:
        return (s - self.mean[:, 0].index_select(0, ct)) / self.std[:, 0].index_select(0, ct)

    def forward(self, edge_vec, center, center_type, neighbor_type, backend: Optional[Backend] = None,
                type_counts: Optional[List[int]] = None):
        """Descriptors (n_centers, M) of edges sorted by centre (center in [0, n_centers)).  The nets are small and
        run in PyTorch, differentiable any number of times; backend matters only to a compressed model's tables
        (the fused kernels where it allows them: EmbeddingTable.embedding_sum).  type_counts given: the edges are
        in DeePMD's padded layout (forces.evaluate, padded), whose empty slots hold vectors beyond rcut,
        which the edge-list code counts as empty slots, so it serves as it is; only an edge outside a compressed
        model's tables is then a deferred flag when the caller collects them (the sync-free MD steps)."""
        return self._sum_embeddings(edge_vec, center, center_type, neighbor_type, type_counts is not None, backend)

    def _sum_embeddings(self, edge_vec, center, center_type, neighbor_type, deferred_check: bool,
                        backend: Optional[Backend]):
        """forward(); deferred_check: an edge outside a compressed model's tables is a deferred flag when the
        caller collects them."""
        if not torch.jit.is_scripting():
            backend = self.resolve_backend(backend, edge_vec)
        dtype, ncent, nt = self.mean.dtype, center_type.shape[0], self.ntypes
        ct = center_type.index_select(0, center)
        s = self.env_values(edge_vec.to(dtype))
        x = self._normalized(s, ct)
        if len(self.excluded_pairs) > 1:
            x = x * self.kept_edges(s.unsqueeze(1), ct, neighbor_type).to(dtype)
        self._check_table(x, edge_vec, center, center_type, neighbor_type, deferred_check)
        # edges grouped by neighbour type, then centre (ascending, as the fused tables need): one net evaluation
        # per type, summed per centre; in the padded layout the groups are the rows' sel[t] slots of each type,
        # known on the host (nothing read back from the device: the sync-free MD steps)
        if deferred_check and not torch.jit.is_scripting():
            order, counts = self._padded_order(ncent, edge_vec.device)
        else:
            order = torch.argsort(neighbor_type * ncent + center)
            read: List[int] = torch.bincount(neighbor_type, minlength=nt).tolist()
            counts = read
        x, c = x.index_select(0, order), center.index_select(0, order)
        total = x.new_zeros([ncent, self.width])
        start = 0
        for t in range(nt):
            n = counts[t]
            if n > 0:
                total = self.embedding_sum(total, t, x[start:start + n], None, c[start:start + n], backend)
            start += n
        if not deferred_check:  # (padded: every slot is an edge, an empty one beyond rcut already counted)
            total = total + self._padding(center, center_type, neighbor_type)
        return total * (0.2 / self.nnei)  # 1/5: DeePMD-kit's res_rescale of se_e2_r

    @torch.jit.unused
    def _padded_order(self, ncent: int, device) -> Tuple[torch.Tensor, List[int]]:
        """The padded layout's edges (centre-major, sel[t] slots of type t per row) grouped by type, then centre,
        and each group's size."""
        rows = torch.arange(ncent, device=device).unsqueeze(1) * self.nnei
        first = [sum(self.sel[:t]) for t in range(self.ntypes)]
        order = [(rows + torch.arange(f, f + k, device=device)).reshape(-1) for f, k in zip(first, self.sel)]
        return torch.cat(order), [ncent * k for k in self.sel]

    def _padding(self, center, center_type, neighbor_type) -> torch.Tensor:
        """(n_centers, M): what DeePMD's empty slots add, sel[t] - (edges of type t) slots of each type t."""
        ncent, nt = center_type.shape[0], self.ntypes
        count = torch.bincount(center * nt + neighbor_type, minlength=ncent * nt).reshape(ncent, nt)
        n_pad = (torch.tensor(self.sel, device=count.device) - count).to(self.mean.dtype)  # (ncent, nt)
        pad_x = -self.mean / self.std  # (nt_centre, 1): an empty slot's normalised value
        per_type: List[torch.Tensor] = [self.embed(t, pad_x[:, 0]) for t in range(nt)]
        per_slot = torch.stack(per_type, 1)  # (nt_centre, nt_neighbour, M)
        return (n_pad.unsqueeze(-1) * per_slot.index_select(0, center_type)).sum(1)

    slot_types = DescriptorSeA.slot_types  # (DeePMD's padded layout: sel[t] slots of each type t)
