"""The documented examples do what their documentation says: physically (a thermostat holds its temperature)."""

from __future__ import annotations

import numpy as np
import yaml

from tests.conftest import REPO


def test_documented_md_example_holds_its_temperature(tmp_path, monkeypatch):
    """configs/md_water_nvt.yaml (README, docs/md.md), shortened: NVT water at 300 K stays near 300 K.  The
    1000-step DeePMD-kit checkpoint took this input from 300 to ~900 K in 100 steps; a usable model stays put."""
    from dpmd.md.config import run_md

    monkeypatch.chdir(REPO)   # the example's paths are relative to the repository root, as documented
    cfg = yaml.safe_load((REPO / "configs" / "md_water_nvt.yaml").read_text())
    cfg.update(steps=300, thermo_freq=10, traj_freq=0, checkpoint_freq=0, output_dir=str(tmp_path / "md"))
    run_md(cfg, log=lambda *_: None)
    temps = np.loadtxt(tmp_path / "md" / "thermo.log")[:, 4]   # step time pe ke temp ...
    assert len(temps) == 31
    assert 220 < temps[10:].min() and temps[10:].max() < 380, temps
    assert abs(temps[10:].mean() - 300) < 40, temps.mean()
