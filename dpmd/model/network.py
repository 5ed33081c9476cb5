"""Dense networks with DeePMD-kit's layer semantics (tanh, residual connections, resnet_dt)."""

from __future__ import annotations

import math
import re

import torch
from torch import nn

from dpmd import ops

# DeePMD-kit's activation functions (deepmd.common.VALID_ACTIVATION; definitions: deepmd/pt/utils/utils.py
# ActivationFn): "gelu" and "gelu_tf" are both the tanh approximation, "silut" (alias "custom_silu") is silu
# continued by a tanh above a threshold (3.0, or "silut:<threshold>")
ACTIVATIONS = ("tanh", "relu", "relu6", "softplus", "sigmoid", "gelu", "gelu_tf", "silu", "silut", "linear", "none")


def parse_activation(name: str) -> tuple[str, float]:
    """(function, silut threshold) of an activation name (any case, as DeePMD-kit lowers it); ValueError for a
    name DeePMD-kit does not know."""
    lowered = name.lower()
    m = re.fullmatch(r"(silut|custom_silu)(?::(.+))?", lowered)
    if m:
        try:
            threshold = 3.0 if m[2] is None else float(m[2])
        except ValueError:
            threshold = math.nan
        if math.isfinite(threshold):
            return "silut", threshold
    elif lowered in ACTIVATIONS:
        return lowered, 3.0
    raise ValueError(f"unknown activation_function {name!r}; expected one of {', '.join(ACTIVATIONS)} "
                     f"(or silut:<threshold>)")


def silut_constants(threshold: float) -> tuple[float, float]:
    """(slope, const) continuing silu above `threshold` as tanh(slope (x - threshold)) + const (C1 there)."""
    sig = 1.0 / (1.0 + math.exp(-threshold))
    return sig + threshold * sig * (1.0 - sig), threshold * sig


