"""Device mistakes caught without a GPU: the model, the training loop, MD (checked and sync-free, with an
ensemble's deviation) and the ASE calculator run with every tensor on a fake CUDA device.

Why not PyTorch's FakeTensorMode: on this CPU-only torch it makes cuda:0 tensors, but they hold no data and
dpmd reads data where it must (neighbour lists, chunk bounds, `sel` checks): the model's forward stops at its
first read (DataDependentOutputException, dpmd/geometry/neighbor.py:61), and `.to("cuda")` of a host tensor
fails even inside the mode ("PyTorch is not linked with support for cuda devices").  `meta` tensors hold no
data either.  So a FakeCudaTensor here holds real data on the host and says cuda:0 to Python (`.device`,
`.is_cuda`, `.numpy()`, `.cpu()`); its ops run on the host and come back as fake-CUDA tensors, with what a GPU
enforces and the CPU does not:
  - all tensors of an op on one device (0-dim host tensors excepted): a tensor made on a hard-coded or default
    (host) device meeting device tensors is CUDA's error;
  - a random draw on the device needs a device generator (torch.Generator(device=...)), and the reverse;
  - `.numpy()` of a device tensor is refused;
and it sees every copy between host and device: a blocking one (anything but non_blocking to or from pinned
memory) makes the host wait, and is reported to dpmd.md.host_sync's counter, which on the CPU cannot tell a
`.cpu()` or a `torch.tensor(host_data, device=...)` inside a step from a no-op.

What it cannot show: the CUDA and Triton kernels themselves (tests/test_cuda.py, on a GPU), the kernel
library's host copies inside its ops, timing.  With the `kernels` parameter the library's CPU kernels stand in
for its CUDA ones, so the Python around them is checked too.  functorch's jvp under these modes crashes this
torch: compress models before entering FakeCuda.
"""

from __future__ import annotations

import contextlib
import functools
import traceback
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import EXAMPLE, REPO, make_model
from dpmd import ops
from dpmd.md import host_sync
from dpmd.ops import triton_tabulate

DEVICE = torch.device("cuda", 0)
aten = torch.ops.aten
# ops that take host and device tensors together on a GPU; a host index tensor is copied over (a sync)
MIXED = {aten.copy_.default, aten._to_copy.default, aten.index.Tensor, aten.index_put_.default,
         aten.index_put.default, aten._index_put_impl_.default}


# C++ sets the current CUDA device before indexing, reading a value or moving a tensor, and a CPU-only torch
# has no CUDA device guard (torch._C._ensureCUDADeviceGuardSet does nothing there): this one does nothing,
# on device 0.  Registered only where the slot is empty, so a CUDA build keeps its own.
GUARD_SOURCE = r"""
#include <c10/core/impl/DeviceGuardImplInterface.h>
namespace {
struct FakeCudaGuard final : c10::impl::NoOpDeviceGuardImpl<c10::DeviceType::CUDA> {
  c10::Device getDevice() const override { return c10::Device(c10::DeviceType::CUDA, 0); }
  c10::Device exchangeDevice(c10::Device) const override { return getDevice(); }
};
const bool registered = [] {
  static FakeCudaGuard guard;
  auto& slot = c10::impl::device_guard_impl_registry[static_cast<size_t>(c10::DeviceType::CUDA)];
  if (slot.load() == nullptr) slot.store(&guard);
  return true;
}();
}  // namespace
"""


@functools.lru_cache(maxsize=None)
def _install_cuda_guard() -> None:
    from torch.utils.cpp_extension import load

    from dpmd.ops.build import cache_root

    folder = cache_root() / f"fake-cuda-guard-{torch.__version__.replace('+', '_')}"
    folder.mkdir(parents=True, exist_ok=True)
    source = folder / "guard.cpp"
    if not source.is_file() or source.read_text() != GUARD_SOURCE:
        source.write_text(GUARD_SOURCE)
    load(name="fake_cuda_guard", sources=[str(source)], build_directory=str(folder), is_python_module=False)


