"""Verlet neighbour list: built at rcut + skin, filtered to rcut every step.

A frame's list is rebuilt only when it may have become incomplete: with d the largest atomic
displacement since the build (measured in fractional coordinates mapped by the current box) and
eps = |h_ref^-1 h - 1| the cell strain since the build, no pair beyond rcut + skin at build time
can have come within rcut while 2 d + (rcut + skin) eps <= skin.  With a fixed box this is the
usual "some atom moved more than skin/2".

Edges are put in the canonical order (dpmd.geometry.neighbor.canonical_order) at every build, so the
filtered edge list, and therefore every force, is bit-for-bit independent of when the list was built
(this is what makes restarts exact).
"""

from __future__ import annotations

import torch

from dpmd.geometry.neighbor import (NeighborList, build_neighbor_list, canonical_order, over_slots, sel_slots,
                                    slot_tables)


class VerletList:
    def __init__(self, rcut: float, skin: float):
        if skin < 0:
            raise ValueError(f"skin must be >= 0, got {skin}")
        self.rcut, self.skin = float(rcut), float(skin)
        self.frames: list | None = None  # per frame: (center, neighbor, shift)
        self.ref_positions = self.ref_box = self.ref_inv = None
        self.builds = 0
        self.capacity = 0   # slots per atom of the padded tables (pad)

    def needs_rebuild(self, positions: torch.Tensor, box: torch.Tensor | None) -> torch.Tensor:
        """(F,) bool on the positions' device (no host synchronisation)."""
        if self.frames is None or len(self.frames) != positions.shape[0]:
            return torch.ones(positions.shape[0], dtype=torch.bool, device=positions.device)
        return self.outgrown(*self.drift(positions, box))

    def outgrown(self, d: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """(F,) may a pair beyond rcut + skin at the build have come within rcut, after displacements up to d
        and a cell strain eps (see the module doc)?"""
        return 2.0 * d + (self.rcut + self.skin) * eps > self.skin

    def drift(self, positions: torch.Tensor, box: torch.Tensor | None):
        """(F,) largest displacement since the build d and cell strain eps (see the module doc)."""
        if box is None:
            d = (positions - self.ref_positions).norm(dim=-1).amax(dim=1)
            return d, torch.zeros_like(d)
        inv = torch.linalg.inv_ex(box).inverse   # (no error check: it would read back from the device)
        ds = positions @ inv - self.ref_positions @ self.ref_inv
        d = (ds @ box).norm(dim=-1).amax(dim=1)
        eye = torch.eye(3, dtype=box.dtype, device=box.device)
        return d, torch.linalg.matrix_norm(self.ref_inv @ box - eye)   # Frobenius >= spectral norm

    def build(self, positions: torch.Tensor, box: torch.Tensor | None, frames=None) -> None:
        nf, n = positions.shape[:2]
        if self.frames is None or len(self.frames) != nf:
            self.frames = [None] * nf
            frames = range(nf)
            self.ref_positions = positions.clone()
            self.ref_box = None if box is None else box.clone()
        frames = range(nf) if frames is None else frames
        for f in frames:
            nl = build_neighbor_list(positions[f], None if box is None else box[f], self.rcut + self.skin)
            shift = nl.shift.to(positions.dtype)
            order = canonical_order(nl.center, nl.neighbor, shift)
            self.frames[f] = (nl.center[order], nl.neighbor[order], shift[order])
            self.ref_positions[f] = positions[f]
            if box is not None:
                self.ref_box[f] = box[f]
        if box is not None:
            self.ref_inv = torch.linalg.inv(self.ref_box)
        offsets = [f * n for f in range(nf)]
        self.center = torch.cat([c + o for (c, _, _), o in zip(self.frames, offsets)])
        self.neighbor = torch.cat([nb + o for (_, nb, _), o in zip(self.frames, offsets)])
        self.shift = torch.cat([s for (_, _, s) in self.frames])
        self.edge_frame = self.center // n
        self.builds += 1

    def within_cutoff(self, positions: torch.Tensor, box: torch.Tensor | None, format: str = "edges",
                      sel: list[int] | None = None, mixed: bool = False, limits=()) -> NeighborList:
        """This step's edges with |r_e| < rcut, a NeighborList of `format`:
          "edges": in global atom indices, carrying their vectors r_e and squared lengths (vec, d2: the model
              then need not recompute the vectors);
          "padded": DeePMD's padded layout (`sel_slots`) of the `pad` rows, sum(sel) slots each, sel[t] for
              neighbour type t in the canonical order (mixed: one block of sel[0] for every type, a mixed-type
              descriptor's), an empty slot holding the row's own atom and a vector beyond rcut (so it is DeePMD's
              padding); center, neighbor, vec (R * nnei, ...), d2 the slots' squared lengths, overflow (R,) a
              count beyond sel, or beyond the sel of a limit (rcut_i, sel_i, mixed_i) within rcut_i (a hybrid
              descriptor's entries: dpmd.model.forces.sel_limits).  Fixed shapes: no host synchronisation."""
        if format == "padded":
            return self._padded(positions, box, sel, mixed, limits)
        x = positions.reshape(-1, 3)
        vec = x.index_select(0, self.neighbor) - x.index_select(0, self.center)
        if box is not None:
            vec = vec + torch.bmm(self.shift.unsqueeze(1), box.index_select(0, self.edge_frame)).squeeze(1)
        d2 = (vec * vec).sum(-1)
        keep = (d2 < self.rcut * self.rcut).nonzero().squeeze(1)   # one nonzero for all five selections
        return NeighborList(self.center.index_select(0, keep), self.neighbor.index_select(0, keep),
                            self.shift.index_select(0, keep), vec=vec.index_select(0, keep),
                            d2=d2.index_select(0, keep))

    def adopt(self, other: "VerletList", device) -> None:
        """Take the lists (and padded tables) that `other` built on the host, copied to `device` without
        making the host wait (pinned memory, non-blocking)."""
        def to(t):
            if t is None or t.device == torch.device(device):
                return t
            return t.pin_memory().to(device, non_blocking=True)
        for name in ("center", "neighbor", "shift", "edge_frame", "ref_positions", "ref_box", "ref_inv",
                     "pad_rows", "pad_neighbor", "pad_shift", "pad_valid", "pad_type", "pad_frame"):
            setattr(self, name, to(getattr(other, name)))
        self.frames, self.capacity = other.frames, other.capacity
        self.builds += 1

    # ---- the padded form (the MD engine's sync-free mode: every shape known on the host) ----

    def pad(self, rows: torch.Tensor, atype: torch.Tensor) -> None:
        """After a build: the list as tables of K slots per row (the atom rows[r] of row r), in the canonical
        order, K grown (never shrunk) to the longest row plus a margin.  rows (R,) and atype (R,) flat."""
        natoms = atype.numel()
        count = torch.bincount(self.center, minlength=natoms)
        k = int(count.max()) if natoms else 0
        if k > self.capacity:
            self.capacity = max(8, -(-int(1.2 * k) // 8) * 8)
        K = self.capacity
        self.pad_rows = rows
        self.pad_neighbor, self.pad_valid, self.pad_shift = slot_tables(self.center, self.neighbor, self.shift,
                                                                        natoms, K, rows)
        self.pad_type = torch.where(self.pad_valid, atype.index_select(0, self.pad_neighbor.reshape(-1)).view(-1, K), -1)
        self.pad_frame = rows // (natoms // len(self.frames))

    def _padded(self, positions: torch.Tensor, box: torch.Tensor | None, sel: list[int], mixed: bool,
                limits) -> NeighborList:
        x = positions.reshape(-1, 3)
        nb, R, K = self.pad_neighbor, self.pad_neighbor.shape[0], self.capacity
        vec = x.index_select(0, nb.reshape(-1)).view(R, K, 3) - x.index_select(0, self.pad_rows).unsqueeze(1)
        if box is not None:
            vec = vec + torch.bmm(self.pad_shift, box.index_select(0, self.pad_frame))
        d2 = (vec * vec).sum(-1)
        inside = self.pad_valid & (d2 < self.rcut * self.rcut)
        edge_vec, neighbor, overflow = sel_slots(vec, nb, self.pad_rows, inside, self.pad_type, sel, self.rcut,
                                                 mixed)
        for rcut, limit, limit_mixed in limits:
            overflow = overflow | over_slots(self.pad_valid & (d2 < rcut * rcut), self.pad_type, limit, limit_mixed)
        return NeighborList(self.pad_rows.repeat_interleave(sum(sel)), neighbor, None, "padded", overflow, edge_vec,
                            self.pad_rows, (edge_vec * edge_vec).sum(-1))
