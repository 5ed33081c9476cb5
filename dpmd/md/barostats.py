"""Stochastic cell rescaling (Bernetti & Bussi, J. Chem. Phys. 153, 114107 (2020)) as an (init, step, energy) triple.

Every mode draws a strain increment eps (a 3x3 matrix) each step; box and positions (rows) become
x @ exp(eps), velocities v @ exp(-eps)^T (so p . x is unchanged).  With P the instantaneous pressure
tensor (kinetic + virial) of the previous force evaluation, beta_T the compressibility and tau_p = damp:

- iso:   eps = d(ln V)/3 * 1, with  d ln V = -(beta_T / tau_p) (P0 - P) dt + sqrt(2 kT beta_T / (V tau_p)) dW,
         P = tr P / 3: the cell keeps its shape.
- aniso: diagonal eps; each eps_aa = d ln L_a follows the same equation with P_aa and beta_T / 3 (independent
         noise); off-diagonal cell components are scaled with their axes, never sheared.
- tri:   fully flexible cell (Del Tatto, Raiteri, Bernetti & Bussi, Appl. Sci. 12, 1139 (2022)): eps is lower
         triangular in the cell's own frame (the rotation Q with box @ Q lower triangular: a along x, b in the
         xy plane); diagonal as aniso, and below it
             eps_ab = (beta_T / 3 tau_p) P_ab dt + sqrt(2 kT beta_T / (3 V tau_p)) dW_ab,
         so all six components of the symmetric stress are coupled (target: P0 on the diagonal, 0 off it).
         A triangular eps never rotates the cell: a lower-triangular box (ASE, LAMMPS) stays exactly so, any
         other keeps its orientation.  A liquid has no shear stiffness, so its cell shear wanders: use tri
         for solids.

These are equations for logarithmic strains, integrated by the exponential: the kT/V term of the
linear-in-L forms (the LAMMPS fix press/crescale) is their Ito correction, which exp() already carries.
The density sampled is V^N exp(-beta (U + P0 V)) over dV (iso), dL_x dL_y dL_z (aniso) or the six box
entries divided by a_x^2 b_y (tri: the diagonal as aniso, each tilt uniform over its a_x- or b_y-long range).
The energy the scaling gives the system (kinetic change, potential change -(W0 + W1):eps / 2 with the virials
before and after, P0 dV) is accumulated in state.ext_work, so pe + ke + P0 V - ext_work is conserved to the
accuracy of the integrator.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from dpmd.md.state import MDState, kinetic_energy, kinetic_tensor, per_frame, volume
from dpmd.md.units import NKTV2P

MODES = ("iso", "aniso", "tri")


class Barostat(NamedTuple):
    init: Callable[[MDState], MDState]
    step: Callable[[MDState, float, torch.Tensor, torch.Tensor], MDState]
    energy: Callable[[MDState, torch.Tensor], torch.Tensor]


def pressure_tensor(state: MDState) -> torch.Tensor:
    """(F, 3, 3) bar; zero for open boundaries."""
    if state.box is None:
        return torch.zeros(state.nframes, 3, 3, dtype=state.positions.dtype, device=state.positions.device)
    return (kinetic_tensor(state) + state.virial) / volume(state).view(-1, 1, 1) * NKTV2P


def cell_frame(box: torch.Tensor) -> torch.Tensor:
    """Rotations Q (F, 3, 3) with box @ Q lower triangular with a positive diagonal (the identity for such a box)."""
    q, r = torch.linalg.qr(box.mT)
    return q * r.diagonal(dim1=-2, dim2=-1).sign().unsqueeze(-2)


def stochastic_cell_rescaling(damp: float, compressibility: float = 4.5e-5, mode: str = "iso") -> Barostat:
    if mode not in MODES:
        raise ValueError(f"barostat mode must be one of {', '.join(MODES)}, got {mode!r}")

    def strain(state: MDState, dt: float, kT: torch.Tensor, p0: torch.Tensor) -> torch.Tensor:
        dtype, dev, nf = state.positions.dtype, state.positions.device, state.nframes
        eye = torch.eye(3, dtype=dtype, device=dev)
        kt_v = kT / volume(state) * NKTV2P  # bar
        ptens = pressure_tensor(state)
        if mode == "iso":
            p = ptens.diagonal(dim1=1, dim2=2).mean(-1)
            xi = torch.randn(nf, generator=state.rng, dtype=dtype, device=dev)
            dln_v = (-(compressibility / damp) * (p0 - p) * dt
                     + torch.sqrt(2.0 * kt_v * compressibility / damp * dt) * xi)
            return (dln_v / 3.0).view(-1, 1, 1) * eye
        c, tri = compressibility / 3.0, mode == "tri"
        q = cell_frame(state.box) if tri else eye          # strain and stress in the cell's frame
        coupled = torch.ones_like(eye).tril() if tri else eye
        xi = torch.randn(nf, 3, 3, generator=state.rng, dtype=dtype, device=dev) if tri else \
            torch.diag_embed(torch.randn(nf, 3, generator=state.rng, dtype=dtype, device=dev))
        drift = (c / damp) * dt * (q.mT @ ptens @ q - p0.view(-1, 1, 1) * eye)
        noise = torch.sqrt(2.0 * kt_v * c / damp * dt).view(-1, 1, 1) * xi
        return q @ ((drift + noise) * coupled) @ q.mT

    def pending_work(state: MDState) -> torch.Tensor:
        """-(W1 - W0):eps / 2 of the last scaling: with the -W0:eps booked then, dU by the trapezoid rule
        (W1 = the virial of the next force evaluation).  First order alone misses the mean of the noise's
        second-order dU, a drift of about kT / tau_p per strain component that no smaller timestep removes."""
        b = state.barostat
        if "eps" not in b:
            return torch.zeros_like(state.ext_work)
        return -0.5 * ((state.virial - b["virial"]) * b["eps"]).sum((1, 2))

    def step(state: MDState, dt: float, kT, p0) -> MDState:
        kT, p0 = per_frame(kT, state), per_frame(p0, state)
        eps = strain(state, dt, kT, p0)
        mu, mu_inv = torch.linalg.matrix_exp(torch.stack([eps, -eps]))
        vol, ke0 = volume(state), kinetic_energy(state)
        d_pot = pending_work(state) - (state.virial * eps).sum((1, 2))    # the virial is -dU/dstrain
        state.barostat = {"eps": eps, "virial": state.virial}
        state.positions = state.positions @ mu
        state.box = state.box @ mu
        state.velocities = state.velocities @ mu_inv.mT
        state.ext_work = state.ext_work + (kinetic_energy(state) - ke0) + d_pot + p0 / NKTV2P * (volume(state) - vol)
        return state

    def energy(state: MDState, p0) -> torch.Tensor:
        return per_frame(p0, state) / NKTV2P * volume(state) - pending_work(state)

    return Barostat(lambda s: s, step, energy)
