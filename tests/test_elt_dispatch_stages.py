"""Per-stage dispatch: training members, exploration groups and label tasks as cluster jobs (dpdispatcher's Shell
backend on this machine, and a real local Slurm), run with the dispatcher's `python` command; the jobs recorded
per stage for `elt status`; an `elt run` killed (-9) with training jobs in flight re-attaches to them when run
again (the same jobs finish; none is submitted twice), and nothing is lost or duplicated.  Every stage as Shell
jobs without a shared filesystem, against the local campaign: tests/test_elt_remote_root.py."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from dpmd.errors import ConfigError
from explore_label_train.campaign import Campaign
from explore_label_train.config import load_campaign
from explore_label_train.report import status_table
from tests.conftest import REPO
from tests.test_elt import campaign_dict, check_consistency, write_campaign
from tests.test_slurm import slurm_dispatcher

STAGES = ("train", "explore", "label")


def shell_dispatcher(tmp_path) -> dict:
    return {"backend": "dpdispatcher", "retries": 0, "retry_wait": 0, "poll_interval": 1,
            "machine": {"batch_type": "Shell", "context_type": "LocalContext", "local_root": str(tmp_path),
                        "remote_root": str(tmp_path / "remote")},
            "resources": {"number_node": 1, "cpu_per_node": 1, "gpu_per_node": 0, "queue_name": "",
                          "group_size": 1, "envs": {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}}}


def every_stage_through(cfg: dict, disp: dict) -> dict:
    cfg["train"]["dispatcher"] = dict(disp)
    for stage in cfg["explore"]:
        stage["dispatcher"] = dict(disp)
    cfg["dispatcher"] = dict(disp, timeout=60)
    return cfg


def run_one_iteration(tmp_path, disp=None, iterations=1) -> Campaign:
    tmp_path.mkdir(exist_ok=True)
    cfg = campaign_dict(tmp_path, convergence={"max_iterations": iterations}, train={"numb_steps": 10})
    if disp is not None:
        every_stage_through(cfg, disp)
    camp = Campaign(load_campaign(write_campaign(tmp_path, cfg)), log=None)
    assert camp.run() == "max_iterations"
    check_consistency(camp)
    return camp


def same_campaign(a: Campaign, b: Campaign) -> None:
    """The same frames explored and the same labels (the stages compute the same thing wherever they run)."""
    rows = "SELECT task_id, frame_id, natoms, energy FROM labels ORDER BY task_id"
    la, lb = a.state.q(rows), b.state.q(rows)
    assert [tuple(r)[:3] for r in la] == [tuple(r)[:3] for r in lb]
    np.testing.assert_allclose([r[3] for r in la], [r[3] for r in lb], rtol=0, atol=1e-9)
    frames = "SELECT task_id, idx, max_devi_f FROM frames ORDER BY task_id, idx"
    fa, fb = a.state.q(frames), b.state.q(frames)
    assert [tuple(r)[:2] for r in fa] == [tuple(r)[:2] for r in fb]
    np.testing.assert_allclose([r[2] for r in fa], [r[2] for r in fb], rtol=0, atol=1e-9)


def assert_jobs(camp: Campaign, numeric_ids: bool) -> None:
    st = camp.state
    for kind in STAGES:
        jobs = st.q("SELECT * FROM jobs WHERE kind=?", kind)
        tasks = st.one("SELECT COUNT(*) FROM tasks WHERE kind=?", kind)
        assert jobs and len(jobs) <= tasks, kind
        assert all(j["state"] == "finished" and (j["job_id"].isdigit() or not numeric_ids) for j in jobs), kind
    assert st.jobs_in_flight() == []


def kill_with_jobs_in_flight(path, kind: str) -> list:
    """Start `elt run path` in a process and kill -9 it as soon as its database records a `kind` cluster job
    waiting or running; returns those jobs, [(job_hash, job_id)]."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "explore_label_train.cli", "run", str(path)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    db = Path(load_campaign(path)["work_dir"]) / "campaign.db"
    in_flight = []
    try:
        deadline = time.monotonic() + 120
        while not in_flight and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
            if db.is_file():
                try:
                    with sqlite3.connect(db) as con:
                        in_flight = con.execute("SELECT job_hash, job_id FROM jobs WHERE kind=? AND "
                                                "state IN ('waiting', 'running')", (kind,)).fetchall()
                except sqlite3.OperationalError:   # no jobs table yet
                    pass
        assert in_flight, f"no {kind} job was seen in flight"
    finally:
        proc.kill()   # SIGKILL, as kill -9
        proc.wait()
    return in_flight


