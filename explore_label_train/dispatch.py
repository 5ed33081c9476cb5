"""Dispatchers: run tasks (label computations; ensemble members' training) in worker processes, with a time
limit per task.

`LocalPool(workers, timeout)` (timeout None: no limit) keeps `workers` persistent worker processes (spawn by
default: no SQLite handle, lock or thread crosses a fork).  `pool.run(tasks, on_done)` hands each task
(task_id, function name, payload) to an idle worker and calls `on_done(task_id, ok, value, seconds)`
in the calling process as each one finishes, so the caller can commit it at once.  An exception in
the task (SystemExit included), a worker that dies (os._exit, a signal, out of memory) and a task
over its time limit (the worker is killed and replaced) all give ok=False with the reason.
`on_start(task_id, pid)`, if given, is called as a worker takes a task.

Workers die with the campaign process: each runs in its own process group (a timeout kills the
labeller and anything it started) with a watchdog thread that kills that group as soon as the
parent is gone, kill -9 included.  `stop_worker` ends a worker an earlier, killed `elt run` left
behind (named by pid and start time, so a reused pid is never hit).

`DPDispatcherPool` submits the same tasks through dpdispatcher (only if `import dpdispatcher` works), as
Python jobs (`dispatcher.python -m explore_label_train.dispatch task.json`) or, for a DFT labeller, the code's own
command line in the task folder (SHELL_TASKS); a resumed campaign re-attaches to the jobs a killed one left
(same tasks, same submission: dpdispatcher finds its record of them).  A submission that fails
(sbatch refused, squeue or the SSH link down: the transient scheduler errors that kill long DP-GEN runs) is
retried `retries` times after waiting `retry_wait` seconds, doubled each time; tasks that already brought a
result back are not submitted again.  A Python job enforces the task time limit itself, so a labeller over
its limit is a failed task, not a failed job (a DFT job has the scheduler's limit).  Python jobs read
task.json and write result.json (plain JSON: nothing coming back from a cluster is unpickled).

No job needs the campaign's filesystem: what a job reads is sent with it (dpdispatcher's forward_files and
forward_common_files, a Python task's INPUTS) and what it writes comes back (backward_files: a Python job's
result.json and its out/ folder).  While jobs run, their states are polled and reported as the scheduler
gives them (waiting, running, finished), so `elt status` in another process sees them change.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import shutil
import signal
import sys
import threading
import time
import traceback
from collections import deque
from multiprocessing.connection import wait
from pathlib import Path

from dpmd.errors import ConfigError, DpmdError
from dpmd.files import atomic_symlink, atomic_write_text

FUNCTIONS = {"label": ("explore_label_train.labelers", "label"),
             "dft": ("explore_label_train.dft", "label"),
             "train": ("explore_label_train.campaign", "train_member"),
             "explore": ("explore_label_train.campaign", "explore_group")}


def _first_line(err: BaseException) -> str:
    text = str(err)
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"


def _reason(err: BaseException) -> str:
    """A failed task's reason: a DpmdError's own line (it names the file, key or atom: an SCF that did not
    converge, a bad setting), else the exception's type and first line."""
    if isinstance(err, DpmdError):
        return (str(err).splitlines() or [type(err).__name__])[0]
    return _first_line(err)


def _timeout_reason(seconds: float) -> str:
    return f"timeout: over the {seconds:g} s time limit"


def call(fn: str, payload):
    import importlib

    module, attr = FUNCTIONS[fn]
    return getattr(importlib.import_module(module), attr)(payload)


def _die_with_parent(lifeline, own_end) -> None:
    """Own process group, and a watchdog thread that kills it (this worker and its labeller's children) once
    the lifeline pipe reads EOF: the parent holds its other end, so the kernel closes it when the parent
    dies, kill -9 included.  Not PR_SET_PDEATHSIG: that would kill the worker alone, leaving a labeller's
    subprocess (a DFT code) running."""
    own_end.close()   # the fork start method copies the parent's end into this process too
    os.setpgrp()

    def watch():
        try:
            lifeline.recv_bytes()
        except (EOFError, OSError):
            pass
        os.killpg(0, signal.SIGKILL)

    threading.Thread(target=watch, daemon=True).start()


def _kill(proc) -> None:
    """SIGKILL a worker's process group (the worker made it; before that, the worker alone)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except OSError:
        proc.kill()


def process_start(pid: int):
    """The kernel's start time of a live process (Linux /proc), None when there is none (or a zombie)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return None if fields[0] in ("Z", "X") else fields[19]


