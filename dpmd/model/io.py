"""Saving and loading models: dpmd's own files, dpmd training checkpoints, and DeePMD-kit (PyTorch
backend) checkpoints.

Model files are untrusted input: nothing is unpickled (torch.load with weights_only=True only; a frozen
file's TorchScript code is never compiled or run: its weights are read by a restricted unpickler into a
DeepPot built from its metadata), a zip archive's CRCs and the weights checksum recorded at save time are
verified, and a file that is empty, truncated, corrupted or would run code is a one-line DpmdError naming it.
"""

from __future__ import annotations

import ast
import collections
import contextlib
import json
import pickle
import re
import sys
import warnings
import zipfile
from pathlib import Path
from typing import NamedTuple

import torch

from dpmd.errors import ConfigError, DpmdError
from dpmd.files import atomic_write
from dpmd.model.deeppot import DeepPot

FORMAT = "dpmd-model"
TRAINING_CHECKPOINT = "dpmd-checkpoint"  # written by dpmd.train.checkpoint (not imported: layers import downwards)
EXPECTED = "expected a frozen dpmd model (dpmd freeze), a dpmd training checkpoint or a DeePMD-kit PyTorch checkpoint"


def _first_line(err: BaseException) -> str:
    return next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)


def atomic_torch_save(obj, path) -> None:
    """torch.save to a temp file in the same directory, then rename: never a half-written file."""
    atomic_write(path, lambda fh: torch.save(obj, fh))


def _check_archive(path: Path, expected: str) -> bool:
    """Is path a zip archive (what torch.save and torch.jit.save write)?  An empty file, or an archive that
    is truncated or fails its CRC checks (torch's own reader checks neither), is refused before anything
    reads it."""
    if path.stat().st_size == 0:
        raise DpmdError(f"{path}: empty file (0 bytes); {expected}")
    with open(path, "rb") as fh:
        if fh.read(4) != b"PK\x03\x04":
            return False  # torch.load's legacy format, or not a PyTorch file at all
    try:
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()
    except Exception as err:  # BadZipFile, EOFError, zlib.error, ...: all mean the archive is damaged
        raise DpmdError(f"{path}: truncated or corrupt archive ({_first_line(err)}); {expected}") from None
    if bad is not None:
        raise DpmdError(f"{path}: corrupt: archive entry {bad} fails its CRC check (damaged after it was written)")
    return True


def read_torch_file(path, expected: str):
    """torch.load(weights_only=True) of an untrusted file: its plain data (tensors, containers, numbers,
    strings), or a one-line DpmdError naming the file and what was expected."""
    path = Path(path)
    if not path.is_file():
        raise DpmdError(f"{path}: file not found; {expected}")
    is_zip = _check_archive(path, expected)
    try:
        with warnings.catch_warnings():  # torch warns about odd pickle protocols of garbage files
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        code = re.search(r"GLOBAL ([\w.]+)", str(err))  # weights_only refused a reference to Python code
        if code:
            raise DpmdError(f"{path}: refers to the Python object {code[1]}: loading it would run code; "
                            f"refusing") from None
        # the legacy reader's errors on foreign bytes say nothing useful ("101", "Unsupported operand 203")
        reason = _first_line(err) if is_zip else "not a PyTorch file"
        raise DpmdError(f"{path}: unreadable ({reason}); {expected}") from None


def save_model(model: DeepPot, path, *, deployable: bool = True) -> None:
    """Write one self-contained model file.

    deployable (default): a TorchScript archive (see dpmd.model.export) holding the weights,
    statistics and the `dpmd.json` metadata (type_map, rcut, sel, model config, versions, the
    weights' checksum); `load_model` reads it back as a DeepPot, `torch.jit.load` /
    `torch::jit::load` as the inference module.  deployable=False: the version-1 torch.save dict
    (Python only).
    """
    from dpmd.model.export import METADATA_FILE, script_model, weights_checksum

    if not deployable:
        state = model.state_dict()
        atomic_torch_save({"format": FORMAT, "version": 1, "config": model.config, "state_dict": state,
                           "weights_sha256": weights_checksum(state)}, path)
        return
    scripted = script_model(model)
    extra = {METADATA_FILE: scripted.metadata}
    with _no_jit_deprecation():
        atomic_write(path, lambda fh: torch.jit.save(scripted, fh, _extra_files=extra))


