"""Training speed and accuracy on the water data with configs/water_se_e2_a.yaml.

Prints: start-up seconds (data, neighbour lists, statistics), median s/step (steps after the
first few), peak RSS, and the validation energy/force RMSE after the run on water frames not
trained on (data_2), next to DeePMD-kit 3.2's figures measured on this machine.

    python benchmarks/train_speed.py --steps 200 --threads 2
    python benchmarks/train_speed.py --steps 1000 --set model.descriptor.seed=2 --set training.seed=2
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
WATER = REPO.parent / "shared" / "data" / "water"

DEEPMD_BASELINE = {"s_per_step": (0.40, 0.42), "startup_s": 50, "rmse_f_1000": 0.35, "rmse_e_1000": (3e-3, 5e-3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--config", default=str(REPO / "configs" / "water_se_e2_a.yaml"))
    parser.add_argument("--test-frames", type=int, default=None, help="frames of data_2 used for the final RMSE (all)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, as for `dpmd train --set` (e.g. model.descriptor.seed=2)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from dpmd.runtime import keep_freed_memory

    keep_freed_memory()

    from dpmd.train.config import read_input
    from dpmd.train.freeze import freeze
    from dpmd.train.test import test_model
    from dpmd.train.trainer import Trainer

    overrides = [f"training.numb_steps={args.steps}", f"training.disp_freq={max(1, args.steps // 10)}",
                 f"training.save_freq={args.steps}",
                 f"training.training_data.systems=[{WATER / 'data_0'}, {WATER / 'data_1'}]", *args.set]
    config = read_input(args.config, overrides)
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        trainer = Trainer(config, out_dir=out, progress=False)
        startup = time.perf_counter() - t0
        # time each step through the optimizer hook
        stamps = []
        trainer.optimizer.register_step_post_hook(lambda *a: stamps.append(time.perf_counter()))
        trainer.run()
        steps = [b - a for a, b in zip(stamps[:-1], stamps[1:])][5:]
        freeze(out, Path(out) / "model.pth")
        res = test_model(Path(out) / "model.pth", [str(WATER / "data_2")], args.test_frames, log=lambda *_: None)
        lcurve = (Path(out) / "lcurve.out").read_text()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    med = statistics.median(steps)
    print(f"dpmd train, water se_e2_a (float64, batch 1 x 192 atoms), {args.threads} threads, {args.steps} steps")
    print(f"  start-up        {startup:8.2f} s        (DeePMD-kit 3.2 here: ~{DEEPMD_BASELINE['startup_s']} s)")
    print(f"  median step     {med:8.3f} s/step   (DeePMD-kit 3.2 here: 0.40-0.42 s/step; "
          f"ratio {0.41 / med:.2f}x faster)")
    print(f"  peak RSS        {rss:8.0f} MiB")
    o = res["overall"]
    print(f"  after {args.steps} steps on data_2 ({o['nframes']} frames, not trained on): "
          f"E RMSE {o['rmse_e'] * 1e3:.2f} meV/atom, F RMSE {o['rmse_f']:.3f} eV/Å")
    print("  (DeePMD-kit 3.2 after 1000 steps: F RMSE ~0.35 eV/Å, E RMSE 3-5 meV/atom)")
    print("lcurve:")
    sys.stdout.write(lcurve)


if __name__ == "__main__":
    main()
