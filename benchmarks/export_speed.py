"""Eager vs TorchScript (the `dpmd freeze` artifact) evaluation speed of one water frame.

    python benchmarks/export_speed.py [--model ../shared/deepmd-kit/water_se_e2_a/model.ckpt.pt]
                                      [--threads 2] [--repeat 30] [--rounds 3]

Both paths get the same edge list (built once, outside the timing) and compute energy,
forces and virial of the 192-atom frame in float64.  The two are timed in alternating
rounds, so that load from other processes on the machine hits both alike; the median per
round and the median over rounds are printed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]


def main(argv=None) -> None:
    from dpmd.geometry.graph import build_graph
    from dpmd.model import load_model
    from dpmd.model.forces import evaluate
    from dpmd.model.io import save_model

    ref_dir = REPO.parent / "shared" / "deepmd-kit" / "water_se_e2_a"
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(ref_dir / "model.ckpt.pt"))
    p.add_argument("--frame", default=str(ref_dir / "reference.npz"), help="npz with coord, atype, box")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=30)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    model = load_model(args.model)
    ref = np.load(args.frame)
    coord = torch.tensor(ref["coord"][0], dtype=torch.float64).reshape(-1, 3)
    atype = torch.tensor(ref["atype"]).reshape(-1)
    box = torch.tensor(ref["box"][0], dtype=torch.float64).reshape(3, 3)
    graph = build_graph(coord, atype, box, model.rcut)

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        save_model(model, Path(tmp) / "model.pth")
        t_save = time.perf_counter() - t0
        t0 = time.perf_counter()
        scripted = torch.jit.load(str(Path(tmp) / "model.pth"))
        t_load = time.perf_counter() - t0
    print(f"freeze (script + save) {t_save:.2f} s, torch.jit.load {t_load:.2f} s")

    edges = (graph["center"], graph["neighbor"], graph["shift"])

    def eager():
        return evaluate(model, graph)

    def script():
        return scripted(coord, atype, box, *edges)

    a, b = eager(), script()
    for _ in range(5):  # TorchScript's profiling executor optimises after a few calls
        script()
    diff = max(float((a["energy"][0] - b["energy"]).abs()), float((a["force"] - b["force"]).abs().max()),
               float((a["virial"].reshape(9) - b["virial"]).abs().max()))
    print(f"max |eager - scripted| (energy, force, virial): {diff:.2e}")

    results = {"eager": [], "torchscript": []}
    for _ in range(args.rounds):
        for name, fn in (("eager", eager), ("torchscript", script)):
            ts = []
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t0)
            results[name].append(statistics.median(ts))
    n = coord.shape[0]
    for name, meds in results.items():
        print(f"{name:12s} median {statistics.median(meds) * 1e3:7.2f} ms/frame "
              f"({statistics.median(meds) / n * 1e6:6.1f} us/atom); per round "
              + ", ".join(f"{m * 1e3:.2f}" for m in meds))
    ratio = statistics.median(results["torchscript"]) / statistics.median(results["eager"])
    print(f"torchscript / eager = {ratio:.3f}  ({args.threads} threads, torch {torch.__version__})")


if __name__ == "__main__":
    sys.exit(main())
