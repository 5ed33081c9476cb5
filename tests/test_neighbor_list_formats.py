"""One neighbour list, two formats (issue 19): the edge list and DeePMD's padded layout hold the same edges, and
both carry an overflow flag set exactly where a neighbour count exceeds sel; the frozen model's search is the
same cell list (scripted); the canonical order; the smallest pair distance (the campaign's min_distance filter)."""

from __future__ import annotations

import pytest
import torch

from dpmd.geometry.neighbor import (build_neighbor_list, canonical_order, min_pair_distance, reference_edges,
                                    reference_neighbor_list)
from tests.conftest import triclinic_water
from tests.test_neighbor import as_set, brute_force

pytestmark = pytest.mark.filterwarnings(r"ignore:.*torch\.jit\..*deprecated:DeprecationWarning")

F64 = torch.float64
RCUT = 4.0


@pytest.fixture(scope="module")
def frame(water):
    """The triclinic water sub-cell (26 atoms, O and H) and brute-force neighbour counts per type."""
    coord, atype, box = triclinic_water(water, scale=0.5, seed=11)
    counts = torch.zeros(len(atype), 2, dtype=torch.long)
    for i, j, *_ in brute_force(coord, box, RCUT):
        counts[i, atype[j]] += 1
    return coord, atype, box, counts


def padded_edge_set(nl, rcut):
    """{(row atom, neighbour, vector rounded)} of the real slots of a padded list."""
    inside = (nl.vec * nl.vec).sum(-1) < rcut * rcut
    return {(c, j, *(round(x, 9) for x in v)) for c, j, v in
            zip(nl.center[inside].tolist(), nl.neighbor[inside].tolist(), nl.vec[inside].tolist())}


def test_edges_and_padded_give_the_same_edges(frame):
    coord, atype, box, counts = frame
    sel = counts.max(0).values.tolist()
    edges = build_neighbor_list(coord, box, RCUT, atype, sel)
    rows = torch.argsort(atype, stable=True)   # rows in any order: the MD engine's, grouped by type
    padded = build_neighbor_list(coord, box, RCUT, atype, sel, format="padded", rows=rows)
    assert edges.format == "edges" and padded.format == "padded"
    vec = coord[edges.neighbor] - coord[edges.center] + edges.shift @ box
    assert {(c, j, *(round(x, 9) for x in v)) for c, j, v in
            zip(edges.center.tolist(), edges.neighbor.tolist(), vec.tolist())} == padded_edge_set(padded, RCUT)
    assert padded.vec.shape == (len(atype) * sum(sel), 3)
    assert torch.equal(padded.center.view(len(atype), -1)[:, 0], rows)
    # slots grouped by neighbour type: sel[0] O slots then sel[1] H slots in every row
    slot_type = atype[padded.neighbor].view(len(atype), -1)
    real = ((padded.vec * padded.vec).sum(-1) < RCUT ** 2).view(len(atype), -1)
    assert bool((slot_type[:, :sel[0]][real[:, :sel[0]]] == 0).all())
    assert bool((slot_type[:, sel[0]:][real[:, sel[0]:]] == 1).all())
    assert not edges.overflow.any() and not padded.overflow.any()
    assert as_set(edges) == as_set(build_neighbor_list(coord, box, RCUT)) and edges.overflow.shape == (len(atype),)


@pytest.mark.parametrize("short", [0, 1])
def test_overflow_flag_set_exactly_when_a_count_exceeds_sel(frame, short):
    coord, atype, box, counts = frame
    sel = counts.max(0).values.tolist()
    sel[short] -= 1   # one slot short of neighbour type `short` for the fullest atoms
    expected = counts[:, short] > sel[short]
    assert 0 < int(expected.sum()) < len(atype)
    edges = build_neighbor_list(coord, box, RCUT, atype, sel)
    assert torch.equal(edges.overflow, expected)
    rows = torch.arange(len(atype)).flip(0)
    padded = build_neighbor_list(coord, box, RCUT, atype, sel, format="padded", rows=rows)
    assert torch.equal(padded.overflow, expected[rows])
    # an overflowing row keeps sel[t] neighbours of each type and drops only the extra ones
    real = ((padded.vec * padded.vec).sum(-1) < RCUT ** 2).view(len(atype), -1).sum(1)
    assert torch.equal(real, torch.minimum(counts, torch.tensor(sel)).sum(1)[rows])
    # one sel entry for all types (a mixed-type descriptor): the total count
    total = int(counts.sum(1).max())
    assert torch.equal(build_neighbor_list(coord, box, RCUT, atype, [total - 1]).overflow,
                       counts.sum(1) > total - 1)
    assert not build_neighbor_list(coord, box, RCUT, atype, [total]).overflow.any()


def test_padded_format_refuses_what_it_cannot_lay_out(frame):
    coord, atype, box, _ = frame
    with pytest.raises(ValueError, match="needs both atype and sel"):
        build_neighbor_list(coord, box, RCUT, format="padded")
    with pytest.raises(ValueError, match="one sel entry per neighbour type"):
        build_neighbor_list(coord, box, RCUT, atype, [40], format="padded")
    with pytest.raises(ValueError, match="format must be one of"):
        build_neighbor_list(coord, box, RCUT, format="dense")


@pytest.mark.parametrize("periodic", [True, False])
def test_scripted_search_is_the_reference(frame, periodic):
    """The frozen model's search (dpmd.model.export) compiles the reference cell list itself."""
    coord, _, box, _ = frame
    box = box if periodic else None
    scripted = torch.jit.script(reference_edges)
    ref = reference_neighbor_list(coord, box, RCUT)
    for got, want in zip(scripted(coord, box, RCUT), (ref.center, ref.neighbor, ref.shift)):
        assert torch.equal(got, want)
    assert as_set(ref) == brute_force(coord, box, RCUT)


def test_canonical_order_does_not_depend_on_the_search_order(frame):
    coord, _, box, _ = frame
    nl = build_neighbor_list(coord, box, RCUT)
    perm = torch.randperm(len(nl), generator=torch.Generator().manual_seed(0))
    a = canonical_order(nl.center, nl.neighbor, nl.shift)
    b = perm[canonical_order(nl.center[perm], nl.neighbor[perm], nl.shift[perm])]
    assert torch.equal(a, b)
    key = torch.stack([nl.center, nl.neighbor, *torch.round(nl.shift).long().T], 1)[a].tolist()
    assert key == sorted(key)


def test_min_pair_distance():
    box = torch.tensor([[3.0, 0, 0], [1.0, 3.2, 0], [0.4, 0.3, 2.9]], dtype=F64)
    coord = torch.tensor([[0.1, 0.1, 0.1], [2.95, 0.2, 0.1], [1.5, 1.6, 1.4]], dtype=F64)
    d = (coord[:, None] - coord[None]).norm(dim=-1) + torch.eye(3, dtype=F64) * 1e9
    # open boundaries: the closest pair of atoms; periodic: atom 1 meets an image of atom 0
    assert min_pair_distance(coord, None, 5.0) == pytest.approx(float(d.min()), abs=1e-12)
    periodic = min(float((coord[j] - coord[i] + torch.tensor(s, dtype=F64) @ box).norm())
                   for i, j, *s in brute_force(coord, box, 5.0))
    assert periodic < float(d.min())
    assert min_pair_distance(coord.numpy(), box.numpy(), 5.0) == pytest.approx(periodic, abs=1e-12)
    assert min_pair_distance(coord, box, 0.5 * periodic) is None   # nothing closer than the cutoff
    assert min_pair_distance(torch.zeros(2, 3, dtype=F64), None, 1.0) == 0.0   # coincident atoms
