"""Energy fitting net: one MLP per atom type maps a descriptor (with any frame and atomic parameters) to an
atomic energy."""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import nn

from dpmd.errors import DpmdError
from dpmd.model.network import MLP, child_seed


class EnergyFitting(nn.Module):
    """DeePMD-kit's GeneralFitting for energies: the nets' input is the descriptor followed by the normalised
    frame parameters (fparam - fparam_avg) * fparam_inv_std and atomic parameters (aparam - aparam_avg) *
    aparam_inv_std; the averages and inverse deviations come from the training data (dpmd.model.stats).  The
    buffers exist only for a model with such inputs, under DeePMD-kit's names, so that its checkpoints import."""

    def __init__(self, ntypes: int, dim_in: int, neuron=(240, 240, 240), resnet_dt: bool = True,
                 activation_function: str = "tanh", dtype=torch.float64, seed=None, numb_fparam: int = 0,
                 numb_aparam: int = 0, default_fparam: Optional[List[float]] = None, mixed_types: bool = False):
        super().__init__()
        self.numb_fparam, self.numb_aparam = int(numb_fparam), int(numb_aparam)
        # after a mixed-types descriptor (se_atten: its output carries the centre's type embedding) DeePMD-kit
        # fits with one net for all types
        self.mixed_types = bool(mixed_types)
        self.nets = nn.ModuleList(
            MLP(dim_in + numb_fparam + numb_aparam, list(neuron), activation=activation_function, resnet_dt=resnet_dt,
                linear_out=1, dtype=dtype, seed=child_seed(seed, t))
            for t in range(1 if mixed_types else ntypes)
        )
        # Per-type energy added to the network output (least squares on the training energies).
        self.register_buffer("energy_bias", torch.zeros(ntypes, dtype=dtype))
        for name, n in (("fparam", numb_fparam), ("aparam", numb_aparam)):
            self.register_buffer(f"{name}_avg", torch.zeros(n, dtype=dtype) if n else None)
            self.register_buffer(f"{name}_inv_std", torch.ones(n, dtype=dtype) if n else None)
        # the fparam of frames given none (DeePMD-kit registers it whenever default_fparam is set)
        self.register_buffer("default_fparam_tensor", None if default_fparam is None
                             else torch.tensor(default_fparam, dtype=dtype))

    def forward(self, descriptor: torch.Tensor, atype: torch.Tensor, type_counts: Optional[List[int]] = None,
                params: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Atomic energies (n,) for descriptors (n, dim_in) of atoms of types atype (n,), grouped by type in
        ascending order (see group_by_type): each net takes one contiguous block, no gather or scatter.
        type_counts: the block sizes when the caller knows them (nothing is read back from the device).
        params (n, numb_fparam + numb_aparam): each atom's fparam then aparam, raw (dpmd.geometry.graph.atom_params)."""
        if self.numb_fparam + self.numb_aparam > 0:
            if params is None:
                raise DpmdError("the model takes " + self.inputs_text() + ", but the graph carries none")
            descriptor = torch.cat([descriptor, self.normalised(params.to(descriptor.dtype))], 1)
        if self.mixed_types:
            return self.nets[0](descriptor).squeeze(1) + self.energy_bias.index_select(0, atype)
        counts: List[int] = (torch.bincount(atype, minlength=len(self.nets)).tolist() if type_counts is None
                             else type_counts)
        parts = torch.split(descriptor, counts)
        energies: List[torch.Tensor] = []
        for t, net in enumerate(self.nets):
            energies.append(net(parts[t]).squeeze(1))
        return torch.cat(energies) + self.energy_bias.index_select(0, atype)

    def normalised(self, params: torch.Tensor) -> torch.Tensor:
        parts: List[torch.Tensor] = []
        f_avg, f_inv, a_avg, a_inv = self.fparam_avg, self.fparam_inv_std, self.aparam_avg, self.aparam_inv_std
        if f_avg is not None and f_inv is not None:
            parts.append((params[:, :self.numb_fparam] - f_avg) * f_inv)
        if a_avg is not None and a_inv is not None:
            parts.append((params[:, self.numb_fparam:] - a_avg) * a_inv)
        return torch.cat(parts, 1)

    def inputs_text(self) -> str:
        """What the model takes, for messages: 'fparam (2 values per frame) and aparam (1 per atom)'."""
        parts: List[str] = []
        if self.numb_fparam > 0:
            parts.append("fparam (" + str(self.numb_fparam) + " value(s) per frame, numb_fparam)")
        if self.numb_aparam > 0:
            parts.append("aparam (" + str(self.numb_aparam) + " value(s) per atom, numb_aparam)")
        return " and ".join(parts) if len(parts) > 0 else "no fparam or aparam"

    def param_inputs(self, nframes: int, natoms: int, fparam: Optional[torch.Tensor] = None,
                     aparam: Optional[torch.Tensor] = None) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """The graph's fparam (nframes, numb_fparam) and aparam (nframes * natoms, numb_aparam) from what a caller
        gives, with DeePMD-kit's DeepPot.eval shapes: fparam with numb_fparam values (every frame) or
        nframes * numb_fparam; aparam with numb_aparam (every atom), natoms * numb_aparam (every frame) or
        nframes * natoms * numb_aparam.  No fparam: default_fparam if the model has one.  Anything else, or
        non-finite values: a one-line DpmdError."""
        dtype = self.energy_bias.dtype
        if fparam is None and self.numb_fparam > 0:
            fparam = self.default_fparam_tensor
        if fparam is not None:
            if self.numb_fparam == 0:
                raise DpmdError("fparam given, but the model takes none (numb_fparam = 0)")
            n = fparam.numel()
            if n != self.numb_fparam and n != nframes * self.numb_fparam:
                raise DpmdError("fparam has " + str(n) + " value(s); the model takes " + str(self.numb_fparam)
                                + " per frame (numb_fparam): give " + str(self.numb_fparam) + " (for every frame) or "
                                + str(nframes) + " x " + str(self.numb_fparam))
            fparam = fparam.to(dtype).reshape(-1, self.numb_fparam).expand(nframes, self.numb_fparam)
            if not bool(torch.isfinite(fparam).all()):
                raise DpmdError("fparam holds non-finite values")
        elif self.numb_fparam > 0:
            raise DpmdError("the model takes fparam (" + str(self.numb_fparam) + " value(s) per frame, numb_fparam) "
                            "and has no default_fparam; none was given")
        if aparam is not None:
            if self.numb_aparam == 0:
                raise DpmdError("aparam given, but the model takes none (numb_aparam = 0)")
            n, k = aparam.numel(), self.numb_aparam
            if n != k and n != natoms * k and n != nframes * natoms * k:
                raise DpmdError("aparam has " + str(n) + " value(s); the model takes " + str(k) + " per atom "
                                "(numb_aparam): give " + str(k) + " (for every atom), " + str(natoms) + " x "
                                + str(k) + " or " + str(nframes) + " x " + str(natoms) + " x " + str(k))
            aparam = aparam.to(dtype).reshape(-1, natoms if n != k else 1, k).expand(nframes, natoms, k).reshape(-1, k)
            if not bool(torch.isfinite(aparam).all()):
                raise DpmdError("aparam holds non-finite values")
        elif self.numb_aparam > 0:
            raise DpmdError("the model takes aparam (" + str(self.numb_aparam) + " value(s) per atom, numb_aparam); "
                            "none was given")
        return fparam, aparam


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


def in_type_order(values: Optional[torch.Tensor], position: torch.Tensor) -> Optional[torch.Tensor]:
    """Per-centre rows (params) moved to the order of group_by_type (row i goes to position[i])."""
    if values is None:
        return None
    return torch.empty_like(values).index_copy(0, position, values)
