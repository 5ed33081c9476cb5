"""The campaign's state: ONE SQLite database (WAL mode), written only by the campaign process.

Every change that marks work finished is one transaction together with its results (a label row
and its task's `done`; an exploration's frames, its incident and its task's `done`; a selection's
choices, the label tasks it creates and the stage's `done`; the labels a labelling stage holds out, all
at once), so a kill -9 at any moment leaves either all of it or none of it.  Files a task writes are
named by the task id and written atomically before that transaction, so redoing an unfinished task
overwrites, never duplicates.  A done task records the sha256 of each file it produced (result "files");
readers check the file against it before use.  Cluster jobs (table jobs) are recorded as dpdispatcher last
saw them (when submitted or found, at each change of state a poll finds, at the end), for `elt status` in
another process; re-attaching to them after a kill is dpdispatcher's (dispatch.DPDispatcherPool).

Opening checks the database before anything reads or writes it (SQLite's quick_check, the campaign's
tables); a corrupt or foreign file is a one-line StateError naming it.
"""

from __future__ import annotations

import json
import sqlite3
import time
from contextlib import contextmanager
from pathlib import Path

from dpmd.errors import DpmdError

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS iterations (
    iteration INTEGER PRIMARY KEY, status TEXT NOT NULL,          -- running | done
    started REAL, finished REAL,
    n_frames INTEGER, accurate REAL, candidate REAL, failed REAL,  -- fractions of explored frames
    n_filtered INTEGER, n_selected INTEGER, n_labels INTEGER,      -- labels committed in this iteration
    total_labels INTEGER, val_rmse_e REAL, val_rmse_f REAL,        -- this iteration's model 0 on its new labels
    decision TEXT);                                                -- continue | converged | max_iterations | ...
CREATE TABLE IF NOT EXISTS stages (
    iteration INTEGER NOT NULL, stage TEXT NOT NULL, status TEXT NOT NULL,   -- running | done
    started REAL, finished REAL, seconds REAL, note TEXT,
    PRIMARY KEY (iteration, stage));
CREATE TABLE IF NOT EXISTS tasks (
    task_id TEXT PRIMARY KEY, iteration INTEGER NOT NULL,
    kind TEXT NOT NULL,                     -- train | explore | label
    status TEXT NOT NULL,                   -- pending | done | failed
    attempts INTEGER NOT NULL DEFAULT 0, reason TEXT,
    payload TEXT, result TEXT, created REAL, finished REAL, seconds REAL);
CREATE INDEX IF NOT EXISTS tasks_by_iter ON tasks (iteration, kind, status);
CREATE TABLE IF NOT EXISTS frames (
    frame_id INTEGER PRIMARY KEY, iteration INTEGER NOT NULL,
    task_id TEXT NOT NULL, file TEXT NOT NULL, idx INTEGER NOT NULL,   -- row idx of the npz written by task_id
    stage TEXT, traj INTEGER, structure TEXT, temperature REAL, pressure REAL, step INTEGER,
    max_devi_f REAL, avg_devi_f REAL, max_devi_v REAL, devi_e REAL,
    class TEXT NOT NULL,                    -- accurate | candidate | failed
    filter TEXT,                            -- why a candidate is unphysical (NULL: passed)
    selected INTEGER NOT NULL DEFAULT 0, reason TEXT,
    UNIQUE (task_id, idx));
CREATE INDEX IF NOT EXISTS frames_by_iter ON frames (iteration, class);
CREATE TABLE IF NOT EXISTS labels (
    label_id INTEGER PRIMARY KEY, task_id TEXT NOT NULL UNIQUE REFERENCES tasks (task_id),
    iteration INTEGER NOT NULL, frame_id INTEGER UNIQUE REFERENCES frames (frame_id),  -- NULL: initial structure
    source TEXT NOT NULL,                   -- exploration task id, or initial:<structure>
    source_traj INTEGER, source_step INTEGER,
    labeller TEXT NOT NULL, settings_hash TEXT NOT NULL,
    system TEXT NOT NULL, natoms INTEGER NOT NULL, energy REAL NOT NULL, file TEXT NOT NULL, created REAL);