@contextlib.contextmanager
def _no_jit_deprecation():
    """torch >= 2.10 flags torch.jit.* as deprecated; the archive is still what libtorch (C++) loads."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\..*deprecated", category=DeprecationWarning)
        yield


def _is_torchscript(path: Path) -> bool:
    """TorchScript archives are zip files with a code/ folder (torch.save zips have none)."""
    try:
        with zipfile.ZipFile(path) as zf:
            return any("/code/" in name for name in zf.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def read_metadata(path) -> dict:
    """The metadata of a frozen (TorchScript) model file, without loading its weights or code."""
    from dpmd.model.export import METADATA_FILE

    path = Path(path)
    try:
        with zipfile.ZipFile(path) as zf:
            name = next((n for n in zf.namelist() if n.endswith("/extra/" + METADATA_FILE)), None)
            if name is None:
                raise DpmdError(f"{path}: no {METADATA_FILE} in the archive: not a frozen dpmd model")
            return json.loads(zf.read(name))
    except (zipfile.BadZipFile, OSError, ValueError) as err:
        raise DpmdError(f"{path}: not a frozen dpmd model ({_first_line(err)})") from None


def _mismatch(err: BaseException) -> str:
    """The specific line of load_state_dict's multi-line error (e.g. the size mismatch)."""
    return next((ln.strip() for ln in str(err).splitlines()[1:] if ln.strip()), _first_line(err))


def _build(path: Path, config, state) -> DeepPot:
    """DeepPot(config) with the weights `state`; a config or weights that do not fit: one line naming path."""
    if not isinstance(config, dict) or not isinstance(state, dict):
        raise DpmdError(f"{path}: no model config and weights in it; {EXPECTED}")
    try:
        model = DeepPot(config)
        missing, unexpected = model.load_state_dict(state, strict=False)
    except ConfigError as err:
        raise DpmdError(f"{path}: its model config is invalid: {err}") from None
    except (RuntimeError, TypeError, ValueError) as err:  # load_state_dict: a shape or type that does not fit
        raise DpmdError(f"{path}: its weights do not fit its model config ({_mismatch(err)})") from None
    if missing or unexpected:
        raise DpmdError(f"{path}: its weights do not fit its model config (missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]})")
    return model


# ---- frozen files: the weights of a TorchScript archive, read without torch.jit.load ----
#
# torch.jit.load compiles the archive's code/ and runs any __setstate__ it defines while loading, so a crafted
# file would run code merely by being loaded.  Python needs only the weights and dpmd.json: data.pkl (the
# pickled module tree) is read by an unpickler that knows only tensors, storages and TorchScript's list and
# type tags, and turns every TorchScript object into an inert record of its pickled state.  Which attributes
# of a module are parameters and buffers is not in data.pkl: it is read (as text, never compiled) from the
# `__parameters__` / `__buffers__` lines that TorchScript prints at the head of each module class in code/.

_STORAGE_DTYPES = {"DoubleStorage": torch.float64, "FloatStorage": torch.float32, "HalfStorage": torch.float16,
                   "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
                   "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
                   "BoolStorage": torch.bool}
_MODULE_HEAD = r"^class {}\(Module\):\n  __parameters__ = (\[.*\])\n  __buffers__ = (\[.*\])\n"


class _Refused(Exception):
    """data.pkl holds something that a module's weights never need."""


class _ScriptObject:
    """An inert stand-in for a TorchScript object of data.pkl: its class and the state it was pickled with
    (BUILD calls this __setstate__, never the archive's)."""

    qualname = ""
    state = None

    def __setstate__(self, state):
        self.state = state


class _Storage(NamedTuple):
    """A storage of data.pkl: the values of record data/<key> (immutable, so that BUILD cannot swap them)."""

    key: str
    flat: torch.Tensor


def _untagged(value, type_tag=None):
    """torch.jit._pickle's restore_type_tag and build_*list: the value itself (the tag only matters to C++)."""
    return value


