"""`elt import-dpgen` (issue 22) on DP-GEN's own example inputs (tests/fixtures/dpgen/README.md).

Each param.json is imported in a temporary folder holding dummy versions of the files it names.  The campaign
must load with `load_campaign`, unless DP-GEN's example lacks what a labeller needs (an INCAR, a CP2K template)
or has a typo in its training input: then the load fails naming that key, and with the labeller swapped for
EMT everything else the import wrote loads.  Every DP-GEN key is accounted for: mapped, or listed with its
reason in the campaign's header."""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from dpmd.errors import ConfigError
from explore_label_train.config import load_campaign
from explore_label_train.dpgen_import import MACHINE, PARAM, Import, add_arguments, run

FIXTURES = Path(__file__).parent / "fixtures" / "dpgen"
# DP-GEN's absolute paths, moved into the test's folder
ROOTS = ("/data1/yfb222333/2_dpgen_gpu_multi", "/sharedext4/generator/example/deep.gen")

# without Open Babel, Gaussian's automatic multiplicity (DP-GEN's example) is refused
GAUSSIAN_REFUSAL = None if importlib.util.find_spec("openbabel") else "fp_params.multiplicity"
# fixture -> (machine.json, DP-GEN keys listed as not supported, labeller key check_settings refuses or None)
CASES = {
    "vasp_ch4_param.json": ("vasp_machine.json", [], None),
    "al_param.json": (None, [], None),
    "cp2k_ch4_param.json": (None, ["user_fp_params"], "external_input_path"),
    "pwscf_ch4_param.json": ("qe_machine.json", [], None),
    "gaussian_param.json": ("gaussian_machine.json", ["init_batch_size", "use_clusters", "cluster_cutoff",
                                                      "cluster_minify", "use_relative", "epsilon"],
                             GAUSSIAN_REFUSAL),
    "ch4_param.json": (None, ["init_batch_size", "sys_batch_size", "fp_params"], "fp_incar"),
}


def _example(pattern: str, variant: int) -> str:
    """A path the glob pattern matches: * -> the variant digit, [a-b] -> a, ? -> x."""
    return re.sub(r"\[(.)[^]]*\]", r"\1", pattern.replace("*", str(variant)).replace("?", "x"))


def make_tree(tmp: Path, name: str) -> Path:
    """The fixture in tmp/dpgen/ with dummy files for every path it names (structures, data, DFT inputs)."""
    text = (FIXTURES / name).read_text()
    for root in ROOTS:
        text = text.replace(root, str(tmp / "abs"))
    folder = tmp / "dpgen"
    folder.mkdir()
    (folder / "param.json").write_text(text)
    param = json.loads(text)
    for d in param["init_data_sys"]:
        (folder / param.get("init_data_prefix", "") / d).mkdir(parents=True, exist_ok=True)
    for i, group in enumerate(param["sys_configs"]):
        for pattern in group:
            for variant in (1, 2):
                path = folder / param.get("sys_configs_prefix", "") / _example(pattern, variant)
                path.parent.mkdir(parents=True, exist_ok=True)
                if param.get("sys_format") == "lammps/lmp":
                    _lammps_data(path)
                else:
                    path.write_text("POSCAR\n")
    if "fp_incar" in param:
        incar = folder / param["fp_incar"]
        incar.parent.mkdir(parents=True, exist_ok=True)
        incar.write_text("ENCUT = 400\nKSPACING = 0.5\nNSW = 0\n")
    pp = folder / param.get("fp_pp_path", ".")
    pp.mkdir(parents=True, exist_ok=True)
    for f in param.get("fp_pp_files", []):
        (pp / f).write_text("pseudopotential\n")
    return folder / "param.json"


def _lammps_data(path: Path) -> None:
    """A LAMMPS data file of CH4N2, types in the fixture's type_map order (H, C, N)."""
    import dpdata

    dpdata.System(data={"atom_names": ["H", "C", "N"], "atom_numbs": [4, 1, 2],
                        "atom_types": np.array([0, 0, 0, 0, 1, 2, 2]),
                        "coords": np.random.default_rng(0).uniform(0, 8, (1, 7, 3)),
                        "cells": np.eye(3)[None] * 10, "orig": np.zeros(3), "nopbc": False}).to("lammps/lmp", path)


def import_case(tmp: Path, name: str):
    param = make_tree(tmp, name)
    machine = CASES[name][0] and FIXTURES / CASES[name][0]
    out = tmp / "campaign" / "campaign.yaml"
    imp = Import(param, machine, out)
    imp.write()
    return imp, out


