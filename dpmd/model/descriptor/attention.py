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
        folded into the exponent's affine part, where that bound holds and is small.  For forces only
        (Backend.forces_only, and linearize: not the reference) the smooth softmax and the normalisations run
        with hand-written backward passes (_SmoothAttention, _Normalize): fewer slots x slots passes than
        autograd's."""
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
        if not torch.jit.is_scripting():
            # (forces only, where the backend allows first-derivative shortcuts: not reference_only())
            by_hand = backend is not None and backend.forces_only and backend.linearize and bounded and self.smooth
        offset = gate
        if self.smooth and bounded and not by_hand:
            offset = gate * self.attn_shift - (self.attn_shift + self.scale)
        h = self.hidden
        for layer in self.attention:
            # q, k, v from slices of in_proj (no chunk: its backward would concatenate edge-sized gradients)
            w, b = layer.in_proj.matrix, layer.in_proj.bias
            q = torch.matmul(x, w[:, :h]) + b[:h]
            k = torch.matmul(x, w[:, h:2 * h]) + b[h:2 * h]
            v = torch.matmul(x, w[:, 2 * h:]) + b[2 * h:]
            if by_hand and not torch.jit.is_scripting():
                o = self._smooth_attention(q, k, v, gate, weight, beyond)
            else:
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
    def _smooth_attention(self, q, k, v, gate, weight, beyond: float):
        """One smooth layer's (a v) / den of un-normalised q, k, v (forces only: hand-written backward passes)."""
        q, k, v = _Normalize.apply(q, self.scale), _Normalize.apply(k, 1.0), _Normalize.apply(v, 1.0)
        return _SmoothAttention.apply(q, k, v, gate, weight, self.attn_shift, self.attn_shift + self.scale, beyond)


# ---- forces only: the attention's first derivatives by hand (not differentiable again) ----

class _Normalize(torch.autograd.Function):
    """y = x scale / max(|x|, 1e-12) over the last axis (F.normalize, times scale)."""

    @staticmethod
    def forward(ctx, x, scale: float):
        n = torch.linalg.vector_norm(x, 2.0, dim=-1, keepdim=True).clamp_(min=1e-12)
        y = x * (scale / n)
        ctx.save_for_backward(y, n)
        ctx.scale = scale
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy):
        y, n = ctx.saved_tensors
        # dy/dx = (I - u u^T) scale / |x| with u = y / scale (where |x| was clamped: scale / 1e-12 I)
        dot = (y * gy).sum(-1, keepdim=True) * ((n > 1e-12).to(y.dtype) / (ctx.scale * ctx.scale))
        return torch.addcmul(gy, y, dot, value=-1.0).mul_(ctx.scale / n), None


class _SmoothAttention(torch.autograd.Function):
    """o = (e * weight) v / den with e = exp((q k^T + shift) gate - top), den = sum_k e + beyond (q, k, v
    normalised; DeePMD-kit's smooth softmax, shifted by its bound top)."""

    @staticmethod
    def forward(ctx, q, k, v, gate, weight, shift: float, top: float, beyond: float):
        t = torch.bmm(q, k.transpose(1, 2)).add_(shift)
        e = (t * gate).sub_(top).exp_()
        den = e.sum(-1, keepdim=True).add_(beyond)
        p = e * weight
        o = torch.bmm(p, v).div_(den)
        ctx.save_for_backward(q, k, v, gate, weight, t, e, p, den, o)
        return o

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, go):
        q, k, v, gate, weight, t, e, p, den, o = ctx.saved_tensors
        god = go / den
        dv = torch.bmm(p.transpose(1, 2), god)
        dp = torch.bmm(god, v.transpose(1, 2))
        dweight = dp * e
        dden = (god * o).sum(-1, keepdim=True)
        dz = dp.mul_(weight).sub_(dden).mul_(e)  # d/d(exponent)
        dgate = dz * t
        da = dz.mul_(gate)
        dq = torch.bmm(da, k)
        dk = torch.bmm(da.transpose(1, 2), q)
        return dq, dk, dv, dgate, dweight, None, None, None
