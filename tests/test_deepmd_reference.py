"""A DeePMD-kit 3.2 checkpoint loads and gives DeePMD-kit's own numbers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dpmd.errors import DpmdError
from dpmd.model import load_model, save_model
from tests.conftest import DEEPMD_REF

pytestmark = pytest.mark.skipif(not DEEPMD_REF.is_dir(), reason="shared DeePMD-kit reference not available")


@pytest.fixture(scope="module")
def deepmd_model():
    return load_model(DEEPMD_REF / "model.ckpt.pt")


def test_periodic_frames_match_deepmd(deepmd_model):
    ref = np.load(DEEPMD_REF / "reference.npz")
    out = deepmd_model(torch.tensor(ref["coord"], dtype=torch.float64), torch.tensor(ref["atype"]),
                       torch.tensor(ref["box"], dtype=torch.float64))
    np.testing.assert_allclose(out["energy"].numpy(), ref["energy"], rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(out["atom_energy"].numpy(), ref["atom_energy"], atol=1e-10)
    np.testing.assert_allclose(out["force"].numpy(), ref["force"], atol=1e-10)
    np.testing.assert_allclose(out["virial"].numpy(), ref["virial"], atol=1e-9)


def test_open_boundary_cluster_matches_deepmd(deepmd_model):
    ref = np.load(DEEPMD_REF / "reference_nopbc.npz")
    out = deepmd_model(torch.tensor(ref["coord"], dtype=torch.float64), torch.tensor(ref["atype"]), None)
    np.testing.assert_allclose(out["energy"].numpy(), ref["energy"], rtol=1e-12)
    np.testing.assert_allclose(out["force"].numpy(), ref["force"], atol=1e-10)
    np.testing.assert_allclose(out["virial"].numpy(), ref["virial"], atol=1e-10)


def test_save_and_reload_gives_same_numbers(deepmd_model, tmp_path):
    ref = np.load(DEEPMD_REF / "reference_nopbc.npz")
    save_model(deepmd_model, tmp_path / "water.pth")
    again = load_model(tmp_path / "water.pth")
    a = deepmd_model(torch.tensor(ref["coord"][0]), torch.tensor(ref["atype"]))
    b = again(torch.tensor(ref["coord"][0]), torch.tensor(ref["atype"]))
    assert torch.equal(a["energy"], b["energy"]) and torch.equal(a["force"], b["force"])


def test_bad_model_files(tmp_path):
    with pytest.raises(DpmdError, match="not found"):
        load_model(tmp_path / "missing.pth")
    (tmp_path / "junk.pth").write_text("not a model")
    with pytest.raises(DpmdError, match=r"junk.pth: unreadable \(not a PyTorch file\); expected a frozen dpmd model"):
        load_model(tmp_path / "junk.pth")
