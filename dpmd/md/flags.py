"""Per-step device values that the host reads a fixed number of steps later.

In sync-free mode (dpmd.md.sync_free) each step ends by queueing a small tensor of flags (rebuild soon?
anything wrong?) with the positions, and the host reads what was queued `lag` steps earlier.  On a GPU the copy goes to
pinned memory behind an event, so by the time the host asks for it the device has long produced it:
the host never waits for the step it has just queued, and the device's queue never runs dry.  On output
steps everything pending is read at once (drain), so no file is written past an unread alarm.
"""

from __future__ import annotations

import collections

import torch

from dpmd.md import host_sync

LAG = 2   # steps between queueing a step's flags and reading them


class LaggedFlags:
    def __init__(self, device: torch.device, lag: int = LAG):
        self.lag = int(lag)
        self.cuda = device.type == "cuda"
        self.pending: collections.deque = collections.deque()

    def push(self, step: int, tensors: list, tag=None) -> None:
        """Queue copies of this step's tensors (on the device); tag is host data kept with them."""
        event = None
        if self.cuda:
            host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
            for h, t in zip(host, tensors):
                h.copy_(t, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            host = [t.detach().clone() for t in tensors]
        self.pending.append((step, host, event, tag))

    def due(self, step: int, drain: bool = False) -> list:
        """[(step pushed, [numpy arrays], tag)] for what was pushed at least `lag` steps before `step` (all of it
        with drain=True), oldest first."""
        out = []
        while self.pending and (drain or self.pending[0][0] <= step - self.lag):
            pushed, host, event, tag = self.pending.popleft()
            if event is not None:
                event.synchronize()
            with host_sync.expected("lagged flags"):
                arrays = [h.numpy() for h in host]
            out.append((pushed, arrays, tag))
        return out

    def clear(self) -> None:
        self.pending.clear()
