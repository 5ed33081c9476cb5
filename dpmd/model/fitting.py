"""Energy fitting net: one MLP per atom type maps a descriptor to an atomic energy."""

from __future__ import annotations

import torch
from torch import nn

from dpmd.model.network import MLP


class EnergyFitting(nn.Module):
    def __init__(self, ntypes: int, dim_in: int, neuron=(240, 240, 240), resnet_dt: bool = True,
                 activation_function: str = "tanh", dtype=torch.float64, generator=None):
        super().__init__()
        self.nets = nn.ModuleList(
            MLP(dim_in, list(neuron), activation=activation_function, resnet_dt=resnet_dt, linear_out=1,
                dtype=dtype, generator=generator)
            for _ in range(ntypes)
        )
        # Per-type energy added to the network output (least squares on the training energies).
        self.register_buffer("energy_bias", torch.zeros(ntypes, dtype=dtype))

    def forward(self, descriptor: torch.Tensor, atype: torch.Tensor) -> torch.Tensor:
        """Atomic energies (n,) for descriptors (n, dim_in) of atoms of types atype (n,)."""
        energy = self.energy_bias[atype]
        for t, net in enumerate(self.nets):
            idx = (atype == t).nonzero().squeeze(1)
            if idx.numel() > 0:
                energy = energy.index_add(0, idx, net(descriptor.index_select(0, idx)).squeeze(1))
        return energy
