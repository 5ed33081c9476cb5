"""File-based first-principles labellers (explore_label_train/dft): task folders written from templates with
DP-GEN's keys, the recorded real outputs of ../shared/dft-outputs replayed into them by a fake executable
(tests/fixtures/dft/fake_dft.sh), labels equal to dpdata's own reading in the frame's atom order and orientation,
and non-converged, crashed or foreign outputs failing with their reason.  CP2K runs for real when Debian's cp2k
and cp2k-data are installed."""

from __future__ import annotations

import json
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest

from dpmd.errors import ConfigError
from explore_label_train import dft
from explore_label_train.dft import LabelFailed

from tests.conftest import SHARED

DFT = SHARED / "dft-outputs"
FIXTURES = Path(__file__).parent / "fixtures" / "dft"
FAKE = FIXTURES / "fake_dft.sh"

pytestmark = pytest.mark.skipif(not DFT.is_dir(), reason="recorded first-principles outputs (../shared/dft-outputs) "
                                                          "not available")


def reference(path, fmt, **kwargs):
    """dpdata's own reading of a recorded output (its warnings about unconverged frames silenced)."""
    import dpdata

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return dpdata.LabeledSystem(path if isinstance(path, list) else str(path), fmt=fmt, **kwargs)


def frame_of(system, i=0, periodic=True):
    """A campaign payload's frame (symbols, positions, cell) from a dpdata system."""
    names = system["atom_names"]
    return {"symbols": [re.sub(r"\d.*", "", str(names[t])) for t in system["atom_types"]],
            "positions": system["coords"][i].tolist(), "cell": system["cells"][i].tolist() if periodic else None}


def recorded_run(tmp_path, **entries) -> Path:
    """A folder for the fake executable: entries name -> a file to copy or the text to write; `stdout` is what
    the code prints, a name with a slash is a file in a subfolder (OUT.ABACUS/running_scf.log)."""
    folder = tmp_path / "recorded"
    for name, source in entries.items():
        target = folder / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(source, Path):
            shutil.copyfile(source, target)
        else:
            target.write_text(source)
    return folder


def pp_files(tmp_path, names: dict) -> dict:
    """Stand-in pseudopotential / POTCAR / orbital files {element: name} in tmp_path/pp (the fake never reads them)."""
    (tmp_path / "pp").mkdir(exist_ok=True)
    for el, name in names.items():
        (tmp_path / "pp" / name).write_text(f"stand-in for the {el} file {name}\n")
    return names


def settings(tmp_path, code, type_map, **keys):
    return dft.check_settings({"code": code, **keys}, type_map, tmp_path)


def run(lab, frame, tmp_path, recorded, name="task", exit_status=0):
    """Label one frame through dft.label with the fake executable replaying `recorded`."""
    lab = dict(lab, command=f"FAKE_DFT_EXIT={exit_status} sh {FAKE} {recorded}")
    return dft.label({**frame, "dft": lab, "folder": str(tmp_path / name)})


def assert_label(label, ref, i=0):
    assert label["energy"] == pytest.approx(float(ref["energies"][i]), abs=1e-9)
    np.testing.assert_allclose(label["forces"], ref["forces"][i], atol=1e-9)
    if ref.has_virial():
        np.testing.assert_allclose(label["virial"], ref["virials"][i], atol=1e-8)


# ---------------------------------------------------------------------------------------------------- VASP
def vasp(tmp_path, type_map, **keys):
    files = pp_files(tmp_path, {el: f"POTCAR.{el}" for el in type_map})
    return settings(tmp_path, "vasp", type_map, fp_incar=str(FIXTURES / "INCAR"), fp_pp_path="pp",
                    fp_pp_files=[files[el] for el in type_map], **keys)


