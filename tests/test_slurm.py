"""Dispatch through a real Slurm (the `slurm` fixture: .ci/slurm/start.sh's one-node cluster on 127.0.0.1, which
.ci/run starts in CI): a label task runs as a Slurm job in the partition asked for, a task over its time limit
is a failed task, and a small EMT campaign whose labelling goes through Slurm gets the local backend's labels."""

from __future__ import annotations

import textwrap

import numpy as np
import pytest

from tests.conftest import REPO

PROBE = textwrap.dedent('''
    import json, os, time
    from ase.calculators.emt import EMT

    def Probe(record):
        """EMT, after writing down the Slurm job it runs in."""
        with open(record, "w") as fh:
            json.dump({k: os.environ.get(k) for k in ("SLURM_JOB_ID", "SLURM_JOB_PARTITION")}, fh)
        return EMT()

    def Sleepy(**kw):
        time.sleep(300)
''')


@pytest.fixture
def dpdispatcher(monkeypatch):
    """dpdispatcher, polling squeue every second instead of every 30 s (DPDispatcherPool takes
    run_submission's default)."""
    dpdispatcher = pytest.importorskip("dpdispatcher")
    run_submission = dpdispatcher.Submission.run_submission
    monkeypatch.setattr(dpdispatcher.Submission, "run_submission",
                        lambda self, **kw: run_submission(self, **{"check_interval": 1, **kw}))
    return dpdispatcher


def slurm_dispatcher(tmp_path, partition="", timeout=60.0, pythonpath=()):
    """A `dispatcher:` section submitting each task as one Slurm job (1 core) on this machine."""
    return {"backend": "dpdispatcher", "timeout": timeout, "retries": 0, "retry_wait": 0,
            "machine": {"batch_type": "Slurm", "context_type": "LocalContext", "local_root": str(tmp_path),
                        "remote_root": str(tmp_path / "remote")},
            "resources": {"number_node": 1, "cpu_per_node": 1, "gpu_per_node": 0, "queue_name": partition,
                          "group_size": 1, "envs": {"PYTHONPATH": ":".join([*map(str, pythonpath), str(REPO)]),
                                                    "OMP_NUM_THREADS": "1"}}}


def test_label_tasks_run_as_slurm_jobs_in_the_partition_asked_for(tmp_path, slurm, dpdispatcher):
    import json

    from explore_label_train.dispatch import DPDispatcherPool
    from explore_label_train.labelers import label

    (tmp_path / "slurm_probe.py").write_text(PROBE)
    partition = "gpu" if "gpu" in slurm else sorted(slurm)[0]   # start.sh's second partition, on the same node
    cfg = slurm_dispatcher(tmp_path, partition, timeout=8.0, pythonpath=[tmp_path])
    frame = {"symbols": ["Cu"] * 4, "positions": (np.eye(4, 3) * 1.8 + 0.1).tolist(),
             "cell": (np.eye(3) * 3.61).tolist(), "kwargs": {}}
    record = tmp_path / "probe.json"
    results = {}
    DPDispatcherPool(cfg, tmp_path / "camp").run(
        [("probe", "label", dict(frame, calculator="slurm_probe:Probe", kwargs={"record": str(record)})),
         ("slow", "label", dict(frame, calculator="slurm_probe:Sleepy"))],
        lambda t, ok, v, s: results.__setitem__(t, (ok, v)))
    assert results["probe"][0], results["probe"]
    np.testing.assert_allclose(results["probe"][1]["forces"], label(dict(frame, calculator="emt"))["forces"])
    seen = json.loads(record.read_text())
    assert seen["SLURM_JOB_ID"] and seen["SLURM_JOB_PARTITION"] == partition   # ran as a Slurm job, there
    # the job enforces the task's time limit itself: a failed task with the reason, not a hung or failed job
    assert results["slow"] == (False, "timeout: over the 8 s time limit")


@pytest.mark.slow   # two small campaigns, one of them labelling through Slurm: ~45 s
def test_campaign_labelling_through_slurm_gets_the_local_labels(tmp_path, slurm, dpdispatcher):
    """One iteration (init labels, train, explore, select, label, check) with every label computed by a Slurm
    job; the same campaign on the local backend labels the same frames with the same values."""
    from explore_label_train.campaign import Campaign
    from explore_label_train.config import load_campaign
    from tests.test_elt import campaign_dict, check_consistency, write_campaign

    labels = {}
    for backend in ("local", "slurm"):
        d = tmp_path / backend
        d.mkdir()
        over = {"convergence": {"max_iterations": 1}, "train": {"numb_steps": 10}}
        if backend == "slurm":
            over["dispatcher"] = slurm_dispatcher(d)
        camp = Campaign(load_campaign(write_campaign(d, campaign_dict(d, **over))), log=None)
        assert camp.run() == "max_iterations"
        st = camp.state
        assert st.one("SELECT COUNT(*) FROM tasks WHERE kind='label' AND status!='done'") == 0
        assert {r[0] for r in st.q("SELECT stage FROM stages WHERE iteration=0 AND status='done'")} \
            == {"init", "train", "explore", "select", "label", "check"}
        check_consistency(camp)
        rows = st.q("SELECT task_id, frame_id, source, source_traj, source_step, natoms, energy, file "
                    "FROM labels ORDER BY task_id")
        labels[backend] = {r["task_id"]: (tuple(r)[:-1], np.load(camp.root / r["file"])) for r in rows}
        if backend == "slurm":   # every label came back from a Slurm job
            assert sorted(p.name for p in (camp.root / "dispatch").iterdir() if (p / "result.json").is_file()) \
                == sorted(labels["slurm"])
    local, slurm_labels = labels["local"], labels["slurm"]
    assert sorted(local) == sorted(slurm_labels) and len(local) == 4 + 3   # 4 initial frames + a budget of 3
    assert any(row[1] is not None for row, _ in local.values())           # explored frames, not only the initial
    for task_id, (row, arrays) in local.items():
        row_s, arrays_s = slurm_labels[task_id]
        assert row_s[:-1] == row[:-1] and row_s[-1] == pytest.approx(row[-1], rel=0, abs=1e-12), task_id
        for key in ("coord", "energy", "force"):
            np.testing.assert_allclose(arrays_s[key], arrays[key], rtol=0, atol=1e-12, err_msg=f"{task_id} {key}")