def _add_residual(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """y + x, or y + (x, x) when y is twice as wide (without materialising the concatenation)."""
    if y.shape[-1] == x.shape[-1]:
        return y + x
    return (y.unflatten(-1, (2, -1)) + x.unsqueeze(-2)).flatten(-2)


class Layer(nn.Module):
    """y = act(x W + b) [* idt] [+ x, or + (x, x) when the width doubles].

    The residual is added when `resnet` and the output is as wide as, or twice as
    wide as, the input; `idt` (DeePMD's `resnet_dt`) is a learnable per-channel scale.
    """

    def __init__(self, n_in, n_out, *, activation="tanh", resnet=False, use_idt=False, dtype=torch.float64,
                 generator: torch.Generator | None = None):
        super().__init__()
        std = 1.0 / math.sqrt(n_in + n_out)
        # DeePMD-kit's draws, in its order (with its generators, see MLP: its initial weights, bit for bit)
        self.matrix = nn.Parameter(torch.empty(n_in, n_out, dtype=dtype).normal_(0.0, std, generator=generator))
        self.bias = nn.Parameter(torch.empty(n_out, dtype=dtype).normal_(0.0, 1.0, generator=generator))
        self.idt = (nn.Parameter(torch.empty(n_out, dtype=dtype).normal_(0.1, 0.001, generator=generator)) if use_idt
                    else None)
        self.activation, threshold = parse_activation(activation)
        self.silut_threshold = threshold
        self.silut_slope, self.silut_const = silut_constants(threshold)
        self.residual = resnet and n_out in (n_in, 2 * n_in)

    def _activate(self, y: torch.Tensor) -> torch.Tensor:
        # if/elif rather than a dict of callables, so that the layer can be TorchScript-compiled
        act = self.activation
        if act == "tanh":
            return torch.tanh(y)
        if act == "gelu" or act == "gelu_tf":  # both DeePMD-kit names are the tanh approximation
            return nn.functional.gelu(y, approximate="tanh")
        if act == "relu6":
            return nn.functional.relu6(y)
        if act == "silu":
            return nn.functional.silu(y)
        if act == "silut":
            tail = torch.tanh(self.silut_slope * (y - self.silut_threshold)) + self.silut_const
            return torch.where(y >= self.silut_threshold, tail, nn.functional.silu(y))
        if act == "relu":
            return torch.relu(y)
        if act == "softplus":
            return nn.functional.softplus(y)
        if act == "sigmoid":
            return torch.sigmoid(y)
        return y  # "linear", "none"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b, idt = self.matrix, self.bias, self.idt
        if x.dtype != w.dtype:  # mixed precision (MLP.compute): the weights in the input's precision
            w, b = w.to(x.dtype), b.to(x.dtype)
            idt = None if idt is None else idt.to(x.dtype)
        y = self._activate(torch.addmm(b, x, w) if x.dim() == 2 else x @ w + b)
        if idt is not None:
            y = y * idt
        if self.residual:
            return _add_residual(y, x)
        return y


# ---- DeePMD-kit's seeding: each layer draws from its own generator -----------------------------------------
#
# Net i of a descriptor (or fitting) with seed s seeds its layer k with [k, i, s] (deepmd/dpmodel/utils/seed.py
# child_seed), hashed to one integer by deepmd/pt/utils/utils.py mix_entropy (numpy SeedSequence's constants,
# but its own hash, reproduced as it is).  Drawing in DeePMD-kit's order (matrix, bias, idt) then gives
# DeePMD-kit's initial weights for the same seeds.

_M64 = 0xFFFF_FFFF_FFFF_FFFF
_INIT_A, _MIX_MULT_L, _MIX_MULT_R = 0x43B0D7E5, 0xCA01F9DD, 0x4973F715


def child_seed(seed, idx: int):
    """The seed of part `idx` of something seeded with `seed` (an int, a list of ints, or None: unseeded)."""
    if seed is None:
        return None
    return [idx, *seed] if isinstance(seed, list) else [idx, seed]


def seeded_generator(seed) -> torch.Generator | None:
    """A generator seeded as DeePMD-kit's get_generator seeds it; None (torch's global RNG) for seed None."""
    if seed is None:
        return None
    if isinstance(seed, list):
        def hashmix(v):
            v = ((v ^ _INIT_A) * _INIT_A) & _M64
            return v ^ (v >> 16)

        mixed = hashmix(seed[0])
        for v in seed[1:]:
            mixed = (_MIX_MULT_L * mixed - _MIX_MULT_R * hashmix(v)) & _M64
            mixed ^= mixed >> 16
        seed = mixed
    return torch.Generator().manual_seed(seed)


class MLP(nn.Module):
    """A stack of Layers; `linear_out` adds DeePMD's fitting-net output layer (no activation, no residual).
    seed: DeePMD-kit's seed of this net (see child_seed), or None for torch's global RNG."""

    def __init__(self, n_in, widths, *, activation="tanh", resnet_dt=False, linear_out=None,
                 dtype=torch.float64, seed=None):
        super().__init__()
        layers = []
        for k, w in enumerate(widths):
            residual_possible = w in (n_in, 2 * n_in)
            layers.append(Layer(n_in, w, activation=activation, resnet=residual_possible,
                                use_idt=resnet_dt and residual_possible, dtype=dtype,
                                generator=seeded_generator(child_seed(seed, k))))
            n_in = w
        if linear_out is not None:
            layers.append(Layer(n_in, linear_out, activation="linear", dtype=dtype,
                                generator=seeded_generator(child_seed(seed, len(widths)))))
        self.layers = nn.ModuleList(layers)
        # mixed precision (training.mixed_precision): compute in COMPUTE_DTYPES[compute], outputs in the weights'
        # precision; 0: in the weights' precision (the default, and every frozen model)
        self.compute = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.compute == 0:
            for layer in self.layers:
                x = layer(x)
            return x
        dtype = x.dtype
        x = x.to(torch.float16 if self.compute == 1 else torch.bfloat16 if self.compute == 2 else torch.float32)
        for layer in self.layers:
            x = layer(x)
        return x.to(dtype)

    def can_linearize(self) -> bool:
        return (self.compute == 0 and all(layer.activation == "tanh" for layer in self.layers)
                and self.layers[0].matrix.shape[0] == 1)


COMPUTE_DTYPES = {"float16": 1, "bfloat16": 2, "float32": 3}  # MLP.compute codes (TorchScript has no dtype dicts)


def set_compute_precision(module: nn.Module, precision: str | None) -> None:
    """Every net of `module` computes in `precision` (None: in its weights' own), as DeePMD-kit's mixed precision
    training does: matrix products and activations in float16 / bfloat16, weights and outputs in float32."""
    for m in module.modules():
        if isinstance(m, MLP):
            m.compute = 0 if precision is None else COMPUTE_DTYPES[precision]


# ---- an embedding net of one scalar, linearised in its input ------------------------------------
#
# Forces need dE/ds through a net G(s) of a scalar s.  Instead of differentiating backwards through the
# net (and, for the force loss of training, differentiating that backward pass again), the net's value
# G and derivative G' = dG/ds are computed together in one forward sweep (forward-mode, the tangent of
# every layer alongside its value), and the model sees
#     G_lin(s) = G(s0) + (s - s0) G'(s0),   s0 = s (detached):
# the same value, the same first derivative dG/ds = G', and G, G' differentiable in the weights.  The
# force loss then needs only first derivatives of the net (hand-written below, no autograd graph of the
# net), and the force-only backward is one dot product per edge.  What is lost: second derivatives with
# respect to positions (d2G/ds2 is taken as 0), so callers opt in (dpmd.ops.linearize_embeddings()).

class _Tangent(torch.autograd.Function):
    """(G, G') of an MLP at s0 (n,), a function of the weights only; backward by hand.  The elementwise work
    of each layer runs in one fused kernel-library op when the library is loaded (CPU; CUDA in a CUDA build),
    else in PyTorch."""

    @staticmethod
    def forward(ctx, mlp: MLP, fused: bool, s0: torch.Tensor, *params):
        y, yp, saved = _tangent_sweep(mlp, fused, s0, keep=True)
        ctx.mlp, ctx.fused = mlp, fused
        ctx.save_for_backward(*saved)
        return y, yp

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy, gyp):
        mlp, saved = ctx.mlp, ctx.saved_tensors
        gy = torch.zeros_like(saved[-2]) if gy is None else gy.contiguous()
        gyp = torch.zeros_like(saved[-2]) if gyp is None else gyp.contiguous()
        grads = []
        for k in range(len(mlp.layers) - 1, -1, -1):
            layer = mlp.layers[k]
            x, xp, t, tp = saved[4 * k: 4 * k + 4]
            res = _residual_kind(layer)
            if ctx.fused:
                gz, gzp, g_bias, g_idt, gres, gresp = torch.ops.dpmd.tangent_backward(gy, gyp, t, tp, layer.idt, res)
            else:
                g_idt = None
                gt, gtp = gy, gyp
                if layer.idt is not None:
                    g_idt = (gy * t).sum(0) + (gyp * tp).sum(0)
                    gt, gtp = gy * layer.idt, gyp * layer.idt
                # t' = (1 - t^2) z':  dt'/dz' = 1 - t^2,  dt'/dt = -2 t z' = -2 t t' / (1 - t^2)
                gzp = torch.ops.aten.tanh_backward(gtp, t)
                gz = torch.ops.aten.tanh_backward(gt, t).sub_(t * tp * gtp, alpha=2.0)
                g_bias = gz.sum(0)
                gres, gresp = (_residual_grad(gy), _residual_grad(gyp)) if res == 2 else (None, None)
            grads.append((torch.addmm(x.t() @ gz, xp.t(), gzp), g_bias, g_idt))
            if k > 0:
                w_t = layer.matrix.t()
                if res == 0:
                    gy, gyp = gz @ w_t, gzp @ w_t
                elif res == 1:
                    gy, gyp = torch.addmm(gy, gz, w_t), torch.addmm(gyp, gzp, w_t)
                else:  # gres, gresp are ours (fresh): accumulate into them
                    gy, gyp = gres.addmm_(gz, w_t), gresp.addmm_(gzp, w_t)
        out = []
        for (g_matrix, g_bias, g_idt), layer in zip(reversed(grads), mlp.layers):
            out += [g_matrix, g_bias] + ([g_idt] if layer.idt is not None else [])
        return (None, None, None, *out)


