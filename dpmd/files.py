"""Writing files so that nothing is ever half-written: the one atomic-write helper of dpmd and elt.

Every writer goes through a temp file in the target's directory that is renamed over the target only when
complete (os.replace is atomic on POSIX), so a kill, a full disk or an exception leaves the previous file as
it was.  Imports nothing of dpmd but its errors: data, model, md, train, the LAMMPS build and elt's
labelling workers (which never import torch) all use it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from pathlib import Path

from dpmd.errors import DpmdError

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


def atomic_write_text(path, text: str) -> None:
    atomic_write(path, lambda fh: fh.write(text), mode="w")


def atomic_copy(source, path) -> None:
    """Copy the file `source` to `path` (e.g. a freshly built library over the one others may be loading)."""
    with open(source, "rb") as src:
        atomic_write(path, lambda fh: shutil.copyfileobj(src, fh))
    shutil.copymode(source, path)


def atomic_link(source, path) -> None:
    """Make `path` the file `source` in one step: a hard link where the file system allows (no second copy),
    else a copy."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:
        shutil.copy2(source, tmp)
    os.replace(tmp, path)


def atomic_symlink(target: str, link) -> None:
    """Point the symlink `link` at `target`, replacing what is there in one step."""
    link = Path(link)
    tmp = link.with_name(f".{link.name}.tmp{os.getpid()}")
    tmp.unlink(missing_ok=True)
    os.symlink(target, tmp)
    os.replace(tmp, link)