@pytest.mark.slow   # one iteration, every stage through Slurm: ~1 min
def test_every_stage_through_slurm(tmp_path, slurm):
    pytest.importorskip("dpdispatcher")
    disp = dict(slurm_dispatcher(tmp_path / "slurm"), poll_interval=1, timeout=None)
    disp["resources"]["queue_name"] = "gpu" if "gpu" in slurm else ""   # train and explore on the "GPU" partition
    camp = run_one_iteration(tmp_path / "slurm", disp)
    assert_jobs(camp, numeric_ids=True)
    assert "cluster jobs not finished" not in status_table(camp.state)


@pytest.mark.parametrize("backend", ["shell", pytest.param("slurm", marks=pytest.mark.slow)])
def test_killed_run_reattaches_to_its_training_jobs(tmp_path, request, backend):
    """`elt run` killed while its training jobs run (Shell's and Slurm's jobs outlive it); the next run finds
    them: each training job's id is the one the killed run submitted, and the campaign finishes consistent."""
    pytest.importorskip("dpdispatcher")
    if backend == "slurm":
        request.getfixturevalue("slurm")
        disp = dict(slurm_dispatcher(tmp_path), poll_interval=1, timeout=None)
    else:
        disp = shell_dispatcher(tmp_path)
    cfg = every_stage_through(campaign_dict(tmp_path, convergence={"max_iterations": 1},
                                            train={"numb_steps": 60}), disp)
    path = write_campaign(tmp_path, cfg)
    in_flight = kill_with_jobs_in_flight(path, "train")
    camp = Campaign(load_campaign(path), log=None)
    assert camp.state.one("SELECT COUNT(*) FROM tasks WHERE kind='train' AND status='done'") < 2
    assert "cluster jobs not finished" in status_table(camp.state)
    assert camp.run() == "max_iterations"
    after = dict(camp.state.q("SELECT job_hash, job_id FROM jobs WHERE kind='train'"))
    assert all(after[h] == job_id for h, job_id in in_flight)          # re-attached, not submitted again
    assert len(after) == 2                                               # one job per member, ever
    check_consistency(camp)


@pytest.mark.parametrize("change, message", [
    ({"train": {"backend": "pbs"}}, "'train.dispatcher.backend' must be local or dpdispatcher, got 'pbs'"),
    ({"train": "slurm"}, "'train.dispatcher' must be local or a dispatcher block"),
    ({"explore": {"backend": "dpdispatcher", "python": " "}}, "'explore[0].dispatcher.python' must be the command"),
    ({"explore": {"backend": "dpdispatcher"}}, "'explore[0].dispatcher.backend' dpdispatcher needs 'machine'"),
    ({"train": {"poll_interval": 0}}, "'train.dispatcher.poll_interval' must be positive"),
])
def test_stage_dispatchers_are_checked_with_the_campaign(tmp_path, change, message):
    cfg = campaign_dict(tmp_path)
    if "train" in change:
        cfg["train"]["dispatcher"] = change["train"]
    else:
        cfg["explore"][0]["dispatcher"] = change["explore"]
    with pytest.raises(ConfigError) as err:
        load_campaign(write_campaign(tmp_path, cfg))
    assert message in str(err.value) and "\n" not in str(err.value)
    cfg["train"]["dispatcher"] = cfg["explore"][0]["dispatcher"] = "local"   # the default: in and beside elt run
    loaded = load_campaign(write_campaign(tmp_path, cfg))
    assert loaded["train"]["dispatcher"] is None and loaded["explore"][0]["dispatcher"] is None
