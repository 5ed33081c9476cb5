"""Selection: DeePMD's trust-level classes, physical filters, and diverse candidates by farthest-point sampling.

    accurate    max_devi_f <  lo
    candidate   lo <= max_devi_f < hi
    failed      max_devi_f >= hi   (also non-finite deviations)

Candidates failing a filter (atoms closer than min_distance, a cell with too small an angle, too long
a side or a volume per atom outside a range, non-finite positions) are never labelled.  Among the
rest, up to `budget` frames are chosen by `method`; every frame gets a reason:

    devi     the largest max_devi_f first
    fps      farthest-point sampling on per-frame descriptors (the mean se_e2_a descriptor of each element,
             from the first ensemble model, each feature in units of its spread over the candidates),
             starting from the frame with the largest deviation
    dfps     deviation-weighted farthest-point sampling: each pick the largest max_devi_f x descriptor distance
             to the nearest frame already labelled (when the caller gives their descriptors) or chosen, so that
             uncertain frames come first but not two of one kind nor one like those already labelled
    random   uniformly (DP-GEN's rule)
    adaptive the default: the adaptive lower trust level (DP-GEN's model_devi_adapt_trust_lo, DPGEN2's adaptive
             selector).  The lower level rises each iteration until a pool of candidates is left, those with the
             largest deviations, and the budget is drawn uniformly among them (DP-GEN's rule above that level);
             a pool smaller than the budget is labelled whole.  The pool: 3 x the budget by max_devi_f, or as
             select's DP-GEN keys size it (adaptive_pools): max(numb_candi_f, perc_candi_f % of the frames below
             trust.hi) by max_devi_f, united with max(numb_candi_v, perc_candi_v %) by max_devi_v.  Unlike DP-GEN's,
             the level never falls below trust.lo (elt import-dpgen writes trust.lo 0, as DP-GEN ignores it)

benchmarks/al_efficiency.py compares them with DP-GEN's rule on the same explorations (benchmarks/README.md).
adaptive, the default, and devi need the fewest labels: at most 0.5x DP-GEN's on Cu + vacancy (for every
training seed with adaptive; devi once 1.1x) and on Cu at 300/900/1500 K, and adaptive ended below devi on all
6 vacancy runs; on Cu at 300/900 K DP-GEN's curve is flat and every rule ends within the seed spread.  dfps
needed more labels than DP-GEN's rule with the vacancy (it spent them on the small cells, far in descriptor
space but already accurate): it is not a select.method, only al_efficiency's --rules replays it.

With `stratify`, the budget is first shared among the exploration conditions (structure, temperature,
pressure): one label for each condition with candidates while the budget lasts, the rest in proportion
to their candidates; each share is then chosen within its condition.  The conditions with the largest
deviations can no longer take every label, so the labels keep covering everything the exploration visits.

Hold-out: a fraction of each labelling stage's new labels (`select.holdout`) is drawn at random, seeded,
and never enters the training data; these labels are the campaign's test set, on which the report judges
the final ensemble.  (DP-GEN has no such set: its only errors are on the training data.)
"""

from __future__ import annotations

from collections import Counter

import numpy as np


def classify(max_devi_f, lo, hi, max_devi_v=None, v_lo=np.inf, v_hi=np.inf) -> np.ndarray:
    """accurate / candidate / failed per frame; the levels are numbers or one per frame.  DP-GEN's rule: a
    candidate when lo <= f < hi or v_lo <= v < v_hi, else failed when f >= hi or v >= v_hi, else accurate when
    f < lo and v < v_lo; a non-finite deviation is failed."""
    f = np.asarray(max_devi_f, dtype=float)
    lo, hi, v_lo, v_hi = (np.broadcast_to(np.asarray(x, dtype=float), f.shape) for x in (lo, hi, v_lo, v_hi))
    accurate, candidate, failed = f < lo, (f >= lo) & (f < hi), f >= hi
    if max_devi_v is not None:
        v = np.asarray(max_devi_v, dtype=float)
        accurate &= v < v_lo
        candidate |= (v >= v_lo) & (v < v_hi)
        failed |= v >= v_hi
    out = np.full(f.shape, "failed", dtype=object)
    out[accurate] = "accurate"
    out[failed] = "failed"
    out[candidate] = "candidate"
    return out


