"""dpmd beside other work: each main path alone and beside one busy process, the old thread default vs the policy.

    PYTHONPATH=. python benchmarks/contention.py                      # every path, 3 rounds (about 15 min on 2 cores)
    PYTHONPATH=. python benchmarks/contention.py --paths infer md --rounds 5
    PYTHONPATH=. python benchmarks/contention.py --paths --sizes 1 2 3 # only: 1 vs 2 threads by system size

old: what dpmd did before: torch's default threads (every core), OpenMP's default wait (idle threads spin),
     the demo's ensemble members trained one after another in one process.
new: dpmd.runtime's policy as `dpmd` and `elt` apply it: quiet_openmp() before torch loads (idle OpenMP threads
     sleep), configure_threads with the path's size (one thread for all of these), and the campaign's ensemble
     layout (training_layout / train_members: concurrent single-member processes).
busy: one competing process spinning a Python loop for the whole measurement.

Paths (water, examples/water/model_small's model, float64): train (a training step, 192 atoms, batch 1),
infer (energy, forces and virial of 192 atoms, neighbour list included), md (an NVT step, 192 atoms),
demo (the demo's ensemble training stage: 4 members x --demo-steps steps of configs/campaign_water_xtb.yaml's
template on 12-atom water clusters).  Every (path, policy, condition) runs in a fresh process; each round runs
them all, in an order that alternates between rounds; the table shows the median over rounds of each
process's median, and the busy / alone ratios (the issue's target: at most 2).

First, a check that the wait policy takes effect with this torch build (libgomp reads it only when it loads):
small parallel operations between 0.3 ms gaps of Python work, with the variable set by quiet_openmp() in the
process before torch is imported, against unset.  --sizes adds 1 vs 2 threads (policy on) by system size,
the figures behind dpmd.runtime.ATOMS_PER_THREAD.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "examples/water/model_small.pth"
MODEL_INPUT = ROOT / "examples/water/model_small.yaml"
WATER = ROOT / "examples/water/data_0"
CAMPAIGN = ROOT / "configs/campaign_water_xtb.yaml"
PATHS = {"train": "ms/step", "infer": "ms/eval", "md": "ms/step", "demo": "s/stage"}
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME",
                    "KMP_LIBRARY")


# ---------------------------------------------------------------- workers (fresh processes)
def water(n: int = 1):
    """Frame 0 of the example water (192 atoms) replicated n x n x n: coord, atype, box."""
    import numpy as np

    coord = np.load(WATER / "set.000/coord.npy")[0].reshape(-1, 3)
    box = np.load(WATER / "set.000/box.npy")[0].reshape(3, 3)
    atype = np.loadtxt(WATER / "type.raw", dtype=np.int64).reshape(-1)
    shifts = np.array([[i, j, k] for i in range(n) for j in range(n) for k in range(n)], dtype=float) @ box
    return (coord[None] + shifts[:, None]).reshape(-1, 3), np.tile(atype, n ** 3), box * n


def median_time(fn, repeats: int, warmups: int) -> float:
    times = []
    for i in range(warmups + repeats):
        t0 = time.perf_counter()
        fn()
        if i >= warmups:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run_train(policy: str, args) -> dict:
    from dpmd.runtime import configure_threads, training_work
    from dpmd.train.config import read_input
    from dpmd.train.trainer import Trainer

    steps = 25
    config = read_input(MODEL_INPUT, [f"training.training_data.systems=[{WATER}]", "training.validation_data=null",
                                      f"training.numb_steps={steps}", f"training.save_freq={steps}",
                                      f"training.disp_freq={steps}"])
    if policy == "new":
        configure_threads(None, training_work(config))
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(config, out_dir=out, progress=False)
        stamps = []
        trainer.optimizer.register_step_post_hook(lambda *a: stamps.append(time.perf_counter()))
        trainer.run()
    return {"value": statistics.median(b - a for a, b in zip(stamps[5:-1], stamps[6:])) * 1e3}


def run_infer(policy: str, args) -> dict:
    from dpmd.geometry.graph import build_graph
    from dpmd.model import load_model
    from dpmd.model.forces import evaluate
    from dpmd.runtime import configure_threads

    coord, atype, box = water()
    if policy == "new":
        configure_threads(None, len(atype))
    model = load_model(MODEL)
    return {"value": median_time(lambda: evaluate(model, build_graph(coord, atype, box, model.rcut)), 20, 3) * 1e3}


def run_md(policy: str, args) -> dict:
    from dpmd.md import Simulation
    from dpmd.model import load_model
    from dpmd.runtime import configure_threads

    coord, atype, box = water()
    if policy == "new":
        configure_threads(None, len(atype))
    model = load_model(MODEL)
    sim = Simulation(model, coord, [model.type_map[t] for t in atype], box, ensemble="nvt",
                     thermostat={"type": "csvr", "damp": 0.1}, temperature=300, timestep=0.5, seed=1, thermo_freq=0,
                     log=None)
    block = 5
    return {"value": median_time(lambda: sim.run(block), 8, 1) / block * 1e3}


def demo_data(root: Path) -> Path:
    """16 perturbed 12-atom water clusters (the demo's structures), labelled by the small water model."""
    import numpy as np
    import torch

    from dpmd.data import System, write_system
    from dpmd.model import load_model
    from explore_label_train.campaign import molecular_cluster

    model = load_model(MODEL)
    atoms = molecular_cluster("H2O", 4, 3.0, 0)
    types = np.array([model.type_map.index(s) for s in atoms.get_chemical_symbols()])
    order = np.argsort(types, kind="stable")
    rng = np.random.default_rng(0)
    coord = np.stack([atoms.positions[order] + rng.normal(0, 0.03, (12, 3)) for _ in range(16)])
    out = [model(torch.tensor(c), torch.tensor(types[order]), None) for c in coord]
    system = System(path=str(root / "w4"), type_map=model.type_map, atype=types[order], coord=coord, box=None,
                    energy=np.array([float(o["energy"]) for o in out]),
                    force=np.stack([o["force"].detach().numpy() for o in out]))
    write_system(system, root / "w4")
    return root / "w4"


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def run_demo(policy: str, args) -> dict:
    """The ensemble training stage: old, one member after another here with torch's threads; new, the campaign's
    layout for this machine (on 2 cores: two single-thread member processes at a time)."""
    from explore_label_train.campaign import train_members, training_layout
    from explore_label_train.config import load_campaign, training_input
    from dpmd.runtime import training_work

    cfg = load_campaign(CAMPAIGN)
    with tempfile.TemporaryDirectory() as tmp:
        data = str(demo_data(Path(tmp)))
        members = cfg["train"]["ensemble_size"]
        jobs = {f"m{k}": {"config": training_input(cfg, [data], args.demo_steps, k, 0),
                          "init_model": None, "out": f"{tmp}/m{k}"} for k in range(members)}
        processes, threads = 1, None
        if policy == "new":
            processes, threads = training_layout(members, training_work(jobs["m0"]["config"]))
        t0 = time.perf_counter()
        train_members(jobs, processes, threads, lambda *a: None if a[1] else print(a, file=sys.stderr))
        return {"value": time.perf_counter() - t0, "processes": processes, "threads": threads or torch_threads()}


def run_sizes(policy: str, args) -> dict:
    """1 vs 2 threads on the same graph, alternating in this process (policy on): median ms of each."""
    import torch

    from dpmd.geometry.graph import build_graph
    from dpmd.model import load_model
    from dpmd.model.forces import evaluate

    coord, atype, box = water(args.size)
    model = load_model(MODEL)
    graph = build_graph(coord, atype, box, model.rcut)
    times = {1: [], 2: []}
    for i in range(8 if args.size < 3 else 4):
        for n in (1, 2):
            torch.set_num_threads(n)
            t0 = time.perf_counter()
            evaluate(model, graph)
            if i:
                times[n].append(time.perf_counter() - t0)
    return {"atoms": len(atype), "1": statistics.median(times[1]) * 1e3, "2": statistics.median(times[2]) * 1e3}


def run_wait(policy: str, args) -> dict:
    """Small parallel operations (2 threads) between 0.3 ms gaps of Python work: wall s and CPU / wall."""
    import resource

    import torch

    torch.set_num_threads(2)
    x = torch.randn(400_000, dtype=torch.float64)

    def gap():
        t = time.perf_counter()
        while time.perf_counter() - t < 3e-4:
            pass

    for _ in range(50):
        x.exp()
        gap()
    r0, w0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(1000):
        x.exp()
        gap()
    r1, w1 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    cpu = r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime
    return {"value": w1 - w0, "cpu": cpu / (w1 - w0), "policy": os.environ.get("OMP_WAIT_POLICY")}


def worker(args) -> None:
    if args.policy == "new":   # as `dpmd` and `elt` do, first thing
        from dpmd.runtime import quiet_openmp

        quiet_openmp()
    import torch

    result = globals()[f"run_{args.worker}"](args.policy, args)
    result.setdefault("threads", torch.get_num_threads())
    print("RESULT " + json.dumps(result), flush=True)


# ---------------------------------------------------------------- the parent
def measure(path: str, policy: str, busy: bool, args, size: int = 1) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARIABLES}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    rival = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
    try:
        proc = subprocess.run([sys.executable, __file__, "--worker", path, "--policy", policy, "--size", str(size),
                               "--demo-steps", str(args.demo_steps)], env=env, capture_output=True, text=True,
                              timeout=1800)
    finally:
        if rival is not None:
            rival.kill()
            rival.wait()
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise SystemExit(f"{path} {policy} worker failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def wait_check(args) -> None:
    rows = {p: [measure("wait", p, False, args) for _ in range(3)] for p in ("old", "new")}
    for p, label in (("old", "OMP_WAIT_POLICY unset (spin)"), ("new", "quiet_openmp() (PASSIVE)")):
        wall = statistics.median(r["value"] for r in rows[p])
        cpu = statistics.median(r["cpu"] for r in rows[p])
        print(f"  {label:30s} 1000 parallel ops + gaps: {wall:5.2f} s wall, CPU/wall {cpu:4.2f}")
    ratio = statistics.median(r["value"] for r in rows["old"]) / statistics.median(r["value"] for r in rows["new"])
    print(f"  -> the wait policy {'takes effect' if ratio > 1.2 or ratio < 0.83 else 'made no clear difference'} "
          f"({ratio:.2f}x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--paths", nargs="*", default=list(PATHS), choices=list(PATHS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--demo-steps", type=int, default=300, help="training steps per ensemble member (demo)")
    parser.add_argument("--sizes", type=int, nargs="*", default=[], help="replications n (192 n^3 atoms): 1 vs 2 "
                                                                          "threads alone and busy")
    parser.add_argument("--no-wait-check", action="store_true")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--policy", default="new", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    from dpmd.runtime import usable_cores

    print(f"cores usable: {usable_cores()}; load average at start: {load()}", flush=True)
    t_start = time.perf_counter()
    if not args.no_wait_check:
        print("wait policy check (fresh processes, 2 threads, no competing process):", flush=True)
        wait_check(args)
    results: dict = {}
    for r in range(args.rounds):
        runs = [(p, pol, busy) for p in args.paths for pol in ("old", "new") for busy in (False, True)]
        if r % 2:
            runs.reverse()
        for path, pol, busy in runs:
            res = measure(path, pol, busy, args)
            results.setdefault((path, pol, busy), []).append(res)
            print(f"  round {r + 1}: {path:5s} {pol} {'busy ' if busy else 'alone'} {res['value']:9.3f} "
                  f"{PATHS[path]} ({res['threads']} thread{'s' if res['threads'] > 1 else ''}"
                  + (f" each, {res['processes']} process(es)" if "processes" in res else "") + f"); load {load()}",
                  flush=True)
    if args.paths:
        print(f"\nmedians of {args.rounds} rounds; busy = beside one competing busy process; ratio = busy / alone")
        print(f"{'path':6s} {'unit':8s} {'old alone':>10s} {'old busy':>10s} {'ratio':>6s} "
              f"{'new alone':>10s} {'new busy':>10s} {'ratio':>6s} {'old/new busy':>13s}")
        for path in args.paths:
            m = {(pol, busy): statistics.median(x["value"] for x in results[(path, pol, busy)])
                 for pol in ("old", "new") for busy in (False, True)}
            print(f"{path:6s} {PATHS[path]:8s} {m['old', False]:10.3f} {m['old', True]:10.3f} "
                  f"{m['old', True] / m['old', False]:6.2f} {m['new', False]:10.3f} {m['new', True]:10.3f} "
                  f"{m['new', True] / m['new', False]:6.2f} {m['old', True] / m['new', True]:13.2f}")
    if args.sizes:
        print("\n1 vs 2 threads by size (policy on; alternating in one process; ms per evaluation, medians):")
        for n in args.sizes:
            for busy in (False, True):
                res = measure("sizes", "new", busy, args, size=n)
                print(f"  {res['atoms']:6d} atoms {'busy ' if busy else 'alone'}: 1 thread {res['1']:9.1f}, "
                      f"2 threads {res['2']:9.1f}, 2 threads faster by {res['1'] / res['2']:.2f}x", flush=True)
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s; load average at the end: {load()}")


if __name__ == "__main__":
    main()
