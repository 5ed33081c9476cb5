"""DPA-1: the attention descriptor with type embedding (`se_atten`, alias `dpa1`; `se_atten_v2` in se_atten_v2.py).

DeePMD-kit's definition (deepmd/pt/model/descriptor/se_atten.py), evaluated on an edge list:

  neighbours of any type share one list of nnei = sel slots (mixed types);
  environment row of neighbour j of atom i:  (s, s x/r, s y/r, s z/r), s = sw(r)/r (as se_e2_a),
      normalised per centre type: R = (row - mean[t_i]) / std[t_i];
  type embedding t(type) (type_embedding.py: of the one-hot type, or of the element's electronic configuration
      with use_econf_tebd, econf.py);
  embedding of every neighbour, (N: the embedding net, N_t: the strip net)
      concat:  G = N(R_0, t(t_j) [, t(t_i) unless type_one_side])
      strip:   G = N(R_0) * (1 + N_t(t(t_j) [, t(t_i)]) [* sw(r) if smooth]);
  attn_layer gated self-attention layers over a centre's neighbours, each
      q, k, v = G W_in (+ b) [each normalised if normalize],  a_jk = q_j . k_k * scale,
      smooth:  a_jk -> (a_jk + 20) sw_j sw_k - 20, softmax over all nnei slots, then * sw_j sw_k;
      else:    softmax over the real neighbours;
      [a_jk *= rhat_j . rhat_k if attn_dotr];   G <- LayerNorm(G + (a v) W_out + b);
  T_i = (1/nnei) sum_j R_j^T G_j (4 x M),  D_i = T_i^T T_i[:, :axis_neuron]  [, t(t_i) if concat_output_tebd].

Empty slots (DeePMD-kit pads each list to nnei): the attention is computed on dense (centre, neighbour) blocks
of centres with alike counts, each padded only to its largest real count; the slots beyond enter in closed
form (so sel costs nothing and the arithmetic is spent on real neighbours only): in the smooth
softmax, each empty slot adds exp(-20) to the denominator and nothing else; in T, each adds the constant
R_pad^T G_pad with R_pad = -mean/std (zero with set_davg_zero), G_pad its embedding with the type embedding of
the padding's neighbour type (below) passed through the attention layers as a query that attends nothing
(G <- LayerNorm(G + b_out)).  An excluded pair (exclude_types) fills a slot but is masked like an empty one and
adds nothing to T; an edge at or beyond rcut is an empty slot.

DeePMD's padded layout (forward with type_counts: the MD engine's sync-free path, _forward_padded): one block of
nnei slots per centre for neighbours of every type; G on every slot, the slots without a real neighbour zeroed as
the dense blocks' unfilled ones (one block of nnei slots: none beyond it), the empty ones then in closed form.

Compression (dpmd.model.compress, `dpmd compress`; DeePMD-kit's `dp compress` of DPA-1): in strip mode with
attn_layer 0 the radial net N(R_0) is tabulated (dpmd.model.descriptor.table.EmbeddingTable, the one net of
its table), an edge beyond the tables an error naming the atoms; the strip net of every pair of types is a
table already (_strip_table, computed once per set of weights for inference).  Forces then run in the kernel
library's fused tabulated contraction, per (centre, neighbour type) (_fused_tables).  Concat mode (the type
embedding inside the radial net) and attention layers (whose input is the whole neighbourhood) are refused.

Cost (the same numbers): what depends on the weights alone (type embedding, strip table, padding) is computed
once per set of weights for inference; forces use the kernel library's rows and, without attention, its
contraction, the strip mode's G linearised in s and sw (dpmd.model.network.linearize_at) and hand-written
backward passes of the smooth attention; strip mode without attention never forms G per edge: the contraction
sums R^T gs and sw R^T gs per (centre, neighbour type), then applies the strip table's rows per type
(_strip_by_type, as the compressed model's _fused_tables); training uses the contraction ops that differentiate
again and the radial net linearised in s (Backend.linearize).

The padding's neighbour type: DeePMD-kit gives an empty slot the type embedding of the frame's first atom
(its neighbour index -1 becomes 0), so with a non-zero mean (set_davg_zero false: concat mode, or strip mode
without smooth) its energies depend on which atom comes first.  dpmd uses type 0 (`pad_type`): DeePMD-kit's
numbers whenever the first atom is of type 0 (as in type-sorted data), and invariant under permutations.
"""

from __future__ import annotations

import re
from typing import List, Optional, Tuple

import torch
from torch import nn

from dpmd import ops
from dpmd.errors import ConfigError, DpmdError
from dpmd.geometry.neighbor import first_over_sel, sel_overflow_message
from dpmd.model.descriptor.attention import AttentionLayer, NeighborAttention
from dpmd.model.descriptor.common import (WeightCache, cached_on_weights, check_sizes, excluded_pair_codes,
                                          per_type_rows, resolved_sel)
