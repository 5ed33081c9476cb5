"""elt's LAMMPS exploration engine (explore[].engine: lammps, explore_label_train/lammps_engine.py): the input
written from a DP-GEN template (placeholders, pair_style / dump / fix dpgen_plm lines), a LAMMPS run whose frames
and model_devi.out equal dpmd's own engine (NVE from the same velocities), frames read back from a triclinic
NPT run that give the deviations LAMMPS wrote when re-evaluated with dpmd, a campaign iteration with engine
lammps, DP-GEN's template jobs in `elt import-dpgen`, and the one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from dpmd.errors import ConfigError, DpmdError
from explore_label_train.campaign import explore_group
from explore_label_train.config import LAMMPS, STAGE, load_campaign, stage_md
from explore_label_train.lammps_engine import read_dump, stage_inputs

CU = 63.546


def stage_dict(**over) -> dict:
    """A completed explore stage, as load_campaign makes it."""
    s = {**STAGE, "name": "s", "structures": ["fcc"], "ensemble": "nve", "temperatures": [300.0], "steps": 20,
         "traj_interval": 5, **over}
    s.update(stage_md(s, "explore[0]"))
    return s


def lammps_stage(tmp_path, template=None, plumed=None, **over) -> dict:
    lmp = dict(LAMMPS, rev_mat=over.pop("rev_mat", {}))
    for key, text in (("template", template), ("plumed", plumed)):
        if text is not None:
            (tmp_path / key).write_text(text)
            lmp[key] = str(tmp_path / key)
    return stage_dict(engine="lammps", lammps=lmp, **over)


TEMPLATE = """\
variable        NSTEPS  equal V_NSTEPS
units           metal
boundary        p p p
atom_style      atomic
read_data       conf.lmp
mass            1 63.5
pair_style      deepmd graph.000.pb graph.001.pb out_freq 10
pair_coeff      * *
velocity        all create V_TEMP V_SEED   # V_TEMP: from rev_mat
fix             1 all npt temp V_TEMP V_TEMP 0.1 iso V_PRES V_PRES 0.5
fix             dpgen_plm all plumed plumedfile old.plumed
dump            dpgen_dump all custom 10 traj.lammpstrj id type x y z
thermo          V_TRJ_FREQ
timestep        V_DT
run             ${NSTEPS}   # V_HEIGHT_OF_BARRIER is here only in a comment
variable        h equal V_HEIGHT+V_TEMP2
"""
NO_PLUMED = TEMPLATE.replace("fix             dpgen_plm all plumed plumedfile old.plumed\n", "")
PLUMED = "UPPER_WALLS ARG=d AT=V_HEIGHT KAPPA=V_TEMP\n"


def test_template_placeholders_and_dpgen_lines(tmp_path):
    stage = lammps_stage(tmp_path, TEMPLATE, PLUMED, ensemble="npt", temperatures=[300.0], pressures=[1.0, 2000.0],
                         timestep=2.0, rev_mat={"V_HEIGHT": 4.5, "V_TEMP2": 7})
    text, plumed = stage_inputs(stage, ["/m/a.pth", "/m/b c.pth"], [CU], 300.0, 2000.0, 17, "here")
    assert text.splitlines() == [
        "variable        NSTEPS  equal 20",
        "units           metal", "boundary        p p p", "atom_style      atomic",
        "read_data       conf.lmp",
        "mass            1 63.546",          # the campaign's masses, right after the structure ...
        "mass            1 63.5",            # ... so that the template's own still rule
        'pair_style      dpmd /m/a.pth "/m/b c.pth" out_freq 5 out_file model_devi.out',
        "pair_coeff      * *",
        "velocity        all create 300.0 17   # 300.0: from rev_mat",
        "fix             1 all npt temp 300.0 300.0 0.1 iso 2000.0 2000.0 0.5",
        "fix             dpgen_plm all plumed plumedfile input.plumed outfile output.plumed",
        "dump            dpgen_dump all custom 5 traj/*.lammpstrj id type x y z",
        "dump_modify     dpgen_dump format float %.15g",
        "thermo          5",
        "timestep        0.002",
        "run             ${NSTEPS}   # 4.5_OF_BARRIER is here only in a comment",
        "variable        h equal 4.5+7"]   # V_TEMP2: a name of its own
    assert plumed == "UPPER_WALLS ARG=d AT=4.5 KAPPA=300.0\n"


def test_default_input_is_dpgens(tmp_path):
    stage = lammps_stage(tmp_path, ensemble="npt", temperatures=[500.0], pressures=[3.0],
                         thermostat={"nose_hoover": {"damp": 0.2}}, barostat={"damp": 2.0, "mode": "tri"})
    lines = stage_inputs(stage, ["a.pth", "b.pth"], [CU], 500.0, 3.0, 1, "here")[0].splitlines()
    for line in ("variable        TEMP            equal 500.0", "variable        PRES            equal 3.0",
                 "variable        TAU_T           equal 0.2", "variable        TAU_P           equal 2.0",
                 "read_data       conf.lmp", "change_box      all triclinic", "mass            1 63.546",
                 "pair_style      dpmd a.pth b.pth out_freq ${THERMO_FREQ} out_file model_devi.out",
                 "pair_coeff      * *",
                 "dump            dpgen_dump all custom ${THERMO_FREQ} traj/*.lammpstrj id type x y z",
                 "fix             1 all npt temp ${TEMP} ${TEMP} ${TAU_T} tri ${PRES} ${PRES} ${TAU_P}",
                 "timestep        0.001", "run             ${NSTEPS}"):
        assert line in lines
    assert not any("plumed" in line or "velocity" in line for line in lines)   # conf.lmp carries the velocities
    nvt = stage_inputs(lammps_stage(tmp_path, ensemble="nvt", plumed=PLUMED, rev_mat={"V_HEIGHT": 1}),
                       ["a.pth"], [CU], 300.0, 1.0, 1, "here")[0].splitlines()
    assert "fix             1 all nvt temp ${TEMP} ${TEMP} ${TAU_T}" in nvt
    assert "change_box      all triclinic" not in nvt
    assert "fix             dpgen_plm all plumed plumedfile input.plumed outfile output.plumed" in nvt


@pytest.mark.parametrize("template, plumed, message", [
    (TEMPLATE.replace("V_TEMP2", "V_WIDTH"), PLUMED, r"template:16: placeholder V_WIDTH is not filled"),
    (TEMPLATE, PLUMED.replace("V_HEIGHT", "V_DEPTH"), r"plumed:1: placeholder V_DEPTH is not filled"),
    (TEMPLATE.replace("pair_style      deepmd", "pair_style lj/cut"), PLUMED,
     r"template: no `pair_style deepmd/dpmd` line; the models go there"),
    (TEMPLATE + "pair_style dpmd x.pth\n", PLUMED,
     r"template:17: a second `pair_style deepmd/dpmd` line \(line 7 is the first\)"),
    (TEMPLATE.replace("dpgen_dump", "1"), PLUMED, r"template: no `dump dpgen_dump` line"),
    (TEMPLATE.replace("read_data       conf.lmp", "read_data other.lmp"), PLUMED, r"no `read_data conf.lmp` line"),
    (TEMPLATE, None, r"template:11: `fix dpgen_plm` but the stage has no lammps.plumed file"),
    (TEMPLATE.replace("dpgen_plm", "2"), PLUMED, r"template: no `fix dpgen_plm` line"),
])
def test_bad_templates_are_one_line_errors(tmp_path, template, plumed, message):
    stage = lammps_stage(tmp_path, template, plumed, rev_mat={"V_HEIGHT": 4.5, "V_TEMP2": 7})
    with pytest.raises(ConfigError, match=f"^here: .*{message}") as err:
        stage_inputs(stage, ["a.pth"], [CU], 300.0, 1.0, 1, "here")
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------------------------- LAMMPS runs (plugin)
@pytest.fixture(scope="module")
def plugin():
    pytest.importorskip("lammps")
    from dpmd.lammps import build_plugin, compiler, lammps_package, mpi_include

    try:   # what the environment may lack: a compiler, LAMMPS's headers, mpi.h (a failing compile is an error)
        compiler(), lammps_package(), mpi_include()
    except DpmdError as err:
        pytest.skip(str(err))
    return build_plugin()


def cu_model(seed: int):
    """A small random Cu model (float64) with a non-trivial normalisation."""
    import torch

    from dpmd.model import DeepPot

    model = DeepPot({"type_map": ["Cu"],
                     "descriptor": {"type": "se_e2_a", "sel": [60], "rcut": 4.0, "rcut_smth": 0.5, "neuron": [4, 8],
                                    "axis_neuron": 4, "precision": "float64", "seed": seed},
                     "fitting_net": {"neuron": [8, 8], "precision": "float64", "seed": seed + 1}})
    with torch.no_grad():
        model.descriptor.mean[:, 0] = 0.1
        model.descriptor.std[:] = 0.1
        model.fitting.energy_bias[:] = -3.5
    return model.eval()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from dpmd.model.io import save_model

    d = tmp_path_factory.mktemp("cu_models")
    eager = [cu_model(10), cu_model(20)]
    for k, m in enumerate(eager):
        save_model(m, d / f"m{k}.pth")
    return [str(d / f"m{k}.pth") for k in range(2)], eager


def group_job(atoms_list, models, stage, temperatures, pressures, out) -> dict:
    """explore_group's job for these structures (what Campaign._explore_job writes)."""
    return {"models": models, "symbols": [a.get_chemical_symbols() for a in atoms_list],
            "positions": [a.positions.tolist() for a in atoms_list], "cells": [a.cell[:].tolist() for a in atoms_list],
            "masses": [[CU] * len(a) for a in atoms_list], "type_map": ["Cu"], "type_masses": [CU],
            "temperatures": temperatures, "pressures": pressures, "stage": stage, "seed": 7, "out": str(out)}


