"""Neighbour search in vast, nearly empty cells (issue 16): memory O(atoms), not O(cell volume).

A cell list over a dense grid of rcut-wide bins takes 1 GB for 3 atoms in a 3,000 Å cell and
cannot be allocated at all for a 10,000 Å one; only occupied bins may be stored.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from dpmd import ops
from dpmd.geometry.neighbor import NeighborList, _periodic_images, cell_list, reference_neighbor_list
from tests.conftest import REPO
from tests.test_neighbor import as_set, brute_force

F64 = torch.float64
RCUT = 6.0
BOXES = {
    "cubic-3000": 3000 * torch.eye(3, dtype=F64),
    "cubic-10000": 1e4 * torch.eye(3, dtype=F64),
    "cubic-1e6": 1e6 * torch.eye(3, dtype=F64),
    "elongated-triclinic": torch.tensor([[1e6, 0, 0], [4e5, 1e4, 0], [3e5, 2e3, 1e4]], dtype=F64),
}


def three_atoms(box):
    """Atom 0 near the origin, atom 1 1.1 Å from it across the cell's corner (an edge with a lattice
    shift), atom 2 alone in the middle of the cell."""
    corner = box.sum(0)
    return torch.stack([torch.tensor([0.5, 0.3, 0.2], dtype=F64), corner - torch.tensor([0.4, 0.2, 0.1], dtype=F64),
                        corner / 2])


def assert_same_list(a, b):
    assert torch.equal(a.center, b.center) and torch.equal(a.neighbor, b.neighbor) and torch.equal(a.shift, b.shift)


def kernel_list(coord, box):
    return NeighborList(*ops.neighbor_list(coord, box, RCUT))


@pytest.mark.parametrize("name", BOXES)
def test_reference_stores_only_occupied_cells(name):
    box = BOXES[name]
    coord = three_atoms(box)
    _, _, _, bin_coord, extent, _ = _periodic_images(coord, box, RCUT)
    cells = cell_list(bin_coord, extent, RCUT)
    assert math.prod(cells.nbins) > 1e8  # a dense grid: over 1 GB of bin table
    images = bin_coord.shape[0]
    assert cells.cell.numel() == 3 * images and cells.order.numel() == cells.sorted_id.numel() == images
    nl = reference_neighbor_list(coord, box, RCUT)
    assert as_set(nl) == brute_force(coord, box, RCUT) and len(nl) == 2


@pytest.mark.parametrize("name", BOXES)
def test_kernel_matches_reference_in_vast_cells(lib, name):  # noqa: F811
    box = BOXES[name]
    coord = three_atoms(box)
    assert_same_list(kernel_list(coord, box), reference_neighbor_list(coord, box, RCUT))


@pytest.mark.parametrize("gap", [5000.0, 1e9])
def test_open_boundaries_molecules_far_apart(lib, water, gap):  # noqa: F811
    """The 192-atom water frame and a copy `gap` Å away, open boundaries: many atoms per occupied bin,
    the kernel's sparse bins and the reference agree edge for edge, in the same order."""
    coord = water[0]
    both = torch.cat([coord, coord + gap])
    ref = reference_neighbor_list(both, None, RCUT)
    assert_same_list(kernel_list(both, None), ref)
    assert as_set(ref) == brute_force(both, None, RCUT)
    alone = reference_neighbor_list(coord, None, RCUT)
    assert len(ref) == 2 * len(alone)


def test_water_in_a_vast_periodic_cell(lib, water):  # noqa: F811
    """A 3,000 Å cell round the water frame: no image within reach, so the open-boundary edges."""
    coord = water[0]
    box = 3000 * torch.eye(3, dtype=F64)
    ref = reference_neighbor_list(coord, box, RCUT)
    assert_same_list(kernel_list(coord, box), ref)
    assert as_set(ref) == as_set(reference_neighbor_list(coord, None, RCUT))


ASE_RUN = r"""
import contextlib, json, resource, sys
import numpy as np, torch
from ase import Atoms
from dpmd import ops
from dpmd.calculator import DP
from tests.conftest import make_model

boxes = {name: np.array(box) for name, box in json.loads(sys.argv[1]).items()}
calc = DP(make_model())
mol = np.array([[0.5, 0.3, 0.2], [1.45, 0.3, 0.2], [0.26, 1.23, 0.2]])
def energy(box):
    atoms = Atoms("OHH", positions=mol, cell=box, pbc=box is not None)
    atoms.calc = calc
    return atoms.get_potential_energy(), atoms.get_forces()
e_open, f_open = energy(None)   # warm-up: everything lazily loaded is loaded before the baseline
energy(20 * np.eye(3))
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out = {}
for ref in (False, True):
    with ops.reference_only() if ref else contextlib.nullcontext():
        for name, box in boxes.items():
            e, f = energy(box)
            out[f"{name}{'-reference' if ref else ''}"] = [e - e_open, float(np.abs(f - f_open).max())]
out["grown_mb"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
print(json.dumps(out))
"""


def test_ase_calculator_in_vast_cells():
    """End to end, through the kernel and the reference: a water molecule in each vast cell (dense
    bins: 1 GB at 3,000 Å, a MemoryError at 10,000 Å) has the energy and forces it has in vacuum, and
    the process's peak memory barely moves.  A fresh process, so that its peak RSS measures this alone."""
    boxes = {name: box.tolist() for name, box in BOXES.items()}
    run = subprocess.run([sys.executable, "-c", ASE_RUN, json.dumps(boxes)], cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out.pop("grown_mb") < 100
    assert len(out) == 2 * len(BOXES)
    for name, (de, df) in out.items():
        assert abs(de) < 1e-10 and df < 1e-10, name
