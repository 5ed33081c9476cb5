"""Bad inputs and faults for `elt` (issue 16): files no database vouches for, tampered files, corrupt
databases, refused runs, label workers outliving a kill -9, absurd labels, internal errors.

Each case: exit 1 (or a failed task with its reason), one line naming the culprit, no traceback, and
nothing written or half-written (a run refused before it starts writes not even campaign.log)."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from explore_label_train.campaign import Campaign, work_dir_lock
from explore_label_train.cli import main as elt_main
from explore_label_train.config import load_campaign
from explore_label_train.dispatch import process_start
from explore_label_train.state import State
from tests.conftest import REPO
from tests.test_elt import campaign_dict, write_campaign

HELPERS = textwrap.dedent('''
    import os, subprocess
    import numpy as np
    from ase.calculators.emt import EMT

    class Sleepy(EMT):
        """EMT that logs its calls; its k-th call (counted in the log) starts `sleep 300` and waits for it."""
        def __init__(self, log, k, **kw):
            super().__init__(**kw)
            self.log, self.k = log, k
        def calculate(self, atoms=None, properties=("energy",), system_changes=None):
            key = f"{atoms.positions[0, 0]:.12f}"
            with open(self.log, "a+") as fh:
                fh.seek(0)
                n = sum(line.startswith("start") for line in fh) + 1
                fh.write(f"start {n} {os.getpid()} {key}\\n")
            if n == self.k:
                child = subprocess.Popen(["sleep", "300"])
                with open(self.log, "a") as fh:
                    fh.write(f"child {child.pid}\\n")
                child.wait()
            super().calculate(atoms, properties, system_changes or ["positions", "numbers", "cell", "pbc"])
            with open(self.log, "a") as fh:
                fh.write(f"end {key}\\n")

    class Absurd(EMT):
        """EMT whose call number `index` (in this worker) returns one absurd or non-finite value."""
        def __init__(self, kind, index, **kw):
            super().__init__(**kw)
            self.kind, self.index, self.calls = kind, index, 0
        def calculate(self, atoms=None, properties=("energy",), system_changes=None):
            super().calculate(atoms, properties, system_changes or ["positions", "numbers", "cell", "pbc"])
            self.calls += 1
            if self.calls - 1 == self.index:
                if self.kind == "force":
                    self.results["forces"][2, 0] = 1e6
                elif self.kind == "energy":
                    self.results["energy"] += 1e3 * len(atoms)
                elif self.kind == "nan force":
                    self.results["forces"][2, 1] = np.nan
                elif self.kind == "inf energy":
                    self.results["energy"] = np.inf
                self.results["free_energy"] = self.results["energy"]   # the labeller takes the force-consistent one
''')


@pytest.fixture
def helpers(tmp_path, monkeypatch):
    d = tmp_path / "helpers"
    d.mkdir()
    (d / "elt_bad_helpers.py").write_text(HELPERS)
    monkeypatch.syspath_prepend(str(d))   # spawn workers inherit sys.path
    return d


def tiny(tmp_path, **over):
    """A campaign of a few seconds: 2 initial labels, 4-step training, 2 x 2 explored frames, budget 3."""
    base = {"initial": {"perturb": 2}, "train": {"numb_steps": 4, "reuse_numb_steps": 2},
            "convergence": {"max_iterations": 1}}
    for k, v in over.items():
        base[k] = {**base[k], **v} if k in base else v
    cfg = campaign_dict(tmp_path, **base)
    cfg["explore"][0].update(steps=4, traj_interval=2)
    return cfg


class _Stop(Exception):
    pass


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    """A tiny campaign stopped (as by a kill) after its exploration: trained models, exploration and label
    files, data/ and the database that recorded them.  Tests copy it with `copy_campaign`."""
    tmp = tmp_path_factory.mktemp("interrupted")
    camp = Campaign(load_campaign(write_campaign(tmp, tiny(tmp))), log=None)

    def stop(*args):
        raise _Stop()

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Campaign, "_stage_select", stop)
        with pytest.raises(_Stop):
            camp.run()
    camp.state.close()
    return tmp


def copy_campaign(src, tmp_path, **over):
    shutil.copytree(src / "camp", tmp_path / "camp")
    return write_campaign(tmp_path, tiny(tmp_path, **over)), tmp_path / "camp"


def tree_hashes(root) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != "lock"}


def one_line_error(capsys, command: str, progress: bool = False) -> str:
    """The error line on stderr: the only line, or (progress: a run that started) the last, after the log's."""
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert err.endswith("\n") and "Traceback" not in err, err
    assert (len(lines) >= 1 if progress else len(lines) == 1), err
    assert lines[-1].startswith(f"elt {command}: error: ") and err.count(f"elt {command}: ") == 1, err
    return lines[-1]


