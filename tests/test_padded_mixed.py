"""DeePMD's padded layout for the mixed-type descriptors (issues 19, 20): se_atten / se_atten_v2 take one block of
sel slots for neighbours of every type, a hybrid re-slots its own rows into each entry's layout.  The padded
forward gives the edge list's numbers; the Verlet list hands out NeighborList objects in both formats, with the
overflow of a hybrid's entries; a count beyond sel in sync-free MD stops the run with the checked path's one-line
message; and the sync-free steps read nothing back from the device."""

from __future__ import annotations

import contextlib

import pytest
import torch

from dpmd import ops
from dpmd.geometry.graph import build_graph
from dpmd.geometry.neighbor import build_neighbor_list
from dpmd.md import MDStopError
from dpmd.md.host_sync import count_host_syncs
from dpmd.md.neighbors import VerletList
from dpmd.model import DeepPot, deferred, load_model
from dpmd.model.compress import compress_model
from dpmd.model.forces import evaluate, layouts, sel_limits
from tests.conftest import REPO, triclinic_water
from tests.test_md_sync_free import pair

pytestmark = pytest.mark.filterwarnings(r"ignore:.*torch\.jit\..*deprecated:DeprecationWarning")

HYBRID = REPO / "tests" / "fixtures" / "deepmd_hybrid"
MEAN, STD = torch.tensor([0.05, 0.04]), torch.tensor([[0.09, 0.06, 0.06, 0.06], [0.08, 0.05, 0.05, 0.05]])


def atten(kind="se_atten", **desc) -> dict:
    return {"type": kind, "sel": 40, "rcut": 3.5, "rcut_smth": 0.5, "neuron": [4, 8], "axis_neuron": 4,
            "tebd_dim": 4, "attn": 8, "attn_layer": 2, "seed": 3, **desc}


def se_a(**desc) -> dict:
    return {"type": "se_e2_a", "sel": [12, 24], "rcut": 3.0, "rcut_smth": 0.5, "neuron": [4, 8], "axis_neuron": 4,
            "seed": 1, **desc}


def model_of(descriptor: dict) -> DeepPot:
    model = DeepPot({"type_map": ["O", "H"], "descriptor": descriptor, "fitting_net": {"neuron": [8, 8], "seed": 4}})
    subs = model.descriptor.descriptors if descriptor["type"] == "hybrid" else [model.descriptor]
    with torch.no_grad():  # non-trivial normalisation, as after data statistics
        for d in subs:
            d.mean[:, 0] = MEAN
            d.std[:] = STD[:, :d.std.shape[1]]
        model.fitting.energy_bias[:] = torch.tensor([-93.5, -187.1])
    return model.eval()


ATTEN = {
    "strip_smooth_attn2": atten("se_atten_v2"),
    "strip_attn0": atten("se_atten_v2", attn_layer=0),
    "strip_one_side_excluded_attn0": atten("se_atten_v2", attn_layer=0, type_one_side=True, exclude_types=[[0, 1]]),
    "concat_smooth_excluded": atten(smooth_type_embedding=True, exclude_types=[[0, 1]]),
    "concat_rough": atten(attn_layer=1, normalize=False, temperature=0.5, attn_dotr=False, set_davg_zero=False),
    "strip_rough_excluded": atten(tebd_input_mode="strip", exclude_types=[[1, 1]]),
}
HYBRIDS = {
    "se_a_inside_atten": {"type": "hybrid", "list": [se_a(), atten(smooth_type_embedding=True)]},
    "atten_inside_se_a_excluded": {"type": "hybrid", "list": [atten("se_atten_v2", rcut=2.8, sel=24),
                                                              se_a(rcut=3.6, exclude_types=[[1, 1]])]},
}


@pytest.fixture(scope="module")
def cell(water):
    return triclinic_water(water)


def padded_graph(model, coord, atype, box, chunk=8) -> dict:
    """evaluate's padded graph from the neighbour list's padded format (rows grouped by type, the model's sel,
    one block for every type where the descriptor mixes types), in chunks of `chunk` rows."""
    rows = torch.argsort(atype, stable=True)
    nl = build_neighbor_list(coord, box, model.rcut, atype, model.sel, format="padded", rows=rows,
                             mixed=model.descriptor.mixed_types)
    assert nl.format == "padded" and not nl.overflow.any()
    return {"rows": nl.rows, "row_chunk": chunk, "edge_vec": nl.vec, "neighbor": nl.neighbor, "atype": atype,
            "box": box[None], "natoms": len(atype), "batch": torch.zeros(len(atype), dtype=torch.long),
            "row_type_counts": [torch.bincount(atype[rows[r:r + chunk]], minlength=2).tolist()
                                for r in range(0, len(atype), chunk)]}


