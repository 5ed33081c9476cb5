"""Compression of DPA-1 (se_atten in strip mode / se_atten_v2 with attn_layer 0, DeePMD-kit's `dp compress`):
the tabulated radial net against the net, forces as derivatives of the compressed energy, the frozen and saved
compressed model, out-of-table edges as errors naming the atoms, and the configurations that cannot compress."""

from __future__ import annotations

import pytest
import torch

from dpmd import ops
from dpmd.errors import DpmdError
from dpmd.model import DeepPot, load_model, save_model
from dpmd.model.compress import compress_model
from dpmd.model.export import script_model
from tests.conftest import triclinic_water

MIN_NBOR_DIST = 0.9  # below the water cell's shortest O-H distance


def atten_model(kind="se_atten_v2", **desc) -> DeepPot:
    d = {"type": kind, "sel": 40, "rcut": 3.5, "rcut_smth": 0.5, "neuron": [4, 8], "axis_neuron": 4,
         "tebd_dim": 4, "attn": 8, "attn_layer": 0, "seed": 3}
    d.update(desc)
    model = DeepPot({"type_map": ["O", "H"], "descriptor": d, "fitting_net": {"neuron": [8, 8], "seed": 4}})
    with torch.no_grad():  # non-trivial normalisation, as after data statistics
        model.descriptor.mean[:, 0] = torch.tensor([0.05, 0.04])
        model.descriptor.std[:] = torch.tensor([[0.09, 0.06, 0.06, 0.06], [0.08, 0.05, 0.05, 0.05]])
        model.fitting.energy_bias[:] = torch.tensor([-93.5, -187.1])
    return model.eval()


VARIANTS = {
    "v2": {},
    "v2_one_side_excluded": {"type_one_side": True, "exclude_types": [[0, 1]], "resnet_dt": True},
    "strip_rough": {"kind": "se_atten", "tebd_input_mode": "strip", "smooth_type_embedding": False},
}


@pytest.fixture(scope="module")
def cell(water):
    return triclinic_water(water)


@pytest.fixture(scope="module", params=list(VARIANTS))
def models(request):
    model = atten_model(**VARIANTS[request.param])
    return model, compress_model(model, MIN_NBOR_DIST)


def test_compressed_matches_the_net(models, cell):
    """Tabulated (step 0.01, quintic, C2) vs the net: the same energy, forces and virial to the table's accuracy;
    the uncompressed original is left as it was."""
    model, compressed = models
    assert compressed.descriptor.compressed and not model.descriptor.compressed
    ref, out = model(*cell), compressed(*cell)
    assert float(out["energy"]) == pytest.approx(float(ref["energy"]), abs=1e-8)
    assert torch.allclose(out["force"], ref["force"], atol=1e-8)
    assert torch.allclose(out["virial"], ref["virial"], atol=1e-7)
    assert not torch.equal(out["force"], ref["force"])  # the tables, not the net, ran
    # the fused tabulated contraction (kernel library, forces) against the tables' PyTorch reference
    with ops.reference_only():
        slow = compressed(*cell)
    for key in ("energy", "force", "virial"):
        assert torch.allclose(out[key], slow[key], rtol=1e-12, atol=1e-10), key


def test_forces_are_derivatives_of_the_compressed_energy(models, cell):
    _, compressed = models
    coord, atype, box = cell
    out = compressed(coord, atype, box)
    h = 1e-5
    for i in (0, 7, len(atype) - 1):
        for k in range(3):
            cp, cm = coord.clone(), coord.clone()
            cp[i, k] += h
            cm[i, k] -= h
            fd = -(float(compressed(cp, atype, box)["energy"]) - float(compressed(cm, atype, box)["energy"])) / (2 * h)
            assert out["force"][i, k].item() == pytest.approx(fd, abs=1e-7, rel=1e-6)


def test_frozen_and_saved_compressed_model(models, cell, tmp_path):
    """The TorchScript module (`dpmd freeze` / LAMMPS) and a saved and reloaded file give the eager numbers."""
    _, compressed = models
    coord, atype, box = cell
    ref = compressed(coord, atype, box)
    out = script_model(compressed)(coord, atype, box)
    assert float(out["energy"]) == pytest.approx(float(ref["energy"]), rel=1e-12)
    assert torch.allclose(out["force"], ref["force"], atol=1e-10)
    save_model(compressed, tmp_path / "c.pth")
    loaded = load_model(tmp_path / "c.pth")
    assert loaded.descriptor.compressed
    assert torch.allclose(loaded(coord, atype, box)["force"], ref["force"], atol=1e-10)


def test_edge_beyond_the_tables_names_the_atoms(models, cell):
    """Never an extrapolation: an edge shorter than the tables cover is a one-line error naming the atoms (the
    model's call, evaluate() as MD calls it, the frozen module)."""
    from dpmd.geometry.graph import build_graph
    from dpmd.model.forces import evaluate

    _, compressed = models
    coord, atype, box = cell
    close = coord.clone()
    o, o2 = (atype == 0).nonzero()[:2, 0].tolist()  # an O-O pair: excluded in no variant
    rmin = compressed.config["compress"]["rmin"][0]
    close[o2] = close[o] + torch.tensor([0.9 * rmin, 0.0, 0.0], dtype=torch.float64)
    with pytest.raises(DpmdError, match=rf"atom {o} \(O\) and its neighbour {o2} \(O\) at distance .* outside"):
        compressed(close, atype, box)
    with pytest.raises(RuntimeError, match="outside the embedding tables"):
        evaluate(compressed, build_graph(close, atype, box, compressed.rcut))
    with pytest.raises(Exception, match=rf"atom {o} \(O\) and its neighbour {o2} \(O\)"):
        script_model(compressed)(close, atype, box)


@pytest.mark.parametrize("desc, what", [({"attn_layer": 2}, "attn_layer 2"),
                                        ({"kind": "se_atten", "tebd_input_mode": "concat"}, "concat")])
def test_what_cannot_compress_is_refused(desc, what):
    with pytest.raises(DpmdError, match=f"compress: se_atten compresses in strip mode .*{what}"):
        compress_model(atten_model(**desc), MIN_NBOR_DIST)
