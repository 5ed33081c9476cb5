"""DPA-1's gated self-attention over a centre's neighbours (DeePMD-kit's NeighborGatedAttention), as a mixin of
the descriptor that owns the layers (`self.attention`, a ModuleList of AttentionLayer) and its settings (hidden,
width, scale, attn_shift, smooth, attn_dotr, normalize, ln_eps, nnei): see dpmd.model.descriptor.se_atten for the
formula.  A mixin, not a submodule, so the state-dict keys stay `attention.<i>.*` (they are in every saved file's
checksum) and TorchScript compiles it with the descriptor."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from dpmd.model.network import Layer, child_seed, seeded_generator
from dpmd.ops import Backend


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


class NeighborAttention:
    """The attention layers' arithmetic on dense (centre, slot) blocks."""

    def _attend(self, x: torch.Tensor, R: torch.Tensor, sw: torch.Tensor, real: torch.Tensor,
                backend: Optional[Backend] = None) -> torch.Tensor:
        """The attention layers on the dense block of G (centres, slots, M), with its environment rows R
        (centres, slots, 4), switch sw and filled-slot indicator real (centres, slots, 1), both zero in unfilled
        slots.  The (slots x slots) arithmetic, most of the cost, is kept to a few passes: q and k normalised
        (scale folded into q) and v normalised before their products; the weights every layer shares (the gate
        sw_j sw_k or the mask, times rhat_j . rhat_k) formed once; the softmax's denominator divides the
        (slots x hidden) result instead of the weights; its shift is the bound `scale` of a normalised q . k,
        folded into the exponent's affine part, where that bound holds and is small.  Outside reference_only()
        the smooth softmax and the normalisations of a bounded layer run as one function with hand-written
        first (forces) and second (training's force loss) derivatives, _SmoothAttention: a few passes where
        autograd would take one per elementwise step and again for each step of its derivative."""
        width = x.shape[1]
        gate = sw * sw.transpose(1, 2) if self.smooth else real * real.transpose(1, 2)
        weight = gate
        if self.attn_dotr:
            rhat = nn.functional.normalize(R[:, :, 1:4], dim=-1)
            weight = gate * torch.bmm(rhat, rhat.transpose(1, 2))
        bounded = self.normalize and self.scale <= self.attn_shift  # |q.k| <= scale: exp(q.k - scale) <= 1
        # smooth: (a + 20) gate - 20 - scale, the block's unfilled slots at -20 - scale like DeePMD-kit's empty
        # ones, and the nnei - width slots beyond the block add exp(-20 - scale) each to the denominator
        beyond = (self.nnei - width) * math.exp(-self.attn_shift - self.scale)
        by_hand = False
        if not torch.jit.is_scripting():  # (not reference_only(), whose backend allows no shortcut)
            by_hand = (backend is not None and (backend.kernels or backend.any_order or backend.linearize) and bounded
                       and self.smooth)
        offset = gate
        if self.smooth and bounded and not by_hand:
            offset = gate * self.attn_shift - (self.attn_shift + self.scale)
        h = self.hidden
        for layer in self.attention:
            w, b = layer.in_proj.matrix, layer.in_proj.bias
            if by_hand and not torch.jit.is_scripting():  # one product, q, k and v split inside
                qkv = torch.addmm(b, x.reshape(-1, x.shape[-1]), w).view(x.shape[0], x.shape[1], 3 * h)
                # (linearize: no second derivative in the positions is asked for, as the embedding's)
                o = self._smooth_attention(qkv, gate, weight, beyond, not backend.linearize, backend.attention)
            else:  # q, k, v from slices of in_proj (no chunk: its backward would concatenate edge-sized gradients)
                q = torch.matmul(x, w[:, :h]) + b[:h]
                k = torch.matmul(x, w[:, h:2 * h]) + b[h:2 * h]
                v = torch.matmul(x, w[:, 2 * h:]) + b[2 * h:]
                if self.normalize:  # F.normalize's x / max(|x|, 1e-12)
                    q = q * (self.scale / torch.linalg.vector_norm(q, 2.0, dim=-1, keepdim=True).clamp(min=1e-12))
                    k = k / torch.linalg.vector_norm(k, 2.0, dim=-1, keepdim=True).clamp(min=1e-12)
                    v = v / torch.linalg.vector_norm(v, 2.0, dim=-1, keepdim=True).clamp(min=1e-12)
                else:
                    q = q * self.scale
                a = torch.bmm(q, k.transpose(1, 2))
                if self.smooth:
                    if bounded:
                        e = torch.exp(torch.addcmul(offset, a, gate))
                        den = e.sum(-1, keepdim=True) + beyond
                    else:
                        a = (a + self.attn_shift) * gate - self.attn_shift
                        top = a.amax(-1, keepdim=True).clamp(min=-self.attn_shift).detach()
                        e = torch.exp(a - top)
                        den = e.sum(-1, keepdim=True) + (self.nnei - width) * torch.exp(-self.attn_shift - top)
                else:  # softmax over the real neighbours: den sums the real slots (a product with the mask)
                    if bounded:
                        e = torch.exp(a - self.scale)
                    else:
                        top = a.masked_fill(real.transpose(1, 2) == 0, -math.inf).amax(-1, keepdim=True).detach()
                        e = torch.exp(a - torch.where(torch.isfinite(top), top, torch.zeros_like(top)))
                    # an unfilled row (or a centre without neighbours) gets 1: no 0 / 0 (its weights are 0)
                    den = torch.bmm(e, real) + (1.0 - real)
                o = torch.bmm(e * weight, v) / den
            y = x + layer.out_proj(o)
            x = nn.functional.layer_norm(y, [self.width], layer.norm.weight, layer.norm.bias, self.ln_eps)
        return x

    @torch.jit.unused
    def _smooth_attention(self, qkv, gate, weight, beyond: float, positions: bool, fused: bool):
        """One smooth layer's (a v) / den of the un-normalised projections qkv, with hand-written derivatives
        (positions: whether the second derivative reaches gate and weight, functions of the positions only;
        fused: the normalisation's row passes and the softmax's elementwise steps by the kernel library,
        csrc/kernels/attention.h)."""
        return _SmoothAttention.apply(qkv, gate, weight, self.scale, self.attn_shift, self.attn_shift + self.scale,
                                      beyond, (positions, fused))


