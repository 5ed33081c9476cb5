"""The adaptive lower trust level (DP-GEN's model_devi_adapt_trust_lo, DPGEN2's adaptive selector): the budget
drawn uniformly among the `pool` candidates with the largest force deviations (and the `pool_v` with the largest
virial deviations), never below them; select.method adaptive and its DP-GEN pool keys in a campaign file."""

from __future__ import annotations

import re

import numpy as np
import pytest

from dpmd.errors import ConfigError
from explore_label_train.config import load_campaign
from explore_label_train.selection import adaptive_pools, choose, choose_stratified
from tests.test_elt import campaign_dict, write_campaign


def shuffled_candidates(m, seed=0):
    """m candidates with deviations 0.10, 0.11, ... in a shuffled order; returns them and the order by deviation."""
    devi = 0.1 + 0.01 * np.random.default_rng(seed).permutation(m)
    return [{"max_devi_f": float(d)} for d in devi], list(np.argsort(-devi))


def test_adaptive_draws_uniformly_among_the_largest_deviations_only():
    cands, by_devi = shuffled_candidates(40)
    top, rest = set(by_devi[:8]), by_devi[8:]
    picks = [choose(cands, 3, "adaptive", None, seed=s, pool=8) for s in range(40)]
    for chosen, reasons in picks:
        assert len(set(chosen)) == 3 and set(chosen) <= top
        assert all(f"of 8 with max_devi_f >= {cands[by_devi[7]]['max_devi_f']:.3g}" in reasons[i] for i in chosen)
        assert all(reasons[i] == f"not selected: max_devi_f {cands[i]['max_devi_f']:.3g} below the adaptive lower "
                                  f"level {cands[by_devi[7]]['max_devi_f']:.3g}" for i in rest)
        assert all(reasons[i] == "not selected: budget 3 reached" for i in top - set(chosen))
    counts = np.bincount([i for chosen, _ in picks for i in chosen], minlength=40)[sorted(top)]
    assert counts.min() >= 6     # each of the 8 drawn about 40 x 3 / 8 = 15 times: not highest-first


def test_adaptive_at_its_limits_is_devi_and_dpgen():
    cands, by_devi = shuffled_candidates(30, seed=1)
    # a pool as large as the budget: highest deviation first (the set devi picks)
    assert sorted(choose(cands, 5, "adaptive", None, pool=5)[0]) == sorted(by_devi[:5])
    # a smaller pool is labelled whole, nothing below it (DP-GEN: min(fp_task_max, candidates))
    chosen, reasons = choose(cands, 5, "adaptive", None, pool=3)
    assert sorted(chosen) == sorted(by_devi[:3])
    assert all(reasons[i].startswith("not selected: max_devi_f") for i in by_devi[3:])
    chosen, reasons = choose(cands, 5, "adaptive", None, pool=0)
    assert chosen == [] and set(reasons.values()) == {"not selected: the adaptive pool is empty"}
    # a pool of every candidate: uniformly among all of them, DP-GEN's rule
    seen = {i for s in range(30) for i in choose(cands, 5, "adaptive", None, seed=s, pool=100)[0]}
    assert len(seen) > 25
    assert choose(cands, 0, "adaptive", None) == ([], {i: "not selected: budget 0 reached" for i in range(30)})


