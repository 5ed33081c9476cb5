"""The thread policy (dpmd.runtime): usable cores, threads by work size, the OpenMP wait policy of the entry
points; elt's ensemble trained in concurrent worker processes: the same weights as one after another, one-line
failures, no worker outliving a killed campaign."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from dpmd import runtime
from dpmd.errors import ConfigError
from explore_label_train.campaign import Campaign, CampaignError, train_members, training_layout
from explore_label_train.config import load_campaign
from explore_label_train.dispatch import process_start
from tests.conftest import REPO
from tests.test_elt import campaign_dict, write_campaign

CLEAN_ENV = {k: v for k, v in os.environ.items() if k not in runtime.WAIT_VARIABLES}


# ---------------------------------------------------------------- usable cores
def cgroup(tmp_path, files: dict, self_cgroup="0::/\n"):
    tmp_path.mkdir()
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    (tmp_path / "self").write_text(self_cgroup)
    return runtime.cgroup_cpus(tmp_path, tmp_path / "self")


def test_cgroup_quota_v2_v1_and_unlimited(tmp_path):
    assert cgroup(tmp_path / "a", {"cpu.max": "150000 100000\n"}) == 2          # 1.5 cores: 2 threads
    assert cgroup(tmp_path / "b", {"cpu.max": "max 100000\n"}) is None
    assert cgroup(tmp_path / "c", {"cpu/cpu.cfs_quota_us": "100000\n", "cpu/cpu.cfs_period_us": "100000\n"},
                  "4:cpu,cpuacct:/\n") == 1
    assert cgroup(tmp_path / "d", {"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}) is None
    # the process's own cgroup below the mount, and the smallest quota on its path
    assert cgroup(tmp_path / "e", {"cpu.max": "800000 100000\n", "job/cpu.max": "300000 100000\n",
                                   "job/step/cpu.max": "max 100000\n"}, "0::/job/step\n") == 3
    assert cgroup(tmp_path / "f", {}) is None


def test_usable_cores_takes_the_smallest_limit(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    monkeypatch.setattr(runtime, "cgroup_cpus", lambda: None)
    assert runtime.usable_cores({}) == 8
    assert runtime.usable_cores({"SLURM_CPUS_PER_TASK": "3"}) == 3
    assert runtime.usable_cores({"OMP_NUM_THREADS": "2"}) == 2
    assert runtime.usable_cores({"OMP_NUM_THREADS": "", "SLURM_CPUS_PER_TASK": "x"}) == 8   # unset or unreadable
    monkeypatch.setattr(runtime, "cgroup_cpus", lambda: 4)
    assert runtime.usable_cores({"SLURM_CPUS_PER_TASK": "6"}) == 4
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {5})
    assert runtime.usable_cores({}) == 1


def test_mpi_ranks_share_the_cores_unless_bound(monkeypatch):
    monkeypatch.setattr(runtime, "cgroup_cpus", lambda: None)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    assert runtime.usable_cores({"OMPI_COMM_WORLD_LOCAL_SIZE": "4"}) == 2
    assert runtime.usable_cores({"MPI_LOCALNRANKS": "16"}) == 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2})   # mpiexec bound this rank to 3 cores
    assert runtime.usable_cores({"OMPI_COMM_WORLD_LOCAL_SIZE": "2"}) == 3


# ---------------------------------------------------------------- threads chosen
def test_threads_by_work_size_and_the_explicit_count_wins():
    per = runtime.ATOMS_PER_THREAD
    assert runtime.choose_threads(None, 192, cores=8) == 1             # 192 atoms: one thread
    assert runtime.choose_threads(None, 12 * 4 * 4, cores=8) == 1      # the demo's exploration batch
    assert runtime.choose_threads(None, 3 * per, cores=8) == 3
    assert runtime.choose_threads(None, 100 * per, cores=8) == 8       # never more than the usable cores
    assert runtime.choose_threads(None, None, cores=6) == 6            # size unknown: the usable cores
    assert runtime.choose_threads(5, 192, cores=2) == 5                # --threads wins
    before = torch.get_num_threads()
    try:
        assert runtime.configure_threads(None, work=192) == 1 and torch.get_num_threads() == 1
        assert runtime.configure_threads(3, work=192) == 3 and torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


def test_work_of_a_training_input():
    from dpmd.train.config import read_input

    config = read_input(REPO / "configs" / "water_se_e2_a.yaml",
                        [f"training.training_data.systems=[{REPO / 'examples/water/data_0'}]"])
    assert runtime.training_work(config) == 192                         # batch auto (32 atoms) x 192 atoms
    config["training"]["training_data"]["batch_size"] = 4
    assert runtime.training_work(config) == 4 * 192
    assert runtime.choose_threads(None, runtime.training_work(config), cores=2) == 1


def test_thread_arguments_and_the_campaign_key(tmp_path):
    import argparse

    assert runtime.thread_count("3") == 3
    for bad in ("0", "-1", "two"):
        with pytest.raises(argparse.ArgumentTypeError):
            runtime.thread_count(bad)
    cfg = campaign_dict(tmp_path, threads=0)
    with pytest.raises(ConfigError, match="'threads'"):
        load_campaign(write_campaign(tmp_path, cfg))
    assert load_campaign(write_campaign(tmp_path, campaign_dict(tmp_path)))["threads"] is None



def test_every_dpmd_command_takes_threads(tmp_path, capsys, monkeypatch):
    """--threads N on every command (as -v/-l); a command sets torch's threads to N, train/md/demo by their work."""
    import torch

    from dpmd.cli import build_parser, main
    from tests.conftest import EXAMPLE, REPO

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    for name, parser in sub.choices.items():
        assert any("--threads" in a.option_strings for a in parser._actions), name
    asked = []
    monkeypatch.setattr(torch, "set_num_threads", asked.append)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 0)
    model = REPO / "examples" / "water" / "model_small.pth"
    assert main(["test", "-m", model, "-s", EXAMPLE, "-n", "1", "--threads", "3"]) == 0
    assert asked == [3]
    with pytest.raises(SystemExit):   # argparse's usage error, exit status 2
        main(["show", model, "--threads", "0"])
    assert "expected a positive number of threads" in capsys.readouterr().err

