"""DPA-1: the attention descriptor with type embedding (`se_atten`, alias `dpa1`; `se_atten_v2` in se_atten_v2.py).

DeePMD-kit's definition (deepmd/pt/model/descriptor/se_atten.py), evaluated on an edge list:

  neighbours of any type share one list of nnei = sel slots (mixed types);
  environment row of neighbour j of atom i:  (s, s x/r, s y/r, s z/r), s = sw(r)/r (as se_e2_a),
      normalised per centre type: R = (row - mean[t_i]) / std[t_i];
  type embedding t(type) (type_embedding.py);
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

The padding's neighbour type: DeePMD-kit gives an empty slot the type embedding of the frame's first atom
(its neighbour index -1 becomes 0), so with a non-zero mean (set_davg_zero false: concat mode, or strip mode
without smooth) its energies depend on which atom comes first.  dpmd uses type 0 (`pad_type`): DeePMD-kit's
numbers whenever the first atom is of type 0 (as in type-sorted data), and invariant under permutations.
"""

from __future__ import annotations

import re
from typing import List, Optional

import torch
from torch import nn

from dpmd.errors import ConfigError, DpmdError
from dpmd.model.descriptor.common import check_sizes, excluded_pair_codes, per_type_rows, resolved_sel
from dpmd.model.descriptor.se_a import DescriptorSeA, smooth_switch
from dpmd.model.descriptor.type_embedding import TypeEmbedding
from dpmd.model.keys import (DTYPES, activation_key, axis_neuron_key, check_cutoffs, check_exclude_types, cutoff_keys,
                             env_protection_key, exclude_types_key, neuron_key, precision_key, sel_factor, seed_key,
                             set_davg_zero_key)
from dpmd.model.network import MLP, Layer, child_seed, seeded_generator
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
        key("use_econf_tebd", bool, False, "Type embedding from the electronic configuration.", fixed=True),
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


class AttentionLayer(nn.Module):
    """One of DeePMD-kit's NeighborGatedAttentionLayer: gated self-attention (one head) over a centre's neighbours,
    a skip connection and a layer normalisation."""

    def __init__(self, width: int, hidden: int, dtype=torch.float64, seed=None, eps: float = 1e-5):
        super().__init__()
        # seeds: DeePMD-kit's [layer part, ...] (in_proj child 0 and out_proj child 1 of the attention, child 0)
        attention = child_seed(seed, 0)
        self.in_proj = Layer(width, 3 * hidden, activation="linear", dtype=dtype,
                             generator=seeded_generator(child_seed(attention, 0)))
        self.out_proj = Layer(hidden, width, activation="linear", dtype=dtype,
                              generator=seeded_generator(child_seed(attention, 1)))
        self.norm = nn.LayerNorm(width, eps=eps, dtype=dtype)  # DeePMD-kit's: weight 1, bias 0