def stop_worker(pid: int, started, wait: float = 10.0) -> bool:
    """Kill the process group of a worker an earlier `elt run` recorded (pid, start time) and wait for its
    leader to die.  A live pid with another start time is an unrelated process: left alone (its pid
    cannot lead our old group: Linux reuses no pid while a group of that id lives).  Without /proc
    nothing can be checked and nothing is killed.  Returns whether something was killed."""
    if not Path("/proc/self/stat").is_file():
        return False
    now = process_start(pid)
    if now is not None and now != started:
        return False
    try:
        os.killpg(pid, signal.SIGKILL)
    except OSError:
        return False
    deadline = time.monotonic() + wait
    while process_start(pid) is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    return True


def _worker_main(conn, lifeline, own_end) -> None:
    _die_with_parent(lifeline, own_end)
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        task_id, fn, payload = msg
        try:
            reply = (task_id, True, call(fn, payload))
        except KeyboardInterrupt:
            return
        except BaseException as err:  # noqa: BLE001 - SystemExit from a labeller is a failed task too
            where = traceback.extract_tb(err.__traceback__)[-1] if err.__traceback__ else None
            at = "" if where is None or isinstance(err, DpmdError) else \
                f" (at {Path(where.filename).name}:{where.lineno})"
            reply = (task_id, False, f"{_reason(err)}{at}")
        try:
            conn.send(reply)
        except (EOFError, OSError, BrokenPipeError):
            return


class LocalPool:
    def __init__(self, workers: int = 1, timeout: float | None = 600.0, start_method: str = "spawn"):
        self.workers, self.timeout = int(workers), None if timeout is None else float(timeout)   # None: no limit
        self.ctx = mp.get_context(start_method)

    def _start(self):
        """A worker: (process, task pipe, our end of its lifeline)."""
        parent, child = self.ctx.Pipe()
        lifeline, own_end = self.ctx.Pipe(duplex=False)
        proc = self.ctx.Process(target=_worker_main, args=(child, lifeline, own_end), daemon=True)
        proc.start()
        child.close()
        lifeline.close()
        return proc, parent, own_end

    @staticmethod
    def _stop(w, kill=True) -> None:
        if kill:
            _kill(w[0])
        w[0].join(5)
        if w[0].is_alive():
            _kill(w[0])
        w[1].close()
        w[2].close()

    def run(self, tasks, on_done, on_start=None, on_jobs=None) -> None:   # on_jobs: no cluster jobs here
        pending = deque(tasks)
        idle: list = []
        busy: dict = {}   # conn -> (worker, task_id, t0)
        try:
            while pending or busy:
                while pending and len(busy) < self.workers:
                    w = idle.pop() if idle else self._start()
                    task_id, fn, payload = pending.popleft()
                    try:
                        w[1].send((task_id, fn, payload))
                    except (OSError, BrokenPipeError):
                        pending.appendleft((task_id, fn, payload))
                        self._stop(w)
                        continue
                    busy[w[1]] = (w, task_id, time.monotonic())
                    if on_start is not None:
                        on_start(task_id, w[0].pid)
                now = time.monotonic()
                limit = self.timeout
                if limit is not None:
                    limit = max(0.0, min(t0 + limit for _, _, t0 in busy.values()) - now) + 0.01
                ready = wait(list(busy), timeout=limit)
                for conn in ready:
                    w, task_id, t0 = busy.pop(conn)
                    seconds = time.monotonic() - t0
                    try:
                        rid, ok, value = conn.recv()
                    except (EOFError, OSError):
                        self._stop(w, kill=False)
                        on_done(task_id, False, f"worker process died (exit code {w[0].exitcode})", seconds)
                        continue
                    idle.append(w)
                    on_done(rid, ok, value, seconds)
                now = time.monotonic()
                for conn, (w, task_id, t0) in list(busy.items()):
                    if self.timeout is not None and now - t0 > self.timeout:
                        busy.pop(conn)
                        self._stop(w)
                        on_done(task_id, False, _timeout_reason(self.timeout), now - t0)
        finally:
            for w in idle:
                try:
                    w[1].send(None)
                except (OSError, BrokenPipeError):
                    pass
            for w in idle:
                self._stop(w, kill=False)
            for w, _, _ in busy.values():
                self._stop(w)


