"""Convert DFT outputs (VASP, Quantum ESPRESSO, CP2K, extxyz, ...) to deepmd/npy via dpdata.

dpdata does the parsing; the frames are then written with :func:`write_system`, so the
output is atomic (temp dir + rename) and follows the layout in :mod:`dpmd.data.system`.
A source holding several compositions (e.g. an extxyz with mixed formulas) is written
as one sub-directory per composition, named by its formula (``out_dir/H2O1``).
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
from pathlib import Path
from typing import Sequence

import numpy as np

from dpmd.data.system import MIXED_TYPES, System, remap_by_name, replace_dir, temp_dir_for, write_system
from dpmd.errors import DataError

__all__ = ["convert", "guess_format", "add_convert_arguments", "run_convert"]

# dpdata formats whose LabeledSystem reader returns only the first frame of a multi-frame file
_MULTI_FRAME_XYZ = {"extxyz", "quip/gap/xyz", "quip/gap/xyz_file", "mace/xyz", "nequip/xyz", "gpumd/xyz"}
_COMMON_FORMATS = "vasp/outcar, vasp/xml, qe/pw/scf, cp2k/output, extxyz, ase/structure, deepmd/npy"
# dpdata formats read from a file prefix, not a path: the PREFIX.<ext> files their labelled reader needs
# (a tuple: either file; qe/cp/traj also reads PREFIX.cel and PREFIX.str when present)
_PREFIX_FORMATS = {"qe/cp/traj": (".in", ".pos", ".evp", ".for"), "openmx/md": (".dat", ".md"),
                   "amber/md": (".parm7", ".nc", ".mdfrc", (".mden", ".mdout"))}


def _import_dpdata():
    try:
        import dpdata
    except ImportError:
        raise DataError("converting DFT outputs needs dpdata (pip install dpdata)") from None
    return dpdata


def _prefix_files(prefix: str, fmt: str) -> tuple[list[str], list[str]]:
    """(the files `fmt` reads from `prefix`, those of them missing), each as PREFIX.ext (or "A or B")."""
    needed, missing = [], []
    for ext in _PREFIX_FORMATS[fmt]:
        names = [prefix + e for e in (ext if isinstance(ext, tuple) else (ext,))]
        needed.append(" or ".join(names))
        if not any(os.path.isfile(n) for n in names):
            missing.append(needed[-1])
    return needed, missing


def _prefix_format(prefix: str) -> str | None:
    """The prefix format all of whose files are there (for -f auto), else None."""
    return next((fmt for fmt in _PREFIX_FORMATS if not _prefix_files(prefix, fmt)[1]), None)


def _is_mixed(path) -> bool:
    """A deepmd/npy folder in the mixed-type layout (set.*/real_atom_types.npy)."""
    return bool(glob.glob(os.path.join(glob.escape(os.fspath(path)), "set.*", MIXED_TYPES)))


def guess_format(src) -> str:
    """dpdata format name guessed from the file name (and, for .out/.log, its first lines)."""
    src = os.fspath(src)
    name = os.path.basename(os.path.normpath(src))
    low = name.lower()
    if os.path.isdir(src) and os.path.isfile(os.path.join(src, "type.raw")):
        return "deepmd/npy/mixed" if _is_mixed(src) else "deepmd/npy"
    if name.startswith("OUTCAR"):
        return "vasp/outcar"
    if low.endswith((".xyz", ".extxyz")):
        return "extxyz"
    if low.startswith("vasprun") and low.endswith(".xml"):
        return "vasp/xml"
    if low.endswith((".out", ".log")) and os.path.isfile(src):
        with open(src, errors="replace") as f:
            head = f.read(200_000)
        if "Program PWSCF" in head:
            return "qe/pw/scf"
        if "CP2K" in head:
            return "cp2k/output"
    raise DataError(f"{src}: cannot guess the format from the file name; pass one with -f (e.g. {_COMMON_FORMATS})")


def _to_system(ls, path: str) -> System:
    """A dpdata (Labeled)System -> System."""
    d = ls.data
    nopbc = bool(d.get("nopbc", False))

    def get(key):
        v = d.get(key)
        return None if v is None else np.asarray(v, dtype=np.float64)

    return System(
        path=path,
        type_map=[str(n) for n in d["atom_names"]],
        atype=np.asarray(d["atom_types"], dtype=np.int64),
        coord=get("coords"),
        box=None if nopbc else get("cells"),
        energy=None if get("energies") is None else get("energies").reshape(-1),
        force=get("forces"),
        virial=get("virials"),
    )


def _read(dpdata, src, fmt: str) -> list:
    """Read ``src`` with dpdata into a list of dpdata systems (one per composition)."""
    fmtcls = dpdata.format.Format.get_formats()[fmt]
    labeled = fmtcls.from_labeled_system is not dpdata.format.Format.from_labeled_system
    cls = dpdata.LabeledSystem if labeled else dpdata.System
    if fmt == "ase/structure":  # dpdata wants ase.Atoms objects here; read the file with ase
        if isinstance(src, (str, os.PathLike)):
            import ase.io

            frames = ase.io.read(src, index=":")
        else:
            frames = src if isinstance(src, (list, tuple)) else [src]
        ms = dpdata.MultiSystems()
        for atoms in frames:
            ms.append(cls(atoms, fmt=fmt) if atoms.calc is not None else dpdata.System(atoms, fmt=fmt))
        return list(ms)
    if fmt in _MULTI_FRAME_XYZ:
        return list(dpdata.MultiSystems.from_file(src, fmt=fmt))
    try:
        return [cls(src, fmt=fmt)]
    except Exception as first:  # several compositions in one source: try MultiSystems
        try:
            systems = list(dpdata.MultiSystems.from_file(src, fmt=fmt))
        except Exception:
            systems = []
        if not systems:
            raise first from None  # report the LabeledSystem error, the more telling one
        return systems


def _formula(s: System) -> str:
    counts = np.bincount(s.atype, minlength=len(s.type_map))
    return "".join(f"{n}{c}" for n, c in sorted(zip(s.type_map, counts)) if c > 0)  # e.g. "H2O1"


def _convert(src, fmt: str, out_dir, type_map=None, overwrite: bool = False) -> list[tuple[str, System]]:
    dpdata = _import_dpdata()
    label = src if isinstance(src, (str, os.PathLike)) else "<ase.Atoms>"
    label = os.fspath(label)
    if isinstance(src, (str, os.PathLike)):
        if fmt == "auto" and not os.path.exists(label):
            fmt = _prefix_format(label) or fmt
        if fmt in _PREFIX_FORMATS:   # PREFIX itself need not exist
            needed, missing = _prefix_files(label, fmt)
            if missing:
                raise DataError(f"{label}: {fmt} reads the files of this prefix ({', '.join(needed)}); "
                                f"missing {', '.join(missing)}")
        elif not os.path.exists(label):
            raise DataError(f"{label}: does not exist")
    if fmt == "auto":
        fmt = guess_format(src)
    if fmt == "deepmd/npy" and isinstance(src, (str, os.PathLike)) and _is_mixed(src):
        fmt = "deepmd/npy/mixed"  # read as deepmd/npy, every atom would get type.raw's placeholder type
    if fmt not in dpdata.format.Format.get_formats():
        raise DataError(f"{label}: unknown format {fmt!r} (valid formats include {_COMMON_FORMATS})")
    try:
        raw = _read(dpdata, os.fspath(src) if isinstance(src, os.PathLike) else src, fmt)
    except DataError:
        raise
    except Exception as e:
        msg = " ".join(str(e).split()) or type(e).__name__
        raise DataError(f"{label}: cannot read as {fmt!r} ({type(e).__name__}: {msg[:200]})") from None
    systems = [_to_system(s, label) for s in raw if s.get_nframes() > 0]
    if not systems:
        raise DataError(f"{label}: no frames found when reading as {fmt!r}")
    if type_map is None:  # one shared type map, so ids mean the same element in every output
        type_map = []
        for s in systems:
            type_map += [n for n in s.type_map if n not in type_map]
    for s in systems:
        remap_by_name(s, type_map)

    out_dir = Path(out_dir)
    if len(systems) == 1:
        write_system(systems[0], out_dir, overwrite=overwrite)
        systems[0].path = str(out_dir)
        return [(str(out_dir), systems[0])]
    # several compositions: build all of them in one temp dir, then rename it into place
    tmp = temp_dir_for(out_dir, overwrite)
    written = []
    try:
        names: set[str] = set()
        for s in systems:
            name = _formula(s)
            while name in names:
                name += "_"
            names.add(name)
            write_system(s, tmp / name)
            s.path = str(out_dir / name)
            written.append((s.path, s))
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return written


def convert(src, fmt: str, out_dir, type_map: Sequence[str] | None = None, overwrite: bool = False) -> list[str]:
    """Convert ``src`` (a file, directory, file prefix for qe/cp/traj, openmx/md and amber/md, or ase.Atoms for
    "ase/structure") to deepmd/npy.

    ``fmt`` is a dpdata format name or "auto". With ``type_map`` the written type ids
    follow it (an element missing from it is a DataError). Returns the written system dirs.
    """
    return [p for p, _ in _convert(src, fmt, out_dir, type_map, overwrite)]


def add_convert_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``dpmd convert SRC... -f FMT -o OUT [-t O H]``."""
    parser.add_argument("src", nargs="+", help="DFT output files (OUTCAR, vasprun.xml, *.xyz, pw.x output, ...), or the prefix of a "
                        "run's files (qe/cp/traj: PREFIX.in, PREFIX.pos, ...)")
    parser.add_argument("-f", "--fmt", default="auto", help=f"dpdata format name, or 'auto' (default); e.g. {_COMMON_FORMATS}")
    parser.add_argument("-o", "--out", required=True, help="output directory (one sub-directory per source when several)")
    parser.add_argument("-t", "--type-map", nargs="+", default=None, metavar="EL", help="element order of the model, e.g. -t O H")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output directories")


def run_convert(args: argparse.Namespace) -> int:
    """Run the conversion; prints one line per written system: path, frames, atoms."""
    srcs = list(args.src)
    outs = [args.out] if len(srcs) == 1 else [os.path.join(args.out, f"{i:03d}") for i in range(len(srcs))]
    for src, out in zip(srcs, outs):
        for path, system in _convert(src, args.fmt, out, args.type_map, getattr(args, "overwrite", False)):
            print(f"{path}  {system.nframes} frames  {system.natoms} atoms  {' '.join(system.type_map)}")
    return 0