from dpmd.model.descriptor.econf import econf_matrix
from dpmd.model.descriptor.se_a import DescriptorSeA, smooth_switch
from dpmd.model.descriptor.table import EmbeddingTable
from dpmd.model.descriptor.type_embedding import TypeEmbedding
from dpmd.model.keys import (DTYPES, activation_key, axis_neuron_key, check_cutoffs, check_exclude_types, cutoff_keys,
                             env_protection_key, exclude_types_key, neuron_key, precision_key, sel_factor, seed_key,
                             set_davg_zero_key)
from dpmd.model.network import MLP, child_seed, embedding_with_tangent, linearize_at
from dpmd.ops import Backend
from dpmd.schema import UNSET, key



def common_args(set_davg_zero: bool) -> list:
    """The keys se_atten and se_atten_v2 share (DeePMD-kit's argcheck: defaults, aliases)."""
    return [
        key("sel", [int, list[int], str], "auto",
            "Neighbours kept within rcut, of all types together: a number, a list (only its sum counts), or "
            "'auto' / 'auto:<factor>': the largest count in the training data times factor (1.1 for 'auto')."),
        *cutoff_keys(),
        neuron_key([10, 20, 40], "Widths of the embedding net's hidden layers (a layer of the same or twice the "
                              "previous width gets a skip connection)."),
        axis_neuron_key(),
        key("lmax", [int, None], UNSET, "Maximum angular degree of the moment basis (DeePMD-kit's default: 1).",
            fixed=True),
        activation_key("Activation function of the embedding nets."),
        key("resnet_dt", bool, False, "Whether skip connections carry a trainable timestep."),
        key("type_one_side", bool, False,
            "True: only the neighbour's type embedding enters the embedding; false: the centre's too."),
        precision_key("Precision of the descriptor's nets ('default' is float64)."),
        key("trainable", bool, True, "Whether the descriptor's weights are trained."),
        seed_key("Random seed of the descriptor's initial weights (none: random)."),
        exclude_types_key("they are masked in the attention and add nothing"),
        env_protection_key(),
        key("attn", int, 128, "Width of the attention's hidden vectors (q, k, v).",
            check=lambda v: v > 0, expect="a positive integer"),
        key("attn_layer", int, 2, "Number of attention layers (0: none).",
            check=lambda v: v >= 0, expect="a non-negative integer"),
        key("attn_dotr", bool, True, "Whether the attention weights are gated by rhat_j . rhat_k."),
        key("attn_mask", bool, False, "Mask the attention matrix's diagonal (DeePMD-kit's PyTorch backend refuses "
                                      "it too).", fixed=True),
        set_davg_zero_key(set_davg_zero),
        key("trainable_ln", bool, True, "Whether the layer normalisations' scale and shift are trained."),
        key("ln_eps", [float, None], None, "Epsilon of the layer normalisations (none: 1e-5)."),
        key("tebd_dim", int, 8, "Width of the type embedding.", check=lambda v: v > 0, expect="a positive integer"),
        key("use_econf_tebd", bool, False, "Whether the type embedding's input is each element's electronic "
                                           "configuration (type_map must name elements) instead of the one-hot type."),
        key("use_tebd_bias", bool, False, "Whether the type embedding layer has a bias."),
        key("scaling_factor", float, 1.0, "Attention weights are scaled by (attn * scaling_factor)^-1/2 (unless "
                                          "temperature is set).", check=lambda v: v > 0, expect="positive"),
        key("normalize", bool, True, "Whether q, k and v are normalised to unit length."),
        key("temperature", [float, None], None, "The attention weights' scale itself (replaces scaling_factor)."),
        key("concat_output_tebd", bool, True, "Whether the centre's type embedding is appended to the descriptor."),
    ]


def args() -> list:
    """The keys of a `se_atten` (`dpa1`) section."""
    return common_args(set_davg_zero=True) + [
        key("stripped_type_embedding", [bool, None], None,
            "Deprecated: true is tebd_input_mode strip, false concat (none: tebd_input_mode decides)."),
        key("smooth_type_embedding", bool, False,
            "Smooth attention weights (switched off towards rcut); in strip mode the type part is scaled by the "
            "switch too.", alias=["smooth_type_embdding"]),
        key("tebd_input_mode", str, "concat",
            "concat: the type embeddings are inputs of the embedding net; strip: a separate net of the type "
            "embeddings scales the radial embedding.", check=lambda v: v in ("concat", "strip"),
            expect="concat or strip"),
    ]


def check_config(d: dict, ntypes: int) -> None:
    """Checks across the keys of a normalised section."""
    check_cutoffs(d)
    if d["axis_neuron"] > d["neuron"][-1]:
        raise ConfigError(f"'model.descriptor.axis_neuron' = {d['axis_neuron']} exceeds the last embedding width "
                          f"{d['neuron'][-1]}")
    sel = d["sel"]
    if isinstance(sel, str):
        sel_factor(sel)
    elif (sum(sel) if isinstance(sel, list) else sel) <= 0 or (isinstance(sel, list) and min(sel, default=0) < 0):
        raise ConfigError(f"'model.descriptor.sel' = {sel}: expected a positive number of neighbours")
    check_exclude_types(d["exclude_types"], ntypes)