@pytest.mark.parametrize("name", sorted(CASES))
def test_dpgen_example_imports(tmp_path, name):
    imp, out = import_case(tmp_path, name)
    machine, unsupported, labeller_refusal = CASES[name]
    text = out.read_text()
    header = [line for line in text.splitlines() if line.startswith("#")]
    doc = yaml.safe_load(text)
    # every DP-GEN key is mapped (a row of the table) or listed in the header with its reason, on one line
    param = json.loads((tmp_path / "dpgen" / "param.json").read_text())
    for key in param:
        assert key.startswith("_") or key in PARAM
    listed = {key for _, key, _, needed in imp.dropped if needed}
    assert listed == set(unsupported)
    for key in unsupported:
        assert sum(re.match(rf"#   param\.json {key}: \S", line) is not None for line in header) == 1
    # the campaign loads, or fails naming the training input the header says dpmd refuses (DP-GEN's own example
    # has a typo), or the labeller key DP-GEN's example leaves out
    refusal = next((n for n in imp.notes if n.startswith("train.template")), None)
    if refusal or labeller_refusal:
        with pytest.raises(ConfigError, match="train.template" if refusal else f"'labeller.{labeller_refusal}'"):
            load_campaign(out)
        if refusal:
            return
        # with the labeller swapped for EMT, everything else the import wrote loads
        doc["labeller"] = {"calculator": "emt"}
        out = out.with_name("emt.yaml")
        out.write_text(yaml.safe_dump(doc))
    cfg = load_campaign(out)
    assert cfg["type_map"] == param["type_map"]
    assert len(cfg["explore"]) == len(param["model_devi_jobs"])
    assert [s["iterations"] for s in cfg["explore"]] == [[j] for j in range(len(param["model_devi_jobs"]))]
    for s in cfg["explore"]:
        assert all(Path(f).is_file() for name in s["structures"] for f in cfg["structures"][name]["files"])
    assert all(Path(d).is_dir() for d in cfg["initial"]["data"])
    assert cfg["convergence"]["accurate_ratio"] is None   # DP-GEN runs every job
    # machine.json's sections: one cluster dispatcher each for labelling, training and every stage
    if machine:
        assert cfg["dispatcher"]["backend"] == "dpdispatcher"
        assert cfg["train"]["dispatcher"]["python"] == "python"
        assert all(s["dispatcher"]["backend"] == "dpdispatcher" for s in cfg["explore"])


def test_vasp_example_mapping(tmp_path):
    """The DP-GEN 2.x VASP example key by key."""
    imp, out = import_case(tmp_path, "vasp_ch4_param.json")
    doc = imp.doc
    assert doc["masses"] == {"H": 1.0, "C": 12.0}
    assert doc["initial"]["data"] == ["../dpgen/CH4.POSCAR.01x01x01/02.md/sys-0004-0001/deepmd"]
    assert [Path(f).parts[-2] for f in doc["structures"]["sys0"]["files"]] == ["000001", "000002"]
    assert doc["structures"]["sys1"]["format"] == "vasp"
    assert doc["train"]["ensemble_size"] == 4 and doc["train"]["numb_steps"] == 2000
    assert doc["train"]["init_from_previous"] is False          # DP-GEN trains every iteration from scratch
    assert "type_map" not in doc["train"]["template"]["model"]
    assert doc["train"]["template"]["training"]["training_data"] == {"set_prefix": "set", "batch_size": 1}
    job0, job1 = doc["explore"]
    assert {k: v for k, v in job0.items() if k != "dispatcher"} == {
        "name": "job0", "structures": ["sys0"], "ensemble": "nvt", "temperatures": [100], "steps": 300,
        "traj_interval": 10, "timestep": 2.0, "iterations": [0],
        "thermostat": {"type": "nose_hoover", "damp": 0.1, "chain": 3}}
    assert job1["iterations"] == [1] and job1["steps"] == 3000
    assert doc["trust"] == {"lo": 0.05, "hi": 0.15}
    assert doc["select"] == {"method": "random", "budget": 20, "min_labels": 5}
    assert doc["train"]["min_new_labels"] == 5
    assert doc["convergence"] == {"accurate_ratio": None, "max_iterations": 2, "max_labels": 40}
    assert doc["labeller"] == {"code": "vasp", "fp_pp_path": "../dpgen", "fp_pp_files": ["POTCAR_H", "POTCAR_C"],
                               "fp_incar": "../dpgen/INCAR_methane",
                               "command": "ulimit -s unlimited; mpirun -np 32 vasp_std"}
    d = doc["dispatcher"]
    assert d["backend"] == "dpdispatcher" and d["machine"]["batch_type"] == "Lebesgue"
    assert d["resources"]["group_size"] == 10
    # machine.json train / model_devi: cluster jobs running dpmd's Python, not DP-GEN's dp and lmp
    train = doc["train"]["dispatcher"]
    assert train["backend"] == "dpdispatcher" and train["python"] == "python"
    assert train["machine"]["remote_profile"]["input_data"]["job_name"] == "dpgen_train_job"
    assert train["resources"] == {"number_node": 1, "cpu_per_node": 4, "gpu_per_node": 1, "queue_name": "T1_4_0",
                                  "group_size": 1}
    assert job0["dispatcher"]["resources"]["group_size"] == 250 and job0["dispatcher"] == job1["dispatcher"]
    assert job0["dispatcher"] is not job1["dispatcher"]
    lines = out.read_text().splitlines()
    assert "#   vasp_machine.json train.command: 'dp': elt's jobs run dpmd through train.dispatcher.python " \
           "(see Check)" in lines
    assert any(line.startswith("#   train.dispatcher.python and explore[].dispatcher.python: `python` must start a "
                               "Python with dpmd in the cluster job's environment") for line in lines)
    assert "&id" not in out.read_text()   # no YAML anchors: each stage's block is written out


