"""Saving and loading models: dpmd's own files, and DeePMD-kit (PyTorch backend) checkpoints."""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
import warnings
import zipfile
from pathlib import Path

import torch

from dpmd.errors import DpmdError
from dpmd.model.deeppot import DeepPot

FORMAT = "dpmd-model"


def _umask_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write(path, write, mode: str = "wb") -> None:
    """write(file object) into a temp file in the same directory, then rename: never a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, _umask_mode())  # mkstemp creates 0600; give the file the usual permissions
        with os.fdopen(fd, mode) as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_torch_save(obj, path) -> None:
    """torch.save to a temp file in the same directory, then rename: never a half-written file."""
    atomic_write(path, lambda fh: torch.save(obj, fh))


def save_model(model: DeepPot, path, *, deployable: bool = True) -> None:
    """Write one self-contained model file.

    deployable (default): a TorchScript archive (see dpmd.model.export) holding the weights,
    statistics and the `dpmd.json` metadata (type_map, rcut, sel, model config, versions);
    `load_model` reads it back as a DeepPot, `torch.jit.load` / `torch::jit::load` as the
    inference module.  deployable=False: the version-1 torch.save dict (Python only).
    """
    if not deployable:
        atomic_torch_save({"format": FORMAT, "version": 1, "config": model.config,
                           "state_dict": model.state_dict()}, path)
        return
    from dpmd.model.export import METADATA_FILE, script_model

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
    except (zipfile.BadZipFile, OSError) as err:
        raise DpmdError(f"{path}: not a frozen dpmd model ({err})")


def _needs_ops_library(path: Path) -> bool:
    """A frozen model scripted with dpmd's kernel library (e.g. a compressed model's fused op) calls it."""
    try:
        return bool(read_metadata(path).get("ops_library", False))
    except DpmdError:
        return False


def _load_torchscript(path: Path, device) -> DeepPot:
    from dpmd.model.export import FORMAT_VERSION, METADATA_FILE

    extra = {METADATA_FILE: ""}
    if _needs_ops_library(path):
        from dpmd import ops

        ops.require(str(path))
    try:
        with _no_jit_deprecation():
            module = torch.jit.load(str(path), map_location=device, _extra_files=extra)
    except Exception as err:
        raise DpmdError(f"{path}: not a readable TorchScript file ({err.__class__.__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else ''})")
    if not extra[METADATA_FILE]:
        raise DpmdError(f"{path}: a TorchScript file, but not a dpmd model (no {METADATA_FILE})")
    meta = json.loads(extra[METADATA_FILE])
    if meta.get("format") != FORMAT or int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise DpmdError(f"{path}: model format {meta.get('format')!r} version {meta.get('format_version')} "
                        f"is not readable by this dpmd (up to {FORMAT} {FORMAT_VERSION})")
    model = DeepPot(meta["config"])
    model.load_state_dict(module.state_dict())
    return model


def load_model(path, device: str | torch.device = "cpu") -> DeepPot:
    """A dpmd model file (frozen TorchScript or version-1 dict), or a DeePMD-kit PyTorch checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise DpmdError(f"{path}: model file not found")
    if _is_torchscript(path):
        return _load_torchscript(path, device).to(device).eval()
    try:
        blob = torch.load(path, map_location=device, weights_only=True)
    except Exception as err:
        raise DpmdError(f"{path}: not a readable model file ({err.__class__.__name__}: {str(err).splitlines()[0]})")
    if isinstance(blob, dict) and blob.get("format") == FORMAT:
        model = DeepPot(blob["config"])
        model.load_state_dict(blob["state_dict"])
    elif isinstance(blob, dict) and ("model" in blob or "_extra_state" in blob):
        model = from_deepmd_state_dict(blob.get("model", blob), source=str(path))
    else:
        raise DpmdError(f"{path}: neither a dpmd model nor a DeePMD-kit checkpoint")
    return model.to(device).eval()


def from_deepmd_state_dict(state: dict, source: str = "checkpoint") -> DeepPot:
    """Build a DeepPot with the weights of a DeePMD-kit 3 (PyTorch) se_e2_a energy model."""
    try:
        config = state["_extra_state"]["model_params"]
    except (KeyError, TypeError):
        raise DpmdError(f"{source}: no _extra_state.model_params: not a DeePMD-kit 3 PyTorch checkpoint")
    model = DeepPot(config)
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
    bias = state[next(k for k in state if k.endswith("atomic_model.out_bias"))][0, :, 0]
    fit_bias = [v for k, v in state.items() if k.endswith("fitting_net.bias_atom_e")]
    if fit_bias:
        bias = bias + fit_bias[0][:, 0]
    ours["fitting.energy_bias"] = bias
    missing, unexpected = model.load_state_dict(ours, strict=False)
    if missing or unexpected:
        raise DpmdError(f"{source}: weights do not match the model config (missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]})")
    return model