def check_dpdispatcher(cfg: dict, where: str = "dispatcher") -> None:
    try:
        import dpdispatcher  # noqa: F401
    except ImportError:
        raise ConfigError(f"'{where}.backend' is dpdispatcher but `import dpdispatcher` fails "
                          "(pip install dpdispatcher, or use backend: local)") from None
    if not isinstance(cfg.get("machine"), dict) or not isinstance(cfg.get("resources"), dict):
        raise ConfigError(f"'{where}.backend' dpdispatcher needs 'machine' and 'resources' mappings "
                          "(dpdispatcher's Machine and Resources arguments)")


# Tasks a cluster job runs as a plain shell line in its folder (a DFT code), not as a Python function:
# fn -> (module, prepare(payload, folder, write) -> (command, files to send, files to fetch back),
#        read(folder) -> the task's value, raising DpmdError with the reason of a failed task)
SHELL_TASKS = {"dft": ("explore_label_train.dft", "prepare_job", "parse")}
TASK_FILE, RESULT_FILE = "task.json", "result.json"
# A Python job writes its files under OUTPUT_DIR (made before it starts, so it always comes back, with the
# files of a task that failed too).  A Python task's payload may carry INPUTS, {"task": {name: local path},
# "common": {name: local path}}: the files the job reads, named as its payload names them, relative to its
# folder ("task": sent into it) or to the dispatch folder ("common": sent once for the whole submission, read as
# ../<name>); the pool links them there and takes INPUTS out of the payload the job reads.
OUTPUT_DIR, INPUTS = "out", "inputs"
DISPATCH_DIR = "dispatch"   # in the work_dir: a folder per task, the submissions' work_base


def job_folder(work_dir, task_id: str) -> Path:
    """A cluster task's folder in the campaign (its inputs, and what its job brought back)."""
    return Path(work_dir) / DISPATCH_DIR / task_id


def _shell_task(fn: str):
    import importlib

    module, prepare, read = SHELL_TASKS[fn]
    mod = importlib.import_module(module)
    return getattr(mod, prepare), getattr(mod, read)


def _job_rows(submission) -> list[dict]:
    """dpdispatcher's jobs of a submission as plain rows: job_hash, job_id (the scheduler's), state, tasks."""
    return [{"job_hash": job.job_hash, "job_id": str(job.job_id or ""),
             "state": job.job_state.name if job.job_state is not None else "unsubmitted",
             "tasks": [task.task_work_path for task in job.job_task_list]} for job in submission.belonging_jobs]


