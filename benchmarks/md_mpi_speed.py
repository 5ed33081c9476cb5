"""MPI MD speed: steps/s of `dpmd md` on 1 rank (the serial engine) vs N ranks (domain decomposition),
water with the DeePMD-kit water model, NVT Langevin, float64, one thread per rank.

Sizes are frame 0 of examples/water/data_0 (192 atoms) replicated n x n x n (n = 1: 192, n = 2: 1,536).
Each (size, ranks) pair runs in a fresh `mpiexec -n R python benchmarks/md_mpi_speed.py --worker ...`;
the worker times `steps` steps after `warmup` untimed ones (so start-up and the first neighbour build are
excluded) and rank 0 prints one JSON line.  The MPI run's final positions are checked against nothing here
(tests/test_md_mpi.py does that); this only times.

The "ceiling" column is what this machine allows: R independent serial runs of the same system started
together, their summed steps/s over one run alone.  Where R cores share memory bandwidth or are hyperthreads
of fewer physical cores, no decomposition can beat it; "of ceiling" is the MPI speed-up divided by it.

    PYTHONPATH=. python benchmarks/md_mpi_speed.py                          # 192 and 1,536 atoms, 1 and 2 ranks
    PYTHONPATH=. python benchmarks/md_mpi_speed.py --sizes 4                # 12,288 atoms: the 2-rank target
    PYTHONPATH=. python benchmarks/md_mpi_speed.py --sizes 1 --ranks 1 2 4 --steps 20
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = ROOT.parent / "shared/deepmd-kit/water_se_e2_a/model.ckpt.pt"
DEFAULT_DATA = ROOT / "examples/water/data_0"


def worker(args) -> None:
    import numpy as np
    import torch

    torch.set_num_threads(1)
    from dpmd.data import load_system
    from dpmd.md import Simulation
    from dpmd.md.parallel import ParallelSimulation, mpi_world
    from dpmd.model import load_model

    s = load_system(args.data, ["O", "H"])
    pos, box = s.coord[0].reshape(-1, 3), s.box[0].reshape(3, 3)
    n = args.size
    shifts = np.stack(np.meshgrid(*[np.arange(n)] * 3, indexing="ij"), -1).reshape(-1, 3) @ box
    pos = (pos[None] + shifts[:, None]).reshape(-1, 3)
    sym = [["O", "H"][t] for t in s.atype] * len(shifts)
    model = load_model(args.model)
    kw = dict(ensemble="nvt", thermostat={"type": "langevin", "damp": 0.1}, temperature=300, timestep=0.5,
              seed=1, skin=1.0, thermo_freq=0)
    comm = mpi_world()
    sim = (Simulation(model, pos, sym, box * n, **kw) if comm is None
           else ParallelSimulation(model, pos, sym, box * n, comm=comm, **kw))
    sim.run(args.warmup)
    if comm is not None:
        comm.Barrier()
    t0 = time.perf_counter()
    sim.run(args.steps)
    if comm is not None:
        comm.Barrier()
    dt = time.perf_counter() - t0
    if comm is None or comm.Get_rank() == 0:
        print(json.dumps({"atoms": len(sym), "ranks": 1 if comm is None else comm.Get_size(),
                          "grid": [int(g) for g in sim.domain.grid] if comm is not None else [1, 1, 1],
                          "steps": args.steps, "seconds": dt, "steps_per_s": args.steps / dt}), flush=True)


def concurrent_serial(copies: int, worker_cmd: list, env: dict) -> float:
    """Summed steps/s of `copies` independent serial workers run at the same time."""
    procs = [subprocess.Popen(worker_cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
             for _ in range(copies)]
    return sum(json.loads(p.communicate()[0].strip().splitlines()[-1])["steps_per_s"] for p in procs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[1, 2], help="replication n: 192 n^3 atoms")
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 30 for 192 atoms, 6 for more)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--model", default=str(DEFAULT_MODEL))
    p.add_argument("--data", default=str(DEFAULT_DATA))
    p.add_argument("--json", default=None, help="save the results")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--size", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    mpiexec = Path(sys.executable).parent / "mpiexec"
    mpiexec = str(mpiexec) if mpiexec.is_file() else "mpiexec"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    results = []
    print(f"{'atoms':>6} {'ranks':>5} {'grid':>9} {'steps/s':>9} {'speed-up':>8} {'ceiling':>8} {'of ceiling':>10}")
    for n in args.sizes:
        steps = args.steps or (30 if n == 1 else 6)
        base = None
        for r in args.ranks:
            cmd = [mpiexec, "-n", str(r), sys.executable, __file__, "--worker", "--size", str(n), "--steps", str(steps),
                   "--warmup", str(args.warmup), "--model", args.model, "--data", args.data]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                print(proc.stdout + proc.stderr, file=sys.stderr)
                raise SystemExit(f"{r} ranks, size {n}: failed")
            res = json.loads(proc.stdout.strip().splitlines()[-1])
            base = base or res["steps_per_s"]
            res["speedup"] = res["steps_per_s"] / base
            res["ceiling"] = concurrent_serial(r, cmd[3:], env) / base if r > 1 else 1.0
            results.append(res)
            print(f"{res['atoms']:>6} {r:>5} {'x'.join(map(str, res['grid'])):>9} {res['steps_per_s']:>9.3f} "
                  f"{res['speedup']:>8.2f} {res['ceiling']:>8.2f} {res['speedup'] / res['ceiling']:>10.0%}", flush=True)
    for res in results:
        if res["atoms"] == 12288 and res.get("ranks", 0) == 2:
            print(f"target: 2-rank speed-up >= 1.7x at 12,288 atoms: {res['speedup']:.2f}x, "
                  f"{'met' if res['speedup'] >= 1.7 else 'NOT met'}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