def _tangent_sweep(mlp: MLP, fused: bool, s0: torch.Tensor, keep: bool):
    """(G, G', what the backward needs: per layer x, x', t, t'); keep=False: nothing kept, layers in place."""
    x = s0.unsqueeze(1)
    xp = torch.ones_like(x)  # dx/ds
    saved = []
    for layer in mlp.layers:
        t = torch.addmm(layer.bias, x, layer.matrix).tanh_()
        zp = xp @ layer.matrix
        res = _residual_kind(layer)
        if fused and not keep:  # t becomes y, z' becomes y'
            torch.ops.dpmd.tangent_forward_(t, zp, x if res else None, xp if res else None, layer.idt, res)
            x, xp = t, zp
            continue
        if fused:
            tp, y, yp = torch.ops.dpmd.tangent_forward(t, zp, x if res else None, xp if res else None, layer.idt, res)
            if y.numel() == 0:
                y, yp = t, tp
        else:
            tp = torch.ops.aten.tanh_backward(zp, t)  # (1 - t^2) z'
            y, yp = t, tp
            if layer.idt is not None:
                y, yp = y * layer.idt, yp * layer.idt
            if res:
                y, yp = _add_residual(y, x), _add_residual(yp, xp)
        if keep:
            saved += [x, xp, t, tp]
        x, xp = y, yp
    return x, xp, saved


