"""Campaigns labelled by a file-based DFT code (explore_label_train/dft): a fake `vasp` replays the recorded
VASP runs of ../shared/dft-outputs into each task folder (the water MD's first ionic step, with the task's own
positions; the CH4 run whose SCF stopped at NELM for tasks named ...1), through the local pool and through a
real local Slurm; an `elt run` killed with its label jobs in flight re-attaches to them (each frame computed
once, no label lost or duplicated).  Also: the ASE labeller's force-consistent energy."""

from __future__ import annotations

import json
import re
import shutil
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from ase.calculators.calculator import Calculator, PropertyNotImplementedError, all_changes

from dpmd.errors import ConfigError
from explore_label_train import dft
from explore_label_train.campaign import Campaign
from explore_label_train.config import load_campaign
from explore_label_train.labelers import label
from explore_label_train.report import status_table, write_report
from tests.conftest import SHARED
from tests.test_elt import write_campaign
from tests.test_elt_dispatch_stages import kill_with_jobs_in_flight
from tests.test_slurm import slurm_dispatcher

DFT = SHARED / "dft-outputs"
INCAR = Path(__file__).parent / "fixtures" / "dft" / "INCAR"
NELM = r"^vasp: SCF not converged \(NELM = 15 reached\) in .*OUTCAR$"

FAKE_VASP = textwrap.dedent('''
    """A stand-in for VASP: the recorded water OUTCAR with this task's POSCAR positions in its first ionic step
    (its energy, forces and stress unchanged); in a task folder named ...1, the recorded CH4 OUTCAR whose first
    ionic step reached NELM.  usage: fake_vasp.py RECORDED_DIR [RUN_LOG SECONDS]: with RUN_LOG, each run first
    appends its folder's name there, then takes SECONDS."""
    import os, shutil, sys, time
    import ase.io

    recorded = sys.argv[1]
    if len(sys.argv) > 3:
        with open(sys.argv[2], "a") as fh:
            fh.write(os.path.basename(os.getcwd()) + "\\n")
        time.sleep(float(sys.argv[3]))
    if os.path.basename(os.getcwd()).endswith("1"):
        shutil.copyfile(os.path.join(recorded, "OUTCAR.ch4.unconverged"), "OUTCAR")
        sys.exit(0)
    positions = ase.io.read("POSCAR", format="vasp").positions
    head, rest = open(os.path.join(recorded, "OUTCAR.h2o.md")).read().split(" POSITION", 1)
    lines = rest.split("\\n")   # the header's end, a rule, then one line per atom: x y z fx fy fz
    for i, xyz in enumerate(positions):
        lines[2 + i] = "".join(f"{x:13.5f}" for x in xyz) + "  " + "  ".join(lines[2 + i].split()[3:])
    open("OUTCAR", "w").write(head + " POSITION" + "\\n".join(lines))
    print("fake vasp: done")
''')

pytestmark = pytest.mark.skipif(not DFT.is_dir(), reason="recorded first-principles outputs (../shared/dft-outputs) "
                                                          "not available")


def recorded_water():
    """dpdata's reading of the recorded water MD (its frame 0 is what the fake VASP labels)."""
    import warnings

    import dpdata

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return dpdata.LabeledSystem(str(DFT / "vasp" / "OUTCAR.h2o.md"), fmt="vasp/outcar")


def dft_campaign(tmp_path, **over) -> dict:
    """Two water molecules in the recorded 10 Å cell, labelled by the fake VASP; a tiny ensemble, short MD."""
    import ase
    import ase.io

    ref = recorded_water()
    atoms = ase.Atoms([ref["atom_names"][t] for t in ref["atom_types"]], positions=ref["coords"][0],
                      cell=ref["cells"][0], pbc=True)
    ase.io.write(tmp_path / "water.extxyz", atoms)
    (tmp_path / "fake_vasp.py").write_text(FAKE_VASP)
    (tmp_path / "pp").mkdir(exist_ok=True)
    for el in ("O", "H"):
        (tmp_path / "pp" / f"POTCAR.{el}").write_text(f"stand-in for the {el} POTCAR\n")
    shutil.copyfile(INCAR, tmp_path / "INCAR")
    cfg = {
        "work_dir": str(tmp_path / "camp"),
        "type_map": ["O", "H"],
        "structures": {"water": {"file": "water.extxyz"}},
        "initial": {"structures": ["water"], "perturb": 4, "displacement": 0.02, "cell_strain": 0.0},
        "train": {"ensemble_size": 2, "numb_steps": 8, "reuse_numb_steps": 4, "template": {
            "model": {"descriptor": {"type": "se_e2_a", "sel": "auto", "rcut": 4.0, "rcut_smth": 0.5,
                                     "neuron": [4, 8], "axis_neuron": 4}, "fitting_net": {"neuron": [8, 8]}},
            "learning_rate": {"start_lr": 0.001, "stop_lr": 1e-4, "decay_steps": 4},
            "loss": {"start_pref_e": 0.02, "limit_pref_e": 1, "start_pref_f": 1000, "limit_pref_f": 1},
            "training": {"training_data": {"batch_size": 1}}}},
        "explore": [{"name": "nvt", "structures": ["water"], "temperatures": [100], "steps": 20, "traj_interval": 5,
                     "timestep": 0.25}],
        "trust": {"lo": 0.0, "hi": 1e6},        # every explored frame is a candidate
        "select": {"budget": 3, "holdout": 0},
        "filters": {"min_distance": 0.5},
        "labeller": {"code": "vasp", "command": f"{sys.executable} {tmp_path / 'fake_vasp.py'} {DFT / 'vasp'}",
                     "fp_incar": "INCAR", "fp_pp_path": "pp", "fp_pp_files": ["POTCAR.O", "POTCAR.H"]},
        "dispatcher": {"workers": 1, "timeout": 120},
        "convergence": {"accurate_ratio": None, "max_iterations": 2, "max_labels": 100},
    }
    cfg.update(over)
    return cfg