def rattled_fcc(seed=1, repeat=2, primitive=False):
    import ase.build

    atoms = ase.build.bulk("Cu", "fcc", a=3.61, cubic=not primitive).repeat(repeat)
    atoms.rattle(0.05, seed=seed)
    return atoms


def test_lammps_frames_and_deviations_equal_dpmds_engine(plugin, models, tmp_path):
    """NVE from the same velocities: LAMMPS (pair_style dpmd) and dpmd's batched Simulation report the same frames
    and deviations at the same steps; the run's files are where the docs say."""
    paths = models[0]
    atoms = [rattled_fcc(1), rattled_fcc(2)]
    ours = stage_dict()
    lmp = dict(ours, engine="lammps", lammps=dict(LAMMPS))
    assert explore_group(group_job(atoms, paths, ours, [300.0, 900.0], [1.0, 1.0], tmp_path / "dpmd.npz"))["stop"] \
        is None
    explore_group(group_job(atoms, paths, lmp, [300.0, 900.0], [1.0, 1.0], tmp_path / "lmp.npz"))
    a, b = np.load(tmp_path / "dpmd.npz"), np.load(tmp_path / "lmp.npz")
    assert sorted(a.files) == sorted(b.files)
    assert b["step"].tolist() == [5, 5, 10, 10, 15, 15, 20, 20] == a["step"].tolist()
    assert b["traj"].tolist() == a["traj"].tolist() and str(b["symbols"][0]) == "Cu"
    np.testing.assert_array_equal(b["box"], a["box"])
    d = b["coord"] - a["coord"]
    d -= np.round(d @ np.linalg.inv(a["box"][0])) @ a["box"][0]      # LAMMPS wraps atoms into the box
    assert np.abs(d).max() < 1e-9
    assert np.abs(b["coord"] - rattled_fcc(1).positions).max() > 0.01   # the atoms moved
    np.testing.assert_allclose(b["devi"], a["devi"], rtol=2e-6, atol=1e-12)   # model_devi.out: 7 digits
    assert b["devi"][:, 3].min() > 1e-3
    run = tmp_path / "lmp" / "t1"
    assert {p.name for p in run.iterdir()} >= {"conf.lmp", "input.lammps", "model_devi.out", "traj", "log.lammps"}
    assert len(list((run / "traj").glob("*.lammpstrj"))) == 5          # steps 0, 5, ..., 20


