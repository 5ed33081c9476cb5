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
    model = DeepPot(small_config(**kw))
    with torch.no_grad():  # non-trivial normalisation, as after data statistics
        model.descriptor.mean[:, 0] = torch.tensor([0.05, 0.04])
        model.descriptor.std[:] = torch.tensor([[0.09, 0.06, 0.06, 0.06], [0.08, 0.05, 0.05, 0.05]])
        model.fitting.energy_bias[:] = torch.tensor([-93.5, -187.1])
    return model


@pytest.fixture(scope="session")
def model():
    return make_model()


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
