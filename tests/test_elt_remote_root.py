"""Cluster jobs without a shared filesystem: every stage through dpdispatcher's LocalContext copying into a
separate remote_root (no symlinks), each job run by a `python` command that refuses to open anything in the
campaign's work_dir, gives the local campaign (a template's stat file sent with the training jobs, a LAMMPS
stage's run folders installed where a local run leaves them); job states are recorded while the jobs run, as the
scheduler reports them, and another reader of the database sees them."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from explore_label_train.campaign import (Campaign, CampaignError, cluster_explore_job, cluster_train_job,
                                          explore_group, train_member)
from dpmd.errors import ConfigError
from explore_label_train.config import load_campaign, training_input
from explore_label_train.report import status_table
from explore_label_train.state import State
from tests.conftest import REPO
from tests.test_elt import campaign_dict, write_campaign
from tests.test_elt_dispatch_stages import assert_jobs, run_one_iteration, same_campaign
# (cu_data, models and plugin are fixtures)
from tests.test_elt_lammps import NO_PLUMED, group_job, lammps_stage, models, plugin, rattled_fcc  # noqa: F401
from tests.test_elt_lammps import campaign_dict as lammps_campaign_dict
from tests.test_threads import cu_data, training_campaign  # noqa: F401

# A job's Python, as a site's wrapper would start it (`<python> -m explore_label_train.dispatch task.json`),
# that makes every open or listing of a path inside its first argument fail: the campaign's files are out of
# the job's reach, as on a cluster that does not mount them.
GUARD = textwrap.dedent('''
    import os, runpy, sys

    far = os.path.realpath(sys.argv[1])
    module, sys.argv = sys.argv[3], [sys.argv[0], *sys.argv[4:]]   # guard.py FAR -m MODULE ARGS...

    def refuse(event, args):
        if event in ("open", "os.listdir", "os.scandir") and args and isinstance(args[0], (str, bytes, os.PathLike)):
            path = os.path.realpath(os.fsdecode(args[0]))
            if path == far or path.startswith(far + os.sep):
                raise PermissionError(f"{path}: the campaign's filesystem is not mounted here")

    sys.addaudithook(refuse)
    runpy.run_module(module, run_name="__main__", alter_sys=True)
''')

HELPERS = textwrap.dedent('''
    import time
    from ase.calculators.emt import EMT

    class Slow(EMT):
        def __init__(self, seconds=0.0, **kw):
            super().__init__(**kw)
            self.seconds = seconds

        def calculate(self, *args, **kw):
            time.sleep(self.seconds)
            super().calculate(*args, **kw)
''')


def guard(tmp_path, far) -> str:
    """The dispatcher's `python` command: this interpreter, kept out of `far`."""
    path = tmp_path / "guard.py"
    path.write_text(GUARD)
    return f"{sys.executable} {path} {far}"


def copying_dispatcher(tmp_path, python: str, pythonpath=(), poll_interval=1) -> dict:
    """Shell jobs through LocalContext, which stages every job in its own folder under remote_root: copies of
    what it is sent (symlink false), what it brings back moved home."""
    return {"backend": "dpdispatcher", "retries": 0, "retry_wait": 0, "poll_interval": poll_interval,
            "python": python,
            "machine": {"batch_type": "Shell", "context_type": "LocalContext", "local_root": str(tmp_path),
                        "remote_root": str(tmp_path / "remote"), "remote_profile": {"symlink": False}},
            "resources": {"number_node": 1, "cpu_per_node": 1, "gpu_per_node": 0, "queue_name": "",
                          "group_size": 1, "envs": {"PYTHONPATH": ":".join([*map(str, pythonpath), str(REPO)]),
                                                    "OMP_NUM_THREADS": "1"}}}


