"""Molecular dynamics with deep potentials (LAMMPS metal units: eV, Å, ps, amu, K, bar).

    from dpmd.md import Simulation, run_md
    run_md("input.yaml")                                   # what `dpmd md input.yaml` does
    sim = Simulation([model, model2], positions, symbols, box, ensemble="nvt",
                     thermostat={"type": "csvr", "damp": 0.1}, temperature=300, timestep=0.5)
    sim.run(1000); sim.state.positions; sim.thermo(); sim.deviation()   # run(n): n more steps
    sim.run(upto=5000)                                     # on to step 5000 in total

Pieces (JAX-MD style): dpmd.md.thermostats (langevin, csvr, nose_hoover), dpmd.md.barostats
(stochastic cell rescaling), dpmd.md.integrator.velocity_verlet -> (init, step), dpmd.md.neighbors.VerletList,
dpmd.md.provider (the force providers: checked, sync-free, MPI), dpmd.md.safety (the stop messages).
"""

from dpmd.errors import MDStopError
from dpmd.md.config import normalize_md_config, read_md_input, run_md
from dpmd.md.devi import model_deviation
from dpmd.md.engine import Simulation
from dpmd.md.state import MDState

__all__ = ["Simulation", "MDState", "MDStopError", "run_md", "read_md_input", "normalize_md_config",
           "model_deviation"]
