"""Bad inputs and faults of `dpmd train` / `dpmd freeze`: each is one line naming the culprit, exit 1, no
traceback, and nothing half-written (issue 16, training part).  Runs in-process: a few seconds in all."""

from __future__ import annotations

import math
import os
import pathlib

import pytest
import torch
import yaml

from dpmd.cli import main
from dpmd.errors import DpmdError
from dpmd.train.checkpoint import latest_checkpoint, save_checkpoint, tidy
from dpmd.train.config import normalize_input
from dpmd.train.trainer import FrameStore, Trainer
from tests.conftest import EXAMPLE, small_config


def base_input(steps=4, **training) -> dict:
    cfg = {"model": small_config(),
           "learning_rate": {"start_lr": 1e-3, "stop_lr": 1e-5, "decay_steps": 10},
           "loss": {},
           "training": {"training_data": {"systems": [str(EXAMPLE)], "batch_size": 1},
                        "numb_steps": steps, "seed": 1, "disp_freq": 2, "save_freq": 2}}
    cfg["model"]["data_stat_nbatch"] = 2
    cfg["training"].update(training)
    return cfg


def write_input(tmp_path, cfg=None, name="input.yaml") -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg if cfg is not None else base_input()))
    return str(path)


def dpmd(capsys, *args) -> tuple[int, str, str]:
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def one_line_error(rc, err, *names) -> str:
    assert rc == 1, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    for name in names:
        assert name in lines[0], (name, lines[0])
    return lines[0]


def snapshot(directory: pathlib.Path) -> dict:
    """Every file below directory: bytes, or the target of a link."""
    return {str(p.relative_to(directory)): (os.readlink(p) if p.is_symlink() else p.read_bytes())
            for p in sorted(directory.rglob("*")) if p.is_file() or p.is_symlink()}


@pytest.fixture(autouse=True)
def _no_debug(monkeypatch):
    monkeypatch.delenv("DPMD_DEBUG", raising=False)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished 4-step run (checkpoints at steps 2 and 4) to copy from."""
    out = tmp_path_factory.mktemp("trained")
    Trainer(normalize_input(base_input()), out_dir=out, progress=False).run()
    return out


# ------------------------------------------------------------------ config mistakes: checked before any output
def _set(path, value):
    def mutate(cfg):
        node = cfg
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    return mutate


@pytest.mark.parametrize("mutate, names", [
    (_set(["model", "descriptor"], [{"type": "se_e2_a"}]), ["'model.descriptor' must be a mapping"]),
    (_set(["model", "fitting_net"], [16, 16]), ["'model.fitting_net' must be a mapping"]),
    (_set(["loss"], {"start_pref_e": 0, "limit_pref_e": 0, "start_pref_f": 0, "limit_pref_f": 0}),
     ["'loss'", "is 0"]),
    (_set(["learning_rate", "start_lr"], math.nan), ["learning_rate.start_lr", "finite"]),
    (_set(["learning_rate", "stop_lr"], math.inf), ["learning_rate.stop_lr", "finite"]),
    (_set(["loss", "start_pref_f"], math.nan), ["loss.start_pref_f", "finite"]),
    (_set(["loss", "limit_pref_e"], -math.inf), ["loss.limit_pref_e"]),
    (_set(["model", "descriptor", "rcut"], math.inf), ["model.descriptor.rcut", "finite"]),
    (_set(["model", "descriptor", "rcut_smth"], 4.0), ["model.descriptor.rcut_smth", "rcut = 4.0"]),
    (_set(["model", "descriptor", "sel"], [0, 0]), ["model.descriptor.sel", "every count is 0"]),
    (_set(["model", "descriptor", "sel"], "auto:abc"), ["model.descriptor.sel", "'auto' or 'auto:<factor>'"]),
    (_set(["model", "descriptor", "sel"], "automatic"), ["model.descriptor.sel", "'auto' or 'auto:<factor>'"]),
    (_set(["model", "type_map"], "HO"), ["model.type_map", "list of element names"]),
    (_set(["training", "seed"], 2**70), ["training.seed", "[0, 2**63-1]"]),
    (_set(["model", "descriptor", "seed"], 2**70), ["model.descriptor.seed", "[0, 2**63-1]"]),
    (_set(["model", "fitting_net", "seed"], -1), ["model.fitting_net.seed", "[0, 2**63-1]"]),
])
def test_config_mistakes_are_one_line_and_create_nothing(tmp_path, capsys, mutate, names):
    cfg = base_input()
    mutate(cfg)
    rc, _, err = dpmd(capsys, "train", write_input(tmp_path, cfg), "-o", tmp_path / "out")
    one_line_error(rc, err, "dpmd train: error:", *names)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("item, names", [
    ("training.seed=!!python/object/apply:os.system ['touch {marker}']", ["--set", "training.seed", "plain YAML"]),
    ("training.numb_steps=!!python/name:os.system", ["--set", "training.numb_steps", "plain YAML"]),
    ("training.numb_steps", ["--set", "KEY=VALUE"]),
    ("model.type_map.x=1", ["--set", "'model.type_map' is not a section"]),
])
def test_bad_set_is_one_line(tmp_path, capsys, item, names):
    marker = tmp_path / "pwned"
    rc, _, err = dpmd(capsys, "train", write_input(tmp_path), "-o", tmp_path / "out",
                      "--set", item.format(marker=marker))
    one_line_error(rc, err, *names)
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_yaml_tag_in_the_input_file_is_one_line(tmp_path, capsys):
    marker = tmp_path / "pwned"
    (tmp_path / "input.yaml").write_text(f"model: !!python/object/apply:os.system ['touch {marker}']\n")
    rc, _, err = dpmd(capsys, "train", tmp_path / "input.yaml", "-o", tmp_path / "out")
    one_line_error(rc, err, "input.yaml: not valid YAML")
    assert not marker.exists() and not (tmp_path / "out").exists()


# ------------------------------------------------------------------ checkpoints are plain data
class _TouchOnLoad:
    """Unpickling this creates a file: what a malicious checkpoint would do."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.path),)


