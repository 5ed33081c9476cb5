"""Active-learning efficiency: held-out force RMSE vs number of labels, campaign selection vs random selection.

Reference: EMT copper (ASE).  Held-out test frames come from long reference (EMT) Langevin MD at the explored
temperatures.  The campaign (configs/campaign_cu_emt.yaml's structures and NVT stage, shortened) runs for a
few iterations; after each iteration k, one model is trained from scratch (the same steps and seed for every
point) on
  - campaign: every label the campaign holds after iteration k, and
  - random:   the same initial labels plus the same number of frames drawn at random from ALL frames the
              campaign explored (labelled with EMT here),
and evaluated on the test frames.  Random is also run at 2x and 3x the campaign's final count, so the labels
random needs for the campaign's final RMSE can be interpolated: the ratio is reported (target: >= 2).

    PYTHONPATH=. python benchmarks/al_efficiency.py                       # small: a few minutes on 2 cores
    PYTHONPATH=. python benchmarks/al_efficiency.py --iterations 5 --budget 12 --train-steps 2000 --test-steps 4000
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def reference_md(structure, temperature: float, steps: int, every: int, seed: int):
    """Frames (coord, box, energy, forces) every `every` steps of EMT Langevin MD (1 fs), after 20 % equilibration."""
    from ase import units
    from ase.calculators.emt import EMT
    from ase.md.langevin import Langevin
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution

    atoms = structure.copy()
    atoms.calc = EMT()
    rng = np.random.default_rng(seed)
    MaxwellBoltzmannDistribution(atoms, temperature_K=temperature, rng=rng)
    dyn = Langevin(atoms, 1.0 * units.fs, temperature_K=temperature, friction=0.02, rng=rng, fixcm=False)
    frames = []
    start = steps // 5

    def grab():
        if dyn.nsteps >= start:
            frames.append((atoms.positions.copy(), atoms.cell[:].copy(), atoms.get_potential_energy(),
                           atoms.get_forces().copy()))

    dyn.attach(grab, interval=every)
    dyn.run(steps)
    return frames


def force_rmse(model, frames) -> float:
    import torch

    se, n = 0.0, 0
    for coord, box, _, force in frames:
        out = model(torch.as_tensor(coord), torch.zeros(len(coord), dtype=torch.long), torch.as_tensor(box))
        se += float(((out["force"].detach().numpy() - force) ** 2).sum())
        n += force.size
    return (se / n) ** 0.5


def write_labels(frames_by_key: dict, root: Path, type_map) -> list[str]:
    """deepmd/npy systems (one per atom count) from {key: [(coord, box, energy, force), ...]}."""
    from dpmd.data import System, write_system

    dirs = []
    for key, frames in sorted(frames_by_key.items()):
        n = len(frames[0][0])
        system = System(path=str(root / key), type_map=type_map, atype=np.zeros(n, dtype=int),
                        coord=np.stack([f[0] for f in frames]), box=np.stack([f[1] for f in frames]),
                        energy=np.array([f[2] for f in frames]), force=np.stack([f[3] for f in frames]), virial=None)
        write_system(system, root / key, overwrite=True)
        dirs.append(str(root / key))
    return dirs


def train_one(cfg: dict, systems: list[str], steps: int, out: Path):
    from dpmd.train.trainer import Trainer
    from explore_label_train.config import training_input

    config = training_input(cfg, systems, steps, member=0, iteration=0)
    trainer = Trainer(config, out_dir=out, progress=False)
    trainer.run()
    return trainer.model.eval()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iterations", type=int, default=3, help="campaign iterations")
    ap.add_argument("--budget", type=int, default=8, help="labels per iteration (select.budget)")
    ap.add_argument("--campaign-steps", type=int, default=200,
                    help="campaign ensemble training steps (first iteration; half of it later)")
    ap.add_argument("--explore-steps", type=int, default=300, help="MD steps per exploration trajectory")
    ap.add_argument("--train-steps", type=int, default=600, help="steps of each from-scratch evaluation model")
    ap.add_argument("--test-steps", type=int, default=3000, help="reference MD steps per temperature (test set)")
    ap.add_argument("--temperatures", type=float, nargs="+", default=[300.0, 900.0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work-dir", default=None, help="default: a temporary directory")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)

    import torch

    from explore_label_train.campaign import Campaign, read_structure
    from explore_label_train.config import load_campaign
    from explore_label_train.labelers import label

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="al_efficiency_"))
    cfg = load_campaign(REPO / "configs" / "campaign_cu_emt.yaml")
    cfg["work_dir"] = str(work / "campaign")
    stage = cfg["explore"][0]
    stage.update(temperatures=args.temperatures, steps=args.explore_steps)
    cfg["explore"] = [stage]
    cfg["train"].update(numb_steps=args.campaign_steps, reuse_numb_steps=max(1, args.campaign_steps // 2))
    cfg["select"]["budget"] = args.budget
    cfg["convergence"].update(max_iterations=args.iterations, accurate_ratio=1.0, max_labels=10 ** 6)
    times = {}

    # held-out test frames: reference MD of every explored structure at every explored temperature
    t0 = time.perf_counter()
    test = []
    for si, name in enumerate(stage["structures"]):
        atoms = read_structure(cfg["structures"][name], cfg["type_map"], name)
        for ti, temp in enumerate(args.temperatures):
            test += reference_md(atoms, temp, args.test_steps, every=max(1, args.test_steps // 100),
                                 seed=1000 + 10 * si + ti)
    times["reference MD (test set)"] = time.perf_counter() - t0
    print(f"test set: {len(test)} frames from EMT MD at {args.temperatures} K "
          f"({times['reference MD (test set)']:.1f} s)")

    t0 = time.perf_counter()
    camp = Campaign(cfg, log=None)
    camp.run()
    times["campaign (total)"] = time.perf_counter() - t0
    st = camp.state
    for s in ("init", "train", "explore", "select", "label", "check"):
        times[f"  campaign {s}"] = sum(r[0] or 0.0 for r in st.q("SELECT seconds FROM stages WHERE stage=?", s))

    def frames_of(rows):
        out = {}
        for r in rows:
            z = np.load(camp.root / r["file"])
            out.setdefault(f"Cu{len(z['coord'])}", []).append((z["coord"], z["box"], float(z["energy"]), z["force"]))
        return out

    # the explored pool: every frame of every exploration, any class
    pool = []
    for r in st.q("SELECT file, idx FROM frames ORDER BY frame_id"):
        z = np.load(camp.root / r["file"])
        pool.append((z["coord"][r["idx"]], z["box"][r["idx"]]))
    initial = st.q("SELECT file FROM labels WHERE frame_id IS NULL ORDER BY label_id")
    n_init = len(initial)
    rng = np.random.default_rng(args.seed)
    order = rng.permutation(len(pool))
    random_labels: list = []   # labelled lazily, in the random order

    def random_set(n_explored):
        while len(random_labels) < min(n_explored, len(pool)):
            coord, box = pool[order[len(random_labels)]]
            v = label({"symbols": ["Cu"] * len(coord), "positions": coord.tolist(), "cell": box.tolist(),
                       "calculator": "emt", "kwargs": {}})
            random_labels.append((coord, box, v["energy"], v["forces"]))
        out = frames_of(initial)
        for f in random_labels[:n_explored]:
            out.setdefault(f"Cu{len(f[0])}", []).append(f)
        return out

    curve = {"campaign": [], "random": []}
    t_train = 0.0
    its = [r[0] for r in st.q("SELECT iteration FROM iterations WHERE status='done' ORDER BY iteration")]
    counts = []
    for it in its:
        rows = st.q("SELECT file FROM labels WHERE iteration<=? ORDER BY label_id", it)
        t0 = time.perf_counter()
        model = train_one(cfg, write_labels(frames_of(rows), work / f"eval/campaign{it}", cfg["type_map"]),
                          args.train_steps, work / f"eval/campaign{it}/train")
        t_train += time.perf_counter() - t0
        curve["campaign"].append((len(rows), force_rmse(model, test)))
        counts.append(len(rows) - n_init)
    final = len(counts) and counts[-1]
    for n_explored in counts + [2 * final, 3 * final]:
        if n_explored > len(pool):
            break
        t0 = time.perf_counter()
        sets = random_set(n_explored)
        model = train_one(cfg, write_labels(sets, work / f"eval/random{n_explored}", cfg["type_map"]),
                          args.train_steps, work / f"eval/random{n_explored}/train")
        t_train += time.perf_counter() - t0
        curve["random"].append((n_init + n_explored, force_rmse(model, test)))
    times["evaluation training (from scratch)"] = t_train

    print(f"\nheld-out force RMSE (eV/Å) vs labels ({n_init} initial labels in both; "
          f"{len(pool)} explored frames in the random pool; {args.train_steps} training steps per point)")
    print(f"{'labels':>7}  {'campaign':>9}  {'random':>9}")
    rows = sorted({n for n, _ in curve["campaign"]} | {n for n, _ in curve["random"]})
    c, r = dict(curve["campaign"]), dict(curve["random"])
    for n in rows:
        print(f"{n:>7}  {c[n] if n in c else float('nan'):>9.4f}  {r[n] if n in r else float('nan'):>9.4f}")
    target_n, target = curve["campaign"][-1]
    ratio = None
    rn = np.array([n for n, _ in curve["random"]], dtype=float)
    rr = np.array([e for _, e in curve["random"]])
    below = np.nonzero(rr <= target)[0]
    if len(below):
        k = below[0]
        if k == 0:
            need = rn[0]
        else:   # linear interpolation between the last point above and the first at or below the target
            need = rn[k - 1] + (rn[k] - rn[k - 1]) * (rr[k - 1] - target) / (rr[k - 1] - rr[k])
        ratio = need / target_n
        print(f"random selection needs ~{need:.0f} labels for the campaign's RMSE {target:.4f} at {target_n} labels: "
              f"ratio {ratio:.2f} (target >= 2)")
    else:
        print(f"random selection does not reach the campaign's RMSE {target:.4f} within {int(rn.max())} labels: "
              f"ratio > {rn.max() / target_n:.2f} (target >= 2)")
    print("\nwall time per stage (s):")
    for k, v in times.items():
        print(f"  {k:<36} {v:8.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"curve": curve, "ratio": ratio, "times": times,
                                               "args": vars(args)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