def test_al_example_npt_and_groups(tmp_path):
    """24 systems, nine NPT jobs of three systems each: per-structure budgets, barostat, absolute paths."""
    imp, _ = import_case(tmp_path, "al_param.json")
    doc = imp.doc
    assert len(doc["structures"]) == 24
    assert doc["structures"]["sys6"]["files"][0].startswith(str(tmp_path / "abs"))   # absolute stays absolute
    assert len(doc["structures"]["sys6"]["files"]) == 4                              # two patterns, two files each
    job8 = doc["explore"][8]
    assert job8["structures"] == ["sys0", "sys8", "sys16"] and job8["iterations"] == [8]
    assert job8["ensemble"] == "npt" and job8["pressures"][-1] == 50000.0
    assert job8["barostat"] == {"damp": 0.5, "mode": "iso"}
    assert doc["select"]["per_structure"] is True and doc["select"]["budget"] == 300
    assert doc["convergence"]["max_labels"] == 300 * 27
    assert any("fitting_net.sedd" in n for n in imp.notes)     # a typo in DP-GEN's example, reported
    assert any("compressibility" in line for line in imp.header())


def test_commands_and_pseudopotential_order(tmp_path):
    imp, _ = import_case(tmp_path, "pwscf_ch4_param.json")
    assert imp.doc["labeller"]["command"] == "mpirun -n 8 /gpfs/share/home/1600017784/yuzhi/soft/QE-mpi/PW/src/pw.x"
    assert imp.doc["labeller"]["code"] == "qe" and imp.doc["labeller"]["user_fp_params"]["kspacing"] == 999
    assert any("C_ONCV_PBE_sr.upf is listed for H" in n for n in imp.notes)
    assert imp.doc["dispatcher"]["machine"]["context_type"] == "ssh"
    assert "_comment7" not in json.dumps(imp.doc)


def test_gaussian_example_converts_lammps_data(tmp_path):
    imp, out = import_case(tmp_path, "gaussian_param.json")
    assert imp.doc["labeller"]["command"] == "g09"
    assert imp.doc["labeller"]["fp_params"]["keywords"] == "force B3LYP 6-31g(d,p) nosymm"
    files = imp.doc["structures"]["sys0"]["files"]
    assert files == ["campaign_structures/sys0_0.extxyz"]
    import ase.io

    atoms = ase.io.read(out.parent / files[0])
    assert atoms.get_chemical_formula() == "CH4N2"   # dpdata read the LAMMPS types in type_map order
    assert imp.doc["convergence"]["max_failed_ratio"] == 0.2


