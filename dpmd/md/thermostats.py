"""Thermostats as (init, half_step, energy) triples, JAX-MD style.

The integrator (dpmd.md.integrator) applies `half_step(state, dt/2, kT)` before and after each
velocity-Verlet step (a symmetric Trotter splitting).  `energy(state, kT)` is the energy of the
thermostat's own variables entering the conserved quantity (zero for the stochastic ones, whose
work on the system is accumulated in `state.ext_work`).  kT is in eV, a (F,) tensor or a float.

- langevin:     Ornstein-Uhlenbeck velocity update (OBABO, Bussi & Parrinello 2007), damp = 1/gamma (ps);
                the noise (MDState.atom_noise: under MPI, the serial run's numbers) is projected onto zero total
                momentum (LAMMPS `fix langevin ... zero yes`).
- csvr:         canonical sampling through velocity rescaling (Bussi, Donadio & Parrinello 2007), damp = tau (ps).
- nose_hoover:  Nose-Hoover chain (Martyna, Klein & Tuckerman 1992; LAMMPS fix nvt), damp = Tdamp (ps).
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch

from dpmd.md.state import MDState, kinetic_energy, per_frame
from dpmd.md.units import MVV2E


class Thermostat(NamedTuple):
    init: Callable[[MDState], MDState]
    half_step: Callable[[MDState, float, torch.Tensor], MDState]
    energy: Callable[[MDState, torch.Tensor], torch.Tensor]


def _zero_energy(state: MDState, kT) -> torch.Tensor:
    return torch.zeros(state.nframes, dtype=state.positions.dtype, device=state.positions.device)


def none() -> Thermostat:
    return Thermostat(lambda s: s, lambda s, dt, kT: s, _zero_energy)


def langevin(damp: float) -> Thermostat:
    gamma = 1.0 / damp

    def half_step(state: MDState, dt: float, kT) -> MDState:
        c1 = math.exp(-gamma * dt)
        c2 = math.sqrt(1.0 - c1 * c1)
        m = state.masses.unsqueeze(-1)
        sigma = torch.sqrt(per_frame(kT, state).view(-1, 1, 1) / (m * MVV2E))
        kick = c2 * sigma * state.atom_noise()   # (MPI: the serial run's numbers, see MDState.atom_noise)
        sums = state.allsum(torch.cat([(m * kick).sum(dim=1), m.sum(dim=1)], dim=-1))   # (F, 4)
        kick = kick - sums[:, None, :3] / sums[:, None, 3:]                           # zero total momentum
        ke0 = kinetic_energy(state)
        state.velocities = c1 * state.velocities + kick
        state.ext_work = state.ext_work + (kinetic_energy(state) - ke0)
        return state

    return Thermostat(lambda s: s, half_step, _zero_energy)


def csvr(damp: float) -> Thermostat:
    def half_step(state: MDState, dt: float, kT) -> MDState:
        c = math.exp(-dt / damp)
        nf = state.dof
        ke = kinetic_energy(state)
        target = 0.5 * nf * per_frame(kT, state)
        noise = torch.randn(state.nframes, nf, generator=state.rng, dtype=ke.dtype, device=ke.device)
        r1 = noise[:, 0]
        s = (noise[:, 1:] ** 2).sum(dim=1)
        ke_new = (ke + (1.0 - c) * (target * (s + r1 * r1) / nf - ke)
                  + 2.0 * r1 * torch.sqrt(ke * target / nf * (1.0 - c) * c))
        alpha = torch.sqrt(torch.clamp(ke_new, min=0.0) / ke)
        state.velocities = state.velocities * alpha.view(-1, 1, 1)
        state.ext_work = state.ext_work + (ke_new - ke)
        return state

    return Thermostat(lambda s: s, half_step, _zero_energy)


def nose_hoover(damp: float, chain: int = 3) -> Thermostat:
    if chain < 1:
        raise ValueError(f"nose_hoover chain must be >= 1, got {chain}")

    def init(state: MDState) -> MDState:
        z = torch.zeros(state.nframes, chain, dtype=state.positions.dtype, device=state.positions.device)
        state.thermostat.setdefault("eta", z.clone())
        state.thermostat.setdefault("eta_dot", z.clone())
        return state

    def masses(state: MDState, kT: torch.Tensor) -> torch.Tensor:
        q = (kT * damp * damp).unsqueeze(1).repeat(1, chain)
        q[:, 0] *= state.dof
        return q

    def half_step(state: MDState, dt: float, kT) -> MDState:
        kT = per_frame(kT, state)
        q = masses(state, kT)
        eta, v = state.thermostat["eta"].clone(), state.thermostat["eta_dot"].clone()
        ke2 = 2.0 * kinetic_energy(state)
        nf = state.dof
        # dt is the length of this half step: Martyna et al. (1996) exp(iL_NHC dt) with one sub-step
        dt2, dt4, dt8 = dt, 0.5 * dt, 0.25 * dt

        def force(j, ke2):
            if j == 0:
                return (ke2 - nf * kT) / q[:, 0]
            return (q[:, j - 1] * v[:, j - 1] ** 2 - kT) / q[:, j]

        v[:, chain - 1] = v[:, chain - 1] + dt4 * force(chain - 1, ke2)
        for j in range(chain - 2, -1, -1):
            s = torch.exp(-dt8 * v[:, j + 1])
            v[:, j] = v[:, j] * s * s + dt4 * force(j, ke2) * s
        scale = torch.exp(-dt2 * v[:, 0])
        state.velocities = state.velocities * scale.view(-1, 1, 1)
        ke2 = ke2 * scale * scale
        eta = eta + dt2 * v
        for j in range(chain - 1):
            s = torch.exp(-dt8 * v[:, j + 1])
            v[:, j] = v[:, j] * s * s + dt4 * force(j, ke2) * s
        v[:, chain - 1] = v[:, chain - 1] + dt4 * force(chain - 1, ke2)
        state.thermostat["eta"], state.thermostat["eta_dot"] = eta, v
        return state

    def energy(state: MDState, kT) -> torch.Tensor:
        kT = per_frame(kT, state)
        q = masses(state, kT)
        eta, v = state.thermostat["eta"], state.thermostat["eta_dot"]
        return 0.5 * (q * v * v).sum(dim=1) + state.dof * kT * eta[:, 0] + kT * eta[:, 1:].sum(dim=1)

    return Thermostat(init, half_step, energy)


def make_thermostat(kind: str | None, damp: float = 0.1, chain: int = 3) -> Thermostat:
    if kind is None or kind == "none":
        return none()
    if kind == "langevin":
        return langevin(damp)
    if kind == "csvr":
        return csvr(damp)
    if kind == "nose_hoover":
        return nose_hoover(damp, chain)
    raise ValueError(f"unknown thermostat {kind!r}; valid: langevin, csvr, nose_hoover")
