"""Sync-free force steps: the MD engine's mode on a GPU, where every value the host reads back stalls the
device's queue.

No step makes the host wait for the device, except output steps:
- the Verlet list is kept as fixed-size tables and filtered on the device into DeePMD's padded layout
  (dpmd.md.neighbors.VerletList.within_cutoff, format padded; every descriptor type takes it), which the model
  takes without reading a count (dpmd.model.forces.evaluate of a padded graph);
- each step queues one small tensor of flags (the rebuild test; lost atoms, close atoms, NaN, overflow
  beyond sel (a hybrid's entries' too, each within its own rcut), the list gone stale, the compressed model's
  tables) with the positions, and the host reads what was queued LAG steps earlier (dpmd.md.flags), by which
  time the device has long produced it;
- a list is rebuilt on the host from those LAG-step-old positions, then copied to the device without
  waiting.  So the rebuild test looks ahead: a list is asked for when an atom may come within LAG steps
  of moving skin/2, and a new list must last 2 LAG steps (a bound on how far an atom moves, from the
  fastest speed and the largest acceleration).  A skin too thin for that is a one-line error with
  `sync_free: true`; chosen by auto, the run says so in one line and goes on with the checked path.  The
  exact test still runs every step: should a list ever be used stale, the run stops.
Output steps read every pending flag first, so no file is written past an unread alarm.  An alarm reruns
the checked path on the current state, which names the atoms in the usual one-line message
("... (first seen at step N)").

Forces equal the checked path's to rounding (the padding is summed slot by slot) and, as there, do not
depend on when or from which positions the list was built (canonical order), so a restart continues bit
for bit.
"""

from __future__ import annotations

import numpy as np
import torch

from dpmd.errors import MDStopError
from dpmd.md import host_sync
from dpmd.md.flags import LaggedFlags
from dpmd.md.neighbors import VerletList
from dpmd.md.provider import CheckedForces, ForceProvider
from dpmd.md.safety import ALARMS, first_seen
from dpmd.md.state import MDState, frame_boxes
from dpmd.md.units import FTM2V
from dpmd.model import deferred
from dpmd.model.forces import DEFAULT_CHUNK_ATOMS, evaluate, sel_limits


