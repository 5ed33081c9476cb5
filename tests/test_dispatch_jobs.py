"""DPDispatcherPool's cluster jobs, through dpdispatcher's Shell backend on this machine: a DFT task is its code's
command line in the task folder (inputs sent, outputs fetched, parsed here: converged or failed with the
reason), a Python task runs with the configured `python`; results already fetched are read without a job, and a
pool killed (-9) with jobs in flight is re-attached to them by the next one: same submission, same job, the
code run once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from tests.conftest import REPO
from tests.test_dft_labellers import DFT, FAKE, cp2k, frame_of, reference

pytestmark = pytest.mark.skipif(not DFT.is_dir(), reason="recorded first-principles outputs (../shared/dft-outputs) "
                                                          "not available")


def shell_dispatcher(tmp_path, group_size=1) -> dict:
    return {"backend": "dpdispatcher", "timeout": 60, "retries": 0, "retry_wait": 0, "poll_interval": 1,
            "machine": {"batch_type": "Shell", "context_type": "LocalContext", "local_root": str(tmp_path),
                        "remote_root": str(tmp_path / "remote")},
            "resources": {"number_node": 1, "cpu_per_node": 1, "gpu_per_node": 0, "queue_name": "",
                          "group_size": group_size, "envs": {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}}}


def recorded(tmp_path, name, output) -> str:
    """A folder the fake code replays: `output` as what the code prints (CP2K's output)."""
    folder = tmp_path / name
    folder.mkdir()
    (folder / "stdout").write_text(output.read_text())
    return str(folder)


def cp2k_tasks(tmp_path, command=None):
    """A converged and an unconverged CP2K task, and an EMT label task."""
    converged = DFT / "cp2k" / "cp2k_output.converged"
    lab = cp2k(tmp_path, ["Fe", "O"])
    good = dict(lab, command=command or f"sh {FAKE} {recorded(tmp_path, 'rec_good', converged)}")
    bad = dict(lab, command=f"sh {FAKE} {recorded(tmp_path, 'rec_bad', DFT / 'cp2k' / 'cp2k_output.unconverged')}")
    oxygen = {"symbols": ["O"], "positions": [[0.0, 0.0, 0.0]], "cell": np.eye(3).tolist()}
    copper = {"symbols": ["Cu"] * 4, "positions": (np.eye(4, 3) * 1.8 + 0.1).tolist(),
              "cell": (np.eye(3) * 3.61).tolist(), "kwargs": {}, "calculator": "emt"}
    return [("good", "dft", {**frame_of(reference(converged, "cp2k/output")), "dft": good}),
            ("bad", "dft", {**oxygen, "dft": bad}), ("emt", "label", copper)]


def test_dft_and_python_tasks_as_cluster_jobs_and_results_read_once_fetched(tmp_path, monkeypatch):
    pytest.importorskip("dpdispatcher")
    from explore_label_train.dispatch import DPDispatcherPool
    from explore_label_train.labelers import label

    tasks = cp2k_tasks(tmp_path)
    results, seen = {}, []
    pool = DPDispatcherPool(shell_dispatcher(tmp_path, group_size=2), tmp_path / "camp")
    pool.run(tasks, lambda t, ok, v, s: results.__setitem__(t, (ok, v)), on_jobs=lambda h, rows: seen.append((h, rows)))
    ref = reference(DFT / "cp2k" / "cp2k_output.converged", "cp2k/output")
    assert results["good"][0], results["good"]
    assert results["good"][1]["energy"] == pytest.approx(float(ref["energies"][0]), abs=1e-9)
    np.testing.assert_allclose(results["good"][1]["forces"], ref["forces"][0], atol=1e-9)
    assert results["bad"][0] is False and results["bad"][1].startswith("cp2k: SCF not converged ('SCF run NOT "
                                                                       "converged') in ")
    assert results["emt"][0]   # a Python task runs with the dispatcher's `python` command
    assert pool._specs["emt"][1].endswith("; python -m explore_label_train.dispatch task.json")
    np.testing.assert_allclose(results["emt"][1]["forces"], label(tasks[2][2])["forces"])
    # jobs heard of as submitted and as their states change, finished last: one submission, 3 tasks in 2 jobs
    # (group_size 2)
    assert seen and len({h for h, _ in seen}) == 1
    assert sorted(t for row in seen[-1][1] for t in row["tasks"]) == ["bad", "emt", "good"] and len(seen[-1][1]) == 2
    assert all(row["state"] == "finished" and row["job_id"] for row in seen[-1][1])
    folder = tmp_path / "camp" / "dispatch" / "good"
    assert {"input.inp", "coord.xyz", "output", "exit_code", "frame.json", "task.json"} <= {p.name for p in
                                                                                          folder.iterdir()}
    # the same tasks again: read from the fetched files, no job
    monkeypatch.setattr(DPDispatcherPool, "_submit", lambda self, tasks: pytest.fail(f"submitted {tasks}"))
    again = {}
    DPDispatcherPool(shell_dispatcher(tmp_path), tmp_path / "camp").run(
        tasks, lambda t, ok, v, s: again.__setitem__(t, (ok, v)))
    assert again["bad"] == results["bad"] and again["good"][1]["energy"] == results["good"][1]["energy"]
    # a failed result of a Python task is not reused (a training run again after a fix gets a job)
    submitted = []
    monkeypatch.setattr(DPDispatcherPool, "_submit", lambda self, tasks: submitted.append([t[0] for t in tasks]))
    result = tmp_path / "camp" / "dispatch" / "emt" / "result.json"
    result.write_text(json.dumps({"task_id": "emt", "ok": False, "value": "MemoryError: out of memory"}))
    DPDispatcherPool(shell_dispatcher(tmp_path), tmp_path / "camp").run(tasks, lambda *a: None)
    assert submitted == [["emt"]] and not result.exists()
    # a changed task is written and submitted afresh
    submitted.clear()
    changed = [(t, fn, dict(p, positions=(np.asarray(p["positions"]) + 0.01).tolist()) if t == "emt" else p)
               for t, fn, p in tasks]
    last = {}
    DPDispatcherPool(shell_dispatcher(tmp_path), tmp_path / "camp").run(
        changed, lambda t, ok, v, s: last.__setitem__(t, (ok, v)))
    assert submitted == [["emt"]] and last["emt"] == (False, "dpdispatcher: the job brought back no result.json")
    assert not (tmp_path / "camp" / "dispatch" / "emt" / "result.json").exists()


RUN_POOL = textwrap.dedent('''
    import json, sys
    from explore_label_train.dispatch import DPDispatcherPool

    cfg, work, tasks, marker = json.loads(open(sys.argv[1]).read())

    def on_jobs(submission, rows):
        with open(marker, "a") as fh:
            fh.write(json.dumps({"submission": submission, "rows": rows}) + "\\n")

    DPDispatcherPool(cfg, work).run([tuple(t) for t in tasks], lambda *a: None, on_jobs=on_jobs)
''')


def test_killed_pool_is_reattached_to_its_jobs_in_flight(tmp_path):
    pytest.importorskip("dpdispatcher")
    from explore_label_train.dispatch import DPDispatcherPool

    runs = tmp_path / "runs"
    slow = tmp_path / "slow_cp2k.sh"   # counts its runs, takes a few seconds, then replays the converged output
    recorded_good = recorded(tmp_path, "rec", DFT / "cp2k" / "cp2k_output.converged")
    slow.write_text(f'#!/bin/sh\necho run >> {runs}\nsleep 6\nexec sh {FAKE} "$@"\n')
    tasks = cp2k_tasks(tmp_path, command=f"sh {slow} {recorded_good}")[:1]
    cfg, work, marker = shell_dispatcher(tmp_path), tmp_path / "camp", tmp_path / "jobs.jsonl"
    (tmp_path / "args.json").write_text(json.dumps([cfg, str(work), tasks, str(marker)]))
    (tmp_path / "run_pool.py").write_text(RUN_POOL)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, str(tmp_path / "run_pool.py"), str(tmp_path / "args.json")], env=env,
                            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not marker.is_file() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert marker.is_file(), "the pool never reported its submitted job"
    finally:
        proc.kill()   # SIGKILL: elt dies with its job in flight
        proc.wait()
    first = json.loads(marker.read_text().splitlines()[0])
    assert first["rows"][0]["state"] in ("waiting", "running") and not (work / "dispatch" / "good" / "output").exists()
    seen, results = [], {}
    DPDispatcherPool(cfg, work).run(tasks, lambda t, ok, v, s: results.__setitem__(t, (ok, v)),
                                    on_jobs=lambda h, rows: seen.append((h, rows)))
    assert results["good"][0], results["good"]
    assert seen[0][0] == first["submission"]                                    # the same submission ...
    assert seen[-1][1][0]["job_id"] == first["rows"][0]["job_id"]               # ... and the same job, re-attached
    assert runs.read_text() == "run\n"                                          # the code ran once