class DPDispatcherPool:
    """Tasks as cluster jobs submitted through dpdispatcher (any batch_type: Shell, Slurm, PBS, LSF, ...;
    tests run Shell and a real local Slurm).  A Python task (FUNCTIONS) is `<python> -m
    explore_label_train.dispatch task.json`, `python` being the dispatcher's command for a Python with dpmd on
    the cluster (a module load, a conda run, a container: not this process's interpreter), and returns its
    value in result.json (plain JSON: nothing coming back from a cluster is unpickled).  A shell task
    (SHELL_TASKS: a DFT code) runs its own command line; its value is read from the files it fetched back.

    Each task's folder, work_dir/dispatch/<task_id>, holds task.json, the record of the task it was written
    for.  A folder whose record matches the task and whose results came back is reported without a job (not a
    Python task's failed result: it gets a job again); one whose record matches but whose results did not is
    submitted again as it is: the same submission a killed run made (a digest of each record is part of its
    job's command, so dpdispatcher's submission hash changes with any task's content), whose record in the
    remote root dpdispatcher finds, re-attaching to its jobs, queued, running or finished, instead of
    submitting them twice.  `on_jobs(submission_hash, rows)`, if given, hears of the jobs (_job_rows) once they
    are submitted or found, whenever a poll finds a job's state changed, and once they ended.
    A Python task's INPUTS are linked into its folder (and the dispatch folder) and sent with the job; its
    out/ folder comes back with its result.json.
    """

    def __init__(self, cfg: dict, work_dir: Path, sleep=time.sleep):
        from explore_label_train.config import DISPATCHER

        check_dpdispatcher(cfg)
        self.cfg, self.work_dir, self.sleep = {**DISPATCHER, **cfg}, Path(work_dir), sleep
        self.root = self.work_dir / DISPATCH_DIR
        self._specs: dict = {}   # task_id -> (fn, command, files to send, files to fetch back, common files)
        self._on_jobs = None

    def _prepare(self, task_id: str, fn: str, payload) -> tuple:
        """The task's folder (rewritten unless it holds this very task) and its job (fn, command, send, fetch,
        common files)."""
        folder = job_folder(self.work_dir, task_id)
        inputs = payload.get(INPUTS) if isinstance(payload, dict) else None
        if inputs is not None:
            payload = {k: v for k, v in payload.items() if k != INPUTS}
        record = json.loads(json.dumps({"task_id": task_id, "fn": fn, "payload": payload,
                                        "timeout": self.cfg["timeout"],
                                        **({"inputs": inputs} if inputs else {})}, default=_plain))
        try:
            same = json.loads((folder / TASK_FILE).read_text()) == record
        except (OSError, ValueError):
            same = False
        if not same and folder.exists():   # another task's, or one cut short: this pool's folder, cleared
            shutil.rmtree(folder)
        if same and fn not in SHELL_TASKS and (folder / RESULT_FILE).exists():
            try:
                kept = json.loads((folder / RESULT_FILE).read_text())["ok"] is True and (folder / OUTPUT_DIR).is_dir()
            except (OSError, ValueError, TypeError, KeyError):
                kept = False
            if not kept:   # a failed (or unreadable, or incomplete) result is not reused: the task gets a job again
                (folder / RESULT_FILE).unlink()
        common = []
        if fn in SHELL_TASKS:
            command, send, fetch = _shell_task(fn)[0](payload, folder, write=not same)
        else:
            folder.mkdir(parents=True, exist_ok=True)
            command = f"{self.cfg['python']} -m explore_label_train.dispatch {TASK_FILE}"
            send, fetch = [TASK_FILE], [RESULT_FILE, OUTPUT_DIR]
            for name, source in ((inputs or {}).get("task") or {}).items():
                _link(folder / name, source)
                send.append(name)
            for name, source in ((inputs or {}).get("common") or {}).items():
                _link(self.root / name, source)
                common.append(name)
        if not same:
            _write_json(folder / TASK_FILE, record)
        digest = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]
        return fn, f": elt task {digest}; {command}", list(send), list(fetch), common

    def _submit(self, tasks) -> None:
        """One dpdispatcher submission of `tasks` (task_id, fn, payload), run to its end; raises on scheduler
        errors.  Submitted (or found: re-attached) first, without cleaning the remote record a later run would
        re-attach with; then polled every poll_interval seconds, each change of a job's state reported as the
        scheduler gives it (dpdispatcher's own loop would only tell at the end), a job the scheduler lost
        resubmitted by dpdispatcher; then the results fetched back and the remote folders cleaned."""
        from dpdispatcher import Machine, Resources, Submission, Task

        specs = [self._specs[task_id] for task_id, _, _ in tasks]
        jobs = [Task(command=spec[1], task_work_path=task_id, forward_files=spec[2], backward_files=spec[3],
                     outlog="out.log", errlog="err.log") for (task_id, _, _), spec in zip(tasks, specs)]
        common = sorted({name for spec in specs for name in spec[4]})
        submission = Submission(work_base=str(self.root), machine=Machine.load_from_dict(self.cfg["machine"]),
                                resources=Resources.load_from_dict(self.cfg["resources"]), task_list=jobs,
                                forward_common_files=common)
        interval = 30 if self.cfg["poll_interval"] is None else self.cfg["poll_interval"]   # dpdispatcher's
        submission.run_submission(exit_on_submit=True, clean=False, check_interval=interval)
        rows = _job_rows(submission)
        self._jobs(submission, rows)
        while not submission.check_all_finished():
            time.sleep(interval)
            submission.update_submission_state()
            submission.handle_unexpected_submission_state()   # resubmits a terminated job, raises past its retries
            if _job_rows(submission) != rows:
                rows = _job_rows(submission)
                self._jobs(submission, rows)
        # all finished: this call fetches what the jobs wrote (nothing twice) and cleans their remote folders
        submission.run_submission(check_interval=interval)
        if _job_rows(submission) != rows:
            self._jobs(submission, _job_rows(submission))

    def _jobs(self, submission, rows) -> None:
        if self._on_jobs is not None:
            self._on_jobs(submission.submission_hash, rows)

    def run(self, tasks, on_done, on_start=None, on_jobs=None) -> None:   # on_start: no pid to record
        tasks = list(tasks)
        if not tasks:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        self._on_jobs = on_jobs
        t0 = time.monotonic()
        reported: set = set()
        ready = []
        for task_id, fn, payload in tasks:
            try:
                self._specs[task_id] = self._prepare(task_id, fn, payload)
                ready.append((task_id, fn, payload))
            except Exception as err:  # noqa: BLE001 - a frame the code cannot take, an unwritable folder
                reported.add(task_id)
                on_done(task_id, False, _reason(err), time.monotonic() - t0)
        retries, wait_s = int(self.cfg["retries"]), float(self.cfg["retry_wait"])
        error = None
        self._report(ready, on_done, t0, reported)   # results a killed run's jobs brought back
        for attempt in range(retries + 1):
            todo = [t for t in ready if t[0] not in reported]
            if not todo:
                break
            try:
                self._submit(todo)
                error = None
            except Exception as err:  # noqa: BLE001 - any scheduler/transport error is worth a retry
                error = f"dpdispatcher: {_first_line(err)}"
            self._report(ready, on_done, t0, reported)   # commit what finished before trying again
            if error is None:
                break
            if attempt < retries:
                delay = wait_s * 2 ** attempt
                print(f"[elt] {error}; retrying {len(todo)} task(s) in {delay:g} s "
                      f"(attempt {attempt + 2} of {retries + 1})", flush=True)
                self.sleep(delay)
        for task_id, _, _ in ready:
            if task_id not in reported:
                on_done(task_id, False, error or f"dpdispatcher: the job brought back no {self._specs[task_id][3][0]}",
                        time.monotonic() - t0)

    def _report(self, tasks, on_done, t0, reported: set) -> None:
        """on_done for each task whose results came back (every file it fetches is there)."""
        for task_id, fn, _ in tasks:
            folder = self.root / task_id
            fetch = self._specs[task_id][3] if fn in SHELL_TASKS else [RESULT_FILE]
            if task_id in reported or not all((folder / name).exists() for name in fetch):
                continue
            if fn in SHELL_TASKS:
                try:
                    ok, value = True, _shell_task(fn)[1](folder)
                except Exception as err:  # noqa: BLE001 - the reason of a failed task
                    ok, value = False, _reason(err)
            else:
                res = folder / RESULT_FILE
                try:
                    reply = json.loads(res.read_text())
                    ok, value = bool(reply["ok"]), reply["value"]
                except (OSError, ValueError, TypeError, KeyError) as err:
                    ok, value = False, f"{res}: unreadable result ({_first_line(err)})"
            reported.add(task_id)
            on_done(task_id, ok, value, time.monotonic() - t0)


