"""Training accuracy against DeePMD-kit, like for like: same config, same data, same number of steps.

For each seed, DeePMD-kit (PyTorch backend) trains DeePMD's water se_e2_a input on data_0 + data_1 for
`--steps` steps; its initial weights (after its statistics) and the frames it drew at each step are recorded.
Then dpmd trains
  - "replay": from DeePMD-kit's initial weights on DeePMD-kit's frame sequence (same algorithm => same model),
  - "dpinit": from DeePMD-kit's initial weights on its own frame sampling (--modes dpinit:
              separates the initialisation from the sampling), and
  - "own":    a plain `dpmd train` of the same input and seed: its initial weights, statistics and frames are
              DeePMD-kit's draws (dpmd/model/network.py child_seed, dpmd/train/sampler.py), so it starts from
              DeePMD-kit's init.pt and trains on its frames (recorded in own/frames.txt and compared with its
              Sample_rank_0.txt; printed per seed): the same model as "replay"
and all models are evaluated on the 80 frames of data_2 (not trained on): energy RMSE per atom, force RMSE.
Every `--eval-every` steps each trainer saves a checkpoint and the time since its training loop began, so the
script also prints RMSE-vs-step and RMSE-vs-wall-time curves (mean over seeds), and writes all numbers to
`<work>/results.json`.
The lr falls to 5e-5 by step 300 of 1000, so each run is decided by its first ~200 updates: the spread over seeds
is 0.05-0.1 eV/Å in F (11 seeds of dpmd: 0.29-0.42 at step 300), so compare means over many seeds, not 2 or 3.
DeePMD-kit's frames depend on its DataLoader worker count (NUM_WORKERS, default min(4, cpus)); dpmd follows the
same rule, so both sides of one run (same machine, same environment) draw the same frames.

DeePMD-kit need not be importable here: pass the interpreter of an environment that has it.  The script
benchmarks/deepmd_env.sh builds one (DeePMD-kit 3.2.0 compiled from its sdist against the torch on disk,
~3 min) and prints its interpreter:
    PY=$(bash benchmarks/deepmd_env.sh | tail -1)
    PYTHONPATH=. python benchmarks/train_vs_deepmd.py --deepmd-python $PY --seeds 1 2 3
Without DeePMD-kit (or with --no-deepmd) only dpmd's own run is made and its curve printed.
A DeePMD-kit run is ~6 min per 1000 steps here (2 threads), dpmd's ~3-4 min.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import time
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WATER = REPO.parent / "shared" / "data" / "water"
DEEPMD_INPUT = REPO.parent / "shared" / "deepmd-kit" / "water_se_e2_a" / "input.json"
DEEPMD = "DeePMD-kit"
REPLAY = "dpmd, DeePMD-kit's init and frames"
DPINIT = "dpmd, DeePMD-kit's init, own frames"
OWN = "dpmd, own init and frames"
# --modes: (results name, run sub-folder, starts from DeePMD-kit's init.pt, replays its Sample_rank_0.txt)
MODES = {"replay": (REPLAY, "replay", True, True), "dpinit": (DPINIT, "dpinit", True, False),
         "own": (OWN, "own", False, False)}


def make_input(steps: int, seed: int, eval_every: int) -> dict:
    cfg = json.loads(DEEPMD_INPUT.read_text())
    cfg["model"]["descriptor"]["seed"] = cfg["model"]["fitting_net"]["seed"] = seed
    tr = cfg["training"]
    tr["training_data"]["systems"] = [str(WATER / "data_0"), str(WATER / "data_1")]
    tr["validation_data"] = {"systems": [str(WATER / "data_2")], "batch_size": 1, "numb_btch": 3}
    tr.update(numb_steps=steps, seed=seed, save_freq=eval_every, max_ckpt_keep=steps // eval_every + 2)
    return cfg


def deepmd_worker(out: Path, steps: int, seed: int, threads: int, eval_every: int) -> None:
    """Runs under DeePMD-kit's interpreter: train, keeping init.pt, Sample_rank_0.txt and times.json."""
    import torch

    torch.set_num_threads(threads)
    os.environ["SAMPLER_RECORD"] = "1"       # DeePMD-kit writes "Step k: sample systemI  frame[F]" lines
    out.mkdir(parents=True, exist_ok=True)
    os.chdir(out)
    (out / "input.json").write_text(json.dumps(make_input(steps, seed, eval_every), indent=1))
    sys.path.insert(0, str(Path(__file__).parent))
    from deepmd_compat import prepare_deepmd_import

    prepare_deepmd_import()
    import deepmd.pt.train.training as training
    from deepmd.pt.entrypoints.main import train

    run, save_model = training.Trainer.run, training.Trainer.save_model
    times: dict[int, float] = {}
    t_main = time.perf_counter()

    def run_and_keep_init(self):
        torch.save({"model": self.wrapper.state_dict()}, "init.pt")
        times[0] = 0.0
        self._t0 = time.perf_counter()
        startup = self._t0 - t_main
        run(self)
        (out / "times.json").write_text(json.dumps({"startup": startup, "steps": times}))

    def save_and_time(self, path, lr=0.0, step=0, **kw):
        times.setdefault(step + 1, time.perf_counter() - self._t0)   # step: the 0-based id of the step just made
        return save_model(self, path, lr, step, **kw)

    training.Trainer.run, training.Trainer.save_model = run_and_keep_init, save_and_time
    train("input.json", None, None, None, None, "Default")


