"""`dpmd demo`: the README's main job, what a new user runs first.

A complete explore-label-train campaign, configs/campaign_water_xtb.yaml: water clusters labelled with GFN2-xTB
(tblite), an ensemble of four se_e2_a models, NVT exploration at two temperatures, selection by model deviation,
until the accurate ratio converges; then the report.  It prints where the trained models, the data and the report
are.  `--quick` runs dpmd's own short example instead (dpmd/demo.py: train, freeze, test, NVE; no labelling).

The command is registered with `dpmd` through the `dpmd.commands` entry point (pyproject.toml): a module with
HELP, add_arguments(parser) and run(args), so the core never imports the orchestrator.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CAMPAIGN = REPO / "configs" / "campaign_water_xtb.yaml"
HELP = "the README's main job: an active-learning campaign with GFN2-xTB labels"
log = logging.getLogger("dpmd.demo")  # set up by the dpmd command: stderr and the -l file


def add_arguments(p) -> None:
    p.add_argument("--campaign", default=None, help="campaign file (default: configs/campaign_water_xtb.yaml)")
    p.add_argument("-o", "--output", default=None,
                   help="working directory (default: runs/demo here; --quick: runs/demo-quick)")
    p.add_argument("--quick", action="store_true",
                   help="instead: train, freeze, test and NVE on the bundled water example (no labelling)")
    p.add_argument("--data", default=None, help="--quick: DeePMD system (default: examples/water/data_0)")
    p.add_argument("--steps", type=int, default=20, help="--quick: MD steps")
    p.add_argument("--train-steps", type=int, default=100, help="--quick: training steps")
    p.add_argument("--seed", type=int, default=1, help="--quick: velocity seed")


def run(args) -> None:
    # outputs go under the current directory (not beside the campaign file, which may be inside the package)
    if args.quick:
        from dpmd.demo import run_demo

        run_demo(args.data, args.steps, args.seed, args.train_steps, args.output or "runs/demo-quick", args.threads)
    else:
        run_campaign_demo(args.campaign, args.output or "runs/demo", args.threads)


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
    campaign_seconds = camp.state.one("SELECT SUM(seconds) FROM stages") or 0.0   # every run of it, resumes too
    print(f"finished: {decision} after {last + 1} iterations, {labels} {lab['calculator']} labels; "
          f"this run {seconds:.0f} s, the campaign's stages {campaign_seconds:.0f} s in all")
    print(f"trained model: {models[0]}  (ensemble: {', '.join(str(m.parent.name) for m in models)} beside it)")
    print(f"training data: {camp.root / 'data'}")
    print(f"report: {report}")
    return {"decision": decision, "iterations": last + 1, "labels": labels, "models": models, "report": report,
            "seconds": seconds, "campaign_seconds": campaign_seconds}
