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

`DPDispatcherPool` submits the same tasks through dpdispatcher (only if `import dpdispatcher` works).
A submission that fails (sbatch refused, squeue or the SSH link down: the transient scheduler errors
that kill long DP-GEN runs) is retried `retries` times after waiting `retry_wait` seconds, doubled
each time; tasks that already wrote a result are not submitted again.  Each job enforces the task
time limit itself, so a labeller over its limit is a failed task, not a failed job.  Jobs read
task.json and write result.json (plain JSON: nothing coming back from a cluster is unpickled).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
import traceback
from collections import deque
from multiprocessing.connection import wait
from pathlib import Path

from dpmd.errors import ConfigError

FUNCTIONS = {"label": ("explore_label_train.labelers", "label"),
             "train": ("explore_label_train.campaign", "train_member")}


def _first_line(err: BaseException) -> str:
    text = str(err)
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"


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
            at = f" (at {Path(where.filename).name}:{where.lineno})" if where else ""
            reply = (task_id, False, f"{_first_line(err)}{at}")
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

    def run(self, tasks, on_done, on_start=None) -> None:
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


def check_dpdispatcher(cfg: dict) -> None:
    try:
        import dpdispatcher  # noqa: F401
    except ImportError:
        raise ConfigError("'dispatcher.backend' is dpdispatcher but `import dpdispatcher` fails "
                          "(pip install dpdispatcher, or use backend: local)") from None
    if not isinstance(cfg.get("machine"), dict) or not isinstance(cfg.get("resources"), dict):
        raise ConfigError("'dispatcher.backend' dpdispatcher needs 'machine' and 'resources' mappings "
                          "(dpdispatcher's Machine and Resources arguments)")


class DPDispatcherPool:
    """Tasks as `python -m explore_label_train.dispatch task.json` jobs submitted through dpdispatcher
    (any batch_type: Shell, Slurm, PBS, LSF, ...; tests/test_elt.py runs Shell, and Slurm where sbatch exists).
    Results come back as result.json files.
    """

    def __init__(self, cfg: dict, work_dir: Path, sleep=time.sleep):
        from explore_label_train.config import DISPATCHER

        check_dpdispatcher(cfg)
        self.cfg, self.work_dir, self.sleep = {**DISPATCHER, **cfg}, Path(work_dir), sleep
        self.root = self.work_dir / "dispatch"

    def _submit(self, tasks) -> None:
        """One dpdispatcher submission of `tasks`; raises on scheduler errors."""
        from dpdispatcher import Machine, Resources, Submission, Task

        jobs = [Task(command=f"{sys.executable} -m explore_label_train.dispatch task.json",
                     task_work_path=task_id, forward_files=["task.json"], backward_files=["result.json"],
                     outlog="out.log", errlog="err.log") for task_id, _, _ in tasks]
        machine = Machine.load_from_dict(self.cfg["machine"])
        resources = Resources.load_from_dict(self.cfg["resources"])
        Submission(work_base=str(self.root), machine=machine, resources=resources, task_list=jobs).run_submission()

    def run(self, tasks, on_done, on_start=None) -> None:   # on_start: jobs run elsewhere, no pid to record
        tasks = list(tasks)
        if not tasks:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        for task_id, fn, payload in tasks:
            d = self.root / task_id
            d.mkdir(exist_ok=True)
            _write_json(d / "task.json", {"task_id": task_id, "fn": fn, "payload": payload,
                                          "timeout": self.cfg["timeout"]})
            (d / "result.json").unlink(missing_ok=True)
        t0 = time.monotonic()
        retries, wait_s = int(self.cfg["retries"]), float(self.cfg["retry_wait"])
        reported: set = set()
        error = None
        for attempt in range(retries + 1):
            todo = [t for t in tasks if not (self.root / t[0] / "result.json").is_file()]
            if not todo:
                break
            try:
                self._submit(todo)
                error = None
            except Exception as err:  # noqa: BLE001 - any scheduler/transport error is worth a retry
                error = f"dpdispatcher: {_first_line(err)}"
            self._report(tasks, on_done, t0, reported)   # commit what finished before trying again
            if error is None:
                break
            if attempt < retries:
                delay = wait_s * 2 ** attempt
                print(f"[elt] {error}; retrying {len(todo)} task(s) in {delay:g} s "
                      f"(attempt {attempt + 2} of {retries + 1})", flush=True)
                self.sleep(delay)
        for task_id, _, _ in tasks:
            if task_id not in reported:
                on_done(task_id, False, error or "dpdispatcher: the job wrote no result.json", time.monotonic() - t0)

    def _report(self, tasks, on_done, t0, reported: set) -> None:
        for task_id, _, _ in tasks:
            res = self.root / task_id / "result.json"
            if task_id not in reported and res.is_file():
                try:
                    reply = json.loads(res.read_text())
                    ok, value = bool(reply["ok"]), reply["value"]
                except (OSError, ValueError, TypeError, KeyError) as err:
                    ok, value = False, f"{res}: unreadable result ({_first_line(err)})"
                reported.add(task_id)
                on_done(task_id, ok, value, time.monotonic() - t0)


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
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(obj, default=_plain))
    os.replace(tmp, path)


def _main(argv) -> int:
    """Run one task (task.json in the current directory) and write result.json (the dpdispatcher job)."""
    task = json.loads(Path(argv[0]).read_text())
    task_id, fn, payload, timeout = task["task_id"], task["fn"], task["payload"], task["timeout"]
    signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, float(timeout))
    try:
        reply = {"task_id": task_id, "ok": True, "value": call(fn, payload)}
    except _TaskTimeout:
        reply = {"task_id": task_id, "ok": False, "value": _timeout_reason(timeout)}
    except BaseException as err:  # noqa: BLE001
        reply = {"task_id": task_id, "ok": False, "value": f"{type(err).__name__}: {err}"}
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    try:
        _write_json(Path("result.json"), reply)
    except (TypeError, ValueError) as err:   # a task that returned something JSON cannot hold
        _write_json(Path("result.json"), {"task_id": task_id, "ok": False, "value": f"unwritable result: {err}"})
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
