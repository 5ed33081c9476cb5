"""Inference speed and memory of dpmd on replicated water: µs/atom for energy + forces + virial.

The 192-atom water frame is replicated n x n x n (box scaled) and evaluated in float64 with
1 and 2 threads.  Each (size, threads) configuration runs in a fresh subprocess so that its
peak RSS (ru_maxrss) is its own; the worker prints one JSON line that the parent parses.

    PYTHONPATH=. python benchmarks/infer_speed.py                    # the issue's table (several minutes)
    PYTHONPATH=. python benchmarks/infer_speed.py --sizes 1 2 --threads 1 --repeats 3 --json out.json
    PYTHONPATH=. python benchmarks/infer_speed.py --sizes 1 --threads 2 --path both --kernels

--path reference|ops|both: the pure-PyTorch reference (DPMD_OPS=0 DPMD_LINEARIZE=0) and/or the kernel library (dpmd.ops,
`dpmd build-ops` first; its neighbour search included).  --kernels adds a per-kernel table at 192 atoms:
each op (forward + backward where it has one) against the reference code it replaces.
--ab: the compressed vs uncompressed ratio from one worker per configuration that alternates the two models
on the same neighbour list, so that both see the same machine load (the median of the per-round ratios).
--descriptor se_e2_r|se_e3: instead of --model, DeePMD-kit's water example model of that descriptor (the model
section of its input in tests/fixtures/deepmd_inputs; random weights, the water data's statistics), e.g.

    PYTHONPATH=. python benchmarks/infer_speed.py --descriptor se_e3 --sizes 1 --threads 1 --path ab
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = ROOT.parent / "shared/deepmd-kit/water_se_e2_a/model.ckpt.pt"
DEFAULT_DATA = ROOT.parent / "shared/data/water/data_0"
WARMUPS = {1: 5, 2: 2, 4: 1}          # per replication n; 1 for anything larger
REPEATS = {1: 30, 2: 5, 4: 3}         # per replication n; 2 for anything larger (192 atoms: medians of 7 varied 95-150)
# DeePMD-kit 3.2 (PyTorch backend, float64, CPU) measured earlier on this machine; quoted, not re-measured.
BASELINE = {"192 atoms": "640 µs/atom", "1,536 atoms": "1400-2100 µs/atom", "12,288 atoms": "out of memory"}
EXAMPLE_INPUTS = {"se_e2_r": ROOT / "tests/fixtures/deepmd_inputs/water_se_e2_r.json",
                  "se_e3": ROOT / "tests/fixtures/deepmd_inputs/water_se_e3_torch.json"}
TARGETS = ("float64, 2 threads, 192 atoms: uncompressed ≤250 µs/atom, compressed ≤100 µs/atom and ≥3x faster "
           "than uncompressed; per-atom cost flat to 98,304 atoms")


def water(n: int, data: Path):
    """Frame 0 of the water data replicated n x n x n: coord (N, 3), atype (N,), box (3, 3)."""
    import numpy as np
    coord = np.load(data / "set.000/coord.npy")[0].reshape(-1, 3)
    box = np.load(data / "set.000/box.npy")[0].reshape(3, 3)
    atype = np.loadtxt(data / "type.raw", dtype=np.int64).reshape(-1)
    shifts = np.array([[i, j, k] for i in range(n) for j in range(n) for k in range(n)], dtype=float) @ box
    return (coord[None] + shifts[:, None]).reshape(-1, 3), np.tile(atype, n ** 3), box * n


def example_model(descriptor: str, data: Path):
    """DeePMD-kit's water example model of a descriptor type: its input's model section, random weights, the
    statistics of the water data (so that compression gets realistic table ranges)."""
    from dpmd.data import load_system
    from dpmd.model import DeepPot
    from dpmd.model.stats import descriptor_stats

    model = DeepPot(json.loads(EXAMPLE_INPUTS[descriptor].read_text())["model"])
    descriptor_stats(model, [load_system(data, type_map=model.type_map)])
    return model.eval()


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def worker(args) -> dict:
    import torch
    torch.set_num_threads(args.threads[0])
    from dpmd import ops
    from dpmd.runtime import keep_freed_memory

    if args.path in ("ops", "compressed", "ab") and not ops.available():
        raise SystemExit("kernel library not built: run `dpmd build-ops`")

    keep_freed_memory()
    from dpmd.geometry.graph import build_graph
    from dpmd.model import load_model
    from dpmd.model.forces import evaluate

    n = args.sizes[0]
    coord, atype, box = water(n, Path(args.data))
    model = load_model(args.model) if args.descriptor == "model" else example_model(args.descriptor, Path(args.data))
    compressed = None
    if args.path in ("compressed", "ab"):  # DeePMD-kit's `dp compress`, tables over the water data's range
        from dpmd.model.compress import compress_model
        compressed = compress_model(model, args.min_nbor_dist)
    if args.path == "compressed":
        model, compressed = compressed, None
    if args.precision == "float32":
        model = model.to(torch.float32)
        compressed = None if compressed is None else compressed.to(torch.float32)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    warmups = WARMUPS.get(n, 1) if args.warmups is None else args.warmups
    repeats = REPEATS.get(n, 2) if args.repeats is None else args.repeats
    nl, ev = [], []

    def neighbors():
        if args.path == "reference":
            return build_graph(coord, atype, box, model.rcut)
        from dpmd.geometry.neighbor import NeighborList
        c = torch.as_tensor(coord, dtype=torch.float64)
        edges = ops.neighbor_list(c, torch.as_tensor(box, dtype=torch.float64), model.rcut)
        return build_graph(c, atype, box, neighbors=[NeighborList(*edges)])

    if args.path == "ab":
        return alternate(model, compressed, neighbors, len(atype), warmups, repeats, args, base_rss)
    for i in range(warmups + repeats):
        graph = out = None  # free the previous repeat's tensors before building new ones
        graph, t_nl = timed(neighbors)
        out, t_ev = timed(lambda: evaluate(model, graph, chunk_atoms=args.chunk_atoms))
        if i >= warmups:
            nl.append(t_nl)
            ev.append(t_ev)
    natoms = len(atype)
    res = {"atoms": natoms, "threads": args.threads[0], "path": args.path + ("/f32" if args.precision == "float32" else ""),
           "chunk_atoms": args.chunk_atoms, "repeats": repeats,
           "nl_us": statistics.median(nl) / natoms * 1e6, "eval_us": statistics.median(ev) / natoms * 1e6,
           "total_us": statistics.median(a + b for a, b in zip(nl, ev)) / natoms * 1e6,
           "energy_per_atom": float(out["energy"].sum()) / natoms, "base_rss_mib": base_rss}
    if args.deepmd:
        res["deepmd_us"] = deepmd_time(args, coord, atype, box, warmups, repeats)
    if args.kernels and args.path == "ops":
        res["kernels"] = kernel_table(model, graph, repeats=max(repeats, 5))
    res["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return res


def alternate(model, compressed, neighbors, natoms: int, warmups: int, repeats: int, args, base_rss: float) -> dict:
    """Rounds of one neighbour list, then a block of evaluations of each model in turn (the first of each block
    untimed: it warms the caches for its model, as in MD where one model runs step after step); the ratio
    of each round, so that a slow spell of the machine slows both sides of a ratio."""
    from dpmd.model.forces import evaluate

    def block(m, graph):
        evaluate(m, graph, chunk_atoms=args.chunk_atoms)
        return statistics.median(timed(lambda: evaluate(m, graph, chunk_atoms=args.chunk_atoms))[1] for _ in range(3))

    rows = []
    for i in range(warmups + max(repeats // 3, 3)):
        graph, t_nl = timed(neighbors)
        t_ops, t_c = block(model, graph), block(compressed, graph)
        if i >= warmups:
            rows.append((t_nl, t_ops, t_c))
    med = statistics.median
    us = 1e6 / natoms
    ratios = [(t_nl + t_ops) / (t_nl + t_c) for t_nl, t_ops, t_c in rows]
    return {"atoms": natoms, "threads": args.threads[0], "path": "ab" + ("/f32" if args.precision == "float32" else ""),
            "repeats": len(rows), "nl_us": med(r[0] for r in rows) * us, "ops_eval_us": med(r[1] for r in rows) * us,
            "compressed_eval_us": med(r[2] for r in rows) * us,
            "ops_total_us": med(r[0] + r[1] for r in rows) * us, "compressed_total_us": med(r[0] + r[2] for r in rows) * us,
            "ratio_eval": med(r[1] / r[2] for r in rows), "ratio_total": med(ratios),
            "ratio_total_range": [min(ratios), max(ratios)], "base_rss_mib": base_rss,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def kernel_table(model, graph, repeats: int) -> list:
    """(kernel, kernel ms, reference ms) for each op on this graph; forward + backward where differentiable."""
    import torch
    from dpmd import ops
    from dpmd.geometry.graph import edge_vectors
    from dpmd.geometry.neighbor import reference_neighbor_list
    from dpmd.model.forces import assemble

    def best(fn):
        fn()
        return min(timed(fn)[1] for _ in range(repeats)) * 1e3

    desc = model.descriptor
    natoms = graph["atype"].numel()
    coord, box = graph["coord"], graph["box"][0]
    vec = edge_vectors(graph).detach().requires_grad_()
    w4 = torch.randn(vec.shape[0], 4, dtype=vec.dtype)

    kernels, reference = ops.resolve(vec, first_derivative=True), ops.REFERENCE._replace(forces_only=True)

    def env(fast):
        torch.autograd.grad((desc.env_rows(vec, kernels if fast else reference) * w4).sum(), vec)

    center = graph["center"]
    rows = torch.randn(vec.shape[0], 4, dtype=vec.dtype, requires_grad=True)
    emb = torch.randn(vec.shape[0], desc.width, dtype=vec.dtype, requires_grad=True)
    wt = torch.randn(natoms, 4, desc.width, dtype=vec.dtype)

    def contract(fast):
        t = desc._block(rows, emb, center, natoms, backend=kernels if fast else reference)
        torch.autograd.grad((t * wt).sum(), (rows, emb))

    def embedding_and_contract(fast):
        """net 0 on every edge's s, contracted, d/d(rows): the linearised net (value and tangent in one sweep,
        forces only) with the fused kernels, against autograd through the net and the padded reference."""
        r = rows.detach().requires_grad_()
        if fast:
            t = desc.embedding_block(0, r, center, natoms, backend=kernels)
        else:
            t = desc._block(r, desc.embeddings[0](r[:, :1]), center, natoms, backend=reference)
        torch.autograd.grad((t * wt).sum(), r)

    g, e = torch.randn_like(vec.detach()), torch.randn(natoms, dtype=vec.dtype)
    args = (e, g, vec.detach(), center, graph["neighbor"], graph["batch"], 1, natoms, True)
    return [
        ("neighbor_list", best(lambda: ops.neighbor_list(coord, box, model.rcut)),
         best(lambda: reference_neighbor_list(coord, box, model.rcut))),
        ("env_mat (+backward)", best(lambda: env(True)), best(lambda: env(False))),
        ("contract (+backward)", best(lambda: contract(True)), best(lambda: contract(False))),
        ("embedding net + contract (+d/drows)", best(lambda: embedding_and_contract(True)),
         best(lambda: embedding_and_contract(False))),
        ("assemble (+atom virial)", best(lambda: ops.assemble(*args)), best(lambda: assemble(*args))),
    ]


def deepmd_time(args, coord, atype, box, warmups, repeats):
    """DeePMD-kit's own DeepPot.eval (neighbour list included), µs/atom; an error message if it fails."""
    try:
        sys.path.insert(0, str(Path(__file__).parent))
        from deepmd_compat import prepare_deepmd_import

        prepare_deepmd_import()
        from deepmd.infer import DeepPot
        dp = DeepPot(args.model)
        times = [timed(lambda: dp.eval(coord.reshape(1, -1), box.reshape(1, 9), atype))[1]
                 for _ in range(warmups + repeats)][warmups:]
        return statistics.median(times) / len(atype) * 1e6
    except Exception as err:  # noqa: BLE001 - reported, not fatal
        return f"failed: {type(err).__name__}: {err}"[:200]


