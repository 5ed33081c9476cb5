"""Compression of se_e2_r, se_e3 and hybrid descriptors (dpmd.model.compress, EmbeddingTable): the compressed
model gives the uncompressed one's numbers, its forces are its own energy's gradient, an edge closer than the
tables reach is a one-line error, the frozen model equals the eager one, and `dpmd compress` writes it.
The models are DeePMD-kit 3.2 checkpoints of tests/fixtures (trained statistics: realistic table ranges)."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch

from dpmd import ops
from dpmd.errors import DpmdError
from dpmd.geometry.graph import build_graph
from dpmd.model import DeepPot, load_model, save_model
from dpmd.model.compress import compress_model
from dpmd.model.export import script_model
from dpmd.model.forces import evaluate
from tests.conftest import EXAMPLE, REPO, make_model

pytestmark = pytest.mark.filterwarnings(r"ignore:.*torch\.jit\..*deprecated:DeprecationWarning")

FIXTURES = REPO / "tests" / "fixtures"
MODELS = {"se_e2_r": FIXTURES / "deepmd_se_e2_r" / "model.ckpt.pt",
          "se_e2_r_exclude": FIXTURES / "deepmd_se_e2_r" / "model_exclude.ckpt.pt",
          "se_e3": FIXTURES / "deepmd_se_e3" / "model.ckpt.pt",
          "hybrid": FIXTURES / "deepmd_hybrid" / "model.ckpt.pt"}  # se_e2_a (rcut 3.5) + se_e2_r (rcut 5)
MIN_NBOR_DIST = 0.9  # below the water data's shortest O-H distance


@pytest.fixture(scope="module")
def pairs():
    """{name: (uncompressed, compressed)}"""
    out = {}
    for name, path in MODELS.items():
        model = load_model(path)
        out[name] = model, compress_model(model, MIN_NBOR_DIST)
    return out


@pytest.fixture(scope="module")
def water():
    from dpmd.data import load_system

    s = load_system(EXAMPLE, type_map=["O", "H"])
    return torch.tensor(s.coord[0]), torch.tensor(s.atype), torch.tensor(s.box[0])


def cluster(water, n=12):
    """The n atoms nearest the first oxygen, without a box (few atoms: cheap finite differences)."""
    coord, atype, _ = water
    near = torch.argsort((coord - coord[0]).norm(dim=1))[:n]
    return coord[near].clone(), atype[near].clone()


def assert_close(a: dict, b: dict, rtol: float, keys=("energy", "atom_energy", "force", "virial")):
    for k in keys:
        scale = float(a[k].abs().max())
        assert float((a[k] - b[k]).abs().max()) <= rtol * scale, k


@pytest.mark.parametrize("path", ["kernels", "reference"])
@pytest.mark.parametrize("name", list(MODELS))
def test_compressed_equals_uncompressed(pairs, water, name, path):
    """Quintic tables with step 0.01 reproduce the nets to ~1e-11 of the forces (measured: se_e2_r 2e-13,
    se_e3 1e-11, hybrid 1e-13 of the largest force component), in a periodic frame and an open cluster; with
    the kernel library's fused tables (where it is built) and with the PyTorch reference."""
    model, comp = pairs[name]
    assert comp.descriptor.compressed
    with ops.reference_only() if path == "reference" else contextlib.nullcontext():
        coord, atype, box = water
        assert_close(model(coord, atype, box), comp(coord, atype, box), 1e-9)
        coord, atype = cluster(water)
        assert_close(model(coord, atype), comp(coord, atype), 1e-9)


@pytest.mark.parametrize("name", ["se_e2_r", "se_e3", "hybrid"])
def test_compressed_forces_are_minus_the_energy_gradient(pairs, water, name):
    _, comp = pairs[name]
    coord, atype = cluster(water, 8)
    force = comp(coord, atype)["force"]
    h = 1e-5
    for i in range(len(atype)):
        for d in range(3):
            plus, minus = coord.clone(), coord.clone()
            plus[i, d] += h
            minus[i, d] -= h
            fd = -(float(comp(plus, atype)["energy"]) - float(comp(minus, atype)["energy"])) / (2 * h)
            assert abs(fd - float(force[i, d])) < 1e-6, (i, d)


