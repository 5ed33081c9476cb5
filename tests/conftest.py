"""Shared fixtures: repo paths, a small random model and water frames for physics tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dpmd.model import DeepPot

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "water" / "data_0"
SHARED = REPO.parent / "shared"
DEEPMD_REF = SHARED / "deepmd-kit" / "water_se_e2_a"


def pytest_sessionstart(session):
    """Compile the kernel library once per test run (cached by source hash; a file lock serialises parallel
    runs), so every test exercises the kernels where the model uses them.  DPMD_OPS=0 skips it."""
    from dpmd import ops

    if not ops.disabled():
        try:
            ops.build()
        except Exception as err:  # reported by tests/test_ops.py, which then fails
            session.config.dpmd_ops_error = f"{type(err).__name__}: {str(err)[-2000:]}"


@pytest.fixture(scope="session")
def lib(request):
    """The kernel library, built at session start (tests that need it fail, not skip, when the build failed)."""
    from dpmd import ops

    if ops.disabled():
        pytest.skip("DPMD_OPS=0: reference path only")
    err = getattr(request.config, "dpmd_ops_error", None)
    assert err is None, f"the kernel library did not build: {err}"
    assert ops.available(), "the kernel library is not loadable after the session build"
    return ops.library_path()


def small_config(rcut=4.0, sel=(30, 60), type_one_side=True, precision="float64", resnet_dt=True):
    return {
        "type_map": ["O", "H"],
        "descriptor": {"type": "se_e2_a", "sel": list(sel), "rcut": rcut, "rcut_smth": 0.5, "neuron": [4, 8, 16],
                       "axis_neuron": 4, "type_one_side": type_one_side, "resnet_dt": resnet_dt,
                       "precision": precision, "seed": 3},
        "fitting_net": {"neuron": [16, 16], "resnet_dt": True, "precision": precision, "seed": 4},
    }


def make_model(**kw) -> DeepPot:
    return with_statistics(DeepPot(small_config(**kw)))


def with_statistics(model: DeepPot) -> DeepPot:
    """A water (O, H) model with a non-trivial normalisation and energy bias, as after data statistics."""
    with torch.no_grad():
        model.descriptor.mean[:, 0] = torch.tensor([0.05, 0.04])
        model.descriptor.std[:] = torch.tensor([[0.09, 0.06, 0.06, 0.06], [0.08, 0.05, 0.05, 0.05]])
        model.fitting.energy_bias[:] = torch.tensor([-93.5, -187.1])
    return model


@pytest.fixture(scope="session")
def model():
    return make_model()


def finite_difference_force(energy, coord: torch.Tensor, i: int, k: int, h: float = 1e-5) -> float:
    """-dE/dx of atom i along axis k by central differences of energy(coord) -> float."""
    cp, cm = coord.clone(), coord.clone()
    cp[i, k] += h
    cm[i, k] -= h
    return -(energy(cp) - energy(cm)) / (2 * h)


@pytest.fixture(scope="session")
def water():
    """(coord (192, 3), atype (192,), box (3, 3)) of the first example frame, float64."""
    from dpmd.data import load_system

    s = load_system(EXAMPLE, type_map=["O", "H"])
    return (torch.tensor(s.coord[0]), torch.tensor(s.atype), torch.tensor(s.box[0]))


def triclinic_water(water, scale=0.5, seed=0):
    """A sheared, shrunk copy of part of the water frame: a random triclinic cell with realistic distances."""
    coord, atype, box = water
    gen = torch.Generator().manual_seed(seed)
    strain = torch.eye(3, dtype=torch.float64) + 0.15 * (torch.rand(3, 3, generator=gen, dtype=torch.float64) - 0.5)
    keep = (coord @ torch.linalg.inv(box) % 1.0 < scale).all(dim=1)  # atoms in a sub-cell
    sub_box = box * scale
    return coord[keep] @ strain, atype[keep], sub_box @ strain


def random_rotation(seed=0) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q * torch.sign(torch.linalg.det(q))


def _slurm_partitions():
    """({partition: node state}, None) when `sinfo` answers and a node can take jobs, else (None, why)."""
    import shutil
    import subprocess

    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return None, "Slurm is not installed (no sinfo/sbatch on PATH)"
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%P %T"], capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.TimeoutExpired) as err:
        return None, f"sinfo: {type(err).__name__}: {err}"
    if out.returncode != 0:
        return None, f"sinfo fails: {((out.stderr.strip() or out.stdout.strip()).splitlines() or ['no output'])[-1]}"
    parts = dict(line.split(None, 1) for line in out.stdout.splitlines() if len(line.split()) == 2)
    usable = {p.rstrip("*"): s for p, s in parts.items() if s in ("idle", "mixed", "allocated", "completing")}
    return (usable, None) if usable else (None, f"no Slurm node takes jobs (sinfo: {parts or 'no partitions'})")


@pytest.fixture(scope="session")
def slurm():
    """A running Slurm cluster: {partition: node state} (.ci/slurm/start.sh's one node on 127.0.0.1 has the
    partitions `debug`, the default, and `gpu`).  Off CI, with slurm-wlm installed and as root, it runs
    .ci/slurm/start.sh (no install) when `sinfo` does not answer.  Without Slurm the test skips with the reason;
    under DPMD_REQUIRE_SLURM=1 (.ci/run, which started it) it fails instead, so CI never skips Slurm silently."""
    import os
    import shutil
    import subprocess

    parts, why = _slurm_partitions()
    if parts is None and not os.environ.get("CI") and shutil.which("slurmctld") and os.geteuid() == 0:
        try:
            start = subprocess.run(["bash", str(REPO / ".ci" / "slurm" / "start.sh")], capture_output=True,
                                   text=True, timeout=120, env={**os.environ, "SLURM_CI_NO_INSTALL": "1"})
            if start.returncode == 0:
                parts, why = _slurm_partitions()
            else:
                why = f"{why}; .ci/slurm/start.sh: {(start.stderr.strip().splitlines() or ['failed'])[-1]}"
        except subprocess.TimeoutExpired:
            why = f"{why}; .ci/slurm/start.sh took over 120 s"
    if parts is None:
        if os.environ.get("DPMD_REQUIRE_SLURM") == "1":
            pytest.fail(f"DPMD_REQUIRE_SLURM=1 but {why}")
        pytest.skip(why)
    return parts