def test_per_system_and_virial_trust(tmp_path):
    param = make_tree(tmp_path, "vasp_ch4_param.json")
    p = json.loads(param.read_text())
    p.update(model_devi_f_trust_lo=[0.05, 0.1], model_devi_f_trust_hi={"0": 0.15, "1": 0.3},
             model_devi_v_trust_lo=0.02, model_devi_v_trust_hi=1e10, model_devi_skip=100,
             training_reuse_iter=2, training_reuse_numb_steps=500, training_init_frozen_model=["m0.pth", "m1.pth"])
    p["model_devi_jobs"][1].update(model_devi_f_trust_hi=0.4, taut=0.2)
    param.write_text(json.dumps(p))
    imp = Import(param, None, tmp_path / "campaign.yaml")
    doc = imp.doc
    assert doc["trust"] == {"lo": 0.05, "hi": 0.15, "structures": {"sys1": {"lo": 0.1, "hi": 0.3}}, "v_lo": 0.02}
    assert doc["explore"][0]["skip_steps"] == 100 and "trust" not in doc["explore"][0]
    assert doc["explore"][1]["trust"] == {"hi": 0.4}
    assert doc["explore"][1]["thermostat"]["damp"] == 0.2
    assert doc["train"]["init_from_previous"] == 2 and doc["train"]["reuse_numb_steps"] == 500
    assert doc["train"]["init_models"] == ["dpgen/m0.pth", "dpgen/m1.pth"]


def test_adaptive_trust_lo(tmp_path):
    """model_devi_adapt_trust_lo: select.method adaptive with DP-GEN's pool keys (its defaults where absent) and
    trust.lo 0, since DP-GEN reads no lower level then; without it, the pool keys are listed as unused."""
    param = make_tree(tmp_path, "vasp_ch4_param.json")
    p = json.loads(param.read_text())
    p.update(model_devi_adapt_trust_lo=True, model_devi_numb_candi_f=50, model_devi_perc_candi_v=2.5,
             model_devi_v_trust_lo=0.02, model_devi_v_trust_hi=0.5)
    p["model_devi_jobs"][1].update(model_devi_f_trust_lo=0.08, model_devi_f_trust_hi=0.4)
    param.write_text(json.dumps(p))
    imp, out = Import(param, None, tmp_path / "campaign.yaml"), tmp_path / "campaign.yaml"
    imp.write()
    cfg = load_campaign(out)
    sel = cfg["select"]
    assert sel["method"] == "adaptive" and sel["budget"] == p["fp_task_max"]
    assert (sel["numb_candi_f"], sel["perc_candi_f"], sel["numb_candi_v"], sel["perc_candi_v"]) == (50, 0, 0, 2.5)
    assert cfg["trust"]["lo"] == 0 and cfg["trust"]["hi"] == 0.15 and cfg["trust"]["v_hi"] == 0.5
    assert cfg["trust"]["v_lo"] is None and cfg["explore"][1]["trust"]["lo"] is None
    assert cfg["explore"][1]["trust"]["hi"] == 0.4
    # every lower level is listed as unused (with the reason), nothing as unsupported
    unused = {key for _, key, _, needed in imp.dropped if not needed}
    assert {"model_devi_f_trust_lo", "model_devi_v_trust_lo", "model_devi_jobs[1].model_devi_f_trust_lo"} <= unused
    assert not [key for *_, key, _, needed in imp.dropped if needed]
    assert "#   param.json model_devi_f_trust_lo: DP-GEN's adaptive lower trust level" in out.read_text()
    # switched off: DP-GEN's random choice between the fixed levels; the pool keys have nothing to carry over
    p["model_devi_adapt_trust_lo"] = False
    param.write_text(json.dumps(p))
    imp = Import(param, None, tmp_path / "off.yaml")
    assert imp.doc["select"]["method"] == "random" and imp.doc["trust"]["lo"] == 0.05
    assert not set(imp.doc["select"]) & {"numb_candi_f", "perc_candi_f", "numb_candi_v", "perc_candi_v"}
    assert {"model_devi_numb_candi_f", "model_devi_perc_candi_v"} <= {k for _, k, _, n in imp.dropped if not n}


