"""Farthest-point sampling: the O(candidates x selected) version picks what the previous brute force picked;
deviation-weighted FPS (dfps) picks what its definition picks and keeps away from the labelled frames."""

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


def brute_force_dfps(features, devi, labelled, k):
    """dfps by its definition: each pick maximises max_devi_f x distance to the nearest labelled or chosen row
    (in units of the candidates' spread), every distance recomputed."""
    mean, scale = features.mean(axis=0), features.std(axis=0)
    x, ref = (features - mean) / scale, (labelled - mean) / scale
    chosen = []
    while len(chosen) < k:
        seen = np.concatenate([ref, x[chosen]])
        d = np.array([np.linalg.norm(seen - row, axis=1).min() for row in x])
        score = devi * d
        score[chosen] = -1.0
        chosen.append(int(np.argmax(score)))
    return chosen


@pytest.mark.parametrize("m, f, k, seed", [(60, 8, 10, 0), (200, 40, 30, 1)])
def test_dfps_picks_what_its_definition_picks(m, f, k, seed):
    rng = np.random.default_rng(seed)
    feats = rng.normal(size=(m, f)) * rng.uniform(0.1, 10, size=f) + rng.uniform(-5, 5, size=f)
    labelled = feats[rng.choice(m, 5, replace=False)] + 0.01 * rng.normal(size=(5, f))
    devi = rng.uniform(0.05, 0.3, size=m)
    chosen, reasons = choose([{"max_devi_f": float(d)} for d in devi], k, "dfps", feats, labelled=labelled)
    assert chosen == brute_force_dfps(feats, devi, labelled, k)
    assert reasons[chosen[0]].startswith("selected: dfps #1, max_devi_f ")


def test_dfps_takes_high_deviations_away_from_the_labelled_frames():
    # three groups of candidates: A near a labelled frame (1.5 away) with the largest deviations, B far from it
    # with a little less, C far with small deviations; within a group the frames are near duplicates
    rng = np.random.default_rng(7)
    centre = {"A": [0.0, 0.0], "B": [10.0, 0.0], "C": [0.0, 10.0]}
    dev = {"A": 0.24, "B": 0.2, "C": 0.06}
    groups = [g for g in "ABC" for _ in range(4)]
    feats = np.array([centre[g] for g in groups]) + 0.01 * rng.normal(size=(12, 2))
    cands = [{"max_devi_f": dev[g] + 0.001 * i} for i, g in enumerate(groups)]
    labelled = np.array([[1.5, 0.0]])
    by_devi, _ = choose(cands, 3, "devi", None)
    assert {groups[i] for i in by_devi} == {"A"}            # the largest deviations: all near the labelled frame
    picks, reasons = choose(cands, 3, "dfps", feats, labelled=labelled)
    assert [groups[i] for i in picks] == ["B", "C", "A"]    # one of each: far and uncertain first
    assert picks[0] == 7                                   # B's largest deviation
    assert all(not reasons[i].startswith("selected") for i in set(range(12)) - set(picks))
    # without the labelled frame, the largest deviation comes first
    assert groups[choose(cands, 1, "dfps", feats)[0][0]] == "A"


def test_fps_counts_distances_from_the_labelled_frames():
    feats = np.array([[0.0], [1.0], [2.0], [10.0]])
    cands = [{"max_devi_f": d} for d in (0.1, 0.1, 0.3, 0.1)]
    # starts from the largest deviation (2.0); then the farthest from it and from the labelled 9.0: 0.0
    assert choose(cands, 2, "fps", feats, labelled=np.array([[9.0]]))[0] == [2, 0]
    assert choose(cands, 2, "fps", feats)[0] == [2, 3]


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
    devi = [{"max_devi_f": d} for d in np.random.default_rng(6).uniform(0.05, 0.3, size=len(feats))]
    t0 = time.perf_counter()
    chosen, reasons = choose(devi, 100, "dfps", feats, labelled=feats[:1000] + 0.1)
    print(f"benchmark: dfps 10,000 candidates x 1,600 features, 1,000 labelled, budget 100: "
          f"{time.perf_counter() - t0:.2f} s")
    assert len(set(chosen)) == 100