def test_the_guard_keeps_a_job_out_of_the_campaign(tmp_path):
    far = tmp_path / "camp"
    far.mkdir()
    (far / "x.json").write_text("{}")
    run = subprocess.run(f"{guard(tmp_path, far)} -m json.tool {far / 'x.json'}", shell=True, capture_output=True,
                         text=True)
    assert run.returncode != 0 and "the campaign's filesystem is not mounted here" in run.stderr
    (tmp_path / "y.json").write_text("{}")
    assert subprocess.run(f"{guard(tmp_path, far)} -m json.tool {tmp_path / 'y.json'}", shell=True).returncode == 0


@pytest.mark.slow   # two campaigns of two iterations, one with every stage as Shell jobs: ~1 min
def test_every_stage_without_a_shared_filesystem_gives_the_local_campaign(tmp_path):
    pytest.importorskip("dpdispatcher")
    local = run_one_iteration(tmp_path / "local", iterations=2)
    root = tmp_path / "remote_fs"
    root.mkdir()
    far = root / "camp"   # the campaign's work_dir (campaign_dict)
    remote = run_one_iteration(root, copying_dispatcher(root, guard(root, far)), iterations=2)
    assert_jobs(remote, numeric_ids=True)
    same_campaign(local, remote)   # iteration 1's members start from iteration 0's checkpoints, sent with them
    for it in range(2):
        for k in range(2):   # each member trained and frozen in its job; the campaign keeps what came back
            model = remote.model_path(it, k)
            assert (model.parent / "lcurve.out").is_file()
            assert model.read_bytes() == (far / "dispatch" / f"i{it:03d}-train-m{k}" / "out" / "model.pth").read_bytes()
            np.testing.assert_array_equal(np.loadtxt(model.parent / "lcurve.out"),
                                          np.loadtxt(local.model_path(it, k).parent / "lcurve.out"))
    assert not list((root / "remote").iterdir())   # each submission's remote folder cleaned once fetched


def test_job_states_are_recorded_while_the_jobs_run(tmp_path):
    """A fast and a slow job: the database records the fast one finished while the slow one still runs (states
    recorded while polling, not only at submission and at the end); `elt status` reading it then shows it."""
    pytest.importorskip("dpdispatcher")
    from explore_label_train.dispatch import DPDispatcherPool

    (tmp_path / "remote_helpers.py").write_text(HELPERS)
    state = State(tmp_path / "camp" / "campaign.db", create=True)
    frame = {"symbols": ["Cu"] * 4, "positions": (np.eye(4, 3) * 1.8 + 0.1).tolist(),
             "cell": (np.eye(3) * 3.61).tolist(), "calculator": "remote_helpers:Slow"}
    tasks = [("fast", "label", {**frame, "kwargs": {"seconds": 0}}),
             ("slow", "label", {**frame, "kwargs": {"seconds": 6}})]
    seen = []

    def on_jobs(submission, rows):
        state.record_jobs(0, "label", submission, rows)
        reader = State(state.path)   # another process's view: `elt status`
        seen.append(({r["tasks"]: r["state"] for r in reader.q("SELECT tasks, state FROM jobs")},
                     status_table(reader)))
        reader.close()

    results = {}
    cfg = dict(copying_dispatcher(tmp_path, f"{sys.executable}", [tmp_path], poll_interval=0.5), timeout=60)
    DPDispatcherPool(cfg, tmp_path / "camp").run(tasks, lambda t, ok, v, s: results.__setitem__(t, (ok, v)),
                                                 on_jobs=on_jobs)
    assert results["fast"][0] and results["slow"][0]
    assert results["fast"][1]["energy"] == pytest.approx(results["slow"][1]["energy"])
    states = [jobs for jobs, _ in seen]
    assert states[0] == {'["fast"]': states[0]['["fast"]'], '["slow"]': "running"}
    midway = [k for k, jobs in enumerate(states) if jobs == {'["fast"]': "finished", '["slow"]': "running"}]
    assert midway, states   # recorded by a poll while the slow job ran
    assert "cluster jobs not finished" in seen[midway[0]][1] and " running" in seen[midway[0]][1]
    assert states[-1] == {'["fast"]': "finished", '["slow"]': "finished"}
    assert "cluster jobs not finished" not in seen[-1][1]


