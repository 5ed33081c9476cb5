"""The README's main job on the bundled water example: what a new user runs first.

Now: neighbour statistics of the data, a fresh se_e2_a model initialised from the data's
statistics, and a short NVE run with ASE's Velocity Verlet, checking energy conservation.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import yaml

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "water" / "data_0"
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "water_se_e2_a.yaml"


def run_demo(data: str | None = None, steps: int = 20, seed: int = 1) -> dict:
    import torch
    from ase import Atoms, units
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution, Stationary
    from ase.md.verlet import VelocityVerlet

    from dpmd.calculator import DP
    from dpmd.data import load_system
    from dpmd.geometry.neighbor import auto_sel, neighbor_stat
    from dpmd.model import DeepPot
    from dpmd.model.stats import init_from_data

    torch.manual_seed(seed)
    config = yaml.safe_load(CONFIG.read_text())["model"]
    type_map = config["type_map"]
    system = load_system(data or EXAMPLE, type_map=type_map)
    rcut = config["descriptor"]["rcut"]
    frames = ((system.coord[f], system.atype, None if system.box is None else system.box[f])
              for f in range(system.nframes))
    max_counts, min_dist = neighbor_stat(frames, rcut, len(type_map))
    print(f"[1/3] neighbour statistics of {system.path}: {system.nframes} frames, {system.natoms} atoms")
    print(f"      max_nbor_size {max_counts} at rcut {rcut} Å, min_nbor_dist {min_dist:.3f} Å, "
          f"sel auto = {auto_sel(max_counts)}")

    config["descriptor"]["sel"] = auto_sel(max_counts)
    model = DeepPot(config)
    init_from_data(model, [system])
    print(f"[2/3] fresh se_e2_a model, sel {model.sel}, energy bias {model.fitting.energy_bias.tolist()} eV")

    atoms = Atoms(symbols=[type_map[t] for t in system.atype], positions=system.coord[0],
                  cell=system.box[0] if system.box is not None else None, pbc=system.box is not None)
    atoms.calc = DP(model)
    MaxwellBoltzmannDistribution(atoms, temperature_K=300, rng=np.random.default_rng(seed))
    Stationary(atoms)
    dyn = VelocityVerlet(atoms, timestep=0.5 * units.fs)
    energies = []

    def log():
        epot, ekin = atoms.get_potential_energy(), atoms.get_kinetic_energy()
        energies.append(epot + ekin)
        print(f"      step {dyn.nsteps:4d}  epot {epot:14.6f}  ekin {ekin:9.5f}  etot {epot + ekin:14.6f} eV  "
              f"T {ekin / (1.5 * units.kB * len(atoms)):7.1f} K")

    print(f"[3/3] NVE, ASE Velocity Verlet, 0.5 fs, {steps} steps")
    dyn.attach(log, interval=max(1, steps // 10))
    dyn.run(steps)
    drift = (energies[-1] - energies[0]) / len(atoms)
    print(f"      total-energy change {drift:.2e} eV/atom over {steps} steps")
    return {"max_nbor_size": max_counts, "min_nbor_dist": min_dist, "energy_drift_per_atom": drift}
