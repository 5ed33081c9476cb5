"""Cluster jobs without a shared filesystem: every stage through dpdispatcher's LocalContext copying into a
separate remote_root (no symlinks), each job run by a `python` command that refuses to open anything in the
campaign's work_dir, gives the local campaign; job states are recorded while the jobs run, as the scheduler
reports them, and another reader of the database sees them."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from explore_label_train.campaign import cluster_explore_job, explore_group, train_member
from explore_label_train.config import training_input
from explore_label_train.report import status_table
from explore_label_train.state import State
from tests.conftest import REPO
from tests.test_elt_dispatch_stages import assert_jobs, run_one_iteration, same_campaign
# (cu_data, models and plugin are fixtures)
from tests.test_elt_lammps import NO_PLUMED, group_job, lammps_stage, models, plugin, rattled_fcc  # noqa: F401
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
