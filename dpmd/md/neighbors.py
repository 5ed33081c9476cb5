"""Verlet neighbour list: built at rcut + skin, filtered to rcut every step.

A frame's list is rebuilt only when it may have become incomplete: with d the largest atomic
displacement since the build (measured in fractional coordinates mapped by the current box) and
eps = |h_ref^-1 h - 1| the cell strain since the build, no pair beyond rcut + skin at build time
can have come within rcut while 2 d + (rcut + skin) eps <= skin.  With a fixed box this is the
usual "some atom moved more than skin/2".

Edges are put in a canonical order (centre, neighbour, shift) at every build, so the filtered
edge list, and therefore every force, is bit-for-bit independent of when the list was built
(this is what makes restarts exact).
"""

from __future__ import annotations

import torch

from dpmd.geometry.neighbor import build_neighbor_list


def _canonical(center, neighbor, shift, natoms):
    order = torch.arange(center.numel(), device=center.device)
    ishift = torch.round(shift).long()
    for key in (ishift[:, 2], ishift[:, 1], ishift[:, 0], center * natoms + neighbor):
        order = order[torch.argsort(key[order], stable=True)]
    return center[order], neighbor[order], shift[order]


class VerletList:
    def __init__(self, rcut: float, skin: float):
        if skin < 0:
            raise ValueError(f"skin must be >= 0, got {skin}")
        self.rcut, self.skin = float(rcut), float(skin)
        self.frames: list | None = None  # per frame: (center, neighbor, shift)
        self.ref_positions = self.ref_box = self.ref_inv = None
        self.builds = 0

    def needs_rebuild(self, positions: torch.Tensor, box: torch.Tensor | None) -> torch.Tensor:
        """(F,) bool on the positions' device (no host synchronisation)."""
        if self.frames is None or len(self.frames) != positions.shape[0]:
            return torch.ones(positions.shape[0], dtype=torch.bool, device=positions.device)
        if box is None:
            d = (positions - self.ref_positions).norm(dim=-1).amax(dim=1)
            return 2.0 * d > self.skin
        inv = torch.linalg.inv(box)
        ds = positions @ inv - self.ref_positions @ self.ref_inv
        d = (ds @ box).norm(dim=-1).amax(dim=1)
        eye = torch.eye(3, dtype=box.dtype, device=box.device)
        eps = torch.linalg.matrix_norm(self.ref_inv @ box - eye)   # Frobenius >= spectral norm
        return 2.0 * d + (self.rcut + self.skin) * eps > self.skin

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
            self.frames[f] = _canonical(nl.center, nl.neighbor, nl.shift.to(positions.dtype), n)
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

    def within_cutoff(self, positions: torch.Tensor, box: torch.Tensor | None):
        """Edges (center, neighbor, shift) with |r_e| < rcut in global atom indices, their vectors r_e
        and squared lengths (the vectors are handed to the model, which then need not recompute them)."""
        x = positions.reshape(-1, 3)
        vec = x.index_select(0, self.neighbor) - x.index_select(0, self.center)
        if box is not None:
            vec = vec + torch.bmm(self.shift.unsqueeze(1), box.index_select(0, self.edge_frame)).squeeze(1)
        d2 = (vec * vec).sum(-1)
        keep = (d2 < self.rcut * self.rcut).nonzero().squeeze(1)   # one nonzero for all five selections
        return (self.center.index_select(0, keep), self.neighbor.index_select(0, keep),
                self.shift.index_select(0, keep), vec.index_select(0, keep), d2.index_select(0, keep))