# ---------------------------------------------------------------- item 3: nothing trusted that was not recorded
def _no_tables(db):
    sqlite3.connect(db).execute("PRAGMA user_version=7").connection.close()


def _other_tables(db):
    with sqlite3.connect(db) as con:
        con.execute("CREATE TABLE notes (x)")
    con.close()


@pytest.mark.parametrize("damage, message", [
    ("deleted", "but no campaign database that recorded them"),
    ("empty file", "but no campaign database that recorded them"),
    ("no tables", "but no campaign database that recorded them"),
    ("other tables", "not a campaign database (no table frames, iterations, labels"),
])
def test_campaign_files_without_their_database_are_refused(interrupted, tmp_path, capsys, damage, message):
    path, root = copy_campaign(interrupted, tmp_path)
    for p in root.glob("campaign.db*"):
        p.unlink()
    if damage == "empty file":
        (root / "campaign.db").write_bytes(b"")
    elif damage == "no tables":
        _no_tables(root / "campaign.db")
    elif damage == "other tables":
        _other_tables(root / "campaign.db")
    before = tree_hashes(root)
    assert elt_main(["run", str(path)]) == 1
    err = one_line_error(capsys, "run")
    assert message in err and str(root) in err and "elt run --move-aside" in err
    assert tree_hashes(root) == before                     # no database made, nothing touched
    assert not (root / "campaign.log").exists()            # a refused run starts no campaign log either


def test_move_aside_keeps_the_old_files_and_the_fresh_run_reuses_none(interrupted, tmp_path, capsys):
    """The issue's case: database deleted, labeller changed EMT -> LJ; the fresh run must relabel and retrain."""
    path, root = copy_campaign(interrupted, tmp_path, labeller={"calculator": "lj"})
    (root / "campaign.db").unlink()
    old = tree_hashes(root)
    assert elt_main(["run", str(path), "--move-aside"]) == 0
    assert "moved the earlier campaign files to" in capsys.readouterr().out
    (aside,) = root.glob("old-*")
    assert tree_hashes(aside) == old                       # everything kept, byte for byte
    new = tree_hashes(root)
    for rel in ("iter.000/train/m0/model.pth", "iter.000/explore/i000-explore-nvt-g0.npz",
                "labels/i000-init-fcc-000.npz"):
        assert new[rel] != old[rel], rel
    st = State(root / "campaign.db")
    assert {r[0] for r in st.q("SELECT DISTINCT labeller FROM labels")} == {"lj"}
    from dpmd.data import load_system

    energies = [r[0] for r in st.q("SELECT energy FROM labels ORDER BY label_id")]
    np.testing.assert_array_equal(load_system(root / "data" / "Cu4").energy, energies)


def test_move_aside_never_moves_the_campaigns_own_inputs(tmp_path, capsys):
    (tmp_path / "camp" / "data" / "mine").mkdir(parents=True)     # initial data inside the work_dir
    path = write_campaign(tmp_path, tiny(tmp_path, initial={"data": ["camp/data/mine"]}))
    before = tree_hashes(tmp_path / "camp")
    assert elt_main(["run", str(path), "--move-aside"]) == 1
    err = one_line_error(capsys, "run")
    assert f"{tmp_path / 'camp' / 'data'}: holds the campaign's input {tmp_path / 'camp/data/mine'}" in err
    assert (tmp_path / "camp" / "data" / "mine").is_dir() and not list((tmp_path / "camp").glob("old-*"))
    assert tree_hashes(tmp_path / "camp") == before


def _overwrite_model(root):
    shutil.copy(root / "iter.000/train/m1/model.pth", root / "iter.000/train/m0/model.pth")


def _shift_frames(root):
    f = root / "iter.000/explore/i000-explore-nvt-g0.npz"
    z = dict(np.load(f))
    z["coord"] = z["coord"] + 0.01
    np.savez(f, **z)