def _sizes(values) -> bool:
    """A tensor's size or stride as TorchScript pickles it: a tuple of non-negative ints."""
    return isinstance(values, tuple) and all(type(v) is int and v >= 0 for v in values)


class _WeightsUnpickler(pickle.Unpickler):
    """The data.pkl `fh` of the archive `prefix` in zf, with storages read from its data/<key> records."""

    def __init__(self, fh, zf: zipfile.ZipFile, prefix: str):
        super().__init__(fh)
        self.zf, self.prefix = zf, prefix
        self.classes: dict[str, type] = {}
        self.storages: dict[tuple, _Storage] = {}

    def find_class(self, module, name):
        if module == "__torch__" or module.startswith("__torch__."):
            qualname = f"{module}.{name}"
            if qualname not in self.classes:
                self.classes[qualname] = type(name, (_ScriptObject,), {"qualname": qualname})
            return self.classes[qualname]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]  # only ever the dtype of a persistent id
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return self._rebuild_tensor
        if module == "torch.jit._pickle" and (name == "restore_type_tag" or re.fullmatch(r"build_\w+list", name)):
            return _untagged
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict  # a tensor's (empty) backward hooks
        raise _Refused(f"its data.pkl refers to the Python object {module}.{name}, which no model's weights need")

    def persistent_load(self, pid):
        """('storage', dtype, key, location, numel): the values of record data/<key>."""
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], torch.dtype)
                and isinstance(pid[2], str) and type(pid[4]) is int and pid[4] >= 0):
            raise _Refused(f"its data.pkl holds an unexpected persistent id {str(pid)[:80]}")
        _, dtype, key, _, numel = pid
        if (key, dtype, numel) not in self.storages:
            try:
                raw = self.zf.read(f"{self.prefix}/data/{key}")
            except KeyError:
                raise _Refused(f"its data.pkl refers to the record data/{key}, which the archive lacks") from None
            if len(raw) != numel * dtype.itemsize:
                raise _Refused(f"its record data/{key} holds {len(raw)} bytes, not the {numel} {dtype} values "
                               f"its data.pkl declares")
            flat = torch.frombuffer(bytearray(raw), dtype=dtype) if raw else torch.empty(0, dtype=dtype)
            self.storages[key, dtype, numel] = _Storage(key, flat)
        return self.storages[key, dtype, numel]

    @staticmethod
    def _rebuild_tensor(storage, offset, size, stride, requires_grad, hooks):
        """torch._utils._rebuild_tensor_v2 for plain dense tensors whose view fits inside their storage."""
        if not (isinstance(storage, _Storage) and type(offset) is int and offset >= 0 and _sizes(size)
                and _sizes(stride) and len(size) == len(stride) and isinstance(requires_grad, bool) and not hooks):
            raise _Refused("its data.pkl describes a tensor with an unexpected layout")
        end = offset + sum((n - 1) * s for n, s in zip(size, stride)) + 1 if all(size) else offset
        flat = storage.flat
        if end > flat.numel():
            raise _Refused(f"its data.pkl describes a tensor of size {list(size)}, stride {list(stride)} and "
                           f"offset {offset} beyond its storage data/{storage.key} of {flat.numel()} values")
        return flat.new_empty(0).set_(flat.untyped_storage(), offset, size, stride)


def _module_slots(zf: zipfile.ZipFile, prefix: str, qualname: str) -> list[str] | None:
    """The parameter and buffer names of a TorchScript class (from its head in code/), or None: not a module."""
    module, _, name = qualname.rpartition(".")
    try:
        code = zf.read(f"{prefix}/code/{module.replace('.', '/')}.py").decode()
    except KeyError:
        raise _Refused(f"no code/ entry declares the class {qualname} of its data.pkl") from None
    head = re.search(_MODULE_HEAD.format(re.escape(name)), code, re.M)
    if head is None:
        return None
    names = ast.literal_eval(head[1]) + ast.literal_eval(head[2])  # literals only: never evaluates code
    if not all(isinstance(n, str) for n in names):
        raise _Refused(f"the class {qualname} declares odd parameter names")
    return names


