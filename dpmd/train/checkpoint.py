"""Training checkpoints, DeePMD-kit style: `model.ckpt-<step>.pt`, a `model.ckpt.pt` link to the
latest and a `checkpoint` file naming it.  Every file is written to a temp name and renamed, so a
kill at any moment leaves the previous checkpoint readable."""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from dpmd.errors import DpmdError
from dpmd.model.io import atomic_torch_save, atomic_write


def _atomic_symlink(target: str, link: Path) -> None:
    tmp = link.with_name(f".{link.name}.tmp{os.getpid()}")
    tmp.unlink(missing_ok=True)
    os.symlink(target, tmp)
    os.replace(tmp, link)


def save_checkpoint(state: dict, prefix: str | Path, step: int, keep: int) -> Path:
    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    path = prefix.with_name(f"{prefix.name}-{step}.pt")
    atomic_torch_save(state, path)
    _atomic_symlink(path.name, prefix.with_name(prefix.name + ".pt"))
    atomic_write(prefix.with_name("checkpoint"), lambda fh: fh.write(path.name + "\n"), mode="w")
    old = sorted(checkpoints(prefix), key=lambda p: _step_of(p))[:-keep]
    for p in old:
        p.unlink(missing_ok=True)
    return path


def _step_of(path: Path) -> int:
    return int(re.search(r"-(\d+)\.pt$", path.name).group(1))


def checkpoints(prefix: Path) -> list[Path]:
    pattern = re.compile(re.escape(prefix.name) + r"-\d+\.pt$")
    return [p for p in prefix.parent.glob(prefix.name + "-*.pt") if pattern.fullmatch(p.name)]


def latest_checkpoint(directory: str | Path = ".") -> Path:
    """The checkpoint named by `checkpoint` in directory (DeePMD-kit's convention)."""
    directory = Path(directory)
    marker = directory / "checkpoint"
    if marker.is_file():
        path = directory / marker.read_text().strip()
        if path.is_file():
            return path
    found = sorted(directory.glob("*.ckpt-*.pt"), key=lambda p: _step_of(p))
    if not found:
        raise DpmdError(f"no checkpoint in {directory.resolve()} (expected a 'checkpoint' file or *.ckpt-<step>.pt)")
    return found[-1]


def load_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise DpmdError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        raise DpmdError(f"{path}: unreadable checkpoint ({err.__class__.__name__})") from None
    if not isinstance(state, dict) or state.get("format") != "dpmd-checkpoint":
        raise DpmdError(f"{path}: not a dpmd training checkpoint")
    return state
