"""Cell-list neighbour search (the reference implementation, pure PyTorch).

O(N) in memory, O(N log N) in time: atoms are binned into cells at least `rcut` wide, and
each centre looks only at the 27 cells around its own.  Only occupied cells are stored (atoms
sorted by cell, a centre's stencil found by binary search), so a vast, nearly empty cell costs
no more than a dense one.  Periodic boxes (orthorhombic or triclinic, of any size relative to
`rcut`) are handled by explicit image atoms: every image of every atom that lies within `rcut`
of the box is added once, so a box thinner than 2*rcut simply yields several images of the
same neighbour.

A neighbour list is an edge list: edge e goes from `center[e]` to `neighbor[e]`, and the
vector between them is
    r_e = coord[neighbor[e]] - coord[center[e]] + shift[e] @ box
with `shift` an integer number of lattice vectors (zero for open boundaries).  Keeping
the shift instead of the vector lets the model recompute r_e differentiably, which is
what gives forces and the virial (see dpmd.model.forces).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import List

import torch

from dpmd.errors import NeighborOverflowError

# Candidate pairs examined at once; bounds the peak memory of the search.
_MAX_CANDIDATES = 1 << 22
_MAX_BINS_PER_AXIS = 1 << 20


@dataclass
class NeighborList:
    center: torch.Tensor  # (E,) int64
    neighbor: torch.Tensor  # (E,) int64
    shift: torch.Tensor  # (E, 3) float, integer multiples of the lattice vectors

    def __len__(self) -> int:
        return int(self.center.numel())


def _face_heights(box: torch.Tensor) -> torch.Tensor:
    """Distance between opposite faces of the cell, one per lattice vector."""
    volume = torch.linalg.det(box).abs()
    a, b, c = box
    areas = torch.stack([torch.linalg.cross(b, c), torch.linalg.cross(c, a), torch.linalg.cross(a, b)]).norm(dim=1)
    return volume / areas


def _periodic_images(coord: torch.Tensor, box: torch.Tensor, rcut: float):
    """All images of all atoms within `rcut` of the cell.

    Returns (owner, shift, position, bin_coord): the atom each image copies, its shift
    in lattice vectors relative to the *unwrapped* input coordinates, its Cartesian
    position, and a coordinate per axis measured in Å across the cell faces (used for
    binning: two points closer than rcut differ by less than rcut along each of these).
    """
    heights = _face_heights(box)
    if bool((heights <= 0).any()) or not bool(torch.isfinite(heights).all()):
        raise ValueError(f"box {box.tolist()} is singular: its lattice vectors must span a volume")
    frac = coord @ torch.linalg.inv(box)
    wrap = torch.floor(frac)
    frac = frac - wrap  # in [0, 1)
    margin = rcut / heights  # in fractional units, per axis
    nimg = torch.ceil(margin).long().tolist()
    shifts = torch.tensor(
        list(itertools.product(*[range(-n, n + 1) for n in nimg])), dtype=coord.dtype, device=coord.device
    )
    # Image s=0 first so that images 0..N-1 are the atoms themselves.
    zero = (shifts == 0).all(dim=1)
    shifts = torch.cat([shifts[zero], shifts[~zero]])
    img_frac = frac.unsqueeze(0) + shifts.unsqueeze(1)  # (S, N, 3)
    inside = ((img_frac >= -margin) & (img_frac < 1 + margin)).all(dim=-1)
    inside[0] = True
    s_idx, owner = inside.nonzero(as_tuple=True)
    img_frac = img_frac[s_idx, owner]
    position = img_frac @ box
    # r_j(image) - r_i = x_j - x_i + (s - wrap_j + wrap_i) @ box; the "- wrap_j" part
    # is folded in here and "+ wrap_i" is added per edge.
    shift = shifts[s_idx] - wrap[owner]
    bin_coord = (img_frac + margin) * heights
    extent = (1 + 2 * margin) * heights
    return owner, shift, position, bin_coord, extent, wrap


@dataclass
class CellList:
    """Images binned into cells at least rcut wide.  Only occupied cells exist (images sorted by cell
    id), so the memory is O(images) however vast and empty the grid: a few atoms in a 10,000 Å cell."""

    nbins: list[int]  # cells per axis
    cell: torch.Tensor  # (M, 3) int64: the cell of each image
    order: torch.Tensor  # (M,) the images sorted by cell id, image order within a cell
    sorted_id: torch.Tensor  # (M,) their cell ids (x * ny + y) * nz + z, ascending


def cell_list(bin_coord: torch.Tensor, extent: torch.Tensor, rcut: float) -> CellList:
    """Bin points at `bin_coord` (M, 3) in [0, extent) per axis; images are explicit, so cells never
    wrap around.  At most 2^20 cells per axis keep a cell id within int64."""
    nbins = torch.clamp(torch.floor(extent / rcut), min=1, max=_MAX_BINS_PER_AXIS).long()
    cell = torch.minimum((bin_coord / (extent / nbins)).long().clamp(min=0), nbins - 1)
    nb = nbins.tolist()
    cell_id = (cell[:, 0] * nb[1] + cell[:, 1]) * nb[2] + cell[:, 2]
    order = torch.argsort(cell_id, stable=True)
    return CellList(nb, cell, order, cell_id[order])


def build_neighbor_list(coord: torch.Tensor, box: torch.Tensor | None, rcut: float) -> NeighborList:
    """All pairs (i, j, image) with 0 < |r_ij| < rcut, for one frame.

    coord: (N, 3); box: (3, 3) with lattice vectors as rows, or None for open boundaries.
    Edges come sorted by centre.  The kernel library's cell list (same edges, same order) runs
    when it is built (outside dpmd.ops.reference_only()); `reference_neighbor_list` otherwise.
    """
    from dpmd import ops  # imported here: dpmd.ops sits above the geometry layer

    if coord.device.type == "cpu" and not ops.reference_forced() and ops.available():
        try:
            return NeighborList(*ops.neighbor_list(coord.detach().to(torch.float64),
                                                   None if box is None else box.detach().to(torch.float64), rcut))
        except RuntimeError:
            pass  # bad input: the reference path below raises its one-line error
    return reference_neighbor_list(coord, box, rcut)


def reference_neighbor_list(coord: torch.Tensor, box: torch.Tensor | None, rcut: float) -> NeighborList:
    """The pure-PyTorch cell list behind `build_neighbor_list` (any device)."""
    if rcut <= 0:
        raise ValueError(f"rcut must be positive, got {rcut}")
    with torch.no_grad():
        coord = coord.detach().to(torch.float64)
        n = coord.shape[0]
        dev = coord.device
        if box is not None:
            box = box.detach().to(torch.float64)
            owner, shift, position, bin_coord, extent, wrap = _periodic_images(coord, box, rcut)
        else:
            owner = torch.arange(n, device=dev)
            shift = torch.zeros(n, 3, dtype=torch.float64, device=dev)
            position = coord
            lo = coord.min(dim=0).values if n else torch.zeros(3, dtype=torch.float64, device=dev)
            bin_coord = coord - lo
            extent = bin_coord.max(dim=0).values + 1e-9 if n else torch.ones(3, dtype=torch.float64, device=dev)
            wrap = None
        if n == 0:
            empty = torch.zeros(0, dtype=torch.long, device=dev)
            return NeighborList(empty, empty, torch.zeros(0, 3, dtype=torch.float64, device=dev))

        cells = cell_list(bin_coord, extent, rcut)
        nb = cells.nbins
        # For each centre, the 9 rows (dx, dy) of its 27-cell stencil: row r holds the cells z-1..z+1,
        # consecutive in the sorted order, so it is one range q0..q1 of `cells.order`.
        rows = cells.cell[:n, None, :2] + torch.tensor(list(itertools.product((-1, 0, 1), repeat=2)), device=dev)
        ok = ((rows >= 0) & (rows < torch.tensor(nb[:2], device=dev))).all(dim=-1)
        row_id = (rows[..., 0] * nb[1] + rows[..., 1]) * nb[2]
        z = cells.cell[:n, 2:]
        q0 = torch.searchsorted(cells.sorted_id, row_id + (z - 1).clamp(min=0))
        q1 = torch.searchsorted(cells.sorted_id, row_id + (z + 1).clamp(max=nb[2] - 1) + 1)
        q1 = torch.where(ok, q1, q0)
        width = int((q1 - q0).max())
        slots = torch.arange(width, device=dev)
        order = torch.cat([cells.order, cells.order.new_zeros(width)])  # q0 + slot may run past the end

        rcut2 = rcut * rcut
        centers, neighbors, shifts = [], [], []
        chunk = max(1, _MAX_CANDIDATES // (9 * width))
        for c0 in range(0, n, chunk):
            ci = torch.arange(c0, min(n, c0 + chunk), device=dev)
            q = q0[ci].unsqueeze(-1) + slots  # (C, 9, width) positions in the sorted order
            inside = (q < q1[ci].unsqueeze(-1)).reshape(ci.numel(), -1)
            cand = order[q].reshape(ci.numel(), -1)
            valid = inside & (cand != ci.unsqueeze(1))
            d = position.index_select(0, cand.reshape(-1)).view(*cand.shape, 3)
            d = d - position[ci].unsqueeze(1)
            valid &= torch.einsum("cki,cki->ck", d, d) < rcut2
            row, col = valid.nonzero(as_tuple=True)
            img = cand[row, col]
            centers.append(ci[row])
            neighbors.append(owner[img])
            shifts.append(shift[img])
        center = torch.cat(centers)
        neighbor = torch.cat(neighbors)
        shift_out = torch.cat(shifts)
        if wrap is not None:
            shift_out = shift_out + wrap[center]
        return NeighborList(center, neighbor, shift_out)


def count_neighbors(nlist: NeighborList, atype: torch.Tensor, ntypes: int, natoms: int) -> torch.Tensor:
    """(natoms, ntypes) number of neighbours of each type around each atom."""
    key = nlist.center * ntypes + atype[nlist.neighbor]
    return torch.bincount(key, minlength=natoms * ntypes).reshape(natoms, ntypes)


def sel_groups(counts: torch.Tensor, sel: List[int]) -> torch.Tensor:
    """Neighbour counts (natoms, ntypes) grouped as `sel` limits them: per neighbour type, or one total when sel
    has a single entry for several types (a mixed-type descriptor such as se_atten).  TorchScript-compatible."""
    if len(sel) == 1 and counts.shape[1] > 1:
        return counts.sum(1, keepdim=True)
    return counts


def sel_group_name(t: int, sel: list[int], type_map: list[str]) -> str | None:
    """The neighbour type that sel's entry t limits (None: all types together)."""
    return type_map[t] if len(sel) == len(type_map) else None


