"""The cell-list neighbour search against brute force, on random and thin triclinic cells."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from dpmd.geometry.neighbor import auto_sel, build_neighbor_list, neighbor_stat
from tests.conftest import SHARED


def brute_force(coord, box, rcut):
    pairs = set()
    n = coord.shape[0]
    if box is None:
        d = (coord[None, :, :] - coord[:, None, :]).norm(dim=-1)
        return {(i, j, 0, 0, 0) for i, j in (d < rcut).nonzero().tolist() if i != j}
    heights = torch.linalg.det(box).abs() / torch.stack(
        [torch.linalg.cross(box[1], box[2]), torch.linalg.cross(box[2], box[0]), torch.linalg.cross(box[0], box[1])]
    ).norm(dim=1)
    # positions may lie outside the cell: cover their spread plus rcut
    frac = coord @ torch.linalg.inv(box)
    spread = (frac.max(0).values - frac.min(0).values).ceil()
    reach = [int(math.ceil(rcut / h)) + int(s) + 1 for h, s in zip(heights.tolist(), spread.tolist())]
    shifts = torch.tensor(list(itertools.product(*[range(-r, r + 1) for r in reach])), dtype=torch.float64)
    for i in range(n):
        d = (coord[None, :, :] + (shifts @ box)[:, None, :] - coord[i]).norm(dim=-1)
        for s, j in (d < rcut).nonzero().tolist():
            if j == i and bool((shifts[s] == 0).all()):
                continue
            pairs.add((i, j, *[int(x) for x in shifts[s]]))
    return pairs


def as_set(nl):
    return set(zip(nl.center.tolist(), nl.neighbor.tolist(), *[nl.shift[:, k].round().long().tolist() for k in range(3)]))


@pytest.mark.parametrize("seed", range(8))
def test_matches_brute_force_on_random_cells(seed):
    gen = torch.Generator().manual_seed(seed)
    lengths = 2.0 + 8.0 * torch.rand(3, generator=gen, dtype=torch.float64)  # some thinner than 2*rcut
    box = torch.diag(lengths) + (seed % 2) * 1.5 * (torch.rand(3, 3, generator=gen, dtype=torch.float64) - 0.5)
    coord = (3 * torch.rand(25, 3, generator=gen, dtype=torch.float64) - 1) @ box  # also outside the cell
    rcut = 3.7
    nl = build_neighbor_list(coord, box, rcut)
    assert len(as_set(nl)) == len(nl)  # no duplicates
    assert as_set(nl) == brute_force(coord, box, rcut)
    assert bool((nl.center[1:] >= nl.center[:-1]).all())  # sorted by centre
    vec = coord[nl.neighbor] - coord[nl.center] + nl.shift @ box
    assert float(vec.norm(dim=1).max()) < rcut


def test_open_boundaries():
    coord = 8 * torch.rand(40, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    nl = build_neighbor_list(coord, None, 3.0)
    assert as_set(nl) == brute_force(coord, None, 3.0)
    assert bool((nl.shift == 0).all())


def test_tiny_cell_sees_many_images():
    box = torch.eye(3, dtype=torch.float64) * 1.5
    nl = build_neighbor_list(torch.zeros(1, 3, dtype=torch.float64), box, 3.1)
    # images of the single atom at lattice points within 3.1 Å: |n| < 3.1/1.5
    expected = sum(1 for n in itertools.product(range(-3, 4), repeat=3) if 0 < 1.5 * math.dist(n, (0, 0, 0)) < 3.1)
    assert len(nl) == expected


def test_empty_and_isolated():
    assert len(build_neighbor_list(torch.zeros(0, 3, dtype=torch.float64), None, 3.0)) == 0
    far = torch.tensor([[0.0, 0, 0], [10.0, 0, 0]], dtype=torch.float64)
    assert len(build_neighbor_list(far, None, 3.0)) == 0


def test_auto_sel_rounds_up_to_multiple_of_four():
    assert auto_sel([38, 72]) == [44, 80]
    assert auto_sel([0, 1]) == [0, 4]


@pytest.mark.skipif(not (SHARED / "data" / "water").is_dir(), reason="shared water data not available")
def test_water_neighbor_stat():
    from dpmd.data import load_systems

    systems = load_systems(str(SHARED / "data" / "water"), type_map=["O", "H"])
    frames = ((s.coord[f], s.atype, s.box[f]) for s in systems for f in range(0, s.nframes, 4))
    counts, min_dist = neighbor_stat(frames, 6.0, 2)
    assert 36 <= counts[0] <= 38 and 68 <= counts[1] <= 72
    assert 0.85 < min_dist < 0.95