def test_stratified_adaptive_shares_the_pool_with_the_budget():
    strata = [("fcc", 900.0)] * 20 + [("fcc", 300.0)] * 20
    cands = [{"max_devi_f": 0.2 + 0.001 * i} for i in range(20)] + [{"max_devi_f": 0.06 + 0.001 * i}
                                                                     for i in range(20)]
    for s in range(10):
        chosen, reasons = choose_stratified(cands, strata, 4, "adaptive", None, seed=s, pool=12)
        # 2 labels each, from the 6 largest deviations of each condition
        assert sorted(i // 20 for i in chosen) == [0, 0, 1, 1] and all(i % 20 >= 14 for i in chosen)
        assert all("of 6 with" in reasons[i] for i in chosen)


def test_campaign_takes_select_method_adaptive(tmp_path):
    cfg = campaign_dict(tmp_path, select={"budget": 3, "method": "adaptive"})
    assert load_campaign(write_campaign(tmp_path, cfg))["select"]["method"] == "adaptive"
    cfg = campaign_dict(tmp_path, select={"budget": 3, "method": "best"})
    with pytest.raises(ConfigError) as err:
        load_campaign(write_campaign(tmp_path, cfg))
    assert "'select.method' must be devi, fps, random or adaptive, got 'best'" in str(err.value)
    assert "\n" not in str(err.value)


def test_adaptive_pools_count_as_dpgen():
    """DP-GEN's max(numb_candi, int(perc_candi x 0.01 x frames)) per deviation; without the keys, elt's 3 x budget."""
    sel = {"numb_candi_f": None, "perc_candi_f": None, "numb_candi_v": None, "perc_candi_v": None}
    assert adaptive_pools(sel, 1000) == (None, 0)
    assert adaptive_pools({**sel, "numb_candi_f": 10}, 1000) == (10, 0)
    assert adaptive_pools({**sel, "numb_candi_f": 10, "perc_candi_f": 5.0}, 1000) == (50, 0)   # 5 % of 1000
    assert adaptive_pools({**sel, "numb_candi_f": 10, "perc_candi_f": 5.0}, 100) == (10, 0)    # 5 < 10
    assert adaptive_pools({**sel, "perc_candi_f": 2.5}, 99) == (2, 0)        # 2.475 frames: rounded down
    assert adaptive_pools({**sel, "numb_candi_v": 4, "perc_candi_v": 1.0}, 1000) == (0, 10)


def test_adaptive_virial_pool_joins_the_force_pool():
    """DP-GEN's candidate set: the pool_f largest max_devi_f united with the pool_v largest max_devi_v."""
    f = [0.30, 0.29, 0.28, 0.27, 0.26, 0.10, 0.11, 0.12, 0.13, 0.14]
    v = [0.01, 0.01, 0.20, 0.01, 0.01, 0.50, 0.40, 0.01, np.nan, 0.01]
    cands = [{"max_devi_f": a, "max_devi_v": b} for a, b in zip(f, v)]
    pool = {0, 1, 2} | {5, 6}      # the 3 largest max_devi_f, the 2 largest max_devi_v
    chosen, reasons = choose(cands, 10, "adaptive", None, pool=3, pool_v=2)
    assert sorted(chosen) == sorted(pool)     # a pool within the budget: every one of it
    assert all(reasons[i].endswith("of 5 with max_devi_f >= 0.28 or max_devi_v >= 0.4") for i in chosen)
    assert reasons[3] == ("not selected: max_devi_f 0.27 below the adaptive lower level 0.28, max_devi_v 0.01 "
                          "below the adaptive lower level 0.4")
    picks = [choose(cands, 2, "adaptive", None, seed=s, pool=3, pool_v=2)[0] for s in range(30)]
    assert all(len(p) == 2 and set(p) <= pool for p in picks)
    assert set().union(*picks) == pool        # drawn among the whole union, virial-only frames included
    # a virial pool alone; a frame without a virial deviation (NaN) ranks last
    assert sorted(choose(cands, 10, "adaptive", None, pool=0, pool_v=9)[0]) == [0, 1, 2, 3, 4, 5, 6, 7, 9]
    # stratified: each stratum's pools in proportion to its share of the budget (2 of 4: pools 2 and 1)
    for s in range(10):
        chosen, _ = choose_stratified(cands, ["a"] * 5 + ["b"] * 5, 4, "adaptive", None, seed=s, pool=4, pool_v=2)
        a, b = {i for i in chosen if i < 5}, {i for i in chosen if i >= 5}
        assert len(a) == len(b) == 2 and a <= {0, 1, 2} and b <= {9, 8, 5}


@pytest.mark.parametrize("select, message", [
    ({"perc_candi_f": 150}, "'select.perc_candi_f' is a percentage of the frames below trust.hi, 0 to 100, got 150"),
    ({"numb_candi_f": 2.5}, "'select.numb_candi_f'"),
    ({"numb_candi_f": -1}, "'select.numb_candi_f' must be >= 0"),
    ({"method": "devi", "numb_candi_f": 20}, "'select.numb_candi_f' sizes the pool of select.method adaptive; "
                                             "method is devi"),
    ({"numb_candi_f": 0, "perc_candi_v": 0}, "'select.numb_candi_f': every adaptive pool size is 0"),
    ({"rate_candi_f": 0.01}, "'select.rate_candi_f': elt takes DP-GEN's percentage, select.perc_candi_f"),
])
def test_campaign_pool_keys_are_checked(tmp_path, select, message):
    with pytest.raises(ConfigError, match=re.escape(message)) as err:
        load_campaign(write_campaign(tmp_path, campaign_dict(tmp_path, select={"budget": 3, **select})))
    assert "\n" not in str(err.value)


def test_campaign_takes_dpgen_pool_keys(tmp_path):
    cfg = campaign_dict(tmp_path, select={"budget": 3, "numb_candi_f": 20, "perc_candi_f": 2, "perc_candi_v": 0.5})
    sel = load_campaign(write_campaign(tmp_path, cfg))["select"]
    assert (sel["numb_candi_f"], sel["perc_candi_f"], sel["numb_candi_v"], sel["perc_candi_v"]) == (20, 2.0, None, 0.5)
    assert adaptive_pools(sel, 2000) == (40, 10)
    sel = load_campaign(write_campaign(tmp_path, campaign_dict(tmp_path, select={"budget": 3})))["select"]
    assert adaptive_pools(sel, 2000) == (None, 0)     # the keys absent: 3 x budget


def test_campaign_selects_within_the_dpgen_pool(tmp_path):
    """A campaign's adaptive pool counts the iteration's frames below trust.hi: 25 % of 8 frames, 2 > numb_candi_f
    1, so 2 of the budget of 5 are labelled, the 2 largest max_devi_f."""
    from explore_label_train.campaign import Campaign

    cfg = campaign_dict(tmp_path, select={"budget": 5, "numb_candi_f": 1, "perc_candi_f": 25, "holdout": 0},
                        convergence={"max_iterations": 1})
    camp = Campaign(load_campaign(write_campaign(tmp_path, cfg)), log=None)
    camp.run()
    rows = camp.state.q("SELECT max_devi_f, class, filter, selected, reason FROM frames WHERE iteration=0 "
                        "ORDER BY max_devi_f DESC")
    assert len(rows) == 8 and all(r["class"] == "candidate" and r["filter"] is None for r in rows)
    level = f"{rows[1]['max_devi_f']:.3g}"
    assert [r["selected"] for r in rows] == [1, 1, 0, 0, 0, 0, 0, 0]
    assert all(r["reason"].endswith(f"of 2 with max_devi_f >= {level}") for r in rows[:2])
    assert all(r["reason"].endswith(f"below the adaptive lower level {level}") for r in rows[2:])


def test_min_labels_counts_what_would_be_labelled_as_dpgen_fp_task_min():
    """DP-GEN labels nothing where min(fp_task_max, its candidates) < fp_task_min, its candidates being the
    adaptive pool: 40 candidates, a pool of 2, a budget of 5 label 2."""
    from explore_label_train.selection import labelled_count

    cands, _ = shuffled_candidates(40)
    assert labelled_count(cands, 5, "adaptive", pool=2) == 2
    assert labelled_count(cands, 5, "adaptive", pool=2, pool_v=0) == len(choose(cands, 5, "adaptive", None, pool=2)[0])
    assert labelled_count(cands, 5, "adaptive") == 5       # elt's own pool, 3 x budget
    assert labelled_count(cands, 5, "devi") == 5 and labelled_count(cands[:3], 5, "random") == 3


def test_campaign_min_labels_against_the_dpgen_pool(tmp_path):
    """The campaign above with select.min_labels 3: its pool of 2 is fewer, so nothing is labelled."""
    from explore_label_train.campaign import Campaign

    cfg = campaign_dict(tmp_path, select={"budget": 5, "numb_candi_f": 1, "perc_candi_f": 25, "holdout": 0,
                                          "min_labels": 3},
                        convergence={"max_iterations": 1})
    camp = Campaign(load_campaign(write_campaign(tmp_path, cfg)), log=None)
    camp.run()
    rows = camp.state.q("SELECT selected, reason FROM frames WHERE iteration=0")
    assert len(rows) == 8 and not any(r["selected"] for r in rows)
    assert all(r["reason"] == "not selected: 2 to label, fewer than select.min_labels 3" for r in rows)
