"""Quantum-mechanical labellers (tblite GFN2-xTB, PySCF) and the README's main job, `dpmd demo` (a campaign).

Skipped where tblite / pyscf cannot be imported.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from explore_label_train.dispatch import LocalPool
from explore_label_train.labelers import label
from tests.conftest import REPO


def water_payload(calculator, **kwargs):
    from ase.build import molecule

    w = molecule("H2O")
    w.positions[1] += [0.03, -0.02, 0.05]          # off equilibrium: forces of a few eV/Å
    return {"symbols": w.get_chemical_symbols(), "positions": w.positions.tolist(), "cell": None,
            "calculator": calculator, "kwargs": kwargs}


def finite_difference_forces(payload, h=1e-4):
    pos = np.array(payload["positions"])
    f = np.zeros_like(pos)
    for i in range(len(pos)):
        for k in range(3):
            e = []
            for s in (1, -1):
                p = pos.copy()
                p[i, k] += s * h
                e.append(label(dict(payload, positions=p.tolist()))["energy"])
            f[i, k] = -(e[0] - e[1]) / (2 * h)
    return f


def run_in_pool(payloads):
    results = {}
    LocalPool(workers=1, timeout=60).run([(name, "label", p) for name, p in payloads.items()],
                                         lambda t, ok, v, s: results.__setitem__(t, (ok, v)))
    return results


def test_tblite_labels_are_gfn2_xtb_with_consistent_forces():
    pytest.importorskip("tblite")
    from ase import Atoms
    from tblite.ase import TBLite

    payload = water_payload("tblite", accuracy=0.01)
    out = label(payload)
    atoms = Atoms(payload["symbols"], positions=payload["positions"])
    atoms.calc = TBLite(method="GFN2-xTB", accuracy=0.01, verbosity=0)
    assert out["energy"] == pytest.approx(atoms.get_potential_energy(), abs=1e-8)
    assert out["virial"] is None and out["forces"].shape == (3, 3)
    assert np.abs(out["forces"]).max() > 0.5
    np.testing.assert_allclose(out["forces"], finite_difference_forces(payload), atol=2e-4)
    moved = np.array(payload["positions"])
    moved[0] += 0.01   # one atom: a rigid shift would leave a molecule's energy as it is
    again = label(dict(payload, positions=moved.tolist()))
    assert label(payload)["energy"] == out["energy"]   # a fresh SCF start per frame: the label repeats exactly
    assert again["energy"] != out["energy"]


def test_tblite_scf_failure_marks_the_task_failed_with_the_reason():
    pytest.importorskip("tblite")
    results = run_in_pool({"ok": water_payload("tblite"), "noscf": water_payload("tblite", max_iterations=1)})
    assert results["ok"][0] and np.isfinite(results["ok"][1]["forces"]).all()
    ok, reason = results["noscf"]
    assert not ok and "SCF not converged in 1 cycles" in reason and "\n" not in reason


def test_pyscf_labels_hartree_fock_forces_and_scf_failure():
    pytest.importorskip("pyscf")
    payload = water_payload("pyscf", xc="hf", basis="sto-3g")
    out = label(payload)
    assert out["energy"] == pytest.approx(-74.9659 * 27.211386, abs=0.5)   # RHF/STO-3G water, about -74.96 Ha
    np.testing.assert_allclose(out["forces"], finite_difference_forces(payload, h=1e-3), atol=1e-4)
    results = run_in_pool({"noscf": water_payload("pyscf", xc="pbe", basis="sto-3g", max_cycle=1),
                           "cell": dict(payload, cell=(np.eye(3) * 8).tolist())})
    assert not results["noscf"][0] and "SCFNotConverged: SCF not converged in 1 cycles" in results["noscf"][1]
    assert not results["cell"][0] and "molecules only" in results["cell"][1]


def test_missing_package_is_a_one_line_config_error(monkeypatch):
    from dpmd.errors import ConfigError
    from explore_label_train.labelers import check_labeller

    monkeypatch.setitem(sys.modules, "tblite", None)      # import tblite now fails
    with pytest.raises(ConfigError, match="'labeller.calculator' 'tblite' needs tblite, which cannot be imported"):
        check_labeller({"calculator": "tblite", "kwargs": {}})


def test_demo_campaign_file_is_valid():
    pytest.importorskip("tblite")
    from explore_label_train.config import load_campaign

    cfg = load_campaign(REPO / "configs" / "campaign_water_xtb.yaml")
    assert cfg["labeller"]["calculator"] == "tblite" and cfg["work_dir"] == str(REPO / "runs" / "demo")
    assert len(cfg["explore"][0]["temperatures"]) == 2 and cfg["convergence"]["accurate_ratio"] >= 0.9


@pytest.mark.slow
def test_dpmd_demo_runs_a_campaign_to_convergence(tmp_path):
    """The README's main job: `dpmd demo` (minutes: it trains 4 models per iteration)."""
    pytest.importorskip("tblite")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, "-m", "dpmd.cli", "demo", "-o", str(tmp_path / "demo")],
                         capture_output=True, text=True, cwd=REPO, env=env, timeout=1500)
    assert res.returncode == 0, res.stderr[-3000:]
    out = res.stdout
    assert "finished: converged" in out
    model = out.split("trained model: ")[1].split()[0]
    report = out.split("report: ")[1].split()[0]
    assert os.path.isfile(model) and os.path.isfile(report) and report.startswith(str(tmp_path))
    from explore_label_train.state import State

    st = State(tmp_path / "demo" / "campaign.db")
    last = st.q("SELECT * FROM iterations ORDER BY iteration DESC LIMIT 1")[0]
    assert last["decision"] == "converged" and last["accurate"] >= 0.9
    assert {r[0] for r in st.q("SELECT DISTINCT labeller FROM labels")} == {"tblite"}
    assert st.one("SELECT COUNT(*) FROM labels WHERE frame_id IS NOT NULL") > 0    # exploration added xTB labels
    # run again: it resumes a finished campaign, and its time is not taken for the campaign's
    again = subprocess.run([sys.executable, "-m", "dpmd.cli", "demo", "-o", str(tmp_path / "demo")],
                           capture_output=True, text=True, cwd=REPO, env=env, timeout=600)

    def times(text):   # "...; this run N s, the campaign's stages M s in all"
        line = text.split("finished: ")[1].splitlines()[0]
        return int(line.split("this run ")[1].split()[0]), int(line.split("stages ")[1].split()[0])

    assert again.returncode == 0 and times(again.stdout)[1] == times(out)[1] >= 1
    assert times(again.stdout)[0] < times(out)[0]
