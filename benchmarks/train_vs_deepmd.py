"""Training accuracy against DeePMD-kit, like for like: same config, same data, same number of steps.

For each seed, DeePMD-kit (PyTorch backend) trains DeePMD's water se_e2_a input on data_0 + data_1 for
`--steps` steps; its initial weights (after its statistics) and the frames it drew at each step are recorded.
Then dpmd trains
  - "replay": from DeePMD-kit's initial weights on DeePMD-kit's frame sequence (same algorithm => same model), and
  - "own":    from its own initialisation and its own frame sampling with the same seeds,
and all models are evaluated on the 80 frames of data_2 (not trained on): energy RMSE per atom, force RMSE.

DeePMD-kit need not be importable here: pass the interpreter of an environment that has it, e.g.
    python -m venv --system-site-packages /tmp/dpvenv && /tmp/dpvenv/bin/pip install -c constraints.txt deepmd-kit
    PYTHONPATH=. python benchmarks/train_vs_deepmd.py --deepmd-python /tmp/dpvenv/bin/python --seeds 2 3
(DeePMD-kit 3.2's wheel carries custom ops built for torch 2.11; this model needs none: see deepmd_compat.py.)
A DeePMD-kit run is ~6 min per 1000 steps here (2 threads), dpmd's ~4 min.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WATER = REPO.parent / "shared" / "data" / "water"
DEEPMD_INPUT = REPO.parent / "shared" / "deepmd-kit" / "water_se_e2_a" / "input.json"


def make_input(steps: int, seed: int) -> dict:
    cfg = json.loads(DEEPMD_INPUT.read_text())
    cfg["model"]["descriptor"]["seed"] = cfg["model"]["fitting_net"]["seed"] = seed
    tr = cfg["training"]
    tr["training_data"]["systems"] = [str(WATER / "data_0"), str(WATER / "data_1")]
    tr["validation_data"] = {"systems": [str(WATER / "data_2")], "batch_size": 1, "numb_btch": 3}
    tr.update(numb_steps=steps, seed=seed, save_freq=steps)
    return cfg


def deepmd_worker(out: Path, steps: int, seed: int, threads: int) -> None:
    """Runs under DeePMD-kit's interpreter: train, keeping init.pt and Sample_rank_0.txt."""
    import torch

    torch.set_num_threads(threads)
    os.environ["SAMPLER_RECORD"] = "1"       # DeePMD-kit writes "Step k: sample systemI  frame[F]" lines
    out.mkdir(parents=True, exist_ok=True)
    os.chdir(out)
    (out / "input.json").write_text(json.dumps(make_input(steps, seed), indent=1))
    sys.path.insert(0, str(Path(__file__).parent))
    from deepmd_compat import prepare_deepmd_import

    prepare_deepmd_import()
    import deepmd.pt.train.training as training
    from deepmd.pt.entrypoints.main import train

    run = training.Trainer.run

    def run_and_keep_init(self):
        torch.save({"model": self.wrapper.state_dict()}, "init.pt")
        return run(self)

    training.Trainer.run = run_and_keep_init
    train("input.json", None, None, None, None, "Default")


def dpmd_train(out: Path, steps: int, seed: int, threads: int, init: Path | None, order: Path | None):
    import torch

    from dpmd.train.config import read_input
    from dpmd.train.trainer import Trainer

    torch.set_num_threads(threads)
    out.mkdir(parents=True, exist_ok=True)
    (out / "input.json").write_text(json.dumps(make_input(steps, seed)))
    trainer = Trainer(read_input(out / "input.json"), init_model=str(init) if init else None, out_dir=out,
                      progress=False)
    if order is not None:
        picks = iter([(int(s), int(f)) for s, f in
                      re.findall(r"system(\d+)\s+frame\[(\d+)\]", order.read_text())])

        def replay(self, rank=0):
            system, frame = next(picks)
            return system, torch.tensor([frame])

        trainer.sampler.next = types.MethodType(replay, trainer.sampler)
    result = trainer.run()
    return trainer.model.eval(), result["seconds_per_step"]


def holdout_errors(model) -> tuple[float, float]:
    import numpy as np

    from dpmd.data import load_systems
    from dpmd.train.test import evaluate_system

    system = load_systems([str(WATER / "data_2")], type_map=["O", "H"])[0]
    pred = evaluate_system(model, system)
    e = (pred["energy"] - system.energy) / system.natoms
    f = pred["force"].ravel() - system.force.ravel()
    return float(np.sqrt(np.mean(e ** 2))), float(np.sqrt(np.mean(f ** 2)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[10])
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--deepmd-python", default=sys.executable, help="an interpreter that can import deepmd")
    ap.add_argument("--work", type=Path, default=Path("runs/train_vs_deepmd"))
    ap.add_argument("--deepmd-worker", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.deepmd_worker:
        deepmd_worker(args.deepmd_worker, args.steps, args.seeds[0], args.threads)
        return
    from dpmd.model.io import load_model

    rows = []
    for seed in args.seeds:
        d = args.work.resolve() / f"seed{seed}"
        subprocess.run([args.deepmd_python, __file__, "--deepmd-worker", str(d / "deepmd"), "--steps",
                        str(args.steps), "--seeds", str(seed), "--threads", str(args.threads)], check=True,
                       env=dict(os.environ, OMP_NUM_THREADS=str(args.threads)), stdout=subprocess.DEVNULL)
        deepmd_model = load_model(d / "deepmd" / f"model.ckpt-{args.steps}.pt")
        rows.append((seed, "DeePMD-kit", *holdout_errors(deepmd_model.eval())))
        model, _ = dpmd_train(d / "replay", args.steps, seed, args.threads, d / "deepmd" / "init.pt",
                              d / "deepmd" / "Sample_rank_0.txt")
        rows.append((seed, "dpmd, DeePMD-kit's init and frames", *holdout_errors(model)))
        model, _ = dpmd_train(d / "own", args.steps, seed, args.threads, None, None)
        rows.append((seed, "dpmd, own init and frames", *holdout_errors(model)))
        print(*(f"{r[0]:>4} {r[1]:36s} {1000 * r[2]:8.2f} {r[3]:8.4f}" for r in rows[-3:]), sep="\n", flush=True)
    print(f"\n{'seed':>4} {'trainer':36s} {'E meV/at':>8} {'F eV/Å':>8}   ({args.steps} steps, held-out data_2)")
    for r in rows:
        print(f"{r[0]:>4} {r[1]:36s} {1000 * r[2]:8.2f} {r[3]:8.4f}")
    for name in ("DeePMD-kit", "dpmd, DeePMD-kit's init and frames", "dpmd, own init and frames"):
        f = [r[3] for r in rows if r[1] == name]
        print(f"mean F RMSE {name:36s} {sum(f) / len(f):.4f} over {len(f)} seed(s)")


if __name__ == "__main__":
    main()
