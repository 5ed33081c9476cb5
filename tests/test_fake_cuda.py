"""Device mistakes caught without a GPU: the model, a training step, MD (checked and sync-free) and the ASE
calculator run with every tensor on a fake CUDA device.

Why a fake device of our own and not PyTorch's FakeTensorMode: FakeTensorMode does make cuda:0 tensors on
this CPU-only torch, but they hold no data, and dpmd reads data everywhere it must (neighbour lists, the
chunk bounds in dpmd.model.forces, `sel` checks): the model's forward stops at its first `.item()`
(DataDependentOutputException in dpmd/geometry/neighbor.py), long before anything device-related.  The
`meta` device has the same limit.  So here a FakeCudaTensor holds real data on the host and tells everyone
(`.device`, `.is_cuda`, `.numpy()`) that it is on cuda:0; its ops run on the host and their results come back
as fake-CUDA tensors.  Per op it enforces what a GPU enforces and the CPU does not:
  - every tensor of an op on one device (0-dim host tensors excepted): a tensor made on a hard-coded or
    default (CPU) device meeting device tensors is the error CUDA raises;
  - a random draw on the device needs a device generator (torch.Generator(device=...));
  - `.numpy()` of a device tensor is refused;
and it sees every copy between host and device: a blocking one (not non_blocking into or out of pinned
memory) is a host synchronisation, reported to dpmd.md.host_sync's counter, which on the CPU cannot tell a
`.cpu()` or `torch.tensor(host_data, device=...)` inside a step from a no-op.

What a fake device cannot show: the CUDA kernels themselves (tests/test_cuda.py, on a GPU), the kernel
library's own host copies inside an op, and timing.  The kernel library's ops run here as its CPU kernels
(parametrised `kernels`: the library is told it has CUDA), so the Python around them is checked too.
"""

from __future__ import annotations

import contextlib
import weakref

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import EXAMPLE, REPO, make_model
from dpmd import ops
from dpmd.md import host_sync

DEVICE = torch.device("cuda", 0)
aten = torch.ops.aten
# ops that take host and device tensors together on a GPU; a host index tensor is copied over (a sync)
MIXED = {aten.copy_.default, aten._to_copy.default, aten.index.Tensor, aten.index_put_.default,
         aten.index_put.default, aten._index_put_impl_.default}


class DeviceMismatch(RuntimeError):
    pass


class FakeCudaTensor(torch.Tensor):
    """Real data on the host (`payload`), on cuda:0 to everything that asks."""

    @staticmethod
    def __new__(cls, payload: torch.Tensor):
        t = torch.Tensor._make_wrapper_subclass(cls, payload.shape, strides=payload.stride(),
                                                storage_offset=payload.storage_offset(), dtype=payload.dtype,
                                                layout=payload.layout, device=DEVICE, requires_grad=False)
        t.payload = payload
        return t

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        return _dispatch(None, func, args, kwargs or {})   # outside fake_cuda(): no bookkeeping

    def __repr__(self):
        return f"FakeCudaTensor({self.payload!r})"

    def __reduce_ex__(self, protocol):
        # torch.save of a device tensor: saved as its host data (a real checkpoint would say cuda:0)
        return self.payload.__reduce_ex__(protocol)


def _is_cuda(device) -> bool:
    return device is not None and torch.device(device).type == "cuda"