class DescriptorSeAtten(nn.Module):
    __constants__ = ["compressed"]  # a TorchScript constant: code for compressed models is not compiled
    MIXED_TYPES = True  # one sel for neighbours of all types (read before a module exists: sel auto)

    def __init__(self, ntypes: int, sel: int, rcut: float, rcut_smth: float, neuron=(25, 50, 100),
                 axis_neuron: int = 16, tebd_dim: int = 8, tebd_input_mode: str = "concat", resnet_dt: bool = False,
                 type_one_side: bool = False, attn: int = 128, attn_layer: int = 2, attn_dotr: bool = True,
                 scaling_factor: float = 1.0, normalize: bool = True, temperature: Optional[float] = None,
                 smooth: bool = True, exclude_types=(), ln_eps: float = 1e-5,
                 activation_function: str = "tanh", dtype=torch.float64, seed=None, concat_output_tebd: bool = True,
                 use_tebd_bias: bool = False):
        super().__init__()
        check_sizes(ntypes, None, rcut, rcut_smth)
        if axis_neuron > neuron[-1]:
            raise ValueError(f"descriptor.axis_neuron={axis_neuron} exceeds the last embedding width {neuron[-1]}")
        self.ntypes, self.rcut, self.rcut_smth = ntypes, float(rcut), float(rcut_smth)
        self.sel: List[int] = [int(sel)]
        self.nnei = int(sel)
        self.mixed_types = True  # one list of neighbours of every type
        self.compressed = False
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
        self.type_embedding = TypeEmbedding(ntypes, tebd_dim, use_tebd_bias, dtype, child_seed(seed, 2))
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
                  use_tebd_bias=d["use_tebd_bias"])
        out.requires_grad_(d["trainable"])
        if not d["trainable_ln"]:
            for layer in out.attention:
                layer.norm.requires_grad_(False)
        return out

    @staticmethod
    def deepmd_state(state: dict, source: str) -> dict:
        """DeePMD-kit's `se_atten.*` and `type_embedding.*` entries as ours (its statistics hold one row per
        neighbour slot, equal for all slots)."""
        ours = TypeEmbedding.deepmd_state(state, "type_embedding.")
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

    # the statistics are se_e2_a's (DeePMD-kit's EnvMatStatSe, with nnei slots of mixed types per centre)
    kept_edges = DescriptorSeA.kept_edges

    @property
    def dim_out(self) -> int:
        return self.width * self.axis_neuron + (self.tebd_dim if self.concat_output_tebd else 0)

    def env_rows(self, edge_vec: torch.Tensor) -> torch.Tensor:
        """Un-normalised environment rows (E, 4) from edge vectors (E, 3)."""
        return self._switch_and_rows(edge_vec, torch.linalg.vector_norm(edge_vec, 2.0, dim=-1))[1]

    def _switch_and_rows(self, vec: torch.Tensor, r: torch.Tensor):
        """The switch sw(r) (E,) and the un-normalised rows (sw/r, sw/r x/r, ...) (E, 4) of vectors (E, 3)."""
        sw = smooth_switch(r, self.rcut_smth, self.rcut)
        s = (sw / r).unsqueeze(1)
        return sw, torch.cat([s, s * vec / r.unsqueeze(1)], 1)

    def forward(self, edge_vec, center, center_type, neighbor_type, backend: Optional[Backend] = None):
        """Descriptors (n_centers, dim_out) of an edge list (center (E,) in [0, n_centers), in any order)."""
        dtype = self.mean.dtype
        ncent, nt = center_type.shape[0], self.ntypes
        vec = edge_vec.to(dtype)
        r = torch.linalg.vector_norm(vec, 2.0, dim=-1)
        inside = r < self.rcut
        ct_edge = center_type.index_select(0, center)
        # slots each centre fills in DeePMD-kit's list: its neighbours within rcut, excluded ones included
        filled = torch.bincount(center[inside], minlength=ncent)
        most = int(filled.max()) if ncent > 0 else 0
        if most > self.nnei:  # DeePMD-kit would drop the farthest: refuse instead
            raise RuntimeError("descriptor: an atom has " + str(most) + " neighbours within rcut but sel allows "
                               + str(self.nnei) + "; raise descriptor.sel")
        pair = ct_edge * nt + neighbor_type
        kept = inside
        for code in self.excluded_pairs:
            kept = kept & (pair != code)
        index = torch.nonzero(kept).squeeze(1)
        vec, r, c = vec.index_select(0, index), r.index_select(0, index), center.index_select(0, index)
        tc, tn = ct_edge.index_select(0, index), neighbor_type.index_select(0, index)
        sw, rows = self._switch_and_rows(vec, r)
        rows = (rows - self.mean.index_select(0, tc)) / self.std.index_select(0, tc)
        tebd = self.type_embedding()
        g = self._embed(rows[:, :1], tn, tc, sw, tebd)
        T = self._contract(rows, g, sw, c, ncent)
        n_pad = (self.nnei - filled).to(dtype)
        T = T + n_pad.view(-1, 1, 1) * self._padding_per_slot(tebd).index_select(0, center_type)
        T = T / self.nnei
        D = torch.bmm(T.transpose(1, 2), T[:, :, : self.axis_neuron]).reshape(ncent, -1)
        if self.concat_output_tebd:
            D = torch.cat([D, tebd.index_select(0, center_type)], 1)
        return D

    def _contract(self, rows: torch.Tensor, g: torch.Tensor, sw: torch.Tensor, c: torch.Tensor, ncent: int):
        """sum_j R_j^T G_j (n_centers, 4, M) over the real neighbours (rows (n, 4), G (n, M), switch (n,), centres
        c (n,) in any order), G through the attention layers first.  The centres, in order of their neighbour
        counts, go in groups of `block`, each a dense (centre, slot) block as wide as its largest count (unfilled
        slots zero): little padding, as the counts in a group are alike."""
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
                real = torch.zeros(nb * width, dtype=torch.bool, device=c.device).index_fill(0, flat, True)
                w = sw.new_zeros(nb * width).index_copy(0, flat, sw[e0:e1]).view(nb, width, 1)
                G = self._attend(G, R, w, real.view(nb, width))
            parts.append(torch.bmm(R.transpose(1, 2), G))
        if len(parts) == 0:
            return rows.new_zeros([0, 4, self.width])
        return torch.cat(parts).index_select(0, position)

    def _embed(self, s: torch.Tensor, tn: torch.Tensor, tc: torch.Tensor, sw: torch.Tensor, tebd: torch.Tensor):
        """G (n, M) of neighbours with normalised s (n, 1), neighbour types tn, centre types tc, switch sw (n,)."""
        if self.embedding_strip is None:  # concat
            x = [s, tebd.index_select(0, tn)]
            if not self.type_one_side:
                x.append(tebd.index_select(0, tc))
            return self.embedding(torch.cat(x, 1))
        gs = self.embedding(s)
        gt = self._strip_table(tebd).index_select(0, tn if self.type_one_side else tc * (self.ntypes + 1) + tn)
        if self.smooth:
            gt = gt * sw.unsqueeze(1)
        return gs * gt + gs

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

    def _attend(self, x: torch.Tensor, R: torch.Tensor, sw: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """The attention layers on the dense block of G (centres, slots, M), with its environment rows R
        (centres, slots, 4) and switch sw (centres, slots, 1), both zero in unfilled slots, and which slots are
        filled (centres, slots)."""
        width = x.shape[1]
        gate = sw * sw.transpose(1, 2)  # sw_j sw_k
        dotr = gate  # (unused unless attn_dotr)
        if self.attn_dotr:
            rhat = nn.functional.normalize(R[:, :, 1:4], dim=-1)
            dotr = torch.bmm(rhat, rhat.transpose(1, 2))
        h = self.hidden
        for layer in self.attention:
            # q, k, v from slices of in_proj (no chunk: its backward would concatenate edge-sized gradients)
            w, b = layer.in_proj.matrix, layer.in_proj.bias
            q = torch.matmul(x, w[:, :h]) + b[:h]
            k = torch.matmul(x, w[:, h:2 * h]) + b[h:2 * h]
            v = torch.matmul(x, w[:, 2 * h:]) + b[2 * h:]
            a = torch.bmm(q, k.transpose(1, 2))
            if self.normalize:  # q.k / (|q| |k|) = normalised q . normalised k, without normalising q and k
                qn = torch.linalg.vector_norm(q, 2.0, dim=-1).clamp(min=1e-12)
                kn = torch.linalg.vector_norm(k, 2.0, dim=-1).clamp(min=1e-12)
                a = a * ((self.scale / qn).unsqueeze(2) * (1.0 / kn).unsqueeze(1))
            else:
                a = a * self.scale
            if self.smooth:
                # the block's unfilled slots give -20 like DeePMD-kit's empty ones; the nnei - width slots
                # beyond the block add exp(-20) each to the softmax's denominator
                a = (a + self.attn_shift) * gate - self.attn_shift
                top = a.amax(-1, keepdim=True).clamp(min=-self.attn_shift).detach()
                e = torch.exp(a - top)
                a = e * (gate / (e.sum(-1, keepdim=True) + (self.nnei - width) * torch.exp(-self.attn_shift - top)))
            else:
                # a large finite value instead of -inf: a centre without neighbours gets no NaN (its rows are 0)
                a = torch.softmax(a.masked_fill(~real.unsqueeze(1), -1e30), dim=-1)
                a = a * real.unsqueeze(2).to(a.dtype)
            if self.attn_dotr:
                a = a * dotr
            if self.normalize:  # a . normalised v = (a / |v|) . v
                a = a * (1.0 / torch.linalg.vector_norm(v, 2.0, dim=-1).clamp(min=1e-12)).unsqueeze(1)
            y = x + layer.out_proj(torch.bmm(a, v))
            x = nn.functional.layer_norm(y, [self.width], layer.norm.weight, layer.norm.bias, self.ln_eps)
        return x

    def _padding_per_slot(self, tebd: torch.Tensor) -> torch.Tensor:
        """(ntypes, 4, M): what one empty slot adds to T around a centre of each type (R_pad^T G_pad)."""
        nt = self.ntypes
        pad_row = -self.mean / self.std  # (nt, 4): a zero row, normalised
        centre = torch.arange(nt, device=pad_row.device)
        pad = torch.full([nt], self.pad_type, dtype=torch.long, device=pad_row.device)
        g = self._embed(pad_row[:, :1], pad, centre, pad_row.new_zeros(nt), tebd)
        for layer in self.attention:  # a query that attends nothing: a v of zero
            x = g + layer.out_proj.bias
            g = nn.functional.layer_norm(x, [self.width], layer.norm.weight, layer.norm.bias, self.ln_eps)
        return pad_row.unsqueeze(2) * g.unsqueeze(1)