def over_sel(counts: torch.Tensor, sel: list[int]) -> torch.Tensor:
    """(natoms, len(sel)) bool: the groups of each atom with more neighbours than sel allows."""
    return sel_groups(counts, sel) > torch.tensor(sel, device=counts.device)


def check_sel(counts: torch.Tensor, atype: torch.Tensor, sel: list[int], type_map: list[str]) -> None:
    """Refuse neighbour counts beyond `sel`: the model would silently drop neighbours."""
    over = over_sel(counts, sel)
    if bool(over.any()):
        i, t = (int(x) for x in over.nonzero()[0])
        raise NeighborOverflowError(sel_overflow_message(
            i, type_map[int(atype[i])], int(sel_groups(counts, sel)[i, t]), sel_group_name(t, sel, type_map), sel[t],
            int(over.any(dim=1).sum())))


def sel_overflow_message(atom, atom_type: str, count: int, neighbor_type: str | None, limit: int, n_over: int) -> str:
    """The one message for neighbours beyond sel (atom: its index, or whatever names it for the caller;
    neighbor_type None: sel limits all types together)."""
    of_type = "" if neighbor_type is None else f" of type {neighbor_type}"
    return (f"atom {atom} (type {atom_type}) has {count} neighbours{of_type} within rcut but sel "
            f"allows {limit} ({n_over} atom(s) over the limit); raise descriptor.sel (or use sel: auto)")


