"""The one neighbour list: a cell-list search (the kernel library's, or the pure-PyTorch reference here), in two
formats (`NeighborList`: an edge list, or DeePMD's padded layout with sel[t] slots per neighbour type), with an
overflow flag where a count exceeds sel, and the one message for it.  The training frames, the MD Verlet list, an
MPI rank's list over its local and ghost atoms (dpmd.md.domain), the frozen model (which compiles the reference,
`reference_edges`) and the campaign's min_distance filter all search with it.

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
what gives forces and the virial (see dpmd.model.forces).  `canonical_order` sorts edges so that a list does
not depend on when or where (which MPI rank) it was searched.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, NamedTuple, Optional, Tuple

import torch

from dpmd.errors import NeighborOverflowError

FORMATS = ("edges", "padded")


@dataclass
class NeighborList:
    """One neighbour list in one of two formats (JAX-MD's dense / sparse partition):

    edges   center, neighbor (E,), shift (E, 3): the edge list of the module doc, sorted by centre;
    padded  DeePMD's layout (`sel_slots`): rows (R,) atoms, sum(sel) slots each, sel[t] for neighbour type t
            (mixed: one block of sel[0] for neighbours of every type, a mixed-type descriptor's); center, neighbor
            (R * nnei,) with an empty slot holding the row's own atom, vec (R * nnei, 3) the slot vectors (an
            empty slot beyond rcut), shift None.
    overflow: per centre (edges: every atom; padded: every row) whether a count exceeds sel (padded: the
    neighbours beyond sel were left out); None when no sel was given.
    vec, d2: each edge's (slot's) vector r_e and |r_e|^2 where the list's maker computed them (the MD engine's
    Verlet list, dpmd.md.neighbors: the model then need not recompute them); None otherwise (vec is always there
    in the padded format)."""

    center: torch.Tensor  # (E,) int64
    neighbor: torch.Tensor  # (E,) int64
    shift: Optional[torch.Tensor]  # (E, 3) float, integer multiples of the lattice vectors
    format: str = "edges"
    overflow: Optional[torch.Tensor] = None
    vec: Optional[torch.Tensor] = None
    rows: Optional[torch.Tensor] = None
    d2: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return int(self.center.numel())


def _face_heights(box: torch.Tensor) -> torch.Tensor:
    """Distance between opposite faces of the cell, one per lattice vector."""
    volume = torch.linalg.det(box).abs()
    a, b, c = box[0], box[1], box[2]
    areas = torch.stack([torch.linalg.cross(b, c), torch.linalg.cross(c, a), torch.linalg.cross(a, b)])
    areas = torch.linalg.vector_norm(areas, 2.0, dim=1)
    return volume / areas


def _periodic_images(coord: torch.Tensor, box: torch.Tensor, rcut: float
                     ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """All images of all atoms within `rcut` of the cell.

    Returns (owner, shift, position, bin_coord): the atom each image copies, its shift
    in lattice vectors relative to the *unwrapped* input coordinates, its Cartesian
    position, and a coordinate per axis measured in Å across the cell faces (used for
    binning: two points closer than rcut differ by less than rcut along each of these).
    """
    heights = _face_heights(box)
    if bool((heights <= 0).any()) or not bool(torch.isfinite(heights).all()):
        vectors: List[List[float]] = box.tolist()
        raise ValueError("box " + str(vectors) + " is singular: its lattice vectors must span a volume")
    frac = coord @ torch.linalg.inv(box)
    wrap = torch.floor(frac)
    frac = frac - wrap  # in [0, 1)
    margin = rcut / heights  # in fractional units, per axis
    nimg: List[int] = torch.ceil(margin).long().tolist()
    r = [torch.arange(-m, m + 1, dtype=coord.dtype, device=coord.device) for m in nimg]
    shifts = torch.cartesian_prod(r[0], r[1], r[2])
    # Image s=0 first so that images 0..N-1 are the atoms themselves.
    zero = (shifts == 0).all(dim=1)
    shifts = torch.cat([shifts[zero], shifts[~zero]])
    img_frac = frac.unsqueeze(0) + shifts.unsqueeze(1)  # (S, N, 3)
    inside = ((img_frac >= -margin) & (img_frac < 1 + margin)).all(dim=-1)
    inside[0] = True
    nz = inside.nonzero()
    s_idx, owner = nz[:, 0], nz[:, 1]
    img_frac = img_frac[s_idx, owner]
    position = img_frac @ box
    # r_j(image) - r_i = x_j - x_i + (s - wrap_j + wrap_i) @ box; the "- wrap_j" part
    # is folded in here and "+ wrap_i" is added per edge.
    shift = shifts[s_idx] - wrap[owner]
    bin_coord = (img_frac + margin) * heights
    extent = (1 + 2 * margin) * heights
    return owner, shift, position, bin_coord, extent, wrap


class CellList(NamedTuple):
    """Images binned into cells at least rcut wide.  Only occupied cells exist (images sorted by cell
    id), so the memory is O(images) however vast and empty the grid: a few atoms in a 10,000 Å cell."""

    nbins: List[int]  # cells per axis
    cell: torch.Tensor  # (M, 3) int64: the cell of each image
    order: torch.Tensor  # (M,) the images sorted by cell id, image order within a cell
    sorted_id: torch.Tensor  # (M,) their cell ids (x * ny + y) * nz + z, ascending


def cell_list(bin_coord: torch.Tensor, extent: torch.Tensor, rcut: float) -> CellList:
    """Bin points at `bin_coord` (M, 3) in [0, extent) per axis; images are explicit, so cells never
    wrap around.  At most 2^20 cells per axis keep a cell id within int64."""
    nbins = torch.clamp(torch.floor(extent / rcut), min=1, max=1 << 20).long()
    cell = torch.minimum((bin_coord / (extent / nbins)).long().clamp(min=0), nbins - 1)
    nb: List[int] = nbins.tolist()
    cell_id = (cell[:, 0] * nb[1] + cell[:, 1]) * nb[2] + cell[:, 2]
    order = torch.argsort(cell_id, stable=True)
    return CellList(nb, cell, order, cell_id[order])


def build_neighbor_list(coord: torch.Tensor, box: torch.Tensor | None, rcut: float, atype: torch.Tensor | None = None,
                        sel: list[int] | None = None, format: str = "edges",
                        rows: torch.Tensor | None = None, mixed: bool = False) -> NeighborList:
    """All pairs (i, j, image) with |r_ij| < rcut (i != j or a nonzero image), for one frame.

    coord: (N, 3); box: (3, 3) with lattice vectors as rows, or None for open boundaries.
    Edges come sorted by centre.  The kernel library's cell list (same edges, same order) runs
    when it is built (outside dpmd.ops.reference_only()); `reference_neighbor_list` otherwise.
    With atype (N,) and sel, the list carries its overflow flag; format "padded" (which needs them) lays it
    out as `sel_slots` does, rows `rows` (default: every atom in order), mixed: one block of sel[0] slots for
    neighbours of every type (a mixed-type descriptor's list).
    """
    from dpmd import ops  # imported here: dpmd.ops sits above the geometry layer

    if format not in FORMATS:
        raise ValueError(f"neighbour list format must be one of {FORMATS}, got {format!r}")
    if (sel is None) != (atype is None) or (format == "padded" and sel is None):
        raise ValueError("a neighbour list's overflow flag (and the padded format) needs both atype and sel")
    nl = None
    if coord.device.type == "cpu" and not ops.reference_forced() and ops.available():
        try:
            nl = NeighborList(*ops.neighbor_list(coord.detach().to(torch.float64),
                                                 None if box is None else box.detach().to(torch.float64), rcut))
        except RuntimeError:
            pass  # bad input: the reference path below raises its one-line error
    if nl is None:
        nl = reference_neighbor_list(coord, box, rcut)
    if sel is None:
        return nl
    natoms = coord.shape[0]
    if format == "edges":
        ntypes = max(len(sel), int(atype.max()) + 1 if natoms else 0)
        counts = sel_groups(count_neighbors(nl, atype, ntypes, natoms), sel)
        nl.overflow = (counts > torch.tensor(sel, device=counts.device)).any(1)
        return nl
    if mixed and len(sel) != 1:
        raise ValueError(f"a mixed-type padded list takes one sel entry for all types, got sel {sel}")
    if natoms and not mixed and int(atype.max()) >= len(sel):
        raise ValueError(f"the padded format takes one sel entry per neighbour type, got sel {sel} for "
                         f"{int(atype.max()) + 1} types (or set mixed)")
    x = coord.detach().to(torch.float64)
    vec = x.index_select(0, nl.neighbor) - x.index_select(0, nl.center)
    if box is not None:
        vec = vec + nl.shift @ box.detach().to(torch.float64)
    rows = torch.arange(natoms, device=coord.device) if rows is None else rows
    vec, neighbor, overflow = padded_edges(nl.center, nl.neighbor, vec, atype, rows, sel, rcut, mixed)
    return NeighborList(rows.repeat_interleave(sum(sel)), neighbor, None, "padded", overflow, vec, rows)


def reference_neighbor_list(coord: torch.Tensor, box: torch.Tensor | None, rcut: float) -> NeighborList:
    """The pure-PyTorch cell list behind `build_neighbor_list` (any device)."""
    return NeighborList(*reference_edges(coord, box, rcut))


def reference_edges(coord: torch.Tensor, box: Optional[torch.Tensor], rcut: float
                    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(center, neighbor, shift) of `reference_neighbor_list`; TorchScript-compatible (the frozen model's own
    search, dpmd.model.export)."""
    if rcut <= 0:
        raise ValueError("rcut must be positive, got " + str(rcut))
    with torch.no_grad():
        coord = coord.detach().to(torch.float64)
        n = coord.shape[0]
        dev = coord.device
        wrap: Optional[torch.Tensor] = None
        if box is not None:
            owner, shift, position, bin_coord, extent, wrap = _periodic_images(
                coord, box.detach().to(torch.float64), rcut)
        else:
            owner = torch.arange(n, device=dev)
            shift = torch.zeros(n, 3, dtype=torch.float64, device=dev)
            position = coord
            if n == 0:
                bin_coord, extent = coord, torch.ones(3, dtype=torch.float64, device=dev)
            else:
                bin_coord = coord - coord.min(dim=0).values
                extent = bin_coord.max(dim=0).values + 1e-9
        if n == 0:
            empty = torch.zeros(0, dtype=torch.long, device=dev)
            return empty, empty, torch.zeros(0, 3, dtype=torch.float64, device=dev)

        cells = cell_list(bin_coord, extent, rcut)
        nb = cells.nbins
        # For each centre, the 9 rows (dx, dy) of its 27-cell stencil: row r holds the cells z-1..z+1,
        # consecutive in the sorted order, so it is one range q0..q1 of `cells.order`.
        step = torch.arange(-1, 2, device=dev)
        rows = cells.cell[:n, None, :2] + torch.cartesian_prod(step, step)
        ok = ((rows >= 0) & (rows < torch.tensor(nb[:2], device=dev))).all(dim=-1)
        row_id = (rows[:, :, 0] * nb[1] + rows[:, :, 1]) * nb[2]
        z = cells.cell[:n, 2:]
        q0 = torch.searchsorted(cells.sorted_id, row_id + (z - 1).clamp(min=0))
        q1 = torch.searchsorted(cells.sorted_id, row_id + (z + 1).clamp(max=nb[2] - 1) + 1)
        q1 = torch.where(ok, q1, q0)
        width = int((q1 - q0).max())
        slots = torch.arange(width, device=dev)
        order = torch.cat([cells.order, cells.order.new_zeros(width)])  # q0 + slot may run past the end

        rcut2 = rcut * rcut
        centers: List[torch.Tensor] = []
        neighbors: List[torch.Tensor] = []
        shifts: List[torch.Tensor] = []
        chunk = max(1, (1 << 22) // (9 * width))   # candidate pairs at once: bounds the peak memory
        for c0 in range(0, n, chunk):
            ci = torch.arange(c0, min(n, c0 + chunk), device=dev)
            q = q0[ci].unsqueeze(-1) + slots  # (C, 9, width) positions in the sorted order
            inside = (q < q1[ci].unsqueeze(-1)).reshape(ci.numel(), -1)
            cand = order[q].reshape(ci.numel(), -1)
            valid = inside & (cand != ci.unsqueeze(1))
            d = position.index_select(0, cand.reshape(-1)).view(cand.shape[0], cand.shape[1], 3)
            d = d - position[ci].unsqueeze(1)
            valid &= torch.einsum("cki,cki->ck", d, d) < rcut2
            pair = valid.nonzero()
            img = cand[pair[:, 0], pair[:, 1]]
            centers.append(ci[pair[:, 0]])
            neighbors.append(owner[img])
            shifts.append(shift[img])
        center = torch.cat(centers)
        shift_out = torch.cat(shifts)
        if wrap is not None:
            shift_out = shift_out + wrap[center]
        return center, torch.cat(neighbors), shift_out


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


def sel_group_name(t: int, sel: List[int], type_map: List[str]) -> Optional[str]:
    """The neighbour type that sel's entry t limits (None: all types together).  TorchScript-compatible."""
    return type_map[t] if len(sel) == len(type_map) else None


def first_over_sel(counts: torch.Tensor, sel: List[int]) -> List[int]:
    """[atom, sel group, its count, atoms over] of the first atom with more neighbours in a group of `sel` than it
    allows, or [] (counts (natoms, ntypes); TorchScript-compatible: the frozen model's check)."""
    grouped = sel_groups(counts, sel)
    over = grouped > torch.tensor(sel, device=counts.device)
    if not bool(over.any()):
        return []
    first = over.nonzero()[0]
    i, t = int(first[0]), int(first[1])
    return [i, t, int(grouped[i, t]), int(over.any(1).sum())]


def check_sel(counts: torch.Tensor, atype: torch.Tensor, sel: list[int], type_map: list[str], natoms: int = 0,
              entry: int = -1, rcut: float = 0.0) -> None:
    """Refuse neighbour counts beyond `sel` (the model would silently drop neighbours), naming the atom (and its
    frame, for counts of several frames of `natoms` atoms) and, for a hybrid's entry, the entry."""
    found = first_over_sel(counts, sel)
    if found:
        i, t, count, n_over = found
        atom = f"{i % natoms} of frame {i // natoms}" if 0 < natoms < counts.shape[0] else str(i)
        raise NeighborOverflowError(sel_overflow_message(atom, type_map[int(atype[i])], count,
                                                         sel_group_name(t, sel, type_map), sel[t], n_over, entry, rcut))


def sel_overflow_message(atom: str, atom_type: str, count: int, neighbor_type: Optional[str], limit: int,
                         n_over: int, entry: int = -1, rcut: float = 0.0) -> str:
    """The one message for neighbours beyond sel (atom: as the caller numbers atoms; neighbor_type None: sel limits
    all types together; entry >= 0: descriptor.list[entry] of a hybrid, whose own rcut and sel are meant).
    TorchScript-compatible (the frozen model's check)."""
    of_type = "" if neighbor_type is None else " of type " + neighbor_type
    key, within = "descriptor", "rcut"
    if entry >= 0:
        key = "descriptor.list[" + str(entry) + "]"
        text = str(rcut)  # 3.0 as "3" (TorchScript writes "3.")
        within = key + "'s rcut " + (text[:-2] if text.endswith(".0") else text[:-1] if text.endswith(".") else text)
    return ("atom " + atom + " (type " + atom_type + ") has " + str(count) + " neighbours" + of_type + " within "
            + within + " but sel allows " + str(limit) + " (" + str(n_over) + " atom(s) over the limit); raise "
            + key + ".sel (or use sel: auto)")


def canonical_order(center: torch.Tensor, neighbor: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """The permutation sorting edges by (centre, neighbour, lattice shift x, y, z): a list in this order does not
    depend on when or how it was searched (restarts continue bit for bit; an MPI rank's list, keyed by global
    ids, is ordered as the serial one)."""
    order = torch.arange(center.numel(), device=center.device)
    ishift = torch.round(shift).long()
    span = int(neighbor.max()) + 1 if neighbor.numel() else 1   # (centre, neighbour) as one key: one sort less
    for key in (ishift[:, 2], ishift[:, 1], ishift[:, 0], center * span + neighbor):
        order = order[torch.argsort(key[order], stable=True)]
    return order


# ---- the padded format: DeePMD's sel[t] slots per neighbour type, with an overflow flag ----

def slot_tables(center: torch.Tensor, neighbor: torch.Tensor, values: torch.Tensor, natoms: int, capacity: int,
                rows: torch.Tensor):
    """An edge list (sorted by centre) with a row of values per edge (E, 3) as tables of `capacity` slots for the
    atoms `rows` (R,): neighbour (R, capacity) (an empty slot holds the atom itself), valid (R, capacity) and the
    values (R, capacity, 3) (zero in an empty slot)."""
    count = torch.bincount(center, minlength=natoms)
    first = torch.cumsum(count, 0) - count
    slot = torch.arange(center.numel(), device=center.device) - first.index_select(0, center)
    nbr = torch.arange(natoms, device=center.device).unsqueeze(1).repeat(1, capacity)
    nbr[center, slot] = neighbor
    valid = torch.zeros([natoms, capacity], dtype=torch.bool, device=center.device)
    valid[center, slot] = True
    table = values.new_zeros([natoms, capacity, 3])
    table[center, slot] = values
    return nbr.index_select(0, rows), valid.index_select(0, rows), table.index_select(0, rows)


def slot_groups(inside: torch.Tensor, neighbor_type: torch.Tensor, sel: List[int], mixed: bool = False
                ) -> List[torch.Tensor]:
    """The candidates (R, K) bool that each entry of sel limits: those of neighbour type t, or, mixed (a mixed-type
    descriptor's list: sel has one entry), all of them.  inside (R, K): the real neighbours within rcut;
    neighbor_type (R, K)."""
    if mixed:
        return [inside]
    return [inside & (neighbor_type == t) for t in range(len(sel))]


def over_slots(inside: torch.Tensor, neighbor_type: torch.Tensor, sel: List[int], mixed: bool = False
               ) -> torch.Tensor:
    """(R,) bool: the rows whose candidates `inside` exceed sel in a group of `slot_groups` (no read back)."""
    over = torch.zeros(inside.shape[0], dtype=torch.bool, device=inside.device)
    for mine, s in zip(slot_groups(inside, neighbor_type, sel, mixed), sel):
        over |= mine.sum(1) > s
    return over


def sel_slots(vec: torch.Tensor, neighbor: torch.Tensor, rows: torch.Tensor, inside: torch.Tensor,
              neighbor_type: torch.Tensor, sel: list[int], rcut: float, mixed: bool = False):
    """DeePMD's padded layout from K candidate slots per row: vec (R, K, 3), neighbor (R, K), inside (R, K)
    (a real neighbour within rcut), neighbor_type (R, K) of rows `rows` (R,).  Each row gets sum(sel) slots,
    sel[t] for neighbour type t in slot order (mixed: one block of sel[0] for every type, a mixed-type list), an empty
    one holding `rows`' entry and a vector beyond rcut.  (neighbor and rows are only carried along: any per-slot
    and per-row values will do, e.g. types.)  Returns (edge_vec (R * nnei, 3), neighbor (R * nnei,), overflow
    (R,): a group's count beyond sel, whose extra neighbours were left out).  Fixed shapes: nothing is read back
    from the device; differentiable in vec."""
    R, K = neighbor.shape
    nnei = sum(sel)
    dest = torch.full_like(neighbor, nnei)   # column nnei collects what is dropped
    overflow = torch.zeros(R, dtype=torch.bool, device=vec.device)
    first = 0
    for mine, s in zip(slot_groups(inside, neighbor_type, sel, mixed), sel):
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
                 rows: torch.Tensor, sel: list[int], rcut: float, mixed: bool = False):
    """An edge list (sorted by centre; vectors vec (E, 3)) in the padded format of `sel_slots`, rows `rows`."""
    natoms = atype.numel()
    capacity = max(1, int(torch.bincount(center, minlength=natoms).max())) if natoms else 1
    nbr, valid, table = slot_tables(center, neighbor, vec, natoms, capacity, rows)
    inside = valid & ((table * table).sum(-1) < rcut * rcut)
    return sel_slots(table, nbr, rows, inside, atype.index_select(0, nbr.reshape(-1)).view_as(nbr), sel, rcut,
                     mixed)


def auto_sel(max_counts: list[int], ratio: float = 1.1) -> list[int]:
    """DeePMD's `sel: auto`: the largest neighbour count times `ratio`, rounded up to a multiple of 4."""
    return [int(math.ceil(c * ratio / 4.0)) * 4 for c in max_counts]


def edge_lengths(coord: torch.Tensor, box: torch.Tensor | None, nlist: NeighborList) -> torch.Tensor:
    """(E,) |r_e| of an edge list."""
    vec = coord[nlist.neighbor] - coord[nlist.center]
    if box is not None:
        vec = vec + nlist.shift @ box
    return vec.norm(dim=1)


def min_pair_distance(coord, box, cutoff: float) -> float | None:
    """The smallest distance below `cutoff` between two atoms, or an atom and an image (periodic images
    included; box None: open boundaries), or None when no pair is that close."""
    coord = torch.as_tensor(coord, dtype=torch.float64).reshape(-1, 3)
    box = None if box is None else torch.as_tensor(box, dtype=torch.float64).reshape(3, 3)
    nlist = build_neighbor_list(coord, box, cutoff)
    return float(edge_lengths(coord, box, nlist).min()) if len(nlist) else None


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
        min_dist = min(min_dist, float(edge_lengths(coord, box, nlist).min()))
    return max_counts.tolist(), min_dist