def _dispatch(env, func, args, kwargs):
    """Run `func` on the host data, with the checks a GPU makes; `env`: the FakeCuda doing the bookkeeping."""
    if func is aten.is_pinned.default:
        return env is not None and env.is_pinned(args[0])
    if func is aten._pin_memory.default:
        out = args[0].clone()
        if env is not None:
            env.pinned[out.untyped_storage().data_ptr()] = out
        return out
    flat = pytree.arg_tree_leaves(*args, **kwargs)
    tensors = [a for a in flat if isinstance(a, torch.Tensor)]
    on_device = [isinstance(t, FakeCudaTensor) for t in tensors]
    target = kwargs.get("device")
    if func not in MIXED and any(on_device):
        host = [t for t, d in zip(tensors, on_device) if not d and t.dim() > 0]
        if host:
            raise DeviceMismatch(f"{func}: expected all tensors to be on the same device, but found at least two "
                                 f"devices, cuda:0 and cpu (a host tensor of shape {tuple(host[0].shape)})")
    if env is not None:
        env.note_transfer(func, args, kwargs, tensors, on_device)
    unwrap = lambda a: a.payload if isinstance(a, FakeCudaTensor) else a  # noqa: E731
    kw = {k: unwrap(v) for k, v in kwargs.items()}
    if _is_cuda(target):
        kw["device"] = torch.device("cpu")
    pin = kw.pop("pin_memory", None)
    out = func(*pytree.tree_map(unwrap, args), **kw)
    if pin and env is not None:
        env.pinned[out.untyped_storage().data_ptr()] = out
    if func is aten.copy_.default:
        return args[0]
    device_out = _is_cuda(target) if target is not None else any(on_device)
    if not device_out:
        return out
    # in-place and out= ops hand back an input: give back its wrapper, not a new one
    given = {id(t.payload): t for t in tensors if isinstance(t, FakeCudaTensor)}
    wrap = lambda o: given[id(o)] if id(o) in given else FakeCudaTensor(o)  # noqa: E731
    return pytree.tree_map(lambda o: wrap(o) if isinstance(o, torch.Tensor) else o, out)


class _Dispatch(TorchDispatchMode):
    def __init__(self, env):
        super().__init__()
        self.env = env

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return _dispatch(self.env, func, args, kwargs or {})


class _Generators(TorchFunctionMode):
    """A random draw on the device with a host generator, or the reverse: CUDA refuses it.  Checked at the
    Python call, where the generator object is still the one the caller made."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        gen = kwargs.get("generator")
        if gen is not None:
            tensors = [a for a in pytree.arg_tree_leaves(*args, **kwargs) if isinstance(a, torch.Tensor)]
            device = kwargs.get("device") or (tensors[0].device if tensors else "cpu")
            want, have = ("cuda" if _is_cuda(device) else "cpu"), ("cuda" if getattr(gen, "on_cuda", False) else "cpu")
            if want != have:
                raise DeviceMismatch(f"{getattr(func, '__name__', func)}: Expected a '{want}' device type for "
                                     f"generator but found '{have}'")
        return func(*args, **kwargs)


class _Generator(torch.Generator):
    """torch.Generator(device="cuda") on a CPU-only torch: a host generator that knows where it belongs."""

    def __new__(cls, device="cpu"):
        g = super().__new__(cls)
        g.on_cuda = _is_cuda(device)
        return g

    @property
    def device(self):
        return DEVICE if self.on_cuda else torch.device("cpu")


class _Event:
    def record(self, stream=None):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True


def _indexed(device):
    """'cuda' -> cuda:0: C++ asks the CUDA runtime, absent here, for a device's index when none is given."""
    if isinstance(device, (str, torch.device)) and _is_cuda(device) and torch.device(device).index is None:
        return DEVICE
    return device