# ---- the padded format: DeePMD's sel[t] slots per neighbour type, with an overflow flag ----

def slot_tables(center: torch.Tensor, neighbor: torch.Tensor, natoms: int, capacity: int):
    """An edge list (sorted by centre) as tables of `capacity` slots per atom: (slot index of each edge
    (E,), neighbour (natoms, capacity): an empty slot holds the atom itself, valid (natoms, capacity))."""
    count = torch.bincount(center, minlength=natoms)
    first = torch.cumsum(count, 0) - count
    slot = torch.arange(center.numel(), device=center.device) - first.index_select(0, center)
    nbr = torch.arange(natoms, device=center.device).unsqueeze(1).repeat(1, capacity)
    nbr[center, slot] = neighbor
    valid = torch.zeros([natoms, capacity], dtype=torch.bool, device=center.device)
    valid[center, slot] = True
    return slot, nbr, valid


def sel_slots(vec: torch.Tensor, neighbor: torch.Tensor, rows: torch.Tensor, inside: torch.Tensor,
              neighbor_type: torch.Tensor, sel: list[int], rcut: float):
    """DeePMD's padded layout from K candidate slots per row: vec (R, K, 3), neighbor (R, K), inside (R, K)
    (a real neighbour within rcut), neighbor_type (R, K) of rows `rows` (R,).  Each row gets sum(sel) slots,
    sel[t] for neighbour type t in slot order, an empty one holding the row's own atom and a vector beyond rcut.
    Returns (edge_vec (R * nnei, 3), neighbor (R * nnei,), overflow (R,): a type's count beyond sel, whose
    extra neighbours were left out).  Fixed shapes: nothing is read back from the device."""
    R, K = neighbor.shape
    nnei = sum(sel)
    dest = torch.full_like(neighbor, nnei)   # column nnei collects what is dropped
    overflow = torch.zeros(R, dtype=torch.bool, device=vec.device)
    first = 0
    for t, s in enumerate(sel):
        mine = inside & (neighbor_type == t)
        rank = torch.cumsum(mine, 1) - 1
        dest = torch.where(mine & (rank < s), first + rank, dest)
        overflow |= rank[:, -1] >= s
        first += s
    slot_k = torch.full([R, nnei + 1], K, dtype=torch.long, device=vec.device)
    slot_k.scatter_(1, dest, torch.arange(K, device=vec.device).expand(R, K))
    slot_k = slot_k[:, :nnei]
    far = torch.zeros_like(vec[:, :1])   # an empty slot: a vector beyond rcut (filled in, not copied)
    far[..., 0] = rcut + 1.0
    edge_vec = torch.gather(torch.cat([vec, far], 1), 1, slot_k.unsqueeze(-1).expand(R, nnei, 3))
    nbr = torch.gather(torch.cat([neighbor, rows.unsqueeze(1)], 1), 1, slot_k)
    return edge_vec.reshape(-1, 3), nbr.reshape(-1), overflow


