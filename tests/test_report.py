"""`elt report` (issue 18): held-out labels, the final ensemble's errors on them, incidents, links, and the
page as a browser renders it."""

from __future__ import annotations

import html
import importlib.metadata
import re
import shutil
import subprocess

import numpy as np
import pytest

from dpmd.errors import ConfigError
from explore_label_train.campaign import Campaign
from explore_label_train.cli import main as elt_main
from explore_label_train.config import load_campaign
from explore_label_train.selection import choose_holdout, holdout_count
from tests.test_elt import campaign_dict, write_campaign


def tiny(tmp_path, **over):
    """Two iterations of EMT copper: 5 initial labels and 5 per iteration, one of each five held out; a hot
    stage whose atoms come closer than its min_distance (2.4 Å, the nearest neighbours are 2.55 Å apart), so
    its MD run stops early."""
    cfg = campaign_dict(tmp_path, select={"budget": 5, "holdout": 0.2}, initial={"perturb": 5})
    for key, value in over.items():
        cfg[key].update(value)
    cfg["explore"].append(dict(cfg["explore"][0], name="hot", temperatures=[1500], min_distance=2.4))
    return cfg


@pytest.fixture(scope="module")
def campaign(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    path = write_campaign(tmp, tiny(tmp))
    camp = Campaign(load_campaign(path), log=None)
    assert camp.run() == "max_iterations"
    assert elt_main(["report", str(path)]) == 0
    return camp


def cell(page: str, ident: str) -> float:
    return float(re.search(rf"id='{ident}'>([^<]+)<", page).group(1))


def ensemble_errors(models, frames):
    """Energy (meV/atom) and force (eV/Å) RMSE of the mean of the models, through dpmd's ASE calculator."""
    from ase import Atoms

    from dpmd.calculator import DP

    de, df = [], []
    for f in frames:
        atoms = Atoms(f["symbols"], positions=f["coord"], cell=f.get("box"), pbc=f.get("box") is not None)
        e, force = [], []
        for model in models:
            atoms.calc = DP(model)
            e.append(atoms.get_potential_energy())
            force.append(atoms.get_forces())
        de.append((np.mean(e) - f["energy"]) / len(atoms))
        df.append(np.mean(force, axis=0) - f["force"])
    return 1000 * np.sqrt(np.mean(np.square(de))), np.sqrt(np.mean(np.square(df)))


def test_holdout_is_a_seeded_share_of_each_stage(tmp_path):
    assert [holdout_count(n, 0.1) for n in (0, 4, 5, 14, 15, 30)] == [0, 0, 1, 1, 2, 3]
    assert holdout_count(5, 0.5) == 3 and holdout_count(40, 0.0) == 0
    ids = [f"i001-label-f{i}" for i in range(20)]
    held = choose_holdout(ids, 0.1, [1, 4])
    assert len(held) == 2 and set(held) <= set(ids)
    assert choose_holdout(ids[::-1], 0.1, [1, 4]) == held          # not the order the labels finished in
    with pytest.raises(ConfigError, match="select.holdout"):
        load_campaign(write_campaign(tmp_path, tiny(tmp_path, select={"holdout": 0.7})))


def test_held_out_labels_never_enter_the_training_data(campaign):
    from dpmd.data import load_system

    st, root = campaign.state, campaign.root
    held = {r[0] for r in st.q("SELECT label_id FROM holdout")}
    for it, added in ((0, "frame_id IS NULL"), (0, "frame_id IS NOT NULL"), (1, "frame_id IS NOT NULL")):
        ids = [r[0] for r in st.q(f"SELECT label_id FROM labels WHERE iteration=? AND {added}", it)]
        assert len(held & set(ids)) == holdout_count(len(ids), 0.2) == 1
    coords = {r["label_id"]: np.load(root / r["file"])["coord"] for r in st.q("SELECT label_id, file FROM labels")}
    train, test = load_system(root / "data" / "Cu4"), load_system(root / "test_data" / "Cu4")

    def ids_of(system):
        return {next(i for i, c in coords.items() if np.array_equal(c, x)) for x in system.coord}

    assert ids_of(test) == held and ids_of(train) == set(coords) - held
    for (result,) in st.q("SELECT result FROM tasks WHERE kind='train'"):
        assert "test_data" not in result


def test_report_numbers_match_an_independent_evaluation(campaign):
    from dpmd.data import load_system
    from dpmd.model import load_model
    from dpmd.train.test import evaluate_system, test_model

    st, root = campaign.state, campaign.root
    page = (root / "report" / "report.html").read_text()
    paths = [root / "iter.001" / "train" / f"m{k}" / "model.pth" for k in range(2)]
    test_data = root / "test_data" / "Cu4"
    for k, path in enumerate(paths):   # each member: `dpmd test` on test_data/
        overall = test_model(path, [str(test_data)], log=lambda *a: None)["overall"]
        assert cell(page, f"rmse-e-m{k}") == pytest.approx(1000 * overall["rmse_e"], rel=6e-3)
        assert cell(page, f"rmse-f-m{k}") == pytest.approx(overall["rmse_f"], rel=6e-3)
    system = load_system(test_data)
    preds = [evaluate_system(load_model(p), system) for p in paths]
    energy = np.mean([p["energy"] for p in preds], axis=0)
    force = np.mean([p["force"].reshape(system.force.shape) for p in preds], axis=0)
    rmse_e = 1000 * np.sqrt(np.mean(((energy - system.energy) / system.natoms) ** 2))
    assert cell(page, "rmse-e-ensemble") == pytest.approx(rmse_e, rel=6e-3)
    assert cell(page, "rmse-f-ensemble") == pytest.approx(np.sqrt(np.mean((force - system.force) ** 2)), rel=6e-3)
    # per condition: the held-out labels' own files, grouped by the exploration condition they came from
    models = [load_model(p) for p in paths]
    groups: dict = {}
    for r in st.q("SELECT l.file, l.source, f.structure, f.temperature FROM holdout JOIN labels l USING (label_id) "
                  "LEFT JOIN frames f USING (frame_id)"):
        name = (f"{r['source'][len('initial:'):]}, initial (perturbed)" if r["structure"] is None
                else f"{r['structure']}, {r['temperature']:g} K")
        z = np.load(root / r["file"])
        groups.setdefault(name, []).append({"symbols": [str(s) for s in z["symbols"]], "coord": z["coord"],
                                            "box": z["box"], "energy": float(z["energy"]), "force": z["force"]})
    assert len(groups) >= 2
    for name, frames in groups.items():
        row = re.search(rf"<td>{re.escape(name)}</td><td class='n'>(\d+)</td><td class='n' id='cond\d+-e'>([^<]+)"
                        rf"</td><td class='n' id='cond\d+-f'>([^<]+)</td>", page)
        assert row, name
        e, f = ensemble_errors(models, frames)
        assert int(row[1]) == len(frames)
        assert float(row[2]) == pytest.approx(e, rel=6e-3) and float(row[3]) == pytest.approx(f, rel=6e-3)


def test_report_header_incidents_links_and_figures(campaign):
    st, root = campaign.state, campaign.root
    out = root / "report"
    page = (out / "report.html").read_text()
    assert f"dpmd {importlib.metadata.version('dpmd')}" in page
    assert re.search(r"<th>started</th><td>\d{4}-\d\d-\d\d \d\d:\d\d", page) and "<th>compute time</th>" in page
    # the hot stage stopped: the incident is recorded with its condition and step, and listed with dpmd's message
    incidents = st.q("SELECT * FROM incidents")
    assert incidents and all(r["stage"] == "hot" and r["temperature"] == 1500 for r in incidents)
    for r in incidents:
        assert "atoms closer than min_distance 2.4" in r["message"] and html.escape(r["message"]) in page
        assert r["step"] == int(r["message"].split(":")[0].split()[1])
    assert "fcc, 1500 K" in page and "DFT" not in page
    # relative links to what exists: the final models, data/ and test_data/; every figure is a PNG
    links = re.findall(r"href='([^']+)'", page)
    for k in range(2):
        assert f"../iter.001/train/m{k}/model.pth" in links
    assert {"../data/", "../test_data/", "../test_data/Cu4/"} <= set(links)
    for ref in links + re.findall(r"src='([^']+)'", page):
        assert (out / ref).exists(), ref
    images = re.findall(r"src='([^']+)'", page)
    assert {"parity.png", "labels_vs_error.png", "lcurve.png", "fractions.png", "devi_hist.png"} <= set(images)
    assert all((out / i).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for i in images)


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs chromium (apt-get install chromium)")
def test_report_renders_in_a_browser(campaign, tmp_path):
    import matplotlib.image

    shot = tmp_path / "report.png"
    subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--screenshot={shot}", "--window-size=1280,3000",
                    (campaign.root / "report" / "report.html").as_uri()], capture_output=True, timeout=120, check=True)
    rgb = (matplotlib.image.imread(shot)[..., :3] * 255).round()
    assert rgb.shape[:2] == (3000, 1280)
    assert (rgb < 250).any(axis=-1).mean() > 0.05                       # not a blank page
    blue = np.abs(rgb - [31, 119, 180]).max(axis=-1) < 12               # matplotlib's first colour: figures drew
    assert blue.sum() > 200