class FakeCuda:
    """`with FakeCuda() as fake:` -- cuda:0 tensors on this machine (see the module doc).  fake.transfers lists
    (kind, blocking, site) of every copy between host and device."""

    def __init__(self):
        self.pinned = weakref.WeakValueDictionary()   # storage address -> a pinned host tensor
        self.transfers: list[tuple[str, bool, str]] = []
        self._stack = contextlib.ExitStack()

    def is_pinned(self, t: torch.Tensor) -> bool:
        return not isinstance(t, FakeCudaTensor) and t.untyped_storage().data_ptr() in self.pinned

    def note_transfer(self, func, args, kwargs, tensors, on_device) -> None:
        if func is aten.copy_.default:
            dst, src = args[0], args[1]
            if isinstance(dst, FakeCudaTensor) == isinstance(src, FakeCudaTensor):
                return
            up = isinstance(dst, FakeCudaTensor)
            host = src if up else dst
            blocking = not (kwargs.get("non_blocking", args[2] if len(args) > 2 else False) and self.is_pinned(host))
        elif func is aten._to_copy.default:
            if "device" not in kwargs or _is_cuda(kwargs["device"]) == isinstance(args[0], FakeCudaTensor):
                return
            up = _is_cuda(kwargs["device"])
            blocking = not (kwargs.get("non_blocking") and self.is_pinned(args[0]))
        elif func in MIXED and any(on_device) and not all(on_device):
            up, blocking = True, True   # host index tensors of a device tensor: copied over before the op
        else:
            return
        site = host_sync._site()
        kind = "host->device" if up else "device->host"
        self.transfers.append((kind, blocking, site))
        if blocking:   # the host waits for the device: a synchronisation, whatever the CPU counter saw
            for counter in host_sync._active:
                if not counter.reading:
                    counter.sites.append(f"blocking copy {kind} ({func.__name__}) at {site}")

    def __enter__(self):
        s = self._stack
        patches = {"is_available": lambda: True, "device_count": lambda: 1, "current_device": lambda: 0,
                   "synchronize": lambda device=None: None, "_lazy_init": lambda: None, "Event": _Event}
        for name, value in patches.items():
            s.enter_context(_patched(torch.cuda, name, value))
        s.enter_context(_patched(torch, "Generator", _Generator))
        for owner, name in ((torch, "tensor"), (torch, "as_tensor"), (torch.Tensor, "to"), (torch.Tensor, "cuda")):
            s.enter_context(_patched(owner, name, _with_index(getattr(owner, name))))
        # torch.tensor(data, device=...) builds on the host, then copies: let the copy reach the mode
        previous = torch._C._only_lift_cpu_tensors()
        torch._C._set_only_lift_cpu_tensors(True)
        s.callback(torch._C._set_only_lift_cpu_tensors, previous)
        s.enter_context(_Dispatch(self))
        s.enter_context(_Generators())
        return self

    def __exit__(self, *exc):
        return self._stack.__exit__(*exc)


@contextlib.contextmanager
def _patched(owner, name, value):
    old = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, old)


def _with_index(fn):
    def call(*args, **kwargs):
        args = tuple(_indexed(a) for a in args)
        if "device" in kwargs:
            kwargs["device"] = _indexed(kwargs["device"])
        return fn(*args, **kwargs)
    return call


def host(x):
    """A fake-CUDA result as a plain host tensor (no bookkeeping)."""
    return x.payload if isinstance(x, FakeCudaTensor) else x


# ---------------------------------------------------------------- the harness itself

def test_fake_device_catches_what_a_gpu_would():
    with FakeCuda() as fake:
        x = torch.ones(4, device="cuda")
        assert x.is_cuda and x.device == DEVICE and (x * 2).device == DEVICE
        with pytest.raises(DeviceMismatch):
            x + torch.zeros(4)                                   # a tensor made on the default (host) device
        assert float((x + torch.tensor(1.0)).sum()) == 8.0        # a 0-dim host tensor is a scalar: allowed
        with pytest.raises(TypeError, match="cuda"):
            x.numpy()
        with pytest.raises(DeviceMismatch, match="generator"):
            torch.randn(3, generator=torch.Generator(), device="cuda")
        torch.randn(3, generator=torch.Generator(device="cuda"), device="cuda")
        with host_sync.count_host_syncs() as c:
            pinned = torch.empty(4, pin_memory=True)
            pinned.copy_(x, non_blocking=True)                    # device -> pinned host, queued: no sync
            torch.arange(4.0).pin_memory().to("cuda", non_blocking=True)
        assert c.count == 0, c.sites
        with host_sync.count_host_syncs() as c:
            x.cpu()                                               # the host waits for the device
            torch.tensor([1.0, 2.0], device="cuda")               # host data copied over, the host waits
        assert c.count == 2, c.sites
    assert [blocking for _, blocking, _ in fake.transfers] == [False, False, True, True]
