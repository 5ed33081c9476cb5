"""The README's main job: what a new user runs first.

`dpmd demo` (run_campaign_demo): a complete explore-label-train campaign, configs/campaign_water_xtb.yaml:
water clusters labelled with GFN2-xTB (tblite), an ensemble of four se_e2_a models, NVT exploration at
two temperatures, selection by model deviation, until the accurate ratio converges; then the report.
Ends by logging where the trained models and the report are.

`dpmd demo --quick` (run_demo): the bundled water example without labelling: neighbour statistics ->
`dpmd train` (configs/water_se_e2_a.yaml, a short run) -> `dpmd freeze` -> `dpmd test` -> NVE with
ASE's Velocity Verlet on the frozen model, checking energy conservation.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "water" / "data_0"
CONFIG = REPO / "configs" / "water_se_e2_a.yaml"
CAMPAIGN = REPO / "configs" / "campaign_water_xtb.yaml"
log = logging.getLogger(__name__)  # dpmd.log: stderr and the -l file


def run_campaign_demo(campaign: str | Path | None = None, out_dir: str | Path | None = None,
                      threads: int | None = None) -> dict:
    """Run (or resume) the demo campaign to its end, write the report; returns models, report and decision.
    threads: the cores it uses at once (default: the campaign's threads key, else every usable core)."""
    from explore_label_train.campaign import Campaign
    from explore_label_train.config import load_campaign
    from explore_label_train.report import status_table, write_report

    from dpmd.runtime import usable_cores

    t0 = time.perf_counter()
    path = Path(campaign or CAMPAIGN)
    cfg = load_campaign(path)
    if out_dir is not None:
        cfg["work_dir"] = str(Path(out_dir).resolve())
    if threads:
        cfg["threads"] = threads
    lab = cfg["labeller"]
    log.info(f"dpmd demo: explore-label-train campaign {path} in {cfg['work_dir']}")
    log.info(f"  labels: {lab['calculator']} {lab['kwargs'] or ''}; ensemble of {cfg['train']['ensemble_size']}; "
             f"trust levels {cfg['trust']['lo']} / {cfg['trust']['hi']} eV/Å; converged when "
             f"{cfg['convergence']['accurate_ratio']:.0%} of the explored frames are accurate")
    log.info(f"  cores used at once: {cfg['threads'] or usable_cores()} "
             f"({'as asked' if cfg['threads'] else 'all this process may use; --threads N to change'})")
    camp = Campaign(cfg, log=lambda line: log.info("  " + line))
    decision = camp.run()
    log.info(status_table(camp.state))
    report = write_report(camp.state, camp.root / "report")
    last = camp.state.one("SELECT MAX(iteration) FROM iterations")
    models = [camp.model_path(last, k) for k in range(cfg["train"]["ensemble_size"])]
    labels = camp.total_labels()
    seconds = time.perf_counter() - t0
    # the demo's result: where things are (stdout, as a command's output; progress went to the log)
    print(f"finished: {decision} after {last + 1} iterations, {labels} {lab['calculator']} labels, {seconds:.0f} s")
    print(f"trained model: {models[0]}  (ensemble: {', '.join(str(m.parent.name) for m in models)} beside it)")
    print(f"training data: {camp.root / 'data'}")
    print(f"report: {report}")
    return {"decision": decision, "iterations": last + 1, "labels": labels, "models": models, "report": report,
            "seconds": seconds}


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