# ---- the smooth attention's derivatives by hand: first (forces) and second (training's force loss) ----

def _split(qkv: torch.Tensor) -> torch.Tensor:
    """(centres, slots, 3 hidden) -> a (3, centres, slots, hidden) view: q, k, v."""
    return qkv.view(qkv.shape[0], qkv.shape[1], 3, -1).permute(2, 0, 1, 3)


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a . b over the last axis of (..., n) tensors, (..., 1): a batched product (no temporary of the elementwise
    products, which would cost as much again)."""
    n = a.shape[-1]
    return torch.bmm(a.reshape(-1, 1, n), b.reshape(-1, n, 1)).view(a.shape[:-1] + (1,))


# The normalisation U = x / max(|x|, 1e-12) of q, k and v and its derivatives, row by row: the kernel library's
# fused passes (fused) or the same arithmetic in PyTorch (elsewhere, and the kernels' reference in the tests).
# r = sv / |x| with sv = (scale, scale, 1); kept = [|x| > 1e-12]; see csrc/kernels/attention.h.

def _normalize(qkv: torch.Tensor, fused: bool):
    """U (3, centres, slots, hidden) and |x| (3, centres, slots, 1) of qkv (centres, slots, 3 hidden)."""
    if fused:
        return torch.ops.dpmd.attention_normalize(qkv, qkv.shape[-1] // 3)
    x = _split(qkv)
    norm = torch.linalg.vector_norm(x, 2.0, dim=-1, keepdim=True).clamp_(min=1e-12)
    return torch.div(x, norm, out=qkv.new_empty(x.shape)), norm


def _ratios(norm: torch.Tensor, scale: float):
    """r and kept."""
    return norm.new_tensor([scale, scale, 1.0]).view(3, 1, 1, 1) / norm, (norm > 1e-12).to(norm.dtype)


def _normalize_backward(U, norm, dU, scale: float, fused: bool):
    """dx = r (dU - kept (U . dU) U) in qkv's layout, and U . dU."""
    if fused:
        return torch.ops.dpmd.attention_normalize_project(U, norm, dU, scale)
    r, kept = _ratios(norm, scale)
    dot = _dot(U, dU)
    dx = U.new_empty(U.shape[1:3] + (3 * U.shape[-1],))
    torch.mul(dU, r, out=_split(dx)).addcmul_(U, dot * kept * r, value=-1.0)
    return dx, dot


def _normalize_second(gx, U, norm, scale: float, fused: bool):
    """The cotangent a_dU = r (g - kept (U . g) U) of dU (dx is linear in dU with a symmetric matrix), and U . g,
    for the cotangent gx of dx."""
    if fused:
        a_dU, gdot = torch.ops.dpmd.attention_normalize_project(U, norm, gx, scale)  # (the backward's map)
        return gdot, a_dU
    r, kept = _ratios(norm, scale)
    g = _split(gx)
    gdot = _dot(U, g)
    return gdot, (g * r).addcmul_(U, gdot * kept * r, value=-1.0)


