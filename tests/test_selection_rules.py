"""The adaptive lower trust level (DPGEN2's rule): the budget drawn uniformly among the `pool` candidates with the
largest deviations, never below them; select.method adaptive in a campaign file."""

from __future__ import annotations

import numpy as np
import pytest

from dpmd.errors import ConfigError
from explore_label_train.config import load_campaign
from explore_label_train.selection import choose, choose_stratified
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
    # a pool no larger than the budget: highest deviation first (the set devi picks)
    assert sorted(choose(cands, 5, "adaptive", None, pool=5)[0]) == sorted(by_devi[:5])
    assert sorted(choose(cands, 5, "adaptive", None, pool=0)[0]) == sorted(by_devi[:5])
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