def test_triclinic_npt_frames_give_the_deviations_lammps_wrote(plugin, models, tmp_path):
    """A cell LAMMPS cannot take as it is (fcc's primitive vectors: rotated into a along x, b in xy) under NPT
    with a tilting box: each frame read back (box -> cell, ids sorted), re-evaluated by the two models with
    dpmd's deviation, gives the row model_devi.out has for that step."""
    import torch

    from dpmd.md.devi import model_deviation

    paths, eager = models
    atoms = rattled_fcc(3, repeat=3, primitive=True)
    stage = dict(stage_dict(ensemble="npt", pressures=[5000.0], barostat={"damp": 0.1, "mode": "tri"}, steps=30,
                            traj_interval=10, timestep=2.0), engine="lammps", lammps=dict(LAMMPS))
    explore_group(group_job([atoms], paths, stage, [600.0], [5000.0], tmp_path / "npt.npz"))
    z = np.load(tmp_path / "npt.npz")
    assert z["step"].tolist() == [10, 20, 30]
    cells = z["box"]
    assert np.allclose(np.triu(cells, 1), 0) and np.abs(cells[-1] - cells[0]).max() > 1e-4   # the box moved
    # step 0's frame is the start structure turned into LAMMPS's orientation: same cell shape, same fractions
    cell0, pos0 = read_dump(tmp_path / "npt" / "t0" / "traj" / "0.lammpstrj", len(atoms))[0]
    np.testing.assert_allclose(cell0 @ cell0.T, atoms.cell[:] @ atoms.cell[:].T, rtol=0, atol=1e-9)
    frac = pos0 @ np.linalg.inv(cell0) - atoms.get_scaled_positions()
    assert np.abs(frac - np.round(frac)).max() < 1e-12
    for coord, cell, row in zip(z["coord"], cells, z["devi"]):
        outs = [m(torch.tensor(coord)[None], torch.zeros(len(atoms), dtype=torch.long), torch.tensor(cell)[None])
                for m in eager]
        force = torch.stack([o["force"].detach() for o in outs])
        virial = torch.stack([o["virial"].detach().reshape(1, 3, 3) for o in outs])
        energy = torch.stack([o["energy"].detach() for o in outs])
        expected = model_deviation(force, virial, energy, len(atoms))[0].numpy()
        np.testing.assert_allclose(row, expected, rtol=1e-5, atol=1e-9)


