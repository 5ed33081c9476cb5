"""Process-wide settings for dpmd's own entry points (the CLI and benchmarks), not applied on import.

Threads.  PyTorch takes every core of the machine by default, and its OpenMP threads spin-wait between
parallel regions.  On a machine that anything else also uses, a thread that the scheduler has parked holds up
every region (the others spin, burning the cores that thread needs), so small models ran 6-80x slower than with
one thread.  The policy here (benchmarks/contention.py: 8-13x faster than that default beside a busy process):

- `quiet_openmp()`, first thing in `dpmd` and `elt` (before torch, or any OpenMP library, is loaded: libgomp
  reads the variables once, at load): idle OpenMP threads sleep instead of spinning (OMP_WAIT_POLICY=PASSIVE,
  KMP_BLOCKTIME=0 for Intel's runtime) unless the user chose a wait policy.  Child processes inherit it.
- `usable_cores()`: the cores this process may use (affinity, cgroup CPU quota, SLURM_CPUS_PER_TASK,
  OMP_NUM_THREADS when the user set it, its share among unbound MPI ranks), not the machine's.
- `configure_threads(threads, work)`: torch's intra-op threads.  An explicit count wins; otherwise one thread
  per ATOMS_PER_THREAD atoms of one model evaluation (small systems: one), at most usable_cores().
  `training_work` gives that size for a `dpmd train` input; `dpmd md` takes it from its built simulation.
"""

from __future__ import annotations

import ctypes
import math
import os
import sys
from pathlib import Path

# Atoms per model evaluation (atoms x frames x models) that one more thread needs before it pays on a shared
# machine (benchmarks/contention.py --sizes, 2 cores, idle threads sleeping): beside a busy process a second
# thread gained nothing at 192 water atoms (0.97x), 1.47x at 1,536 and 2.0x at 5,184.  On an idle machine it
# also speeds up 192 atoms (up to 1.8x): --threads asks for that where the machine is known to be free.
ATOMS_PER_THREAD = 1000
WAIT_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME", "KMP_LIBRARY")
LOCAL_RANKS = ("OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "LOCAL_WORLD_SIZE")   # Open MPI, MPICH, torchrun


def keep_freed_memory() -> None:
    """Ask glibc to serve large blocks from the heap and keep freed memory.

    Every model evaluation allocates and frees the same large tensors; by default glibc maps
    each one fresh from the kernel and returns it on free, so every step pays page faults
    (about 5-7% of an evaluation here).
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 1 << 30)
    libc.mallopt(m_trim_threshold, (1 << 31) - 1)


def quiet_openmp(environ=os.environ) -> bool:
    """Idle OpenMP threads sleep at once instead of spinning, unless the user set a wait policy; returns whether
    it set one.  Takes effect only for OpenMP runtimes loaded afterwards (torch, tblite, PySCF)."""
    if any(v in environ for v in WAIT_VARIABLES):
        return False
    environ["OMP_WAIT_POLICY"] = "PASSIVE"
    environ["KMP_BLOCKTIME"] = "0"
    return True


def _positive_int(text) -> int | None:
    try:
        n = int(str(text).split(",")[0])
    except ValueError:
        return None
    return n if n > 0 else None


def cgroup_cpus(root: str | Path = "/sys/fs/cgroup", self_cgroup: str | Path = "/proc/self/cgroup") -> int | None:
    """The CPU quota of this process's cgroup in whole cores (rounded up), None when there is none.  Reads
    cgroup v2 `cpu.max` and v1 `cpu.cfs_quota_us` / `cpu.cfs_period_us` in this process's cgroup, its
    ancestors and the mount root (a container sees its own cgroup there); the smallest quota wins."""
    root = Path(root)
    try:
        lines = Path(self_cgroup).read_text().splitlines()
    except OSError:
        lines = []
    dirs = [root, root / "cpu", root / "cpu,cpuacct"]
    for line in lines:   # "0::/path" (v2), "4:cpu,cpuacct:/path" (v1)
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if controllers and "cpu" not in controllers.split(","):
            continue
        for base in [root] if not controllers else [root / "cpu", root / controllers]:
            d = base / path.strip("/")
            while d != base and base in d.parents:   # the cgroup and its ancestors below the mount
                dirs.append(d)
                d = d.parent
    quotas = []
    for d in dict.fromkeys(dirs):
        try:
            if (d / "cpu.max").is_file():
                quota, period = (d / "cpu.max").read_text().split()[:2]
            elif (d / "cpu.cfs_quota_us").is_file():
                quota, period = (d / "cpu.cfs_quota_us").read_text(), (d / "cpu.cfs_period_us").read_text()
            else:
                continue
            if quota.strip() not in ("max", "-1") and int(period) > 0:
                quotas.append(math.ceil(int(quota) / int(period)))
        except (OSError, ValueError):
            continue
    return max(1, min(quotas)) if quotas else None


def usable_cores(environ=os.environ) -> int:
    """The cores this process may use: its CPU affinity, its cgroup's quota, SLURM_CPUS_PER_TASK and (when the
    user set it) OMP_NUM_THREADS, whichever is smallest.  Under mpiexec or torchrun, ranks that were not bound
    to cores of their own share the machine's: each gets its part."""
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:   # not Linux
        affinity = os.cpu_count() or 1
    counts = [affinity, cgroup_cpus()]
    ranks = _positive_int(next((environ[v] for v in LOCAL_RANKS if environ.get(v)), ""))
    if ranks and affinity >= (os.cpu_count() or 1):
        counts.append(max(1, affinity // ranks))
    counts += [_positive_int(environ.get(v, "")) for v in ("SLURM_CPUS_PER_TASK", "OMP_NUM_THREADS")]
    return max(1, min(c for c in counts if c))


def thread_count(text: str) -> int:
    """The argparse type of --threads: a positive integer."""
    import argparse

    n = _positive_int(text) if str(text).strip().isdigit() else None
    if n is None:
        raise argparse.ArgumentTypeError(f"expected a positive number of threads, got {text!r}")
    return n


def choose_threads(threads: int | None = None, work: float | None = None, cores: int | None = None) -> int:
    """Intra-op threads: `threads` when given (the user's choice wins), else one per ATOMS_PER_THREAD atoms per
    evaluation in `work` (None: unknown, all cores), at most `cores` (default: usable_cores())."""
    if threads:
        return int(threads)
    cores = usable_cores() if cores is None else cores
    if work is None:
        return cores
    return max(1, min(cores, int(work // ATOMS_PER_THREAD)))


def configure_threads(threads: int | None = None, work: float | None = None) -> int:
    """Set torch's intra-op threads by choose_threads; returns the count."""
    import torch

    n = choose_threads(threads, work)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


def training_work(config: dict) -> int | None:
    """Atoms per step of a normalised `dpmd train` input: batch size x atoms of its largest system (None when a
    system is not a deepmd/npy directory)."""
    from dpmd.data import find_systems

    data = config["training"]["training_data"]
    paths = [p for root in data["systems"] for p in find_systems(root)]
    sizes = data["batch_size"] if isinstance(data["batch_size"], list) else [data["batch_size"]] * len(paths)
    work = []
    for path, size in zip(paths, sizes):
        try:
            natoms = len(Path(path, "type.raw").read_text().split())
        except OSError:
            return None
        if isinstance(size, str):   # "auto[:N]": at least N (32) atoms per batch; "max:N": at most N, one frame
            kind, _, n = size.partition(":")
            rule = int(n) if n else 32
            size = math.ceil(rule / max(natoms, 1)) if kind == "auto" else max(1, rule // max(natoms, 1))
        work.append(size * natoms)
    return max(work, default=None)
