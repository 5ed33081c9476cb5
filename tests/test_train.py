"""Training: schedules, loss decrease, restart equality, reproducibility, config errors, end to end."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

from dpmd.errors import ConfigError, DataError
from dpmd.train.config import normalize_input, read_input
from dpmd.train.schedule import ExpDecayLR, prefactor
from dpmd.train.trainer import Trainer
from tests.conftest import DEEPMD_REF, EXAMPLE, REPO


def small_input(tmp_path, steps=20, **training):
    cfg = {
        "model": {"type_map": ["O", "H"],
                  "descriptor": {"type": "se_e2_a", "sel": "auto", "rcut": 4.0, "rcut_smth": 0.5,
                                 "neuron": [4, 8, 16], "axis_neuron": 4, "type_one_side": True, "seed": 1},
                  "fitting_net": {"neuron": [16, 16], "seed": 1}},
        "learning_rate": {"type": "exp", "start_lr": 2e-3, "stop_lr": 1e-5, "decay_steps": 10},
        "loss": {"type": "ener", "start_pref_e": 0.02, "limit_pref_e": 1, "start_pref_f": 1000, "limit_pref_f": 1},
        "training": {"training_data": {"systems": [str(EXAMPLE)], "batch_size": 1},
                     "validation_data": {"systems": [str(EXAMPLE)], "batch_size": 1, "numb_btch": 2},
                     "numb_steps": steps, "seed": 7, "disp_freq": 5, "save_freq": 10,
                     # these tests compare with host tensors, and restarts bit for bit (CUDA's atomic additions
                     # may round differently run to run): the device tests are tests/test_train_device.py
                     "device": "cpu"},
    }
    cfg["training"].update(training)
    return cfg


def run(cfg, out, **kw):
    return Trainer(normalize_input(cfg), out_dir=out, progress=False, **kw).run()


def test_lr_schedule_matches_hand_computation():
    lr = ExpDecayLR(1e-3, 3.51e-8, 5000, 1_000_000)
    rate = (3.51e-8 / 1e-3) ** (5000 / 1_000_000)
    assert lr(0) == pytest.approx(1e-3) and lr(4999) == pytest.approx(1e-3)
    assert lr(5000) == pytest.approx(1e-3 * rate)
    assert lr(12_345) == pytest.approx(1e-3 * rate**2)
    assert lr(1_000_000) == pytest.approx(3.51e-8, rel=1e-9)
    short = ExpDecayLR(1e-3, 1e-5, 5000, 200)  # decay_steps >= numb_steps: shrunk to 200 // 100 + 1 = 3
    assert short.decay_steps == 3 and short(3) == pytest.approx(1e-3 * (1e-2) ** (3 / 200))
    assert ExpDecayLR(1e-3, 1e-5, 50_000, 20_000).decay_steps == 100
    assert prefactor(1000, 1, 1e-3, 1e-3) == 1000 and prefactor(1000, 1, 0.0, 1e-3) == 1
    assert prefactor(0.02, 1, 5e-4, 1e-3) == pytest.approx(0.51)


def test_loss_decreases_on_water(tmp_path):
    cfg = small_input(tmp_path, steps=50, disp_freq=10)
    run(cfg, tmp_path)
    rows = np.loadtxt(tmp_path / "lcurve.out")
    assert rows[-1, 1] < 0.5 * rows[0, 1]  # validation rmse
    assert rows[-1, 0] == 50 and np.all(np.diff(rows[:, -1]) <= 0)  # lr decays


def test_lcurve_always_holds_the_last_step(tmp_path):
    """Step 1, every disp_freq-th step and the last (DeePMD-kit writes no last line: a 50-step run with
    disp_freq 100 showed step 1 only)."""
    run(small_input(tmp_path, steps=7, disp_freq=5, save_freq=7), tmp_path)
    assert np.loadtxt(tmp_path / "lcurve.out")[:, 0].tolist() == [1, 5, 7]


def test_restart_continues_the_same_run(tmp_path, monkeypatch):
    unbroken, broken = tmp_path / "a", tmp_path / "b"
    run(small_input(tmp_path, steps=20), unbroken)
    # a run "killed" at step 13, after its checkpoint at step 10 and lcurve lines past it
    trainer = Trainer(normalize_input(small_input(tmp_path, steps=20)), out_dir=broken, progress=False)
    calls = []

    def die(*_):
        calls.append(1)
        if len(calls) == 13:
            raise KeyboardInterrupt

    trainer.optimizer.register_step_post_hook(die)
    with pytest.raises(KeyboardInterrupt):
        trainer.run()
    assert (broken / "model.ckpt-10.pt").is_file() and not (broken / "model.ckpt-20.pt").exists()
    Trainer(normalize_input(small_input(tmp_path, steps=20)), out_dir=broken, progress=False,
            restart=str(broken / "model.ckpt-10.pt")).run()
    assert (broken / "lcurve.out").read_text() == (unbroken / "lcurve.out").read_text()
    a = torch.load(unbroken / "model.ckpt-20.pt", weights_only=True)["model"]
    b = torch.load(broken / "model.ckpt-20.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_same_seed_same_lcurve(tmp_path):
    run(small_input(tmp_path, steps=10), tmp_path / "a")
    run(small_input(tmp_path, steps=10), tmp_path / "b")
    assert (tmp_path / "a" / "lcurve.out").read_text() == (tmp_path / "b" / "lcurve.out").read_text()


def test_checkpoints_rotate_and_link(tmp_path):
    run(small_input(tmp_path, steps=20, save_freq=5, max_ckpt_keep=2), tmp_path)
    names = sorted(p.name for p in tmp_path.glob("model.ckpt-*.pt"))
    assert names == ["model.ckpt-15.pt", "model.ckpt-20.pt"]
    assert (tmp_path / "model.ckpt.pt").resolve().name == "model.ckpt-20.pt"
    name, run_line = (tmp_path / "checkpoint").read_text().splitlines()  # DeePMD-kit's line, then the run id
    assert name == "model.ckpt-20.pt"
    assert run_line == "run_id: " + torch.load(tmp_path / name, weights_only=True)["run_id"]


@pytest.mark.skipif(not DEEPMD_REF.is_dir(), reason="DeePMD-kit input not available")
def test_deepmd_input_json_is_accepted(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = REPO.parent / "shared" / "data" / "water"
    cfg = read_input(DEEPMD_REF / "input.json", [
        f"training.training_data.systems=[{data / 'data_0'}, {data / 'data_1'}]",
        f"training.validation_data.systems=[{data / 'data_2'}]"])
    assert cfg["model"]["descriptor"]["sel"] == [46, 92] and cfg["training"]["numb_steps"] == 1_000_000
    assert cfg["learning_rate"]["stop_lr"] == 3.51e-8


@pytest.mark.parametrize("mutate, message", [
    (lambda c: c["training"].update(numb_stepz=3), "unknown key 'training.numb_stepz'"),
    (lambda c: c["training"].update(stop_batch=3), "'training.numb_steps' and 'training.stop_batch' are the same key"),
    (lambda c: c["model"]["descriptor"].update(rcutt=3), "unknown key 'model.descriptor.rcutt'"),
    (lambda c: c["training"].update(numb_steps=-5), "'training.numb_steps' must be positive"),
    (lambda c: c["training"].update(numb_steps="many"), "'training.numb_steps' must be an integer"),
    (lambda c: c["learning_rate"].update(start_lr="fast"), "'learning_rate.start_lr' must be a number"),
    (lambda c: c["training"]["training_data"].update(systems=["/no/such/dir"]), "/no/such/dir does not exist"),
    (lambda c: c["training"]["training_data"].update(batch_size="big"), "batch_size"),
    (lambda c: c["loss"].update(type="tensor"), "loss type 'tensor' is not supported"),
    (lambda c: c["model"]["descriptor"].update(neuron="wide"), "'model.descriptor.neuron' must be a list"),
    (lambda c: c["model"]["descriptor"].update(rcut="6"), "'model.descriptor.rcut' must be a number"),
    (lambda c: c.update(optimizer={"type": "AdamW"}), "optimizer type 'AdamW' is not supported"),
    (lambda c: c.update(optimiser={}), "unknown key 'optimiser'"),
])
def test_config_mistakes_are_one_line_errors(tmp_path, mutate, message):
    cfg = small_input(tmp_path)
    mutate(cfg)
    with pytest.raises(ConfigError, match=message) as err:
        normalize_input(cfg)
    assert "\n" not in str(err.value)


def test_type_map_missing_an_element_writes_nothing(tmp_path):
    cfg = small_input(tmp_path)
    cfg["model"]["type_map"] = ["O", "C"]
    with pytest.raises(DataError, match="H"):
        run(cfg, tmp_path / "out")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def dpmd(*args, cwd):
    return subprocess.run([sys.executable, "-m", "dpmd.cli", *args], capture_output=True, text=True, cwd=cwd)


def test_cli_train_freeze_test_ase(tmp_path):
    (tmp_path / "input.yaml").write_text(yaml.safe_dump(small_input(tmp_path)))
    res = dpmd("train", "input.yaml", "--set", "training.numb_steps=20", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    res = dpmd("freeze", "-o", "model.pth", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    res = dpmd("test", "-m", "model.pth", "-s", str(EXAMPLE), "-n", "3", "-d", "detail", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "F RMSE" in res.stdout and (tmp_path / "detail.f.out").is_file()
    assert np.loadtxt(tmp_path / "detail.e.out").shape == (3, 2)
    from ase import Atoms

    from dpmd.calculator import DP
    from dpmd.data import load_system

    s = load_system(EXAMPLE)
    atoms = Atoms([s.type_map[t] for t in s.atype], positions=s.coord[0], cell=s.box[0], pbc=True)
    atoms.calc = DP(str(tmp_path / "model.pth"))
    assert math.isfinite(atoms.get_potential_energy())
    res = dpmd("train", "input.yaml", "--set", "training.numb_steps=0", cwd=tmp_path)
    assert res.returncode == 1 and "numb_steps" in res.stderr and len(res.stderr.splitlines()) == 1


@pytest.mark.skipif(not DEEPMD_REF.is_dir(), reason="DeePMD-kit checkpoint not available")
def test_convert_model_cli(tmp_path):
    res = dpmd("convert-model", "--from", "deepmd", "-i", str(DEEPMD_REF / "model.ckpt.pt"), "-o", "m.pth", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    from dpmd.model import load_model

    ref = np.load(DEEPMD_REF / "reference_nopbc.npz")
    out = load_model(tmp_path / "m.pth")(torch.tensor(ref["coord"][0]), torch.tensor(ref["atype"]))
    np.testing.assert_allclose(float(out["energy"]), ref["energy"][0], rtol=1e-12)


def test_data_parallel_equals_single_process_with_same_global_batch(tmp_path):
    cfg = small_input(tmp_path, steps=6, save_freq=6)
    cfg["learning_rate"]["scale_by_worker"] = "none"
    (tmp_path / "input.yaml").write_text(yaml.safe_dump(cfg))
    (tmp_path / "ddp").mkdir()
    (tmp_path / "one").mkdir()
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "dpmd.cli", "train", "../input.yaml", "--threads", "1"],
                         capture_output=True, text=True, cwd=tmp_path / "ddp")
    assert ddp.returncode == 0, ddp.stderr[-2000:]
    one = dpmd("train", "../input.yaml", "--threads", "1", "--set", "training.training_data.batch_size=2",
               cwd=tmp_path / "one")
    assert one.returncode == 0, one.stderr
    a = torch.load(tmp_path / "ddp" / "model.ckpt-6.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "one" / "model.ckpt-6.pt", weights_only=True)["model"]
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-9, atol=1e-11), k
    assert not any(torch.equal(a[k], v) for k, v in Trainer(normalize_input(cfg), out_dir=tmp_path / "x",
                                                            progress=False).model.state_dict().items()
                   if "mean" not in k and "std" not in k and "bias" not in k)


def test_init_model_and_finetune_start_new_runs_from_weights(tmp_path):
    run(small_input(tmp_path, steps=10), tmp_path / "base")
    base = torch.load(tmp_path / "base" / "model.ckpt-10.pt", weights_only=True)
    init = Trainer(normalize_input(small_input(tmp_path, steps=5)), out_dir=tmp_path / "init", progress=False,
                   init_model=str(tmp_path / "base" / "model.ckpt-10.pt"))
    assert init.start_step == 0
    assert all(torch.equal(v, base["model"][k]) for k, v in init.model.state_dict().items())
    fine = Trainer(normalize_input(small_input(tmp_path, steps=5)), out_dir=tmp_path / "fine", progress=False,
                   finetune=str(tmp_path / "base" / "model.ckpt-10.pt"))
    state = fine.model.state_dict()
    assert torch.equal(state["descriptor.mean"], base["model"]["descriptor.mean"])
    assert not torch.equal(state["fitting.energy_bias"], base["model"]["fitting.energy_bias"])  # re-fitted
    fine.run()
    assert (tmp_path / "fine" / "model.ckpt-5.pt").is_file()


def test_kill_9_leaves_a_readable_checkpoint(tmp_path):
    import os
    import signal
    import time

    from dpmd.train.checkpoint import latest_checkpoint, load_checkpoint

    (tmp_path / "input.yaml").write_text(yaml.safe_dump(small_input(tmp_path, steps=100000, save_freq=1,
                                                                    max_ckpt_keep=2, disp_freq=1)))
    proc = subprocess.Popen([sys.executable, "-m", "dpmd.cli", "train", "input.yaml", "--threads", "1"],
                            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while not list(tmp_path.glob("model.ckpt-*.pt")) and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(0.37)  # somewhere in the middle of a later step or write
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    state = load_checkpoint(latest_checkpoint(tmp_path))
    assert state["step"] >= 1
