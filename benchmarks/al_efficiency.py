"""Active-learning efficiency: held-out force RMSE vs number of labels, campaign selection vs two baselines.

Reference: EMT copper (ASE).  Held-out test frames come from long reference (EMT) Langevin MD at the explored
temperatures (--temperatures; the campaign's NVT stage explores exactly these, so the test set covers what the
campaign explores and nothing else).  The campaign (configs/campaign_cu_emt.yaml's structures, model template,
trust levels and NVT stage, shortened) runs for a few iterations; after its last iteration (after each one with
--curve), models are trained from scratch on
  - campaign: every label the campaign holds after iteration k,
  - each --rules rule (devi, fps, dfps, adaptive: explore_label_train/selection.py) replayed on the same
              explorations: the initial labels plus, from each iteration <= k, the budget chosen by that rule
              among the iteration's candidates, with the campaign's deviations, its first model's descriptors and
              the rule's own earlier picks as the labelled set (so several rules are compared on one campaign;
              devi replayed picks the frames the campaign picked with devi),
  - random:   the same initial labels plus the same number of frames drawn at random from ALL frames the
              campaign explored (any class, every iteration; labelled with EMT here), and
  - dpgen:    DP-GEN's rule on the same explorations: the initial labels plus, from each iteration <= k, frames
              drawn uniformly among that iteration's candidates (between the trust levels, passing the
              filters), at most the budget of them,
and evaluated on the test frames.  The baselines and rules select from the frames the campaign explored, so the
selection rule alone differs (a DP-GEN run would explore with its own models; here it gets the campaign's candidates).
Every point is trained --seeds times (template seeds 0..N-1, the same for every arm and every point, the same
steps; the baselines also redraw their frames per seed), and the curve is the mean ± std over seeds: a single
model per point is dominated by its seed (differences of 2x in held-out RMSE between seeds on the same data),
not by its data.  The baselines are also run beyond the campaign's final count (--random-multiples: random at
those multiples of the count, dpgen with its cap at those multiples of the budget), so the labels each needs
for each arm's RMSE can be interpolated on its mean curve; the ratio at an arm's final point is the
figure of merit (target: >= 2, i.e. the campaign needs <= 0.5x the labels), also printed per seed.  The RMSE
per test group (structure x temperature) shows where the difference comes from.  The evaluation models train
24000 steps: at 2000 and at 6000 they were step-limited (each model's training RMSE as high as its held-out one),
which flattened every learning curve to the optimiser's floor and left "the labels DP-GEN needs" to the training
seeds.  The script prints how far each baseline's mean curve falls and the spread of that fall over training seeds
(paired), and says so when the fall is the smaller.

The model must also see what the reference sees: EMT's cutoff for Cu is 5.38 Å (its 4th neighbour shell at 5.1 Å),
so the campaign file's rcut is 5.5 Å.  With rcut 4.5 Å part of every force was out of the model's reach, a floor
no label could lower (6000-step models: held-out 0.026-0.042 eV/Å on 32 reference-MD frames, against 0.025-0.029
with 5.5), and the default problem could not rank selection rules (benchmarks/README.md has those runs).

--vacancy adds a harder third structure, fcc_vac: a 2x2x2 cubic fcc cell (a = 3.61 Å) with one atom removed
(31 atoms), meant to need more labels than the 4- and 8-atom cells, whose learning curve is flat from ~14.
It is explored and tested like them but is not in the initial labels, so the campaign has to find it.

    PYTHONPATH=. python benchmarks/al_efficiency.py --baselines dpgen --random-multiples 2 3 10 \
        --dpgen-iterations 1 3           # the issue-22 figure: 18 models, 46 min on one core; a cap of 10 x the
                                         # budget labels (nearly) every candidate; add --campaign-seed 1
    PYTHONPATH=. python benchmarks/al_efficiency.py --vacancy --baselines dpgen --random-multiples 2 3 10 \
        --dpgen-iterations 1 3           # and --campaign-seed 1
    PYTHONPATH=. python benchmarks/al_efficiency.py --rules devi dfps adaptive ...   # replay other rules
    PYTHONPATH=. python benchmarks/al_efficiency.py --temperatures 300 900 1500 ...  # a hotter exploration
    PYTHONPATH=. python benchmarks/al_efficiency.py --initial-perturb 1 --budget 1 ... # from the first label
    PYTHONPATH=. python benchmarks/al_efficiency.py --saturation 4 96   # Cu's learning curve on reference-MD frames
    PYTHONPATH=. python benchmarks/al_efficiency.py --seeds 1 --train-steps 600 --campaign-steps 200   # quick look
    PYTHONPATH=. python benchmarks/al_efficiency.py --curve   # the campaign and the rules after every iteration
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import Counter
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


def force_sq_errors(model, frames) -> np.ndarray:
    """(F, 2): per test frame, the sum of squared force errors and the number of force components."""
    import torch

    out = np.zeros((len(frames), 2))
    for i, (coord, box, _, force) in enumerate(frames):
        pred = model(torch.as_tensor(coord), torch.zeros(len(coord), dtype=torch.long), torch.as_tensor(box))
        out[i] = float(((pred["force"].detach().numpy() - force) ** 2).sum()), force.size
    return out


def force_rmse(model, frames) -> float:
    se = force_sq_errors(model, frames)
    return float((se[:, 0].sum() / se[:, 1].sum()) ** 0.5)


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


def train_one(cfg: dict, systems: list[str], steps: int, out: Path, seed: int = 0):
    """One model from scratch; `seed` picks the ensemble-member seeds of the campaign's template (0, 1, ...)."""
    from dpmd.train.trainer import Trainer
    from explore_label_train.config import training_input

    config = training_input(cfg, systems, steps, member=seed, iteration=0)
    trainer = Trainer(config, out_dir=out, progress=False)
    trainer.run()
    return trainer.model.eval()