def crafted_checkpoint(path, marker) -> pathlib.Path:
    torch.save({"format": "dpmd-checkpoint", "step": 1, "model": {"w": torch.zeros(2)},
                "hook": _TouchOnLoad(marker)}, path)
    return path


def test_crafted_checkpoint_really_runs_code_when_unpickled(tmp_path):
    # the control for the test below: without weights_only the payload does run
    crafted_checkpoint(tmp_path / "evil.pt", tmp_path / "ran")
    torch.load(tmp_path / "evil.pt", weights_only=False)
    assert (tmp_path / "ran").exists()


@pytest.mark.parametrize("entry", ["--restart", "--init-model", "--finetune", "freeze -c"])
def test_crafted_checkpoint_is_refused_by_every_entry_point(tmp_path, capsys, entry):
    evil = crafted_checkpoint(tmp_path / "evil.pt", tmp_path / "pwned")
    if entry == "freeze -c":
        args = ["freeze", "-c", evil, "-o", tmp_path / "out.pth"]
    else:
        args = ["train", write_input(tmp_path), entry, evil, "-o", tmp_path / "out"]
    rc, _, err = dpmd(capsys, *args)
    one_line_error(rc, err, str(evil), "loading it would run code; refusing")
    assert not (tmp_path / "pwned").exists()
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.pth").exists()


def test_freeze_refuses_non_finite_weights(tmp_path, capsys, trained):
    state = torch.load(trained / "model.ckpt-4.pt", weights_only=True)
    state["model"]["fitting.nets.0.layers.1.matrix"][0, 0] = math.nan
    torch.save(state, tmp_path / "model.ckpt-4.pt")
    rc, _, err = dpmd(capsys, "freeze", "-c", tmp_path / "model.ckpt-4.pt", "-o", tmp_path / "m.pth")
    one_line_error(rc, err, "fitting.nets.0.layers.1.matrix", "NaN or inf")
    assert not (tmp_path / "m.pth").exists()
    # nor does a run restart from it
    rc, _, err = dpmd(capsys, "train", write_input(tmp_path, base_input(steps=6)), "--restart",
                      tmp_path / "model.ckpt-4.pt", "-o", tmp_path / "out")
    one_line_error(rc, err, "fitting.nets.0.layers.1.matrix")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ one run per folder
def test_new_run_refuses_a_folder_holding_a_run_and_overwrite_moves_it_aside(tmp_path, capsys):
    out = tmp_path / "out"
    inp = write_input(tmp_path, base_input(steps=6, max_ckpt_keep=2))  # the older, longer run
    assert dpmd(capsys, "train", inp, "-o", out)[0] == 0
    before = snapshot(out)
    short = write_input(tmp_path, base_input(steps=2), name="short.yaml")
    rc, _, err = dpmd(capsys, "train", short, "-o", out)
    one_line_error(rc, err, str(out), "--restart", "-o", "--overwrite")
    assert snapshot(out) == before
    rc, _, err = dpmd(capsys, "train", short, "-o", out, "--overwrite")
    assert rc == 0, err
    old = [p for p in out.iterdir() if p.name.startswith("old-run-")]
    assert len(old) == 1 and f"moved the previous run to {old[0]}" in err  # (logged: stderr)
    assert snapshot(old[0]) == before  # nothing of the old run lost
    assert sorted(p.name for p in out.glob("model.ckpt-*.pt")) == ["model.ckpt-2.pt"]
    assert (out / "model.ckpt.pt").resolve() == (out / "model.ckpt-2.pt").resolve()
    rc, _, err = dpmd(capsys, "freeze", "-c", out, "-o", tmp_path / "m.pth")
    assert rc == 0 and "model.ckpt-2.pt" in err, err