def dpmd_train(out: Path, steps: int, seed: int, threads: int, eval_every: int, init: Path | None,
               order: Path | None) -> dict:
    """Train dpmd; checkpoints every eval_every steps; returns {step: seconds since the loop began}, startup."""
    import torch

    import dpmd.train.trainer as trainer_mod
    from dpmd.train.config import read_input

    torch.set_num_threads(threads)
    out.mkdir(parents=True, exist_ok=True)
    (out / "input.json").write_text(json.dumps(make_input(steps, seed, eval_every)))
    t_main = time.perf_counter()
    trainer = trainer_mod.Trainer(read_input(out / "input.json"), init_model=str(init) if init else None,
                                  out_dir=out, progress=False)
    startup = time.perf_counter() - t_main
    if order is not None:
        picks = iter([(int(s), int(f)) for s, f in
                      re.findall(r"system(\d+)\s+frame\[(\d+)\]", order.read_text())])

        def replay(self, rank=0):
            system, frame = next(picks)
            return system, torch.tensor([frame])

        trainer.sampler.next = types.MethodType(replay, trainer.sampler)
    else:   # record dpmd's own frames in DeePMD-kit's Sample_rank_0.txt format, to compare the sequences
        draw, drawn = trainer.sampler.next, []

        def record(rank=0):
            system, frames = draw(rank)
            drawn.append(f"Step {len(drawn)}: sample system{system}  frame{frames.tolist()}\n")
            return system, frames

        trainer.sampler.next = record
    save, times = trainer_mod.save_checkpoint, {0: 0.0}
    torch.save({"model": trainer.model.state_dict(), "model_config": trainer.model.config}, out / "init.pt")

    def save_and_time(state, prefix, step, keep):
        times.setdefault(step, time.perf_counter() - t0)
        return save(state, prefix, step, keep)

    trainer_mod.save_checkpoint = save_and_time
    try:
        t0 = time.perf_counter()
        trainer.run()
    finally:
        trainer_mod.save_checkpoint = save
    if order is None:
        (out / "frames.txt").write_text("".join(drawn))
    result = {"startup": startup, "steps": times}
    (out / "times.json").write_text(json.dumps(result))
    return result


def frames_of(path: Path) -> list[tuple[int, list[int]]]:
    """(system, frames) of each step of a Sample_rank_0.txt (DeePMD-kit) or frames.txt (dpmd)."""
    return [(int(s), [int(x) for x in f.split(",")]) for s, f in
            re.findall(r"system(\d+)\s+frame\[([\d, ]+)\]", path.read_text())]


def same_frames(ours: Path, theirs: Path) -> str:
    a, b = frames_of(ours), frames_of(theirs)
    same = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return f"{same} of {len(b)} steps" + ("" if same == len(a) == len(b) else f" (first difference at step {same})")


def holdout_errors(model) -> tuple[float, float]:
    import numpy as np

    from dpmd.data import load_systems
    from dpmd.train.test import evaluate_system

    system = load_systems([str(WATER / "data_2")], type_map=["O", "H"])[0]
    pred = evaluate_system(model, system, batch=8)
    e = (pred["energy"] - system.energy) / system.natoms
    f = pred["force"].ravel() - system.force.ravel()
    return float(np.sqrt(np.mean(e ** 2))), float(np.sqrt(np.mean(f ** 2)))


