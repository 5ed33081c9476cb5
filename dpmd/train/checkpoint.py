"""Training checkpoints, DeePMD-kit style: `model.ckpt-<step>.pt`, a `model.ckpt.pt` link to the
latest and a `checkpoint` file naming it.

Safety rules:
- every file is written to a temp name and renamed, so a kill at any moment leaves the previous
  checkpoint readable; the `checkpoint` file is written before the link, and is the authority
  (`tidy` repairs the link, and removes the temp files of killed writes, at the next start);
- each checkpoint and the `checkpoint` file (second line, `run_id: <hex>`) record the run they
  belong to: pruning and `latest_checkpoint` only ever consider the checkpoints of one run;
- checkpoints are read with `weights_only=True`: a pickle that would run code is refused.
"""

from __future__ import annotations

import os
import re
import secrets
import time
from pathlib import Path

import torch

from dpmd.errors import DpmdError
from dpmd.model.export import first_nonfinite
from dpmd.files import atomic_symlink, atomic_write_text
from dpmd.model.io import atomic_torch_save, read_torch_file

MARKER = "checkpoint"
RESTART_KEYS = ("step", "config", "model_config", "model", "optimizer", "sampler", "torch_rng")


def new_run_id() -> str:
    return secrets.token_hex(8)


def read_marker(directory: str | Path) -> tuple[str, str | None] | None:
    """(file name, run id) from directory's `checkpoint` file; the run id is None in files written before
    run ids (and DeePMD-kit's); None without a `checkpoint` file."""
    path = Path(directory) / MARKER
    if not path.is_file():
        return None
    lines = path.read_text().splitlines()
    if not lines or not lines[0].strip():
        return None
    run = next((ln.split(":", 1)[1].strip() for ln in lines[1:] if ln.startswith("run_id:")), None)
    return lines[0].strip(), run


def _write_marker(directory: Path, name: str, run_id: str | None) -> None:
    text = name + "\n" + (f"run_id: {run_id}\n" if run_id else "")
    atomic_write_text(directory / MARKER, text)


def save_checkpoint(state: dict, prefix: str | Path, step: int, keep: int) -> Path:
    """Write `<prefix>-<step>.pt`, then `checkpoint`, then the link; keep the `keep` newest checkpoints of
    state's run (older-step files of other runs, and of an abandoned later branch of this one, stay)."""
    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    run = state.get("run_id")
    path = prefix.with_name(f"{prefix.name}-{step}.pt")
    atomic_torch_save(state, path)
    key = _file_key(path)
    if key is not None:
        _RUN_IDS[key] = run
    _write_marker(prefix.parent, path.name, run)
    atomic_symlink(path.name, prefix.with_name(prefix.name + ".pt"))
    ours = sorted((p for p in checkpoints(prefix) if _step_of(p) <= step and run_of(p) == run), key=_step_of)
    for p in ours[:-keep]:
        p.unlink(missing_ok=True)
    return path


def _step_of(path: Path) -> int:
    return int(re.search(r"-(\d+)\.pt$", path.name).group(1))


def checkpoints(prefix: Path) -> list[Path]:
    pattern = re.compile(re.escape(prefix.name) + r"-\d+\.pt$")
    return [p for p in prefix.parent.glob(prefix.name + "-*.pt") if pattern.fullmatch(p.name)]


# run id of each checkpoint file read or written, by (path, size, mtime): a file is parsed once, not at every save
_RUN_IDS: dict[tuple, str | None] = {}


def _file_key(path: Path):
    try:
        st = Path(path).stat()
    except OSError:
        return None
    return str(Path(path).resolve()), st.st_size, st.st_mtime_ns


def run_of(path: Path) -> str | None:
    """The run id recorded in a checkpoint (None: none recorded, or unreadable).  mmap: the weights are
    not read; a file already seen (same size and time) is not read again."""
    key = _file_key(path)
    if key is None:
        return None
    if key not in _RUN_IDS:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception:
            state = None
        _RUN_IDS[key] = state.get("run_id") if isinstance(state, dict) else None
    return _RUN_IDS[key]


