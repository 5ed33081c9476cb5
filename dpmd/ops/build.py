"""Building dpmd's kernel library (csrc/) into one shared object with torch.utils.cpp_extension.

Every `csrc/kernels/*.cc` and `csrc/torch/*.cpp` (plus `csrc/kernels/*.cu` when PyTorch has
CUDA) goes into one library, `dpmd_ops.so`, in a cache folder keyed by a hash of the sources,
the flags and the PyTorch version:

    $DPMD_OPS_DIR (if set), else $XDG_CACHE_HOME/dpmd/ops (~/.cache/dpmd/ops)
        <torch version>-<cpu|cuda>-<hash>/dpmd_ops.so

A file lock serialises concurrent builds (MPI ranks, DDP workers, pytest processes), and the
library is compiled in a private folder and renamed into place, so a process never sees a
half-written `.so`.  A build takes minutes: each compiled file is logged (dpmd.log), the compiler's
commands and messages at DEBUG.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

from dpmd.files import atomic_copy

CSRC = Path(__file__).resolve().parents[2] / "csrc"
LIB_NAME = "dpmd_ops"
CXX_FLAGS = ["-O3", "-fopenmp", "-std=c++17", "-fno-math-errno", "-fno-trapping-math"]  # as PyTorch: lets loops with math vectorize
LD_FLAGS = ["-fopenmp"]
NVCC_FLAGS = ["-O3", "-std=c++17"]
log = logging.getLogger(__name__)


def arch_flags() -> list[str]:
    """-march for the CPU kernels: this machine's instruction set by default (AVX2/AVX-512 make the
    kernels 2-4x faster than plain x86-64); DPMD_CPU_ARCH=x86-64-v3 (say) for a library that must also
    run on older nodes, DPMD_CPU_ARCH=generic for the compiler's default."""
    arch = os.environ.get("DPMD_CPU_ARCH", "native").strip()
    return [] if arch in ("", "generic") else [f"-march={arch}"]


@functools.lru_cache(maxsize=None)
def _cpu_identity() -> bytes:
    """The CPU's feature flags: a library built with -march=native must not be reused (shared home
    folders on clusters) on a node with another instruction set."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), "").encode()
    except OSError:
        return b""

def cache_root() -> Path:
    if os.environ.get("DPMD_OPS_DIR"):
        return Path(os.environ["DPMD_OPS_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "dpmd" / "ops"


def with_cuda() -> bool:
    """Link the CUDA kernels in when this PyTorch is a CUDA build and nvcc can be found."""
    if torch.version.cuda is None:
        return False
    from torch.utils.cpp_extension import CUDA_HOME

    return CUDA_HOME is not None


def sources(cuda: bool | None = None) -> list[Path]:
    cuda = with_cuda() if cuda is None else cuda
    files = sorted((CSRC / "kernels").glob("*.cc")) + sorted((CSRC / "torch").glob("*.cpp"))
    if cuda:
        files += sorted((CSRC / "kernels").glob("*.cu"))
    return files


def _headers() -> list[Path]:
    return sorted((CSRC / "kernels").glob("*.h")) + sorted((CSRC / "torch").glob("*.h"))


def build_key(cuda: bool | None = None) -> str:
    """<torch version>-<cpu|cuda>-<hash of sources, headers and flags>."""
    cuda = with_cuda() if cuda is None else cuda
    h = hashlib.sha256()
    for f in sources(cuda) + _headers():
        h.update(str(f.relative_to(CSRC)).encode() + b"\0" + f.read_bytes() + b"\0")
    h.update(" ".join(CXX_FLAGS + arch_flags() + LD_FLAGS + (NVCC_FLAGS if cuda else [])).encode())
    if "-march=native" in arch_flags():
        h.update(_cpu_identity())
    return f"{torch.__version__.replace('+', '_')}-{'cuda' if cuda else 'cpu'}-{h.hexdigest()[:16]}"


def target_path(cuda: bool | None = None) -> Path:
    return cache_root() / build_key(cuda) / f"{LIB_NAME}.so"


def _lock(lock, what: str) -> None:
    """Take the file lock, saying so when another process holds it (a build there can take minutes)."""
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        log.info(f"another process is building {what}; waiting for it")
        fcntl.flock(lock, fcntl.LOCK_EX)


def build() -> Path:
    """Compile the library unless an up-to-date one exists; returns its path (does not load it)."""
    cuda = with_cuda()
    target = target_path(cuda)
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / ".lock", "w") as lock:
        _lock(lock, target)  # one builder at a time; the others wait, then find the library
        try:
            if target.is_file():
                return target
            _compile(target, cuda)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return target


def _run_logged(command: list[str]) -> None:
    """Run the build, logging each file ninja finishes ('[i/n] <command>' lines) with the elapsed time; every
    other line (compiler messages) at DEBUG.  A failure raises RuntimeError ending in the compiler's first
    error."""
    t0, lines = time.perf_counter(), []
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        for line in proc.stdout:
            line = line.rstrip()
            lines.append(line)
            log.debug(line)
            step = re.match(r"\[(\d+)/(\d+)\] ", line)
            if step:
                source = re.search(r" -c (\S+)", line)
                what = f"compiled {Path(source.group(1)).name}" if source else "linked the library"
                log.info(f"{what} ({step.group(1)}/{step.group(2)}, {time.perf_counter() - t0:.0f} s)")
    if proc.returncode != 0:
        errors = [line for line in lines if "error:" in line.lower() and not line.startswith("[")]  # not commands
        raise RuntimeError("compiling the kernel library failed:\n" + "\n".join((errors[:1] or lines[-15:])))


def _compile(target: Path, cuda: bool) -> None:
    # One ninja folder per torch version and backend, reused (under the lock) so that a change to
    # one source recompiles only that file; the finished library is copied out and renamed into place.
    # The compile runs in a child process: cpp_extension.load() also loads what it built, and a process
    # that later opened the renamed copy too (the LAMMPS plugin does) would register the ops twice.
    work = cache_root() / f"build-{torch.__version__.replace('+', '_')}-{'cuda' if cuda else 'cpu'}"
    work.mkdir(parents=True, exist_ok=True)
    with open(work / ".lock", "w") as lock:
        _lock(lock, work)
        try:
            files = sources(cuda)
            log.info(f"compiling the kernel library: {len(files)} sources{' with CUDA' if cuda else ''}, a few "
                     f"minutes (in {work})")
            # verbose: ninja prints a line per finished file, which _run_logged turns into progress
            args = dict(name=LIB_NAME, sources=[str(s) for s in files],
                        extra_cflags=CXX_FLAGS + arch_flags() + (["-DDPMD_WITH_CUDA"] if cuda else []),
                        extra_cuda_cflags=NVCC_FLAGS + ["-DDPMD_WITH_CUDA"], extra_ldflags=LD_FLAGS,
                        extra_include_paths=[str(CSRC / "kernels"), str(CSRC / "torch")], build_directory=str(work),
                        with_cuda=cuda, is_python_module=False, verbose=True)
            script = f"from torch.utils.cpp_extension import load; load(**{args!r})"
            _run_logged([sys.executable, "-c", script])
            atomic_copy(work / f"{LIB_NAME}.so", target)   # a process loading the old library is unaffected
            log.info(f"built {target}")
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