def test_vasp_label_is_dpdata_first_ionic_step(tmp_path):
    outcar = DFT / "vasp" / "OUTCAR.h2o.md"
    ref = reference(outcar, "vasp/outcar")
    lab = vasp(tmp_path, ["O", "H"])
    label = run(lab, frame_of(ref), tmp_path, recorded_run(tmp_path, OUTCAR=outcar))
    assert_label(label, ref)
    text = outcar.read_text()
    assert label["energy"] == float(re.search(r"free  energy   TOTEN\s*=\s*(\S+)", text)[1])
    task = tmp_path / "task"
    assert (task / "POTCAR").read_text() == "stand-in for the O file POTCAR.O\nstand-in for the H file POTCAR.H\n"
    # KSPACING 0.5 Å⁻¹ on the 10 Å cell: ceil(2π / 10 / 0.5) = 2 per direction, Γ-centred (KGAMMA)
    assert (task / "KPOINTS").read_text().splitlines()[2:4] == ["Gamma", "2 2 2"]
    assert dft.transfer_files(task) == (["POSCAR", "INCAR", "POTCAR", "KPOINTS"], ["OUTCAR", "exit_code", "fp.log"])
    # OUTCAR exists after any run (an empty one: a crash), so a cluster dispatcher can always fetch it back
    assert dft.task_command(dict(lab, command="vasp_std")) == \
        "vasp_std > fp.log 2>&1; echo $? > exit_code; touch OUTCAR"


def test_dpdata_vasp_energy_is_free_energy_toten():
    """dpdata's OUTCAR energy is F ("free  energy   TOTEN"), consistent with the forces, not the σ→0 value:
    the converged ionic step of the smeared (ISMEAR = 1, SIGMA = 0.2) CH4 run shows them apart."""
    outcar = DFT / "vasp" / "OUTCAR.ch4.unconverged"
    ref = reference(outcar, "vasp/outcar")
    text = outcar.read_text()
    toten = float(re.findall(r"free  energy   TOTEN\s*=\s*(\S+)", text)[-1])
    sigma0 = float(re.findall(r"energy\(sigma->0\)\s*=\s*(\S+)", text)[-1])
    assert len(ref) == 1 and ref["energies"][0] == toten and abs(toten - sigma0) > 1e-3


def test_vasp_reorders_and_rotates_back(tmp_path):
    """A frame with interleaved atoms and a rotated cell: POSCAR groups the elements and has dpdata's
    lower-triangular cell; the label comes back in the frame's atom order and orientation."""
    outcar = DFT / "vasp" / "OUTCAR.h2o.md"
    ref = reference(outcar, "vasp/outcar")
    perm = np.array([2, 0, 3, 1, 4, 5])       # H O H O H H
    rot = np.linalg.qr(np.random.default_rng(0).normal(size=(3, 3)))[0]
    rot *= np.linalg.det(rot)                  # a proper rotation
    frame = frame_of(ref)
    frame = {"symbols": [frame["symbols"][i] for i in perm], "positions": (ref["coords"][0][perm] @ rot).tolist(),
             "cell": (ref["cells"][0] @ rot).tolist()}
    label = run(vasp(tmp_path, ["O", "H"]), frame, tmp_path, recorded_run(tmp_path, OUTCAR=outcar))
    np.testing.assert_allclose(label["forces"], ref["forces"][0][perm] @ rot, atol=1e-8)
    np.testing.assert_allclose(label["virial"], rot.T @ ref["virials"][0] @ rot, atol=1e-7)
    assert label["energy"] == ref["energies"][0]
    assert (tmp_path / "task" / "POSCAR").read_text().splitlines()[5:7] == ["O H ", "2 4 "]


@pytest.mark.parametrize("outcar, nelm", [("OUTCAR.ch4.unconverged", 15), ("OUTCAR.ch4.converged", 1)])
def test_vasp_nelm_reached_fails(tmp_path, outcar, nelm):
    """CH4, ionic step 1 stopped at NELM.  ch4.unconverged is a 3-step MD whose steps 1 and 2 reached NELM = 15:
    dpdata keeps step 3, another geometry, which must not become the POSCAR's label.  ch4.converged stopped
    after its single electronic step, NELM = 1, though VASP printed 'aborting loop because EDIFF is reached'
    (its energy, +18 eV, is far from the converged -24 eV): dpdata drops it too."""
    path = DFT / "vasp" / outcar
    everything = reference(path, "vasp/outcar", convergence_check=False)
    assert len(reference(path, "vasp/outcar")) == (1 if nelm == 15 else 0)
    with pytest.raises(LabelFailed, match=rf"^vasp: SCF not converged \(NELM = {nelm} reached\) in .*OUTCAR$"):
        run(vasp(tmp_path, ["H", "C"]), frame_of(everything), tmp_path, recorded_run(tmp_path, OUTCAR=path))