@pytest.mark.slow   # two Slurm jobs one after the other: ~20 s
def test_slurm_job_states_go_queued_running_finished_in_the_database(tmp_path, slurm):
    """Two jobs that each take every core of the one node: the second waits in the queue while the first runs;
    the database records each state as Slurm reports it."""
    pytest.importorskip("dpdispatcher")
    from explore_label_train.dispatch import DPDispatcherPool
    from tests.test_slurm import slurm_dispatcher

    (tmp_path / "remote_helpers.py").write_text(HELPERS)
    cores = int(subprocess.run(["sinfo", "-h", "-o", "%c"], capture_output=True, text=True).stdout.split()[0])
    cfg = dict(slurm_dispatcher(tmp_path, pythonpath=[tmp_path]), poll_interval=0.5)
    cfg["resources"]["cpu_per_node"] = cores
    state = State(tmp_path / "camp" / "campaign.db", create=True)
    frame = {"symbols": ["Cu"] * 4, "positions": (np.eye(4, 3) * 1.8 + 0.1).tolist(),
             "cell": (np.eye(3) * 3.61).tolist(), "calculator": "remote_helpers:Slow", "kwargs": {"seconds": 4}}
    history: dict = {}

    def on_jobs(submission, rows):
        state.record_jobs(0, "label", submission, rows)
        reader = State(state.path)   # another process's view: `elt status`
        for r in reader.q("SELECT job_id, state FROM jobs"):
            if history.setdefault(r["job_id"], [])[-1:] != [r["state"]]:
                history[r["job_id"]].append(r["state"])
        reader.close()

    results = {}
    DPDispatcherPool(cfg, tmp_path / "camp").run([("a", "label", frame), ("b", "label", frame)],
                                                 lambda t, ok, v, s: results.__setitem__(t, ok), on_jobs=on_jobs)
    assert results == {"a": True, "b": True}
    assert all(states[-1] == "finished" for states in history.values()), history
    assert ["waiting", "running", "finished"] in history.values(), history   # the job that queued


def test_a_training_job_freezes_its_member_and_one_that_finished_is_only_frozen(tmp_path, cu_data):  # noqa: F811
    """The job makes model.pth (the campaign process only checks it); a job run again after its last checkpoint
    (killed before the campaign recorded it) trains nothing more and freezes the same model."""
    import torch

    from dpmd.data import load_system
    from dpmd.model import load_model
    from dpmd.train.checkpoint import latest_checkpoint

    cfg = training_campaign(tmp_path, cu_data, "job").cfg
    out = tmp_path / "m0"
    job = {"config": training_input(cfg, [str(cu_data)], 4, 0, 0), "init_model": None, "finetune": None,
           "out": str(out), "resume": 4, "threads": 1}
    assert train_member(job)["rmse_f"] > 0
    checkpoint, lcurve = latest_checkpoint(out), (out / "lcurve.out").read_text()
    (out / "model.pth").rename(tmp_path / "first.pth")
    assert train_member(job) == {}
    assert latest_checkpoint(out) == checkpoint and (out / "lcurve.out").read_text() == lcurve
    frame = load_system(cu_data, ["Cu"])
    coord, types, box = (torch.as_tensor(frame.coord[0]), torch.as_tensor(frame.atype),
                         torch.as_tensor(frame.box[0]))
    first, again = (load_model(p)(coord, types, box) for p in (tmp_path / "first.pth", out / "model.pth"))
    assert torch.equal(first["energy"], again["energy"]) and torch.equal(first["force"], again["force"])