def _normalize_second_finish(a_U, gx, U, dU, norm, dot, gdot, scale: float, fused: bool):
    """The cotangent of x from a_U (U's) and what dx = r (dU - U (U . dU)) adds, r and U being functions of x
    (U . a_U after the two terms in g and dU: U . a_U - 2 mr dot gdot; g . dx = r (g . dU - kept gdot dot))."""
    if fused:
        return torch.ops.dpmd.attention_normalize_second_finish(a_U, gx, U, dU, norm, dot, gdot, scale)
    r, kept = _ratios(norm, scale)
    g = _split(gx)
    mr = kept * r
    along = (_dot(U, a_U) + _dot(g, dU) * r - 3.0 * mr * dot * gdot) * kept
    a_U.addcmul_(g, dot * mr, value=-1.0).addcmul_(dU, gdot * mr, value=-1.0).addcmul_(U, along, value=-1.0)
    a_x = gx.new_empty(gx.shape)
    torch.div(a_U, norm, out=_split(a_x))
    return a_x


# The smooth softmax's elementwise steps between its matrix products, each one pass over (centres, slots, slots):
# the kernel library's (fused) or PyTorch's.  inner = dp weight - c and y = inner e are recomputed, not kept.

def _softmax_backward(dp, e, weight, t, gate, c, fused: bool):
    """dweight = dp e, dgate = y t, da = y gate."""
    if fused:
        return torch.ops.dpmd.attention_softmax_backward(dp, e, weight, t, gate, c)
    y = torch.addcmul(-c, dp, weight).mul_(e)
    return dp * e, y * t, y * gate


def _softmax_second(a_da, ggate, gweight, dp, e, weight, t, gate, c, positions: bool, fused: bool):
    """The cotangents a_t, a_e, a_dp, a_weight (None without positions) and a_c from those of da, dgate and
    dweight (see csrc/kernels/attention.h)."""
    if fused:
        a_t, a_e, a_dp, a_weight, a_c = torch.ops.dpmd.attention_softmax_second(a_da, ggate, gweight, dp, e, weight,
                                                                                t, gate, c, positions)
        return a_t, a_e, a_dp, a_weight if positions else None, a_c
    inner = torch.addcmul(-c, dp, weight)
    a_y = (a_da * gate).addcmul_(ggate, t)  # da = y gate, dgate = y t
    a_t = ggate * inner * e
    a_inner = a_y * e  # y = inner e, inner = dp weight - c, dweight = dp e
    a_weight = a_inner * dp if positions else None
    a_dp = torch.addcmul(gweight * e, a_inner, weight)
    return a_t, a_y.mul_(inner).addcmul_(gweight, dp), a_dp, a_weight, a_inner.sum(-1, keepdim=True).neg_()


def _softmax_second_finish(a_p, a_e, a_weight: Optional[torch.Tensor], a_t, a_da, dp, e, weight, t, gate, c, a_c,
                           den, a_den, positions: bool, fused: bool):
    """Through p = e weight and e = exp(t gate - top): a_t and a_weight updated in place, a_p with the term
    a_N V^T = (a_c / den) dp; returns a_gate (None without positions)."""
    if fused:
        a_gate = torch.ops.dpmd.attention_softmax_second_finish(a_p, a_e, a_weight if positions else a_e, a_t, a_da,
                                                                dp, e, weight, t, gate, c, a_c, den, a_den, positions)
        return a_gate if positions else None
    a_p.addcmul_(dp, a_c / den)
    a_z = a_e.addcmul_(a_p, weight).add_(a_den).mul_(e)
    a_t.addcmul_(a_z, gate)
    if a_weight is None:
        return None
    a_weight.addcmul_(a_p, e)
    return (a_z * t).addcmul_(a_da, torch.addcmul(-c, dp, weight).mul_(e))


class _SmoothAttention(torch.autograd.Function):
    """One smooth layer's o = (e * weight) V / den of the projections qkv = (q, k, v) (slots, 3 hidden): with
    U = (Uq, Uk, V) each normalised to unit length, e = exp(t gate - top), t = scale Uq Uk^T + shift,
    den = sum_k e + beyond (DeePMD-kit's smooth softmax, shifted by its bound top).  The backward is
    _SmoothAttentionBackward, whose own backward (training's second derivative) is written by hand too: autograd
    would differentiate each of the many elementwise steps of the first derivative, one slots x slots pass each."""

    @staticmethod
    def forward(ctx, qkv, gate, weight, scale: float, shift: float, top: float, beyond: float, how):
        U, norm = _normalize(qkv, how[1])  # (3, centres, slots, hidden)
        Uq, Uk, V = U.unbind(0)
        t = torch.baddbmm(qkv.new_full([1], shift), Uq, Uk.transpose(1, 2), alpha=scale)
        e = torch.addcmul(qkv.new_full([1], -top), t, gate).exp_()
        den = e.sum(-1, keepdim=True).add_(beyond)
        p = e * weight
        o = torch.bmm(p, V).div_(den)
        ctx.save_for_backward(qkv, gate, weight, U, norm, t, e, den, p, o)
        ctx.consts = (scale,) + tuple(how)
        return o

    @staticmethod
    def backward(ctx, go):
        return _SmoothAttentionBackward.apply(go, ctx.consts, *ctx.saved_tensors) + (None,) * 5