def _residual_kind(layer: Layer) -> int:
    """0: no residual, 1: y + x, 2: y + (x, x) (the width doubles)."""
    if not layer.residual:
        return 0
    return 1 if layer.matrix.shape[0] == layer.matrix.shape[1] else 2


def _residual_grad(gy: torch.Tensor) -> torch.Tensor:
    """The gradient of (x, x) -> x for a doubling residual."""
    return gy.unflatten(-1, (2, -1)).sum(-2)


class _LinearizeAt(torch.autograd.Function):
    """G_lin = G with dG_lin/ds = G' (see above); its backward is differentiable (the force loss)."""

    @staticmethod
    def forward(ctx, g, gp, s):
        ctx.save_for_backward(gp)
        return g.view_as(g)

    @staticmethod
    def backward(ctx, grad):
        (gp,) = ctx.saved_tensors
        return grad, None, (grad * gp).sum(-1)


def _layer_params(mlp: MLP) -> list[torch.Tensor]:
    params = []
    for layer in mlp.layers:
        params += [layer.matrix, layer.bias] + ([layer.idt] if layer.idt is not None else [])
    return params


def embedding_with_tangent(mlp: MLP, s0: torch.Tensor, weight_gradients: bool = True, fused: bool | None = None):
    """(G, G') = (mlp(s0[:, None]), its derivative in s0), each (n, M), differentiable in the weights only
    (weight_gradients=False: constants, computed without keeping anything).  fused: the kernel library's
    elementwise ops (None: where dpmd.ops.any_order allows them)."""
    fused = ops.any_order(s0) if fused is None else fused
    if not weight_gradients:
        with torch.no_grad():
            g, gp, _ = _tangent_sweep(mlp, fused, s0.detach(), keep=False)
        return g, gp
    return _Tangent.apply(mlp, fused, s0.detach(), *_layer_params(mlp))


def linearize_at(g: torch.Tensor, gp: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """G_lin(s) = g + (s - s0) gp: value g, derivative gp in s (differentiable again in g and gp)."""
    return _LinearizeAt.apply(g, gp, s)


def linearized_embedding(mlp: MLP, s: torch.Tensor) -> torch.Tensor:
    """mlp(s[:, None]) (n, M) with exact value and first derivative in s, differentiable in the weights;
    its second derivative in s is not available (see above)."""
    return linearize_at(*embedding_with_tangent(mlp, s), s)
