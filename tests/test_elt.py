"""explore_label_train: an end-to-end EMT Cu campaign, crash/resume, failing labellers, filters, selection, config errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import yaml

from dpmd.errors import ConfigError
from explore_label_train.campaign import Campaign
from explore_label_train.cli import main as elt_main
from explore_label_train.config import load_campaign
from explore_label_train.dispatch import LocalPool
from explore_label_train.report import status_table, write_report
from explore_label_train.selection import check_frame, choose, classify
from tests.conftest import REPO

HELPERS = textwrap.dedent('''
    import os, signal, time
    from ase.calculators.emt import EMT

    class Flaky(EMT):
        """EMT that fails (deterministically) on about one frame in five; campaign_dict's initial frame 2 is
        one of them, so a campaign meets a failure whatever its models explore."""
        def calculate(self, atoms=None, properties=("energy",), system_changes=None):
            if int(abs(atoms.positions[0, 0]) * 1e6) % 5 == 0:
                raise RuntimeError("flaky labeller: refused this frame")
            super().calculate(atoms, properties, system_changes or ["positions", "numbers", "cell", "pbc"])

    class KillParent(EMT):
        """EMT that kills the campaign process (SIGKILL) on its k-th call, counted in a file."""
        def __init__(self, counter, k, **kw):
            super().__init__(**kw)
            self.counter, self.k = counter, k
        def calculate(self, atoms=None, properties=("energy",), system_changes=None):
            with open(self.counter, "a") as fh:
                fh.write("x")
            if os.path.getsize(self.counter) == self.k:
                os.kill(os.getppid(), signal.SIGKILL)
                os._exit(1)
            super().calculate(atoms, properties, system_changes or ["positions", "numbers", "cell", "pbc"])

    def Sleepy(**kw):
        time.sleep(300)

    def Die(**kw):
        os._exit(3)

    def Exit(**kw):
        raise SystemExit("labeller gave up")
''')


@pytest.fixture
def helpers(tmp_path, monkeypatch):
    d = tmp_path / "helpers"
    d.mkdir()
    (d / "elt_helpers.py").write_text(HELPERS)
    monkeypatch.syspath_prepend(str(d))   # spawn workers inherit sys.path
    return d


def campaign_dict(tmp_path, **over):
    cfg = {
        "work_dir": str(tmp_path / "camp"),
        "type_map": ["Cu"],
        "structures": {"fcc": {"bulk": "Cu", "crystalstructure": "fcc", "a": 3.61, "cubic": True}},
        "initial": {"structures": ["fcc"], "perturb": 4, "displacement": 0.05, "cell_strain": 0.02},
        "train": {"ensemble_size": 2, "numb_steps": 20, "reuse_numb_steps": 10, "template": {
            "model": {"descriptor": {"type": "se_e2_a", "sel": "auto", "rcut": 4.5, "rcut_smth": 0.5,
                                     "neuron": [4, 8, 16], "axis_neuron": 4}, "fitting_net": {"neuron": [16, 16]}},
            "learning_rate": {"start_lr": 0.002, "stop_lr": 1e-5, "decay_steps": 5},
            "loss": {"start_pref_e": 0.02, "limit_pref_e": 1, "start_pref_f": 1000, "limit_pref_f": 1},
            "training": {"training_data": {"batch_size": 1}}}},
        "explore": [{"name": "nvt", "structures": ["fcc"], "ensemble": "nvt", "temperatures": [300, 800],
                     "steps": 40, "traj_interval": 10, "timestep": 2.0}],
        "trust": {"lo": 0.0, "hi": 50.0},          # every frame is a candidate: selection is budget-bound
        "select": {"budget": 3},
        "filters": {"min_distance": 1.5},
        "labeller": {"calculator": "emt"},
        "dispatcher": {"workers": 1, "timeout": 60},
        "convergence": {"accurate_ratio": 0.99, "max_iterations": 2, "max_labels": 100},
    }
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(cfg.get(k), dict):
            cfg[k].update(v)
        else:
            cfg[k] = v
    return cfg


def write_campaign(tmp_path, cfg, name="camp.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return path


def check_consistency(camp: Campaign) -> dict:
    """Labels, tasks, files and the dataset agree; nothing duplicated."""
    st = camp.state
    labels = st.q("SELECT * FROM labels")
    done = {r[0] for r in st.q("SELECT task_id FROM tasks WHERE kind='label' AND status='done'")}
    assert {r["task_id"] for r in labels} == done                     # a label row <=> a done label task
    frame_ids = [r["frame_id"] for r in labels if r["frame_id"] is not None]
    assert len(frame_ids) == len(set(frame_ids))                        # no frame labelled twice
    for r in labels:
        assert (camp.root / r["file"]).is_file() and r["settings_hash"] == camp.label_hash
    for fid in frame_ids:
        assert st.one("SELECT selected FROM frames WHERE frame_id=?", fid) == 1
    from dpmd.data import load_system

    sys_dir = camp.root / "data" / "Cu4"
    system = load_system(sys_dir)
    assert system.nframes == len(labels)
    assert len({tuple(np.round(c.ravel(), 10)) for c in system.coord}) == len(labels)   # no duplicate frames
    return {"labels": len(labels), "done": done}


def test_end_to_end_two_iterations_with_a_flaky_labeller(tmp_path, helpers, capsys):
    cfg = campaign_dict(tmp_path, labeller={"calculator": "elt_helpers:Flaky"}, select={"stratify": True})
    cfg["explore"].append(dict(cfg["explore"][0], name="biased", iterations=[1], bias={"strength": 0.2}))
    path = write_campaign(tmp_path, cfg)
    camp = Campaign(load_campaign(path), log=None)
    assert camp.run() == "max_iterations"
    st = camp.state
    its = st.q("SELECT * FROM iterations ORDER BY iteration")
    assert [r["iteration"] for r in its] == [0, 1] and all(r["status"] == "done" for r in its)
    for r in its:   # 2 temperatures x 4 recorded steps per stage; iteration 1 adds the biased stage
        assert r["n_frames"] == 8 * (1 + r["iteration"]) and r["n_selected"] <= 3
        assert r["accurate"] + r["candidate"] + r["failed"] == pytest.approx(1.0)
        assert {s[0] for s in st.q("SELECT stage FROM stages WHERE iteration=? AND status='done'", r["iteration"])} \
            == {"init", "train", "explore", "select", "label", "check"}
    assert st.one("SELECT COUNT(*) FROM frames WHERE stage='biased' AND iteration=1") == 8
    for r in its:  # stratified: the budget of 3 covers both temperatures every iteration
        assert {t for (t,) in st.q("SELECT temperature FROM frames WHERE iteration=? AND selected=1",
                                  r["iteration"])} == {300.0, 800.0}
    # every selected frame is a candidate that passed the filters; every frame has a reason
    assert st.one("SELECT COUNT(*) FROM frames WHERE selected=1 AND (class!='candidate' OR filter IS NOT NULL)") == 0
    assert st.one("SELECT COUNT(*) FROM frames WHERE reason IS NULL") == 0
    # the flaky labeller failed some tasks, with the reason; the campaign went on
    failed = st.q("SELECT task_id, reason FROM tasks WHERE status='failed'")
    assert failed and all("flaky labeller" in r["reason"] for r in failed)
    info = check_consistency(camp)
    assert info["labels"] == st.one("SELECT COUNT(*) FROM tasks WHERE kind='label'") - len(failed)
    assert st.one("SELECT COUNT(*) FROM labels WHERE frame_id IS NOT NULL") > 0   # exploration added labels
    # provenance: source task and step of explored labels
    row = st.q("SELECT l.source, l.source_step, f.task_id, f.step FROM labels l JOIN frames f USING (frame_id)")[0]
    assert row["source"] == row["task_id"] and row["source_step"] == row["step"]
    # ensemble members differ (seeds), iteration 1 was initialised from iteration 0
    import torch
    from dpmd.model import load_model

    m0, m1 = (load_model(camp.model_path(1, k)) for k in (0, 1))
    x = torch.tensor(camp.structure("fcc").positions) + 0.1 * torch.arange(12.0).reshape(4, 3) / 12
    box = torch.tensor(camp.structure("fcc").cell[:])
    assert not torch.allclose(m0(x, torch.zeros(4, dtype=torch.long), box)["force"],
                              m1(x, torch.zeros(4, dtype=torch.long), box)["force"])
    assert "ckpt" in str(st.q("SELECT result FROM tasks WHERE task_id='i001-train-m0'")[0][0])
    # running again redoes nothing
    before = st.q("SELECT task_id, finished FROM tasks ORDER BY task_id")
    assert Campaign(load_campaign(path), log=None).run() == "max_iterations"
    assert [tuple(r) for r in st.q("SELECT task_id, finished FROM tasks ORDER BY task_id")] == [tuple(r) for r in before]
    # status and report
    table = status_table(st)
    assert "accurate" in table and "failed tasks:" in table and len(table.splitlines()) >= 4
    assert elt_main(["status", str(path)]) == 0
    assert "tasks done/failed" in capsys.readouterr().out
    page = write_report(st, tmp_path / "report")
    assert page.is_file() and all((tmp_path / "report" / f).is_file()
                                  for f in ("fractions.png", "devi_hist.png", "labels_vs_error.png", "stage_times.png"))


def test_kill_during_labelling_then_resume_loses_and_duplicates_nothing(tmp_path, helpers):
    counter = tmp_path / "calls"
    # call 7 is the 3rd exploration label of iteration 0 (4 initial labels come first)
    cfg = campaign_dict(tmp_path, labeller={"calculator": "elt_helpers:KillParent",
                                            "kwargs": {"counter": str(counter), "k": 7}},
                        convergence={"max_iterations": 1})
    path = write_campaign(tmp_path, cfg)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(helpers), str(REPO)]), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "explore_label_train.cli", "run", str(path)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr[-2000:]
    camp = Campaign(load_campaign(path), log=None)
    st = camp.state
    assert st.one("SELECT COUNT(*) FROM tasks WHERE kind='label' AND status='pending'") >= 1
    before = {r["task_id"]: r["finished"] for r in st.q("SELECT task_id, finished FROM tasks WHERE status='done'")}
    assert sum(1 for t in before if "-train-" in t) == 2 and len(before) >= 4 + 2 + 1
    n_labels_before = st.one("SELECT COUNT(*) FROM labels")
    assert camp.run() == "max_iterations"
    after = {r["task_id"]: r["finished"] for r in st.q("SELECT task_id, finished FROM tasks WHERE status='done'")}
    assert all(after[t] == f for t, f in before.items())          # nothing finished was redone
    assert st.one("SELECT COUNT(*) FROM tasks WHERE status!='done'") == 0
    info = check_consistency(camp)
    assert info["labels"] == 4 + 3 and info["labels"] > n_labels_before


def test_dispatcher_reports_exceptions_deaths_and_timeouts(helpers):
    results = {}
    frame = {"symbols": ["Cu"] * 4, "positions": (np.eye(4, 3) * 1.8 + 0.1).tolist(),
             "cell": (np.eye(3) * 3.61).tolist(), "kwargs": {}}
    tasks = [(name, "label", dict(frame, calculator=calc)) for name, calc in
             [("ok", "emt"), ("exit", "elt_helpers:Exit"), ("die", "elt_helpers:Die"),
              ("sleep", "elt_helpers:Sleepy"), ("ok2", "emt")]]
    LocalPool(workers=2, timeout=25.0).run(tasks, lambda t, ok, v, s: results.__setitem__(t, (ok, v)))
    assert results["ok"][0] and results["ok2"][0] and np.isfinite(results["ok"][1]["forces"]).all()
    assert results["ok"][1]["virial"].shape == (3, 3)
    assert results["exit"] == (False, results["exit"][1]) and "SystemExit: labeller gave up" in results["exit"][1]
    assert not results["die"][0] and "worker process died (exit code 3)" in results["die"][1]
    assert not results["sleep"][0] and "timeout" in results["sleep"][1]


def test_filters_reject_unphysical_frames():
    cell = np.eye(3) * 3.61
    good = np.array([[0, 0, 0], [1.8, 1.8, 0], [1.8, 0, 1.8], [0, 1.8, 1.8]])
    f = {"min_distance": 1.5, "min_cell_angle": 45.0, "volume_per_atom": [8, 20], "max_cell_length": 10.0}
    assert check_frame(["Cu"] * 4, good, cell, f) is None
    close = good.copy()
    close[1] = [0.6, 0.5, 0.0]
    assert "min_distance" in check_frame(["Cu"] * 4, close, cell, f)
    assert check_frame(["Cu"] * 4, np.array([[0.05, 0, 0], [3.55, 0, 0], [1.8, 1.8, 1.8], [0, 1.8, 1.8]]),
                       cell, f).startswith("atoms 0.110")                   # overlap across the periodic boundary
    sheared = np.array([[3.61, 0, 0], [3.5, 0.5, 0], [0, 0, 3.61]])
    assert "cell angle" in check_frame(["Cu"] * 4, good, sheared, f)
    assert "volume per atom" in check_frame(["Cu"] * 4, good, cell * 1.5, f)
    assert "non-finite" in check_frame(["Cu"] * 4, good * np.nan, cell, f)
    assert check_frame(["Cu"] * 2, np.array([[0, 0, 0], [1.0, 0, 0]]), None, {"min_distance": 1.5}) is not None


def test_selection_respects_trust_levels_and_budget():
    devi = np.array([0.01, 0.05, 0.1, 0.29, 0.3, 0.9, np.nan])
    assert list(classify(devi, 0.05, 0.3)) == ["accurate", "candidate", "candidate", "candidate", "failed", "failed",
                                               "failed"]
    rng = np.random.default_rng(0)
    centers = np.array([[0, 0], [10, 0], [0, 10]], dtype=float)
    feats = np.concatenate([c + 0.1 * rng.normal(size=(5, 2)) for c in centers])   # three clusters of 5
    cands = [{"max_devi_f": 0.1 + 0.001 * i} for i in range(15)]
    chosen, reasons = choose(cands, 3, "fps", feats)
    assert len(chosen) == 3 and len(reasons) == 15
    assert sorted(i // 5 for i in chosen) == [0, 1, 2]                  # one from each cluster: diverse
    assert chosen[0] == 14 and "largest max_devi_f" in reasons[14]
    assert all(reasons[i].startswith("not selected: budget 3") for i in range(15) if i not in chosen)
    assert len(choose(cands, 20, "fps", feats)[0]) == 15
    assert choose(cands, 0, "fps", feats)[0] == []
    chosen, _ = choose(cands, 4, "devi", None)
    assert chosen == [14, 13, 12, 11]


def test_stratified_selection_shares_the_budget_among_conditions():
    from explore_label_train.selection import choose_stratified, stratum_shares

    # one each, then the other 2 by the remaining candidates 5 : 2 : 0 (1.43, 0.57: largest remainders)
    assert stratum_shares(["a"] * 6 + ["b"] * 3 + ["c"], 5) == {"a": 2, "b": 2, "c": 1}
    assert stratum_shares(["a"] * 6 + ["b"] * 3 + ["c"], 2) == {"a": 1, "b": 1, "c": 0}  # the largest first
    assert stratum_shares(["a"] * 2 + ["b"], 10) == {"a": 2, "b": 1}                      # all of them
    assert sum(stratum_shares(["a", "b", "c", "d"] * 5, 7).values()) == 7
    # the hot condition has the largest deviations: by deviation alone it would take the whole budget
    strata = [("fcc", 900.0)] * 10 + [("fcc", 300.0)] * 10
    cands = [{"max_devi_f": 0.2 + 0.001 * i} for i in range(10)] + [{"max_devi_f": 0.06 + 0.001 * i} for i in range(10)]
    chosen, reasons = choose_stratified(cands, strata, 4, "devi", None)
    assert sorted(chosen) == [8, 9, 18, 19]                       # 2 + 2, the largest deviations within each
    assert len(reasons) == 20 and "fcc/300.0: share 2 of 10" in reasons[18]
    assert all(reasons[i].startswith("not selected") for i in range(20) if i not in chosen)
    feats = np.random.default_rng(1).normal(size=(20, 3))
    chosen, _ = choose_stratified(cands, strata, 5, "fps", feats)
    assert len(chosen) == 5 and {i // 10 for i in chosen} == {0, 1}


@pytest.mark.parametrize("change, message", [
    ({"bogus": 1}, "unknown key 'bogus'; valid keys: convergence, dispatcher, explore, filters, initial"),
    ({"select": {"budget": 3, "fps": True}},
     "unknown key 'select.fps'; valid keys: budget, holdout, method, min_labels, numb_candi_f, numb_candi_v, "
     "per_structure, perc_candi_f, perc_candi_v, stratify"),
    ({"structures": {"x": {"file": "nope/POSCAR"}}}, "nope/POSCAR does not exist"),
    ({"initial": {"data": ["missing_data"], "structures": []}}, "'initial.data[0]': missing_data does not exist"),
    ({"trust": {"lo": 0.3, "hi": 0.1}}, "'trust.lo' (0.3) must be smaller than 'trust.hi' (0.1)"),
    ({"labeller": {"calculator": "nosuchcalc"}}, "unknown calculator 'nosuchcalc'"),
    ({"dispatcher": {"backend": "dpdispatcher"}}, "dpdispatcher"),
    ({"explore": [{"structures": ["nothere"], "temperatures": [300], "steps": 10}]}, "unknown structure 'nothere'"),
    ({"explore": [{"structures": ["fcc"], "temperatures": [300], "steps": 10, "bias": {"strength": 0}}]},
     "'explore[0].bias.strength' must be positive, got 0"),
    ({"explore": [{"structures": ["fcc"], "temperatures": [300], "steps": 10, "bias": {"strength": 1, "k": 2}}]},
     "unknown key 'explore[0].bias.k'; valid keys: scale, strength"),
    ({"structures": {"w": {"molecule": "H2O", "bulk": "Cu"}}}, "'structures.w' needs exactly one of 'file'"),
    ({"train": {"numb_steps": 10, "template": {"model": {"descriptor": {"rcut": 4.0, "sell": 1}}}}},
     "train.template: unknown key 'model.descriptor.sell'"),
])
def test_invalid_campaign_files_give_one_line_errors(tmp_path, change, message, capsys):
    cfg = campaign_dict(tmp_path)
    for k, v in change.items():
        cfg[k] = v
    path = write_campaign(tmp_path, cfg)
    with pytest.raises(ConfigError) as err:
        load_campaign(path)
    text = str(err.value)
    assert message in text and "\n" not in text and str(path) in text
    assert elt_main(["run", str(path)]) == 1
    err_out = capsys.readouterr().err
    assert err_out.count("\n") == 1 and message in err_out
    assert not (tmp_path / "camp").exists()     # nothing started


def test_example_campaign_file_is_valid():
    cfg = load_campaign(REPO / "configs" / "campaign_cu_emt.yaml")
    assert cfg["labeller"]["calculator"] == "emt" and cfg["train"]["ensemble_size"] == 4


# ---------------------------------------------------------------- uncertainty-biased exploration
def _toy_ensemble():
    """Two small water models that differ only in their random initial weights (float64)."""
    from dpmd.model import DeepPot
    from tests.conftest import make_model, small_config

    a = make_model()
    cfg = small_config()
    cfg["descriptor"]["seed"], cfg["fitting_net"]["seed"] = 11, 12
    b = DeepPot(cfg)
    b.load_state_dict({**b.state_dict(), **{k: v for k, v in a.state_dict().items() if "mean" in k or "std" in k
                                            or "bias" in k and "energy" in k}})
    return [a.eval(), b.eval()]


def test_bias_forces_and_virial_are_derivatives_of_the_bias_energy(water):
    import torch

    from dpmd.geometry.graph import build_graph
    from explore_label_train.bias import DeviationBias
    from tests.conftest import triclinic_water

    models = _toy_ensemble()
    coord, atype, box = triclinic_water(water)
    bias = DeviationBias(strength=0.5, scale=0.3)

    def energy(x, cell):
        g = build_graph(x, atype, cell, rcut=models[0].rcut)
        return float(bias.sigma_and_energy(models, g)[1][0].detach())

    g = build_graph(coord, atype, box, rcut=models[0].rcut)
    zero = {"energy": torch.zeros(1, dtype=torch.float64), "force": torch.zeros_like(coord),
            "virial": torch.zeros(1, 3, 3, dtype=torch.float64)}
    out = bias(models, g, zero)
    assert -0.5 < float(out["energy"][0]) < -0.01           # bounded, and the models do disagree
    assert float(out["energy"][0]) == pytest.approx(energy(coord, box), abs=1e-12)
    h = 1e-5
    rng = np.random.default_rng(0)
    for i, k in [tuple(x) for x in rng.integers(0, [len(coord), 3], size=(6, 2))]:
        xp, xm = coord.clone(), coord.clone()
        xp[i, k] += h
        xm[i, k] -= h
        fd = -(energy(xp, box) - energy(xm, box)) / (2 * h)
        assert float(out["force"][i, k]) == pytest.approx(fd, abs=1e-7, rel=1e-5)
    assert float(out["force"].abs().max()) > 1e-3
    for a, b in [(0, 0), (0, 1), (2, 1)]:                   # virial = -dE/d(strain), DeePMD's sign
        eps = torch.zeros(3, 3, dtype=torch.float64)
        eps[a, b] = h
        de = energy(coord @ (torch.eye(3) + eps), box @ (torch.eye(3) + eps)) - \
            energy(coord @ (torch.eye(3) - eps), box @ (torch.eye(3) - eps))
        assert float(out["virial"][0, b, a]) == pytest.approx(-de / (2 * h), abs=1e-7, rel=1e-5)


def test_bias_drives_exploration_towards_larger_deviation(water):
    """A trained water model and a copy with 3 % noise on its fitting weights: biased NVT strays further."""
    import torch

    from dpmd.md import Simulation
    from dpmd.model import load_model
    from explore_label_train.bias import DeviationBias
    from tests.conftest import DEEPMD_REF, triclinic_water

    if not (DEEPMD_REF / "model.ckpt.pt").is_file():
        pytest.skip("shared DeePMD-kit water model not available")
    models = [load_model(DEEPMD_REF / "model.ckpt.pt").eval(), load_model(DEEPMD_REF / "model.ckpt.pt").eval()]
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in models[1].named_parameters():
            if name.startswith("fitting"):
                p.mul_(1 + 0.03 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    coord, atype, box = triclinic_water(water, scale=0.5)
    symbols = [models[0].type_map[t] for t in atype]
    pos = torch.stack([coord] * 2)                          # 2 systems at 2 temperatures, batched
    means = {}
    for name, bias in [("plain", None), ("biased", DeviationBias(strength=1.0, scale=0.02))]:
        sim = Simulation(models, pos, symbols, box, ensemble="nvt", thermostat={"type": "langevin", "damp": 0.05},
                         temperature=np.array([250.0, 350.0]), timestep=0.5, seed=3, thermo_freq=0,
                         model_devi_freq=5, log=None, bias=bias)
        sim.run(40)
        devi = np.stack([d for step, d in sim.devi_history if step > 0])     # (records, F, 7)
        means[name] = devi[..., 5].mean()                                     # avg_devi_f
    assert means["biased"] > 1.2 * means["plain"], means


# ---------------------------------------------------------------- dpdispatcher
def _dispatch_through_dpdispatcher(tmp_path, batch_type):
    from explore_label_train.dispatch import DPDispatcherPool

    cfg = {"backend": "dpdispatcher",
           "machine": {"batch_type": batch_type, "context_type": "LocalContext", "local_root": str(tmp_path),
                       "remote_root": str(tmp_path / "remote")},
           "resources": {"number_node": 1, "cpu_per_node": 1, "gpu_per_node": 0, "queue_name": "", "group_size": 1,
                         "envs": {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}}}
    frame = {"symbols": ["Cu"] * 4, "positions": (np.eye(4, 3) * 1.8 + 0.1).tolist(),
             "cell": (np.eye(3) * 3.61).tolist(), "kwargs": {}}
    results = {}
    DPDispatcherPool(cfg, tmp_path).run([("ok", "label", dict(frame, calculator="emt")),
                                         ("bad", "label", dict(frame, calculator="nosuchcalc"))],
                                        lambda t, ok, v, s: results.__setitem__(t, (ok, v)))
    from explore_label_train.labelers import label

    assert results["ok"][0]
    np.testing.assert_allclose(results["ok"][1]["forces"], label(dict(frame, calculator="emt"))["forces"])
    assert not results["bad"][0] and "unknown calculator 'nosuchcalc'" in results["bad"][1]


def _flaky_pool(tmp_path, monkeypatch, failures: int, retries: int):
    """A DPDispatcherPool whose scheduler fails `failures` times (after the first job of the first
    submission has run), then runs every job in-process; returns (pool, submitted task ids, waits)."""
    from explore_label_train import dispatch

    submitted, waits = [], []

    def run_job(task_id):
        monkeypatch.chdir(tmp_path / "dispatch" / task_id)
        dispatch._main(["task.json"])

    def submit(self, tasks):
        submitted.append([t[0] for t in tasks])
        if len(submitted) <= failures:
            if len(submitted) == 1:
                run_job(tasks[0][0])
            raise RuntimeError("sbatch: error: Batch job submission failed: Socket timed out on send/recv")
        for t in tasks:
            run_job(t[0])

    monkeypatch.setattr(dispatch.DPDispatcherPool, "_submit", submit)
    cfg = {"backend": "dpdispatcher", "machine": {}, "resources": {}, "retries": retries, "retry_wait": 2.0,
           "timeout": 60.0}
    return dispatch.DPDispatcherPool(cfg, tmp_path, sleep=waits.append), submitted, waits


def test_dpdispatcher_pool_retries_scheduler_errors_with_backoff(tmp_path, monkeypatch):
    pytest.importorskip("dpdispatcher")
    pool, submitted, waits = _flaky_pool(tmp_path, monkeypatch, failures=2, retries=3)
    frame = {"symbols": ["Cu"] * 4, "positions": (np.eye(4, 3) * 1.8 + 0.1).tolist(),
             "cell": (np.eye(3) * 3.61).tolist(), "kwargs": {}, "calculator": "emt"}
    done = []
    pool.run([(name, "label", frame) for name in ("a", "b", "c")], lambda t, ok, v, s: done.append((t, ok)))
    # the job that finished before the scheduler failed is committed once and never resubmitted
    assert submitted == [["a", "b", "c"], ["b", "c"], ["b", "c"]]
    assert waits == [2.0, 4.0]                  # back-off doubles
    assert sorted(done) == [("a", True), ("b", True), ("c", True)]


def test_dpdispatcher_pool_gives_up_after_retries_and_enforces_time_limits(tmp_path, monkeypatch):
    pytest.importorskip("dpdispatcher")
    from explore_label_train import dispatch

    pool, submitted, waits = _flaky_pool(tmp_path, monkeypatch, failures=5, retries=1)
    done = {}
    pool.run([("a", "label", {}), ("b", "label", {})], lambda t, ok, v, s: done.__setitem__(t, (ok, v)))
    assert len(submitted) == 2 and waits == [2.0]
    assert not done["b"][0] and "Socket timed out" in done["b"][1]
    # a job enforces its task's time limit itself: a slow labeller is a failed task with the reason
    monkeypatch.setitem(dispatch.FUNCTIONS, "sleep", ("time", "sleep"))
    d = tmp_path / "slow"
    d.mkdir()
    (d / "task.json").write_text(json.dumps({"task_id": "slow", "fn": "sleep", "payload": 30, "timeout": 0.2}))
    monkeypatch.chdir(d)
    dispatch._main(["task.json"])
    reply = json.loads((d / "result.json").read_text())
    assert reply == {"task_id": "slow", "ok": False, "value": "timeout: over the 0.2 s time limit"}


@pytest.mark.slow   # dpdispatcher polls its jobs every few seconds: ~40 s
def test_label_tasks_through_dpdispatcher_shell(tmp_path):
    pytest.importorskip("dpdispatcher")
    _dispatch_through_dpdispatcher(tmp_path, "Shell")


def test_label_tasks_through_dpdispatcher_slurm(tmp_path, slurm, monkeypatch):
    """Through Slurm (the `slurm` fixture: .ci/slurm/start.sh's one-node cluster; CI starts it)."""
    dpdispatcher = pytest.importorskip("dpdispatcher")
    run_submission = dpdispatcher.Submission.run_submission   # poll squeue every second, not every 30 s
    monkeypatch.setattr(dpdispatcher.Submission, "run_submission",
                        lambda self, **kw: run_submission(self, **{"check_interval": 1, **kw}))
    _dispatch_through_dpdispatcher(tmp_path, "Slurm")


def test_batched_simulation_takes_one_temperature_per_system(model, water):
    import torch

    from dpmd.md import Simulation

    coord, atype, box = water
    symbols = [model.type_map[t] for t in atype]
    sim = Simulation(model, torch.stack([coord] * 3), symbols, box, ensemble="nvt",
                     temperature=np.array([50.0, 200.0, 400.0]), thermostat={"type": "csvr", "damp": 0.01},
                     timestep=0.5, seed=1, thermo_freq=0, log=None)
    np.testing.assert_allclose(sim.thermo()["temp"], [50.0, 200.0, 400.0], rtol=1e-10)   # drawn per system
    sim.run(10)                           # the thermostats read one kT per system (thermo() included)
    th = sim.thermo()
    assert th["temp"][0] < th["temp"][1] < th["temp"][2] and np.isfinite(th["econserve"]).all()