def assert_padded_equals_edges(model, coord, atype, box, path="default"):
    assert layouts(model) == ("edges", "padded")
    with ops.reference_only() if path == "reference" else contextlib.nullcontext():
        out = evaluate(model, padded_graph(model, coord, atype, box))
        ref = evaluate(model, build_graph(coord, atype, box, model.rcut))
    assert float(ref["force"].abs().max()) > 1e-3   # (a model that feels its neighbours)
    for key in ("energy", "atom_energy", "force", "virial"):
        torch.testing.assert_close(out[key], ref[key], rtol=0, atol=1e-12, msg=key)


@pytest.mark.parametrize("path", ["default", "reference"])
@pytest.mark.parametrize("name", list(ATTEN))
def test_se_atten_padded_equals_edges(cell, name, path):
    assert_padded_equals_edges(model_of(ATTEN[name]), *cell, path)


@pytest.mark.parametrize("name", ["strip_attn0", "strip_one_side_excluded_attn0"])
def test_compressed_se_atten_padded_equals_edges(cell, name):
    """The compressed model (its tables on every slot) and its table check deferred where a caller collects it."""
    coord, atype, box = cell
    comp = compress_model(model_of(ATTEN[name]), 0.9)
    assert_padded_equals_edges(comp, coord, atype, box)
    graph = padded_graph(comp, coord, atype, box)
    with deferred.collect() as flags:
        evaluate(comp, graph)
    assert flags and not torch.stack(flags).any()
    close = coord.clone()
    o, o2 = (atype == 0).nonzero()[:2, 0].tolist()  # an O-O pair (excluded in no variant) shorter than the tables
    close[o2] = close[o] + torch.tensor([0.9 * comp.config["compress"]["rmin"][0], 0.0, 0.0], dtype=close.dtype)
    with deferred.collect() as flags:
        evaluate(comp, padded_graph(comp, close, atype, box))
    assert torch.stack(flags).any()
    with pytest.raises(RuntimeError, match="is outside the embedding tables"):
        evaluate(comp, padded_graph(comp, close, atype, box))


@pytest.mark.parametrize("name", list(HYBRIDS))
def test_hybrid_padded_equals_edges(cell, name):
    model = model_of(HYBRIDS[name])
    assert model.descriptor.mixed_types and len({d.rcut for d in model.descriptor.descriptors}) == 2
    assert_padded_equals_edges(model, *cell)


@pytest.mark.parametrize("name", ["model", "model_exclude"])
def test_hybrid_checkpoints_padded_equal_edges(cell, name):
    """DeePMD-kit's hybrids (se_e2_a + se_e2_r; model_exclude: excluded pairs beyond the se_e2_a entry's rcut fill
    its free slots nearest first, dpmd.model.descriptor.hybrid._excluded_beyond)."""
    assert_padded_equals_edges(load_model(HYBRID / f"{name}.ckpt.pt"), *cell)