def test_lammps_error_names_the_stage_and_input_line(plugin, models, tmp_path):
    template = NO_PLUMED.replace("velocity        all create V_TEMP V_SEED", "fix 2 all no_such_fix")
    stage = lammps_stage(tmp_path, template, rev_mat={"V_HEIGHT": 1, "V_TEMP2": 7})
    with pytest.raises(DpmdError) as err:
        explore_group(group_job([rattled_fcc()], models[0], stage, [300.0], [1.0], tmp_path / "bad.npz"))
    message = str(err.value)
    assert message.startswith(f"explore stage s: LAMMPS failed in {tmp_path / 'bad' / 't0'}: ERROR: Unrecognized fix "
                              "style 'no_such_fix'")
    assert message.endswith("(input.lammps:10: fix 2 all no_such_fix # 300.0: from rev_mat)") and "\n" not in message
    assert not (tmp_path / "bad.npz").exists()


def _has_plumed() -> bool:
    pytest.importorskip("mpi4py")
    import mpi4py.MPI  # noqa: F401  (loads libmpi for liblammps)
    import lammps

    lmp = lammps.lammps(cmdargs=["-screen", "none", "-log", "none"])
    try:
        return "PLUMED" in lmp.installed_packages
    finally:
        lmp.close()


COLVAR = "d: DISTANCE ATOMS=1,2\nPRINT ARG=d STRIDE=V_TRJ_FREQ FILE=COLVAR\n"


def test_plumed_input_runs_with_lammps(plugin, models, tmp_path):
    """PLUMED's fix as DP-GEN writes it, on the filled input.plumed (needs LAMMPS with the PLUMED package)."""
    if not _has_plumed():
        pytest.skip("this LAMMPS has no PLUMED package")
    stage = lammps_stage(tmp_path, None, COLVAR)
    explore_group(group_job([rattled_fcc()], models[0], stage, [300.0], [1.0], tmp_path / "plm.npz"))
    run = tmp_path / "plm" / "t0"
    assert "STRIDE=5" in (run / "input.plumed").read_text()
    assert len((run / "COLVAR").read_text().splitlines()) >= 5