# ---------------------------------------------------------------- the wait policy of the entry points
CHILD = """
import os, sys
from {module} import main
try:
    main({argv!r})
except SystemExit:
    pass
print("POLICY", os.environ.get("OMP_WAIT_POLICY"), os.environ.get("KMP_BLOCKTIME"))
"""


@pytest.mark.parametrize("module, argv", [("explore_label_train.cli", ["status", "/nonexistent"]),
                                          ("dpmd.cli", ["neighbor-stat", "-s", "/nonexistent"])])
@pytest.mark.parametrize("user", [None, "ACTIVE"])
def test_entry_points_make_openmp_threads_sleep_unless_the_user_chose(module, argv, user):
    env = dict(CLEAN_ENV, PYTHONPATH=str(REPO), **({"OMP_WAIT_POLICY": user} if user else {}))
    proc = subprocess.run([sys.executable, "-c", CHILD.format(module=module, argv=argv)], env=env,
                          capture_output=True, text=True, timeout=120)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("POLICY")]
    assert line == (["POLICY PASSIVE 0"] if user is None else [f"POLICY {user} None"]), proc.stderr[-2000:]


def test_quiet_openmp_leaves_a_user_policy_alone():
    env = {"GOMP_SPINCOUNT": "1000"}
    assert not runtime.quiet_openmp(env) and env == {"GOMP_SPINCOUNT": "1000"}
    env = {}
    assert runtime.quiet_openmp(env) and env == {"OMP_WAIT_POLICY": "PASSIVE", "KMP_BLOCKTIME": "0"}


def test_a_tblite_label_does_not_depend_on_the_frames_labelled_before():
    pytest.importorskip("tblite")
    from explore_label_train.campaign import molecular_cluster
    from explore_label_train.labelers import label

    atoms = molecular_cluster("H2O", 4, 3.0, 0)
    rng = np.random.default_rng(0)
    frames = [{"symbols": atoms.get_chemical_symbols(), "cell": None, "calculator": "tblite", "kwargs": {},
               "positions": (atoms.positions + rng.normal(0, 0.03, atoms.positions.shape)).tolist()} for _ in range(2)]
    alone = label(frames[1])
    label(frames[0])
    after = label(frames[1])
    assert alone["energy"] == after["energy"] and np.array_equal(alone["forces"], after["forces"])