def test_vasp_foreign_geometry_fails(tmp_path):
    """An OUTCAR that is not this frame's (a stale or misplaced output) is no label for it."""
    outcar = DFT / "vasp" / "OUTCAR.h2o.md"
    frame = frame_of(reference(outcar, "vasp/outcar"))
    with pytest.raises(LabelFailed, match=r"OUTCAR holds atoms O O H H H H, the task wrote H H H H O O$"):
        run(vasp(tmp_path, ["H", "O"]), frame, tmp_path, recorded_run(tmp_path, OUTCAR=outcar))   # POSCAR: H first
    frame["positions"][3][0] += 0.2
    with pytest.raises(LabelFailed, match=r"positions in .*OUTCAR differ from the task's frame by up to 0\.2 Å"):
        run(vasp(tmp_path, ["O", "H"]), frame, tmp_path, recorded_run(tmp_path, OUTCAR=outcar), name="moved")


# ---------------------------------------------------------------------------------------------------- CP2K
def cp2k(tmp_path, type_map):
    return settings(tmp_path, "cp2k", type_map, external_input_path=str(FIXTURES / "cp2k_water.inp"))


def test_cp2k_label_is_dpdata_reading(tmp_path):
    out = DFT / "cp2k" / "cp2k_output.converged"
    ref = reference(out, "cp2k/output")
    assert ref.has_virial()
    label = run(cp2k(tmp_path, ["Fe", "O"]), frame_of(ref), tmp_path, recorded_run(tmp_path, stdout=out))
    assert_label(label, ref)
    task = tmp_path / "task"
    text = (task / "input.inp").read_text()
    assert "ABC" not in text and re.search(r"^      A 5\.0380000000 0\.0000000000 0\.0000000000$", text, re.M)
    assert (task / "coord.xyz").read_text().splitlines()[12].split()[0] == "O"
    assert dft.task_command(dict(cp2k(tmp_path, ["O"]), command="mpirun -n 4 cp2k.psmp")) == \
        "mpirun -n 4 cp2k.psmp -i input.inp > output 2>&1; echo $? > exit_code"


def test_cp2k_unconverged_fails(tmp_path):
    out = DFT / "cp2k" / "cp2k_output.unconverged"
    assert len(reference(out, "cp2k/output")) == 0
    frame = {"symbols": ["O"], "positions": [[0.0, 0.0, 0.0]], "cell": np.eye(3).tolist()}
    with pytest.raises(LabelFailed, match=r"^cp2k: SCF not converged \('SCF run NOT converged'\) in .*output$"):
        run(cp2k(tmp_path, ["O"]), frame, tmp_path, recorded_run(tmp_path, stdout=out))


# ---------------------------------------------------------------------------------------------------- QE
def qe(tmp_path, type_map):
    files = pp_files(tmp_path, {"H": "H.tm.pbe.UPF", "C": "C.tm.pbe.UPF", "O": "O.tm.pbe.UPF"})
    return settings(tmp_path, "pwscf", type_map, fp_pp_path="pp", fp_pp_files={el: files[el] for el in type_map},
                    user_fp_params={"control": {"calculation": "scf"}, "system": {"ecutwfc": 110, "input_dft": "PBE"},
                                    "electrons": {"conv_thr": 1e-8}, "kspacing": 0.5})


@pytest.mark.parametrize("run_name, type_map", [("01", ["H", "C"]), ("02", ["O", "H"])])
def test_qe_label_is_dpdata_reading(tmp_path, run_name, type_map):
    ref = reference([str(DFT / "qe" / f"{run_name}.in"), str(DFT / "qe" / f"{run_name}.out")], "qe/pw/scf")
    assert ref.has_virial()
    label = run(qe(tmp_path, type_map), frame_of(ref), tmp_path,
                recorded_run(tmp_path, stdout=DFT / "qe" / f"{run_name}.out"))
    assert_label(label, ref)
    text = (tmp_path / "task" / "input").read_text()
    assert re.search(r"calculation\s*=\s*'scf'", text) and re.search(r"pseudo_dir\s*=\s*'\./'", text)
    assert sorted(p.name for p in (tmp_path / "task").glob("*.UPF")) == sorted(f"{el}.tm.pbe.UPF" for el in type_map)