def check_frame(symbols, positions, cell, filters: dict) -> str | None:
    """Why this frame is unphysical, or None."""
    pos = np.asarray(positions, dtype=float)
    if not np.isfinite(pos).all():
        return "non-finite positions"
    n = len(pos)
    if cell is not None:
        cell = np.asarray(cell, dtype=float)
        if not np.isfinite(cell).all():
            return "non-finite cell"
        vol = abs(float(np.linalg.det(cell)))
        if vol < 1e-6:
            return "degenerate cell (zero volume)"
        lengths = np.linalg.norm(cell, axis=1)
        if filters.get("max_cell_length") and lengths.max() > filters["max_cell_length"]:
            return f"cell length {lengths.max():.2f} Å > max_cell_length {filters['max_cell_length']:g}"
        if filters.get("min_cell_angle"):
            amin = filters["min_cell_angle"]
            for i, j in ((1, 2), (0, 2), (0, 1)):
                cos = float(cell[i] @ cell[j] / (lengths[i] * lengths[j]))
                ang = float(np.degrees(np.arccos(np.clip(cos, -1, 1))))
                if ang < amin or ang > 180 - amin:
                    return f"cell angle {ang:.1f}° outside [{amin:g}, {180 - amin:g}]"
        vpa = filters.get("volume_per_atom")
        if vpa and not vpa[0] <= vol / n <= vpa[1]:
            return f"volume per atom {vol / n:.2f} Å^3 outside [{vpa[0]:g}, {vpa[1]:g}]"
    dmin_allowed = filters.get("min_distance")
    if dmin_allowed:
        from dpmd.geometry.neighbor import min_pair_distance   # (torch: imported when the filter is used)

        d = min_pair_distance(pos, cell, dmin_allowed)
        if d is not None and d < dmin_allowed:
            return f"atoms {d:.3f} Å apart < min_distance {dmin_allowed:g}"
    return None


def frame_descriptors(model, coords, types, boxes, chunk: int = 64) -> np.ndarray:
    """(M, ntypes * D): the mean se_e2_a descriptor over the atoms of each element (zeros where absent)."""
    import torch

    from dpmd.geometry.graph import build_graph, edge_vectors

    coords = np.asarray(coords, dtype=float)
    m, n = coords.shape[:2]
    types = np.asarray(types)
    out = []
    with torch.no_grad():
        for a in range(0, m, chunk):
            b = min(a + chunk, m)
            box = None if boxes is None else np.asarray(boxes[a:b])
            g = build_graph(coords[a:b], torch.as_tensor(types), box, rcut=model.rcut)
            vec = edge_vectors(g)
            d = model.descriptor(vec, g["center"], g["atype"], g["atype"][g["neighbor"]])
            d = d.reshape(b - a, n, -1).numpy()
            parts = []
            for t in range(model.ntypes):
                mask = types == t
                parts.append(d[:, mask].mean(axis=1) if mask.any() else np.zeros((b - a, d.shape[-1])))
            out.append(np.concatenate(parts, axis=1))
    return np.concatenate(out) if out else np.zeros((0, 0))


def farthest_point_sampling(features: np.ndarray, k: int, start: int | None = 0, weights=None, reference=None):
    """Indices of k rows chosen greedily to be far from those already chosen, the distance of each at its choice,
    and every row's distance to the nearest chosen row.  O(rows x (k + reference rows)): one matrix-vector product
    per choice (blocked matrix products for the reference rows), with squared distances from the norms,
    |a - b|^2 = |a|^2 + |b|^2 - 2 a.b (centre the rows first for accuracy).

    reference: rows chosen before (e.g. the labelled frames, in the same feature space): distances count from them
    too.  weights (positive, one per row): each choice maximises weight x distance instead of the distance.
    start: the first choice, or None for the same rule (the largest weight when nothing is chosen yet)."""
    x = np.asarray(features, dtype=float)
    m = len(x)
    sq = np.einsum("ij,ij->i", x, x)

    def dist2(y):   # (rows, len(y)): squared distances from every row to the rows of y
        sy = np.einsum("ij,ij->i", y, y)
        d2 = sq[:, None] + sy - 2.0 * (x @ y.T)
        # rounding leaves duplicates a few ulps from zero: make them exactly zero, so they are taken in row order
        d2[d2 <= 1e-12 * (sq[:, None] + sy)] = 0.0
        return d2

    dmin = np.full(m, np.inf)
    if reference is not None:
        ref = np.asarray(reference, dtype=float)
        for a in range(0, len(ref), 256):   # blocks of reference rows: matrix products, not one per row
            np.minimum(dmin, dist2(ref[a:a + 256]).min(axis=1, initial=np.inf), out=dmin)
    if m == 0 or k <= 0:
        return [], [], np.sqrt(dmin)
    w2 = np.ones(m) if weights is None else np.asarray(weights, dtype=float) ** 2
    taken = np.zeros(m, dtype=bool)
    chosen, dist_at = [], []
    while len(chosen) < min(k, m):
        if chosen or start is None:
            # the first of equals: once only duplicates are left, in row order; nothing chosen or referenced
            # yet (every distance infinite): the largest weight
            score = w2 * dmin if np.isfinite(dmin).any() else w2.copy()
            score[taken] = -np.inf
            i = int(np.argmax(score))
        else:
            i = int(start)
        chosen.append(i)
        dist_at.append(float(np.sqrt(dmin[i])))
        np.minimum(dmin, dist2(x[i:i + 1])[:, 0], out=dmin)
        taken[i] = True
    dmin[taken] = 0.0
    return chosen, dist_at, np.sqrt(dmin)