@pytest.mark.parametrize("name", ["se_e2_r", "se_e3", "hybrid"])
def test_pair_closer_than_the_tables_is_a_one_line_error(pairs, water, name, tmp_path):
    _, comp = pairs[name]
    coord, atype = cluster(water, 8)
    o, h = 0, int((atype == 1).nonzero()[0])
    rmin = comp.descriptor.table_rmin  # per centre type
    assert 0 < min(rmin) <= max(rmin) < MIN_NBOR_DIST
    coord[h] = coord[o] + torch.tensor([0.95 * min(rmin), 0.0, 0.0], dtype=torch.float64)
    pair = rf"atom ({o} \(O\)|{h} \(H\)) and its neighbour ({o} \(O\)|{h} \(H\))"
    with pytest.raises(DpmdError, match=rf"^dpmd: compressed model: {pair} at distance [0-9.]+ Å is outside the "
                                        rf"embedding tables[^\n]*$"):
        comp(coord, atype)
    with pytest.raises(RuntimeError, match="outside the embedding tables"):  # the descriptor's own check (MD)
        evaluate(comp, build_graph(coord, atype, None, comp.rcut))
    with pytest.raises(Exception, match=pair):  # frozen
        script_model(comp)(coord, atype)
    # just inside the tables: evaluated
    coord[h] = coord[o] + torch.tensor([1.02 * max(rmin), 0.0, 0.0], dtype=torch.float64)
    assert torch.isfinite(comp(coord, atype)["force"]).all()


@pytest.mark.parametrize("name", ["se_e2_r", "se_e3", "hybrid"])
def test_frozen_compressed_equals_eager(pairs, water, name, tmp_path):
    """Tables with slopes 1 % off (so that evaluating the nets instead would show): eager and frozen agree."""
    model, comp = pairs[name]
    comp = copy.deepcopy(comp)
    with torch.no_grad():
        for part in getattr(comp.descriptor, "descriptors", [comp.descriptor]):
            part.table[:, :, 1, :] *= 1.01
    coord, atype, box = water
    eager = comp(coord, atype, box)
    moved = float((eager["force"] - model(coord, atype, box)["force"]).abs().max())
    assert moved > 1e-3 * float(eager["force"].abs().max())
    save_model(comp, tmp_path / "c.pth")
    frozen = torch.jit.load(str(tmp_path / "c.pth"))(coord, atype, box)
    assert_close(eager, frozen, 1e-12, keys=("energy", "force", "virial"))
    loaded = load_model(tmp_path / "c.pth")  # the weights read back, tables included
    assert loaded.config["compress"] == comp.config["compress"]
    assert_close(eager, loaded(coord, atype, box), 1e-12, keys=("energy", "force", "virial"))


@pytest.mark.parametrize("name", ["se_e2_r_exclude", "se_e3"])
def test_compressed_padded_layout_equals_edge_list(pairs, water, name):
    """The padded layout (forward with type_counts: the MD engine's sync-free path) of a compressed model."""
    from dpmd.md.neighbors import VerletList

    _, comp = pairs[name]
    coord, atype, box = water
    n, chunk = len(atype), 64
    verlet = VerletList(comp.rcut, 1.0)
    verlet.build(coord[None], box[None])
    rows = torch.argsort(atype, stable=True)
    verlet.pad(rows, atype)
    nl = verlet.within_cutoff(coord[None], box[None], "padded", comp.sel)
    assert nl.format == "padded" and not nl.overflow.any()
    graph = {"rows": rows, "row_chunk": chunk, "edge_vec": nl.vec, "neighbor": nl.neighbor, "atype": atype,
             "box": box[None], "natoms": n, "batch": torch.zeros(n, dtype=torch.long),
             "row_type_counts": [torch.bincount(atype[rows[r:r + chunk]], minlength=2).tolist()
                                 for r in range(0, n, chunk)]}
    out = evaluate(comp, graph)
    ref = evaluate(comp, build_graph(coord, atype, box, comp.rcut))
    assert torch.allclose(out["atom_energy"], ref["atom_energy"], atol=1e-12)
    assert torch.allclose(out["force"], ref["force"], atol=1e-12)


