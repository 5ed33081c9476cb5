"""Descriptors on a many-element problem: accuracy after N steps and at equal training time, speed, memory.

The data are made here (cached under --work/data): a five-element fcc alloy (Cu Ag Au Ni Pd, each site drawn
at random, 32-108 atoms, lattice constant by Vegard's rule from ASE's EMT lattice constants) labelled with
ASE's EMT along Langevin MD at 300-1500 K; energies, forces and virials in deepmd/npy, one system per
trajectory.  Trajectories are split into training and held-out ones (never a frame of the same trajectory on
both sides).

For each descriptor configuration of descriptors() the script trains `dpmd train` (a subprocess with --threads cores) for
--steps steps with a checkpoint every --eval-every steps, then reports
  - held-out energy RMSE per atom and force RMSE after N steps,
  - the same at equal training time: each run's latest checkpoint written within the time the fastest run (of
    all descriptors and codes) took for its N steps, or within --seconds when given; training time counts from
    step 0 (the start-up, which a long run amortises, is reported on its own),
  - s/step (between the first and the last checkpoint), start-up s (launch to step 0: imports, data,
    statistics),
  - inference µs/atom: the frozen model on a 108-atom held-out frame, neighbour list included, median of repeats,
    in a worker process of each code under the same settings (--threads torch threads, freed memory kept),
  - peak memory: the ru_maxrss of the training process (os.wait4).
--rounds N trains each row N times and times its inference N times, the codes alternating (dpmd, DeePMD-kit,
dpmd, ...), and reports the medians of s/step and µs/atom (accuracy and start-up: the first round's), and the
ratios DeePMD-kit / dpmd: on a shared machine both codes then see the same load.
A descriptor type dpmd does not have yet (dpmd.model.descriptor.TYPES) is reported as "not available".
With DeePMD-kit (--deepmd-python, an interpreter that imports deepmd) the same is measured for DeePMD-kit on
the same input and data in the same run: `dp --pt train`, `dp --pt freeze`, its DeepPot for evaluation.
Both codes get the same explicit sel (counted here from the training data, DeePMD-kit's `auto` rule).

    PYTHONPATH=. nice -n 5 python benchmarks/descriptors.py --threads 1 --deepmd-python /root/dpvenv/bin/python
    PYTHONPATH=. python benchmarks/descriptors.py --steps 5000 --eval-every 500 --start-lr 1e-3 --stop-lr 3.5e-8 \\
        --neuron 25 50 100 --fitting 240 240 240 --train-traj 24 --frames 50      # a serious run

Prints a table and writes <work>/results.json.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
ELEMENTS = ["Cu", "Ag", "Au", "Ni", "Pd"]
SIZES = [(2, 2, 2), (2, 2, 3), (2, 3, 3), (3, 3, 3)]  # fcc conventional cells: 32, 48, 72, 108 atoms
INFER_ATOMS = 108


# --------------------------------------------------------------------------- data


def emt_lattice_constant(element: str) -> float:
    """fcc lattice constant of ASE's EMT (Å): a = sqrt(2) * beta * s0, s0 its Wigner-Seitz radius."""
    from ase.calculators.emt import beta, parameters
    from ase.units import Bohr

    return math.sqrt(2.0) * beta * parameters[element][1] * Bohr


def trajectory(seed: int, size, temperature: float, frames: int, every: int, dt_fs: float):
    """(atype, coord, box, energy, force, virial) of `frames` frames of EMT Langevin MD, after 5 * every steps."""
    from ase import units
    from ase.build import bulk
    from ase.calculators.emt import EMT
    from ase.md.langevin import Langevin
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution

    rng = np.random.default_rng(seed)
    n = 4 * int(np.prod(size))
    atype = rng.integers(0, len(ELEMENTS), n)
    a = float(np.mean([emt_lattice_constant(ELEMENTS[t]) for t in atype]))  # Vegard's rule
    atoms = bulk("Cu", "fcc", a=a, cubic=True).repeat(size)
    atoms.set_chemical_symbols([ELEMENTS[t] for t in atype])
    atoms.calc = EMT()
    MaxwellBoltzmannDistribution(atoms, temperature_K=temperature, rng=rng)
    dyn = Langevin(atoms, dt_fs * units.fs, temperature_K=temperature, friction=0.02, rng=rng, fixcm=False)
    dyn.run(5 * every)  # equilibration
    out = []
    for _ in range(frames):
        dyn.run(every)
        # DeePMD's virial is -dE/dstrain: -volume * ASE's stress
        virial = -atoms.get_volume() * atoms.get_stress(voigt=False)
        out.append((atoms.positions.copy(), atoms.cell[:].copy(), atoms.get_potential_energy(),
                    atoms.get_forces().copy(), virial))
    return atype, *(np.array([f[k] for f in out]) for k in range(5))


