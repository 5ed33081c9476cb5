"""`dpmd demo --quick` (run_demo): the bundled water example without labelling: neighbour statistics ->
`dpmd train` (configs/water_se_e2_a.yaml, a short run) -> `dpmd freeze` -> `dpmd test` -> NVE with
ASE's Velocity Verlet on the frozen model, checking energy conservation.

`dpmd demo` itself, the campaign, lives with the orchestrator (explore_label_train/demo.py): the core does not
import the orchestrator, which registers the command through the `dpmd.commands` entry point.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "water" / "data_0"
CONFIG = REPO / "configs" / "water_se_e2_a.yaml"
log = logging.getLogger(__name__)  # dpmd.log: stderr and the -l file


def run_demo(data: str | None = None, steps: int = 20, seed: int = 1, train_steps: int = 100,
             out_dir: str | Path = "runs/demo", threads: int | None = None) -> dict:
    from ase import Atoms, units
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution, Stationary
    from ase.md.verlet import VelocityVerlet

    from dpmd.calculator import DP
    from dpmd.data import load_system
    from dpmd.geometry.neighbor import auto_sel, neighbor_stat
    from dpmd.runtime import configure_threads, training_work
    from dpmd.train.config import read_input
    from dpmd.train.freeze import freeze
    from dpmd.train.test import test_model
    from dpmd.train.trainer import Trainer

    data = str(data or EXAMPLE)
    out = Path(out_dir)
    config = read_input(CONFIG, [f"training.training_data.systems=[{data}]", f"training.numb_steps={train_steps}",
                                 f"training.disp_freq={max(1, train_steps // 5)}", f"training.save_freq={train_steps}"])
    configure_threads(threads, work=training_work(config))   # one thread for this small system
    type_map = config["model"]["type_map"]
    rcut = config["model"]["descriptor"]["rcut"]
    system = load_system(data, type_map=type_map)
    frames = ((system.coord[f], system.atype, None if system.box is None else system.box[f])
              for f in range(system.nframes))
    max_counts, min_dist = neighbor_stat(frames, rcut, len(type_map))
    log.info(f"[1/5] neighbour statistics of {system.path}: {system.nframes} frames, {system.natoms} atoms")
    log.info(f"      max_nbor_size {max_counts} at rcut {rcut} Å, min_nbor_dist {min_dist:.3f} Å, "
             f"sel auto would be {auto_sel(max_counts)} (config: {config['model']['descriptor']['sel']})")

    log.info(f"[2/5] dpmd train {CONFIG.relative_to(REPO)} for {train_steps} steps -> {out}/lcurve.out")
    Trainer(config, out_dir=out, overwrite=True).run()   # the demo's own folder: an earlier run moves aside

    model_path = out / "model.pth"
    freeze(out, model_path)
    log.info(f"[3/5] dpmd freeze -> {model_path}")

    log.info(f"[4/5] dpmd test on {system.path} (first 10 frames)")
    test_model(model_path, [data], 10, log=lambda line: log.info("      " + line))

    atoms = Atoms(symbols=[type_map[t] for t in system.atype], positions=system.coord[0],
                  cell=system.box[0] if system.box is not None else None, pbc=system.box is not None)
    atoms.calc = DP(str(model_path))
    MaxwellBoltzmannDistribution(atoms, temperature_K=300, rng=np.random.default_rng(seed))
    Stationary(atoms)
    dyn = VelocityVerlet(atoms, timestep=0.5 * units.fs)
    energies = []

    def thermo():
        epot, ekin = atoms.get_potential_energy(), atoms.get_kinetic_energy()
        energies.append(epot + ekin)
        log.info(f"      step {dyn.nsteps:4d}  epot {epot:14.6f}  ekin {ekin:9.5f}  etot {epot + ekin:14.6f} eV  "
                 f"T {ekin / (1.5 * units.kB * len(atoms)):7.1f} K")

    log.info(f"[5/5] NVE with the frozen model, ASE Velocity Verlet, 0.5 fs, {steps} steps")
    dyn.attach(thermo, interval=max(1, steps // 5))
    dyn.run(steps)
    drift = (energies[-1] - energies[0]) / len(atoms)
    log.info(f"      total-energy change {drift:.2e} eV/atom over {steps} steps")
    return {"max_nbor_size": max_counts, "min_nbor_dist": min_dist, "energy_drift_per_atom": drift}