class DeviceMismatch(RuntimeError):
    """What CUDA raises for tensors on two devices (or a generator on the wrong one)."""


class FakeCudaTensor(torch.Tensor):
    """Real data on the host (`payload`), on cuda:0 to Python code (.device, .is_cuda, .numpy(), .cpu()).
    To C++ it is a `meta` tensor: the autograd engine would want a CUDA runtime for a cuda:0 one, and a
    host one would be taken for a host tensor by C++ code that makes tensors like it (x.options(), as
    autograd's formulas do); meta tells those apart, and every op still comes here first."""

    @staticmethod
    def __new__(cls, payload: torch.Tensor):
        t = torch.Tensor._make_wrapper_subclass(cls, payload.shape, strides=payload.stride(),
                                                storage_offset=payload.storage_offset(), dtype=payload.dtype,
                                                layout=payload.layout, device="meta", requires_grad=False)
        t.payload = payload
        return t

    __torch_function__ = torch._C._disabled_torch_function_impl

    # a traceable wrapper: nn.Module.to() then swaps parameters in place (identity kept, as on a GPU)
    def __tensor_flatten__(self):
        return ["payload"], None

    @staticmethod
    def __tensor_unflatten__(inner, meta, outer_size, outer_stride):
        return FakeCudaTensor(inner["payload"])

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        return _dispatch(None, func, args, kwargs or {})   # outside FakeCuda(): no bookkeeping

    def __repr__(self, **kwargs):
        return f"FakeCudaTensor({self.payload!r})"

    @property
    def device(self):
        return DEVICE

    @property
    def is_cuda(self):
        return True

    @property
    def is_cpu(self):
        return False

    def get_device(self):
        return 0

    def cpu(self, memory_format=torch.preserve_format):
        return aten._to_copy.default(self, device=torch.device("cpu"))

    def to(self, *args, copy=False, **kwargs):
        if args and isinstance(args[0], torch.Tensor):   # to(other): other's device and dtype
            args = (args[0].device, args[0].dtype) + args[1:]
        device, dtype, non_blocking, _ = torch._C._nn._parse_to(*args, **kwargs)
        if device is not None and device.type == "cpu":
            return aten._to_copy.default(self, dtype=dtype or self.dtype, device=device, non_blocking=non_blocking)
        out = self if dtype in (None, self.dtype) else torch.Tensor.to(self, dtype)
        return out.clone() if copy and out is self else out

    def new_tensor(self, data, dtype=None, device=None, requires_grad=False):
        return torch.tensor(data, dtype=dtype or self.dtype, device=device or DEVICE, requires_grad=requires_grad)

    def tolist(self):   # C++ would read the wrapper's (absent) memory; torch.Tensor.tolist as it stands is counted
        return torch.Tensor.tolist(self.payload)

    def numpy(self, *, force=False):
        raise TypeError("can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() to copy the tensor "
                        "to host memory first.")

    def __reduce_ex__(self, protocol):
        # torch.save of a device tensor: saved as its host data (a real checkpoint would say cuda:0)
        return self.payload.__reduce_ex__(protocol)


def _is_cuda(device) -> bool:
    """Is `device` the fake device (meta: what C++ made like a FakeCudaTensor)?"""
    return device is not None and torch.device(device).type in ("cuda", "meta")


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
        env.namespaces.add(func.namespace)
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


