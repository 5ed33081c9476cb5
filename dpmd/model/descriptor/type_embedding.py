"""DeePMD-kit's type embedding (TypeEmbedNet): each atom type as a learned vector of tebd_dim numbers.

One linear layer of each type's input vector, the one-hot type or, with use_econf_tebd, the element's electronic
configuration (econf.py; the matrix is then (ECONF_DIM, tebd_dim) whatever the number of types), with no
activation, a bias only with use_tebd_bias and a skip connection (the input added) when tebd_dim is the input's
width or twice it, as in every DeePMD-kit layer; plus a zero row for DeePMD-kit's padding type.
"""

from __future__ import annotations

import math
import re
from typing import Optional

import torch
from torch import nn

from dpmd.model.network import child_seed, seeded_generator


class TypeEmbedding(nn.Module):
    def __init__(self, ntypes: int, dim: int, bias: bool = False, dtype=torch.float64, seed=None,
                 econf: Optional[torch.Tensor] = None):
        """econf: (ntypes, n) each type's input vector (econf.econf_matrix); None: the one-hot type."""
        super().__init__()
        self.ntypes, self.dim = ntypes, dim
        inputs = ntypes if econf is None else int(econf.shape[1])
        # DeePMD-kit's draws in its order (matrix, then bias) from layer 0's generator: its initial weights
        generator = seeded_generator(child_seed(seed, 0))
        std = 1.0 / math.sqrt(inputs + dim)
        self.matrix = nn.Parameter(torch.empty(inputs, dim, dtype=dtype).normal_(0.0, std, generator=generator))
        self.bias: Optional[torch.Tensor] = None
        if bias:
            self.bias = nn.Parameter(torch.empty(dim, dtype=dtype).normal_(0.0, 1.0, generator=generator))
        self.residual = dim in (inputs, 2 * inputs)
        # saved with the weights (a frozen model holds it); DeePMD-kit's checkpoints do not: its importer adds it
        self.register_buffer("econf", None if econf is None else econf.to(dtype))

    def forward(self) -> torch.Tensor:
        """(ntypes + 1, dim): the embedding of each type, then the padding type's zero row."""
        econf = self.econf
        y = self.matrix if econf is None else econf @ self.matrix  # (one-hot @ matrix is the matrix)
        bias = self.bias
        if bias is not None:
            y = y + bias
        if self.residual:
            x = torch.eye(self.ntypes, dtype=y.dtype, device=y.device) if econf is None else econf
            y = y + (x if self.dim == x.shape[1] else torch.cat([x, x], 1))
        return torch.cat([y, y.new_zeros([1, self.dim])], 0)

    @staticmethod
    def deepmd_state(state: dict, prefix: str = "") -> dict:
        """DeePMD-kit's `type_embedding.embedding.embedding_net.layers.0.*` entries as ours (below `prefix`)."""
        ours = {}
        for name, value in state.items():
            if (m := re.fullmatch(r"type_embedding\.embedding\.embedding_net\.layers\.0\.(matrix|bias)", name)):
                ours[prefix + m[1]] = value
        return ours