def _link(link: Path, target) -> None:
    """link -> target (absolute), made or repointed in one step; dpdispatcher sends what it points at."""
    target = os.path.abspath(target)
    if not (link.is_symlink() and os.readlink(link) == target):
        link.parent.mkdir(parents=True, exist_ok=True)
        atomic_symlink(target, link)


def make_pool(cfg: dict, work_dir: Path):
    if cfg["backend"] == "dpdispatcher":
        return DPDispatcherPool(cfg, work_dir)
    return LocalPool(cfg["workers"], cfg["timeout"], cfg["start_method"])


class _TaskTimeout(Exception):
    pass


def _on_alarm(signum, frame):
    raise _TaskTimeout()


def _plain(obj):
    """numpy arrays and scalars as JSON lists and numbers (floats round-trip exactly)."""
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def _write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, default=_plain))


def _main(argv) -> int:
    """Run one task (task.json in the current directory) and write result.json (the dpdispatcher job)."""
    task = json.loads(Path(argv[0]).read_text())
    task_id, fn, payload, timeout = task["task_id"], task["fn"], task["payload"], task["timeout"]
    Path(OUTPUT_DIR).mkdir(exist_ok=True)
    signal.signal(signal.SIGALRM, _on_alarm)
    if timeout is not None:   # None: no limit (training)
        signal.setitimer(signal.ITIMER_REAL, float(timeout))
    try:
        reply = {"task_id": task_id, "ok": True, "value": call(fn, payload)}
    except _TaskTimeout:
        reply = {"task_id": task_id, "ok": False, "value": _timeout_reason(timeout)}
    except BaseException as err:  # noqa: BLE001
        reply = {"task_id": task_id, "ok": False, "value": _reason(err)}
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    try:
        _write_json(Path(RESULT_FILE), reply)
    except (TypeError, ValueError) as err:   # a task that returned something JSON cannot hold
        _write_json(Path(RESULT_FILE), {"task_id": task_id, "ok": False, "value": f"unwritable result: {err}"})
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