def test_plumed_files_are_written_and_a_lammps_without_plumed_says_so(plugin, models, tmp_path):
    if _has_plumed():
        pytest.skip("this LAMMPS has the PLUMED package (test_plumed_input_runs_with_lammps runs it)")
    stage = lammps_stage(tmp_path, None, COLVAR)
    with pytest.raises(DpmdError, match=r"^explore stage s: LAMMPS failed in .*: ERROR: Unrecognized fix style "
                                        r"'plumed'.* \(input.lammps:\d+: fix dpgen_plm all plumed plumedfile "
                                        r"input.plumed outfile output.plumed\)$"):
        explore_group(group_job([rattled_fcc()], models[0], stage, [300.0], [1.0], tmp_path / "plm.npz"))
    run = tmp_path / "plm" / "t0"
    assert (run / "input.plumed").read_text() == "d: DISTANCE ATOMS=1,2\nPRINT ARG=d STRIDE=5 FILE=COLVAR\n"


# ------------------------------------------------------------------------------------- the campaign
def campaign_dict(tmp_path, explore: dict) -> dict:
    """A tiny EMT Cu campaign (as tests/test_elt.py's), one iteration."""
    return {
        "work_dir": str(tmp_path / "camp"), "type_map": ["Cu"],
        "structures": {"fcc": {"bulk": "Cu", "crystalstructure": "fcc", "a": 3.61, "cubic": True, "repeat": 2}},
        "initial": {"structures": ["fcc"], "perturb": 3, "displacement": 0.05, "cell_strain": 0.02},
        "train": {"ensemble_size": 2, "numb_steps": 10, "template": {
            "model": {"descriptor": {"type": "se_e2_a", "sel": "auto", "rcut": 4.0, "rcut_smth": 0.5,
                                     "neuron": [4, 8], "axis_neuron": 4}, "fitting_net": {"neuron": [8, 8]}},
            "learning_rate": {"start_lr": 0.002, "stop_lr": 1e-4, "decay_steps": 5},
            "loss": {"start_pref_e": 0.02, "limit_pref_e": 1, "start_pref_f": 1000, "limit_pref_f": 1},
            "training": {"training_data": {"batch_size": 1}}}},
        "explore": [{"name": "md", "structures": ["fcc"], "ensemble": "nvt", "temperatures": [300, 600], "steps": 20,
                     "traj_interval": 10, "timestep": 2.0, **explore}],
        "trust": {"lo": 0.0, "hi": 50.0}, "select": {"budget": 2}, "filters": {"min_distance": 1.5},
        "labeller": {"calculator": "emt"}, "dispatcher": {"workers": 1, "timeout": 60},
        "convergence": {"accurate_ratio": 0.99, "max_iterations": 1, "max_labels": 100},
    }


def write_campaign(tmp_path, cfg) -> Path:
    path = tmp_path / "camp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_campaign_iteration_with_engine_lammps(plugin, tmp_path):
    """A template with DP-GEN's placeholders and a `lmp` command: frames, classes, selection and labels as with
    dpmd's engine."""
    from explore_label_train.campaign import Campaign

    (tmp_path / "in.lammps").write_text(NO_PLUMED.replace("npt temp V_TEMP V_TEMP 0.1 iso V_PRES V_PRES 0.5",
                                                          "nvt temp V_TEMP V_TEMP 0.1"))
    lmp = str(Path(sys.executable).parent / "lmp")
    command = f"{lmp} -nocite" if Path(lmp).is_file() else None   # a user's command; else the default
    cfg = campaign_dict(tmp_path, {"engine": "lammps", "lammps": {
        "template": "in.lammps", "rev_mat": {"V_HEIGHT": 2, "V_TEMP2": 1}, "command": command}})
    camp = Campaign(load_campaign(write_campaign(tmp_path, cfg)), log=None)
    assert camp.run() == "max_iterations"
    st = camp.state
    frames = st.q("SELECT * FROM frames ORDER BY frame_id")
    assert [(r["temperature"], r["step"]) for r in frames] == [(300.0, 10), (600.0, 10), (300.0, 20), (600.0, 20)]
    assert all(r["class"] == "candidate" and r["max_devi_f"] > 0 for r in frames)
    assert st.one("SELECT COUNT(*) FROM labels WHERE frame_id IS NOT NULL") == 2   # the budget, labelled by EMT
    run = camp.root / "iter.000" / "explore" / "i000-explore-md-g0" / "t1"
    assert "velocity        all create 600.0 " in (run / "input.lammps").read_text()
    row = np.loadtxt(run / "model_devi.out")[-1]
    assert row[0] == 20 and row[4] == pytest.approx(frames[3]["max_devi_f"], rel=1e-6)


