"""Physics of the DeepPot-SE model and its force/virial wrapper (float64)."""

from __future__ import annotations

import pytest
import torch

from dpmd.errors import ConfigError, NeighborOverflowError
from dpmd.model import DeepPot
from tests.conftest import make_model, random_rotation, small_config, triclinic_water


def energy(model, coord, atype, box):
    return float(model(coord, atype, box)["energy"])


def unbiased_model(**kw):
    """A model without the per-type energy bias: a constant (about -4000 eV here) that has no force or virial and
    only adds its rounding error to the finite differences of the energy."""
    model = make_model(**kw)
    with torch.no_grad():
        model.fitting.energy_bias.zero_()
    return model


@pytest.mark.parametrize("type_one_side", [True, False])
def test_forces_are_minus_energy_gradient(water, type_one_side):
    model = unbiased_model(type_one_side=type_one_side)
    coord, atype, box = triclinic_water(water)
    out = model(coord, atype, box)
    h = 1e-5
    gen = torch.Generator().manual_seed(1)
    for i in torch.randint(0, coord.shape[0], (4,), generator=gen).tolist():
        for k in range(3):
            cp, cm = coord.clone(), coord.clone()
            cp[i, k] += h
            cm[i, k] -= h
            fd = -(energy(model, cp, atype, box) - energy(model, cm, atype, box)) / (2 * h)
            assert out["force"][i, k].item() == pytest.approx(fd, abs=1e-7, rel=1e-6)


def test_virial_is_finite_strain_derivative(water):
    model = unbiased_model()
    coord, atype, box = triclinic_water(water, seed=2)
    virial = model(coord, atype, box)["virial"].reshape(3, 3)
    h = 1e-6
    for a in range(3):
        for b in range(3):
            eps = torch.zeros(3, 3, dtype=torch.float64)
            eps[a, b] = h
            plus, minus = torch.eye(3, dtype=torch.float64) + eps, torch.eye(3, dtype=torch.float64) - eps
            # rows are vectors: x' = x (1 + eps)^T  applies strain eps to every position and lattice vector
            dE = energy(model, coord @ plus.T, atype, box @ plus.T) - energy(model, coord @ minus.T, atype, box @ minus.T)
            assert virial[a, b].item() == pytest.approx(-dE / (2 * h), abs=1e-6)
    assert torch.allclose(virial, virial.T, atol=1e-9)  # rotational invariance makes it symmetric


def test_invariances(model, water):
    coord, atype, box = triclinic_water(water, seed=3)
    ref = model(coord, atype, box)
    e0 = float(ref["energy"])
    # rotation of positions and cell together; forces rotate with them
    rot = random_rotation(4)
    out = model(coord @ rot.T, atype, box @ rot.T)
    assert float(out["energy"]) == pytest.approx(e0, abs=1e-9)
    assert torch.allclose(out["force"], ref["force"] @ rot.T, atol=1e-9)
    # translation
    assert energy(model, coord + torch.tensor([0.3, -1.7, 2.9], dtype=torch.float64), atype, box) == pytest.approx(e0, abs=1e-9)
    # wrapping atoms by lattice vectors
    shifts = torch.randint(-2, 3, coord.shape, generator=torch.Generator().manual_seed(5)).double()
    out = model(coord + shifts @ box, atype, box)
    assert float(out["energy"]) == pytest.approx(e0, abs=1e-9)
    assert torch.allclose(out["force"], ref["force"], atol=1e-9)
    # permutation of atoms (same-type atoms exchange places; types follow their atoms)
    perm = torch.randperm(coord.shape[0], generator=torch.Generator().manual_seed(6))
    out = model(coord[perm], atype[perm], box)
    assert float(out["energy"]) == pytest.approx(e0, abs=1e-9)
    assert torch.allclose(out["force"], ref["force"][perm], atol=1e-9)
    assert torch.allclose(out["atom_energy"], ref["atom_energy"][perm], atol=1e-10)


def test_continuous_across_cutoff():
    """A neighbour leaving the sphere: energy and forces go smoothly to the no-neighbour values."""
    model = make_model()
    atype = torch.tensor([0, 1, 1])
    rc = model.rcut

    def at(d):
        # atom 2 is within rcut of atom 0 only: crossing rcut changes nothing else
        coord = torch.tensor([[0.0, 0.0, 0.0], [-0.96, 0.0, 0.0], [d, 0.0, 0.0]], dtype=torch.float64)
        return model(coord, atype)

    inside, outside = at(rc - 1e-6), at(rc + 1e-6)
    assert float(inside["energy"]) == pytest.approx(float(outside["energy"]), abs=1e-12)
    assert torch.allclose(inside["force"], outside["force"], atol=1e-9)
    assert outside["force"][2].abs().max() == 0.0
    # and the energy changes smoothly well inside the cutoff too (not a constant model)
    assert abs(float(at(2.0)["energy"]) - float(at(3.0)["energy"])) > 1e-6


def test_chunked_and_batched_evaluation_agree(model, water):
    coord, atype, box = water
    whole = model(coord, atype, box)
    chunked = model(coord, atype, box, chunk_atoms=37)
    for key in ("energy", "force", "virial", "atom_energy"):
        assert torch.allclose(whole[key], chunked[key], atol=1e-10), key
    frames = torch.stack([coord, coord + 0.01 * torch.randn(coord.shape, dtype=torch.float64)])
    batch = model(frames, atype, box)
    for f in range(2):
        single = model(frames[f], atype, box)
        for key in ("energy", "force", "virial"):
            assert torch.allclose(batch[key][f], single[key], atol=1e-10), key


def test_open_boundaries_match_large_box(model, water):
    """Without PBC the result equals a periodic box too large for images to interact."""
    coord, atype, _ = triclinic_water(water)
    big = torch.eye(3, dtype=torch.float64) * 100.0
    a, b = model(coord, atype, None), model(coord, atype, big)
    assert float(a["energy"]) == pytest.approx(float(b["energy"]), abs=1e-10)
    assert torch.allclose(a["force"], b["force"], atol=1e-10)


def test_float32_model_close_to_float64(water):
    coord, atype, box = triclinic_water(water)
    m64, m32 = make_model(), make_model(precision="float32")
    m32.load_state_dict({k: v.float() for k, v in m64.state_dict().items()})
    e64, e32 = m64(coord, atype, box), m32(coord, atype, box)
    assert float(e32["energy"]) == pytest.approx(float(e64["energy"]), rel=1e-5)
    assert torch.allclose(e32["force"].double(), e64["force"], atol=1e-3)


def test_sel_overflow_is_an_error_naming_the_atom(water):
    coord, atype, box = water
    model = DeepPot(small_config(sel=(5, 60)))
    with pytest.raises(NeighborOverflowError, match=r"atom \d+ \(type [OH]\) has \d+ neighbours of type O .* sel allows 5"):
        model(coord, atype, box)


def test_config_errors():
    cfg = small_config()
    cfg["descriptor"]["neurons"] = [1]
    with pytest.raises(ConfigError, match="unknown key 'model.descriptor.neurons'.*neuron"):
        DeepPot(cfg)
    cfg = small_config()
    cfg["descriptor"]["type"] = "dpa2"
    with pytest.raises(ConfigError, match="dpa2"):
        DeepPot(cfg)
    cfg = small_config(sel=(10,))
    with pytest.raises(ConfigError, match="sel has 1 entries"):
        DeepPot(cfg)