class FakeCuda:
    """`with FakeCuda() as fake:` -- cuda:0 tensors on this machine (see the module doc).  fake.transfers lists
    (kind, blocking, site) of every copy between host and device."""

    def __init__(self):
        self.pinned = weakref.WeakValueDictionary()   # storage address -> a pinned host tensor
        self.transfers: list[tuple[str, bool, str]] = []
        self.namespaces: set[str] = set()   # of the ops run ("dpmd": the kernel library's)
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
        site = _caller()
        kind = "host->device" if up else "device->host"
        self.transfers.append((kind, blocking, site))
        if blocking:   # the host waits for the device: a synchronisation, whatever the CPU counter saw
            for counter in host_sync._active:
                if not counter.reading:
                    counter.sites.append(f"blocking copy {kind} ({func.__name__}) at {site}")

    def __enter__(self):
        _install_cuda_guard()
        s = self._stack
        patches = {"is_available": lambda: True, "device_count": lambda: 1, "current_device": lambda: 0,
                   "synchronize": lambda device=None: None, "_lazy_init": lambda: None, "Event": _Event}
        for name, value in patches.items():
            s.enter_context(_patched(torch.cuda, name, value))
        s.enter_context(_patched(torch, "Generator", _Generator))
        # Triton kernels need the device's memory (tests/test_cuda.py runs them): the PyTorch tables instead
        s.enter_context(_patched(triton_tabulate, "available", lambda: False))
        # torch.tensor(data, device=...) builds on the host, then copies: let the copy reach the mode
        previous = torch._C._only_lift_cpu_tensors()
        torch._C._set_only_lift_cpu_tensors(True)
        s.callback(torch._C._set_only_lift_cpu_tensors, previous)
        s.enter_context(_Dispatch(self))
        s.enter_context(_Generators())
        return self

    def __exit__(self, *exc):
        return self._stack.__exit__(*exc)


def _caller() -> str:
    """Where a copy was asked for: the innermost frame in dpmd, else in the test."""
    frames = [f for f in traceback.extract_stack()[:-2] if f.filename != __file__ and "/torch/" not in f.filename]
    ours = [f for f in frames if "/dpmd/" in f.filename and not f.filename.endswith("host_sync.py")]
    f = (ours or frames)[-1]
    return f"{f.filename.rsplit('/dpmd/', 1)[-1] if ours else Path(f.filename).name}:{f.lineno} {f.name}"


@contextlib.contextmanager
def _patched(owner, name, value):
    old = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, old)


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


# ---------------------------------------------------------------- dpmd on the fake device

@pytest.fixture(params=["reference", "kernels"])
def path(request, monkeypatch):
    """reference: the PyTorch code (a GPU without the kernel library); kernels: the library's ops, its CPU
    kernels standing in for its CUDA ones (the Python around them is what is checked)."""
    if request.param == "kernels":
        request.getfixturevalue("lib")
        monkeypatch.setattr(ops, "has_cuda", lambda: True)
    else:
        monkeypatch.setenv("DPMD_OPS", "0")
        monkeypatch.setitem(ops._state, "loaded", None)
    return request.param


def water_frame():
    from dpmd.data import load_system

    s = load_system(EXAMPLE, type_map=["O", "H"])
    return torch.tensor(s.coord[0]).reshape(-1, 3), torch.tensor(s.atype), torch.tensor(s.box[0]).reshape(3, 3)


@pytest.mark.parametrize("compressed", [False, True], ids=["model", "compressed"])
def test_model_on_fake_cuda(path, compressed):
    from dpmd.model.compress import compress_model

    model = make_model()
    if compressed:
        model = compress_model(model, 0.9)
    coord, atype, box = water_frame()
    ref = model(coord, atype, box, atom_virial=True)
    with FakeCuda() as fake:
        model.to("cuda")
        out = model(coord.to("cuda"), atype.to("cuda"), box.to("cuda"), atom_virial=True)
        assert ("dpmd" in fake.namespaces) == (path == "kernels")
        assert {k: v.device for k, v in out.items()} == {k: DEVICE for k in ref}
        for k in ref:
            torch.testing.assert_close(out[k].cpu(), ref[k], rtol=0, atol=1e-10)


