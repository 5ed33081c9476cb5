"""Velocity Verlet with a thermostat and a barostat, as an (init, step) pair sharing one loop.

One step (a symmetric Trotter splitting; OBABO for Langevin, Bussi's split CSVR, MTK-style NHC):
    thermostat half step (dt/2)
    barostat step (dt)                 stochastic cell rescaling with the pressure of the last evaluation
    v += dt/2 F/m;  x += dt v;  F = force_fn(state);  v += dt/2 F/m
    thermostat half step (dt/2)
"""

from __future__ import annotations

from typing import Callable

from dpmd.md.barostats import Barostat
from dpmd.md.state import MDState
from dpmd.md.thermostats import Thermostat
from dpmd.md.units import FTM2V


def velocity_verlet(force_fn: Callable[[MDState], MDState], dt: float, thermostat: Thermostat,
                    barostat: Barostat | None = None):
    """dt in ps.  force_fn(state) sets state.forces/energy/virial for state.positions/box.

    Returns (init, step): init(state) computes the first forces and the extended variables,
    step(state, kT, p0) advances one step (kT in eV, p0 in bar, for this step).
    """

    def init(state: MDState) -> MDState:
        state = thermostat.init(state)
        if barostat is not None:
            state = barostat.init(state)
        if state.forces is None:
            state = force_fn(state)
        return state

    def step(state: MDState, kT, p0=None) -> MDState:
        state = thermostat.half_step(state, 0.5 * dt, kT)
        if barostat is not None:
            state = barostat.step(state, dt, kT, p0)
        state.velocities = state.velocities + (0.5 * dt) * state.forces * (FTM2V / state.masses).unsqueeze(-1)
        state.positions = state.positions + dt * state.velocities
        state.step += 1
        state = force_fn(state)
        # masses read again: under MPI the force call may migrate atoms between ranks
        state.velocities = state.velocities + (0.5 * dt) * state.forces * (FTM2V / state.masses).unsqueeze(-1)
        state = thermostat.half_step(state, 0.5 * dt, kT)
        return state

    return init, step
