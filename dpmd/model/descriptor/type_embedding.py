"""DeePMD-kit's type embedding (TypeEmbedNet): each atom type as a learned vector of tebd_dim numbers.

One linear layer of the one-hot type (no activation; a bias only with use_tebd_bias; a skip connection when
tebd_dim is ntypes or 2 ntypes, as in every DeePMD-kit layer), plus a zero row for DeePMD-kit's padding type.
"""

from __future__ import annotations

import math
import re
from typing import Optional

import torch
from torch import nn

from dpmd.model.network import child_seed, seeded_generator


class TypeEmbedding(nn.Module):
    def __init__(self, ntypes: int, dim: int, bias: bool = False, dtype=torch.float64, seed=None):
        super().__init__()
        self.ntypes, self.dim = ntypes, dim
        # DeePMD-kit's draws in its order (matrix, then bias) from layer 0's generator: its initial weights
        generator = seeded_generator(child_seed(seed, 0))
        std = 1.0 / math.sqrt(ntypes + dim)
        self.matrix = nn.Parameter(torch.empty(ntypes, dim, dtype=dtype).normal_(0.0, std, generator=generator))
        self.bias: Optional[torch.Tensor] = None
        if bias:
            self.bias = nn.Parameter(torch.empty(dim, dtype=dtype).normal_(0.0, 1.0, generator=generator))
        self.residual = dim in (ntypes, 2 * ntypes)

    def forward(self) -> torch.Tensor:
        """(ntypes + 1, dim): the embedding of each type, then the padding type's zero row."""
        y = self.matrix  # = one-hot @ matrix
        bias = self.bias
        if bias is not None:
            y = y + bias
        if self.residual:
            eye = torch.eye(self.ntypes, dtype=y.dtype, device=y.device)
            y = y + (eye if self.dim == self.ntypes else torch.cat([eye, eye], 1))
        return torch.cat([y, y.new_zeros([1, self.dim])], 0)

    @staticmethod
    def deepmd_state(state: dict, prefix: str = "") -> dict:
        """DeePMD-kit's `type_embedding.embedding.embedding_net.layers.0.*` entries as ours (below `prefix`)."""
        ours = {}
        for name, value in state.items():
            if (m := re.fullmatch(r"type_embedding\.embedding\.embedding_net\.layers\.0\.(matrix|bias)", name)):
                ours[prefix + m[1]] = value
        return ours
