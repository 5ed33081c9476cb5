"""A train.template's relative training.stat_file is the campaign folder's, whatever folder `elt run` starts in."""

from __future__ import annotations

from explore_label_train.cli import main as elt_main
from explore_label_train.config import load_campaign, training_input
from tests.test_elt import campaign_dict, write_campaign


def test_relative_stat_file_resolves_against_the_campaign_folder(tmp_path, monkeypatch):
    folder, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    folder.mkdir()
    elsewhere.mkdir()
    cfg = campaign_dict(folder, convergence={"max_iterations": 1})
    cfg["work_dir"] = "camp"
    cfg["train"]["template"]["training"]["stat_file"] = "stats/cu"   # a directory: no h5py needed
    cfg["explore"][0].update(temperatures=[300], steps=20)
    path = write_campaign(folder, cfg)
    monkeypatch.chdir(elsewhere)
    loaded = load_campaign(path)
    assert training_input(loaded, [str(folder)], 10, 0, 0)["training"]["stat_file"] == str(folder / "stats" / "cu")
    assert elt_main(["run", str(path)]) == 0
    # the members wrote the statistics in the campaign's folder (stat_file_mode update), nothing where elt started
    assert any((folder / "stats" / "cu").rglob("bias_atom_energy"))
    assert not any(elsewhere.iterdir())