def stratum_shares(strata: list, budget: int) -> dict:
    """{stratum: labels} summing to min(budget, len(strata)): one for every stratum while the budget lasts
    (the largest strata first), the rest in proportion to the strata's remaining candidates (largest
    remainders).  Ties go to the stratum seen first: deterministic."""
    counts = Counter(strata)  # (in order of first appearance)
    budget = min(budget, len(strata))
    by_size = sorted(counts, key=lambda k: -counts[k])  # stable
    shares = {k: 0 for k in counts}
    for k in by_size[:budget]:
        shares[k] = 1
    rest = budget - sum(shares.values())
    left = {k: counts[k] - shares[k] for k in counts}
    total = sum(left.values())
    if rest > 0 and total > 0:
        exact = {k: rest * n / total for k, n in left.items()}
        extra = {k: int(np.floor(v)) for k, v in exact.items()}
        for k in sorted(counts, key=lambda k: -(exact[k] - extra[k]))[:rest - sum(extra.values())]:
            extra[k] += 1
        for k in counts:
            shares[k] += extra[k]
    return shares


def adaptive_pools(select: dict, frames: int) -> tuple[int | None, int]:
    """choose()'s adaptive pools (pool, pool_v) from select's DP-GEN keys, as DP-GEN's
    _select_by_model_devi_adaptive_trust_low counts them: max(numb_candi_x, int(perc_candi_x x 0.01 x frames)),
    frames: the explored frames below trust.hi where the budget applies (DP-GEN: a system's); a key left out
    counts 0.  None of the four given: (None, 0), elt's own pool (3 x the budget by max_devi_f)."""
    if all(select.get(f"{k}_candi_{x}") is None for k in ("numb", "perc") for x in "fv"):
        return None, 0
    return tuple(max(select.get(f"numb_candi_{x}") or 0, int((select.get(f"perc_candi_{x}") or 0) * 0.01 * frames))
                 for x in "fv")


def adaptive_pool(candidates: list[dict], budget: int, pool: int | None = None, pool_v: int = 0):
    """adaptive's pool: the union (force's first) of the `pool` candidates with the largest max_devi_f (None:
    3 x budget) and the `pool_v` with the largest max_devi_v; and its levels (name, each candidate's deviation,
    the pool's indices by it)."""
    levels = []
    for name, size in (("max_devi_f", 3 * budget if pool is None else pool), ("max_devi_v", pool_v)):
        if size:
            d = np.array([c[name] for c in candidates], dtype=float)
            d = np.where(np.isnan(d), -np.inf, d)   # (no virial deviation: never in the virial pool)
            levels.append((name, d, np.argsort(-d, kind="stable")[:size]))
    return list(dict.fromkeys(int(i) for _, _, idx in levels for i in idx)), levels


def labelled_count(candidates: list[dict], budget: int, method: str, pool: int | None = None,
                   pool_v: int = 0) -> int:
    """How many of the candidates choose() labels: the budget, or fewer candidates (adaptive: its pool's);
    DP-GEN compares this (min(fp_task_max, its candidates)) with fp_task_min."""
    size = len(adaptive_pool(candidates, budget, pool, pool_v)[0]) if method == "adaptive" else len(candidates)
    return min(budget, size)


