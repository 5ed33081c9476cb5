"""Dense networks with DeePMD-kit's layer semantics (tanh, residual connections, resnet_dt)."""

from __future__ import annotations

import torch
from torch import nn

ACTIVATIONS = {
    "tanh": torch.tanh,
    "gelu": nn.functional.gelu,
    "relu": torch.relu,
    "softplus": nn.functional.softplus,
    "sigmoid": torch.sigmoid,
    "linear": lambda x: x,
    "none": lambda x: x,
}


class Layer(nn.Module):
    """y = act(x W + b) [* idt] [+ x, or + (x, x) when the width doubles].

    The residual is added when `resnet` and the output is as wide as, or twice as
    wide as, the input; `idt` (DeePMD's `resnet_dt`) is a learnable per-channel scale.
    """

    def __init__(self, n_in, n_out, *, activation="tanh", resnet=False, use_idt=False, dtype=torch.float64,
                 generator: torch.Generator | None = None):
        super().__init__()
        std = 1.0 / (n_in + n_out) ** 0.5
        self.matrix = nn.Parameter(torch.randn(n_in, n_out, dtype=dtype, generator=generator) * std)
        self.bias = nn.Parameter(torch.randn(n_out, dtype=dtype, generator=generator))
        self.idt = nn.Parameter(0.1 + 0.001 * torch.randn(n_out, dtype=dtype, generator=generator)) if use_idt else None
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation_function {activation!r}; expected one of {sorted(ACTIVATIONS)}")
        self.activation = activation
        self.residual = resnet and n_out in (n_in, 2 * n_in)

    def _activate(self, y: torch.Tensor) -> torch.Tensor:
        # if/elif rather than a dict of callables, so that the layer can be TorchScript-compiled
        act = self.activation
        if act == "tanh":
            return torch.tanh(y)
        if act == "gelu":
            return nn.functional.gelu(y)
        if act == "relu":
            return torch.relu(y)
        if act == "softplus":
            return nn.functional.softplus(y)
        if act == "sigmoid":
            return torch.sigmoid(y)
        return y  # "linear", "none"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._activate(torch.addmm(self.bias, x, self.matrix) if x.dim() == 2 else x @ self.matrix + self.bias)
        if self.idt is not None:
            y = y * self.idt
        if self.residual:
            if y.shape[-1] == x.shape[-1]:
                return y + x
            # doubling width: y + (x, x) without materialising the concatenation
            return (y.unflatten(-1, (2, -1)) + x.unsqueeze(-2)).flatten(-2)
        return y


class MLP(nn.Module):
    """A stack of Layers; `linear_out` adds DeePMD's fitting-net output layer (no activation, no residual)."""

    def __init__(self, n_in, widths, *, activation="tanh", resnet_dt=False, linear_out=None,
                 dtype=torch.float64, generator=None):
        super().__init__()
        layers = []
        for w in widths:
            residual_possible = w in (n_in, 2 * n_in)
            layers.append(Layer(n_in, w, activation=activation, resnet=residual_possible,
                                use_idt=resnet_dt and residual_possible, dtype=dtype, generator=generator))
            n_in = w
        if linear_out is not None:
            layers.append(Layer(n_in, linear_out, activation="linear", dtype=dtype, generator=generator))
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x