@pytest.mark.parametrize("path", ["kernels", "reference"])
def test_se_e3_close_pairs_in_the_coarse_tables(pairs, path):
    """An H between two O at 0.8 Å (closer than min_nbor_dist): its pair products reach the coarse tables on both
    sides, above the fine range (self pairs) and below it (the opposite neighbours: the PyTorch tables; the
    kernels know no coarse part there).  Still as close to the nets (coarse step 0.1; measured 2e-13 of the
    largest force)."""
    model, comp = pairs["se_e3"]
    coord = torch.tensor([[0.0, 0.0, 0.0], [0.8, 0.0, 0.0], [-0.8, 0.0, 0.0], [0.3, 1.7, 0.0], [-0.2, -1.6, 0.5]],
                         dtype=torch.float64)
    atype = torch.tensor([1, 0, 0, 1, 1])
    d = comp.descriptor
    y = float(d.edge_table_input(coord[1:2], torch.tensor([1])))  # |a|^2 of an O around the H
    assert d.table_upper < y < d.table_end and -y < d.table_lower
    with ops.reference_only() if path == "reference" else contextlib.nullcontext():
        assert_close(model(coord, atype), comp(coord, atype), 1e-9)


def test_se_e3_tables_are_symmetric_and_cover_the_pair_range(pairs):
    """se_e3 tabulates x = a_j . a_k in [-end, end]: every pair of two edges inside the tables is inside."""
    model, comp = pairs["se_e3"]
    spec, d = comp.config["compress"], model.descriptor
    from dpmd.model.compress import switched_s

    s_max = switched_s(MIN_NBOR_DIST, d.rcut_smth, d.rcut)
    bound = max(float((s_max / d.std[t, 1:]).square().max()) for t in range(2))
    assert spec["upper"] >= bound > spec["upper"] - spec["step"] and spec["lower"] == -spec["upper"]
    assert spec["n_coarse_low"] == spec["n_coarse"] and spec["end"] >= spec["extrapolate"] * bound
    x = torch.linspace(-spec["end"], spec["end"], 1001, dtype=torch.float64)
    for i, net in enumerate(model.descriptor.embeddings):
        with torch.no_grad():
            assert torch.allclose(comp.descriptor._tabulate(i, x), net(x.unsqueeze(1)), rtol=0, atol=1e-8)


def test_what_cannot_be_compressed_is_refused_in_one_line():
    """se_atten with attention layers (DeePMD-kit does not compress it either), alone or as a hybrid's entry;
    a model without statistics."""
    atten = {"type": "se_atten", "sel": 20, "rcut": 4.0, "rcut_smth": 0.5, "neuron": [4, 8], "axis_neuron": 4,
             "attn_layer": 1}
    r = {"type": "se_e2_r", "sel": [10, 20], "rcut": 4.0, "rcut_smth": 0.5, "neuron": [4, 8]}
    fitting = {"neuron": [8]}

    def with_statistics(descriptor):
        model = DeepPot({"type_map": ["O", "H"], "descriptor": descriptor, "fitting_net": fitting})
        for part in getattr(model.descriptor, "descriptors", [model.descriptor]):
            part.mean[:, 0], part.std[:] = 0.05, 0.1
        return model

    for descriptor, where in ((atten, "^compress: .*se_atten"), ({"type": "hybrid", "list": [r, atten]},
                                                                 r"^compress: descriptor.list\[1\]")):
        with pytest.raises(DpmdError, match=where) as err:
            compress_model(with_statistics(descriptor), MIN_NBOR_DIST)
        assert "\n" not in str(err.value)
    model = DeepPot({"type_map": ["O", "H"], "descriptor": r, "fitting_net": fitting})
    with pytest.raises(DpmdError, match="no data statistics"):
        compress_model(model, MIN_NBOR_DIST)