def test_restart_into_a_folder_holding_another_run_is_refused(tmp_path, capsys, trained):
    out = tmp_path / "out"
    assert dpmd(capsys, "train", write_input(tmp_path), "-o", out)[0] == 0
    before = snapshot(out)
    inp = write_input(tmp_path, base_input(steps=6), name="six.yaml")
    rc, _, err = dpmd(capsys, "train", inp, "--restart", trained / "model.ckpt-4.pt", "-o", out)
    one_line_error(rc, err, str(out), "another training run", "--overwrite")
    assert snapshot(out) == before
    rc, _, err = dpmd(capsys, "train", inp, "--restart", trained / "model.ckpt-4.pt", "-o", out, "--overwrite")
    assert rc == 0 and "trained to step 6:" in err, err
    old = next(out.glob("old-run-*"))
    assert snapshot(old) == before and (out / "model.ckpt-6.pt").is_file()


def test_pruning_and_latest_only_see_the_current_run(tmp_path, trained):
    state = torch.load(trained / "model.ckpt-4.pt", weights_only=True)
    prefix = tmp_path / "model.ckpt"
    save_checkpoint({**state, "run_id": "older"}, prefix, 100, keep=1)  # a longer run left behind
    for step in (1, 2, 3):
        save_checkpoint({**state, "run_id": "mine"}, prefix, step, keep=2)
    assert sorted(p.name for p in tmp_path.glob("model.ckpt-*.pt")) == [
        "model.ckpt-100.pt", "model.ckpt-2.pt", "model.ckpt-3.pt"]
    assert latest_checkpoint(tmp_path).name == "model.ckpt-3.pt"
    (tmp_path / "model.ckpt-3.pt").unlink()  # the named file lost: the newest of its run, not the other run's
    assert latest_checkpoint(tmp_path).name == "model.ckpt-2.pt"
    (tmp_path / "checkpoint").unlink()  # no `checkpoint` file and two runs: ambiguous
    with pytest.raises(DpmdError, match="several runs") as err:
        latest_checkpoint(tmp_path)
    assert "\n" not in str(err.value)


def test_startup_removes_temp_files_and_repairs_the_link(tmp_path, trained):
    for p in trained.iterdir():
        (tmp_path / p.name).symlink_to(os.readlink(p)) if p.is_symlink() else (tmp_path / p.name).write_bytes(
            p.read_bytes())
    # a kill mid-write left temp files; another between the `checkpoint` file and the link left them apart
    temps = [".model.ckpt-6.pt.k2j3h4", ".checkpoint.a1b2c3", ".model.ckpt.pt.tmp4242", ".lcurve.out.x9y8"]
    for name in temps:
        (tmp_path / name).write_bytes(b"partial")
    (tmp_path / "model.ckpt.pt").unlink()
    (tmp_path / "model.ckpt.pt").symlink_to("model.ckpt-2.pt")
    tidy(tmp_path / "model.ckpt", "lcurve.out")
    assert not any((tmp_path / name).exists() for name in temps)
    assert os.readlink(tmp_path / "model.ckpt.pt") == "model.ckpt-4.pt"
    # a `checkpoint` file naming a file that never got written: repaired to the newest of its run
    run = (tmp_path / "checkpoint").read_text().splitlines()[1]
    (tmp_path / "checkpoint").write_text(f"model.ckpt-6.pt\n{run}\n")
    tidy(tmp_path / "model.ckpt", "lcurve.out")
    assert (tmp_path / "checkpoint").read_text().splitlines() == ["model.ckpt-4.pt", run]


# ------------------------------------------------------------------ restart with a changed input
def test_restart_continues_to_the_new_numb_steps(tmp_path, capsys, trained):
    out = tmp_path / "out"
    inp = write_input(tmp_path)
    rc, _, err = dpmd(capsys, "train", inp, "--restart", trained / "model.ckpt-4.pt", "-o", out,
                      "--set", "training.numb_steps=6")
    assert rc == 0, err
    assert "trained to step 6:" in err
    assert torch.load(out / "model.ckpt-6.pt", weights_only=True)["step"] == 6
    assert (out / "lcurve.out").read_text().splitlines()[-1].split()[0] == "6"