def check_dft_labels(camp: Campaign) -> None:
    """Every label is the recorded first ionic step (the fake's energy, forces and virial) at its task's frame;
    every failed task is a NELM failure of a folder named ...1, and no label came from one."""
    ref = recorded_water()
    st = camp.state
    labels = st.q("SELECT * FROM labels")
    assert labels and {r["settings_hash"] for r in labels} == {dft.fingerprint(camp.cfg["labeller"])}
    assert {r["labeller"] for r in labels} == {"vasp"}
    for r in labels:
        z = np.load(camp.root / r["file"])
        assert [str(s) for s in z["symbols"]] == ["O", "O", "H", "H", "H", "H"]
        assert float(z["energy"]) == float(ref["energies"][0]) == r["energy"]
        np.testing.assert_allclose(z["force"], ref["forces"][0], atol=1e-9)
        np.testing.assert_allclose(z["virial"], ref["virials"][0], atol=1e-8)
    failed = st.q("SELECT task_id, reason FROM tasks WHERE status='failed'")
    assert failed and all(r["task_id"].endswith("1") for r in failed)
    assert all(re.match(NELM, r["reason"]) for r in failed), failed
    assert not {r["task_id"] for r in failed} & {r["task_id"] for r in labels}
    done = st.q("SELECT task_id FROM tasks WHERE kind='label' AND status='done'")
    assert sorted(r[0] for r in done) == sorted(r["task_id"] for r in labels)
    assert st.one("SELECT COUNT(*) FROM tasks WHERE kind='label' AND status='pending'") == 0


def test_campaign_labelled_by_a_dft_code_through_the_local_pool(tmp_path):
    path = write_campaign(tmp_path, dft_campaign(tmp_path))
    camp = Campaign(load_campaign(path), log=None)
    assert camp.run() == "max_iterations"
    check_dft_labels(camp)
    st = camp.state
    assert st.one("SELECT COUNT(*) FROM labels WHERE frame_id IS NOT NULL") >= 3     # explored frames too
    assert "i000-init-water-001" in {r[0] for r in st.q("SELECT task_id FROM tasks WHERE status='failed'")}
    task = camp.root / "dispatch" / "i000-init-water-000"                               # the code's task folder
    assert {p.name for p in task.iterdir()} >= {"POSCAR", "INCAR", "POTCAR", "KPOINTS", "OUTCAR", "frame.json"}
    assert "SCF not converged (NELM = 15 reached)" in status_table(st)
    page = write_report(st, tmp_path / "report")
    assert "label tasks that gave no label" in page.read_text() and "NELM = 15 reached" in page.read_text()
    # an edited INCAR is another labelling method: noticed, and new labels carry its settings hash
    before = camp.label_hash
    (tmp_path / "INCAR").write_text(INCAR.read_text().replace("ENCUT = 500", "ENCUT = 400"))
    notes = []
    again = Campaign(load_campaign(path), log=notes.append)
    assert again.label_hash != before and again.run() == "max_iterations"
    assert any("labeller's settings changed" in n for n in notes)


def test_dft_labeller_settings_are_checked_with_the_campaign(tmp_path):
    cfg = dft_campaign(tmp_path)
    cfg["labeller"] = dict(cfg["labeller"], encut=500)
    with pytest.raises(ConfigError, match=r"camp\.yaml: 'labeller\.encut': unknown key for code vasp") as err:
        load_campaign(write_campaign(tmp_path, cfg))
    assert "\n" not in str(err.value)
    cfg["labeller"] = dict(dft_campaign(tmp_path)["labeller"], fp_pp_files=["POTCAR.O"])
    with pytest.raises(ConfigError, match=r"'labeller\.fp_pp_files' lists 1 files for the 2 elements"):
        load_campaign(write_campaign(tmp_path, cfg))
    lab = load_campaign(write_campaign(tmp_path, dft_campaign(tmp_path)))["labeller"]
    assert lab["code"] == "vasp" and lab["fp_incar"] == str(tmp_path / "INCAR")


