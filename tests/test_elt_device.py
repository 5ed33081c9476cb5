"""Where a campaign's ensemble trains (train.device, issue 21) and a hybrid template's seeds per member."""

import pytest

from dpmd.errors import ConfigError
from explore_label_train.config import load_campaign, training_input
from tests.test_elt import campaign_dict, write_campaign


def test_train_device_reaches_every_members_training_input(tmp_path):
    cfg = campaign_dict(tmp_path)
    cfg["train"]["device"] = "cuda:1"
    c = load_campaign(write_campaign(tmp_path, cfg))
    for member in range(c["train"]["ensemble_size"]):
        assert training_input(c, [str(tmp_path)], 10, member, 0)["training"]["device"] == "cuda:1"
    del cfg["train"]["device"]   # left out: the template's own (auto)
    c = load_campaign(write_campaign(tmp_path, cfg, "second.yaml"))
    assert training_input(c, [str(tmp_path)], 10, 0, 0)["training"]["device"] == "auto"


def test_a_bad_train_device_is_one_line(tmp_path):
    cfg = campaign_dict(tmp_path)
    cfg["train"]["device"] = "gpu0"
    with pytest.raises(ConfigError, match=r"'train.device' must be auto, cpu, cuda or cuda:N, got 'gpu0'"):
        load_campaign(write_campaign(tmp_path, cfg))


def test_members_of_a_hybrid_template_differ_in_every_descriptor_seed(tmp_path):
    cfg = campaign_dict(tmp_path)
    d = cfg["train"]["template"]["model"]["descriptor"]
    cfg["train"]["template"]["model"]["descriptor"] = {"type": "hybrid", "list": [dict(d), dict(d, rcut_smth=0.4)]}
    c = load_campaign(write_campaign(tmp_path, cfg))
    seeds = [[part["seed"] for part in training_input(c, [str(tmp_path)], 10, m, 0)["model"]["descriptor"]["list"]]
             for m in range(2)]
    assert len({s for pair in seeds for s in pair}) == 4


def test_explore_device_is_checked_and_reaches_the_models(tmp_path, monkeypatch):
    cfg = campaign_dict(tmp_path)
    cfg["explore"][0]["device"] = "gpu"
    with pytest.raises(ConfigError, match=r"'explore\[0\].device' must be cpu, cuda or cuda:N, got 'gpu'"):
        load_campaign(write_campaign(tmp_path, cfg))
    from explore_label_train import campaign

    cfg["explore"][0]["device"] = "cuda:1"
    stage = load_campaign(write_campaign(tmp_path, cfg, "second.yaml"))["explore"][0]
    seen = []
    monkeypatch.setattr("dpmd.model.load_model", lambda path, device="cpu": seen.append(device) or 1 / 0)
    with pytest.raises(ZeroDivisionError):   # (stopped right after the models' device is chosen)
        campaign._explore_dpmd({"models": ["m0.pth"], "stage": stage}, None, None)
    assert seen == ["cuda:1"]