def test_verlet_list_hands_out_neighbor_lists(cell):
    """within_cutoff: the edges within rcut with their vectors and squared lengths; format padded, mixed:
    the same edges in one block of sel slots per row, overflow exactly where the total count exceeds sel, and
    where a limit (a hybrid entry's rcut and sel) is exceeded."""
    coord, atype, box = cell
    rcut, n = 3.5, len(atype)
    verlet = VerletList(rcut, 1.0)
    verlet.build(coord[None], box[None])
    rows = torch.argsort(atype, stable=True)
    verlet.pad(rows, atype)
    edges = verlet.within_cutoff(coord[None], box[None])
    assert edges.format == "edges"
    torch.testing.assert_close(edges.vec, coord[edges.neighbor] - coord[edges.center] + edges.shift @ box)
    torch.testing.assert_close(edges.d2, (edges.vec ** 2).sum(-1))
    counts = torch.bincount(edges.center, minlength=n)
    sel = int(counts.max())
    padded = verlet.within_cutoff(coord[None], box[None], "padded", [sel], mixed=True)
    assert padded.format == "padded" and padded.vec.shape == (n * sel, 3) and torch.equal(padded.rows, rows)
    real = padded.d2 < rcut ** 2
    assert {(c, j, round(d, 9)) for c, j, d in zip(padded.center[real].tolist(), padded.neighbor[real].tolist(),
                                                   padded.d2[real].tolist())} == \
        {(c, j, round(d, 9)) for c, j, d in zip(edges.center.tolist(), edges.neighbor.tolist(), edges.d2.tolist())}
    assert not padded.overflow.any()
    short = verlet.within_cutoff(coord[None], box[None], "padded", [sel - 1], mixed=True)
    assert torch.equal(short.overflow, (counts > sel - 1)[rows])
    # a limit within a shorter rcut: per type there (an se_e2_a entry of a hybrid)
    inner = edges.d2 < 2.5 ** 2
    per_type = torch.zeros(n, 2, dtype=torch.long).index_put_(
        (edges.center[inner], atype[edges.neighbor[inner]]), torch.tensor(1), accumulate=True)
    limit = per_type.max(0).values.tolist()
    assert not verlet.within_cutoff(coord[None], box[None], "padded", [sel], True, [(2.5, limit, False)]).overflow.any()
    limit[1] -= 1
    flagged = verlet.within_cutoff(coord[None], box[None], "padded", [sel], True, [(2.5, limit, False)]).overflow
    assert torch.equal(flagged, (per_type[:, 1] > limit[1])[rows]) and flagged.any()


SE_R = {"type": "se_e2_r", "sel": [20, 40], "rcut": 3.0, "rcut_smth": 0.5, "neuron": [4, 8], "seed": 2}
SYNC_FREE_CASES = {
    "se_atten_v2": atten("se_atten_v2", rcut=4.0, sel=80),
    "hybrid": {"type": "hybrid", "list": [se_a(sel=[20, 40]), atten(rcut=4.0, sel=80, attn_layer=1)]},
    "se_e2_r": SE_R,
    "hybrid_se_r": {"type": "hybrid", "list": [se_a(sel=[20, 40]), {**SE_R, "rcut": 4.0, "sel": [30, 60]}]},
    "se_e3": {"type": "se_e3", "sel": [12, 24], "rcut": 3.0, "rcut_smth": 0.5, "neuron": [2, 4], "seed": 5},
}


@pytest.mark.parametrize("kind", list(SYNC_FREE_CASES))
def test_sync_free_steps_read_nothing_back(kind):
    model = model_of(SYNC_FREE_CASES[kind])
    # (this random se_e3's forces reach thousands of eV/Å: a short step keeps the atoms within the skin)
    checked, free = pair(model, timestep=0.01 if kind == "se_e3" else 0.25, min_distance=0.05, thermo_freq=0)
    checked.run(12)
    free.run(2)
    with count_host_syncs() as c:
        free.run(10)
    assert c.count == 0, c.sites
    assert torch.allclose(checked.state.positions, free.state.positions, rtol=0, atol=1e-10)
    assert torch.allclose(checked.state.forces, free.state.forces, rtol=0, atol=1e-10)


def test_sync_free_overflow_is_the_one_line_message():
    """A count beyond se_atten's sel, and beyond a hybrid entry's sel within its own rcut (the hybrid's own sel
    holds): the run stops with the checked path's message naming the atom (and the entry)."""
    _, free = pair(model_of(atten("se_atten_v2", rcut=4.0, sel=20, attn_layer=0)), timestep=0.25)
    with pytest.raises(MDStopError, match=r"^step 0: neighbour overflow: atom \d+ \(type [OH]\) has \d+ neighbours "
                                          r"within rcut but sel allows 20 .*\(first seen at step 0\)$"):
        free.run(5)
    hybrid = model_of({"type": "hybrid", "list": [se_a(sel=[4, 8]), atten(rcut=4.0, sel=80, attn_layer=0)]})
    assert hybrid.sel == [80] and sel_limits(hybrid)[0] == (3.0, [4, 8], False)
    _, free = pair(hybrid, timestep=0.25)
    with pytest.raises(MDStopError, match=r"^step 0: neighbour overflow: atom \d+ \(type [OH]\) has \d+ neighbours "
                                          r"of type [OH] within descriptor.list\[0\]'s rcut 3 but sel allows [48] .*"
                                          r"raise descriptor.list\[0\].sel.*\(first seen at step 0\)$"):
        free.run(5)