@pytest.mark.parametrize("explore, message", [
    ({"engine": "gromacs"}, r"'explore\[0\].engine' must be dpmd or lammps, got 'gromacs'"),
    ({"lammps": {"command": "lmp"}}, r"'explore\[0\].lammps' is given but the stage's engine is dpmd"),
    ({"engine": "lammps", "lammps": {"template": "missing.lammps"}},
     r"'explore\[0\].lammps.template': missing.lammps does not exist"),
    ({"engine": "lammps", "lammps": {"tempate": "in.lammps"}}, r"unknown key 'explore\[0\].lammps.tempate'"),
    ({"engine": "lammps", "lammps": {"rev_mat": {"V_TEMP": 3}}}, r"'V_TEMP' must be a placeholder name .* other than"),
    ({"engine": "lammps", "lammps": {"rev_mat": {"V_X": [1, 2]}}}, r"'explore\[0\].lammps.rev_mat.V_X' must be one"),
    ({"engine": "lammps", "lammps": {"command": "lmp -in 'x"}}, r"'explore\[0\].lammps.command': cannot parse"),
    ({"engine": "lammps", "bias": {"strength": 0.1}}, r"'explore\[0\].bias' is dpmd's own MD"),
    ({"engine": "lammps", "lammps": {"template": "in.lammps", "rev_mat": {"V_TEMP2": 1}}},
     r"explore\[0\] \(stage md\): .*in.lammps:15: placeholder V_HEIGHT is not filled"),
])
def test_bad_lammps_stage_is_one_line(tmp_path, explore, message):
    (tmp_path / "in.lammps").write_text(NO_PLUMED)
    with pytest.raises(ConfigError, match=message) as err:
        load_campaign(write_campaign(tmp_path, campaign_dict(tmp_path, explore)))
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------------------------- elt import-dpgen
def dpgen_param(tmp_path, job: dict, **top) -> Path:
    (tmp_path / "POSCAR").write_text("Cu\n3.61\n1 0 0\n0 1 0\n0 0 1\nCu\n4\nDirect\n0 0 0\n0 .5 .5\n.5 0 .5\n.5 .5 0\n")
    for name in ("in.lammps", "input.plumed"):
        (tmp_path / name).write_text("")
    param = {"type_map": ["Cu"], "mass_map": [63.546], "init_data_sys": [], "sys_configs": [["POSCAR"]],
             "numb_models": 2, "model_devi_dt": 0.002, "model_devi_f_trust_lo": 0.05, "model_devi_f_trust_hi": 0.15,
             "model_devi_engine": "lammps", "model_devi_jobs": [job], "fp_style": "vasp", **top}
    path = tmp_path / "param.json"
    path.write_text(json.dumps(param))
    return path


JOB = {"sys_idx": [0], "trj_freq": 10, "template": {"lmp": "in.lammps", "plm": "input.plumed"},
       "rev_mat": {"lmp": {"V_NSTEPS": [1000], "V_TEMP": [50, 100], "V_PRES": [1, 10], "V_HEIGHT": [2.5],
                           "V_TEMP2": [7]},
                   "plm": {"V_TEMP": [50, 100], "V_DIST": [3.0]}}}