def training_input(steps: int) -> dict:
    """A small model on the example water, validated and saved along the way."""
    return {
        "model": {"type_map": ["O", "H"],
                  "descriptor": {"type": "se_e2_a", "sel": [30, 60], "rcut": 4.0, "rcut_smth": 0.5,
                                 "neuron": [4, 8, 16], "axis_neuron": 4, "type_one_side": True, "seed": 1},
                  "fitting_net": {"neuron": [16, 16], "seed": 1}},
        "learning_rate": {"type": "exp", "start_lr": 2e-3, "stop_lr": 1e-5, "decay_steps": 10},
        "loss": {"type": "ener", "start_pref_e": 0.02, "limit_pref_e": 1, "start_pref_f": 1000, "limit_pref_f": 1,
                 "start_pref_v": 0.01, "limit_pref_v": 1},
        "training": {"training_data": {"systems": [str(EXAMPLE)], "batch_size": 2},   # 2: frames batched
                     "validation_data": {"systems": [str(EXAMPLE)], "batch_size": 1, "numb_btch": 1},
                     "numb_steps": steps, "seed": 7, "disp_freq": 2, "save_freq": steps},
    }


def _to_device(tensors: dict) -> dict:
    return {k: v.to("cuda") if torch.is_tensor(v) else v for k, v in tensors.items()}


@pytest.fixture(scope="module")
def host_lcurve(tmp_path_factory):
    from dpmd.train.config import normalize_input
    from dpmd.train.trainer import Trainer

    out = tmp_path_factory.mktemp("host")
    Trainer(normalize_input(training_input(steps=2)), out_dir=out, progress=False).run()
    return np.loadtxt(out / "lcurve.out")


def test_training_loop_on_fake_cuda(tmp_path, path, monkeypatch, host_lcurve):
    """The training loop (the force loss's second derivatives, the finite-gradient check, fused Adam,
    validation, lcurve, checkpoints) with the model on the device and each batch handed over there: what
    `training.device` has to do besides moving the data.  The same numbers as on the host."""
    from dpmd.train.config import normalize_input
    from dpmd.train.trainer import Trainer

    with FakeCuda() as fake:
        trainer = Trainer(normalize_input(training_input(steps=2)), out_dir=tmp_path, progress=False)
        trainer.model.to("cuda")   # parameters keep their identity: the optimizer follows them
        for store in (trainer.train_store, trainer.valid_store):
            batch = store.batch
            monkeypatch.setattr(store, "batch", lambda i, frames, batch=batch: tuple(map(_to_device, batch(i, frames))))
        trainer.run()
        assert {p.device for p in trainer.model.parameters()} == {DEVICE}
        assert ("dpmd" in fake.namespaces) == (path == "kernels")
    np.testing.assert_allclose(np.loadtxt(tmp_path / "lcurve.out"), host_lcurve, rtol=1e-9)


def test_trainer_takes_the_device(tmp_path, request):
    """`training.device: cuda`: data, statistics, model and optimizer on the device, the host's numbers."""
    from dpmd.train.config import normalize_input
    from dpmd.train.trainer import Trainer

    cfg = training_input(steps=2)
    cfg["training"]["device"] = "cuda"
    config = normalize_input(cfg)
    host_lcurve = request.getfixturevalue("host_lcurve")
    with FakeCuda():
        trainer = Trainer(config, out_dir=tmp_path, progress=False)
        trainer.run()
        assert {p.device for p in trainer.model.parameters()} == {DEVICE}
    np.testing.assert_allclose(np.loadtxt(tmp_path / "lcurve.out"), host_lcurve, rtol=1e-9)


def ensemble(n: int) -> list:
    """n small models with different weights (the first drives the dynamics)."""
    models = [make_model() for _ in range(n)]
    with torch.no_grad():
        for k, m in enumerate(models):
            for p in m.parameters():
                p.mul_(1.0 + 0.01 * k)
    return models


MD_CASES = {   # name: (sync_free, models, Simulation keywords)
    "checked-nvt": (False, 1, dict(ensemble="nvt", thermostat={"type": "csvr", "damp": 0.05})),
    # a GPU exploration run: sync-free, the deviation of a batched ensemble (vmap, on CUDA only), NPT
    "sync-free-npt-ensemble": (None, 2, dict(ensemble="npt", thermostat={"type": "langevin", "damp": 0.05},
                                             barostat={"mode": "tri", "damp": 0.2}, pressure=[1.0, 500.0],
                                             steps=20, model_devi_freq=4)),
}


