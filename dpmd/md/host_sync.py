"""Count the places where a step would make the host wait for the device (a "host synchronisation").

On a GPU, reading a tensor's value on the host (`.item()`, `.tolist()`, `bool(t)`, `int(t)`, `.numpy()`,
a copy to the CPU) or calling an op whose output size depends on the data (`nonzero`, boolean-mask
indexing, `unique`, `bincount`, `repeat_interleave` by a tensor) stalls the stream until the device
has caught up.  On the CPU these cost nothing, which is why they are easy to add by accident; this
counter finds them on any device, so the engine's "no synchronisation except on output steps" can be
tested here.

    with count_host_syncs() as syncs:
        sim.run(10)
    syncs.count, syncs.sites   # how many, and where (op and the innermost dpmd frame)
    syncs.expected             # {kind: blocks} that read on purpose (rebuilds, outputs, lagged flags)

What the CPU cannot show is a tensor made on the device from host data (`torch.tensor(x, device=...)`: a
copy the host waits for); the engine fills such values in on the device instead (dpmd.md.state.per_frame).
`torch.cuda.set_sync_debug_mode("warn")` is the same check on a real GPU.
"""

from __future__ import annotations

import contextlib
import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_aten = torch.ops.aten
# ops whose output size depends on tensor values (the device must report it before the host can go on),
# or whose result is a host value (a scalar read, an error check, a comparison)
DATA_DEPENDENT = {_aten.nonzero.default, _aten.masked_select.default, _aten._unique2.default,
                  _aten.unique_dim.default, _aten.unique_consecutive.default, _aten.bincount.default,
                  _aten.repeat_interleave.Tensor, _aten._local_scalar_dense.default, _aten.nonzero_static.default,
                  _aten._linalg_check_errors.default, _aten.equal.default, _aten.is_nonzero.default,
                  _aten.allclose.default}
_READS = ("tolist", "item", "numpy", "__bool__", "__int__", "__float__", "__index__")


def _site() -> str:
    """The innermost frame inside dpmd (else the innermost frame), as file:line function."""
    frames = traceback.extract_stack()[:-1]
    ours = [f for f in frames if "/dpmd/" in f.filename and not f.filename.endswith("host_sync.py")]
    f = (ours or frames)[-1]
    return f"{f.filename.rsplit('/dpmd/', 1)[-1]}:{f.lineno} {f.name}"


_active: list = []   # the counters now counting (innermost last)


@contextlib.contextmanager
def expected(kind: str):
    """A block that reads from the device on purpose (kind: "rebuild", "output", "lagged flags": a value
    the device produced steps ago, see dpmd.md.flags).  Counted apart: counter.expected[kind] blocks."""
    for c in _active:
        c.reading += 1
        c.expected[kind] = c.expected.get(kind, 0) + 1
    try:
        yield
    finally:
        for c in _active:
            c.reading -= 1


class _Counter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.sites: list[str] = []
        self.reading = 0   # inside a patched Tensor read or an expected() block: not counted (again)
        self.expected: dict[str, int] = {}

    @property
    def count(self) -> int:
        return len(self.sites)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in DATA_DEPENDENT and not self.reading:
            self.sites.append(f"{func.__name__} at {_site()}")
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def count_host_syncs():
    """A counter of host synchronisations (see the module doc) inside the block."""
    counter = _Counter()
    originals = {name: getattr(torch.Tensor, name) for name in _READS}

    def patched(name):
        original = originals[name]

        def read(self, *args, **kwargs):
            if counter.reading:
                return original(self, *args, **kwargs)
            counter.sites.append(f"Tensor.{name} at {_site()}")
            counter.reading += 1
            try:
                return original(self, *args, **kwargs)
            finally:
                counter.reading -= 1
        return read

    for name in _READS:
        setattr(torch.Tensor, name, patched(name))
    _active.append(counter)
    try:
        with counter:
            yield counter
    finally:
        _active.remove(counter)
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)