# ---------------------------------------------------------------- elt: the ensemble in worker processes
@pytest.fixture
def cu_data(tmp_path):
    """Six EMT-labelled frames of 4 Cu atoms (a deepmd/npy system)."""
    from ase.build import bulk
    from ase.calculators.emt import EMT

    from dpmd.data import System, write_system

    rng = np.random.default_rng(0)
    frames = []
    for _ in range(6):
        atoms = bulk("Cu", "fcc", a=3.61, cubic=True)
        atoms.positions += rng.normal(0, 0.05, atoms.positions.shape)
        atoms.calc = EMT()
        frames.append((atoms.positions.copy(), atoms.cell[:].copy(), atoms.get_potential_energy(),
                       atoms.get_forces()))
    system = System(path=str(tmp_path / "cu"), type_map=["Cu"], atype=np.zeros(4, dtype=np.int64),
                    coord=np.stack([f[0] for f in frames]), box=np.stack([f[1] for f in frames]),
                    energy=np.array([f[2] for f in frames]), force=np.stack([f[3] for f in frames]))
    write_system(system, tmp_path / "cu")
    return tmp_path / "cu"


def training_campaign(tmp_path, data, name, log=None, **over):
    cfg = campaign_dict(tmp_path, work_dir=str(tmp_path / name), initial={"data": [str(data)], "structures": []},
                        **over)
    cfg["train"].update(ensemble_size=3, numb_steps=30)
    return Campaign(load_campaign(write_campaign(tmp_path, cfg, f"{name}.yaml")), log=log)


def test_ensemble_trained_concurrently_equals_one_after_another(tmp_path, cu_data):
    from dpmd.train.checkpoint import load_checkpoint

    weights, results, lines = {}, {}, []
    for name, threads in (("sequential", 1), ("concurrent", 2)):
        assert training_layout(3, 4, threads) == (threads, 1)   # 4 atoms: one thread, as many at once as cores
        camp = training_campaign(tmp_path, cu_data, name, log=lines.append, threads=threads)
        camp._stage_train(0, time.perf_counter())
        results[name] = [camp.result(f"i000-train-m{k}") for k in range(3)]
        weights[name] = [load_checkpoint(camp.root / r["checkpoint"])["model"] for r in results[name]]
    assert any("training 3 members, 2 at a time (1 thread each)" in line for line in lines)
    for k in range(3):
        seq, con = weights["sequential"][k], weights["concurrent"][k]
        assert seq.keys() == con.keys() and all(torch.equal(seq[p], con[p]) for p in seq), f"member {k} differs"
        assert results["sequential"][k]["rmse_f"] == results["concurrent"][k]["rmse_f"]
    m0, m1 = weights["concurrent"][:2]
    assert not all(torch.equal(m0[p], m1[p]) for p in m0)   # the members' own seeds


def test_a_failing_member_is_one_line_naming_it(tmp_path, cu_data, monkeypatch):
    import copy

    from explore_label_train import campaign as campaign_module

    def member_1_without_data(jobs, *args):
        jobs = copy.deepcopy(jobs)
        jobs["i000-train-m1"]["config"]["training"]["training_data"]["systems"] = [str(tmp_path / "missing")]
        return train_members(jobs, *args)

    monkeypatch.setattr(campaign_module, "train_members", member_1_without_data)
    camp = training_campaign(tmp_path, cu_data, "failing", threads=2)
    with pytest.raises(CampaignError) as err:
        camp._stage_train(0, time.perf_counter())
    message = str(err.value)
    assert message.startswith("training failed: m1 (i000-train-m1): ") and "missing" in message
    assert "\n" not in message
    # the others were recorded; the failed member stays pending, to be trained by the next run
    assert [camp.state.task_status(f"i000-train-m{k}") for k in range(3)] == ["done", "pending", "done"]


def test_killed_campaign_leaves_no_training_worker(tmp_path, cu_data):
    cfg = campaign_dict(tmp_path, work_dir=str(tmp_path / "killed"), threads=2,
                        initial={"data": [str(cu_data)], "structures": []})
    cfg["train"].update(ensemble_size=3, numb_steps=100000)   # still training when it is killed
    path = write_campaign(tmp_path, cfg)
    proc = subprocess.Popen([sys.executable, "-m", "explore_label_train.cli", "run", str(path)],
                            env=dict(CLEAN_ENV, PYTHONPATH=str(REPO)), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    workers = []
    deadline = time.monotonic() + 180
    try:
        while len(workers) < 2 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
            try:
                with sqlite3.connect(tmp_path / "killed" / "campaign.db") as con:
                    workers = con.execute("SELECT pid, started FROM workers WHERE task_id LIKE '%-train-%'").fetchall()
            except sqlite3.Error:   # not created yet
                workers = []
        assert len(workers) == 2, proc.stderr.read() if proc.poll() is not None else "no training workers started"
        assert all(process_start(pid) == started for pid, started in workers)
    finally:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 30   # the workers' watchdogs see the lifeline close and kill their groups
    while any(process_start(pid) == started for pid, started in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(process_start(pid) == started for pid, started in workers), "a training worker outlived elt"