def test_qe_unconverged_fails(tmp_path):
    """No non-converged pw.x run is recorded: 01.out with its convergence line replaced by the one pw.x prints
    when electron_maxstep is reached."""
    out = (DFT / "qe" / "01.out").read_text()
    out = re.sub(r"convergence has been achieved in +\d+ iterations",
                 "convergence NOT achieved after   8 iterations: stopping", out)
    ref = reference([str(DFT / "qe" / "01.in"), str(DFT / "qe" / "01.out")], "qe/pw/scf")
    with pytest.raises(LabelFailed, match=r"^qe: SCF not converged \('convergence NOT achieved'\) in .*output$"):
        run(qe(tmp_path, ["H", "C"]), frame_of(ref), tmp_path, recorded_run(tmp_path, stdout=out))


# ---------------------------------------------------------------------------------------------------- ABACUS
ABACUS = DFT / "abacus" / "md.unconv"


def abacus_scf_log(step: int) -> str:
    """One SCF of the recorded ABACUS MD run as an SCF run's log: the log's header and the block of MD step
    `step` (its electronic iterations, final energy, forces and stress).  Step 0 is the STRU's geometry,
    converged; step 4 did not converge."""
    lines = (ABACUS / "OUT.ABACUS" / "running_md.log").read_text().splitlines(keepends=True)
    starts = [i - 1 for i, line in enumerate(lines) if "STEP OF MOLECULAR DYNAMICS" in line]
    return "".join(lines[:starts[0]] + lines[starts[step]:starts[step + 1]])


def abacus(tmp_path):
    pp = pp_files(tmp_path, {"H": "H_ONCV_PBE-1.0.upf", "O": "O_ONCV_PBE-1.0.upf"})
    orb = pp_files(tmp_path, {"H": "H_gga_6au_60Ry_2s1p.orb", "O": "O_gga_6au_60Ry_2s2p1d.orb"})
    return settings(tmp_path, "abacus", ["H", "O"], fp_incar=str(ABACUS / "INPUT"), fp_pp_path="pp",
                    fp_pp_files=[pp["H"], pp["O"]], fp_orb_files=[orb["H"], orb["O"]])


def test_abacus_label_is_dpdata_reading(tmp_path):
    log = abacus_scf_log(0)
    recorded = tmp_path / "reference"     # the recorded run laid out as an SCF run, as dpdata reads one
    (recorded / "OUT.ABACUS").mkdir(parents=True)
    shutil.copyfile(ABACUS / "INPUT", recorded / "INPUT")
    shutil.copyfile(ABACUS / "STRU", recorded / "STRU")
    (recorded / "OUT.ABACUS" / "running_scf.log").write_text(log)
    ref = reference(recorded, "abacus/scf")
    md = reference(ABACUS, "abacus/md")
    assert ref["energies"][0] == pytest.approx(md["energies"][0], abs=1e-6) and ref.has_virial()
    np.testing.assert_allclose(ref["forces"][0], md["forces"][0], atol=1e-6)
    import dpdata

    frame = frame_of(dpdata.System(str(ABACUS / "STRU"), fmt="abacus/stru"))
    label = run(abacus(tmp_path), frame, tmp_path, recorded_run(tmp_path, **{"OUT.ABACUS/running_scf.log": log}))
    assert_label(label, ref)
    params = dict(line.split(None, 1) for line in (tmp_path / "task" / "INPUT").read_text().splitlines()[1:])
    assert (params["calculation"], params["cal_force"], params["pseudo_dir"]) == ("scf", "1", "./")
    assert not (tmp_path / "task" / "KPT").exists()   # gamma_only 1


def test_abacus_unconverged_fails(tmp_path):
    import dpdata

    frame = frame_of(dpdata.System(str(ABACUS / "STRU"), fmt="abacus/stru"))
    recorded = recorded_run(tmp_path, **{"OUT.ABACUS/running_scf.log": abacus_scf_log(4)})
    with pytest.raises(LabelFailed, match=r"^abacus: SCF not converged \('convergence has not been achieved'\) in "
                                          r".*OUT\.ABACUS/running_scf\.log$"):
        run(abacus(tmp_path), frame, tmp_path, recorded)


# ---------------------------------------------------------------------------------------------------- Gaussian
def gaussian(tmp_path):
    return settings(tmp_path, "gaussian", ["C", "H"],
                    fp_params={"keywords": "force b3lyp/6-31g**", "multiplicity": 1, "nproc": 4})


