"""Energy fitting net: one MLP per atom type maps a descriptor to an atomic energy."""

from __future__ import annotations

from typing import List, Optional, Tuple

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

    def forward(self, descriptor: torch.Tensor, atype: torch.Tensor, type_counts: Optional[List[int]] = None) -> torch.Tensor:
        """Atomic energies (n,) for descriptors (n, dim_in) of atoms of types atype (n,), grouped by type in
        ascending order (see group_by_type): each net takes one contiguous block, no gather or scatter.
        type_counts: the block sizes when the caller knows them (nothing is read back from the device)."""
        counts: List[int] = (torch.bincount(atype, minlength=len(self.nets)).tolist() if type_counts is None
                             else type_counts)
        parts = torch.split(descriptor, counts)
        energies: List[torch.Tensor] = []
        for t, net in enumerate(self.nets):
            energies.append(net(parts[t]).squeeze(1))
        return torch.cat(energies) + self.energy_bias.index_select(0, atype)


def group_by_type(center: torch.Tensor, center_type: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Centres renumbered so that each type is one contiguous block, types ascending (what EnergyFitting
    takes): (new centre index of every edge, the centres' types in the new order, each centre's new
    position).  Atomic energies in the original order are e_new.index_select(0, position)."""
    n = center_type.shape[0]
    if n < 2 or bool((center_type[1:] >= center_type[:-1]).all()):  # already grouped (DeePMD data usually is)
        return center, center_type, torch.arange(n, device=center_type.device)
    order = torch.argsort(center_type, stable=True)
    position = torch.empty_like(order)
    position[order] = torch.arange(n, device=order.device)
    return position.index_select(0, center), center_type.index_select(0, order), position