class _SmoothAttentionBackward(torch.autograd.Function):
    """_SmoothAttention's first derivatives (forward) and their derivatives (backward: by hand, the adjoint of each
    step of the forward below, then of _SmoothAttention's steps with what those add; a third derivative is
    refused: once_differentiable).  Notation: dU' is the derivative in U without the factor scale of Uq and Uk
    (sv, per slice), applied with the normalisation's."""

    @staticmethod
    def forward(ctx, go, consts, qkv, gate, weight, U, norm, t, e, den, p, o):
        # (qkv, gate, weight: _SmoothAttention's inputs, here so that the second derivative reaches them)
        scale = consts[0]
        Uq, Uk, V = U.unbind(0)
        u = go / den
        dp = torch.bmm(u, V.transpose(1, 2))
        c = _dot(u, o)  # -d/d(den)
        # d/de = inner = dp weight - c, d/d(exponent) = y = inner e
        dweight, dgate, da = _softmax_backward(dp, e, weight, t, gate, c, consts[2])
        dU = torch.empty_like(U)  # dU'
        torch.bmm(da, Uk, out=dU[0])
        torch.bmm(da.transpose(1, 2), Uq, out=dU[1])
        torch.bmm(p.transpose(1, 2), u, out=dU[2])
        # the normalisation: dx = (sv / |x|) (dU' - U (U . dU')) (where |x| was clamped: sv / 1e-12 dU')
        dqkv, dot = _normalize_backward(U, norm, dU, scale, consts[2])
        ctx.save_for_backward(U, norm, t, e, den, p, o, gate, weight, u, dp, c, da, dU, dot)
        ctx.consts = consts
        return dqkv, dgate, dweight

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gx, ggate, gweight):
        U, norm, t, e, den, p, o, gate, weight, u, dp, c, da, dU, dot = ctx.saved_tensors
        scale, positions, fused = ctx.consts
        Uq, Uk, V = U.unbind(0)
        gx = gx.contiguous()
        gdot, a_dU = _normalize_second(gx, U, norm, scale, fused)  # the cotangent of dU'
        a_dUq, a_dUk, a_dV = a_dU.unbind(0)
        # dU'q = da Uk, dU'k = da^T Uq
        a_da = torch.bmm(a_dUq, Uk.transpose(1, 2)).baddbmm_(Uq, a_dUk.transpose(1, 2))
        a_t, a_e, a_dp, a_weight, a_c = _softmax_second(a_da, ggate, gweight, dp, e, weight, t, gate, c, positions,
                                                        fused)
        # c = sum(u o), dp = u V^T, dU'v = p^T u, u = go / den
        a_u = torch.bmm(a_dp, V).addcmul_(a_c, o).baddbmm_(p, a_dV)
        a_o = a_c * u
        a_p = torch.bmm(u, a_dV.transpose(1, 2))
        a_go = a_u / den
        # ---- _SmoothAttention's steps: o = (p V) / den, p = e weight, den = sum e + beyond, e = exp(t gate - top)
        a_den = _dot(a_u, u).add_(_dot(a_o, o)).div_(den).neg_()
        a_N = a_o.div_(den)
        a_gate = _softmax_second_finish(a_p, a_e, a_weight, a_t, a_da, dp, e, weight, t, gate, c, a_c, den, a_den,
                                        positions, fused)
        # U directly: from t = scale Uq Uk^T + shift, dU', dp = u V^T, o
        a_U = torch.empty_like(U)
        torch.bmm(da, a_dUk, out=a_U[0]).baddbmm_(a_t, Uk, alpha=scale)
        torch.bmm(da.transpose(1, 2), a_dUq, out=a_U[1]).baddbmm_(a_t.transpose(1, 2), Uq, alpha=scale)
        torch.bmm(a_dp.transpose(1, 2), u, out=a_U[2]).baddbmm_(p.transpose(1, 2), a_N)
        # and through dx = r (dU' - U (U . dU')), r = sv / |x|: U = x / |x| and r depend on x
        a_qkv = _normalize_second_finish(a_U, gx, U, dU, norm, dot, gdot, scale, fused)
        return (a_go, None, a_qkv, a_gate, a_weight) + (None,) * 7