def make_data(root: Path, n_train: int, n_test: int, frames: int, every: int, seed: int) -> dict:
    """Training and held-out systems (one per trajectory) under root, made once per set of parameters."""
    from dpmd.data import System, write_system

    params = {"elements": ELEMENTS, "train": n_train, "test": n_test, "frames": frames, "every": every,
              "seed": seed, "dt_fs": 2.0, "temperatures_K": [300, 1500]}
    meta = root / "meta.json"
    if meta.is_file() and json.loads(meta.read_text())["params"] == params:
        return json.loads(meta.read_text())
    n = n_train + n_test
    temps = np.linspace(300.0, 1500.0, n)
    test_ids = set(range(n)[1::max(1, n // max(1, n_test))][:n_test])  # held out: spread over the temperatures
    sizes = [SIZES[k % len(SIZES)] for k in range(n)]
    last_test = max(test_ids)
    sizes[last_test] = SIZES[-1]  # a 108-atom held-out frame for the inference timing
    out = {"params": params, "train": [], "test": []}
    t0 = time.perf_counter()
    for k in range(n):
        atype, coord, box, energy, force, virial = trajectory(seed * 1000 + k, sizes[k], temps[k], frames, every,
                                                              params["dt_fs"])
        split = "test" if k in test_ids else "train"
        path = root / split / f"traj{k:02d}_{len(atype)}at_{temps[k]:.0f}K"
        write_system(System(path=str(path), type_map=ELEMENTS, atype=atype, coord=coord, box=box, energy=energy,
                            force=force, virial=virial), path, overwrite=True)
        out[split].append(str(path))
    out["infer_system"] = out["test"][sorted(test_ids).index(last_test)]
    print(f"data: {n} EMT trajectories ({n_train} training, {n_test} held out) x {frames} frames in "
          f"{time.perf_counter() - t0:.0f} s -> {root}", flush=True)
    meta.write_text(json.dumps(out, indent=1))
    return out


def count_sel(systems: list[str], rcut: float) -> tuple[list[int], int]:
    """DeePMD-kit's `sel: auto` of the training data: per type (se_e2_a ...) and in total (se_atten)."""
    from dpmd.data import load_systems
    from dpmd.geometry.neighbor import auto_sel, neighbor_stat

    data = load_systems(systems, type_map=ELEMENTS)
    frames = [(s.coord[f], s.atype, s.box[f]) for s in data for f in range(s.nframes)]
    per_type, _ = neighbor_stat(frames, rcut, len(ELEMENTS))
    total, _ = neighbor_stat([(c, np.zeros_like(t), b) for c, t, b in frames], rcut, 1)
    return auto_sel(per_type), auto_sel(total)[0]


# --------------------------------------------------------------------------- configurations


def descriptors(rcut: float, rcut_smth: float, sel: list[int], sel_total: int, neuron: list[int]) -> dict:
    """name -> DeePMD-kit descriptor section (dpmd reads the same keys)."""
    base = {"rcut": rcut, "rcut_smth": rcut_smth, "sel": sel, "neuron": neuron, "seed": 1}
    se_a = {"type": "se_e2_a", **base, "axis_neuron": 4}
    se_r = {"type": "se_e2_r", **base}
    attn = {"type": "se_atten_v2", **base, "sel": sel_total, "axis_neuron": 4, "tebd_dim": 8, "attn": 32,
            "attn_dotr": True, "attn_mask": False}
    return {
        "se_e2_a (type_one_side)": {**se_a, "type_one_side": True},
        "se_e2_a": {**se_a, "type_one_side": False},
        "se_e2_r": se_r,
        "se_e3": {"type": "se_e3", **base, "neuron": [max(2, n // 4) for n in neuron]},
        "se_atten_v2 (attn_layer 0)": {**attn, "attn_layer": 0},
        "se_atten_v2 (attn_layer 2)": {**attn, "attn_layer": 2},
        "hybrid (se_e2_a + se_e2_r)": {"type": "hybrid", "list": [{**se_a, "type_one_side": True}, se_r]},
    }


def missing_in_dpmd(descriptor: dict) -> list[str]:
    """The descriptor types of a section dpmd does not have yet."""
    from dpmd.model.descriptor import TYPES

    kinds = [descriptor["type"]] + [d["type"] for d in descriptor.get("list", [])]
    return [k for k in kinds if k not in TYPES]


def training_input(descriptor: dict, data: dict, args) -> dict:
    steps = args.steps
    return {
        "model": {"type_map": ELEMENTS, "descriptor": descriptor,
                  "fitting_net": {"neuron": args.fitting, "resnet_dt": True, "seed": 1}},
        "learning_rate": {"type": "exp", "start_lr": args.start_lr, "stop_lr": args.stop_lr,
                          "decay_steps": max(1, steps // 20)},
        "loss": {"type": "ener", "start_pref_e": 0.02, "limit_pref_e": 1, "start_pref_f": 1000, "limit_pref_f": 1,
                 "start_pref_v": 0, "limit_pref_v": 0},
        "training": {"training_data": {"systems": data["train"], "batch_size": args.batch_size},
                     "numb_steps": steps, "seed": 1, "disp_freq": args.eval_every, "save_freq": args.eval_every,
                     "max_ckpt_keep": steps // args.eval_every + 2},
    }


# --------------------------------------------------------------------------- running


def run_measured(cmd: list[str], cwd: Path, env: dict, log: Path) -> tuple[int, float, float]:
    """(return code, launch time, peak RSS MiB) of a subprocess (its own ru_maxrss, from os.wait4)."""
    with open(log, "w") as fh:
        launched = time.time()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=fh, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, launched, usage.ru_maxrss / 1024.0


def checkpoints(run_dir: Path) -> dict[int, Path]:
    found = {}
    for p in glob.glob(str(run_dir / "model.ckpt-*.pt")):
        m = re.search(r"model\.ckpt-(\d+)\.pt$", p)
        if m:
            found[int(m.group(1))] = Path(p)
    return dict(sorted(found.items()))


def train(code: str, descriptor: dict, data: dict, run_dir: Path, args) -> dict:
    """Train with dpmd or DeePMD-kit; its checkpoints' training times (s since step 0), s/step, start-up, peak
    RSS."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "input.json").write_text(json.dumps(training_input(descriptor, data, args), indent=1))
    threads = str(args.threads)
    env = dict(os.environ, OMP_NUM_THREADS=threads, DP_INTRA_OP_PARALLELISM_THREADS=threads,
               DP_INTER_OP_PARALLELISM_THREADS="1", PYTHONPATH=str(REPO))
    if code == "dpmd":   # both codes get the same cores (OMP_NUM_THREADS); each uses them as it decides (dpmd's
        # policy runs a small model's step on one thread: tiny matrix products lose more to thread sync than they gain)
        cmd = [sys.executable, "-m", "dpmd.cli", "train", "input.json", "-o", ".", "--overwrite"]
    else:
        dp = str(Path(args.deepmd_python).parent / "dp")
        cmd = [dp, "--pt", "train", "input.json", "--skip-neighbor-stat"]
    rc, launched, rss = run_measured(cmd, run_dir, env, run_dir / "train.log")
    if rc != 0:
        tail = (run_dir / "train.log").read_text().strip().splitlines()[-1:] or ["(no output)"]
        return {"error": f"{code} train failed (rc {rc}): {tail[0][:200]}"}
    since_launch = {step: p.stat().st_mtime - launched for step, p in checkpoints(run_dir).items()}
    (s0, t0), (s1, t1) = min(since_launch.items()), max(since_launch.items())
    per_step = (t1 - t0) / (s1 - s0) if s1 > s0 else t1 / s1
    startup = t0 - s0 * per_step  # launch to step 0, the first checkpoint's steps taken at the later pace
    return {"times": {step: t - startup for step, t in since_launch.items()}, "s_per_step": per_step,
            "startup_s": startup, "peak_rss_mib": rss}


def freeze(code: str, run_dir: Path, args) -> tuple[Path | None, str | None]:
    """(the frozen model, None) or (None, why freezing failed)."""
    if code == "dpmd":
        out = run_dir / "frozen.pth"
        cmd = [sys.executable, "-m", "dpmd.cli", "freeze", "-c", str(run_dir / "model.ckpt.pt"), "-o", str(out)]
    else:
        out = run_dir / "frozen_dp.pth"
        cmd = [str(Path(args.deepmd_python).parent / "dp"), "--pt", "freeze", "-c", str(run_dir), "-o", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=run_dir, env=dict(os.environ, PYTHONPATH=str(REPO)))
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines() or ["(no output)"]
        return None, f"freeze failed: {lines[-1][:160]}"
    return out, None


def evaluate(code: str, models: list[Path], data: dict, frozen: Path | None, args) -> dict:
    """Held-out errors of each model and the inference time of the frozen one, in a worker of that code."""
    job = {"code": code, "models": [str(m) for m in models], "test": data["test"], "frozen": frozen and str(frozen),
           "infer_system": data["infer_system"], "threads": args.threads, "repeats": args.repeats}
    python = sys.executable if code == "dpmd" else args.deepmd_python
    out = subprocess.run([python, __file__, "--worker", json.dumps(job)], capture_output=True, text=True,
                         env=dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONPATH=str(REPO)))
    if out.returncode != 0:
        raise RuntimeError(f"{code} evaluation failed: {out.stderr.strip()[-500:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def worker(job: dict) -> None:
    """Runs under the code's interpreter: RMSEs of job['models'] on the held-out systems, inference timing."""
    import torch

    from dpmd.data import load_systems
    from dpmd.runtime import keep_freed_memory

    torch.set_num_threads(job["threads"])
    # both codes alike, as benchmarks/infer_speed.py times them: glibc keeps freed blocks, so the same large tensors
    # do not take fresh pages every call (without it a round's timing depended on whether the worker had evaluated
    # RMSEs first: dpmd 33 vs 44-53 µs/atom on the 108-atom se_atten_v2 frame, DeePMD-kit within 5%)
    keep_freed_memory()
    test = load_systems(job["test"], type_map=ELEMENTS)
    if job["code"] == "dpmd":
        from dpmd.model import load_model

        def predictor(path):
            model = load_model(path).eval()

            def predict(s, frames):
                box = torch.as_tensor(s.box[frames])
                out = model(torch.as_tensor(s.coord[frames]), torch.as_tensor(s.atype), box)
                return out["energy"].detach().numpy(), out["force"].detach().numpy().reshape(len(frames), -1, 3)
            return predict
    else:
        sys.path.insert(0, str(Path(__file__).parent))
        from deepmd_compat import prepare_deepmd_import

        prepare_deepmd_import()
        from deepmd.infer import DeepPot

        def predictor(path):
            dp = DeepPot(path)
            index = [dp.get_type_map().index(e) for e in ELEMENTS]

            def predict(s, frames):
                e, f, _ = dp.eval(s.coord[frames].reshape(len(frames), -1), s.box[frames].reshape(len(frames), 9),
                                  [index[t] for t in s.atype])
                return np.asarray(e).reshape(-1), np.asarray(f).reshape(len(frames), -1, 3)
            return predict

    result = {"rmse": {}}
    for path in job["models"]:
        predict = predictor(path)
        de, df = [], []
        for s in test:
            for f0 in range(0, s.nframes, 8):
                frames = np.arange(f0, min(s.nframes, f0 + 8))
                e, f = predict(s, frames)
                de.append((e - s.energy[frames]) / s.natoms)
                df.append((f - s.force[frames]).ravel())
        result["rmse"][path] = (float(np.sqrt(np.mean(np.concatenate(de) ** 2))),
                                float(np.sqrt(np.mean(np.concatenate(df) ** 2))))
    if not job["frozen"]:
        print(json.dumps(result))
        return
    (s,) = load_systems([job["infer_system"]], type_map=ELEMENTS)
    predict = predictor(job["frozen"])
    times = []
    for k in range(job["repeats"] + 3):  # 3 warm-up calls
        t0 = time.perf_counter()
        predict(s, np.array([0]))
        if k >= 3:
            times.append(time.perf_counter() - t0)
    result["infer_us_per_atom"] = 1e6 * statistics.median(times) / s.natoms
    print(json.dumps(result))


def measure(code: str, name: str, descriptor: dict, data: dict, args, round_: int = 0) -> dict:
    """Train (and, in the first round, freeze) one row's model; later rounds only time the training."""
    run_dir = args.work.resolve() / re.sub(r"[^A-Za-z0-9_]+", "_", name).strip("_") / code
    if round_:
        run_dir = run_dir.with_name(f"{code}_round{round_}")
    print(f"{name:28s} {code:10s} training{f' (round {round_ + 1})' if round_ else ''} ...", flush=True)
    result = train(code, descriptor, data, run_dir, args)
    if "error" not in result and not round_:
        result["run_dir"] = str(run_dir)
        result["frozen"], result["freeze_error"] = freeze(code, run_dir, args)
    return result


def more_inference_rounds(results: dict, data: dict, args) -> None:
    """Rounds 2.. of the inference timing, the codes alternating; each row's µs/atom becomes the median."""
    for _ in range(args.rounds - 1):
        for row in results.values():
            for code, r in row.items():
                if r.get("infer_us_per_atom") is not None:
                    timing = evaluate(code, [], data, r["frozen"], args)["infer_us_per_atom"]
                    r.setdefault("infer_rounds", [r["infer_us_per_atom"]]).append(timing)
    for row in results.values():
        for r in row.values():
            if "infer_rounds" in r:
                r["infer_us_per_atom"] = statistics.median(r["infer_rounds"])


def ratios(results: dict) -> str:
    """DeePMD-kit's s/step and µs/atom over dpmd's, per row that has both."""
    lines = []
    for name, row in results.items():
        dp, ours = row.get("DeePMD-kit", {}), row.get("dpmd", {})
        parts = [f"{label} {dp[k] / ours[k]:.2f}x" for label, k in (("training", "s_per_step"),
                                                                     ("inference", "infer_us_per_atom"))
                 if dp.get(k) and ours.get(k)]
        if parts:
            lines.append(f"{name}: dpmd faster than DeePMD-kit by (DeePMD-kit / dpmd) " + ", ".join(parts))
    return "\n".join(lines)


def finish(results: dict, data: dict, args) -> float | None:
    """Evaluate the checkpoints each row needs: the last one and the one of the equal-training-time budget."""
    done = [r for row in results.values() for r in row.values() if "times" in r]
    ends = [r["times"][args.steps] for r in done if args.steps in r["times"]]
    budget = args.seconds if args.seconds else (min(ends) if ends else None)
    for name, row in results.items():
        for code, r in row.items():
            if "times" not in r:
                continue
            by_then = [s for s, t in r["times"].items() if budget is not None and t <= budget]
            r["step_at_budget"] = max(by_then) if by_then else None
            steps = sorted({max(r["times"]), *([r["step_at_budget"]] if by_then else [])})
            ckpts = checkpoints(Path(r["run_dir"]))
            try:
                ev = evaluate(code, [ckpts[s] for s in steps], data, r["frozen"], args)
            except RuntimeError as err:
                r["error"] = str(err)
                continue
            rmse = {s: ev["rmse"][str(ckpts[s])] for s in steps}
            r["rmse_e"], r["rmse_f"] = rmse[max(r["times"])]
            r["rmse_e_budget"], r["rmse_f_budget"] = rmse[r["step_at_budget"]] if by_then else (None, None)
            r["infer_us_per_atom"] = ev.get("infer_us_per_atom")
            print(f"{name:28s} {code:10s} F {r['rmse_f']:.4f} eV/Å  {r['s_per_step']:.3f} s/step", flush=True)
    return budget


def table(results: dict, budget: float | None, args) -> str:
    head = (f"| descriptor | code | E RMSE meV/atom | F RMSE eV/Å | E @ {budget or 0:.1f} s | F @ {budget or 0:.1f} s "
            f"(step) | s/step | start-up s | infer µs/atom | peak RSS MiB |")
    lines = [head, "|" + "---|" * 10]
    for name, row in results.items():
        for code, r in row.items():
            if "rmse_f" not in r:
                lines.append(f"| {name} | {code} | {r.get('error', 'not available')} |||||||| ")
                continue
            at = (f"{1000 * r['rmse_e_budget']:.2f} | {r['rmse_f_budget']:.4f} ({r['step_at_budget']})"
                  if r["rmse_f_budget"] is not None else "no checkpoint yet | ")
            infer = r["freeze_error"] if r["infer_us_per_atom"] is None else f"{r['infer_us_per_atom']:.1f}"
            lines.append(f"| {name} | {code} | {1000 * r['rmse_e']:.2f} | {r['rmse_f']:.4f} | {at} | "
                         f"{r['s_per_step']:.3f} | {r['startup_s']:.1f} | {infer} | {r['peak_rss_mib']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--eval-every", type=int, default=20, help="checkpoint every this many steps")
    ap.add_argument("--seconds", type=float, help="equal-training-time budget (default: the fastest run's N steps)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--start-lr", type=float, default=2e-2, help="high, for short runs: 1e-3 for long ones")
    ap.add_argument("--stop-lr", type=float, default=1e-4)
    ap.add_argument("--rcut", type=float, default=5.0)
    ap.add_argument("--rcut-smth", type=float, default=2.0)
    ap.add_argument("--neuron", type=int, nargs="+", default=[8, 16, 32], help="embedding net widths")
    ap.add_argument("--fitting", type=int, nargs="+", default=[32, 32], help="fitting net widths")
    ap.add_argument("--train-traj", type=int, default=8, help="training trajectories (one system each)")
    ap.add_argument("--test-traj", type=int, default=3, help="held-out trajectories")
    ap.add_argument("--frames", type=int, default=20, help="frames per trajectory")
    ap.add_argument("--every", type=int, default=10, help="MD steps (2 fs) between frames")
    ap.add_argument("--data-seed", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=20, help="timed inference calls (median)")
    ap.add_argument("--only", nargs="+", help="descriptor names (of the list below) to run")
    ap.add_argument("--rounds", type=int, default=1,
                    help="train and time each row this many times, the codes alternating; medians reported")
    ap.add_argument("--deepmd-python", help="an interpreter that imports deepmd: DeePMD-kit on the same inputs")
    ap.add_argument("--work", type=Path, default=Path("runs/descriptors"))
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(json.loads(args.worker))
        return
    if args.steps % args.eval_every:
        sys.exit("--steps must be a multiple of --eval-every")
    if args.rounds < 1:
        sys.exit("--rounds must be at least 1")
    args.work.mkdir(parents=True, exist_ok=True)
    data = make_data(args.work.resolve() / "data", args.train_traj, args.test_traj, args.frames, args.every,
                     args.data_seed)
    sel, sel_total = count_sel(data["train"], args.rcut)
    print(f"sel {sel} per type {ELEMENTS}, {sel_total} in total (rcut {args.rcut} Å)", flush=True)
    configs = descriptors(args.rcut, args.rcut_smth, sel, sel_total, args.neuron)
    if args.only:
        unknown = [n for n in args.only if n not in configs]
        if unknown:
            sys.exit(f"--only: unknown {unknown}; choose from {list(configs)}")
        configs = {n: configs[n] for n in args.only}
    codes = ["dpmd"]
    if args.deepmd_python:
        probe = subprocess.run([args.deepmd_python, "-c", "import deepmd.pt"], cwd="/", capture_output=True)
        if probe.returncode == 0:
            codes.append("DeePMD-kit")
        else:
            print(f"DeePMD-kit: {args.deepmd_python} cannot import deepmd.pt; dpmd only", flush=True)
    results: dict = {}
    for name, descriptor in configs.items():
        row = results[name] = {}
        for round_ in range(args.rounds):  # the codes alternate: both see the same load
            for code in codes:
                missing = missing_in_dpmd(descriptor) if code == "dpmd" else []
                if missing:
                    row[code] = {"error": f"not available in dpmd ({', '.join(missing)})"}
                    continue
                out = measure(code, name, descriptor, data, args, round_)
                if round_ == 0:
                    row[code] = out
                    if "s_per_step" in out:
                        out["s_per_step_rounds"] = [out["s_per_step"]]
                elif "s_per_step" in out and "s_per_step_rounds" in row[code]:
                    row[code]["s_per_step_rounds"].append(out["s_per_step"])
        for r in row.values():
            if "s_per_step_rounds" in r:
                r["s_per_step"] = statistics.median(r["s_per_step_rounds"])
    budget = finish(results, data, args)
    more_inference_rounds(results, data, args)
    which = (f"--seconds {args.seconds:g}" if args.seconds else
             f"the fastest run's {args.steps} steps, {budget:.1f} s" if budget else "no run finished")
    text = table(results, budget, args)
    rounds = f"; s/step and µs/atom: medians of {args.rounds} alternating rounds" if args.rounds > 1 else ""
    print(f"\n{args.steps} steps, batch {args.batch_size}, {args.threads} thread(s); held-out: "
          f"{len(data['test'])} trajectories; equal training time = {which} (from step 0){rounds}\n{text}\n"
          f"{ratios(results)}")
    (args.work / "results.json").write_text(json.dumps(
        {"args": {k: str(v) for k, v in vars(args).items()}, "sel": sel, "sel_total": sel_total,
         "budget_s": budget, "data": data, "results": results}, indent=1, default=str))


if __name__ == "__main__":
    main()
