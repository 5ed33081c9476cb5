"""LAMMPS speed with `pair_style dpmd`: steps/s at 192, 1,536 and 12,288 water atoms (frame 0 of
examples/water/data_0 replicated n x n x n), 1 and 2 MPI ranks, the DeePMD-kit water model uncompressed and
compressed (`dpmd compress`, when this dpmd has it), next to `dpmd md` on the same system
(benchmarks/md_mpi_speed.py's worker), with the ratio to DeePMD-kit's LAMMPS plugin on this machine
(1.4 steps/s uncompressed, 2.8 compressed, 192 atoms, issue 7).

Both engines: NVT at 300 K, 0.5 fs, a 1 Å skin, float64, one thread per rank (OMP_NUM_THREADS=1);
LAMMPS's time is its "Loop time" of a run after `--warmup` untimed steps.

    python benchmarks/lammps_speed.py                                    # everything (long)
    python benchmarks/lammps_speed.py --sizes 1 --ranks 1 --steps 5      # a quick check
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = ROOT.parent / "shared/deepmd-kit/water_se_e2_a/model.ckpt.pt"
DEFAULT_DATA = ROOT / "examples/water/data_0"
DEEPMD_KIT_192 = {"uncompressed": 1.4, "compressed": 2.8}  # steps/s of DeePMD-kit 3.2's plugin, issue 7

LAMMPS_INPUT = """units metal
atom_style atomic
boundary p p p
read_data {data}
replicate {n} {n} {n}
plugin load {plugin}
pair_style dpmd {model}
pair_coeff * * O H
neighbor 1.0 bin
velocity all create 300.0 1 mom yes rot yes
fix nvt all nvt temp 300.0 300.0 0.05
timestep 0.0005
thermo 100
run {warmup}
run {steps}
"""


def prepare(workdir: Path, model_path: str, data: str, compressed: bool) -> dict:
    """Frozen models and the data file; {'uncompressed': path[, 'compressed': path]}."""
    from dpmd.data import load_system
    from dpmd.geometry.neighbor import neighbor_stat
    from dpmd.lammps import write_data
    from dpmd.model import load_model, save_model

    s = load_system(data, ["O", "H"])
    write_data(workdir / "water.data", s.coord[0], s.atype, s.box[0], ["O", "H"])
    model = load_model(model_path)
    models = {"uncompressed": workdir / "water.pth"}
    save_model(model, models["uncompressed"])
    if compressed:
        try:
            from dpmd.model.compress import compress_file
        except ImportError:
            print("note: this dpmd has no `dpmd compress`; compressed runs skipped", flush=True)
            return models
        frames = ((s.coord[f], s.atype, s.box[f]) for f in range(s.nframes))
        _, min_dist = neighbor_stat(frames, model.rcut, len(model.type_map))
        models["compressed"] = workdir / "water_compressed.pth"
        compress_file(models["uncompressed"], models["compressed"], min_nbor_dist=min_dist)
    return models


def lammps_steps_per_s(workdir: Path, plugin: Path, model: Path, n: int, ranks: int, steps: int, warmup: int,
                       env: dict) -> float:
    script = workdir / f"in.{model.stem}.{n}.{ranks}"
    script.write_text(LAMMPS_INPUT.format(data=workdir / "water.data", n=n, plugin=plugin, model=model,
                                          warmup=warmup, steps=steps))
    lmp = Path(sys.executable).parent / "lmp"
    mpiexec = Path(sys.executable).parent / "mpiexec"
    cmd = ([str(mpiexec), "-n", str(ranks)] if ranks > 1 else []) + [str(lmp), "-in", str(script), "-log", "none"]
    proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"lmp failed ({model.name}, {192 * n ** 3} atoms, {ranks} ranks):\n"
                         + (proc.stdout + proc.stderr)[-3000:])
    loops = re.findall(r"Loop time of ([0-9.eE+-]+) on \d+ procs for (\d+) steps", proc.stdout)
    seconds, nsteps = float(loops[-1][0]), int(loops[-1][1])
    return nsteps / seconds


def dpmd_md_steps_per_s(model: Path, n: int, ranks: int, steps: int, warmup: int, data: str, env: dict) -> float:
    mpiexec = Path(sys.executable).parent / "mpiexec"
    cmd = ([str(mpiexec), "-n", str(ranks)] if ranks > 1 else []) + [
        sys.executable, str(ROOT / "benchmarks/md_mpi_speed.py"), "--worker", "--size", str(n), "--steps", str(steps),
        "--warmup", str(warmup), "--model", str(model), "--data", data]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"dpmd md failed ({model.name}, {192 * n ** 3} atoms, {ranks} ranks):\n"
                         + (proc.stdout + proc.stderr)[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])["steps_per_s"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 4], help="replication n: 192 n^3 atoms")
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 20 at 192 atoms, fewer above)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--model", default=str(DEFAULT_MODEL))
    p.add_argument("--data", default=str(DEFAULT_DATA))
    p.add_argument("--no-compressed", action="store_true", help="only the uncompressed model")
    p.add_argument("--no-dpmd-md", action="store_true", help="skip the `dpmd md` comparison")
    p.add_argument("--json", default=None, help="save the results")
    args = p.parse_args()

    from dpmd.lammps import build_plugin

    plugin = build_plugin()
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    results = []
    with tempfile.TemporaryDirectory(prefix="dpmd_lammps_speed_") as tmp:
        workdir = Path(tmp)
        models = prepare(workdir, args.model, args.data, not args.no_compressed)
        print(f"{'model':>12} {'atoms':>6} {'ranks':>5} {'lammps':>9} {'dpmd md':>9} {'lmp/md':>7} "
              f"{'vs DeePMD-kit':>13}")
        for kind, model in models.items():
            for n in args.sizes:
                steps = args.steps or max(2, 20 // n ** 3)
                for r in args.ranks:
                    lmp = lammps_steps_per_s(workdir, plugin, model, n, r, steps, args.warmup, env)
                    md = None if args.no_dpmd_md else dpmd_md_steps_per_s(model, n, r, steps, args.warmup,
                                                                          args.data, env)
                    ref = DEEPMD_KIT_192[kind] if n == 1 and r == 1 else None
                    results.append({"model": kind, "atoms": 192 * n ** 3, "ranks": r, "steps": steps,
                                    "lammps_steps_per_s": lmp, "dpmd_md_steps_per_s": md,
                                    "deepmd_kit_steps_per_s": ref})
                    print(f"{kind:>12} {192 * n ** 3:>6} {r:>5} {lmp:>9.3f} "
                          f"{'-' if md is None else f'{md:.3f}':>9} {'-' if md is None else f'{lmp / md:.2f}':>7} "
                          f"{'-' if ref is None else f'{lmp / ref:.2f}x':>13}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
