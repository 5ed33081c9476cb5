"""Dispatchers: run tasks (label computations) in worker processes, with a time limit per task.

`LocalPool(workers, timeout)` keeps `workers` persistent worker processes (spawn by default: no
SQLite handle, lock or thread crosses a fork).  `pool.run(tasks, on_done)` hands each task
(task_id, function name, payload) to an idle worker and calls `on_done(task_id, ok, value, seconds)`
in the calling process as each one finishes, so the caller can commit it at once.  An exception in
the task (SystemExit included), a worker that dies (os._exit, a signal, out of memory) and a task
over its time limit (the worker is killed and replaced) all give ok=False with the reason.

`DPDispatcherPool` submits the same tasks through dpdispatcher (only if `import dpdispatcher` works).
A submission that fails (sbatch refused, squeue or the SSH link down: the transient scheduler errors
that kill long DP-GEN runs) is retried `retries` times after waiting `retry_wait` seconds, doubled
each time; tasks that already wrote a result are not submitted again.  Each job enforces the task
time limit itself, so a labeller over its limit is a failed task, not a failed job.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import signal
import sys
import time
import traceback
from collections import deque
from multiprocessing.connection import wait
from pathlib import Path

from dpmd.errors import ConfigError

FUNCTIONS = {"label": ("explore_label_train.labelers", "label")}


def _first_line(err: BaseException) -> str:
    text = str(err)
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"


def _timeout_reason(seconds: float) -> str:
    return f"timeout: over the {seconds:g} s time limit"


def call(fn: str, payload):
    import importlib

    module, attr = FUNCTIONS[fn]
    return getattr(importlib.import_module(module), attr)(payload)


def _worker_main(conn) -> None:
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
    def __init__(self, workers: int = 1, timeout: float = 600.0, start_method: str = "spawn"):
        self.workers, self.timeout = int(workers), float(timeout)
        self.ctx = mp.get_context(start_method)

    def _start(self):
        parent, child = self.ctx.Pipe()
        proc = self.ctx.Process(target=_worker_main, args=(child,), daemon=True)
        proc.start()
        child.close()
        return proc, parent

    def run(self, tasks, on_done) -> None:
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
                        w[0].kill()
                        continue
                    busy[w[1]] = (w, task_id, time.monotonic())
                now = time.monotonic()
                next_deadline = min(t0 + self.timeout for _, _, t0 in busy.values())
                ready = wait(list(busy), timeout=max(0.0, next_deadline - now) + 0.01)
                for conn in ready:
                    w, task_id, t0 = busy.pop(conn)
                    seconds = time.monotonic() - t0
                    try:
                        rid, ok, value = conn.recv()
                    except (EOFError, OSError):
                        w[0].join(5)
                        code = w[0].exitcode
                        on_done(task_id, False, f"worker process died (exit code {code})", seconds)
                        continue
                    idle.append(w)
                    on_done(rid, ok, value, seconds)
                now = time.monotonic()
                for conn, (w, task_id, t0) in list(busy.items()):
                    if now - t0 > self.timeout:
                        busy.pop(conn)
                        w[0].kill()
                        w[0].join(5)
                        conn.close()
                        on_done(task_id, False, _timeout_reason(self.timeout), now - t0)
        finally:
            for proc, conn in idle:
                try:
                    conn.send(None)
                except (OSError, BrokenPipeError):
                    pass
            for proc, conn in idle:
                proc.join(5)
                if proc.is_alive():
                    proc.kill()
                conn.close()
            for conn, (w, _, _) in busy.items():
                w[0].kill()
                w[0].join(5)
                conn.close()


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
    """Tasks as `python -m explore_label_train.dispatch task.pkl` jobs submitted through dpdispatcher
    (any batch_type: Shell, Slurm, PBS, LSF, ...; tests/test_elt.py runs Shell, and Slurm where sbatch exists).
    Results come back as result.pkl files.
    """

    def __init__(self, cfg: dict, work_dir: Path, sleep=time.sleep):
        from explore_label_train.config import DISPATCHER

        check_dpdispatcher(cfg)
        self.cfg, self.work_dir, self.sleep = {**DISPATCHER, **cfg}, Path(work_dir), sleep
        self.root = self.work_dir / "dispatch"

    def _submit(self, tasks) -> None:
        """One dpdispatcher submission of `tasks`; raises on scheduler errors."""
        from dpdispatcher import Machine, Resources, Submission, Task

        jobs = [Task(command=f"{sys.executable} -m explore_label_train.dispatch task.pkl",
                     task_work_path=task_id, forward_files=["task.pkl"], backward_files=["result.pkl"],
                     outlog="out.log", errlog="err.log") for task_id, _, _ in tasks]
        machine = Machine.load_from_dict(self.cfg["machine"])
        resources = Resources.load_from_dict(self.cfg["resources"])
        Submission(work_base=str(self.root), machine=machine, resources=resources, task_list=jobs).run_submission()

    def run(self, tasks, on_done) -> None:
        tasks = list(tasks)
        if not tasks:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        for task_id, fn, payload in tasks:
            d = self.root / task_id
            d.mkdir(exist_ok=True)
            (d / "task.pkl").write_bytes(pickle.dumps((task_id, fn, payload, self.cfg["timeout"])))
            (d / "result.pkl").unlink(missing_ok=True)
        t0 = time.monotonic()
        retries, wait_s = int(self.cfg["retries"]), float(self.cfg["retry_wait"])
        reported: set = set()
        error = None
        for attempt in range(retries + 1):
            todo = [t for t in tasks if not (self.root / t[0] / "result.pkl").is_file()]
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
                on_done(task_id, False, error or "dpdispatcher: the job wrote no result.pkl", time.monotonic() - t0)

    def _report(self, tasks, on_done, t0, reported: set) -> None:
        for task_id, _, _ in tasks:
            res = self.root / task_id / "result.pkl"
            if task_id not in reported and res.is_file():
                rid, ok, value = pickle.loads(res.read_bytes())
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


def _main(argv) -> int:
    """Run one pickled task in the current directory and write result.pkl (the dpdispatcher job)."""
    task_id, fn, payload, timeout = pickle.loads(Path(argv[0]).read_bytes())
    signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, float(timeout))
    try:
        reply = (task_id, True, call(fn, payload))
    except _TaskTimeout:
        reply = (task_id, False, _timeout_reason(timeout))
    except BaseException as err:  # noqa: BLE001
        reply = (task_id, False, f"{type(err).__name__}: {err}")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    tmp = Path(f".result.pkl.{os.getpid()}")
    tmp.write_bytes(pickle.dumps(reply))
    os.replace(tmp, "result.pkl")
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
