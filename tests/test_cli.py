"""The `dpmd` command: output of neighbor-stat and demo, and one-line errors."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import EXAMPLE, REPO


def dpmd(*args):
    return subprocess.run([sys.executable, "-m", "dpmd.cli", *args], capture_output=True, text=True, cwd=REPO)


def test_neighbor_stat_on_example():
    res = dpmd("neighbor-stat", "-s", str(EXAMPLE), "-r", "6", "-t", "O", "H")
    assert res.returncode == 0, res.stderr
    assert "max_nbor_size: [38, 70]" in res.stdout
    assert "min_nbor_dist: 0.89" in res.stdout


def test_errors_are_one_line(tmp_path):
    res = dpmd("neighbor-stat", "-s", str(tmp_path / "nowhere"), "-r", "6")
    assert res.returncode == 1
    assert len(res.stderr.strip().splitlines()) == 1 and "nowhere" in res.stderr
    bad = tmp_path / "sys"
    (bad / "set.000").mkdir(parents=True)
    (bad / "type.raw").write_text("0\n1\n")
    res = dpmd("neighbor-stat", "-s", str(bad), "-r", "6")
    assert res.returncode == 1 and len(res.stderr.strip().splitlines()) == 1
    assert "coord.npy" in res.stderr


def test_demo_runs_and_conserves_energy(tmp_path):
    res = dpmd("demo", "--quick", "--steps", "4", "--train-steps", "3", "-o", str(tmp_path / "demo"))
    assert res.returncode == 0, res.stderr
    drift = float(res.stderr.split("total-energy change")[1].split()[0])  # (the demo logs: stderr)
    assert abs(drift) < 1e-4  # eV/atom over 4 steps of 0.5 fs with a barely trained model