def latest_checkpoint(directory: str | Path = ".") -> Path:
    """The checkpoint named by `checkpoint` in directory (DeePMD-kit's convention); if that file is gone,
    the newest checkpoint of the run it names.  Without a `checkpoint` file: the newest checkpoint, provided
    they all belong to one run."""
    directory = Path(directory)
    found = [p for p in directory.glob("*.ckpt-*.pt") if re.search(r"-\d+\.pt$", p.name)]
    marker = read_marker(directory)
    if marker is not None:
        name, run = marker
        if (directory / name).is_file():
            return directory / name
        ours = [p for p in found if run_of(p) == run]
        if not ours:
            raise DpmdError(f"{directory / MARKER} names {name}, which is missing, and no other checkpoint of "
                            f"its run is in {directory}")
        return max(ours, key=_step_of)
    if not found:
        raise DpmdError(f"no checkpoint in {directory.resolve()} (expected a 'checkpoint' file or *.ckpt-<step>.pt)")
    if len({run_of(p) for p in found}) > 1:
        raise DpmdError(f"{directory}: checkpoints of several runs and no 'checkpoint' file naming the latest; "
                        f"name one, e.g. -c {max(found, key=_step_of)}")
    return max(found, key=_step_of)


def load_checkpoint(path: str | Path, *, for_restart: bool = False) -> dict:
    path = Path(path)
    state = read_torch_file(path, "expected a dpmd training checkpoint (model.ckpt-<step>.pt)")  # plain data only
    if not isinstance(state, dict) or state.get("format") != "dpmd-checkpoint":
        raise DpmdError(f"{path}: not a dpmd training checkpoint")
    missing = [k for k in (RESTART_KEYS if for_restart else ("model_config", "model")) if k not in state]
    if missing:
        raise DpmdError(f"{path}: incomplete training checkpoint (no {', '.join(missing)})")
    return state


def check_finite(weights: dict, source) -> None:
    """A one-line error naming the first parameter or buffer with NaN or inf values."""
    bad = first_nonfinite(weights)
    if bad is not None:
        raise DpmdError(f"{source}: weight {bad} holds NaN or inf values; the run diverged before this "
                        f"checkpoint, use an earlier one")


# ---------------------------------------------------------------- the files of a run in a folder
def run_files(prefix: Path, disp_file: str) -> list[Path]:
    """The files a training run with this checkpoint prefix and lcurve name leaves in its folder."""
    directory = prefix.parent
    named = [directory / MARKER, prefix.with_name(prefix.name + ".pt"), directory / disp_file]
    return [p for p in named if p.is_file() or p.is_symlink()] + sorted(checkpoints(prefix), key=_step_of)


def folder_runs(prefix: Path) -> set[str | None]:
    """The run ids found in prefix's folder: the `checkpoint` file's, else those of the checkpoints."""
    marker = read_marker(prefix.parent)
    if marker is not None:
        return {marker[1]}
    return {run_of(p) for p in checkpoints(prefix)}


def move_aside(files: list[Path], directory: Path) -> Path:
    """Move a run's files into a new directory/old-run-<timestamp>[-n]/ (never deletes them)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    dest, n = directory / f"old-run-{stamp}", 1
    while dest.exists():
        dest, n = directory / f"old-run-{stamp}-{n}", n + 1
    dest.mkdir()
    for p in files:
        os.replace(p, dest / p.name)  # the link moves with its (relative) target
    return dest


def tidy(prefix: Path, disp_file: str) -> None:
    """Start-up repair after a kill: remove the temp files of interrupted writes (atomic_write's
    `.<name>.<random>`, the link's `.<name>.tmp<pid>`) and point the link at the checkpoint that the
    `checkpoint` file names (the newest of its run if that file is gone)."""
    directory = prefix.parent
    for pattern in (f".{prefix.name}-*.pt.*", f".{prefix.name}.pt.*", f".{MARKER}.*", f".{disp_file}.*"):
        for tmp in directory.glob(pattern):
            tmp.unlink(missing_ok=True)
    marker = read_marker(directory)
    if marker is None:
        return
    name, run = marker
    try:
        target = latest_checkpoint(directory)
    except DpmdError:
        return
    if target.name != name:
        _write_marker(directory, target.name, run)
    link = prefix.with_name(prefix.name + ".pt")
    if target.name.startswith(prefix.name + "-") and not (link.is_symlink() and os.readlink(link) == target.name):
        atomic_symlink(target.name, link)
