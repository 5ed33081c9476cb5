"""Checks whose answer the caller reads later.

A model's safety checks (e.g. an edge outside a compressed model's tables) normally read a flag from the
device and raise at once.  On a GPU that read stalls the stream, so the MD engine evaluates inside
`collect()`: the model then records the flag tensor here instead, and the engine reads all of a step's
flags together a few steps later (dpmd.md.flags).  Outside `collect()`, record() returns False and the
caller checks at once, as before.
"""

from __future__ import annotations

import contextlib
import threading

import torch

_local = threading.local()


@contextlib.contextmanager
def collect():
    """Within this block record() keeps flags (0-d bool tensors) in the yielded list."""
    previous = getattr(_local, "flags", None)
    flags: list[torch.Tensor] = []
    _local.flags = flags
    try:
        yield flags
    finally:
        _local.flags = previous


def record(flag: torch.Tensor) -> bool:
    """Keep `flag` for the collecting caller; False when nobody collects (then check it yourself)."""
    flags = getattr(_local, "flags", None)
    if flags is None:
        return False
    flags.append(flag.reshape(()))
    return True
