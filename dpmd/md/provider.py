"""Force providers: what the integrator calls for the driving model's forces (velocity_verlet's force_fn).

One interface, three providers that differ in when the host reads the safety flags:
- CheckedForces (here): lag 0, every flag read in the step that raised it (two host reads a step);
- SyncFreeForces (dpmd.md.sync_free): flags queued on the device and read LAG steps later;
- DomainForces (dpmd.md.parallel): MPI, the local atoms and their ghosts, flags summed over the ranks.
Each turns what it found into a stop through dpmd.md.safety, so the messages are the same.
"""

from __future__ import annotations

import torch

from dpmd.errors import NeighborOverflowError
from dpmd.md.neighbors import VerletList
from dpmd.md.safety import Safety
from dpmd.md.state import MDState, frame_boxes
from dpmd.model.forces import evaluate


class ForceProvider:
    """provider(state) sets state.forces (F, N, 3), energy (F,) and virial (F, 3, 3) of the driving model at
    state.positions/box, and stops the run (MDStopError) on a safety flag, `lag` steps after the step
    that raised it."""

    lag = 0

    def __call__(self, state: MDState) -> MDState:
        raise NotImplementedError

    def drain(self, state: MDState) -> None:
        """Read every pending flag (before an output step writes anything)."""

    def reset(self) -> None:
        """Forget the neighbour lists (the state was replaced: a restore)."""

    def graph(self, state: MDState) -> dict:
        """The driving model's graph at state's positions, which the deviation's models share (MPI's deviation
        goes through DomainForces.evaluate instead)."""
        raise NotImplementedError


class CheckedForces(ForceProvider):
    """Lag 0: a Verlet list filtered to rcut, evaluate(), and every safety check read at once.

    models[0] drives; params its graph's fparam / aparam; bias None or bias(models, graph, out) -> out."""

    def __init__(self, models: list, params: dict, verlet: VerletList, safety: Safety, bias=None):
        self.models, self.params, self.verlet, self.safety, self.bias = models, params, verlet, safety, bias
        self.last_graph = None

    def __call__(self, state: MDState) -> MDState:
        nf, n, safety = state.nframes, state.natoms, self.safety
        need = self.verlet.needs_rebuild(state.positions, state.box)
        lost = ~torch.isfinite(state.positions).all(dim=-1)
        flags = torch.cat([need, lost.any(dim=1)]).tolist()          # one host sync
        if any(flags[nf:]):
            safety.lost_atoms(state.step, lost.nonzero().tolist())
        if any(flags[:nf]):
            self.verlet.build(state.positions, state.box, [f for f in range(nf) if flags[f]])
        graph, d2 = self.edge_graph(state)
        center, neighbor = graph["center"], graph["neighbor"]
        try:
            out = evaluate(self.models[0], graph)
            if self.bias is not None:
                out = self.bias(self.models, graph, out)
        except NeighborOverflowError as err:
            safety.overflow(state.step, err)
        self.last_graph = graph
        state.forces = out["force"].reshape(nf, n, 3)
        state.energy = out["energy"]
        state.virial = out["virial"]
        limit2 = safety.min_distance ** 2
        dmin2 = d2.min() if d2.numel() else torch.tensor(float("inf"), dtype=d2.dtype, device=d2.device)
        # one host sync
        too_close, bad_energy = torch.stack([dmin2 < limit2, ~torch.isfinite(state.energy).all()]).tolist()
        if too_close:
            # each pair once (the list holds i->j and j->i)
            close = ((d2 < limit2) & (center <= neighbor)).nonzero().reshape(-1)
            safety.too_close(state.step, [(int(center[e]) // n, int(center[e]) % n, int(neighbor[e]) % n,
                                           float(d2[e]) ** 0.5) for e in close[:10]])
        if bad_energy:
            bad = ~torch.isfinite(state.forces).all(-1)
            if out.get("atom_energy") is not None:
                bad |= ~torch.isfinite(out["atom_energy"].reshape(nf, n))
            safety.bad_energy(state.step, bad.nonzero().tolist())
        return state

    def edge_graph(self, state: MDState):
        """The driving model's graph of the Verlet list filtered to rcut, and the edges' squared lengths."""
        nf, n = state.nframes, state.natoms
        nl = self.verlet.within_cutoff(state.positions, state.box)
        graph = {"coord": state.positions.reshape(-1, 3), "atype": state.atype.reshape(-1),
                 "batch": torch.arange(nf, device=state.positions.device).repeat_interleave(n),
                 "box": frame_boxes(state), "center": nl.center, "neighbor": nl.neighbor, "shift": nl.shift,
                 "natoms": n, "edge_vec": nl.vec, **self.params}
        return graph, nl.d2

    def reset(self) -> None:
        self.verlet.frames = None
        self.last_graph = None

    def graph(self, state: MDState) -> dict:
        if self.last_graph is None:   # (nothing evaluated since a restore)
            self.verlet.build(state.positions, state.box)
            self.last_graph = self.edge_graph(state)[0]
        return self.last_graph