@pytest.mark.parametrize("path, case", [("kernels", "checked-nvt"), ("kernels", "sync-free-npt-ensemble"),
                                        ("reference", "sync-free-npt-ensemble")], indirect=["path"])
def test_md_on_fake_cuda(path, case):
    """MD on the device follows the host's trajectory; sync-free (what `auto` picks on CUDA) steps without
    the host waiting: no reads and no blocking copies except on output steps."""
    from dpmd.md import Simulation

    from test_md_sync_free import water

    sync_free, nmodels, kw = MD_CASES[case]
    pos, sym, box = water()
    args = dict(timestep=0.25, skin=2.0, thermo_freq=5, seed=5, log=None, **kw)
    host_run = Simulation(ensemble(nmodels), pos, sym, box, sync_free=sync_free is None, **args)
    host_run.run(8)
    with FakeCuda():
        sim = Simulation([m.to("cuda") for m in ensemble(nmodels)], pos, sym, box, sync_free=sync_free, **args)
        assert sim.sync_free == (sync_free is None) and sim.state.positions.device == DEVICE
        sim.run(2)
        with host_sync.count_host_syncs() as syncs:
            sim.run(6)
        if sim.sync_free:
            assert syncs.count == 0, syncs.sites
            assert syncs.expected["output"] >= 2   # thermo at step 5, the deviation at 4 and 8, the end
        positions, thermo = sim.state.positions.cpu(), sim.thermo()
    torch.testing.assert_close(positions, host_run.state.positions, rtol=0, atol=1e-10)
    for k, v in host_run.thermo().items():
        np.testing.assert_allclose(thermo[k], v, rtol=1e-10, atol=1e-12, err_msg=k)
    for (step, devi), (host_step, host_devi) in zip(sim.devi_history, host_run.devi_history, strict=True):
        assert step == host_step
        np.testing.assert_allclose(devi, host_devi, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("path", ["kernels"], indirect=True)
def test_md_restart_on_fake_cuda(path, tmp_path):
    """A checkpoint of a run on the device (host copies of the state, the device generator's state) restarts
    there bit for bit."""
    from dpmd.md import Simulation

    from test_md_sync_free import water

    pos, sym, box = water()
    args = dict(ensemble="nvt", thermostat={"type": "langevin", "damp": 0.05}, timestep=0.25, skin=2.0,
                thermo_freq=0, seed=5, log=None)
    with FakeCuda():
        run = Simulation(make_model().to("cuda"), pos, sym, box, **args)
        run.run(3)
        run.checkpoint(tmp_path / "checkpoint.pt")
        run.run(3)
        restarted = Simulation(make_model().to("cuda"), pos, sym, box, **args)
        restarted.restore(tmp_path / "checkpoint.pt")
        restarted.run(3)
        assert restarted.state.step == 6 and torch.equal(restarted.state.positions.cpu(), run.state.positions.cpu())


def test_ase_calculator_on_fake_cuda(path):
    from ase import Atoms

    from dpmd.calculator import DP

    coord, atype, box = water_frame()
    atoms = Atoms([["O", "H"][t] for t in atype], positions=coord.numpy(), cell=box.numpy(), pbc=True)
    model_file = REPO / "examples" / "water" / "model_small.pth"
    atoms.calc = DP(model_file)
    ref = atoms.get_forces(), atoms.get_stress(), atoms.get_potential_energy()
    with FakeCuda():
        atoms.calc = DP(model_file, device="cuda")
        assert atoms.calc.device == DEVICE
        out = atoms.get_forces(), atoms.get_stress(), atoms.get_potential_energy()
    for a, b in zip(out, ref):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-10)