def load_at(run_dir: Path, step: int):
    """The model of a run directory at `step` (0: the initial weights): a DeePMD-kit or a dpmd checkpoint."""
    import torch

    from dpmd.model import DeepPot
    from dpmd.model.io import from_deepmd_state_dict, load_model

    path = run_dir / ("init.pt" if step == 0 else f"model.ckpt-{step}.pt")
    blob = torch.load(path, map_location="cpu", weights_only=False)
    if "model_config" in blob:           # dpmd: a checkpoint or the init.pt written above
        model = DeepPot(blob["model_config"])
        model.load_state_dict(blob["model"])
        return model.eval()
    if step == 0:
        return from_deepmd_state_dict(blob["model"]).eval()
    return load_model(path).eval()


def curve(run_dir: Path, steps: int, eval_every: int) -> list[dict]:
    times = json.loads((run_dir / "times.json").read_text())
    t = {int(k): v for k, v in times["steps"].items()}
    rows = []
    for step in [0] + list(range(eval_every, steps + 1, eval_every)) + ([steps] if steps % eval_every else []):
        e, f = holdout_errors(load_at(run_dir, step))
        rows.append({"step": step, "seconds": t.get(step), "rmse_e": e, "rmse_f": f})
    return rows


def deepmd_available(python: str) -> bool:
    probe = subprocess.run([python, "-c", "import deepmd.pt"], cwd="/", capture_output=True)
    return probe.returncode == 0


def mean_std(values: list[float]) -> tuple[float, float]:
    m = sum(values) / len(values)
    s = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return m, s


def report(results: dict, steps: int) -> None:
    names = [n for n in (DEEPMD, REPLAY, DPINIT, OWN) if any(n in r for r in results.values())]
    seeds = list(results)
    print(f"\n{'seed':>4} {'trainer':36s} {'E meV/at':>8} {'F eV/Å':>8} {'s/step':>7}   ({steps} steps, held-out data_2)")
    for seed in seeds:
        for n in names:
            if n in results[seed]:
                last = results[seed][n]["curve"][-1]
                print(f"{seed:>4} {n:36s} {1000 * last['rmse_e']:8.2f} {last['rmse_f']:8.4f} "
                      f"{last['seconds'] / steps:7.3f}")
    for seed in seeds:
        for n in names:
            if "frames_as_deepmd" in results[seed].get(n, {}):
                print(f"seed {seed}, {n}: frames identical to DeePMD-kit's for {results[seed][n]['frames_as_deepmd']}")
    print(f"\nmean ± std over {len(seeds)} seed(s) {seeds}, {steps} steps:")
    for n in names:
        runs = [results[s][n]["curve"][-1] for s in seeds if n in results[s]]
        (fm, fs), (em, es) = mean_std([r["rmse_f"] for r in runs]), mean_std([1000 * r["rmse_e"] for r in runs])
        tm, _ = mean_std([r["seconds"] / steps for r in runs])
        print(f"  {n:36s} F {fm:.4f} ± {fs:.4f} eV/Å   E {em:6.2f} ± {es:5.2f} meV/atom   {tm:.3f} s/step")
    # curves: mean over seeds at each evaluated step
    print("\nforce RMSE (eV/Å) / energy RMSE (meV/atom) vs step, mean over seeds; t = mean seconds since the loop began")
    steps_seen = [r["step"] for r in next(iter(results.values()))[names[0]]["curve"]]
    print(f"{'step':>6} " + " ".join(f"{n[:30]:>30s}" for n in names))
    for k, step in enumerate(steps_seen):
        cells = []
        for n in names:
            pts = [results[s][n]["curve"][k] for s in seeds if n in results[s]]
            f = sum(p["rmse_f"] for p in pts) / len(pts)
            e = 1000 * sum(p["rmse_e"] for p in pts) / len(pts)
            t = sum(p["seconds"] or 0.0 for p in pts) / len(pts)
            cells.append(f"{f:7.4f} {e:8.2f} t={t:6.0f}s")
        print(f"{step:>6} " + " ".join(f"{c:>30s}" for c in cells))
    # equal wall time: each trainer's force RMSE at the times DeePMD-kit reached its evaluation points
    if DEEPMD in names and len(names) > 1:
        print("\nforce RMSE (eV/Å) at equal wall time: each seed's curve interpolated in time (a finished run counts "
              "with its final model), then the mean over seeds")
        ref = [results[s][DEEPMD]["curve"] for s in seeds if DEEPMD in results[s]]
        t_marks = [sum(c[k]["seconds"] for c in ref) / len(ref) for k in range(1, len(ref[0]))]
        print(f"{'seconds':>8} " + " ".join(f"{n[:30]:>30s}" for n in names))
        for t in t_marks:
            cells = []
            for n in names:
                vals = [interp(results[s][n]["curve"], t) for s in seeds if n in results[s]]
                cells.append(f"{sum(vals) / len(vals):.4f}")
            print(f"{t:8.0f} " + " ".join(f"{c:>30s}" for c in cells))


