"""dpmd's training frames are DeePMD-kit's: with the same input and seed, `dpmd train` draws the system and frames
of every step as `dp --pt train` does (dpmd/train/sampler.py), training and validation sharing one generator.

tests/fixtures/deepmd_sampling/frames.json holds DeePMD-kit 3.2.0's recorded sequence (its Sample_rank_0.txt) for
input.json there: two training systems of 13 and 23 frames (192 and 64 atoms, 2 and 6 frames a batch, both with a
short last batch), a validation system, 60 steps, with 4, 2 and 0 DataLoader workers (NUM_WORKERS); how it was
made: make_fixture.py there.  tests/fixtures/deepmd_statistics/reference.json holds, for the same input with
data_stat_nbatch 2 and 0 workers, DeePMD-kit's statistics (from the first 2 batches of a shuffle of each system)
and its frames without a stat_file, writing one, and reading it (then it samples nothing for the statistics).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from dpmd.train.config import normalize_input
from dpmd.train.trainer import Trainer

FIXTURE = Path(__file__).parent / "fixtures" / "deepmd_sampling"
STATISTICS = Path(__file__).parent / "fixtures" / "deepmd_statistics" / "reference.json"


def _write_systems(root: Path) -> None:
    spec = importlib.util.spec_from_file_location("make_fixture", FIXTURE / "make_fixture.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.write_systems(root)


def _trainer(tmp_path: Path) -> Trainer:
    cfg = json.loads((FIXTURE / "input.json").read_text())
    return Trainer(normalize_input(cfg, base_dir=tmp_path), out_dir=tmp_path / "run", progress=False)


def _statistics_run(tmp_path: Path, out: str, stat_file: Path | None = None) -> Trainer:
    """A run of tests/fixtures/deepmd_statistics: deepmd_sampling's input, data_stat_nbatch 2, 10 steps."""
    cfg = json.loads((FIXTURE / "input.json").read_text())
    cfg["model"]["data_stat_nbatch"] = 2
    cfg["training"].update(numb_steps=10, save_freq=10)
    if stat_file:
        cfg["training"]["stat_file"] = str(stat_file)
    return Trainer(normalize_input(cfg, base_dir=tmp_path), out_dir=tmp_path / out, progress=False)


def _recorded(trainer: Trainer) -> list:
    """Runs the trainer, returning the (system, frames) of each training step."""
    drawn, draw = [], trainer.sampler.next

    def next_and_record(rank=0):
        i, frames = draw(rank)
        drawn.append([i, frames.tolist()])
        return i, frames

    trainer.sampler.next = next_and_record
    trainer.run()
    return drawn


@pytest.mark.parametrize("workers", ["4", "2", "0"])
def test_frames_are_deepmd_kits(tmp_path, monkeypatch, workers):
    monkeypatch.setenv("NUM_WORKERS", workers)
    _write_systems(tmp_path)
    expected = json.loads((FIXTURE / "frames.json").read_text())[workers]
    assert _recorded(_trainer(tmp_path)) == expected


def test_restart_continues_deepmd_kits_sequence(tmp_path, monkeypatch):
    """A run killed at step 33 and restarted from its checkpoint at step 30 (mid system-choosing epoch, shuffles
    under way in both loader workers, validation drawn) draws the rest of the same sequence."""
    monkeypatch.setenv("NUM_WORKERS", "2")
    _write_systems(tmp_path)
    cfg = json.loads((FIXTURE / "input.json").read_text())
    cfg["training"]["save_freq"] = 30
    first = Trainer(normalize_input(cfg, base_dir=tmp_path), out_dir=tmp_path / "run", progress=False)
    calls = []

    def die(*_):
        calls.append(1)
        if len(calls) == 33:
            raise KeyboardInterrupt

    first.optimizer.register_step_post_hook(die)
    with pytest.raises(KeyboardInterrupt):
        first.run()
    again = Trainer(normalize_input(cfg, base_dir=tmp_path), restart=str(tmp_path / "run" / "model.ckpt-30.pt"),
                    out_dir=tmp_path / "run", progress=False)
    expected = json.loads((FIXTURE / "frames.json").read_text())["2"]
    assert _recorded(again) == expected[30:]


def _assert_deepmd_statistics(model, ref: dict) -> None:
    np.testing.assert_allclose(model.descriptor.mean.numpy(), ref["mean"], rtol=0, atol=1e-12)
    np.testing.assert_allclose(model.descriptor.std.numpy(), ref["stddev"], rtol=1e-12, atol=0)
    np.testing.assert_allclose(model.fitting.energy_bias.numpy(), ref["out_bias"], rtol=1e-12, atol=1e-9)


def test_statistics_are_deepmd_kits(tmp_path, monkeypatch):
    """The descriptor's mean / std and the energy bias come from the frames DeePMD-kit's statistics draw (4 of 13
    and 12 of 23 here, not every frame), with no extra refit of the bias; the training frames after them stay
    DeePMD-kit's."""
    monkeypatch.setenv("NUM_WORKERS", "0")
    _write_systems(tmp_path)
    ref = json.loads(STATISTICS.read_text())
    trainer = _statistics_run(tmp_path, "run")
    _assert_deepmd_statistics(trainer.model, ref)
    assert _recorded(trainer) == ref["frames"]


def test_a_stat_file_that_holds_the_statistics_samples_nothing(tmp_path, monkeypatch):
    """Writing training.stat_file draws the statistics' frames as without one; reading it back draws none, as
    DeePMD-kit (which then trains on other frames than when it computed them), with the same statistics."""
    monkeypatch.setenv("NUM_WORKERS", "0")
    _write_systems(tmp_path)
    ref = json.loads(STATISTICS.read_text())
    writing = _statistics_run(tmp_path, "writing", tmp_path / "stat.hdf5")
    assert _recorded(writing) == ref["frames_writing"]
    reading = _statistics_run(tmp_path, "reading", tmp_path / "stat.hdf5")
    _assert_deepmd_statistics(reading.model, ref)
    assert _recorded(reading) == ref["frames_reading"]