class SyncFreeForces(ForceProvider):
    """The lagged force provider.  `checked` (its Verlet list, models, safety) names the atoms of an alarm and
    takes over when the skin is too thin for the look-ahead: an error when `strict`, else one line to `log`
    and the checked path from then on (lag 0).  dt: the time step (ps), for the look-ahead."""

    def __init__(self, checked: CheckedForces, device: torch.device, dt: float, strict: bool = True, log=print):
        self.checked, self.dt, self.strict, self.log = checked, dt, strict, log
        self.active = True
        self.flags = LaggedFlags(device)
        self.host_list = VerletList(checked.verlet.rcut, checked.verlet.skin)   # built here, adopted by verlet
        self.reset()

    @property
    def lag(self) -> int:
        return self.flags.lag if self.active else 0

    def reset(self) -> None:
        """Forget the lists and pending flags (a restore, or an alarm: the checked path builds its own list)."""
        self.requests: dict[int, tuple] = {}   # frame -> (step, positions, box, reach) of the flag asking for a list
        self.generation: list[int] = []        # per frame: builds of its list (each flag records the ones it saw)
        self.flags.clear()
        self.checked.reset()

    def graph(self, state: MDState) -> dict:
        return self.checked.edge_graph(state)[0] if self.active else self.checked.graph(state)

    def __call__(self, state: MDState) -> MDState:
        if not self.active:
            return self.checked(state)
        checked, verlet = self.checked, self.checked.verlet
        for pushed, arrays, generation in self.flags.due(state.step):
            self._read(state, pushed, arrays, generation)
        if len(self.generation) != state.nframes:
            with host_sync.expected("setup"):   # the run's first step: types, and a list of the positions now
                self._setup(state)
        elif self.requests:
            thin = self._rebuild(state)
            if thin:
                if self.strict:
                    checked.safety.skin_too_thin(state.step, thin)
                return self._give_up(state, thin)
        nf, n, model = state.nframes, state.natoms, checked.models[0]
        device = state.positions.device
        # the model's slots (one block for every type where its descriptor mixes types); overflow also beyond a
        # hybrid's entries' sel, each within its own rcut
        nl = verlet.within_cutoff(state.positions, state.box, "padded", model.sel, model.descriptor.mixed_types,
                                  sel_limits(model))
        overflow = nl.overflow
        dmin2 = nl.d2.amin() if nl.d2.numel() else nl.d2.new_tensor(float("inf"))   # (an empty slot is beyond rcut)
        graph = {"rows": self.rows, "row_chunk": DEFAULT_CHUNK_ATOMS, "row_type_counts": self.row_type_counts,
                 "edge_vec": nl.vec, "neighbor": nl.neighbor, "atype": state.atype.reshape(-1),
                 "box": frame_boxes(state), "natoms": n,
                 "batch": torch.arange(nf, device=device).repeat_interleave(n), **checked.params}
        with deferred.collect() as model_flags:
            out = evaluate(model, graph)
        state.forces = out["force"].reshape(nf, n, 3)
        state.energy = out["energy"]
        state.virial = out["virial"]
        d, eps = verlet.drift(state.positions, state.box)
        speed = state.velocities.norm(dim=-1).amax(dim=1)
        accel = (state.forces.norm(dim=-1) * FTM2V / state.masses).amax(dim=1)
        stale = verlet.outgrown(d, eps)   # the list used now may miss a neighbour
        ahead = verlet.outgrown(d + self.reach(self.flags.lag, speed, accel),
                                eps + 2 * self.flags.lag * (eps - self.eps).abs())
        self.eps = eps
        # in ALARMS order
        alarms = torch.stack([~torch.isfinite(state.positions).all(), dmin2 < checked.safety.min_distance ** 2,
                              ~torch.isfinite(state.energy).all(), overflow.any(), stale.any(),
                              torch.stack(model_flags).any() if model_flags else overflow.new_zeros(())])
        dtype = state.positions.dtype
        values = torch.cat([ahead.to(dtype), alarms.to(dtype), speed, accel])
        self.flags.push(state.step, [values, state.positions, frame_boxes(state)], list(self.generation))
        return state

    def drain(self, state: MDState) -> None:
        """Read everything pending (output steps)."""
        for pushed, arrays, generation in self.flags.due(state.step, drain=True):
            self._read(state, pushed, arrays, generation)

    def reach(self, steps: int, speed, accel):
        """How far an atom may move in `steps` steps: t v + t^2 a / 2 of the fastest atom and the largest
        acceleration, with a factor 1.5 for the change of acceleration and thermostat kicks."""
        t = steps * self.dt
        return 1.5 * (t * speed + 0.5 * t * t * accel)

    def _give_up(self, state: MDState, why: str) -> MDState:
        """Continue with the checked path (sync_free: auto, and a skin too thin for its look-ahead)."""
        self.drain(state)
        self.active = False
        self.checked.reset()
        self.log(f"step {state.step}: {why}; continuing without sync-free stepping")
        return self.checked(state)

    def _read(self, state: MDState, pushed: int, arrays: list, generation: list) -> None:
        nf = state.nframes
        values, positions, box = arrays
        alarms = [name for name, on in zip(ALARMS, values[nf:nf + len(ALARMS)]) if on]
        if alarms:
            self._alarm(state, pushed, alarms)
        speed, accel = values[nf + len(ALARMS):nf + len(ALARMS) + nf], values[nf + len(ALARMS) + nf:]
        for f in range(nf):   # a flag measured against a list since rebuilt says nothing
            if values[f] and f < len(self.generation) and generation[f] == self.generation[f]:
                self.requests[f] = (pushed, positions[f], box[f], float(self.reach(2 * self.flags.lag, speed[f], accel[f])))

    def _alarm(self, state: MDState, pushed: int, alarms: list) -> None:
        """The checked path on the current state names the atoms; if the condition has gone by now, the
        flag itself is the message."""
        self.reset()   # the checked path builds its own list on the device; these tables are done with
        try:
            self.checked(state)
        except MDStopError as err:
            raise first_seen(err, pushed) from None
        self.checked.safety.alarm(state.step, alarms, pushed)

    def _setup(self, state: MDState) -> None:
        """Row order (atoms grouped by type, as the fitting nets take them) and the first lists."""
        nf, n = state.nframes, state.natoms
        atype = state.atype.reshape(-1)
        self.rows = torch.argsort(atype, stable=True)
        self.row_type_counts = [torch.bincount(atype.index_select(0, self.rows[r:r + DEFAULT_CHUNK_ATOMS]),
                                               minlength=self.checked.models[0].ntypes).tolist()
                                for r in range(0, nf * n, DEFAULT_CHUNK_ATOMS)]
        self.host_rows, self.host_atype = self.rows.cpu(), atype.cpu()
        self.eps = torch.zeros(nf, dtype=state.positions.dtype, device=state.positions.device)
        self.generation = [0] * nf
        self.host_list.frames = None
        box = frame_boxes(state).cpu().numpy()
        self.requests = {f: (state.step, p, box[f], 0.0) for f, p in enumerate(state.positions.detach().cpu().numpy())}
        self._rebuild(state)

    def _rebuild(self, state: MDState) -> str:
        """New lists for the frames asked for, built on the host from the positions that came with the flag
        that asked (a few steps old: the look-ahead covers that), then copied to the device without waiting.
        Returns why the skin is too thin for that, or ""."""
        nf, verlet, dtype = state.nframes, self.checked.verlet, state.positions.dtype
        frames = sorted(self.requests)
        positions = torch.zeros(state.positions.shape, dtype=dtype)
        box = torch.zeros(nf, 3, 3, dtype=dtype)
        for f in frames:
            step, p, b, moved = self.requests[f]
            if not np.isfinite(p).all():   # (a cell list of NaN positions is undefined)
                bad = [(f, int(i)) for i in np.nonzero(~np.isfinite(p).all(-1))[0]]
                self.checked.safety.lost_atoms(state.step, bad, seen=step)
            if 2.0 * moved > verlet.skin:
                return (f"skin {verlet.skin} Å is too thin for sync-free stepping: atoms may move "
                        f"{moved:.3f} Å in the {2 * self.flags.lag} steps a new list must last")
            positions[f], box[f] = torch.from_numpy(np.array(p)), torch.from_numpy(np.array(b))
        with host_sync.expected("host rebuild"):   # host tensors only (the counter cannot tell them apart)
            self.host_list.build(positions, box if state.box is not None else None, frames)
            self.host_list.pad(self.host_rows, self.host_atype)
        verlet.adopt(self.host_list, state.positions.device)
        for f in frames:
            self.generation[f] += 1
            self.eps[f] = 0.0
        self.requests = {}
        return ""
