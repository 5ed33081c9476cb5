"""The options of the `dpmd` commands (issues 17 and 18): help for every option, train's --init-frz-model and
--skip-neighbor-stat, freeze --checkpoint-folder, md --set; parity plots name the reference and units; what
commands write in the repository root is git-ignored.  In-process, a few seconds."""

from __future__ import annotations

import argparse
import shutil
import subprocess

import numpy as np
import pytest
import torch

from dpmd.cli import build_parser, main
from dpmd.model import load_model, save_model
from tests.conftest import REPO, make_model
from tests.test_bad_inputs_train import base_input, one_line_error, write_input


def dpmd(capsys, *args) -> tuple[int, str, str]:
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def test_every_option_of_every_command_has_help():
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert {a.dest for a in commands._choices_actions if a.help} == set(commands.choices)
    missing = [f"dpmd {name} {'/'.join(a.option_strings) or a.dest}"
               for name, p in [("", parser), *commands.choices.items()] for a in p._actions
               if a is not commands and not a.help]   # (argparse.SUPPRESS: a deprecated option, hidden on purpose)
    assert missing == []
    for name, p in commands.choices.items():   # the logging options of DeePMD-kit's commands, on every command
        options = {s for a in p._actions for s in a.option_strings}
        assert {"-v", "--log-level", "-l", "--log-path"} <= options, name


def test_init_frz_model_starts_from_the_frozen_weights(tmp_path, capsys):
    inp = write_input(tmp_path, base_input(steps=2))
    assert dpmd(capsys, "train", inp, "-o", tmp_path / "a")[0] == 0
    rc, _, err = dpmd(capsys, "freeze", "--checkpoint-folder", tmp_path / "a", "-o", tmp_path / "a.pth")
    assert rc == 0 and "model.ckpt-2.pt" in err, err
    # at a learning rate of 1e-12 one Adam step moves no weight measurably: the run keeps the weights it began with
    tiny = ["--set", "training.numb_steps=1", "--set", "learning_rate.start_lr=1e-12",
            "--set", "learning_rate.stop_lr=1e-13"]
    rc, _, err = dpmd(capsys, "train", inp, "--init-frz-model", tmp_path / "a.pth", "-o", tmp_path / "b", *tiny)
    assert rc == 0, err
    assert dpmd(capsys, "train", inp, "-o", tmp_path / "fresh", *tiny)[0] == 0
    frozen = load_model(tmp_path / "a.pth").state_dict()
    began, fresh = (torch.load(tmp_path / run / "model.ckpt-1.pt", weights_only=True)["model"] for run in ("b", "fresh"))
    assert all(torch.allclose(began[k], v, rtol=0, atol=1e-9) for k, v in frozen.items())
    assert not all(torch.allclose(fresh[k], v, rtol=0, atol=1e-9) for k, v in frozen.items())
    rc, _, err = dpmd(capsys, "train", inp, "--init-model", tmp_path / "a.pth", "-f", tmp_path / "a.pth",
                      "-o", tmp_path / "c")
    one_line_error(rc, err, "--init-model and --init-frz-model")
    assert not (tmp_path / "c").exists()


def test_skip_neighbor_stat_needs_a_sel_list(tmp_path, capsys):
    auto = base_input(steps=1)
    auto["model"]["descriptor"]["sel"] = "auto"
    rc, _, err = dpmd(capsys, "train", write_input(tmp_path, auto, "auto.yaml"), "-o", tmp_path / "a",
                      "--skip-neighbor-stat")
    one_line_error(rc, err, "'model.descriptor.sel' is 'auto'", "--skip-neighbor-stat", "a list")
    assert not (tmp_path / "a").exists()
    rc, _, err = dpmd(capsys, "train", write_input(tmp_path, auto, "auto.yaml"), "-o", tmp_path / "b")
    assert rc == 0 and "counting neighbours" in err, err
    rc, _, err = dpmd(capsys, "train", write_input(tmp_path, base_input(steps=1)), "-o", tmp_path / "c",
                      "--skip-neighbor-stat")
    assert rc == 0 and "counting neighbours" not in err, err


def _md_input(tmp_path) -> str:
    from ase.build import molecule
    from ase.io import write

    atoms = molecule("H2O")
    atoms.center(vacuum=5.0)
    atoms.pbc = True
    write(tmp_path / "water.xyz", atoms)
    save_model(make_model(), tmp_path / "m.pth")
    path = tmp_path / "in.yaml"   # 5e-1: a number in YAML 1.2 (PyYAML alone reads a string)
    path.write_text(f"structure: {tmp_path / 'water.xyz'}\nmodels: [{tmp_path / 'm.pth'}]\nsteps: 100\n"
                    f"timestep: 5e-1\nthermo_freq: 1\noutput_dir: {tmp_path / 'out'}\n")
    return str(path)


def test_md_set_overrides_the_input(tmp_path, capsys):
    inp = _md_input(tmp_path)
    rc, _, err = dpmd(capsys, "md", inp, "--set", "steps=3", "--set", f"output_dir={tmp_path / 'short'}")
    assert rc == 0 and "md: 3 steps" in err, err
    rows = np.loadtxt(tmp_path / "short" / "thermo.log")
    assert rows[-1, 0] == 3 and rows[1, 1] == pytest.approx(0.5e-3)   # step, time (ps) of 0.5 fs steps
    assert not (tmp_path / "out").exists()
    rc, _, err = dpmd(capsys, "md", inp, "--set", "steps")
    one_line_error(rc, err, "--set 'steps': expected KEY=VALUE, e.g. steps=200")
    rc, _, err = dpmd(capsys, "md", inp, "--set", "ensemble=nvt", "--set", "thermostat.tau=1")
    one_line_error(rc, err, f"{inp}: unknown key 'thermostat.tau'; valid keys: damp, type")


def test_parity_plot_names_the_reference_and_units():
    from dpmd.train.test import parity_figure

    pooled = {"e": [(np.array([1.0, 2.0]), np.array([1.0, 2.0]))], "f": [(np.zeros(3), np.ones(3))], "v": []}
    energy, force = parity_figure(pooled).axes
    assert (energy.get_xlabel(), energy.get_ylabel()) == ("reference energy (eV/atom)", "model energy (eV/atom)")
    assert energy.get_title() == "energy: RMSE 0.000e+00 eV/atom"
    assert force.get_title() == "force: RMSE 1.000e+00 eV/Å" and force.get_xlabel() == "reference force (eV/Å)"


@pytest.mark.skipif(shutil.which("git") is None or not (REPO / ".git").exists(), reason="not a git checkout")
def test_run_outputs_in_the_repository_root_are_ignored_and_no_repository_file_is():
    outputs = ["lcurve.out", "model.ckpt-2000.pt", "model.ckpt.pt", "checkpoint", "old-run-20250101-120000/lcurve.out",
               "frozen_model.pth", "model.pth", "frozen_model_compressed.pth", "model_devi.out", "detail.e.out",
               "thermo.log", "train.log", "traj.extxyz", "dump.lammpstrj", "checkpoint.pt"]
    ignored = subprocess.run(["git", "check-ignore", *outputs], cwd=REPO, capture_output=True, text=True).stdout
    assert ignored.split() == outputs
    tracked_but_ignored = subprocess.run(["git", "ls-files", "--cached", "--ignored", "--exclude-standard"], cwd=REPO,
                                         capture_output=True, text=True, check=True).stdout
    assert tracked_but_ignored == ""