def test_gaussian_label_is_dpdata_reading(tmp_path):
    out = DFT / "gaussian" / "methane.converged.gaussianlog"
    ref = reference(out, "gaussian/log")
    label = run(gaussian(tmp_path), frame_of(ref, periodic=False), tmp_path, recorded_run(tmp_path, stdout=out))
    assert_label(label, ref)
    assert label["virial"] is None
    lines = (tmp_path / "task" / "input").read_text().splitlines()
    assert lines[:2] == ["%nproc=4", "#force b3lyp/6-31g**"] and lines[5] == "0 1"
    from ase import Atoms   # an ase.Atoms frame writes the same input

    frame = frame_of(ref, periodic=False)
    dft.make_task(gaussian(tmp_path), Atoms(frame["symbols"], frame["positions"]), tmp_path / "atoms")
    assert (tmp_path / "atoms" / "input").read_text() == "\n".join(lines) + "\n"


def test_gaussian_unconverged_fails(tmp_path):
    out = DFT / "gaussian" / "unconverged.gaussianlog"
    assert len(reference(out, "gaussian/log")) == 0
    frame = frame_of(reference(DFT / "gaussian" / "methane.converged.gaussianlog", "gaussian/log"), periodic=False)
    with pytest.raises(LabelFailed, match=r"^gaussian: SCF not converged \('Convergence failure -- run terminated"):
        run(gaussian(tmp_path), frame, tmp_path, recorded_run(tmp_path, stdout=out))


# ---------------------------------------------------------------------------------------------------- crashes
def converged_case(code, tmp_path):
    """(settings, frame, {recorded file: converged output text}) of each code's converged recording."""
    import dpdata

    if code == "vasp":
        path = DFT / "vasp" / "OUTCAR.h2o.md"
        return vasp(tmp_path, ["O", "H"]), frame_of(reference(path, "vasp/outcar")), {"OUTCAR": path.read_text()}
    if code == "cp2k":
        path = DFT / "cp2k" / "cp2k_output.converged"
        return cp2k(tmp_path, ["Fe", "O"]), frame_of(reference(path, "cp2k/output")), {"stdout": path.read_text()}
    if code == "qe":
        ref = reference([str(DFT / "qe" / "01.in"), str(DFT / "qe" / "01.out")], "qe/pw/scf")
        return qe(tmp_path, ["H", "C"]), frame_of(ref), {"stdout": (DFT / "qe" / "01.out").read_text()}
    if code == "abacus":
        frame = frame_of(dpdata.System(str(ABACUS / "STRU"), fmt="abacus/stru"))
        return abacus(tmp_path), frame, {"OUT.ABACUS/running_scf.log": abacus_scf_log(0)}
    path = DFT / "gaussian" / "methane.converged.gaussianlog"
    return gaussian(tmp_path), frame_of(reference(path, "gaussian/log"), periodic=False), {"stdout": path.read_text()}


CRASHED = {"vasp": r"no ionic step finished \(crashed or killed\) in .*OUTCAR; fp\.log is empty or missing",
           "cp2k": r"no 'PROGRAM ENDED AT' \(crashed or killed\) in .*output; last line of output: ",
           "qe": r"no 'JOB DONE\.' \(crashed or killed\) in .*output; last line of output: ",
           "abacus": r"no final energy \(crashed or killed\) in .*running_scf\.log; output is empty or missing",
           "gaussian": r"no 'Normal termination' \(crashed or killed\) in .*output; last line of output: "}


