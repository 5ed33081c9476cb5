"""Saving and loading models: dpmd's own files, dpmd training checkpoints, and DeePMD-kit (PyTorch
backend) checkpoints.

Model files are untrusted input: nothing is unpickled (torch.load with weights_only=True only; a frozen
file's TorchScript is compiled by torch.jit.load, but only its weights are used, in a DeepPot built from
its metadata), a zip archive's CRCs and the weights checksum recorded at save time are verified, and a
file that is empty, truncated, corrupted or would run code is a one-line DpmdError naming it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import tempfile
import warnings
import zipfile
from pathlib import Path

import torch

from dpmd.errors import ConfigError, DpmdError
from dpmd.model.deeppot import DeepPot

FORMAT = "dpmd-model"
TRAINING_CHECKPOINT = "dpmd-checkpoint"  # written by dpmd.train.checkpoint (not imported: layers import downwards)
EXPECTED = "expected a frozen dpmd model (dpmd freeze), a dpmd training checkpoint or a DeePMD-kit PyTorch checkpoint"
LOW_SPACE = 1 << 20  # bytes: a write that fails with less than this free on its file system ran out of space


def _umask_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _first_line(err: BaseException) -> str:
    return next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)


def _write_error(path: Path, err: BaseException, free: int | None) -> DpmdError:
    """One line for a failed write; a full disk (ENOSPC, or torch's zip writer's "unexpected pos" with
    no space left) says so with the space free now."""
    if getattr(err, "errno", None) == errno.ENOSPC or (free is not None and free < LOW_SPACE):
        with contextlib.suppress(OSError):
            free = shutil.disk_usage(path.parent).free  # after the temp file is gone
        where = f" ({free / 2**20:.1f} MB free in {path.parent})" if free is not None else ""
        return DpmdError(f"writing {path} failed: no space left on device{where}")
    reason = err.strerror if isinstance(err, OSError) and err.strerror else _first_line(err)
    return DpmdError(f"writing {path} failed: {reason}")


def atomic_write(path, write, mode: str = "wb") -> None:
    """write(file object) into a temp file in the same directory, then rename: never a half-written file.

    A failure (disk full, no permission, ...) removes the temp file, leaves any previous file at path as
    it was, and raises a one-line DpmdError naming path."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        os.fchmod(fd, _umask_mode())  # mkstemp creates 0600; give the file the usual permissions
        with os.fdopen(fd, mode) as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        free = None
        if tmp is not None:
            with contextlib.suppress(OSError):
                free = shutil.disk_usage(path.parent).free  # measured while the partial file still fills the disk
            Path(tmp).unlink(missing_ok=True)
        if isinstance(err, (OSError, RuntimeError)) and not isinstance(err, DpmdError):
            raise _write_error(path, err, free) from err
        raise


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


def _needs_ops_library(path: Path) -> bool:
    """A frozen model scripted with dpmd's kernel library (e.g. a compressed model's fused op) calls it."""
    try:
        return bool(read_metadata(path).get("ops_library", False))
    except DpmdError:
        return False


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


def _load_torchscript(path: Path) -> tuple[DeepPot, str | None]:
    """The model of a frozen file and the weights checksum its metadata records (None: written before
    checksums)."""
    from dpmd.model.export import FORMAT_VERSION, METADATA_FILE

    extra = {METADATA_FILE: ""}
    if _needs_ops_library(path):
        from dpmd import ops

        ops.require(str(path))
    try:
        with _no_jit_deprecation():
            module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    except Exception as err:
        raise DpmdError(f"{path}: not a readable TorchScript file ({err.__class__.__name__}: "
                        f"{_first_line(err)})") from None
    if not extra[METADATA_FILE]:
        raise DpmdError(f"{path}: a TorchScript file, but not a dpmd model (no {METADATA_FILE})")
    try:
        meta = json.loads(extra[METADATA_FILE])
    except ValueError as err:
        raise DpmdError(f"{path}: its {METADATA_FILE} is not valid JSON ({err})") from None
    meta = meta if isinstance(meta, dict) else {}
    version = meta.get("format_version", 0)
    if meta.get("format") != FORMAT or not isinstance(version, int) or version > FORMAT_VERSION:
        raise DpmdError(f"{path}: model format {meta.get('format')!r} version {version!r} "
                        f"is not readable by this dpmd (up to {FORMAT} {FORMAT_VERSION})")
    return _build(path, meta.get("config"), module.state_dict()), meta.get("weights_sha256")


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
    """Build a DeepPot with the weights of a DeePMD-kit 3 (PyTorch) se_e2_a energy model."""
    try:
        config = state["_extra_state"]["model_params"]
    except (KeyError, TypeError):
        raise DpmdError(f"{source}: no _extra_state.model_params: not a DeePMD-kit 3 PyTorch checkpoint")
    try:
        model = DeepPot(config)
    except ConfigError as err:
        raise DpmdError(f"{source}: its model_params are not supported: {err}") from None
    ours = {}
    for key, value in state.items():
        m = re.search(r"atomic_model\.(.*)$", key)
        if not m:
            continue
        name = m.group(1)
        if (n := re.fullmatch(r"descriptor\.sea\.filter_layers\.networks\.(\d+)\.layers\.(\d+)\.(\w+)", name)):
            ours[f"descriptor.embeddings.{n[1]}.layers.{n[2]}.{n[3]}"] = value
        elif (n := re.fullmatch(r"fitting_net\.filter_layers\.networks\.(\d+)\.layers\.(\d+)\.(\w+)", name)):
            ours[f"fitting.nets.{n[1]}.layers.{n[2]}.{n[3]}"] = value
        elif name in ("descriptor.sea.mean", "descriptor.sea.stddev"):
            # DeePMD stores one row per neighbour slot; the rows of a centre type are equal.
            if not torch.equal(value, value[:, :1].expand_as(value)):
                raise DpmdError(f"{source}: {key} differs between neighbour slots; not supported")
            ours["descriptor." + ("mean" if name.endswith("mean") else "std")] = value[:, 0, :]
    bias_key = next((k for k in state if k.endswith("atomic_model.out_bias")), None)
    if bias_key is None:
        raise DpmdError(f"{source}: no atomic_model.out_bias: not a DeePMD-kit 3 se_e2_a energy model")
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