CREATE TABLE IF NOT EXISTS workers (        -- the worker process holding a label task right now
    task_id TEXT PRIMARY KEY, pid INTEGER NOT NULL, started TEXT);    -- started: the kernel's start time of pid
CREATE TABLE IF NOT EXISTS holdout (        -- labels no model trains on: the test set (test_data/<system>)
    label_id INTEGER PRIMARY KEY REFERENCES labels (label_id), iteration INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS incidents (      -- exploration runs that stopped early, with dpmd's one-line message
    incident_id INTEGER PRIMARY KEY, task_id TEXT NOT NULL REFERENCES tasks (task_id), iteration INTEGER NOT NULL,
    stage TEXT NOT NULL, step INTEGER,      -- the MD step the run stopped at
    traj INTEGER, structure TEXT, temperature REAL, pressure REAL,   -- the system the message names (NULL: none)
    message TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (           -- cluster jobs (dpdispatcher) of a stage, as last seen
    job_hash TEXT PRIMARY KEY, submission TEXT NOT NULL,   -- dpdispatcher's hashes: a resumed run re-attaches
    iteration INTEGER NOT NULL, kind TEXT NOT NULL,        -- train | explore | label
    job_id TEXT, state TEXT NOT NULL,       -- the scheduler's job id, and waiting | running | finished | ...
    tasks TEXT NOT NULL, updated REAL);     -- JSON list of the task ids the job runs
"""
TABLES = {"meta", "iterations", "stages", "tasks", "frames", "labels"}   # what makes a file a campaign database
ADDED = {"workers", "holdout", "incidents", "jobs"}                       # tables later versions added
RESTORE = "restore it from a backup, or move the work_dir aside with `elt run --move-aside`"


class StateError(DpmdError):
    """The campaign database is corrupt, missing or not a campaign database."""


class NoCampaignError(StateError):
    """No campaign database at the path, or one without any table (a fresh or emptied file)."""


class State:
    """create=True (elt run): a missing or table-less database gets the schema; False (status, report): it is
    a NoCampaignError.  Either way nothing is written to a database that is corrupt or not a campaign's."""

    def __init__(self, path, create: bool = False):
        self.path = Path(path)
        if not create and not self.path.is_file():
            raise NoCampaignError(f"{self.path}: no campaign database")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(str(self.path), isolation_level=None, timeout=60)
        self.db.row_factory = sqlite3.Row
        try:
            self._check_and_create(create)
        except BaseException:
            self.db.close()
            raise

    def _check_and_create(self, create: bool) -> None:
        try:
            check = [r[0] for r in self.q("PRAGMA quick_check")]
            if check != ["ok"]:
                problems = [x for r in check for x in r.splitlines() if x and not x.startswith("***")] or ["?"]
                more = f" and {len(problems) - 1} more" if len(problems) > 1 else ""
                raise StateError(f"{self.path}: corrupt campaign database (quick_check: {problems[0]}{more}); "
                                 f"{RESTORE}")
            tables = {r[0] for r in self.q("SELECT name FROM sqlite_master WHERE type='table'")}
            if not tables:
                if not create:
                    raise NoCampaignError(f"{self.path}: empty campaign database (no tables)")
                self.db.execute("PRAGMA journal_mode=WAL")
            elif not TABLES <= tables:
                raise StateError(f"{self.path}: not a campaign database (no table "
                                 f"{', '.join(sorted(TABLES - tables))}); {RESTORE}")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.execute("PRAGMA foreign_keys=ON")
            if create and (TABLES | ADDED) - tables:
                with self.tx() as db:   # the schema and its creation time together: no half-made database
                    for statement in SCHEMA.split(";"):
                        if statement.strip():
                            db.execute(statement)
                    if not tables:
                        self.set_meta("created", time.time(), db)
        except sqlite3.DatabaseError as err:
            raise StateError(f"{self.path}: unreadable campaign database ({err}); {RESTORE}") from None

    def close(self):
        self.db.close()

    @contextmanager
    def tx(self):
        """One transaction: everything inside commits together or not at all."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def has_table(self, name: str) -> bool:
        """False for a table a later version added, in a database opened read-only (status, report)."""
        return self.one("SELECT 1 FROM sqlite_master WHERE type='table' AND name=?", name) is not None

    def q(self, sql, *args) -> list[sqlite3.Row]:
        return self.db.execute(sql, args).fetchall()

    def one(self, sql, *args):
        row = self.db.execute(sql, args).fetchone()
        return None if row is None else row[0]

    # meta
    def get_meta(self, key, default=None):
        v = self.one("SELECT value FROM meta WHERE key=?", key)
        return default if v is None else json.loads(v)

    def set_meta(self, key, value, db=None):
        (db or self.db).execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, json.dumps(value)))

    # stages
    def stage_done(self, iteration: int, stage: str) -> bool:
        return self.one("SELECT status FROM stages WHERE iteration=? AND stage=?", iteration, stage) == "done"

    def stage_start(self, iteration: int, stage: str) -> None:
        with self.tx() as db:
            db.execute("INSERT INTO stages (iteration, stage, status, started, seconds) VALUES (?, ?, 'running', ?, 0) "
                       "ON CONFLICT (iteration, stage) DO UPDATE SET status='running'",
                       (iteration, stage, time.time()))

    def stage_finish(self, iteration: int, stage: str, seconds: float, note: str | None = None, db=None) -> None:
        """Mark a stage done; `seconds` adds to the time already spent on it (resumed stages)."""
        (db or self.db).execute("UPDATE stages SET status='done', finished=?, seconds=seconds+?, note=? "
                                "WHERE iteration=? AND stage=?", (time.time(), seconds, note, iteration, stage))

    def add_stage_time(self, iteration: int, stage: str, seconds: float) -> None:
        self.db.execute("UPDATE stages SET seconds=seconds+? WHERE iteration=? AND stage=?", (seconds, iteration, stage))

    # tasks
    def task_status(self, task_id: str):
        return self.one("SELECT status FROM tasks WHERE task_id=?", task_id)

    def add_task(self, db, task_id, iteration, kind, payload=None) -> None:
        db.execute("INSERT OR IGNORE INTO tasks (task_id, iteration, kind, status, payload, created) "
                   "VALUES (?, ?, ?, 'pending', ?, ?)",
                   (task_id, iteration, kind, None if payload is None else json.dumps(payload), time.time()))

    def task_done(self, db, task_id, result=None, seconds=None) -> None:
        db.execute("UPDATE tasks SET status='done', reason=NULL, result=?, finished=?, seconds=?, attempts=attempts+1 "
                   "WHERE task_id=?", (None if result is None else json.dumps(result), time.time(), seconds, task_id))
        db.execute("DELETE FROM workers WHERE task_id=?", (task_id,))

    def task_failed(self, task_id, reason, seconds=None) -> None:
        with self.tx() as db:
            db.execute("UPDATE tasks SET status='failed', reason=?, finished=?, seconds=?, attempts=attempts+1 "
                       "WHERE task_id=?", (str(reason)[:2000], time.time(), seconds, task_id))
            db.execute("DELETE FROM workers WHERE task_id=?", (task_id,))

    def ensure_task(self, task_id, iteration, kind, payload=None) -> None:
        with self.tx() as db:
            self.add_task(db, task_id, iteration, kind, payload)

    # cluster jobs
    def record_jobs(self, iteration: int, kind: str, submission: str, jobs: list[dict]) -> None:
        """The jobs of one dpdispatcher submission as it last saw them (dispatch._job_rows)."""
        with self.tx() as db:
            for j in jobs:
                db.execute("INSERT OR REPLACE INTO jobs (job_hash, submission, iteration, kind, job_id, state, tasks, "
                           "updated) VALUES (?,?,?,?,?,?,?,?)", (j["job_hash"], submission, iteration, kind,
                                                                 j["job_id"], j["state"], json.dumps(j["tasks"]),
                                                                 time.time()))

    def jobs_in_flight(self) -> list[sqlite3.Row]:
        """Cluster jobs last seen neither finished nor failed (queued, running, or those a killed run left)."""
        if not self.has_table("jobs"):
            return []
        return self.q("SELECT * FROM jobs WHERE state NOT IN ('finished', 'failed') ORDER BY iteration, kind, job_id")