def test_a_lammps_stage_runs_as_a_job_without_the_campaign_files(tmp_path, plugin, models):  # noqa: F811
    """engine lammps as a cluster job: the models and the stage's template sent with it, the npz brought back:
    the frames and deviations of the same run in place."""
    pytest.importorskip("dpdispatcher")
    from explore_label_train.dispatch import DPDispatcherPool, job_folder

    far = tmp_path / "camp"
    far.mkdir()
    paths = [str(far / f"m{k}.pth") for k in range(2)]
    for source, path in zip(models[0], paths):
        shutil.copyfile(source, path)
    stage = lammps_stage(far, template=NO_PLUMED.replace("npt temp V_TEMP V_TEMP 0.1 iso V_PRES V_PRES 0.5",
                                                         "nvt temp V_TEMP V_TEMP 0.1"),
                         rev_mat={"V_HEIGHT": 2, "V_TEMP2": 1})
    job = group_job([rattled_fcc(1), rattled_fcc(2)], paths, stage, [300.0, 900.0], [1.0, 1.0], far / "g0.npz")
    explore_group(job)   # in place
    done = {}
    cfg = dict(copying_dispatcher(tmp_path, guard(tmp_path, far)), timeout=None)
    DPDispatcherPool(cfg, far).run([("g0", "explore", cluster_explore_job(0, job))],
                                   lambda t, ok, v, s: done.__setitem__(t, (ok, v)))
    assert done == {"g0": (True, {"stop": None})}
    here, there = np.load(far / "g0.npz"), np.load(job_folder(far, "g0") / "out" / "g0.npz")
    assert sorted(here.files) == sorted(there.files) and len(here["step"]) == 8
    for key in here.files:
        np.testing.assert_array_equal(here[key], there[key])


def stat_file_campaign(tmp_path, data, name, stat, mode, dispatcher=None) -> Campaign:
    """Training only (the data given, no structures), the template reading `stat` in `mode`."""
    cfg = campaign_dict(tmp_path, work_dir=str(tmp_path / name), initial={"data": [str(data)], "structures": []})
    cfg["train"].update(numb_steps=10, dispatcher=dispatcher)
    cfg["train"]["template"]["training"].update(stat_file=str(stat), stat_file_mode=mode)
    return Campaign(load_campaign(write_campaign(tmp_path, cfg, f"{name}.yaml")), log=None)


def test_a_training_job_reads_the_templates_stat_file_sent_with_it(tmp_path, cu_data):  # noqa: F811
    """training.stat_file is sent once for the stage's jobs, and the jobs read it (stat_file_mode read: a job
    without it fails): the members are the local campaign's, which read the same file."""
    import torch

    from dpmd.train.checkpoint import load_checkpoint

    pytest.importorskip("dpdispatcher")
    stat = tmp_path / "stat"
    stat_file_campaign(tmp_path, cu_data, "make", stat, "update")._stage_train(0, time.perf_counter())   # saves them
    assert any(stat.rglob("bias_atom_energy"))
    local = stat_file_campaign(tmp_path, cu_data, "local", stat, "read")
    local._stage_train(0, time.perf_counter())
    far = tmp_path / "remote_fs" / "camp"
    far.parent.mkdir()
    remote = stat_file_campaign(tmp_path / "remote_fs", cu_data, "camp", stat, "read",
                                copying_dispatcher(tmp_path / "remote_fs", guard(tmp_path / "remote_fs", far)))
    remote._stage_train(0, time.perf_counter())
    for k in range(2):
        task = json.loads((far / "dispatch" / f"i000-train-m{k}" / "task.json").read_text())
        assert task["payload"]["config"]["training"]["stat_file"] == "../i000-train-inputs/s1-stat"
        assert task["inputs"]["common"]["i000-train-inputs/s1-stat"] == str(stat)
        here, there = (load_checkpoint(c.root / c.result(f"i000-train-m{k}")["checkpoint"])["model"]
                       for c in (local, remote))
        assert here.keys() == there.keys() and all(torch.equal(here[p], there[p]) for p in here), f"member {k}"