def test_holdout_of_a_stage_cut_short_is_drawn_again(tmp_path, monkeypatch):
    cfg = tiny(tmp_path, convergence={"max_iterations": 1})
    path = write_campaign(tmp_path, cfg)
    calls = []
    collect = Campaign.collect

    def killed_in_the_label_stage(self):   # init, train, then the label stage's rebuild: the third call
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return collect(self)

    monkeypatch.setattr(Campaign, "collect", killed_in_the_label_stage)
    with pytest.raises(KeyboardInterrupt):
        Campaign(load_campaign(path), log=None).run()
    monkeypatch.undo()
    camp = Campaign(load_campaign(path), log=None)
    st = camp.state
    assert not st.stage_done(0, "label") and st.one("SELECT COUNT(*) FROM holdout WHERE iteration=0") == 2
    # resumed with a larger hold-out: the unfinished stage draws again (no model has trained on its labels)
    cfg["select"]["holdout"] = 0.4
    camp = Campaign(load_campaign(write_campaign(tmp_path, cfg)), log=None)
    assert camp.run() == "max_iterations"
    st = camp.state
    explored = [r[0] for r in st.q("SELECT task_id FROM labels WHERE frame_id IS NOT NULL")]
    held = {r[0] for r in st.q("SELECT l.task_id FROM holdout JOIN labels l USING (label_id) "
                                "WHERE l.frame_id IS NOT NULL")}
    assert held == set(choose_holdout(explored, 0.4, [0, 4])) and len(held) == 2
    from dpmd.data import load_system

    assert load_system(camp.root / "test_data" / "Cu4").nframes == 1 + 2
    assert load_system(camp.root / "data" / "Cu4").nframes == st.one("SELECT COUNT(*) FROM labels") - 3