def interp(points: list[dict], t: float) -> float:
    """The force RMSE of the model a run had at time t: linear between evaluations; a run that finished before t
    offers its final model."""
    pts = [(p["seconds"], p["rmse_f"]) for p in points if p["seconds"] is not None]
    for (t0, f0), (t1, f1) in zip(pts, pts[1:]):
        if t0 <= t <= t1:
            return f0 + (f1 - f0) * (t - t0) / (t1 - t0) if t1 > t0 else f1
    return pts[-1][1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--eval-every", type=int, default=200, help="checkpoint and evaluate every this many steps")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--deepmd-python", default=sys.executable, help="an interpreter that can import deepmd")
    ap.add_argument("--no-deepmd", action="store_true", help="dpmd's own run only")
    ap.add_argument("--modes", nargs="+", choices=list(MODES), default=["replay", "own"],
                    help="dpmd runs beside DeePMD-kit's (replay and dpinit start from its initial weights)")
    ap.add_argument("--reuse", action="store_true", help="keep finished runs found under --work")
    ap.add_argument("--work", type=Path, default=Path("runs/train_vs_deepmd"))
    ap.add_argument("--deepmd-worker", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.deepmd_worker:
        deepmd_worker(args.deepmd_worker, args.steps, args.seeds[0], args.threads, args.eval_every)
        return
    with_deepmd = not args.no_deepmd and deepmd_available(args.deepmd_python)
    if not with_deepmd:
        print(f"DeePMD-kit {'skipped' if args.no_deepmd else f'not importable by {args.deepmd_python}'}: "
              "dpmd's own run only (build a reference with benchmarks/deepmd_env.sh)", flush=True)
    modes = [m for m in args.modes if with_deepmd or m == "own"]
    if not modes:
        sys.exit("nothing to run: --modes replay and dpinit need DeePMD-kit")

    def done(d: Path) -> bool:
        return args.reuse and (d / "times.json").is_file() and (d / f"model.ckpt-{args.steps}.pt").is_file()

    results: dict[int, dict] = {}
    for seed in args.seeds:
        d = args.work.resolve() / f"seed{seed}"
        results[seed] = {}
        if with_deepmd:
            if not done(d / DEEPMD_DIR):
                subprocess.run([args.deepmd_python, __file__, "--deepmd-worker", str(d / DEEPMD_DIR), "--steps",
                                str(args.steps), "--seeds", str(seed), "--threads", str(args.threads),
                                "--eval-every", str(args.eval_every)], check=True,
                               env=dict(os.environ, OMP_NUM_THREADS=str(args.threads)), stdout=subprocess.DEVNULL)
            results[seed][DEEPMD] = {"curve": curve(d / DEEPMD_DIR, args.steps, args.eval_every)}
        for mode in modes:
            name, sub, dp_init, dp_frames = MODES[mode]
            if not done(d / sub):
                init = d / DEEPMD_DIR / "init.pt" if dp_init else None
                order = d / DEEPMD_DIR / "Sample_rank_0.txt" if dp_frames else None
                dpmd_train(d / sub, args.steps, seed, args.threads, args.eval_every, init, order)
            results[seed][name] = {"curve": curve(d / sub, args.steps, args.eval_every)}
            if with_deepmd and (d / sub / "frames.txt").is_file():
                results[seed][name]["frames_as_deepmd"] = same_frames(d / sub / "frames.txt",
                                                                      d / DEEPMD_DIR / "Sample_rank_0.txt")
        for name, r in results[seed].items():
            last = r["curve"][-1]
            print(f"{seed:>4} {name:36s} {1000 * last['rmse_e']:8.2f} {last['rmse_f']:8.4f}", flush=True)
        args.work.mkdir(parents=True, exist_ok=True)
        (args.work / "results.json").write_text(json.dumps(results, indent=1))
    report(results, args.steps)


DEEPMD_DIR = "deepmd"

if __name__ == "__main__":
    main()