def test_campaign_labelled_by_a_dft_code_through_slurm(tmp_path, slurm):
    """The same campaign (one iteration), every label task a Slurm job running the fake VASP in its task folder
    (files sent and fetched by dpdispatcher), the jobs recorded with their Slurm job ids."""
    pytest.importorskip("dpdispatcher")
    disp = dict(slurm_dispatcher(tmp_path), poll_interval=1)
    cfg = dft_campaign(tmp_path, dispatcher=disp, convergence={"accurate_ratio": None, "max_iterations": 1,
                                                                "max_labels": 100})
    camp = Campaign(load_campaign(write_campaign(tmp_path, cfg)), log=None)
    assert camp.run() == "max_iterations"
    check_dft_labels(camp)
    jobs = camp.state.q("SELECT * FROM jobs WHERE kind='label'")
    tasks = [t for j in jobs for t in json.loads(j["tasks"])]
    assert sorted(tasks) == sorted(r[0] for r in camp.state.q("SELECT task_id FROM tasks WHERE kind='label'"))
    assert all(j["state"] == "finished" and j["job_id"].isdigit() for j in jobs)   # Slurm's job ids
    assert camp.state.jobs_in_flight() == []


@pytest.mark.parametrize("backend", ["shell", pytest.param("slurm", marks=pytest.mark.slow)])
def test_killed_run_reattaches_to_its_label_jobs(tmp_path, request, backend):
    """`elt run` killed (-9) while the DFT jobs of its first labels run; the next run re-attaches to them: the
    same jobs, each frame computed once, every label there once."""
    pytest.importorskip("dpdispatcher")
    from tests.test_elt_dispatch_stages import shell_dispatcher

    if backend == "slurm":
        request.getfixturevalue("slurm")
        disp = dict(slurm_dispatcher(tmp_path), poll_interval=1)
    else:
        disp = shell_dispatcher(tmp_path)
    runs = tmp_path / "runs.log"
    cfg = dft_campaign(tmp_path, dispatcher=disp, convergence={"accurate_ratio": None, "max_iterations": 1,
                                                                "max_labels": 100})
    cfg["labeller"]["command"] += f" {runs} 4"
    path = write_campaign(tmp_path, cfg)
    in_flight = kill_with_jobs_in_flight(path, "label")
    camp = Campaign(load_campaign(path), log=None)
    assert camp.state.one("SELECT COUNT(*) FROM labels") == 0
    assert camp.run() == "max_iterations"
    check_dft_labels(camp)
    after = dict(camp.state.q("SELECT job_hash, job_id FROM jobs WHERE kind='label'"))
    assert all(after[h] == job_id for h, job_id in in_flight)          # re-attached, not submitted again
    ran = runs.read_text().split()
    tasks = [r[0] for r in camp.state.q("SELECT task_id FROM tasks WHERE kind='label'")]
    assert sorted(ran) == sorted(tasks)                                 # every frame computed once


# ------------------------------------------------------------------------------- the ASE labeller's energy
class Smeared(Calculator):
    """A calculator with smearing: its energy (σ→0) and its force-consistent free energy differ."""

    implemented_properties = ["energy", "free_energy", "forces"]

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        r = float(np.linalg.norm(self.atoms.positions[1] - self.atoms.positions[0]))
        self.results = {"energy": (r - 1.0) ** 2 - 0.05, "free_energy": (r - 1.0) ** 2,
                        "forces": np.array([[1.0, 0, 0], [-1.0, 0, 0]]) * 2 * (r - 1.0) * np.sign(
                            self.atoms.positions[1, 0] - self.atoms.positions[0, 0])}


class Plain(Smeared):
    """The same without a free energy (a calculator that has none)."""

    implemented_properties = ["energy", "forces"]

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        del self.results["free_energy"]


def test_ase_labeller_takes_the_force_consistent_energy():
    import ase

    frame = {"symbols": ["H", "H"], "positions": [[0.0, 0, 0], [1.3, 0, 0]], "cell": None, "kwargs": {}}
    atoms = ase.Atoms("H2", positions=frame["positions"], calculator=Smeared())
    free = atoms.get_potential_energy(force_consistent=True)    # ASE's name for it
    assert free == pytest.approx(0.09) and atoms.get_potential_energy() == pytest.approx(0.04)
    out = label(dict(frame, calculator="tests.test_elt_dft:Smeared"))
    assert out["energy"] == pytest.approx(free, abs=1e-12)
    h = 1e-6   # it is the energy whose derivative the forces are
    plus = label(dict(frame, positions=[[0.0, 0, 0], [1.3 + h, 0, 0]], calculator="tests.test_elt_dft:Smeared"))
    assert -(plus["energy"] - out["energy"]) / h == pytest.approx(out["forces"][1][0], abs=1e-5)
    plain = label(dict(frame, calculator="tests.test_elt_dft:Plain"))
    with pytest.raises(PropertyNotImplementedError):
        ase.Atoms("H2", positions=frame["positions"], calculator=Plain()).get_potential_energy(force_consistent=True)
    assert plain["energy"] == pytest.approx(0.04, abs=1e-12)