def labels_needed(curve_n, curve_rmse, target):
    """Labels at which a (mean) curve first reaches `target`: linear interpolation; None if it never does."""
    rn, rr = np.asarray(curve_n, dtype=float), np.asarray(curve_rmse)
    below = np.nonzero(rr <= target)[0]
    if not len(below):
        return None
    k = below[0]
    if k == 0:
        return float(rn[0])
    return float(rn[k - 1] + (rn[k] - rn[k - 1]) * (rr[k - 1] - target) / (rr[k - 1] - rr[k]))


def saturation(args, cfg, structures, test, work: Path) -> int:
    """--saturation: no campaign; models trained on N frames of independent reference MD (the test set's
    distribution, other seeds; N shared equally among the structure x temperature groups), their held-out and
    training force RMSE per seed.  Where the held-out curve flattens, more labels of that distribution stop
    helping; a training RMSE as high as the held-out one says the floor is the fit (steps, model), not the data."""
    from explore_label_train.campaign import read_structure

    groups = []
    for si, name in enumerate(structures):
        atoms = read_structure(cfg["structures"][name], cfg["type_map"], name)
        for ti, temp in enumerate(args.temperatures):
            groups.append(reference_md(atoms, temp, args.test_steps, every=max(1, args.test_steps // 100),
                                       seed=9000 + 10 * si + ti))
    print(f"{'labels':>6} {'seed':>4} {'held-out':>9} {'training':>9}   force RMSE (eV/Å), {args.train_steps} steps")
    rows = []
    for n in args.saturation:
        for s in range(args.seeds):
            rng = np.random.default_rng([args.seed, n, s])
            picks = [g[i] for k, g in enumerate(groups)
                     for i in rng.permutation(len(g))[:n // len(groups) + (k < n % len(groups))]]
            sets: dict = {}
            for f in picks:
                sets.setdefault(f"Cu{len(f[0])}", []).append(f)
            model = train_one(cfg, write_labels(sets, work / f"saturation/n{n}_s{s}", cfg["type_map"]),
                              args.train_steps, work / f"saturation/n{n}_s{s}/train", seed=s)
            rows.append({"labels": n, "seed": s, "held_out": force_rmse(model, test),
                         "training": force_rmse(model, picks)})
            print(f"{n:>6} {s:>4} {rows[-1]['held_out']:>9.4f} {rows[-1]['training']:>9.4f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"saturation": rows, "args": vars(args)}, indent=1))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iterations", type=int, default=4, help="campaign iterations")
    ap.add_argument("--budget", type=int, default=6, help="labels per iteration (select.budget)")
    ap.add_argument("--initial-perturb", type=int, default=None,
                    help="initial.perturb: perturbed copies labelled per initial structure (default: the campaign "
                         "file's, 4)")
    ap.add_argument("--method", default=None, choices=["fps", "devi", "random", "adaptive"],
                    help="select.method (default: the campaign file's)")
    ap.add_argument("--campaign-steps", type=int, default=None,
                    help="campaign ensemble training steps (first iteration; half of it later; default: the "
                         "campaign file's numb_steps and reuse_numb_steps)")
    ap.add_argument("--explore-steps", type=int, default=300, help="MD steps per exploration trajectory")
    ap.add_argument("--train-steps", type=int, default=24000,
                    help="steps of each from-scratch evaluation model (at 2000 and 6000 the models were step-limited: "
                         "their training RMSE as high as their held-out one)")
    ap.add_argument("--seeds", type=int, default=3,
                    help="evaluation models per point (seeds 0..N-1, the same for campaign and random; random "
                         "also draws its frames with a different order per seed)")
    ap.add_argument("--random-multiples", type=float, nargs="+", default=[1.5, 2.0, 3.0],
                    help="extra baseline points: random at these multiples of the campaign's final explored-label "
                         "count, dpgen with the per-iteration cap at these multiples of the budget")
    ap.add_argument("--baselines", nargs="+", default=["random", "dpgen"], choices=["random", "dpgen"],
                    help="random: drawn from all explored frames; dpgen: DP-GEN's rule, uniformly among each "
                         "iteration's candidates up to the budget")
    ap.add_argument("--rules", nargs="+", default=[], choices=["devi", "fps", "dfps", "adaptive"],
                    help="selection rules replayed on the campaign's explorations, like dpgen: each iteration's "
                         "budget chosen among its candidates with the campaign's deviations, descriptors of its "
                         "first model, and the rule's own earlier picks as the labelled set")
    ap.add_argument("--adaptive-pool", type=int, default=None,
                    help="the adaptive rule's candidates above its lower level (default: 3 x budget, the campaign's)")
    ap.add_argument("--curve", action="store_true",
                    help="evaluate the campaign and the rules after every iteration (default: the final one only)")
    ap.add_argument("--dpgen-iterations", type=int, nargs="+", default=None,
                    help="the iterations after which dpgen is evaluated at the budget (default: every one; the "
                         "multiples are always evaluated after the last)")
    ap.add_argument("--stratify", action="store_true", help="select.stratify: true")
    ap.add_argument("--test-steps", type=int, default=3000, help="reference MD steps per temperature (test set)")
    ap.add_argument("--temperatures", type=float, nargs="+", default=[300.0, 900.0])
    ap.add_argument("--trust", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                    help="trust levels (default: the campaign file's)")
    ap.add_argument("--config", default=str(REPO / "configs" / "campaign_cu_emt.yaml"),
                    help="campaign file (structures, model template, trust levels, selection)")
    ap.add_argument("--seed", type=int, default=0, help="random selection's draws")
    ap.add_argument("--campaign-seed", type=int, default=None,
                    help="initial.seed and the exploration stage's seed (default: the campaign file's)")
    ap.add_argument("--vacancy", action="store_true",
                    help="also explore and test fcc_vac: 2x2x2 cubic fcc Cu with one vacancy (31 atoms), not in "
                         "the initial labels")
    ap.add_argument("--saturation", type=int, nargs="+", default=None, metavar="N",
                    help="no campaign: held-out and training RMSE of models trained on N frames of independent "
                         "reference MD at the explored temperatures (where the learning curve flattens)")
    ap.add_argument("--work-dir", default=None, help="default: a temporary directory")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)

    import torch

    from explore_label_train.campaign import Campaign, read_structure
    from explore_label_train.config import STRUCTURE, load_campaign
    from explore_label_train.labelers import label
    from explore_label_train.selection import choose, frame_descriptors

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    t_start = time.perf_counter()
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="al_efficiency_"))
    cfg = load_campaign(args.config)
    cfg["work_dir"] = str(work / "campaign")
    stage = cfg["explore"][0]
    stage.update(temperatures=args.temperatures, steps=args.explore_steps)
    cfg["explore"] = [stage]
    if args.vacancy:
        import ase.build
        import ase.io

        # a file structure, as a user would give it (load_campaign's defaults filled in, since cfg is already
        # validated); only explored, so the campaign has to discover that it needs labels there
        vac = ase.build.bulk("Cu", "fcc", a=3.61, cubic=True).repeat(2)
        del vac[0]
        work.mkdir(parents=True, exist_ok=True)
        ase.io.write(work / "fcc_vac.extxyz", vac)
        cfg["structures"]["fcc_vac"] = {**STRUCTURE, "file": str(work / "fcc_vac.extxyz")}
        stage["structures"] = stage["structures"] + ["fcc_vac"]
    if args.campaign_steps:
        cfg["train"].update(numb_steps=args.campaign_steps, reuse_numb_steps=max(1, args.campaign_steps // 2))
    cfg["select"]["budget"] = args.budget
    if args.initial_perturb is not None:
        if args.initial_perturb < 1:
            ap.error("--initial-perturb must be at least 1")
        cfg["initial"]["perturb"] = args.initial_perturb
    if args.method:
        cfg["select"]["method"] = args.method
    cfg["select"]["stratify"] = cfg["select"]["stratify"] or args.stratify
    if args.campaign_seed is not None:
        cfg["initial"]["seed"] = stage["seed"] = args.campaign_seed
    if args.trust:
        cfg["trust"].update(lo=args.trust[0], hi=args.trust[1])
    cfg["convergence"].update(max_iterations=args.iterations, accurate_ratio=1.0, max_labels=10 ** 6)
    times = {}

    # held-out test frames: reference MD of every explored structure at every explored temperature
    t0 = time.perf_counter()
    test, test_groups = [], []
    for si, name in enumerate(stage["structures"]):
        atoms = read_structure(cfg["structures"][name], cfg["type_map"], name)
        for ti, temp in enumerate(args.temperatures):
            fr = reference_md(atoms, temp, args.test_steps, every=max(1, args.test_steps // 100),
                              seed=1000 + 10 * si + ti)
            test_groups.append((f"{name} {temp:g} K", len(test), len(test) + len(fr)))
            test += fr
    times["reference MD (test set)"] = time.perf_counter() - t0
    print(f"test set: {len(test)} frames from EMT MD at {args.temperatures} K "
          f"({times['reference MD (test set)']:.1f} s)", flush=True)
    if args.saturation:
        return saturation(args, cfg, stage["structures"], test, work)

    t0 = time.perf_counter()
    camp = Campaign(cfg, log=None)
    camp.run()
    times["campaign (total)"] = time.perf_counter() - t0
    st = camp.state
    for s in ("init", "train", "explore", "select", "label", "check"):
        times[f"  campaign {s}"] = sum(r[0] or 0.0 for r in st.q("SELECT seconds FROM stages WHERE stage=?", s))
    print(f"campaign: {times['campaign (total)']:.1f} s (ensemble steps {cfg['train']['numb_steps']}, then "
          f"{cfg['train']['reuse_numb_steps']}; trust lo {cfg['trust']['lo']:g}, hi {cfg['trust']['hi']:g}, "
          f"select {cfg['select']['method']}, budget {args.budget})")
    print(f"{'iter':>4} {'frames':>6} {'accurate':>8} {'candidate':>9} {'failed':>6}  selected (structure/temperature)")
    for r in st.q("SELECT * FROM iterations ORDER BY iteration"):
        sel = st.q("SELECT structure, temperature, COUNT(*) AS n FROM frames WHERE iteration=? AND selected=1 "
                   "GROUP BY structure, temperature ORDER BY structure, temperature", r["iteration"])
        print(f"{r['iteration']:>4} {r['n_frames']:>6} {r['accurate']:>8.1%} {r['candidate']:>9.1%} {r['failed']:>6.1%}  "
              + ", ".join(f"{s['structure']}/{s['temperature']:g}K:{s['n']}" for s in sel), flush=True)

    def frames_of(rows):
        out = {}
        for r in rows:
            z = np.load(camp.root / r["file"])
            out.setdefault(f"Cu{len(z['coord'])}", []).append((z["coord"], z["box"], float(z["energy"]), z["force"]))
        return out

    # the explored pool: every frame of every exploration, any class
    pool = st.q("SELECT frame_id, iteration, file, idx, class, filter, max_devi_f, structure, temperature FROM frames "
                "ORDER BY frame_id")
    initial = st.q("SELECT file FROM labels WHERE frame_id IS NULL ORDER BY label_id")
    n_init = len(initial)
    pool_labels: dict = {}   # pool index -> EMT label, labelled lazily
    pool_files: dict = {}

    def pool_frame(i):
        """(coord, box) of pool frame i."""
        f = pool[i]["file"]
        if f not in pool_files:
            pool_files[f] = dict(np.load(camp.root / f))
        return pool_files[f]["coord"][pool[i]["idx"]], pool_files[f]["box"][pool[i]["idx"]]

    def labelled(picks):
        """The initial labels and the pool frames `picks`, labelled with EMT here."""
        out = frames_of(initial)
        for i in picks:
            if i not in pool_labels:
                coord, box = pool_frame(i)
                v = label({"symbols": ["Cu"] * len(coord), "positions": coord.tolist(), "cell": box.tolist(),
                           "calculator": "emt", "kwargs": {}})
                pool_labels[i] = (coord, box, v["energy"], v["forces"])
            f = pool_labels[i]
            out.setdefault(f"Cu{len(f[0])}", []).append(f)
        return out

    def random_picks(n_explored, seed):
        """Random over all: n frames of the whole pool, any class, any iteration."""
        return np.random.default_rng([args.seed, seed]).permutation(len(pool))[:n_explored]

    # DP-GEN's rule: in each iteration, uniformly among that iteration's candidates (between the trust levels,
    # passing the filters), at most `cap` of them; the orders are drawn once per seed and iteration, so a
    # larger cap adds frames to a smaller one's
    its = [r[0] for r in st.q("SELECT iteration FROM iterations WHERE status='done' ORDER BY iteration")]
    cands = {}
    for i, r in enumerate(pool):
        if r["class"] == "candidate" and r["filter"] is None:
            cands.setdefault(r["iteration"], []).append(i)

    def dpgen_picks(cap, upto, seed):
        return [i for it, idx in sorted(cands.items()) if it <= upto
                for i in np.array(idx)[np.random.default_rng([args.seed, seed, it]).permutation(len(idx))][:cap]]

    def descriptors(model, frames):
        """selection.frame_descriptors of (coord, box) frames of any sizes, in their order."""
        out = [None] * len(frames)
        by_n: dict = {}
        for j, (coord, box) in enumerate(frames):
            by_n.setdefault(len(coord), []).append(j)
        for n, js in by_n.items():
            f = frame_descriptors(model, np.stack([frames[j][0] for j in js]), np.zeros(n, dtype=int),
                                  np.stack([frames[j][1] for j in js]))
            for j, row in zip(js, f):
                out[j] = row
        return np.stack(out)

    def rule_picks(method, upto):
        """A selection rule replayed on the campaign's explorations: at each iteration <= upto, the budget chosen
        among that iteration's candidates by their deviation (the campaign's ensemble) and descriptors (its first
        model), with the initial labels and the rule's own earlier picks as the labelled set."""
        from dpmd.model import load_model

        init = [(c, b) for fr in frames_of(initial).values() for c, b, _, _ in fr]
        picks = []
        for it in its:
            idx = cands.get(it, [])
            if it > upto or not idx:
                continue
            feats = lab = None
            if method in ("fps", "dfps"):
                model = load_model(camp.model_path(it, 0)).eval()
                feats = descriptors(model, [pool_frame(i) for i in idx])
                lab = descriptors(model, init + [pool_frame(i) for i in picks])
            chosen, _ = choose([{"max_devi_f": pool[i]["max_devi_f"]} for i in idx], args.budget, method, feats,
                               seed=it, labelled=lab, pool=args.adaptive_pool)
            picks += [idx[j] for j in chosen]
        return picks

    seeds = list(range(args.seeds))
    selecting = ["campaign"] + args.rules     # the arms whose labels are judged against the baselines
    arms = selecting + args.baselines
    curve = {k: {} for k in arms}       # labels -> [rmse per seed]
    groups = {k: {} for k in arms}      # labels -> [[rmse per test group] per seed]

    def evaluate(kind, n, sets, tag, s):
        model = train_one(cfg, write_labels(sets, work / f"eval/{tag}", cfg["type_map"]), args.train_steps,
                          work / f"eval/{tag}/train", seed=s)
        se = force_sq_errors(model, test)
        curve[kind].setdefault(n, []).append(float((se[:, 0].sum() / se[:, 1].sum()) ** 0.5))
        groups[kind].setdefault(n, []).append([float((se[a:b, 0].sum() / se[a:b, 1].sum()) ** 0.5)
                                               for _, a, b in test_groups])
        print(f"  {kind:>8} {n:>4} labels seed {s}: {curve[kind][n][-1]:.4f}", flush=True)

    t0 = time.perf_counter()
    counts = []
    for it in its:
        rows = st.q("SELECT file FROM labels WHERE iteration<=? ORDER BY label_id", it)
        counts.append(len(rows) - n_init)
        if args.curve or it == its[-1]:
            for s in seeds:
                evaluate("campaign", len(rows), frames_of(rows), f"campaign{it}_s{s}", s)
        for rule in args.rules:
            if args.curve or it == its[-1]:
                picks = rule_picks(rule, it)
                where = Counter(f"{pool[i]['structure']}/{pool[i]['temperature']:g}K" for i in picks)
                print(f"  {rule:>8} picks (structure/temperature): "
                      + ", ".join(f"{k}:{v}" for k, v in sorted(where.items())), flush=True)
                for s in seeds:
                    evaluate(rule, n_init + len(picks), labelled(picks), f"{rule}{it}_s{s}", s)
    final = counts[-1] if counts else 0
    multiples = sorted(set(args.random_multiples) - {1.0})
    if "random" in arms:
        extra = sorted({int(round(m * final)) for m in multiples} - set(counts))
        for n_explored in counts + extra:
            if n_explored > len(pool):
                break
            for s in seeds:
                evaluate("random", n_init + n_explored, labelled(random_picks(n_explored, s)),
                         f"random{n_explored}_s{s}", s)
    if "dpgen" in arms:
        # the campaign's budget at every iteration, then larger caps (the multiples) over all its iterations
        at = its if args.dpgen_iterations is None else [it for it in its if it in args.dpgen_iterations]
        points = [(args.budget, it) for it in at] + [(int(round(m * args.budget)), its[-1]) for m in multiples]
        for cap, upto in points:
            n = n_init + sum(min(cap, len(idx)) for it, idx in cands.items() if it <= upto)
            if n in curve["dpgen"]:
                continue   # too few candidates for the larger cap to add any
            for s in seeds:
                evaluate("dpgen", n, labelled(dpgen_picks(cap, upto, s)), f"dpgen{cap}_i{upto}_s{s}", s)
    times["evaluation training (from scratch)"] = time.perf_counter() - t0

    mean = {k: {n: float(np.mean(v)) for n, v in c.items()} for k, c in curve.items()}
    std = {k: {n: float(np.std(v)) for n, v in c.items()} for k, c in curve.items()}
    print(f"\nheld-out force RMSE (eV/Å) vs labels, mean ± std over {len(seeds)} seeds ({n_init} initial labels in "
          f"every arm; {len(pool)} explored frames, {sum(map(len, cands.values()))} of them candidates; "
          f"{args.train_steps} training steps per model)")
    about = {"random": "drawn from all explored frames",
             "dpgen": f"DP-GEN's rule, uniformly among each iteration's candidates, at most the budget "
                      f"({args.budget}) or a multiple of it"}
    print("".join(f"  {k}: {about[k]}\n" for k in args.baselines), end="")
    names = [g[0] for g in test_groups]
    print(f"{'labels':>7}  " + "  ".join(f"{k:>15}" for k in arms)
          + "   per test group, " + " | ".join(arms) + ": " + ", ".join(names))
    for n in sorted(set().union(*map(set, mean.values()))):
        cells = [f"{mean[k][n]:.4f} ± {std[k][n]:.4f}" if n in mean[k] else "-" for k in arms]
        per_group = [" ".join(f"{x:.3f}" for x in np.mean(groups[k][n], axis=0)) if n in mean[k] else "-"
                     for k in arms]
        print(f"{n:>7}  " + "  ".join(f"{x:>15}" for x in cells) + "   " + " | ".join(per_group))
    # the figure of merit: the labels a baseline needs for a selecting arm's RMSE, over the arm's labels
    ratios, ratio, per_seed = {}, {}, {}
    for arm in selecting:
        c = mean[arm]
        final = max(c)
        ratios[arm], ratio[arm], per_seed[arm] = {}, {}, {}
        for base in args.baselines:
            rn = sorted(mean[base])
            ratios[arm][base] = {}
            for n in sorted(c):
                need = labels_needed(rn, [mean[base][k] for k in rn], c[n])
                ratios[arm][base][n] = None if need is None else need / n
                print(f"{arm} at {n:>3} labels ({c[n]:.4f}): {base} needs "
                      + (f"~{need:.0f} labels, ratio {need / n:.2f}" if need is not None
                         else f"more than {rn[-1]} labels, ratio > {rn[-1] / n:.2f}"))
            ratio[arm][base] = ratios[arm][base][final]
            per_seed[arm][base] = []
            for i in seeds:
                need = labels_needed(rn, [curve[base][k][i] for k in rn], curve[arm][final][i])
                per_seed[arm][base].append(None if need is None else need / final)
            shown = [f"> {rn[-1] / final:.2f}" if x is None else f"{x:.2f}"
                     for x in [ratio[arm][base]] + per_seed[arm][base]]
            print(f"{base} / {arm} labels at {arm}'s final point ({final} labels): {shown[0]} (target >= 2); "
                  f"per seed: {', '.join(shown[1:])}")
    # a baseline whose curve falls by less than the spread of that fall over training seeds (paired: the same
    # seed at both points) cannot say how many labels it needs for an RMSE: the ratios against it are decided by
    # the seeds (300/900 K Cu: flat from its first selected label, benchmarks/README.md)
    flat = {}
    for base in args.baselines:
        rn = sorted(mean[base])
        fall = np.array([[curve[base][n][i] - curve[base][rn[0]][i] for i in seeds] for n in rn[1:]])
        if not len(fall):
            continue
        drop, spread = -float(fall.mean(axis=1).min()), float(fall.std(axis=1).mean())
        flat[base] = drop < spread
        print(f"{base}'s mean curve falls by {drop:.4f} eV/Å ({drop / mean[base][rn[0]]:.0%}) from {rn[0]} to "
              f"{rn[-1]} labels; the spread of that fall over training seeds: {spread:.4f}"
              + (": the ratios against it measure the seeds, not the selection (--saturation: where the learning "
                 "curve flattens)" if flat[base] else ""))
    times["total"] = time.perf_counter() - t_start
    print("\nwall time per stage (s):")
    for k, v in times.items():
        print(f"  {k:<36} {v:8.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"curve": curve, "groups": groups, "test_groups": names,
                                               "ratios": ratios, "ratio": ratio, "ratio_per_seed": per_seed,
                                               "flat": flat,
                                               "times": times, "args": vars(args)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