@pytest.mark.parametrize("change, message", [
    ({"fp_style": "siesta"}, "param.json: 'fp_style' 'siesta' has no elt labeller"),
    ({"sys_configs": [["nowhere/*/POSCAR"]]}, r"param.json: 'sys_configs\[0\]' nowhere/\*/POSCAR matches no file"),
    ({"model_devi_engine": "calypso"}, "param.json: 'model_devi_engine' 'calypso': only DP-GEN's LAMMPS"),
    ({"model_devi_jobs": [{"sys_idx": [5], "temps": [300], "trj_freq": 10, "nsteps": 100, "ensemble": "nvt"}]},
     r"'model_devi_jobs\[0\].sys_idx' 5 is not a system of sys_configs \(0 to 1\)"),
    ({"model_devi_jobs": [{"sys_idx": [0], "template": {"lmp": "in.lammps"}, "trj_freq": 10}]},
     r"'model_devi_jobs\[0\].temps' is required \(a job run through a LAMMPS template"),
    ({"model_devi_jobs": [{"sys_idx": [0], "temps": [300], "trj_freq": 10, "nsteps": 100, "ensemble": "nph"}]},
     r"'model_devi_jobs\[0\].ensemble' 'nph': valid: nvt"),
    ({"model_devi_f_trust_lo": [0.1]}, "'model_devi_f_trust_lo' must be a number, one per system"),
    ({"mass_map": [1.0]}, "'mass_map' must be 'auto' or one mass per type_map element"),
    ({"model_devi_adapt_trust_lo": "yes"}, "'model_devi_adapt_trust_lo' must be true or false, got 'yes'"),
    ({"model_devi_adapt_trust_lo": True, "model_devi_perc_candi_f": 150},
     "'model_devi_perc_candi_f' must be a percentage, 0 to 100, got 150"),
])
def test_bad_param_is_one_line(tmp_path, change, message):
    param = make_tree(tmp_path, "vasp_ch4_param.json")
    param.write_text(json.dumps({**json.loads(param.read_text()), **change}))
    with pytest.raises(ConfigError, match=message) as err:
        Import(param, None, tmp_path / "campaign.yaml")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "campaign.yaml").exists()


def test_pre_1_0_machine_is_refused(tmp_path):
    param = make_tree(tmp_path, "ch4_param.json")
    with pytest.raises(ConfigError, match=r"ch4_machine.json: 'deepmd_path' DP-GEN's machine format before"):
        Import(param, FIXTURES / "ch4_machine.json", tmp_path / "campaign.yaml")


def test_cli_writes_once_and_names_what_it_dropped(tmp_path, capsys):
    param = make_tree(tmp_path, "gaussian_param.json")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    out = tmp_path / "c.yaml"
    run(parser.parse_args([str(param), str(FIXTURES / "gaussian_machine.json"), "-o", str(out)]))
    printed = capsys.readouterr().out
    assert "6 DP-GEN keys not supported" in printed
    # a campaign that does not load yet says why at once, not at `elt run`
    assert ("(edit it before `elt run`)" in printed) == bool(GAUSSIAN_REFUSAL)
    if GAUSSIAN_REFUSAL:
        assert f"'labeller.{GAUSSIAN_REFUSAL}'" in printed
    before = out.read_text()
    with pytest.raises(ConfigError, match="exists; pass --force"):
        run(parser.parse_args([str(param), "-o", str(out)]))
    assert out.read_text() == before
    run(parser.parse_args([str(param), "-o", str(out), "--force"]))
    assert "dpdispatcher" not in out.read_text()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".c.yaml")]   # no temp file left


def test_tables_cover_dpgen_keys():
    """Every key of DP-GEN's run arginfo (dpgen/generator/arginfo.py @ 00e61855: basic, data, training, lammps
    exploration, fp keys) has a row."""
    arginfo = """type_map mass_map use_ele_temp init_data_prefix init_data_sys sys_format init_batch_size
        sys_configs_prefix sys_configs sys_batch_size numb_models train_backend training_iter0_model_path
        training_init_model default_training_param dp_train_skip_neighbor_stat dp_compress training_reuse_iter
        training_reuse_old_ratio training_reuse_numb_steps training_reuse_start_lr training_reuse_start_pref_e
        training_reuse_start_pref_f model_devi_activation_func srtab_file_path one_h5 training_init_frozen_model
        training_finetune_model mlp_engine model_devi_engine model_devi_jobs model_devi_dt model_devi_skip
        model_devi_f_trust_lo model_devi_f_trust_hi model_devi_v_trust_lo model_devi_v_trust_hi
        model_devi_adapt_trust_lo model_devi_numb_candi_f model_devi_numb_candi_v model_devi_perc_candi_f
        model_devi_perc_candi_v model_devi_f_avg_relative model_devi_clean_traj model_devi_merge_traj
        model_devi_nopbc model_devi_plumed model_devi_plumed_path shuffle_poscar use_relative epsilon
        use_relative_v epsilon_v fp_style fp_task_max fp_task_min fp_accurate_threshold fp_accurate_soft_threshold
        fp_cluster_vacuum detailed_report_make_fp ratio_failed fp_pp_path fp_pp_files fp_incar fp_aniso_kspacing
        cvasp fp_skip_bad_box fp_orb_files fp_kpt_file fp_dpks_descriptor user_fp_params k_points use_clusters
        cluster_cutoff cluster_cutoff_hard cluster_minify fp_params external_input_path""".split()
    assert sorted(set(arginfo) - set(PARAM)) == []
    assert set(MACHINE) == {"api_version", "deepmd_version", "train", "model_devi", "fp"}