def test_a_cluster_training_job_needs_the_stat_file_to_exist(tmp_path, monkeypatch):
    """A relative stat_file is the one a local member reads (from the working directory); one that does not
    exist is refused in one line naming the key (the job could read nothing, and what it wrote would not come
    back)."""
    (tmp_path / "stats.h5").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    job = {"config": {"training": {"training_data": {"systems": ["/data/a#/g"]}, "stat_file": "stats.h5"}},
           "init_model": None, "finetune": None}
    sent = cluster_train_job(3, job)
    assert sent["config"]["training"]["stat_file"] == "../i003-train-inputs/s1-stats.h5"
    assert sent["config"]["training"]["training_data"]["systems"] == ["../i003-train-inputs/s0-a#/g"]
    assert sent["inputs"]["common"] == {"i003-train-inputs/s0-a": "/data/a",
                                        "i003-train-inputs/s1-stats.h5": str(tmp_path / "stats.h5")}
    job["config"]["training"]["stat_file"] = "missing.h5"
    with pytest.raises(CampaignError, match=r"^train.template's training.stat_file .*/missing.h5: no such") as err:
        cluster_train_job(3, job)
    assert "\n" not in str(err.value)


@pytest.mark.slow   # a campaign iteration whose exploration runs LAMMPS in a Shell job: ~30 s
def test_a_lammps_stage_run_as_jobs_leaves_its_run_folders_where_a_local_run_does(tmp_path, plugin):  # noqa: F811
    """engine lammps with explore[].dispatcher: each trajectory's LAMMPS folder is installed at
    iter.NNN/explore/<task>/t<k>/ (hard links to what the job brought back), as a local run leaves it."""
    pytest.importorskip("dpdispatcher")
    (tmp_path / "in.lammps").write_text(NO_PLUMED.replace("npt temp V_TEMP V_TEMP 0.1 iso V_PRES V_PRES 0.5",
                                                          "nvt temp V_TEMP V_TEMP 0.1"))
    cfg = lammps_campaign_dict(tmp_path, {"engine": "lammps", "lammps": {
        "template": "in.lammps", "rev_mat": {"V_HEIGHT": 2, "V_TEMP2": 1}},
        "dispatcher": dict(copying_dispatcher(tmp_path, guard(tmp_path, tmp_path / "camp")), timeout=None)})
    camp = Campaign(load_campaign(write_campaign(tmp_path, cfg)), log=None)
    assert camp.run() == "max_iterations"
    frames = camp.state.q("SELECT * FROM frames ORDER BY frame_id")
    task = "i000-explore-md-g0"
    for k, temp in enumerate((300.0, 600.0)):
        run, fetched = (base / task / f"t{k}" for base in (camp.root / "iter.000" / "explore",
                                                          camp.root / "dispatch" / task / "out"))
        assert sorted(p.name for p in run.iterdir()) == ["conf.lmp", "input.lammps", "lammps.out", "log.lammps",
                                                          "model_devi.out", "traj"]
        assert f"velocity        all create {temp} " in (run / "input.lammps").read_text()
        assert len(list((run / "traj").glob("*.lammpstrj"))) == 3   # steps 0, 10, 20
        assert os.path.samefile(run / "log.lammps", fetched / "log.lammps")   # installed, not copied
        row = np.loadtxt(run / "model_devi.out")[-1]   # the frames recorded come from these runs
        assert row[0] == 20 and row[4] == pytest.approx(frames[2 + k]["max_devi_f"], rel=1e-6)


@pytest.mark.parametrize("key, value", [("disp_file", "/tmp/lcurve.out"), ("save_ckpt", "../ckpt/model.ckpt")])
def test_a_template_writing_outside_the_members_folder_is_refused(tmp_path, key, value):
    """lcurve.out and the checkpoints are what a member's folder (and a job's out/) brings back: a path that
    leads elsewhere would be shared by the members and missing from what is installed."""
    cfg = campaign_dict(tmp_path)
    cfg["train"]["template"].setdefault("training", {})[key] = value
    with pytest.raises(ConfigError, match=rf"'train.template' training.{key} = '{re.escape(value)}': every member "
                                          r"writes it in its own folder; give a file name, not a path"):
        load_campaign(write_campaign(tmp_path, cfg))
    cfg["train"]["template"]["training"][key] = "mine.out"   # a plain name is each member's own file
    load_campaign(write_campaign(tmp_path, cfg, "second.yaml"))