@pytest.mark.parametrize("item, names", [
    ("training.numb_steps=4", ["checkpoint is at step 4; training.numb_steps=4 leaves nothing to train"]),
    ("training.numb_steps=3", ["checkpoint is at step 4; training.numb_steps=3 leaves nothing to train"]),
    ("model.descriptor.rcut=3.5", ["'model.descriptor.rcut' is 4.0 in the checkpoint but 3.5 in the input"]),
    ("model.fitting_net.neuron=[8]", ["'model.fitting_net.neuron'", "--init-model"]),
])
def test_restart_refuses_what_it_cannot_continue(tmp_path, capsys, trained, item, names):
    restart = trained / "model.ckpt-4.pt"
    before = snapshot(trained)
    rc, _, err = dpmd(capsys, "train", write_input(tmp_path), "--restart", restart, "-o", trained, "--set", item)
    one_line_error(rc, err, str(restart), *names)
    assert snapshot(trained) == before


# ------------------------------------------------------------------ non-finite loss
def test_non_finite_loss_stops_naming_step_and_frames_keeping_the_last_good_checkpoint(tmp_path, monkeypatch):
    poisoned = []
    batch = FrameStore.batch

    def poison_third_batch(self, i, frames):  # a label that overflows, as corrupted data would
        graph, label = batch(self, i, frames)
        poisoned.append(frames.tolist())
        if len(poisoned) == 3:
            label["force"] = torch.full_like(label["force"], 1e300)
        return graph, label

    monkeypatch.setattr(FrameStore, "batch", poison_third_batch)
    cfg = normalize_input(base_input(steps=6, save_freq=1, disp_freq=1))
    with pytest.raises(DpmdError) as err:
        Trainer(cfg, out_dir=tmp_path, progress=False).run()
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("step 3: non-finite loss")
    assert f"frames {poisoned[2]} of {EXAMPLE}" in message and "model.ckpt-2.pt" in message
    assert sorted(p.name for p in tmp_path.glob("model.ckpt-*.pt")) == ["model.ckpt-1.pt", "model.ckpt-2.pt"]
    assert latest_checkpoint(tmp_path).name == "model.ckpt-2.pt"
    assert [ln.split()[0] for ln in (tmp_path / "lcurve.out").read_text().splitlines()[1:]] == ["1", "2"]
    weights = torch.load(tmp_path / "model.ckpt-2.pt", weights_only=True)["model"]
    assert all(torch.isfinite(v).all() for v in weights.values())


# ------------------------------------------------------------------ batch_size beyond the frames
def test_batch_size_is_capped_at_the_system_frames(tmp_path):
    from dpmd.data import load_system, write_system

    write_system(load_system(EXAMPLE).subset(range(4)), tmp_path / "four")
    cfg = base_input(steps=1)
    cfg["training"]["training_data"] = {"systems": [str(tmp_path / "four")], "batch_size": 100000}
    trainer = Trainer(normalize_input(cfg), out_dir=tmp_path / "out", progress=False)
    assert trainer.sampler.sizes == [4]
    assert trainer.run()["step"] == 1
    assert sorted(trainer.sampler.last[1]) == [0, 1, 2, 3]  # every frame once, none repeated


# ------------------------------------------------------------------ the last-resort handler
@pytest.mark.parametrize("error, rc, line", [
    (RuntimeError("boom\nsecond line"), 1,
     "dpmd freeze: internal error: RuntimeError: boom (set DPMD_DEBUG=1 for the traceback)"),
    (KeyError("k"), 1, "dpmd freeze: internal error: KeyError: 'k' (set DPMD_DEBUG=1 for the traceback)"),
    (ValueError("bad\nvalue"), 1, "dpmd freeze: error: bad"),
    (KeyboardInterrupt(), 130, "dpmd freeze: interrupted"),
])
def test_unexpected_errors_are_one_line(tmp_path, capsys, monkeypatch, error, rc, line):
    def fail(*_):
        raise error

    monkeypatch.setattr("dpmd.train.freeze.freeze", fail)
    code, _, err = dpmd(capsys, "freeze", "-c", tmp_path)
    assert code == rc and err.strip().splitlines() == [line]
    monkeypatch.setenv("DPMD_DEBUG", "1")
    with pytest.raises(type(error)):
        main(["freeze", "-c", str(tmp_path)])