def test_cli_compresses_a_se_e2_r_model(pairs, water, tmp_path, capsys):
    from dpmd.cli import main

    model, _ = pairs["se_e2_r"]
    save_model(model, tmp_path / "model.pth")
    out = tmp_path / "model-c.pth"
    assert main(["compress", "-i", str(tmp_path / "model.pth"), "-o", str(out), "--min-nbor-dist", "0.9",
                 "-s", "0.02", "-e", "3", "-f", "7"]) == 0
    capsys.readouterr()
    comp = load_model(out)
    spec = comp.config["compress"]
    assert (spec["step"], spec["extrapolate"], spec["check_frequency"]) == (0.02, 3.0, 7)
    coord, atype, box = water
    assert_close(model(coord, atype, box), comp(coord, atype, box), 1e-9)
    assert main(["compress", "-i", str(out), "-o", str(tmp_path / "again.pth"), "--min-nbor-dist", "0.9"]) == 1
    err = capsys.readouterr().err.strip()
    assert "already compressed" in err and len(err.splitlines()) == 1


def test_layout_written_before_se_e3_support_still_loads(water, tmp_path):
    """A se_e2_a model compressed before the tables had a coarse part below `lower` (no n_coarse_low in its
    layout) loads with the same weights checksum and numbers."""
    comp = compress_model(make_model(), MIN_NBOR_DIST)
    assert comp.config["compress"].pop("n_coarse_low") == 0
    save_model(comp, tmp_path / "old.pth")
    loaded = load_model(tmp_path / "old.pth")  # (checks the recorded weights checksum)
    coord, atype, box = water
    assert_close(comp(coord, atype, box), loaded(coord, atype, box), 0, keys=("energy", "force", "virial"))
    torch.jit.load(str(tmp_path / "old.pth"))(coord, atype, box)


def test_compress_section_that_does_not_fit_the_descriptor_is_a_config_error(pairs, tmp_path):
    _, comp = pairs["hybrid"]
    config = copy.deepcopy(comp.config)
    config["compress"] = config["compress"]["list"][0]
    with pytest.raises(DpmdError, match=r"'model.compress' of a hybrid descriptor needs `list`"):
        DeepPot(config)
    _, comp = pairs["se_e2_r"]
    config = copy.deepcopy(comp.config)
    config["compress"] = {**{k: config["compress"][k] for k in ("min_nbor_dist", "step", "extrapolate",
                                                                 "check_frequency")}, "list": [config["compress"]]}
    with pytest.raises(DpmdError, match="not a hybrid"):
        DeepPot(config)


@pytest.mark.parametrize("name", ["se_e2_r", "se_e3", "hybrid"])
def test_frozen_uncompressed_model_compiles_no_table_code(pairs, name):
    """The descriptors ask EmbeddingTable for their embeddings whether compressed or not; TorchScript drops the
    table code of an uncompressed model (the constant `compressed`), which has no `table` buffer to compile."""
    def compiled(model):
        frozen = script_model(model)
        return "\n".join(m._c._get_method(k).code for m in frozen.descriptor.modules()
                         if type(m).__name__ == "RecursiveScriptModule" and "Descriptor" in m.original_name
                         for k in m._c._method_names())

    model, comp = pairs[name]
    for call in ("._tabulate(", "tabulate_fusion", "tabulated_descriptor"):
        assert call not in compiled(model)
    assert "._tabulate(" in compiled(comp)