@pytest.mark.parametrize("code", list(CRASHED))
def test_truncated_output_fails(tmp_path, code):
    """A run killed a third of the way through its output."""
    lab, frame, files = converged_case(code, tmp_path)
    cut = {name: "".join(text.splitlines(keepends=True)[:len(text.splitlines()) // 3]) for name, text in files.items()}
    with pytest.raises(LabelFailed, match=rf"^{code}: {CRASHED[code]}"):
        run(lab, frame, tmp_path, recorded_run(tmp_path, **cut))


@pytest.mark.parametrize("code", list(CRASHED))
def test_command_not_found_or_failed_fails(tmp_path, code):
    """A command that is not there (the reason names its error), and one whose output looks complete but that
    exited with an error."""
    lab, frame, files = converged_case(code, tmp_path)
    stdout = dft.CODES[code].stdout
    with pytest.raises(LabelFailed, match=rf"^{code}: .*; last line of {stdout}: .*no-such-dft-code: not found"):
        dft.label({**frame, "dft": dict(lab, command="no-such-dft-code"), "folder": str(tmp_path / "task")})
    with pytest.raises(LabelFailed, match=rf"^{code}: `.*fake_dft\.sh .*` exited with status 3 in .*again"):
        run(lab, frame, tmp_path, recorded_run(tmp_path, **files), name="again", exit_status=3)


def test_rerun_task_folder_is_emptied_and_foreign_folder_refused(tmp_path):
    lab, frame, files = converged_case("qe", tmp_path)
    run(lab, frame, tmp_path, recorded_run(tmp_path, **files))
    (tmp_path / "task" / "stale").write_text("from the attempt before")
    dft.make_task(lab, frame, tmp_path / "task")
    assert not (tmp_path / "task" / "stale").exists() and not (tmp_path / "task" / "output").exists()
    (tmp_path / "task" / "frame.json").write_text("{")   # a folder cut short while it was written: still ours
    (tmp_path / "task" / "half.UPF").write_text("half a copy")
    dft.make_task(lab, frame, tmp_path / "task")
    assert json.loads((tmp_path / "task" / "frame.json").read_text())["code"] == "qe"
    assert not (tmp_path / "task" / "half.UPF").exists()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("the user's")
    with pytest.raises(Exception, match=r"other: not empty and not a labelling task folder"):
        dft.make_task(lab, frame, tmp_path / "other")


@pytest.mark.parametrize("code", ["vasp", "cp2k", "qe", "abacus", "gaussian"])
def test_checked_settings_check_again_unchanged(tmp_path, code):
    """A campaign resumed from its stored, normalised labeller block gets the same block back."""
    lab = converged_case(code, tmp_path)[0]
    assert dft.check_settings(json.loads(json.dumps(lab)), lab["type_map"], tmp_path / "elsewhere") == lab


def test_fingerprint_follows_template_and_pseudopotential_contents(tmp_path):
    shutil.copyfile(FIXTURES / "INCAR", tmp_path / "INCAR")
    lab = vasp(tmp_path, ["O", "H"])
    lab["fp_incar"] = str(tmp_path / "INCAR")
    first = dft.fingerprint(lab)
    assert dft.fingerprint(dict(lab, command="mpirun -n 64 vasp_std")) == first
    (tmp_path / "INCAR").write_text((FIXTURES / "INCAR").read_text().replace("ENCUT = 500", "ENCUT = 400"))
    second = dft.fingerprint(lab)
    (tmp_path / "pp" / "POTCAR.H").write_text("another H potential\n")
    assert len({first, second, dft.fingerprint(lab)}) == 3


def test_frames_that_a_code_cannot_take(tmp_path):
    molecule = {"symbols": ["O", "H", "H"], "positions": [[0, 0, 0.1], [0.76, 0, -0.5], [-0.76, 0, -0.5]],
                "cell": None}
    with pytest.raises(LabelFailed, match=r"^cp2k: the frame has no cell; set labeller\.box"):
        dft.make_task(cp2k(tmp_path, ["O", "H"]), molecule, tmp_path / "a")
    boxed = dft.make_task(dict(cp2k(tmp_path, ["O", "H"]), box=12.0), molecule, tmp_path / "b")
    assert "A 12.0000000000 0.0000000000 0.0000000000" in (boxed / "input.inp").read_text()
    with pytest.raises(LabelFailed, match=r"^gaussian: labels molecules only"):
        dft.make_task(gaussian(tmp_path), dict(molecule, cell=np.eye(3).tolist()), tmp_path / "c")


# ---------------------------------------------------------------------------------------------------- config
BAD = [
    ({"code": "siesta"}, r"'labeller\.code': unknown code 'siesta'; valid: vasp, cp2k, qe, abacus, gaussian, pwscf"),
    ({"code": "vasp", "fp_incar": "INCAR", "fp_pp_files": ["a", "b"], "encut": 500},
     r"'labeller\.encut': unknown key for code vasp"),
    ({"code": "vasp", "fp_incar": "missing.INCAR", "fp_pp_files": ["a", "b"]}, r"'labeller\.fp_incar': no file"),
    ({"code": "vasp", "fp_incar": "NSW3", "fp_pp_files": ["a", "b"]}, r"sets NSW = 3: a label is one SCF"),
    ({"code": "vasp", "fp_incar": "NOKSPACING", "fp_pp_files": ["a", "b"]}, r"sets no KSPACING"),
    ({"code": "vasp", "fp_incar": "INCAR", "fp_pp_files": ["a"]}, r"'labeller\.fp_pp_files' lists 1 files for the 2"),
    ({"code": "vasp", "fp_incar": "INCAR", "fp_pp_files": {"O": "a"}}, r"'labeller\.fp_pp_files' has no file for H"),
    ({"code": "cp2k", "external_input_path": "NOKSPACING"}, r"needs one line `ABC \.\.\.` in &CELL"),
    ({"code": "cp2k", "user_fp_params": {}}, r"'labeller\.user_fp_params': unknown key for code cp2k"),
    ({"code": "qe", "fp_pp_files": ["a", "b"], "user_fp_params": {"system": {}}},
     r"'labeller\.user_fp_params\.kspacing' is required"),
    ({"code": "gaussian", "fp_params": {"keywords": "b3lyp/6-31g**", "multiplicity": 1}},
     r"'labeller\.fp_params\.keywords' 'b3lyp/6-31g\*\*' must ask for forces"),
    ({"code": "abacus", "user_fp_params": {"basis_type": "pw"}, "fp_pp_files": ["a", "b"]}, r"abacus needs k-points"),
    ({"code": "vasp", "fp_incar": "INCAR", "fp_pp_files": ["a", "b"], "box": -1}, r"'labeller\.box' must be"),
]


@pytest.mark.parametrize("lab, message", BAD, ids=[m[:40] for _, m in BAD])
def test_bad_settings_are_one_line(tmp_path, lab, message):
    shutil.copyfile(FIXTURES / "INCAR", tmp_path / "INCAR")
    (tmp_path / "NSW3").write_text("KSPACING = 0.3\nNSW = 3\n")
    (tmp_path / "NOKSPACING").write_text("ENCUT = 400\n")
    pp_files(tmp_path, {"O": "a", "H": "b"})
    with pytest.raises(ConfigError, match=message) as err:
        dft.check_settings(dict(lab, fp_pp_path="pp") if "fp_pp_files" in lab else lab, ["O", "H"], tmp_path)
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------------------------------------------- CP2K for real
def test_cp2k_end_to_end(tmp_path):
    """Debian's cp2k (2023.1) labels a water molecule in a 6 Å cell (PBE, SZV-MOLOPT-GTH, ~5 s): the label
    is dpdata's reading of its output, and a copy of the frame with the atoms reordered and the cell
    rotated gets the same label reordered and rotated."""
    if shutil.which("cp2k.psmp") is None or not Path("/usr/share/cp2k/BASIS_MOLOPT").is_file():
        pytest.skip("cp2k.psmp and its data (Debian: apt-get install cp2k) not installed")
    lab = dict(cp2k(tmp_path, ["O", "H"]), command="cp2k.psmp")
    frame = {"symbols": ["O", "H", "H"], "positions": [[3.0, 3.0, 3.1], [3.76, 3.0, 2.5], [2.24, 3.05, 2.5]],
             "cell": (np.eye(3) * 6.0).tolist()}
    label = dft.label({**frame, "dft": lab, "folder": str(tmp_path / "water"), "threads": 1})
    ref = reference(tmp_path / "water" / "output", "cp2k/output")
    assert_label(label, ref)
    assert abs(label["energy"] + 466.7) < 0.5     # PBE water, -17.15 Ha
    perm = np.array([1, 0, 2])
    rot = np.linalg.qr(np.random.default_rng(1).normal(size=(3, 3)))[0]
    rot *= np.linalg.det(rot)
    turned = {"symbols": [frame["symbols"][i] for i in perm],
              "positions": (np.asarray(frame["positions"])[perm] @ rot).tolist(),
              "cell": (np.eye(3) * 6.0 @ rot).tolist()}
    again = dft.label({**turned, "dft": lab, "folder": str(tmp_path / "turned"), "threads": 1})
    assert again["energy"] == pytest.approx(label["energy"], abs=1e-6)
    np.testing.assert_allclose(again["forces"], label["forces"][perm] @ rot, atol=1e-4)
    meta = json.loads((tmp_path / "turned" / "frame.json").read_text())
    assert meta["order"] == [0, 1, 2] and not np.allclose(meta["rotation"], np.eye(3))
