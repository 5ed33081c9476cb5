"""Stochastic cell rescaling (Bernetti & Bussi, J. Chem. Phys. 153, 114107 (2020)) as an (init, step, energy) triple.

Isotropic: eps = ln V follows the first-order stochastic equation
    d eps = -(beta_T / tau_p) (P0 - P - kT/V) dt + sqrt(2 kT beta_T / (V tau_p)) dW
and positions and the box are scaled by exp(d eps / 3), velocities by exp(-d eps / 3).
Anisotropic: each diagonal strain eps_a = ln L_a (a = x, y, z) follows the same equation with
P_aa, beta_T/3 and independent noise (the same ensemble per axis: density ~ V^(N+1) exp(-beta(U + P0 V))
in the eps_a variables); off-diagonal cell components are scaled with their axes, never sheared.
P is the instantaneous pressure (kinetic + virial) of the previous force evaluation.  The energy
the scaling gives the system (kinetic change, first-order potential change -W:d eps, P0 dV) is
accumulated in state.ext_work, so pe + ke + P0 V - ext_work is (approximately) conserved.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from dpmd.md.state import MDState, kinetic_energy, kinetic_tensor, volume
from dpmd.md.units import NKTV2P


class Barostat(NamedTuple):
    init: Callable[[MDState], MDState]
    step: Callable[[MDState, float, torch.Tensor, torch.Tensor], MDState]
    energy: Callable[[MDState, torch.Tensor], torch.Tensor]


def pressure_tensor(state: MDState) -> torch.Tensor:
    """(F, 3, 3) bar; zero for open boundaries."""
    if state.box is None:
        return torch.zeros(state.nframes, 3, 3, dtype=state.positions.dtype, device=state.positions.device)
    return (kinetic_tensor(state) + state.virial) / volume(state).view(-1, 1, 1) * NKTV2P


def stochastic_cell_rescaling(damp: float, compressibility: float = 4.5e-5, mode: str = "iso") -> Barostat:
    if mode not in ("iso", "aniso"):
        raise ValueError(f"barostat mode must be iso or aniso, got {mode!r}")

    def step(state: MDState, dt: float, kT, p0) -> MDState:
        dtype, dev = state.positions.dtype, state.positions.device
        kT = torch.as_tensor(kT, dtype=dtype, device=dev).expand(state.nframes)
        p0 = torch.as_tensor(p0, dtype=dtype, device=dev).expand(state.nframes)
        vol = volume(state)
        ptens = pressure_tensor(state)
        kt_v = kT / vol * NKTV2P  # bar
        if mode == "iso":
            p = ptens.diagonal(dim1=1, dim2=2).sum(-1) / 3.0
            xi = torch.randn(state.nframes, generator=state.rng, dtype=dtype, device=dev)
            deps = (-(compressibility / damp) * (p0 - p - kt_v) * dt
                    + torch.sqrt(2.0 * kt_v * compressibility / damp * dt) * xi)
            strain = (deps / 3.0).unsqueeze(1).expand(-1, 3)
        else:
            p = ptens.diagonal(dim1=1, dim2=2)
            xi = torch.randn(state.nframes, 3, generator=state.rng, dtype=dtype, device=dev)
            c = compressibility / 3.0
            strain = (-(c / damp) * (p0.unsqueeze(1) - p - kt_v.unsqueeze(1)) * dt
                      + torch.sqrt(2.0 * kt_v * c / damp * dt).unsqueeze(1) * xi)
        mu = torch.exp(strain)                        # (F, 3) scale per Cartesian axis
        ke0 = kinetic_energy(state)
        d_pot = -(state.virial.diagonal(dim1=1, dim2=2) * strain).sum(-1)   # first-order dU
        state.positions = state.positions * mu.unsqueeze(1)
        state.box = state.box * mu.unsqueeze(1)
        state.velocities = state.velocities / mu.unsqueeze(1)
        state.ext_work = state.ext_work + (kinetic_energy(state) - ke0) + d_pot + p0 / NKTV2P * (volume(state) - vol)
        return state

    def energy(state: MDState, p0) -> torch.Tensor:
        return torch.as_tensor(p0, dtype=state.positions.dtype, device=state.positions.device) / NKTV2P * volume(state)

    return Barostat(lambda s: s, step, energy)