def padded_edges(center: torch.Tensor, neighbor: torch.Tensor, vec: torch.Tensor, atype: torch.Tensor,
                 rows: torch.Tensor, sel: list[int], rcut: float):
    """An edge list (sorted by centre; vectors vec (E, 3)) in the padded format of `sel_slots`, rows `rows`."""
    natoms = atype.numel()
    capacity = max(1, int(torch.bincount(center, minlength=natoms).max())) if natoms else 1
    slot, nbr, valid = slot_tables(center, neighbor, natoms, capacity)
    table = vec.new_zeros([natoms, capacity, 3])
    table[center, slot] = vec
    nbr, valid, table = nbr.index_select(0, rows), valid.index_select(0, rows), table.index_select(0, rows)
    inside = valid & ((table * table).sum(-1) < rcut * rcut)
    return sel_slots(table, nbr, rows, inside, atype.index_select(0, nbr.reshape(-1)).view_as(nbr), sel, rcut)


def auto_sel(max_counts: list[int], ratio: float = 1.1) -> list[int]:
    """DeePMD's `sel: auto`: the largest neighbour count times `ratio`, rounded up to a multiple of 4."""
    return [int(math.ceil(c * ratio / 4.0)) * 4 for c in max_counts]


def neighbor_stat(frames, rcut: float, ntypes: int) -> tuple[list[int], float]:
    """Largest neighbour count of each type over all atoms and frames, and the smallest pair distance.

    frames: iterable of (coord (N, 3), atype (N,), box (3, 3) or None).
    """
    max_counts = torch.zeros(ntypes, dtype=torch.long)
    min_dist = math.inf
    for coord, atype, box in frames:
        coord = torch.as_tensor(coord, dtype=torch.float64)
        atype = torch.as_tensor(atype, dtype=torch.long)
        box = None if box is None else torch.as_tensor(box, dtype=torch.float64).reshape(3, 3)
        nlist = build_neighbor_list(coord, box, rcut)
        if len(nlist) == 0:
            continue
        counts = count_neighbors(nlist, atype, ntypes, coord.shape[0])
        max_counts = torch.maximum(max_counts, counts.max(dim=0).values)
        vec = coord[nlist.neighbor] - coord[nlist.center]
        if box is not None:
            vec = vec + nlist.shift @ box
        min_dist = min(min_dist, float(vec.norm(dim=1).min()))
    return max_counts.tolist(), min_dist
