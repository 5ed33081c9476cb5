"""The campaign keys DP-GEN campaigns need (issue 22): structure groups, virial and per-structure trust levels,
skip_steps, per-structure budgets and min_labels, min_new_labels, init_models, no accuracy stop, max_failed_ratio."""

import ase.build
import ase.io
import numpy as np
import pytest

from explore_label_train.campaign import Campaign, CampaignError
from explore_label_train.config import load_campaign, trust_levels
from explore_label_train.selection import classify
from tests.test_elt import campaign_dict, helpers, write_campaign  # noqa: F401 - helpers: a fixture


def test_classify_with_virial():
    f = np.array([0.01, 0.1, 0.5, 0.01, 0.01, np.nan])
    v = np.array([0.0, 0.0, 0.0, 0.06, 0.5, 0.0])
    assert list(classify(f, 0.05, 0.3, v, 0.05, 0.2)) == ["accurate", "candidate", "failed", "candidate", "failed",
                                                         "failed"]
    assert list(classify(f, 0.05, 0.3)) == ["accurate", "candidate", "failed", "accurate", "accurate", "failed"]


def test_new_keys_end_to_end(tmp_path):
    for i, a in enumerate((3.55, 3.65)):
        ase.io.write(tmp_path / f"c{i}.vasp", ase.build.bulk("Cu", "fcc", a=a, cubic=True), format="vasp")
    cfg = campaign_dict(tmp_path,
        structures={"fcc": {"bulk": "Cu", "crystalstructure": "fcc", "a": 3.61, "cubic": True},
                    "grp": {"files": ["c*.vasp"], "format": "vasp"}},
        initial={"structures": ["fcc", "grp"], "perturb": 2},
        explore=[{"name": "a", "structures": ["fcc", "grp"], "ensemble": "nvt", "temperatures": [300],
                  "steps": 40, "traj_interval": 10, "timestep": 2.0, "skip_steps": 20, "iterations": [0],
                  "trust": {"structures": {"grp": {"hi": 40.0}}}},
                 {"name": "b", "structures": ["grp"], "ensemble": "nvt", "temperatures": [500],
                  "steps": 40, "traj_interval": 10, "timestep": 2.0, "iterations": [1]}],
        trust={"lo": 0.0, "hi": 50.0, "v_lo": 1e6, "structures": {"fcc": {"lo": 0.0}}},
        select={"budget": 2, "per_structure": True, "min_labels": 1},
        train={"min_new_labels": 100, "init_from_previous": 2},
        convergence={"accurate_ratio": None, "max_iterations": 5, "max_labels": 100, "max_failed_ratio": 0.5})
    cfg["train"]["ensemble_size"] = 2
    path = write_campaign(tmp_path, cfg)
    c = load_campaign(path)
    assert len(c["structures"]["grp"]["files"]) == 2
    assert trust_levels(c, c["explore"][0], "grp") == {"lo": 0.0, "hi": 40.0, "v_lo": 1e6, "v_hi": None}
    camp = Campaign(c)
    decision = camp.run()
    assert decision == "no exploration stage for the next iteration"
    st = camp.state
    assert st.one("SELECT MIN(step) FROM frames WHERE iteration=0") == 20           # skip_steps
    assert st.one("SELECT COUNT(DISTINCT structure) FROM frames WHERE iteration=0") == 2
    # per_structure: 2 per structure in iteration 0
    assert st.one("SELECT COUNT(*) FROM frames WHERE iteration=0 AND selected=1") == 4
    assert st.one("SELECT COUNT(*) FROM tasks WHERE task_id LIKE 'i000-init-grp.1-%'") == 2   # group's 2nd file
    # min_new_labels 100: iteration 1 reuses iteration 0's models
    r = camp.result("i001-train-m0")
    assert r["reused"] == "i000-train-m0" and r["steps"] == 0
    model = "train/m0/model.pth"
    assert (camp.root / "iter.001" / model).read_bytes() == (camp.root / "iter.000" / model).read_bytes()


def test_max_failed_ratio_stops(tmp_path, helpers):
    cfg = campaign_dict(tmp_path, labeller={"calculator": "elt_helpers:Die"},
                        convergence={"max_failed_ratio": 0.2})
    camp = Campaign(load_campaign(write_campaign(tmp_path, cfg)))
    with pytest.raises(CampaignError, match="label tasks failed, over convergence.max_failed_ratio 0.2"):
        camp.run()


@pytest.mark.parametrize("finetune", [False, True])
def test_init_models(tmp_path, finetune):
    first = Campaign(load_campaign(write_campaign(tmp_path, campaign_dict(tmp_path,
                                                                          convergence={"max_iterations": 1}))))
    first.run()
    models = [str(first.root / f"iter.000/train/m{k}/model.pth") for k in range(2)]
    cfg = campaign_dict(tmp_path, work_dir=str(tmp_path / "second"), convergence={"max_iterations": 1},
                        train={"init_models": models, "finetune": finetune})
    camp = Campaign(load_campaign(write_campaign(tmp_path, cfg, "second.yaml")))
    camp.run()
    assert camp.result("i000-train-m1")["init_model"] == models[1]