def _module_state(zf: zipfile.ZipFile, prefix: str, root) -> dict[str, torch.Tensor]:
    """What torch.jit's module.state_dict() gives for the module tree `root`: each module's parameters and
    buffers (slot order), then its submodules' (slot order), under dotted names."""
    slots: dict[str, list[str] | None] = {}
    state: dict[str, torch.Tensor] = collections.OrderedDict()

    def module_slots(obj) -> list[str] | None:
        if obj.qualname not in slots:
            slots[obj.qualname] = _module_slots(zf, prefix, obj.qualname)
        return slots[obj.qualname]

    def walk(obj, name: str) -> None:
        if not isinstance(obj.state, dict):
            raise _Refused(f"its module {name.rstrip('.') or '(root)'} ({obj.qualname}) was saved by its own "
                           f"__getstate__, which only its code could read")
        for slot in module_slots(obj):
            value = obj.state.get(slot)
            if value is not None and not isinstance(value, torch.Tensor):
                raise _Refused(f"its weight {name}{slot} is a {type(value).__name__}, not a tensor")
            if value is not None:
                state[name + slot] = value
        for slot, value in obj.state.items():
            if isinstance(value, _ScriptObject) and module_slots(value) is not None:
                walk(value, f"{name}{slot}.")

    if not isinstance(root, _ScriptObject) or module_slots(root) is None:
        raise _Refused("its data.pkl does not hold a TorchScript module")
    walk(root, "")
    return state


def _read_weights(path: Path, zf: zipfile.ZipFile, prefix: str) -> dict[str, torch.Tensor]:
    """The state dict of the TorchScript archive `prefix` in zf; anything unexpected: a one-line DpmdError."""
    try:
        order = zf.read(f"{prefix}/byteorder").decode(errors="replace").strip()
    except KeyError:
        order = "little"  # archives of older torch record none
    if order != sys.byteorder:  # the records hold raw bytes in the writer's order
        raise DpmdError(f"{path}: written with {order!r} byte order, this machine is {sys.byteorder}-endian; "
                        f"refusing to load it")
    try:
        with zf.open(f"{prefix}/data.pkl") as fh:
            root = _WeightsUnpickler(fh, zf, prefix).load()
        return _module_state(zf, prefix, root)
    except _Refused as err:
        raise DpmdError(f"{path}: {err}; refusing to load it") from None
    except Exception as err:  # a damaged or foreign pickle: UnpicklingError, EOFError, TypeError, RecursionError...
        raise DpmdError(f"{path}: unreadable data.pkl ({err.__class__.__name__}: {_first_line(err)}); "
                        f"refusing to load it") from None


def _load_torchscript(path: Path) -> tuple[DeepPot, str | None]:
    """The model of a frozen file and the weights checksum its metadata records (None: written before
    checksums).  Only dpmd.json and the weights are read: the archive's code is never compiled or run."""
    from dpmd.model.export import FORMAT_VERSION, METADATA_FILE

    with zipfile.ZipFile(path) as zf:
        prefix = zf.namelist()[0].partition("/")[0]  # as torch's reader: every entry is in the first one's folder
        try:
            raw = zf.read(f"{prefix}/extra/{METADATA_FILE}")
        except KeyError:
            raise DpmdError(f"{path}: a TorchScript file, but not a dpmd model (no {METADATA_FILE})") from None
        try:
            meta = json.loads(raw)
        except ValueError as err:
            raise DpmdError(f"{path}: its {METADATA_FILE} is not valid JSON ({err})") from None
        meta = meta if isinstance(meta, dict) else {}
        version = meta.get("format_version", 0)
        if meta.get("format") != FORMAT or not isinstance(version, int) or version > FORMAT_VERSION:
            raise DpmdError(f"{path}: model format {meta.get('format')!r} version {version!r} "
                            f"is not readable by this dpmd (up to {FORMAT} {FORMAT_VERSION})")
        state = _read_weights(path, zf, prefix)
    return _build(path, meta.get("config"), state), meta.get("weights_sha256")