def run_config(args, n: int, threads: int, path: str, precision: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--sizes", str(n), "--threads", str(threads),
           "--model", str(args.model), "--data", str(args.data), "--path", path, "--precision", precision,
           "--min-nbor-dist", str(args.min_nbor_dist), "--descriptor", args.descriptor]
    cmd += ["--kernels"] if args.kernels else []
    for opt in ("repeats", "warmups", "chunk_atoms"):
        if getattr(args, opt) is not None:
            cmd += [f"--{opt.replace('_', '-')}", str(getattr(args, opt))]
    cmd += [] if args.deepmd else ["--no-deepmd"]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    if path == "reference":  # the reference code itself (not even the PyTorch linearised nets)
        env["DPMD_OPS"], env["DPMD_LINEARIZE"] = "0", "0"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:  # e.g. killed for memory (-9)
        tail = proc.stderr.strip().splitlines()[-1:] or [""]
        return {"atoms": 192 * n ** 3, "threads": threads, "path": path + ("/f32" if precision == "float32" else ""),
                "error": f"exit {proc.returncode} {tail[0][:120]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def report(results: list[dict], deepmd_installed: bool) -> None:
    print(f"\n{'atoms':>7} {'thr':>3} {'path':>9} {'nl µs/at':>9} {'eval µs/at':>10} {'total µs/at':>11} "
          f"{'peak RSS MiB':>12} {'(base MiB)':>10}" + ("  deepmd µs/at" if deepmd_installed else ""))
    ab = [r for r in results if r["path"].startswith("ab") and "error" not in r]
    results = [r for r in results if r not in ab]
    for r in results:
        if "error" in r:
            print(f"{r['atoms']:>7} {r['threads']:>3} {r['path']:>9}  {r['error']}")
            continue
        dp = r.get("deepmd_us")
        dp = "" if dp is None else f"  {dp:>13.1f}" if isinstance(dp, float) else f"  {dp}"
        print(f"{r['atoms']:>7} {r['threads']:>3} {r['path']:>9} {r['nl_us']:>9.1f} {r['eval_us']:>10.1f} {r['total_us']:>11.1f} "
              f"{r['peak_rss_mib']:>12.0f} {r['base_rss_mib']:>10.0f}" + dp)
    for r in results:
        if r.get("kernels"):
            print(f"\nper kernel, {r['atoms']} atoms, {r['threads']} thread(s): ms (kernel vs reference)")
            for name, k_ms, r_ms in r["kernels"]:
                print(f"  {name:<36} {k_ms:8.3f} {r_ms:8.3f}   {r_ms / k_ms:5.1f}x")
    for r in ab:
        lo, hi = r["ratio_total_range"]
        print(f"\nalternating in one worker, {r['atoms']:,} atoms, {r['threads']} thread(s), {r['repeats']} rounds of 3 "
              f"({r['path']}): total µs/atom {r['ops_total_us']:.1f} uncompressed, {r['compressed_total_us']:.1f} "
              f"compressed (nl {r['nl_us']:.1f}); compressed faster by {r['ratio_total']:.2f}x total "
              f"(rounds {lo:.2f}-{hi:.2f}), {r['ratio_eval']:.2f}x eval")
    paths = sorted({r["path"] for r in results if "error" not in r})
    if not paths:
        return
    if len(paths) > 1:
        by_path = {(r["atoms"], r["threads"], r["path"]): r for r in results if "error" not in r}
        for (a, t, p), r in sorted(by_path.items()):
            for base in ("reference", "ops"):
                if p != base and p in ("ops", "compressed") and (a, t, base) in by_path:
                    ref = by_path[a, t, base]
                    print(f"{p} vs {base} at {a:,} atoms, {t} thread(s): eval {ref['eval_us'] / r['eval_us']:.2f}x, "
                          f"total {ref['total_us'] / r['total_us']:.2f}x faster")
    main_path = "ops" if "ops" in paths else paths[0]  # the path whose size and thread scaling is reported
    ok = [r for r in results if "error" not in r and r["path"] == main_path]
    by = {(r["atoms"], r["threads"]): r for r in ok}
    sizes, threads = sorted({r["atoms"] for r in ok}), sorted({r["threads"] for r in ok})
    print()
    if len(sizes) > 1:
        for t in threads:
            if (sizes[0], t) in by and (sizes[-1], t) in by:
                ratio = by[sizes[-1], t]["total_us"] / by[sizes[0], t]["total_us"]
                print(f"per-atom cost {sizes[-1]:,} vs {sizes[0]:,} atoms, {t} thread(s): {ratio:.2f}x (target ≤1.3x)")
    if len(threads) > 1:
        for a in sizes:
            if (a, threads[0]) in by and (a, threads[-1]) in by:
                s = by[a, threads[0]]["total_us"] / by[a, threads[-1]]["total_us"]
                print(f"speedup {threads[-1]} vs {threads[0]} thread(s) at {a:,} atoms: {s:.2f}x")
    epa = [r["energy_per_atom"] for r in ok]
    if epa and max(epa) - min(epa) > 1e-8 * abs(epa[0]):
        print(f"WARNING: energy per atom differs between replications: {min(epa)} .. {max(epa)}")
    print("\nDeePMD-kit 3.2 baseline (measured earlier on this machine, quoted constants): "
          + "; ".join(f"{k}: {v}" for k, v in BASELINE.items()))
    print("targets:", TARGETS)
    print("DeePMD-kit: timed in this run (column 'deepmd')" if deepmd_installed
          else "DeePMD-kit: not installed (no 'deepmd' module), not timed in this run")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 4, 8], help="replication n (192 n^3 atoms)")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, help="timed repeats (default 30/5/3/2 for n=1/2/4/8+)")
    p.add_argument("--warmups", type=int, help="untimed warm-ups (default 5/2/1/1 for n=1/2/4/8+)")
    p.add_argument("--chunk-atoms", type=int, help="evaluate(chunk_atoms=...); default: dpmd's default")
    p.add_argument("--model", default=str(DEFAULT_MODEL))
    p.add_argument("--data", default=str(DEFAULT_DATA))
    p.add_argument("--descriptor", choices=["model", *EXAMPLE_INPUTS], default="model",
                   help="model: --model; else DeePMD-kit's water example model of that descriptor (random weights)")
    p.add_argument("--precision", nargs="+", choices=["float64", "float32"], default=["float64"])
    p.add_argument("--min-nbor-dist", type=float, default=0.885, help="compression range (Å; shared water: 0.885)")
    p.add_argument("--path", nargs="+", choices=["reference", "ops", "compressed", "both", "ab"], default=["both"],
                   help="PyTorch reference (DPMD_OPS=0), the kernel library, the compressed model (kernel "
                        "library), or both = reference ops (default)")
    p.add_argument("--ab", action="store_true", help="also the compressed vs uncompressed ratio, alternating both "
                   "models in one worker (the same machine load on both sides)")
    p.add_argument("--kernels", action="store_true", help="per-kernel table (ops path): kernel vs reference op")
    p.add_argument("--json", help="save results to this file")
    p.add_argument("--no-deepmd", dest="deepmd", action="store_false", help="don't time DeePMD-kit even if installed")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    installed = importlib.util.find_spec("deepmd") is not None  # found without importing it
    args.deepmd = args.deepmd and installed
    results = []
    if args.worker:
        args.path = args.path[0]
        args.precision = args.precision[0]
        print(json.dumps(worker(args)))
        return
    paths = [q for p in args.path for q in (["reference", "ops"] if p == "both" else [p])] + (["ab"] if args.ab else [])
    if {"ops", "compressed", "ab"} & set(paths):  # build once here, not in each worker
        from dpmd import ops
        ops.build()
    for n in args.sizes:
        for t in args.threads:
            for path, precision in [(q, prec) for q in paths for prec in args.precision]:
                results.append(run_config(args, n, t, path, precision))
                r = results[-1]
                done = r.get("error") or (f"{r['ratio_total']:.2f}x" if path == "ab" else f"{r['total_us']:.1f} µs/atom")
                print(f"done: {r['atoms']} atoms, {t} thread(s), {r['path']}: {done}", flush=True)
    report(results, installed)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=1))


if __name__ == "__main__":
    main()
