"""Spatial domain decomposition for MPI runs: who owns which atom, ghosts, and all communication.

The periodic cell is cut into a px x py x pz grid in *fractional* coordinates (so triclinic cells and
a cell rescaled by the barostat need nothing special); rank r owns the atoms whose wrapped fractional
position lies in its brick.  The model (the "pair style") never sees any of this: it gets local atoms
followed by ghost atoms and an edge list whose centres are all local (dpmd.md.parallel).

At a neighbour-list rebuild (the same displacement/strain criterion as the serial Verlet list,
decided globally), only ranks that share atoms talk (`Comm.exchange`: an alltoall of counts, then point
to point):
  1. migration: each rank computes the owner of each of its atoms and sends the leavers (id, position,
     velocity) to their new owners; it keeps its atoms sorted by global id;
  2. ghosts: each rank sends every other rank within reach the (id, position) of its atoms having a
     periodic image within rcut + skin of that rank's brick (measured across the lattice planes, so
     exact for triclinic cells; when a brick is thinner than rcut + skin more distant ranks are in reach
     and an atom may have several such images).  The receiver takes the images of its own and the
     received atoms within rcut + skin of its brick, and an open-boundary cell list over them gives the
     rcut + skin edges of its local atoms.  Each edge is stored the way the serial list stores it --
     (centre, neighbour, integer lattice shift) on *unwrapped* coordinates, in the same canonical
     order -- with the neighbour either a local atom or a ghost slot; a ghost slot is one remote atom
     (all its images share the slot: the edge shifts tell them apart);
  3. a communication plan: each rank tells the owners which of their atoms its ghost slots hold.
Between rebuilds, every step sends the positions of the ghost slots forward (point to point, only
between ranks that share ghosts) and the forces on ghost slots back to their owners.  On a GPU rank these go
through host buffers in pinned memory (`HostStage`), allocated once and reused: one copy each way per exchange
(the MPI library needs no CUDA awareness).

Global sums (energies, virial, kinetic energy, momentum) are `Comm.allsum`: an Allgather then a sum in
rank order, so every rank gets bit-identical values (the replicated thermostat/barostat variables can
never drift apart) independent of MPI's reduction algorithm.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch

from dpmd.geometry.neighbor import build_neighbor_list, canonical_order


class Comm:
    """The few collectives the engine needs, on top of an mpi4py communicator."""

    def __init__(self, comm):
        self.comm = comm
        self.rank = comm.Get_rank()
        self.size = comm.Get_size()

    def allsum(self, x):
        """Sum over ranks of a float tensor/array, added in rank order (identical on every rank)."""
        is_tensor = torch.is_tensor(x)
        a = np.ascontiguousarray(x.detach().cpu().numpy() if is_tensor else x, dtype=np.float64)
        buf = np.empty((self.size,) + a.shape, dtype=np.float64)
        self.comm.Allgather(a, buf)
        total = buf[0].copy()
        for r in range(1, self.size):
            total = total + buf[r]
        return torch.as_tensor(total, dtype=x.dtype, device=x.device) if is_tensor else total

    def allmax(self, x: np.ndarray) -> np.ndarray:
        from mpi4py import MPI

        a = np.ascontiguousarray(x, dtype=np.float64)
        out = np.empty_like(a)
        self.comm.Allreduce(a, out, op=MPI.MAX)
        return out

    def exchange(self, rows: list[np.ndarray]) -> list[np.ndarray]:
        """Send rows[r] (k_r, ...) to rank r; returns the rows each rank sent here (same dtype and trailing
        shape).  Collective, but ranks with nothing for each other exchange only the counts."""
        from mpi4py import MPI

        me, comm = self.rank, self.comm
        rows = [np.ascontiguousarray(a) for a in rows]
        counts = np.array([len(a) for a in rows], dtype=np.int64)
        got = np.empty_like(counts)
        comm.Alltoall(counts, got)
        out = [rows[me] if r == me else np.empty((int(k),) + rows[me].shape[1:], rows[me].dtype)
               for r, k in enumerate(got)]
        others = [r for r in range(self.size) if r != me]
        reqs = [comm.Irecv(out[r], source=r, tag=13) for r in others if got[r]]
        reqs += [comm.Isend(rows[r], dest=r, tag=13) for r in others if counts[r]]
        MPI.Request.Waitall(reqs)
        return out

    def allgather(self, obj):
        return self.comm.allgather(obj)

    def gather(self, obj):
        return self.comm.gather(obj, root=0)


def choose_grid(box: np.ndarray, nprocs: int) -> tuple[int, int, int]:
    """px * py * pz = nprocs minimising a brick's surface (LAMMPS `processors * * *`)."""
    a, b, c = np.asarray(box, dtype=np.float64)
    areas = [np.linalg.norm(np.cross(b, c)), np.linalg.norm(np.cross(c, a)), np.linalg.norm(np.cross(a, b))]
    best, best_grid = None, (nprocs, 1, 1)
    for px in range(1, nprocs + 1):
        if nprocs % px:
            continue
        for py in range(1, nprocs // px + 1):
            if (nprocs // px) % py:
                continue
            pz = nprocs // px // py
            surf = areas[0] / (py * pz) + areas[1] / (px * pz) + areas[2] / (px * py)
            if best is None or surf < best - 1e-12 * best:
                best, best_grid = surf, (px, py, pz)
    return best_grid


class HostStage:
    """float64 host arrays for MPI, of tensors on any device: on a CUDA device through pinned buffers kept per
    name (reallocated only when a shape grows), so a step's exchange neither allocates nor bounces through
    pageable memory; on the CPU the tensors' own memory."""

    def __init__(self):
        self.buffers: dict[str, torch.Tensor] = {}

    def buffer(self, name: str, shape) -> np.ndarray:
        """A float64 host array of `shape` to receive into (pinned when a CUDA device is in use)."""
        n = int(np.prod(shape))
        buf = self.buffers.get(name)
        if buf is None or buf.numel() < n:
            buf = self.buffers[name] = torch.empty(max(n, 1), dtype=torch.float64,
                                                   pin_memory=torch.cuda.is_available())
        return buf[:n].numpy().reshape(shape)

    def to_host(self, name: str, t: torch.Tensor) -> np.ndarray:
        t = t.detach()
        if t.device.type != "cuda":
            return np.ascontiguousarray(t.cpu().numpy(), dtype=np.float64)
        torch.cuda.current_stream(t.device).synchronize()   # earlier uploads from the buffers have finished
        host = self.buffer(name, tuple(t.shape))
        torch.from_numpy(host).copy_(t, non_blocking=True)
        torch.cuda.current_stream(t.device).synchronize()
        return host

    def to_device(self, host: np.ndarray, like: torch.Tensor) -> torch.Tensor:
        """host (a buffer of this stage, or any array) as a tensor on like's device and dtype."""
        if like.device.type != "cuda":   # a copy: the buffer is reused by the next exchange
            return torch.tensor(host, dtype=like.dtype, device=like.device)
        return torch.from_numpy(host).to(like.device, dtype=like.dtype, non_blocking=True)


class Domain:
    """One rank's brick of a periodic cell, its ghosts and the communication plan (single system)."""

    def __init__(self, comm: Comm, box, rcut: float, skin: float, grid=None):
        self.comm = comm
        self.rcut, self.skin = float(rcut), float(skin)
        box = np.asarray(box.detach().cpu() if torch.is_tensor(box) else box, dtype=np.float64).reshape(3, 3)
        self.grid = np.array(grid if grid is not None else choose_grid(box, comm.size), dtype=np.int64)
        if int(np.prod(self.grid)) != comm.size:
            raise ValueError(f"processor grid {self.grid.tolist()} does not match {comm.size} ranks")
        self.lo, self.hi = self.brick(comm.rank)
        self.builds = 0
        self.frames = None          # set at a build (for symmetry with VerletList: None = must rebuild)
        self.ref_positions = self.ref_inv = None
        self.stage = HostStage()    # the per-step exchange's host buffers

    # ------------------------------------------------------------------ ownership
    def owners(self, positions: np.ndarray, box: np.ndarray):
        """(owner rank (N,), floor of the fractional coordinates (N, 3), wrapped fractional (N, 3))."""
        u = positions @ np.linalg.inv(box)
        fl = np.floor(u)
        s = u - fl
        ic = np.minimum(np.floor(s * self.grid).astype(np.int64), self.grid - 1).clip(min=0)
        owner = (ic[:, 0] * self.grid[1] + ic[:, 1]) * self.grid[2] + ic[:, 2]
        return owner, fl, s

    # ------------------------------------------------------------------ rebuild criterion
    def local_displacement(self, positions: torch.Tensor, box: torch.Tensor) -> float:
        """Largest displacement of a local atom since the build (serial VerletList's measure); -1: never built."""
        if self.frames is None:
            return -1.0
        if positions.shape[0] == 0:
            return 0.0
        inv = torch.linalg.inv(box)
        ds = positions @ inv - self.ref_positions @ self.ref_inv
        return float((ds @ box).norm(dim=-1).amax())

    def needs_rebuild(self, max_displacement: float, box: torch.Tensor) -> bool:
        """From the global largest displacement (every rank decides the same)."""
        if self.frames is None or max_displacement < 0:
            return True
        eye = torch.eye(3, dtype=box.dtype, device=box.device)
        eps = float(torch.linalg.matrix_norm(self.ref_inv @ box - eye))
        return 2.0 * max_displacement + (self.rcut + self.skin) * eps > self.skin

    # ------------------------------------------------------------------ rebuild
    def brick(self, rank: int):
        """Fractional bounds (lo, hi) of a rank's brick."""
        cell = np.array(np.unravel_index(rank, tuple(self.grid)), dtype=np.int64)
        return cell / self.grid, (cell + 1) / self.grid

    @staticmethod
    def span(s: np.ndarray, lo, hi, e):
        """Per atom and axis: the lowest lattice image n with s + n >= lo - e, and how many images lie within
        [lo - e, hi + e] (fractional s (k, 3); e: rcut + skin across the lattice planes)."""
        nmin = np.ceil(lo - e - s).astype(np.int64)
        return nmin, np.floor(hi + e - s).astype(np.int64) - nmin + 1

    def images(self, s: np.ndarray, e):
        """(atom index, lattice image n) of every image s + n within rcut + skin of this rank's brick."""
        nmin, count = self.span(s, self.lo, self.hi, e)
        idx = np.nonzero((count > 0).all(1))[0]
        kmax = count[idx].max(0) if idx.size else np.zeros(3, dtype=np.int64)
        out_i, out_n = [np.zeros(0, dtype=np.int64)], [np.zeros((0, 3), dtype=np.int64)]
        for off in itertools.product(*[range(int(k)) for k in kmax]):
            off = np.array(off, dtype=np.int64)
            i = idx[(off < count[idx]).all(1)]
            out_i.append(i)
            out_n.append(nmin[i] + off)
        return np.concatenate(out_i), np.concatenate(out_n)

    def rebuild(self, gid: torch.Tensor, positions: torch.Tensor, velocities: torch.Tensor, box: torch.Tensor):
        """Migrate atoms and build ghosts/edges.  Collective.

        gid (n,), positions (n, 3), velocities (n, 3): this rank's atoms before the rebuild.
        Returns (gid, positions, velocities) of the atoms this rank owns now (sorted by global id);
        afterwards self.ghost_gid, self.ghost_positions, self.center/neighbor/shift describe the list.
        """
        dev, dtype = positions.device, positions.dtype
        comm, me = self.comm, self.comm.rank
        h = box.detach().cpu().numpy()

        # 1. migration: (id, position, velocity) rows of the leavers to their new owners (ids as float64:
        # exact below 2**53)
        rows = np.concatenate([gid.cpu().numpy()[:, None], positions.detach().cpu().numpy(),
                               velocities.detach().cpu().numpy()], axis=1)
        owner, _, _ = self.owners(rows[:, 1:4], h)
        rows = np.concatenate(comm.exchange(_split(rows, owner, comm.size)))
        rows = rows[np.argsort(rows[:, 0])]
        mine, X, V = rows[:, 0].astype(np.int64), rows[:, 1:4], rows[:, 4:7]
        nlocal = mine.size

        # 2. ghosts: to each other rank, (id, position) of my atoms with an image within rcut + skin of its brick
        R = self.rcut + self.skin
        e = R * np.linalg.norm(np.linalg.inv(h), axis=0)           # |column a of h^-1|: planes a apart
        _, _, s = self.owners(X, h)
        send = []
        for r in range(comm.size):
            lo, hi = self.brick(r)
            i = np.zeros(0, dtype=np.int64)
            if r != me and (np.floor(hi + e - self.lo) >= np.ceil(lo - e - self.hi)).all():   # brick r in reach
                i = np.nonzero((self.span(s, lo, hi, e)[1] > 0).all(1))[0]
            send.append(np.concatenate([mine[i, None], X[i]], axis=1))
        got = comm.exchange(send)
        src = np.concatenate([np.full(nlocal, me)] + [np.full(len(a), r) for r, a in enumerate(got)])
        rows = np.concatenate([np.concatenate([mine[:, None], X], axis=1)] + got)
        # my atoms, then the received ones grouped by owner, each group by id: candidate images of all of them
        all_gid, all_x = rows[:, 0].astype(np.int64), rows[:, 1:4]
        _, fl, s = self.owners(all_x, h)
        cand, cand_n = self.images(s, e)
        cand_pos = torch.as_tensor((s[cand] + cand_n) @ h, dtype=torch.float64)
        nl = build_neighbor_list(cand_pos, None, R)
        c, nb = nl.center.numpy(), nl.neighbor.numpy()
        home = (cand < nlocal) & (cand_n == 0).all(1)              # my atoms at their wrapped positions
        c, nb = c[home[c]], nb[home[c]]
        c, j = cand[c], cand[nb]                                   # centre (a local index), neighbour atom
        ng = all_gid[j]
        shift = cand_n[nb] - fl[j] + fl[c]                         # on unwrapped coordinates

        # slots: local atoms (by global id), then ghost atoms grouped by owner rank (the order of `rows`)
        remote = np.unique(j[j >= nlocal])
        slot = np.where(j < nlocal, j, nlocal + np.searchsorted(remote, j))
        order = canonical_order(*(torch.from_numpy(a) for a in (c, ng, shift))).numpy()   # the serial list's order
        self.center = torch.as_tensor(c[order], device=dev)
        self.neighbor = torch.as_tensor(slot[order], device=dev)
        self.neighbor_gid = torch.as_tensor(ng[order], device=dev)
        self.shift = torch.as_tensor(shift[order], dtype=dtype, device=dev)
        self.ghost_gid = torch.as_tensor(all_gid[remote], device=dev)
        self.ghost_positions = torch.as_tensor(all_x[remote], dtype=dtype, device=dev)

        # 3. communication plan: tell each owner which of its atoms my ghost slots hold
        ghost_owner = src[remote]
        self.recv, need = {}, []                         # rank -> (first, last) ghost slot (0-based in ghosts)
        for r in range(comm.size):
            a, b = (int(k) for k in np.searchsorted(ghost_owner, [r, r + 1]))
            if b > a:
                self.recv[r] = (a, b)
            need.append(all_gid[remote[a:b]])
        asked = comm.exchange(need)
        self.send = {r: np.searchsorted(mine, g) for r, g in enumerate(asked) if g.size}

        gid_new = torch.as_tensor(mine, device=gid.device)
        pos_new = torch.as_tensor(X, dtype=dtype, device=dev)
        vel_new = torch.as_tensor(V, dtype=dtype, device=dev)
        self.ref_positions = pos_new.clone()
        self.ref_inv = torch.linalg.inv(box)
        self.frames = True
        self.builds += 1
        return gid_new, pos_new, vel_new

    # ------------------------------------------------------------------ per-step communication
    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        """Current positions of the ghost slots from their owners' local positions (n, 3)."""
        from mpi4py import MPI

        comm = self.comm.comm
        local = self.stage.to_host("local", positions)   # (waits for the last upload from "ghosts" too)
        out = self.stage.buffer("ghosts", (int(self.ghost_gid.numel()), 3))
        reqs, keep = [], []
        for r, (a, b) in self.recv.items():
            reqs.append(comm.Irecv(out[a:b], source=r, tag=11))
        for r, idx in self.send.items():
            buf = np.ascontiguousarray(local[idx])
            keep.append(buf)
            reqs.append(comm.Isend(buf, dest=r, tag=11))
        MPI.Request.Waitall(reqs)
        return self.stage.to_device(out, positions)

    def reverse(self, ghost_values: torch.Tensor, local_values: torch.Tensor) -> torch.Tensor:
        """local_values + the ghost-slot values other ranks computed for this rank's atoms (k, n, 3)-shaped
        trailing dims allowed: ghost_values (..., n_ghost, 3), local_values (..., n_local, 3)."""
        from mpi4py import MPI

        comm = self.comm.comm
        g = np.ascontiguousarray(np.moveaxis(self.stage.to_host("ghost_values", ghost_values), -2, 0))
        lead = g.shape[1:]
        bufs = {r: np.empty((idx.size,) + lead) for r, idx in self.send.items()}
        reqs, keep = [], []
        for r, buf in bufs.items():
            reqs.append(comm.Irecv(buf, source=r, tag=12))
        for r, (a, b) in self.recv.items():
            piece = np.ascontiguousarray(g[a:b])
            keep.append(piece)
            reqs.append(comm.Isend(piece, dest=r, tag=12))
        MPI.Request.Waitall(reqs)
        out = local_values
        for r in sorted(bufs):                                     # fixed order: deterministic sums
            add = torch.as_tensor(np.moveaxis(bufs[r], 0, -2), dtype=out.dtype, device=out.device)
            out = out.index_add(out.dim() - 2, torch.as_tensor(self.send[r], device=out.device), add)
        return out


def _split(rows: np.ndarray, dest: np.ndarray, n: int) -> list[np.ndarray]:
    """rows grouped by destination rank (dest (k,) in [0, n)): a list of n arrays."""
    order = np.argsort(dest, kind="stable")
    return np.split(rows[order], np.cumsum(np.bincount(dest, minlength=n))[:-1])