def total_sel(sel) -> int:
    """The one neighbour count of a mixed-types sel (a number, or a list of which only the sum counts)."""
    sel = resolved_sel({"sel": sel})
    return sum(sel) if isinstance(sel, list) else int(sel)


class DescriptorSeAtten(WeightCache, NeighborAttention, EmbeddingTable, nn.Module):
    # TorchScript constants: the compressed code (and its `table` buffer) is compiled only for a compressed model
    __constants__ = ["compressed", "use_ops"]
    __jit_unused_properties__ = ["embeddings"]
    MIXED_TYPES = True  # one sel for neighbours of all types (read before a module exists: sel auto)
    # what forward takes: an edge list, or (type_counts given) DeePMD's padded layout (dpmd.model.forces.layouts)
    layouts = ("edges", "padded")

    def __init__(self, ntypes: int, sel: int, rcut: float, rcut_smth: float, neuron=(25, 50, 100),
                 axis_neuron: int = 16, tebd_dim: int = 8, tebd_input_mode: str = "concat", resnet_dt: bool = False,
                 type_one_side: bool = False, attn: int = 128, attn_layer: int = 2, attn_dotr: bool = True,
                 scaling_factor: float = 1.0, normalize: bool = True, temperature: Optional[float] = None,
                 smooth: bool = True, exclude_types=(), ln_eps: float = 1e-5,
                 activation_function: str = "tanh", dtype=torch.float64, seed=None, concat_output_tebd: bool = True,
                 use_tebd_bias: bool = False, use_econf_tebd: bool = False, type_map: Optional[List[str]] = None):
        super().__init__()
        check_sizes(ntypes, None, rcut, rcut_smth)
        if axis_neuron > neuron[-1]:
            raise ValueError(f"descriptor.axis_neuron={axis_neuron} exceeds the last embedding width {neuron[-1]}")
        if use_econf_tebd and (type_map is None or len(type_map) != ntypes):
            raise ValueError(f"descriptor.use_econf_tebd needs the {ntypes} elements of the types (type_map)")
        self.ntypes, self.rcut, self.rcut_smth = ntypes, float(rcut), float(rcut_smth)
        self.sel: List[int] = [int(sel)]
        self.nnei = int(sel)
        self.mixed_types = True  # one list of neighbours of every type
        self._init_table(ntypes)  # model compression (EmbeddingTable.enable_compression adds the buffer `table`)
        self.use_ops = False  # set by dpmd.model.export (EmbeddingTable's fused calls; not used here)
        self.axis_neuron, self.width, self.tebd_dim = axis_neuron, neuron[-1], tebd_dim
        self.strip = tebd_input_mode == "strip"
        self.type_one_side, self.smooth, self.attn_dotr, self.normalize = type_one_side, smooth, attn_dotr, normalize
        self.concat_output_tebd = concat_output_tebd
        self.hidden = attn
        self.block = 64  # centres per dense block of the attention (see _contract)
        self.scale = float(temperature) if temperature is not None else float((attn * scaling_factor) ** -0.5)
        self.ln_eps = float(ln_eps)
        self.pad_type = 0  # the neighbour type of an empty slot (see the module's doc)
        self.attn_shift = 20.0  # DeePMD-kit's attnw_shift: smooth attention weights go to -20 (not -inf) at rcut
        # DeePMD-kit's seeds: the block is child 1 of the descriptor's seed (attention 0, embedding 1, strip net 2),
        # the type embedding child 2
        block = child_seed(seed, 1)
        self.type_embedding = TypeEmbedding(ntypes, tebd_dim, use_tebd_bias, dtype, child_seed(seed, 2),
                                            econf_matrix(type_map) if use_econf_tebd else None)
        type_inputs = tebd_dim if type_one_side else 2 * tebd_dim
        self.embedding = MLP(1 if self.strip else 1 + type_inputs, list(neuron), activation=activation_function,
                             resnet_dt=resnet_dt, dtype=dtype, seed=child_seed(block, 1))
        self.embedding_strip = (MLP(type_inputs, list(neuron), activation=activation_function, resnet_dt=resnet_dt,
                                    dtype=dtype, seed=child_seed(block, 2)) if self.strip else None)
        attention = child_seed(block, 0)
        self.attention = nn.ModuleList(AttentionLayer(self.width, attn, dtype, child_seed(attention, i), self.ln_eps)
                                       for i in range(attn_layer))
        self.register_buffer("mean", torch.zeros(ntypes, 4, dtype=dtype))
        self.register_buffer("std", torch.ones(ntypes, 4, dtype=dtype))
        self.excluded_pairs = excluded_pair_codes(ntypes, exclude_types)

    @classmethod
    def from_config(cls, d: dict, ntypes: int) -> "DescriptorSeAtten":
        mode = d["tebd_input_mode"]
        if d.get("stripped_type_embedding") is not None:
            mode = "strip" if d["stripped_type_embedding"] else "concat"
        return cls._build(d, ntypes, mode, d["smooth_type_embedding"])

    @classmethod
    def _build(cls, d: dict, ntypes: int, mode: str, smooth: bool):
        out = cls(ntypes, total_sel(d["sel"]), d["rcut"], d["rcut_smth"], d["neuron"], d["axis_neuron"],
                  d["tebd_dim"], mode, d["resnet_dt"], d["type_one_side"], d["attn"], d["attn_layer"], d["attn_dotr"],
                  d["scaling_factor"], d["normalize"], d["temperature"], smooth, d["exclude_types"],
                  1e-5 if d["ln_eps"] is None else d["ln_eps"], d["activation_function"],
                  dtype=DTYPES[d["precision"]], seed=d["seed"], concat_output_tebd=d["concat_output_tebd"],
                  use_tebd_bias=d["use_tebd_bias"], use_econf_tebd=d["use_econf_tebd"], type_map=d.get("type_map"))
        out.requires_grad_(d["trainable"])
        if not d["trainable_ln"]:
            for layer in out.attention:
                layer.norm.requires_grad_(False)
        return out

    @torch.jit.unused
    def deepmd_state(self, state: dict, source: str) -> dict:
        """DeePMD-kit's `se_atten.*` and `type_embedding.*` entries as ours (its statistics hold one row per
        neighbour slot, equal for all slots; the electronic configurations, which it does not save, are ours)."""
        ours = TypeEmbedding.deepmd_state(state, "type_embedding.")
        if self.type_embedding.econf is not None:
            ours["type_embedding.econf"] = self.type_embedding.econf
        for name, value in state.items():
            if (m := re.fullmatch(r"se_atten\.filter_layers(_strip)?\.networks\.0\.layers\.(\d+)\.(\w+)", name)):
                ours[f"embedding{m[1] or ''}.layers.{m[2]}.{m[3]}"] = value
            elif (m := re.fullmatch(r"se_atten\.dpa1_attention\.attention_layers\.(\d+)\.(?:attention_layer\.)?"
                                    r"(in_proj|out_proj|attn_layer_norm)\.(matrix|bias)", name)):
                if m[2] == "attn_layer_norm":
                    ours[f"attention.{m[1]}.norm.{'weight' if m[3] == 'matrix' else 'bias'}"] = value
                else:
                    ours[f"attention.{m[1]}.{m[2]}.{m[3]}"] = value
            elif name in ("se_atten.mean", "se_atten.stddev"):
                ours["mean" if name.endswith("mean") else "std"] = per_type_rows(name, value, source)
            elif re.fullmatch(r"se_atten\.(compress_data|compress_info)\.0|se_atten\.type_embd_data", name):
                if value.numel():
                    raise DpmdError(f"{source}: a compressed se_atten model ({name}); dpmd imports uncompressed ones")
        return ours

    @property
    def embeddings(self) -> List[nn.Module]:
        """The nets EmbeddingTable tabulates (dpmd.model.compress): the radial net, net 0."""
        return [self.embedding]

    def _net_forward(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """EmbeddingTable's net i (here only the radial net: its state-dict name is `embedding`, and TorchScript
        skips the property `embeddings`)."""
        return self.embedding(x.unsqueeze(1))

    def enable_compression(self, layout: dict, check_frequency: int = -1) -> None:
        """EmbeddingTable's, for the radial net of strip mode without attention layers (see the module doc)."""
        if self.embedding_strip is None or len(self.attention) > 0:
            raise DpmdError("compress: se_atten compresses in strip mode (se_atten_v2, or tebd_input_mode strip) "
                            f"with attn_layer 0, as DeePMD-kit does; this one has tebd_input_mode "
                            f"{'strip' if self.strip else 'concat'} and attn_layer {len(self.attention)}")
        EmbeddingTable.enable_compression(self, layout, check_frequency)

    def edge_table_input(self, edge_vec: torch.Tensor, center_type_of_edge: torch.Tensor) -> torch.Tensor:
        """The table input (normalised s) of each edge, (E,)."""
        ct = center_type_of_edge
        return (self.env_rows(edge_vec)[:, 0] - self.mean[ct, 0]) / self.std[ct, 0]

    # the statistics are se_e2_a's (DeePMD-kit's EnvMatStatSe, with nnei slots of mixed types per centre)
    kept_edges = DescriptorSeA.kept_edges

    @property
    def dim_out(self) -> int:
        return self.width * self.axis_neuron + (self.tebd_dim if self.concat_output_tebd else 0)

    def env_rows(self, edge_vec: torch.Tensor) -> torch.Tensor:
        """Un-normalised environment rows (E, 4) from edge vectors (E, 3)."""
        return self._switch_and_rows(edge_vec, torch.linalg.vector_norm(edge_vec, 2.0, dim=-1))[1]

    def _switch_and_rows(self, vec: torch.Tensor, r: torch.Tensor, backend: Optional[Backend] = None):
        """The switch sw(r) (E,) and the un-normalised rows (sw/r, sw/r x/r, ...) (E, 4) of vectors (E, 3)."""
        if not torch.jit.is_scripting():
            if backend is not None and backend.kernels:  # the kernel library's rows (first derivatives only)
                rows = ops.env_rows(vec, self.rcut_smth, self.rcut)
                return rows[:, 0] * r, rows
        sw = smooth_switch(r, self.rcut_smth, self.rcut)
        s = (sw / r).unsqueeze(1)
        return sw, torch.cat([s, s * vec / r.unsqueeze(1)], 1)

    def forward(self, edge_vec, center, center_type, neighbor_type, backend: Optional[Backend] = None,
                type_counts: Optional[List[int]] = None):
        """Descriptors (n_centers, dim_out) of an edge list (center (E,) in [0, n_centers), in any order).
        backend: which implementation runs (dpmd.ops.resolve; None: as the caller's context says).  type_counts:
        None for an edge list; given, the edges are in DeePMD's padded layout (_forward_padded)."""
        if type_counts is not None and not torch.jit.is_scripting():  # (scripted: read as the edge list it also is)
            return self._forward_padded(edge_vec, center, center_type, neighbor_type,
                                        self.resolve_backend(backend, edge_vec))
        if not torch.jit.is_scripting():
            backend = self.resolve_backend(backend, edge_vec)
        dtype = self.mean.dtype
        ncent, nt = center_type.shape[0], self.ntypes
        vec = edge_vec.to(dtype)
        r = torch.linalg.vector_norm(vec, 2.0, dim=-1)
        inside = r < self.rcut
        all_inside = bool(inside.all())
        # slots each centre fills in DeePMD-kit's list: its neighbours within rcut, excluded ones included
        filled = torch.bincount(center if all_inside else center[inside], minlength=ncent)
        found = first_over_sel(filled.unsqueeze(1), [self.nnei])
        if len(found) > 0:  # DeePMD-kit would drop the farthest: refuse instead (atom types by index here)
            raise RuntimeError(sel_overflow_message(str(found[0]), str(int(center_type[found[0]])), found[2], None,
                                                    self.nnei, found[3]))
        ct_edge = center_type.index_select(0, center)
        c, tc, tn = center, ct_edge, neighbor_type
        kept = inside
        for code in self.excluded_pairs:
            kept = kept & (ct_edge * nt + neighbor_type != code)
        if not (all_inside and len(self.excluded_pairs) == 1):  # (one code: the -1 of no pair)
            index = torch.nonzero(kept).squeeze(1)
            vec, r, c = vec.index_select(0, index), r.index_select(0, index), c.index_select(0, index)
            tc, tn = tc.index_select(0, index), tn.index_select(0, index)
        terms: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None
        if not torch.jit.is_scripting():
            terms = self._cached_weight_terms(backend)
        if terms is None:
            terms = self._weight_terms()
        tebd, strip, per_slot = terms
        sw, rows = self._switch_and_rows(vec, r, backend)
        rows = (rows - self.mean.index_select(0, tc)) / self.std.index_select(0, tc)
        self._check_table(rows[:, 0], vec, c, center_type, tn)  # beyond the tables: an error, never an extrapolation
        T: Optional[torch.Tensor] = None
        if not torch.jit.is_scripting():  # forces only: sums per (centre, neighbour type), tables or nets
            T = self._fused_tables(rows, sw, tn, c, center_type, strip, backend)
            if T is None:
                T = self._strip_by_type(rows, sw, tn, c, center_type, strip, backend)
        if T is None:
            g = self._embed(rows[:, 0], tn, tc, sw, tebd, strip, backend)
            T = self._contract(rows, g, sw, c, ncent, backend)
        return self._descriptor(T, filled, center_type, tebd, per_slot)

    def _descriptor(self, T: torch.Tensor, filled: torch.Tensor, center_type: torch.Tensor, tebd: torch.Tensor,
                    per_slot: torch.Tensor) -> torch.Tensor:
        """D (n_centers, dim_out) from T summed over the real neighbours (n_centers, 4, M), the slots each centre
        fills (n_centers,; the rest are empty, added here in closed form) and the weight terms (_weight_terms)."""
        n_pad = (self.nnei - filled).to(T.dtype)
        T = T + n_pad.view(-1, 1, 1) * per_slot.index_select(0, center_type)
        T = T / self.nnei
        D = torch.bmm(T.transpose(1, 2), T[:, :, : self.axis_neuron]).reshape(center_type.shape[0], -1)
        if self.concat_output_tebd:
            D = torch.cat([D, tebd.index_select(0, center_type)], 1)
        return D

    @torch.jit.unused
    def _forward_padded(self, edge_vec, center, center_type, neighbor_type, backend: Backend):
        """forward() for DeePMD's own padded layout (forces.evaluate, padded: the MD engine's sync-free
        path on a GPU): nnei slots per centre, centre-major, one block for neighbours of any type (neighbor_type
        the slot's atom's), an empty slot holding a vector beyond rcut.  Every shape is known on the host, so
        nothing is read back from the device: G on every slot, the slots that hold no real neighbour (empty, or an
        excluded pair) zeroed in R, G and the switch (the attention's unfilled slots, as in the edge list's dense
        blocks, here one (centre, nnei) block: nothing beyond it), the empty ones then added in closed form as
        there (_descriptor).  An edge outside a compressed model's tables is recorded with dpmd.model.deferred
        when a caller collects such flags (else it is an error at once)."""
        dtype, nt = self.mean.dtype, self.ntypes
        ncent, nnei = center_type.shape[0], self.nnei
        vec = edge_vec.to(dtype)
        r = torch.linalg.vector_norm(vec, 2.0, dim=-1)
        inside = r < self.rcut
        tc = center_type.index_select(0, center)
        real = inside
        for code in self.excluded_pairs:
            real = real & (tc * nt + neighbor_type != code)
        mask = real.to(dtype).unsqueeze(1)
        terms = self._cached_weight_terms(backend)
        tebd, strip, per_slot = self._weight_terms() if terms is None else terms
        sw, rows = self._switch_and_rows(vec, r, backend)
        rows = (rows - self.mean.index_select(0, tc)) / self.std.index_select(0, tc)
        self._check_table(rows[:, 0], edge_vec, center, center_type, neighbor_type, True, real)
        g = self._embed(rows[:, 0], neighbor_type, tc, sw, tebd, strip, backend) * mask
        R, sw = (rows * mask).view(ncent, nnei, 4), (sw.unsqueeze(1) * mask).view(ncent, nnei, 1)
        G = g.view(ncent, nnei, self.width)
        if len(self.attention) > 0:
            G = self._attend(G, R, sw, mask.view(ncent, nnei, 1), backend)
        filled = inside.view(ncent, nnei).sum(1)
        return self._descriptor(torch.bmm(R.transpose(1, 2), G), filled, center_type, tebd, per_slot)

    def _weight_terms(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """What depends on the weights alone: the type embedding (ntypes + 1, tebd_dim), the strip net's table
        (_strip_table; empty in concat mode) and what one empty slot adds to T per centre type (ntypes, 4, M)."""
        tebd = self.type_embedding()
        strip = self._strip_table(tebd) if self.embedding_strip is not None else tebd.new_zeros(0)
        return tebd, strip, self._padding_per_slot(tebd, strip)

    @torch.jit.unused
    def _cached_weight_terms(self, backend: Backend):
        """_weight_terms, computed once per set of weights while only forces are asked for (Backend.forces_only:
        no gradient to the weights) of a model in eval mode; None otherwise (training, whose optimizer may
        update the weights without bumping their version counters; vmap)."""
        if not backend.forces_only or self.training:
            return None
        tensors = [self.mean, self.std] + list(self.parameters()) + self._tables()  # (the padding's: from the table)
        return cached_on_weights(self, "_weight_terms_cache", tensors, self._weight_terms, [self.pad_type])

    def _contract(self, rows: torch.Tensor, g: torch.Tensor, sw: torch.Tensor, c: torch.Tensor, ncent: int,
                  backend: Optional[Backend]):
        """sum_j R_j^T G_j (n_centers, 4, M) over the real neighbours (rows (n, 4), G (n, M), switch (n,), centres
        c (n,) in any order), G through the attention layers first.  Without attention: EmbeddingTable._block (the
        kernel library's contraction where the backend, or a frozen model, has it).  Else the centres, in order of
        their neighbour counts, go in groups of `block`, each a dense (centre, slot) block as wide as its largest
        count (unfilled slots zero): little padding, as the counts in a group are alike."""
        if len(self.attention) == 0:  # EmbeddingTable's contraction, edges sorted by centre
            if c.shape[0] > 1 and bool((c[1:] < c[:-1]).any()):
                order = torch.argsort(c, stable=True)
                rows, g, c = rows.index_select(0, order), g.index_select(0, order), c.index_select(0, order)
            return self._block(rows, g, c, ncent, 0, backend)
        n = c.shape[0]
        count = torch.bincount(c, minlength=ncent)
        sorted_count, by_count = torch.sort(count, stable=True)
        position = torch.empty_like(by_count).index_copy(0, by_count, torch.arange(ncent, device=c.device))
        key = position.index_select(0, c)  # each edge's centre, numbered in order of counts
        key, order = torch.sort(key, stable=True)
        first = torch.cumsum(sorted_count, 0) - sorted_count  # first edge of each centre in this order
        slot = torch.arange(n, device=c.device) - first.index_select(0, key)
        rows, g, sw = rows.index_select(0, order), g.index_select(0, order), sw.index_select(0, order)
        starts = list(range(0, ncent, self.block))
        # the groups' widths and first edges, read in one go
        bounds: List[int] = torch.cat([sorted_count, first, first.new_full([1], n)]).tolist()
        parts: List[torch.Tensor] = []
        for c0 in starts:
            c1 = min(c0 + self.block, ncent)
            nb, width, e0, e1 = c1 - c0, bounds[c1 - 1], bounds[ncent + c0], bounds[ncent + c1]
            flat = (key[e0:e1] - c0) * width + slot[e0:e1]
            R = rows.new_zeros([nb * width, 4]).index_copy(0, flat, rows[e0:e1]).view(nb, width, 4)
            G = g.new_zeros([nb * width, self.width]).index_copy(0, flat, g[e0:e1]).view(nb, width, self.width)
            if len(self.attention) > 0 and width > 0:
                real = rows.new_zeros(nb * width).index_fill(0, flat, 1.0).view(nb, width, 1)
                w = sw.new_zeros(nb * width).index_copy(0, flat, sw[e0:e1]).view(nb, width, 1)
                G = self._attend(G, R, w, real, backend)
            parts.append(torch.bmm(R.transpose(1, 2), G))
        if len(parts) == 0:
            return rows.new_zeros([0, 4, self.width])
        return torch.cat(parts).index_select(0, position)

    @torch.jit.unused
    def _fused_tables(self, rows: torch.Tensor, sw: torch.Tensor, tn: torch.Tensor, c: torch.Tensor,
                      center_type: torch.Tensor, strip: torch.Tensor, backend: Backend):
        """T of a compressed model in the fused tabulated contraction (EmbeddingTable._fused_block:
        sum_e r_e^T G(r_e[0]), forces only); None where it does not apply.  With gs the tabulated radial net and
        gt the strip table's row of (centre type, neighbour type t), G = gs (1 + gt [sw]), so per centre
            T = sum_t [ sum_{j of type t} R_j^T gs(s_j) + (sum_{j of type t} [sw_j] R_j^T gs(s_j)) * gt ],
        the inner sums over edges keyed by (centre, t); rows (s, sw R) carry s, the table's input, first."""
        if not self._fused_kernels(backend):
            return None
        ncent, nt = center_type.shape[0], self.ntypes
        key = c * nt + tn
        order = torch.argsort(key)
        rows, key = rows.index_select(0, order), key.index_select(0, order)
        sums = self._fused_block(0, rows, key, ncent * nt, backend)
        if sums is None:
            return None
        if self.smooth:  # sum_j sw_j R_j^T gs(s_j) in two calls: rows (s, sw R_0..2) and (s, sw R_3, 0, 0)
            s, w = rows[:, :1], sw.index_select(0, order).unsqueeze(1) * rows
            first = self._fused_block(0, torch.cat([s, w[:, :3]], 1), key, ncent * nt, backend)
            last = self._fused_block(0, torch.cat([s, w[:, 3:], torch.zeros_like(w[:, :2])], 1), key,
                                              ncent * nt, backend)
            sums = torch.cat([sums, first[:, 1:], last[:, 1:2]], 1)  # (plain, scaled)
        return self._sum_over_types(sums, center_type, strip)

    @torch.jit.unused
    def _strip_by_type(self, rows: torch.Tensor, sw: torch.Tensor, tn: torch.Tensor, c: torch.Tensor,
                       center_type: torch.Tensor, strip: torch.Tensor, backend: Backend):
        """T of an uncompressed model in strip mode without attention, forces only, summed per (centre, neighbour
        type) as _fused_tables sums a compressed one: one contraction of the rows (R, [sw R]) with the radial net
        gs linearised in s, then the strip table's rows.  No edge-sized products with the strip table (forming G
        and its two tangents, and their backward, were most of an inference).  None where it does not apply, or
        where the keys exceed a quarter of the edges (many types: the per-key sums would cost more than the
        edge-sized products they replace)."""
        net, ncent, nt = self.embedding, center_type.shape[0], self.ntypes
        if (self.embedding_strip is None or len(self.attention) > 0 or not (backend.forces_only and backend.kernels
                and self._linearizable(0, backend)) or 4 * ncent * nt > rows.shape[0]):
            return None
        key = c * nt + tn
        order = torch.argsort(key, stable=True)
        rows, sw, key = rows.index_select(0, order), sw.index_select(0, order), key.index_select(0, order)
        s = rows[:, 0]
        gs, gp = embedding_with_tangent(net, s, weight_gradients=False, fused=backend.any_order)
        if self.smooth:
            rows = torch.cat([rows, sw.unsqueeze(1) * rows], 1)
        sums = _LinearizedContract.apply(rows, s, gs, gp, key, ncent * nt)  # (ncent * nt, 4 or 8, M)
        return self._sum_over_types(sums, center_type, strip)

    def _sum_over_types(self, sums: torch.Tensor, center_type: torch.Tensor, strip: torch.Tensor) -> torch.Tensor:
        """T (ncent, 4, M) from the sums per (centre, neighbour type t), (ncent * ntypes, 4 h, M), of R^T gs and
        (h = 2, smooth) sw R^T gs: sum_t plain (1 + gt) or plain + scaled gt, gt the strip table's row of the pair
        of types (one product and one sum: a single pass backward)."""
        ncent, nt, m = center_type.shape[0], self.ntypes, self.width
        if self.type_one_side:
            gt = strip[:nt].unsqueeze(0)  # (1, nt, M)
        else:  # rows centre type * (ntypes + 1) + neighbour type
            gt = strip.view(nt + 1, nt + 1, m).index_select(0, center_type)[:, :nt]
        factor = (gt + 1.0).unsqueeze(2) if sums.shape[1] == 4 else torch.stack([torch.ones_like(gt), gt], 2)
        return (sums.view(ncent, nt, factor.shape[2], 4, m) * factor.unsqueeze(3)).sum([1, 2])

    def _embed(self, s: torch.Tensor, tn: torch.Tensor, tc: torch.Tensor, sw: torch.Tensor, tebd: torch.Tensor,
               strip: torch.Tensor, backend: Optional[Backend] = None):
        """G (n, M) of neighbours with normalised s (n,), neighbour types tn, centre types tc, switch sw (n,), the
        type embedding and the strip net's table (_weight_terms)."""
        if self.embedding_strip is None:  # concat
            x = [s.unsqueeze(1), tebd.index_select(0, tn)]
            if not self.type_one_side:
                x.append(tebd.index_select(0, tc))
            return self.embedding(torch.cat(x, 1))
        gt = strip.index_select(0, tn if self.type_one_side else tc * (self.ntypes + 1) + tn)
        if not torch.jit.is_scripting():
            g = self._linearized_strip(s, gt, sw, backend)
            if g is not None:
                return g
        gs = self.embed(0, s, backend)  # the radial net, or its table
        if self.smooth:
            gt = gt * sw.unsqueeze(1)
        return torch.addcmul(gs, gs, gt)  # gs * gt + gs, DeePMD-kit's G

    @torch.jit.unused
    def _linearized_strip(self, s: torch.Tensor, gt: torch.Tensor, sw: torch.Tensor, backend: Optional[Backend]):
        """The strip mode's G = gs(s) (1 + gt [sw]) with the radial net linearised in s (dpmd.model.network: exact
        value and forces, no second derivative in s) where the backend allows it (Backend.linearize), else None.
        For forces only, G is a constant linearised in s and sw alike: its backward is two dot products."""
        net = self.embedding
        if not self._linearizable(0, backend):
            return None
        if backend.forces_only:
            with torch.no_grad():
                gs, gp = embedding_with_tangent(net, s, weight_gradients=False, fused=backend.any_order)
                f = torch.addcmul(torch.ones_like(gt), gt, sw.unsqueeze(1)) if self.smooth else gt + 1.0
                g, dg_ds, dg_dsw = gs * f, gp * f, gs * gt
            g = linearize_at(g, dg_ds, s)
            return linearize_at(g, dg_dsw, sw) if self.smooth else g
        gs = linearize_at(*embedding_with_tangent(net, s, fused=backend.any_order), s)
        if self.smooth:
            gt = gt * sw.unsqueeze(1)
        return torch.addcmul(gs, gs, gt)

    def _strip_table(self, tebd: torch.Tensor) -> torch.Tensor:
        """The strip net of every neighbour type (one side), or of every (centre, neighbour) pair of types
        (padding type included), row centre * (ntypes + 1) + neighbour: DeePMD-kit's table."""
        net = self.embedding_strip
        assert net is not None
        if self.type_one_side:
            return net(tebd)
        n = tebd.shape[0]
        pairs = torch.cat([tebd.unsqueeze(0).expand(n, n, -1), tebd.unsqueeze(1).expand(n, n, -1)], 2)
        return net(pairs.reshape(n * n, -1))

    def _padding_per_slot(self, tebd: torch.Tensor, strip: torch.Tensor) -> torch.Tensor:
        """(ntypes, 4, M): what one empty slot adds to T around a centre of each type (R_pad^T G_pad)."""
        nt = self.ntypes
        pad_row = -self.mean / self.std  # (nt, 4): a zero row, normalised
        centre = torch.arange(nt, device=pad_row.device)
        pad = torch.full([nt], self.pad_type, dtype=torch.long, device=pad_row.device)
        g = self._embed(pad_row[:, 0], pad, centre, pad_row.new_zeros(nt), tebd, strip, None)
        for layer in self.attention:  # a query that attends nothing: a v of zero
            x = g + layer.out_proj.bias
            g = nn.functional.layer_norm(x, [self.width], layer.norm.weight, layer.norm.bias, self.ln_eps)
        return pad_row.unsqueeze(2) * g.unsqueeze(1)


class _LinearizedContract(torch.autograd.Function):
    """sum_e rows_e^T G(s_e) per key (ascending), (nkeys, K, M), with G = gs linearised in s (gp its derivative,
    both constants; forces only).  Backward by the kernel library's edge_project against dT: d_rows =
    project(gs), d_s = rows . project(gp), instead of the generic contraction's edge-sized gradient of G then
    dotted with gp."""

    @staticmethod
    def forward(ctx, rows, s, gs, gp, key, nkeys: int):
        ctx.save_for_backward(rows, gs, gp, key)
        return ops.contract(rows, gs, key, nkeys)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        rows, gs, gp, key = ctx.saved_tensors
        grad = grad.contiguous()
        d_rows = torch.ops.dpmd.edge_project(gs, grad, key)
        d_s = (torch.ops.dpmd.edge_project(gp, grad, key) * rows).sum(1)
        return d_rows, d_s, None, None, None, None
