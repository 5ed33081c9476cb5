"""Farthest-point sampling: the O(candidates x selected) version picks what the previous brute force picked."""

from __future__ import annotations

import time

import numpy as np
import pytest

from explore_label_train.selection import choose, farthest_point_sampling


def brute_force_fps(features, k, start):
    """The previous implementation: features divided by their std (not centred), every distance recomputed from
    the differences; returns the picks, the distance at each pick and every row's distance to the chosen."""
    scale = features.std(axis=0)
    x = features / np.where(scale > 0, scale, 1.0)
    chosen = [start]
    while len(chosen) < min(k, len(x)):
        d = np.array([np.linalg.norm(x[chosen] - row, axis=1).min() for row in x])
        d[chosen] = -1.0
        chosen.append(int(np.argmax(d)))
    to_chosen = np.array([np.linalg.norm(x[chosen] - row, axis=1).min() for row in x])
    at_pick = [np.inf] + [np.linalg.norm(x[chosen[:r]] - x[i], axis=1).min() for r, i in enumerate(chosen) if r]
    return chosen, at_pick, to_chosen


@pytest.mark.parametrize("m, f, k, seed", [(50, 8, 10, 0), (200, 64, 40, 1), (300, 3, 300, 2), (120, 400, 25, 3)])
def test_fps_picks_what_the_brute_force_picked(m, f, k, seed):
    rng = np.random.default_rng(seed)
    # features on very different scales and offsets, as descriptor components are
    feats = rng.normal(size=(m, f)) * rng.uniform(0.01, 100, size=f) + rng.uniform(-50, 50, size=f)
    cands = [{"max_devi_f": float(d)} for d in rng.uniform(0.05, 0.3, size=m)]
    start = int(np.argmax([c["max_devi_f"] for c in cands]))
    ref, at_pick, to_chosen = brute_force_fps(feats, k, start)
    chosen, reasons = choose(cands, k, "fps", feats)
    assert chosen == ref
    for rank, i in enumerate(chosen[1:], start=1):
        assert f"descriptor distance {at_pick[rank]:.3g} to the chosen" in reasons[i]
    for i in set(range(m)) - set(chosen):
        assert reasons[i] == f"not selected: budget {k} reached (descriptor distance {to_chosen[i]:.3g} to the chosen)"


def test_fps_takes_duplicates_last_in_row_order():
    rng = np.random.default_rng(4)
    base = rng.normal(size=(4, 5))
    feats = np.concatenate([base, base[[2, 0, 3]], base[[1]]])   # rows 4..7 repeat rows 2, 0, 3, 1
    chosen, at_pick, to_chosen = farthest_point_sampling(feats, 8, start=0)
    assert sorted(chosen[:4]) == [0, 1, 2, 3] and chosen[4:] == [4, 5, 6, 7]
    assert at_pick[4:] == [0.0] * 4 and (to_chosen == 0).all()
    assert farthest_point_sampling(feats, 0)[:2] == ([], [])


def test_random_is_uniform_among_candidates_not_by_deviation():
    # DP-GEN's rule; the campaign computes no descriptors for it, which once made it fall back to deviation order
    cands = [{"max_devi_f": 0.1 + 0.01 * i} for i in range(50)]
    picks = [choose(cands, 5, "random", None, seed=s)[0] for s in range(20)]
    assert all(len(set(p)) == 5 for p in picks)
    assert len({i for p in picks for i in p}) > 25          # not always the largest deviations
    assert choose(cands, 5, "random", None, seed=3) == choose(cands, 5, "random", None, seed=3)   # seeded


@pytest.mark.slow
def test_fps_10000_candidates_1600_features():
    feats = np.random.default_rng(5).normal(size=(10_000, 1_600))
    cands = [{"max_devi_f": 0.1}] * len(feats)
    for budget in (10, 100):
        t0 = time.perf_counter()
        chosen, reasons = choose(cands, budget, "fps", feats)
        print(f"\nbenchmark: fps 10,000 candidates x 1,600 features, budget {budget}: "
              f"{time.perf_counter() - t0:.2f} s")
        assert len(set(chosen)) == budget and len(reasons) == len(feats)