def choose_stratified(candidates: list[dict], strata: list, budget: int, method: str,
                      features: np.ndarray | None, seed: int = 0, labelled: np.ndarray | None = None,
                      pool: int | None = None, pool_v: int = 0):
    """choose() within each stratum (e.g. an exploration condition) on its share of the budget (and adaptive's
    pools in proportion)."""
    chosen: list[int] = []
    reasons: dict[int, str] = {}
    for key, share in stratum_shares(strata, budget).items():
        idx = [i for i, k in enumerate(strata) if k == key]
        sub, sub_reasons = choose([candidates[i] for i in idx], share, method,
                                  None if features is None else features[idx], seed, labelled,
                                  None if pool is None or not budget else -(-pool * share // budget),
                                  -(-pool_v * share // budget) if budget else 0)
        chosen += [idx[j] for j in sub]
        label = "/".join(str(x) for x in key) if isinstance(key, tuple) else str(key)
        for j, why in sub_reasons.items():
            reasons[idx[j]] = f"{why} [{label}: share {share} of {len(idx)}]"
    return chosen, reasons


def choose(candidates: list[dict], budget: int, method: str, features: np.ndarray | None, seed: int = 0,
           labelled: np.ndarray | None = None, pool: int | None = None, pool_v: int = 0):
    """candidates: dicts with 'max_devi_f' (and 'max_devi_v' for pool_v); returns the chosen indices and every
    candidate's reason.  features: one row per candidate (fps, dfps); labelled: the same features of the frames
    labelled so far, which fps and dfps keep away from; pool, pool_v: adaptive's candidates with the largest
    max_devi_f (None: 3 x budget) and, joining them, with the largest max_devi_v."""
    reasons: dict[int, str] = {}
    chosen: list[int] = []
    m = len(candidates)
    if m == 0:
        return chosen, reasons
    devi = np.array([c["max_devi_f"] for c in candidates])
    to_chosen = None   # fps, dfps: each candidate's descriptor distance to the nearest chosen (or labelled) one
    if method == "random":   # DP-GEN's rule: uniformly among the candidates
        rng = np.random.default_rng(seed)
        chosen = list(rng.permutation(m)[:budget])
        for rank, i in enumerate(chosen):
            reasons[int(i)] = f"selected: random draw {rank + 1}"
    elif method == "adaptive":   # lo raised to the pool's smallest deviation, then uniformly in [lo, hi)
        top, levels = adaptive_pool(candidates, budget, pool, pool_v)
        chosen = [top[k] for k in np.random.default_rng(seed).permutation(len(top))[:budget]]
        above = " or ".join(f"{name} >= {d[idx[-1]]:.3g}" for name, d, idx in levels)
        for rank, i in enumerate(chosen):
            reasons[i] = f"selected: random draw {rank + 1} of {len(top)} with {above}"
        for i in sorted(set(range(m)) - set(top)) if budget else []:
            reasons[i] = "not selected: " + (", ".join(
                f"{name} {d[i]:.3g} below the adaptive lower level {d[idx[-1]]:.3g}" for name, d, idx in levels)
                or "the adaptive pool is empty")
    elif method == "devi" or features is None:
        chosen = list(np.argsort(-devi, kind="stable")[:budget])
        for rank, i in enumerate(chosen):
            reasons[int(i)] = f"selected: rank {rank + 1} by max_devi_f"
    else:
        # distances in units of each feature's spread over these candidates
        mean, scale = features.mean(axis=0), features.std(axis=0)
        scale = np.where(scale > 0, scale, 1.0)
        feats = (features - mean) / scale
        ref = None if labelled is None or not len(labelled) else (np.asarray(labelled) - mean) / scale
        if method == "dfps":   # the largest deviation x distance to the labelled and the chosen, each in turn
            chosen, dist, to_chosen = farthest_point_sampling(feats, budget, start=None, weights=devi, reference=ref)
            for rank, (i, d) in enumerate(zip(chosen, dist)):
                reasons[i] = f"selected: dfps #{rank + 1}, max_devi_f {devi[i]:.3g} x descriptor distance {d:.3g}"
        else:
            chosen, dist, to_chosen = farthest_point_sampling(feats, budget, start=int(np.argmax(devi)), reference=ref)
            for rank, (i, d) in enumerate(zip(chosen, dist)):
                reasons[i] = ("selected: fps start (largest max_devi_f)" if rank == 0
                              else f"selected: fps #{rank + 1}, descriptor distance {d:.3g} to the chosen")
    chosen = [int(i) for i in chosen]
    taken = set(chosen)
    for i in range(m):
        if i not in taken and i not in reasons:
            reasons[i] = f"not selected: budget {budget} reached" + (
                f" (descriptor distance {to_chosen[i]:.3g} to the chosen)" if to_chosen is not None and chosen else "")
    return chosen, reasons


HOLDOUT_MIN_LABELS = 5   # below this a stage's labels all train: one test label would cost too large a share


def holdout_count(n: int, fraction: float) -> int:
    """How many of a stage's n new labels are held out: round(fraction * n), at least one once n reaches
    HOLDOUT_MIN_LABELS, and never all of them."""
    if fraction <= 0 or n < HOLDOUT_MIN_LABELS:
        return 0
    return min(max(1, int(np.floor(fraction * n + 0.5))), n - 1)


def choose_holdout(task_ids: list[str], fraction: float, seed) -> list[str]:
    """The held-out label task ids: a seeded draw over the ids in sorted order, so the choice does not depend
    on the order in which labels finished."""
    ids = sorted(task_ids)
    k = holdout_count(len(ids), fraction)
    picks = np.random.default_rng(seed).choice(len(ids), size=k, replace=False) if k else []
    return sorted(ids[i] for i in picks)