def test_dpgen_template_job_becomes_a_lammps_stage(tmp_path):
    from explore_label_train.dpgen_import import Import

    machine = {"api_version": "1.0", "model_devi": {"command": "mpirun -n 4 lmp", "machine": {"batch_type": "Slurm"},
                                                    "resources": {"number_node": 1}},
               "fp": {"command": "vasp_std", "machine": {"batch_type": "Slurm"}, "resources": {"number_node": 1}}}
    (tmp_path / "machine.json").write_text(json.dumps(machine))
    imp = Import(dpgen_param(tmp_path, JOB, model_devi_plumed=True), tmp_path / "machine.json",
                 tmp_path / "out" / "campaign.yaml")
    stage = imp.doc["explore"][0]
    assert {k: v for k, v in stage.items() if k != "dispatcher"} == {
        "name": "job0", "structures": ["sys0"], "engine": "lammps", "temperatures": [50, 100], "pressures": [1, 10],
        "steps": 1000, "traj_interval": 10, "timestep": 2.0, "iterations": [0],
        "lammps": {"template": "../in.lammps", "plumed": "../input.plumed", "command": "mpirun -n 4 lmp",
                   "rev_mat": {"V_HEIGHT": 2.5, "V_TEMP2": 7, "V_DIST": 3.0}}}
    assert stage["dispatcher"]["backend"] == "dpdispatcher"
    header = imp.header()
    assert not any("model_devi.command" in line for line in header)   # mapped, not dropped
    assert any("pair_style dpmd" in line for line in header)
    # without model_devi_plumed DP-GEN ignores the PLUMED template, and so does the stage
    imp = Import(dpgen_param(tmp_path, JOB), None, tmp_path / "out" / "campaign.yaml")
    assert "plumed" not in imp.doc["explore"][0]["lammps"]
    assert "V_DIST" not in imp.doc["explore"][0]["lammps"]["rev_mat"]


@pytest.mark.parametrize("change, message", [
    ({"rev_mat": {"lmp": {"V_NSTEPS": [1000, 2000], "V_TEMP": [50]}}}, r"rev_mat.lmp.V_NSTEPS' must be one number"),
    ({"rev_mat": {"lmp": {"V_NSTEPS": [1000], "V_TEMP": [50], "V_X": [1, 2]}}}, r"'model_devi_jobs\[0\].rev_mat.V_X' "
                                                                                 r"2 values: elt explores"),
    ({"rev_mat": {"lmp": {"V_NSTEPS": [1000]}}}, r"'model_devi_jobs\[0\].temps' is required \(a job run through a "
                                                 r"LAMMPS template needs it, or rev_mat.lmp.V_TEMP"),
    ({"template": "in.lammps"}, r"'model_devi_jobs\[0\].template' must be \{lmp: LAMMPS input"),
])
def test_bad_dpgen_template_job_is_one_line(tmp_path, change, message):
    from explore_label_train.dpgen_import import Import

    with pytest.raises(ConfigError, match=message) as err:
        Import(dpgen_param(tmp_path, {**JOB, **change}), None, tmp_path / "campaign.yaml")
    assert "\n" not in str(err.value)


def test_imported_template_stage_loads(tmp_path):
    """The stage `elt import-dpgen` writes loads in a campaign (its template checked at load)."""
    from explore_label_train.dpgen_import import Import

    param = dpgen_param(tmp_path, {**JOB, "template": {"lmp": "in.lammps"}})
    (tmp_path / "in.lammps").write_text(NO_PLUMED)
    imp = Import(param, None, tmp_path / "campaign.yaml")
    stages = imp.doc["explore"]
    assert stages[0]["lammps"] == {"template": "in.lammps", "rev_mat": {"V_HEIGHT": 2.5, "V_TEMP2": 7}}
    cfg = campaign_dict(tmp_path, {})
    cfg.update(explore=stages, structures=imp.doc["structures"])
    cfg["initial"]["structures"] = ["sys0"]
    stage = load_campaign(write_campaign(tmp_path, cfg))["explore"][0]
    assert stage["engine"] == "lammps" and stage["pressures"] == [1.0, 10.0] and stage["steps"] == 1000
    assert stage["lammps"]["template"] == str(tmp_path / "in.lammps")