@pytest.mark.parametrize("tamper, culprit, message", [
    (_overwrite_model, "iter.000/train/m0/model.pth", "changed since task i000-train-m0 recorded it"),
    (_shift_frames, "iter.000/explore/i000-explore-nvt-g0.npz", "changed since task i000-explore-nvt-g0"),
    (lambda root: (root / "labels/i000-init-fcc-001.npz").unlink(), "labels/i000-init-fcc-001.npz",
     "missing (task i000-init-fcc-001 recorded it)"),
])
def test_a_tampered_recorded_file_is_detected(interrupted, tmp_path, capsys, tamper, culprit, message):
    path, root = copy_campaign(interrupted, tmp_path)
    tamper(root)
    assert elt_main(["run", str(path)]) == 1
    err = one_line_error(capsys, "run", progress=True)    # found on resuming the stage that recorded it
    assert f"{root / culprit}: {message}" in err and "elt run --move-aside" in err
    assert f"{root / culprit}: {message}" in (root / "campaign.log").read_text()   # the campaign's log has it too


# ---------------------------------------------------------------- item 9: corrupt databases, refused runs
def _garbage_header(data: bytes) -> bytes:
    return b"this is not SQLite" * 6 + data[108:]


def _truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _middle_page(data: bytes) -> bytes:
    """Random bytes over the index leaf page nearest the middle (quick_check reports such a page; a broken
    table page makes it raise instead), whatever the schema's page layout."""
    page = int.from_bytes(data[16:18], "big")
    n = len(data) // page
    mid = page * min((i for i in range(1, n) if data[i * page] == 0x0A), key=lambda i: abs(i - n // 2))
    return data[:mid] + np.random.default_rng(0).bytes(page) + data[mid + page:]


@pytest.fixture(scope="module")
def valid_db(tmp_path_factory):
    """The bytes of a campaign database of ~80 pages (2000 frame rows)."""
    db = tmp_path_factory.mktemp("db") / "campaign.db"
    st = State(db, create=True)
    with st.tx() as con:
        con.executemany("INSERT INTO frames (iteration, task_id, file, idx, class, reason) "
                        "VALUES (0, 't', 'f', ?, 'candidate', ?)", [(i, "x" * 50) for i in range(2000)])
    st.close()
    return db.read_bytes()


@pytest.mark.parametrize("command", ["run", "status", "report"])
@pytest.mark.parametrize("corrupt, detail", [
    (_garbage_header, "file is not a database"),
    (_truncated, "database disk image is malformed"),
    (_middle_page, "corrupt campaign database (quick_check: "),
])
def test_a_corrupt_database_is_one_line_and_left_as_it_is(valid_db, tmp_path, capsys, command, corrupt, detail):
    path = write_campaign(tmp_path, tiny(tmp_path))
    db = tmp_path / "camp" / "campaign.db"
    db.parent.mkdir()
    db.write_bytes(corrupt(valid_db))
    before = db.read_bytes()
    assert elt_main([command, str(path)]) == 1
    err = one_line_error(capsys, command)
    assert f"{db}: " in err and detail in err and "restore it from a backup" in err
    assert db.read_bytes() == before and not (tmp_path / "camp" / "report").exists()


def test_a_refused_second_run_changes_nothing(interrupted, tmp_path, capsys):
    path, root = copy_campaign(interrupted, tmp_path, select={"budget": 5})   # a changed campaign file too
    with work_dir_lock(root):                              # another `elt run` holds the campaign
        before = tree_hashes(root)
        for extra in ([], ["--move-aside"]):
            assert elt_main(["run", str(path), *extra]) == 1
            err = one_line_error(capsys, "run")
            assert f"{root}: another `elt run` (pid {os.getpid()}) is working on this campaign" in err
            assert tree_hashes(root) == before and not list(root.glob("old-*"))
            assert not (root / "campaign.log").exists()


# ---------------------------------------------------------------- item 7: label workers die with `elt run`
def test_kill_9_takes_the_label_workers_along_and_a_resume_labels_each_task_once(tmp_path, helpers):
    log = tmp_path / "calls.log"
    path = write_campaign(tmp_path, tiny(tmp_path, labeller={"calculator": "elt_bad_helpers:Sleepy",
                                                               "kwargs": {"log": str(log), "k": 2}}))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(helpers), str(REPO)]), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "explore_label_train.cli", "run", str(path)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (log.is_file() and "child" in log.read_text()):   # the 2nd label is stuck in its subprocess
        if proc.poll() is not None:
            pytest.fail(proc.stderr.read()[-2000:])
        assert time.monotonic() < deadline
        time.sleep(0.05)
    lines = {line.split()[0]: line.split() for line in log.read_text().splitlines()}   # the last of each kind
    worker, child = int(lines["start"][2]), int(lines["child"][1])
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    deadline = time.monotonic() + 5
    while (process_start(worker) or process_start(child)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert process_start(worker) is None and process_start(child) is None

    # the killed run recorded who held the task; make that holder a live process: a resume kills it first
    camp = Campaign(load_campaign(path), log=None)
    (held,) = camp.state.q("SELECT task_id, pid FROM workers")
    assert held["pid"] == worker and held["task_id"] == "i000-init-fcc-001"
    holder = subprocess.Popen(["sleep", "300"], start_new_session=True)
    with camp.state.tx() as db:
        db.execute("UPDATE workers SET pid=?, started=?", (holder.pid, process_start(holder.pid)))
    assert camp.run() == "max_iterations"
    assert holder.wait(timeout=5) == -signal.SIGKILL
    assert camp.state.one("SELECT COUNT(*) FROM workers") == 0
    ends = [line.split()[1] for line in log.read_text().splitlines() if line.startswith("end")]
    n_labels = camp.state.one("SELECT COUNT(*) FROM labels")
    assert len(ends) == len(set(ends)) == n_labels == camp.state.one(
        "SELECT COUNT(*) FROM tasks WHERE kind='label' AND status='done'") >= 4


# ---------------------------------------------------------------- labeller sanity bounds
@pytest.mark.parametrize("kind, reason", [
    ("force", "label rejected: force 1e+06 eV/Å on atom 2 (Cu), above filters.max_force 1000"),
    ("energy", "eV/atom from the median of this composition's labels"),
    ("nan force", "ValueError: labeller returned force ["),
    ("inf energy", "ValueError: labeller returned energy inf"),
])
def test_absurd_or_non_finite_labels_are_failed_tasks_not_training_data(tmp_path, helpers, kind, reason):
    cfg = tiny(tmp_path, initial={"perturb": 4},
               labeller={"calculator": "elt_bad_helpers:Absurd", "kwargs": {"kind": kind, "index": 2}})
    camp = Campaign(load_campaign(write_campaign(tmp_path, cfg)), log=None)
    camp._stage_init(0, 0.0)                               # label the four initial frames (one worker, in order)
    tasks = camp.state.q("SELECT task_id, status, reason FROM tasks ORDER BY task_id")
    assert [r["status"] for r in tasks] == ["done", "done", "failed", "done"]
    assert reason in tasks[2]["reason"] and "\n" not in tasks[2]["reason"]
    if kind == "nan force":
        assert "nan" in tasks[2]["reason"] and "on atom 2 (Cu)" in tasks[2]["reason"]
    from dpmd.data import load_system

    data = load_system(camp.root / "data" / "Cu4")
    assert data.nframes == 3 and np.abs(data.force).max() < 100 and np.ptp(data.energy) < 10
    assert not (camp.root / "labels" / "i000-init-fcc-002.npz").exists()


@pytest.mark.parametrize("key, value, message", [
    ("max_force", 0, "'filters.max_force' must be positive"),
    ("max_energy_deviation", "big", "'filters.max_energy_deviation'"),
])
def test_bad_sanity_bounds_are_config_errors(tmp_path, capsys, key, value, message):
    path = write_campaign(tmp_path, tiny(tmp_path, filters={key: value}))
    assert elt_main(["run", str(path)]) == 1
    assert message in one_line_error(capsys, "run") and not (tmp_path / "camp").exists()


# ---------------------------------------------------------------- exploration stages: dpmd md's validator
@pytest.mark.parametrize("change", [
    {"timestep": 0}, {"seed": -1}, {"seed": 1.5}, {"min_distance": -0.1}, {"ensemble": "nph"},
    {"thermostat": "berendsen"}, {"thermostat": {"type": "langevin", "chain": 3}},
    {"thermostat": {"langevin": {"damp": -1}}}, {"ensemble": "nve", "thermostat": "csvr"},
    {"barostat": {"damp": 1.0}}, {"ensemble": "npt", "barostat": {"mode": "xyz"}},
])
def test_a_bad_stage_md_setting_is_dpmd_mds_error_naming_the_stage(tmp_path, capsys, change):
    from dpmd.errors import ConfigError
    from dpmd.md.config import normalize_md_config

    with pytest.raises(ConfigError) as md_err:
        normalize_md_config({"structure": "x.xyz", "models": ["m.pth"], "steps": 4, "ensemble": "nvt", **change,
                             **({"pressure": 1.0} if change.get("ensemble") == "npt" else {})})
    md = str(md_err.value)
    key = md.removeprefix("unknown key ").lstrip("'")        # md's error names the key first
    cfg = tiny(tmp_path)
    cfg["explore"][0].update(change)
    path = write_campaign(tmp_path, cfg)
    assert elt_main(["run", str(path)]) == 1
    err = one_line_error(capsys, "run")
    assert f"{path}: {md[:len(md) - len(key)]}explore[0].{key}" in err and not (tmp_path / "camp").exists()


@pytest.mark.parametrize("ensemble, given, thermostat, barostat", [
    ("nvt", {}, {"type": "langevin", "damp": 0.1}, None),
    ("nvt", {"thermostat": "csvr"}, {"type": "csvr", "damp": 0.1}, None),
    ("nvt", {"thermostat": {"nose_hoover": {"damp": 0.2}}}, {"type": "nose_hoover", "damp": 0.2, "chain": 3}, None),
    ("nve", {}, None, None),
    ("npt", {"barostat": {"mode": "tri"}}, {"type": "langevin", "damp": 0.1},
     {"type": "scr", "damp": 1.0, "mode": "tri", "compressibility": 4.5e-5}),
])
def test_stages_take_dpmd_mds_forms_and_defaults(tmp_path, ensemble, given, thermostat, barostat):
    cfg = tiny(tmp_path)
    cfg["explore"][0].update(ensemble=ensemble, **given)
    stage = load_campaign(write_campaign(tmp_path, cfg))["explore"][0]
    assert (stage["thermostat"], stage["barostat"]) == (thermostat, barostat)
    assert stage["timestep"] == 2.0 and stage["seed"] == 1   # the stage's own timestep; the campaign's defaults


# ---------------------------------------------------------------- dispatch results, unexpected errors
@pytest.mark.parametrize("content, reason", [
    (b"\x80\x04\x95 a pickle, never loaded", "unreadable result"),
    (b'{"task_id": "t", "value": 1}', "unreadable result (KeyError: 'ok')"),
])
def test_an_unreadable_job_result_is_a_failed_task(tmp_path, content, reason):
    pytest.importorskip("dpdispatcher")
    from explore_label_train.dispatch import DPDispatcherPool

    pool = DPDispatcherPool({"backend": "dpdispatcher", "machine": {}, "resources": {}}, tmp_path)
    (pool.root / "t").mkdir(parents=True)
    (pool.root / "t" / "result.json").write_bytes(content)
    done = []
    pool._report([("t", "label", {})], lambda *a: done.append(a[:3]), time.monotonic(), set())
    assert done[0][:2] == ("t", False) and reason in done[0][2] and "result.json" in done[0][2]


@pytest.mark.parametrize("error, expected", [
    (RuntimeError("boom\nmore"), "elt status: internal error: RuntimeError: boom (set DPMD_DEBUG=1 for the traceback)"),
    (sqlite3.DatabaseError("disk I/O error"), "disk I/O error; restore it from a backup"),
])
def test_unexpected_errors_are_one_line(valid_db, tmp_path, capsys, monkeypatch, error, expected):
    (tmp_path / "campaign.db").write_bytes(valid_db)

    def fail(state):
        raise error

    monkeypatch.setattr("explore_label_train.report.status_table", fail)
    assert elt_main(["status", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert expected in err and err.count("\n") == 1 and "Traceback" not in err
    if isinstance(error, sqlite3.DatabaseError):
        assert err.startswith(f"elt status: error: {tmp_path / 'campaign.db'}: ")