def _load_dict(path: Path) -> tuple[DeepPot, str | None]:
    """The model of a torch.save file (dpmd version-1 model, dpmd training checkpoint or DeePMD-kit
    checkpoint) and its recorded weights checksum, if any."""
    blob = read_torch_file(path, EXPECTED)
    if not isinstance(blob, dict):
        raise DpmdError(f"{path}: holds a {type(blob).__name__}; {EXPECTED}")
    kind = blob.get("format")
    if kind == FORMAT:
        return _build(path, blob.get("config"), blob.get("state_dict")), blob.get("weights_sha256")
    if kind == TRAINING_CHECKPOINT:  # inference straight from training (what `dpmd freeze` would write)
        return _build(path, blob.get("model_config"), blob.get("model")), None
    if kind is None and ("model" in blob or "_extra_state" in blob):
        return from_deepmd_state_dict(blob.get("model", blob), source=str(path)), None
    raise DpmdError(f"{path}: " + (f"a {kind!r} file" if kind else "a dict without a model") + f"; {EXPECTED}")


def load_model(path, device: str | torch.device = "cpu") -> DeepPot:
    """A dpmd model file (frozen TorchScript or version-1 dict), a dpmd training checkpoint, or a DeePMD-kit
    PyTorch checkpoint, checked: a weights checksum recorded at save time must match, and every weight
    must be finite."""
    from dpmd.model.export import first_nonfinite, weights_checksum

    path = Path(path)
    if not path.is_file():
        raise DpmdError(f"{path}: model file not found")
    _check_archive(path, EXPECTED)
    model, recorded = _load_torchscript(path) if _is_torchscript(path) else _load_dict(path)
    state = model.state_dict()
    if recorded is not None and weights_checksum(state) != recorded:
        raise DpmdError(f"{path}: corrupt: its weights differ from the checksum recorded when it was saved")
    bad = first_nonfinite(state)
    if bad is not None:
        raise DpmdError(f"{path}: weight {bad} holds NaN or inf values; the model is unusable")
    return model.to(device).eval()


def from_deepmd_state_dict(state: dict, source: str = "checkpoint") -> DeepPot:
    """Build a DeepPot with the weights of a DeePMD-kit 3 (PyTorch) energy model (its descriptor: any of
    dpmd.model.descriptor.TYPES)."""
    try:
        config = state["_extra_state"]["model_params"]
    except (KeyError, TypeError):
        raise DpmdError(f"{source}: no _extra_state.model_params: not a DeePMD-kit 3 PyTorch checkpoint")
    try:
        model = DeepPot(config)
    except ConfigError as err:
        raise DpmdError(f"{source}: its model_params are not supported: {err}") from None
    ours, descriptor = {}, {}
    for key, value in state.items():
        m = re.search(r"atomic_model\.(.*)$", key)
        if not m:
            continue
        name = m.group(1)
        if name.startswith("descriptor."):
            descriptor[name[len("descriptor."):]] = value
        elif (n := re.fullmatch(r"fitting_net\.filter_layers\.networks\.(\d+)\.layers\.(\d+)\.(\w+)", name)):
            ours[f"fitting.nets.{n[1]}.layers.{n[2]}.{n[3]}"] = value
        elif (n := re.fullmatch(r"fitting_net\.((?:f|a)param_(?:avg|inv_std)|default_fparam_tensor)", name)):
            ours[f"fitting.{n[1]}"] = value  # the frame / atomic parameters' normalisation: DeePMD-kit's names
    ours.update({f"descriptor.{k}": v for k, v in model.descriptor.deepmd_state(descriptor, source).items()})
    bias_key = next((k for k in state if k.endswith("atomic_model.out_bias")), None)
    if bias_key is None:
        raise DpmdError(f"{source}: no atomic_model.out_bias: not a DeePMD-kit 3 energy model")
    bias = state[bias_key][0, :, 0]
    fit_bias = [v for k, v in state.items() if k.endswith("fitting_net.bias_atom_e")]
    if fit_bias:
        bias = bias + fit_bias[0][:, 0]
    ours["fitting.energy_bias"] = bias
    try:
        missing, unexpected = model.load_state_dict(ours, strict=False)
    except RuntimeError as err:  # a shape that does not fit
        raise DpmdError(f"{source}: weights do not match the model config ({_mismatch(err)})") from None
    if missing or unexpected:
        raise DpmdError(f"{source}: weights do not match the model config (missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]})")
    return model
