"""Read and write DeePMD-kit training data ("deepmd/npy" and DeePMD's HDF5 layout).

A *system* is a set of frames that share the same atoms, in the same order::

    data_0/
        type.raw        one integer per line: the type id of each atom (natoms lines)
        type_map.raw    optional: element names, one per line; line i names type id i
        nopbc           optional empty marker file: the system is not periodic
        set.000/        frames, split into sets; sets are read in sorted order and
            coord.npy   [nframes, natoms*3]  Cartesian coordinates (Angstrom)
            box.npy     [nframes, 9]         lattice vectors as rows (absent allowed with nopbc)
            energy.npy  [nframes]            optional: total energy (eV)
            force.npy   [nframes, natoms*3]  optional: forces (eV/Angstrom)
            virial.npy  [nframes, 9]         optional: virial (eV)
            fparam.npy  [nframes, nfp]       optional: frame parameters (the model's numb_fparam = nfp)
            aparam.npy  [nframes, natoms*nap] optional: atomic parameters (numb_aparam = nap per atom)
        set.001/ ...

A *mixed-type* system (DeePMD-kit's and dpdata's "deepmd/npy/mixed") holds frames of different compositions
with the same atom count in one folder: type.raw only gives the atom count (dpdata writes zeros), type_map.raw
names the types, and every set holds ``real_atom_types.npy`` [nframes, natoms], the types of each frame.  It is
read as one System per distinct type array (same frames, same labels), named ``folder[frames 0-2,7]`` by the
folder's frame numbers, with ``source`` / ``source_frames`` pointing back at the folder: DeePMD-kit counts the
folder as ONE system when it weighs systems (see :func:`source_groups`).

The HDF5 layout holds the same names as datasets inside a group (``type.raw`` as
an integer dataset, ``type_map.raw`` as byte strings, ``set.000/coord.npy`` ...,
``nopbc`` as any dataset). Such a system is addressed as ``"file.h5#/group"``;
without ``#/group`` the file's root group is used.

Everything is returned as float64 / int64, whatever the dtype on disk. Any
problem with the data raises :class:`dpmd.errors.DataError` with a one-line
message naming the file and what was expected; NaN or inf values and atoms
closer than MIN_PAIR_DISTANCE (periodic images included) are refused, naming
the frame and the atoms.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from dpmd.errors import DataError

__all__ = ["System", "load_system", "load_systems", "find_systems", "write_system", "check_params", "source_groups"]

H5_SUFFIXES = (".h5", ".hdf5")
# Atoms closer than this (Å) are refused: the shortest bond (H2) is 0.74 Å, so such a pair is a duplicated
# atom or coordinates in the wrong unit, and at distance 0 the descriptor's 1/r makes the loss NaN.
MIN_PAIR_DISTANCE = 0.1
_CLOSE_PAIR_CHUNK = 1 << 20  # atoms (all frames together) checked for close pairs at once
# name -> values per atom (per-atom arrays) or per frame (per-frame arrays)
_PER_ATOM = {"coord": 3, "force": 3}
_PER_FRAME = {"box": 9, "virial": 9, "energy": 1}
# model inputs of any width: values per frame (fparam) or per atom (aparam), the width set by the model
_PARAMS = ("fparam", "aparam")
MIXED_TYPES = "real_atom_types.npy"  # in every set of a mixed-type system: (nframes, natoms) type ids
VIRTUAL = -1  # a mixed system's padding atom (real_atom_types), as dpdata and DeePMD-kit mark it
_ATOM_AXIS = ("coord", "force", "aparam")  # arrays with an atom axis (axis 1)


@dataclass
class System:
    """Frames of one system. Shapes: see the module docstring; box is None when not periodic."""

    path: str
    type_map: list[str]
    atype: np.ndarray
    coord: np.ndarray
    box: np.ndarray | None = None
    energy: np.ndarray | None = None
    force: np.ndarray | None = None
    virial: np.ndarray | None = None
    fparam: np.ndarray | None = None  # (nframes, numb_fparam)
    aparam: np.ndarray | None = None  # (nframes, natoms, numb_aparam)
    source: str | None = None  # a part of a mixed-type folder: that folder (None for an ordinary system)
    source_frames: np.ndarray | None = None  # (nframes,) each frame's number in `source`

    @property
    def nframes(self) -> int:
        return int(self.coord.shape[0])

    @property
    def natoms(self) -> int:
        return int(self.atype.shape[0])

    @property
    def pbc(self) -> bool:
        return self.box is not None

    def subset(self, frames) -> "System":
        """A new System with the selected frames (a slice, an index, or an index/bool array)."""
        if isinstance(frames, (int, np.integer)):
            frames = [int(frames)]
        if not isinstance(frames, slice):
            frames = np.asarray(frames)

        def pick(a):
            return None if a is None else np.array(a[frames])

        return System(
            path=self.path,
            type_map=list(self.type_map),
            atype=self.atype.copy(),
            coord=pick(self.coord),
            box=pick(self.box),
            energy=pick(self.energy),
            force=pick(self.force),
            virial=pick(self.virial),
            fparam=pick(self.fparam),
            aparam=pick(self.aparam),
            source=self.source,
            source_frames=pick(self.source_frames),
        )

    def __repr__(self) -> str:
        labels = [k for k in ("energy", "force", "virial") if getattr(self, k) is not None]
        return (
            f"System({self.path!r}, nframes={self.nframes}, natoms={self.natoms}, "
            f"type_map={self.type_map}, pbc={self.pbc}, labels={labels})"
        )


# --------------------------------------------------------------------------- storage


class _DirStore:
    """A deepmd/npy system directory."""

    def __init__(self, path: str):
        self.root = Path(path)
        self.label = str(path)

    def where(self, name: str) -> str:
        return os.path.join(self.label, name)

    def has(self, name: str) -> bool:
        return (self.root / name).exists()

    def sets(self) -> list[str]:
        return sorted(p.name for p in self.root.glob("set.*") if p.is_dir())

    def read_lines(self, name: str) -> list[str]:
        try:
            text = (self.root / name).read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"{self.where(name)}: cannot read ({e})") from None
        return [ln.strip() for ln in text.splitlines() if ln.strip()]

    def read_array(self, name: str) -> np.ndarray:
        try:
            return np.load(self.root / name, allow_pickle=False)
        except ValueError as e:
            if "Object arrays" in str(e):
                raise DataError(
                    f"{self.where(name)}: holds Python objects, expected a numeric array"
                ) from None
            detail = "" if "pickle" in str(e) else f" ({e})"  # numpy takes non-npy bytes for a pickle
            raise DataError(f"{self.where(name)}: not a valid .npy file{detail}") from None
        except (OSError, EOFError) as e:
            raise DataError(f"{self.where(name)}: not a valid .npy file ({e})") from None


class _H5Store:
    """A system stored as a group of an HDF5 file."""

    def __init__(self, file: str, group: str):
        try:
            import h5py
        except ImportError:
            raise DataError(f"{file}: reading HDF5 needs h5py (pip install h5py)") from None
        self.file, self.group = file, group or "/"
        self.label = f"{file}#{self.group}"
        try:
            self._h5 = h5py.File(file, "r")
        except OSError as e:
            raise DataError(f"{file}: not a readable HDF5 file ({e})") from None
        if self.group not in self._h5 or not isinstance(self._h5[self.group], h5py.Group):
            self._h5.close()
            raise DataError(f"{file}: has no group {self.group!r}")
        self.g = self._h5[self.group]

    def close(self):
        self._h5.close()

    def where(self, name: str) -> str:
        return f"{self.file}#{self.group.rstrip('/')}/{name}"

    def has(self, name: str) -> bool:
        return name in self.g

    def sets(self) -> list[str]:
        import h5py

        return sorted(k for k in self.g.keys() if k.startswith("set.") and isinstance(self.g[k], h5py.Group))

    def read_lines(self, name: str) -> list[str]:
        arr = np.atleast_1d(self.g[name][()])
        out = []
        for v in arr.ravel():
            s = v.decode() if isinstance(v, bytes) else str(v)
            out.extend(t.strip() for t in s.splitlines() if t.strip())
        return out

    def read_array(self, name: str) -> np.ndarray:
        try:
            return np.asarray(self.g[name][()])
        except Exception as e:  # h5py raises various types for odd datasets
            raise DataError(f"{self.where(name)}: cannot read dataset ({e})") from None


def _split_h5(path: str) -> tuple[str, str] | None:
    """'file.h5#/grp' -> ('file.h5', '/grp'); 'file.h5' -> ('file.h5', '/'); else None."""
    path = os.fspath(path)
    if "#" in path:
        file, group = path.split("#", 1)
        return file, group or "/"
    if path.lower().endswith(H5_SUFFIXES) and os.path.isfile(path):
        return path, "/"
    return None


def _open(path) -> _DirStore | _H5Store:
    path = os.fspath(path)
    h5 = _split_h5(path)
    if h5 is not None:
        file, group = h5
        if not os.path.exists(file):
            raise DataError(f"{file}: system file does not exist")
        return _H5Store(file, group)
    if not os.path.exists(path):
        raise DataError(f"{path}: system directory does not exist")
    if not os.path.isdir(path):
        raise DataError(f"{path}: expected a system directory (with type.raw and set.*/) or an .h5 file")
    return _DirStore(path)


# --------------------------------------------------------------------------- reading


def _read_atype(store) -> np.ndarray:
    where = store.where("type.raw")
    if not store.has("type.raw"):
        raise DataError(f"{where}: missing (every system needs type.raw, one type id per atom)")
    if isinstance(store, _H5Store):
        raw = store.read_array("type.raw")
        if raw.dtype.kind in "iu":
            tokens = [str(int(v)) for v in raw.ravel()]
        else:
            tokens = store.read_lines("type.raw")
    else:
        tokens = [t for ln in store.read_lines("type.raw") for t in ln.split()]
    if not tokens:
        raise DataError(f"{where}: is empty, expected one integer type id per atom")
    atype = np.empty(len(tokens), dtype=np.int64)
    for i, tok in enumerate(tokens):
        try:
            atype[i] = int(tok)
        except ValueError:
            raise DataError(f"{where}: atom {i} has type {tok!r}, expected a non-negative integer") from None
    bad = np.flatnonzero(atype < 0)
    if bad.size:
        raise DataError(f"{where}: atom {bad[0]} has negative type {atype[bad[0]]}")
    return atype


def _numeric(store, name: str, arr: np.ndarray) -> np.ndarray:
    if arr.dtype.kind not in "fiu":
        raise DataError(f"{store.where(name)}: has dtype {arr.dtype}, expected numbers (float or int)")
    return arr.astype(np.float64)


def _check_finite(store, name: str, key: str, arr: np.ndarray) -> None:
    """NaN or inf anywhere in a label or coordinate makes every loss it enters NaN: name frame (and atom)."""
    bad = ~np.isfinite(arr)
    if bad.any():
        at = np.argwhere(bad)[0]
        where = f"frame {at[0]}, atom {at[1]}" if key in _PER_ATOM or key == "aparam" else f"frame {at[0]}"
        raise DataError(f"{store.where(name)}: {where} holds a non-finite value ({arr[tuple(at)]})")


def find_close_pair(coord: np.ndarray, box: np.ndarray | None, threshold: float = MIN_PAIR_DISTANCE):
    """A pair of atoms closer than ``threshold`` Å, periodic images included, as (frame, i, j, distance,
    through_boundary) with i < j; None if there is none.  coord (F, N, 3), box (F, 3, 3) or None."""
    step = max(1, _CLOSE_PAIR_CHUNK // max(1, coord.shape[1]))  # bounded memory: ~100 bytes per atom
    for f0 in range(0, coord.shape[0], step):
        pair = _close_pair(coord[f0:f0 + step], None if box is None else box[f0:f0 + step], threshold)
        if pair is not None:
            return (pair[0] + f0, *pair[1:])
    return None


def _close_pair(coord: np.ndarray, box: np.ndarray | None, threshold: float):
    """find_close_pair of one chunk of frames.

    Vectorised over the frames: atoms are hashed into grid cells at least 4 * threshold wide (measured
    between lattice planes), in 4 grids shifted by a quarter cell along the diagonal.  Along each axis the
    cell faces of all grids are a quarter cell apart, so a close pair (less than a quarter cell apart)
    straddles a face in at most one grid per axis, at most 3 of the 4 grids: it shares a cell in at
    least one.  Four sorts give every candidate; their exact distances decide.
    """
    nf, n = coord.shape[:2]
    if n < 2:
        return None
    width = 4.0 * threshold
    cap = max(2, int((2.0 ** 62 / nf) ** (1 / 3)) - 1)  # cells per axis: frame and cell in one int64 key
    if box is not None:
        inv = np.linalg.inv(box)
        frac = coord @ inv  # unwrapped: a pair's image is relative to the input
        heights = 1.0 / np.linalg.norm(inv, axis=1)  # spacing of the lattice planes i: 1 / |column i of inv|
        ncell = np.clip(np.floor(heights / width), 1, cap).astype(np.int64)
        pos = (frac - np.floor(frac)) * ncell[:, None, :]
    else:
        pos = coord - coord.min(axis=1, keepdims=True)
        cell_width = np.maximum(width, pos.max(axis=(1, 2)) / (cap - 1))  # wide enough for the cap
        pos = pos / cell_width[:, None, None]
        ncell = np.floor(pos.max(axis=1)).astype(np.int64) + 2  # room for the shifts
    stride = ncell.max(axis=0)
    flat = pos.reshape(-1, 3)
    per_atom = np.repeat(ncell, n, axis=0)
    frame = np.repeat(np.arange(nf, dtype=np.int64), n)
    for shift in (0.0, 0.25, 0.5, 0.75):
        cell = (flat + shift).astype(np.int64)  # floor: pos >= 0
        if box is not None:  # periodic: the cell cut by the box face continues on the other side
            cell = np.where(cell >= per_atom, cell - per_atom, cell)
        key = ((frame * stride[0] + cell[:, 0]) * stride[1] + cell[:, 1]) * stride[2] + cell[:, 2]
        order = np.argsort(key)
        key = key[order]
        k = 1
        while k < key.size and (same := np.flatnonzero(key[k:] == key[:-k])).size:  # pairs k apart in a cell
            a, b = order[same], order[same + k]
            f, i, j = a // n, a % n, b % n
            if box is not None:
                dfrac = frac[f, j] - frac[f, i]
                image = np.round(dfrac)
                dist = np.linalg.norm(((dfrac - image)[:, None, :] @ box[f])[:, 0], axis=1)
            else:
                image = np.zeros((f.size, 3))
                dist = np.linalg.norm(coord[f, j] - coord[f, i], axis=1)
            close = np.flatnonzero(dist < threshold)
            if close.size:
                lo, hi = np.minimum(i, j), np.maximum(i, j)
                c = close[np.lexsort((hi[close], lo[close], f[close]))[0]]  # the first of those found
                return int(f[c]), int(lo[c]), int(hi[c]), float(dist[c]), bool(image[c].any())
            k += 1
    return None


def _read_set(store, set_name: str, natoms: int, want_box: bool, mixed: bool = False) -> dict[str, np.ndarray]:
    cname = f"{set_name}/coord.npy"
    if not store.has(cname):
        raise DataError(f"{store.where(cname)}: missing (every set.* needs coord.npy)")
    coord = _numeric(store, cname, store.read_array(cname))
    nf = coord.shape[0] if coord.ndim >= 2 else (1 if coord.size else 0)
    if nf == 0 or coord.size == 0:
        raise DataError(f"{store.where(cname)}: set has 0 frames, expected at least one")
    out = {}
    names = ["coord", "force", "energy", "virial"] + (["box"] if want_box else [])
    for key in names:
        fname = f"{set_name}/{key}.npy"
        if key == "coord":
            arr = coord
        elif store.has(fname):
            arr = _numeric(store, fname, store.read_array(fname))
        elif key == "box":
            raise DataError(
                f"{store.where(fname)}: missing (periodic systems need box.npy; "
                f"add an empty 'nopbc' file for non-periodic ones)"
            )
        else:
            continue
        if key in _PER_ATOM:
            per = _PER_ATOM[key] * natoms
            expect = f"{natoms}*{_PER_ATOM[key]}={per}"
        else:
            per = _PER_FRAME[key]
            expect = str(per)
        # rows are frames ([nframes, ...]); a flat array is accepted when its size fits
        rows = arr.shape[0] if arr.ndim >= 2 or (arr.ndim == 1 and key == "energy") else None
        if rows is not None and rows != nf:
            raise DataError(f"{store.where(fname)}: has {rows} frames, but coord.npy has {nf}")
        if arr.size != nf * per:
            suffix = " (from type.raw)" if key in _PER_ATOM else ""
            raise DataError(
                f"{store.where(fname)}: expected {expect} values per frame{suffix}, "
                f"got {arr.size // nf if arr.size % nf == 0 else arr.size / nf:g}"
            )
        if key in _PER_ATOM:
            arr = arr.reshape(nf, natoms, 3)
        elif key == "energy":
            arr = arr.reshape(nf)
        else:
            arr = arr.reshape(nf, 3, 3)
        _check_finite(store, fname, key, arr)
        out[key] = arr
    for key in _PARAMS:
        fname = f"{set_name}/{key}.npy"
        if store.has(fname):
            out[key] = _read_params(store, fname, key, nf, natoms)
    if "box" in out:
        det = np.linalg.det(out["box"])
        bad = np.flatnonzero(np.abs(det) < 1e-8)
        if bad.size:
            raise DataError(
                f"{store.where(set_name + '/box.npy')}: frame {bad[0]} has a singular box (volume 0); "
                f"use an empty 'nopbc' file for non-periodic systems"
            )
    if mixed:
        out["types"] = _read_real_types(store, set_name, nf, natoms)
    pair = _real_close_pair(out["coord"], out.get("box"), out["types"] if mixed else None)
    if pair is not None:
        f, i, j, dist, image = pair
        raise DataError(
            f"{store.where(cname)}: frame {f}: atoms {i} and {j} are {dist:.3g} Å apart"
            f"{' (periodic image)' if image else ''}, closer than {MIN_PAIR_DISTANCE} Å "
            f"(a duplicated atom, or coordinates not in Å?)"
        )
    return out


def _real_close_pair(coord, box, types):
    """find_close_pair among the real atoms: a mixed system's virtual atoms (all at one point) are left out, the
    frames grouped by which atoms are real; atoms are numbered as in the file."""
    if types is None or (types != VIRTUAL).all():
        return find_close_pair(coord, box)
    masks, inverse = np.unique(types != VIRTUAL, axis=0, return_inverse=True)
    found = []
    for k, real in enumerate(masks):
        frames = np.flatnonzero(inverse.reshape(-1) == k)
        pair = find_close_pair(coord[frames][:, real], None if box is None else box[frames])
        if pair is not None:
            atoms = np.flatnonzero(real)
            found.append((int(frames[pair[0]]), int(atoms[pair[1]]), int(atoms[pair[2]]), *pair[3:]))
    return min(found) if found else None


def _read_params(store, fname: str, key: str, nf: int, natoms: int) -> np.ndarray:
    """fparam.npy as (nframes, nfp) or aparam.npy as (nframes, natoms, nap): any width, checked against the
    model when it is used (check_params)."""
    arr = _numeric(store, fname, store.read_array(fname))
    rows = arr.shape[0] if arr.ndim >= 2 else None
    if rows is not None and rows != nf:
        raise DataError(f"{store.where(fname)}: has {rows} frames, but coord.npy has {nf}")
    per = nf if key == "fparam" else nf * natoms
    if arr.size == 0 or arr.size % per:
        shape = ("[nframes, numb_fparam]" if key == "fparam"
                 else f"[nframes, {natoms}*numb_aparam] (natoms from type.raw)")
        raise DataError(f"{store.where(fname)}: {arr.size} values do not fill {nf} frames: expected {shape}")
    arr = arr.reshape(nf, -1) if key == "fparam" else arr.reshape(nf, natoms, -1)
    _check_finite(store, fname, key, arr)
    return arr


def check_params(system: System, numb_fparam: int, numb_aparam: int, default_fparam=None) -> None:
    """The system holds what a model with numb_fparam / numb_aparam inputs needs (fparam.npy may be absent when
    the model has a default_fparam), of the model's widths; else a one-line DataError naming the system."""
    for key, width in (("fparam", numb_fparam), ("aparam", numb_aparam)):
        arr = getattr(system, key)
        per = "frame" if key == "fparam" else "atom"
        if arr is None and width > 0 and not (key == "fparam" and default_fparam is not None):
            raise DataError(f"{system.path}: no {key}.npy in its sets, but the model takes {width} {key} value(s) "
                            f"per {per} (numb_{key} = {width})")
        if arr is not None and width > 0 and arr.shape[-1] != width:  # (a model without them ignores them)
            raise DataError(f"{system.path}: {key}.npy holds {arr.shape[-1]} value(s) per {per}, but the model's "
                            f"numb_{key} is {width}")


def _first_at(mask: np.ndarray) -> tuple[tuple, str]:
    """The first True of a type array (atoms, or frames x atoms) and its words: "atom 3" / "frame 2, atom 3"."""
    at = tuple(int(v) for v in np.argwhere(mask)[0])
    return at, (f"atom {at[0]}" if len(at) == 1 else f"frame {at[0]}, atom {at[1]}")


def _remap_types(store, atype, sys_names, type_map, name="type.raw"):
    """Return (atype, names) with atype indexing into the final names.  atype: the ids of type.raw (natoms,), or of
    a mixed system's set.*/real_atom_types.npy (frames, natoms), `name` the file they came from."""
    if sys_names is not None and (atype >= len(sys_names)).any():
        at, words = _first_at(atype >= len(sys_names))
        raise DataError(f"{store.where(name)}: {words} has type {atype[at]}, but type_map.raw names only "
                        f"{len(sys_names)} types {sys_names}")
    if type_map is None:
        if sys_names is not None:
            return atype, list(sys_names)
        return atype, [f"Type_{i}" for i in range(int(atype.max()) + 1)]
    type_map = list(type_map)
    if sys_names is None:
        if (atype >= len(type_map)).any():
            at, words = _first_at(atype >= len(type_map))
            raise DataError(f"{store.where(name)}: {words} has type {atype[at]}, but the model's type_map {type_map} "
                            f"has only {len(type_map)} types (and there is no type_map.raw)")
        return atype, type_map
    lookup = np.full(len(sys_names), -1, dtype=np.int64)
    real = atype != VIRTUAL  # a mixed system's padding atoms (dropped when it is split) keep type -1
    for t in np.unique(atype[real]):
        element = sys_names[t]
        if element not in type_map:
            raise DataError(
                f"{store.where('type_map.raw')}: element {element!r} is not in the model's type_map {type_map}"
            )
        lookup[t] = type_map.index(element)
    return np.where(real, lookup[atype], VIRTUAL), type_map


def _read_real_types(store, set_name: str, nf: int, natoms: int) -> np.ndarray:
    """A mixed system's set.*/real_atom_types.npy as (nframes, natoms) int64, checked: integers, non-negative."""
    name = f"{set_name}/{MIXED_TYPES}"
    arr = store.read_array(name)
    if arr.dtype.kind == "f" and np.array_equal(arr, np.round(arr)):  # a float dump of integer ids
        arr = arr.astype(np.int64)
    if arr.dtype.kind not in "iu":
        raise DataError(f"{store.where(name)}: has dtype {arr.dtype}, expected integer type ids")
    if arr.size != nf * natoms or (arr.ndim >= 2 and arr.shape[0] != nf):
        raise DataError(f"{store.where(name)}: has shape {arr.shape}, expected [{nf}, {natoms}] (frames of "
                        f"coord.npy, atoms of type.raw)")
    arr = arr.astype(np.int64).reshape(nf, natoms)
    if (arr < VIRTUAL).any():
        at, words = _first_at(arr < VIRTUAL)
        raise DataError(f"{store.where(name)}: {words} has type {arr[at]}, expected a type id >= 0 (or -1: a "
                        f"virtual atom)")
    empty = np.flatnonzero((arr == VIRTUAL).all(axis=1))
    if empty.size:
        raise DataError(f"{store.where(name)}: frame {empty[0]} has only virtual atoms (type -1)")
    return arr


def _frame_ranges(frames: np.ndarray) -> str:
    """[0, 1, 2, 7, 9, 10] -> "0-2,7,9-10": the folder's frames of a mixed system's part, for its name."""
    runs = np.split(frames, np.flatnonzero(np.diff(frames) != 1) + 1)
    return ",".join(f"{r[0]}" if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in runs)


def _split_mixed(label: str, types: np.ndarray, names: list[str], data: dict) -> list[System]:
    """One System per distinct row of ``types`` (frames, natoms), in order of first appearance, without its
    virtual atoms (type -1: the padding of dpdata's atom_numb_pad, which DeePMD-kit leaves out of everything)."""
    rows, first, inverse = np.unique(types, axis=0, return_index=True, return_inverse=True)
    inverse = inverse.reshape(-1)
    parts = []
    for k in np.argsort(first):
        frames = np.flatnonzero(inverse == k)
        real = rows[k] != VIRTUAL
        picked = {key: None if a is None else (a[frames][:, real] if key in _ATOM_AXIS else a[frames])
                  for key, a in data.items()}
        parts.append(System(path=f"{label}[frames {_frame_ranges(frames)}]", type_map=list(names),
                            atype=rows[k][real], source=label, source_frames=frames, **picked))
    return parts


def source_groups(systems: Sequence[System]) -> list[int]:
    """For each system, the index of the DeePMD-kit system it belongs to: the parts of one mixed-type folder
    (consecutive in load order) share one, every other system has its own.  DeePMD-kit weighs a mixed folder as
    one system with all its frames (prob_sys_size: by its batches; sys_probs, batch_size lists and auto_prob
    blocks count it once)."""
    groups: list[int] = []
    for k, s in enumerate(systems):
        same = k > 0 and s.source is not None and s.source == systems[k - 1].source
        groups.append(groups[-1] if same else (groups[-1] + 1 if groups else 0))
    return groups


def load_system(path, type_map: Sequence[str] | None = None) -> System:
    """Read one system (a deepmd/npy directory, or "file.h5#/group").

    With ``type_map`` (the model's element names) the atom types are remapped by
    element name onto it; without type_map.raw the ids are taken as indices into it.
    A mixed-type folder is refused unless it holds a single composition (:func:`load_systems` splits it).
    """
    parts = _load_parts(path, type_map)
    if len(parts) > 1:
        raise DataError(f"{parts[0].source}: a mixed-type system with {len(parts)} compositions (real_atom_types.npy), "
                        f"expected one system of fixed atom types here")
    return parts[0]


def _load_parts(path, type_map: Sequence[str] | None = None) -> list[System]:
    """The system at ``path``: one System, or a mixed-type folder's parts (one per composition)."""
    store = _open(path)
    try:
        atype = _read_atype(store)
        natoms = len(atype)
        sys_names = store.read_lines("type_map.raw") if store.has("type_map.raw") else None
        nopbc = store.has("nopbc")
        sets = store.sets()
        if not sets:
            raise DataError(f"{store.label}: no set.* directory with frames found")
        mixed = [store.has(f"{s}/{MIXED_TYPES}") for s in sets]
        if any(mixed) and not all(mixed):
            odd = sets[mixed.index(not mixed[0])]
            raise DataError(f"{store.where(odd)}: {'has' if not mixed[0] else 'lacks'} {MIXED_TYPES}, but {sets[0]} "
                            f"{'does not' if not mixed[0] else 'does'} (a mixed-type system needs it in every set)")
        mixed = mixed[0]
        if mixed and sys_names is None and type_map is None:
            raise DataError(f"{store.where('type_map.raw')}: missing (a mixed-type system needs it to name its types)")
        if not mixed:
            atype, names = _remap_types(store, atype, sys_names, type_map)
        parts = [_read_set(store, s, natoms, want_box=not nopbc, mixed=mixed) for s in sets]
        if mixed:  # each set's ids checked against its own file, then remapped together
            types = [_remap_types(store, p.pop("types"), sys_names, type_map, f"{s}/{MIXED_TYPES}")
                     for s, p in zip(sets, parts)]
            names = types[0][1]
            atype = np.concatenate([t for t, _ in types])
        data = {}
        for key in ("coord", "box", "energy", "force", "virial", *_PARAMS):
            have = [key in p for p in parts]
            if not any(have):
                data[key] = None
                continue
            if not all(have):
                missing = sets[have.index(False)]
                present = sets[have.index(True)]
                raise DataError(
                    f"{store.where(missing + '/' + key + '.npy')}: missing, but {present}/{key}.npy "
                    f"exists (a label must be in all sets or none)"
                )
            widths = [p[key].shape[-1] for p in parts]
            if key in _PARAMS and len(set(widths)) > 1:
                k = next(k for k, w in enumerate(widths) if w != widths[0])
                raise DataError(f"{store.where(sets[k] + '/' + key + '.npy')}: {widths[k]} values per "
                                f"{'frame' if key == 'fparam' else 'atom'}, but {sets[0]}/{key}.npy has {widths[0]}")
            data[key] = np.concatenate([p[key] for p in parts])
    finally:
        if isinstance(store, _H5Store):
            store.close()
    if mixed:
        return _split_mixed(store.label, atype, names, data)
    return [System(path=store.label, type_map=names, atype=atype, **data)]


def _is_system(path) -> bool:
    path = os.fspath(path)
    h5 = _split_h5(path)
    if h5 is not None:
        if "#" not in path:  # a bare .h5 file: a system only if its root group holds type.raw
            return f"{path}#/" in _h5_groups(path)
        return True
    return os.path.isfile(os.path.join(path, "type.raw"))


def load_systems(paths, type_map: Sequence[str] | None = None) -> list[System]:
    """Read several systems. ``paths`` is one path or a list; a directory or .h5 file that is
    not itself a system is searched with :func:`find_systems`.

    Without ``type_map`` all systems are remapped onto the union of their element names
    (in order of first appearance), so that type ids mean the same element everywhere.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    expanded: list[str] = []
    for p in paths:
        p = os.fspath(p)
        if _is_system(p):
            expanded.append(p)
            continue
        found = find_systems(p)
        if not found:
            raise DataError(f"{p}: no system (a directory or HDF5 group with type.raw) found")
        expanded.extend(found)
    if type_map is not None:
        return [s for p in expanded for s in _load_parts(p, type_map)]
    systems = [s for p in expanded for s in _load_parts(p)]
    union: list[str] = []
    for s in systems:
        union += [n for n in s.type_map if n not in union]
    for s in systems:
        remap_by_name(s, union)
    return systems


def remap_by_name(system: System, type_map: Sequence[str]) -> None:
    """Re-express ``system.atype`` as indices into ``type_map`` (in place), by element name."""
    type_map = list(type_map)
    if system.type_map == type_map:
        return
    missing = sorted({system.type_map[t] for t in np.unique(system.atype)} - set(type_map))
    if missing:
        raise DataError(f"{system.path}: element {missing[0]!r} is not in the type_map {type_map}")
    lookup = np.array([type_map.index(n) if n in type_map else -1 for n in system.type_map], dtype=np.int64)
    system.atype, system.type_map = lookup[system.atype], type_map


def find_systems(root) -> list[str]:
    """Every system under ``root``, sorted: directories holding type.raw (recursively, hidden
    directories skipped), and for .h5/.hdf5 files every group holding type.raw, as
    "file.h5#/group/path" ("file.h5#/" for the root group)."""
    root = os.fspath(root)
    if not os.path.exists(root):
        raise DataError(f"{root}: does not exist")
    if os.path.isfile(root):
        return _h5_groups(root) if root.lower().endswith(H5_SUFFIXES) else []
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and not d.startswith("set."))
        if "type.raw" in filenames:
            found.append(dirpath)
        for f in sorted(filenames):
            if f.lower().endswith(H5_SUFFIXES):
                found.extend(_h5_groups(os.path.join(dirpath, f)))
    return sorted(found)


def _h5_groups(file: str) -> list[str]:
    try:
        import h5py
    except ImportError:
        raise DataError(f"{file}: reading HDF5 needs h5py (pip install h5py)") from None
    try:
        with h5py.File(file, "r") as h5:
            groups = ["/"] if "type.raw" in h5 else []

            def visit(name, obj):
                if isinstance(obj, h5py.Group) and "type.raw" in obj:
                    groups.append("/" + name)

            h5.visititems(visit)
    except OSError as e:
        raise DataError(f"{file}: not a readable HDF5 file ({e})") from None
    return sorted(f"{file}#{g}" for g in groups)


# --------------------------------------------------------------------------- writing


def _check_for_write(system: System, path: str) -> None:
    n, nf = system.natoms, system.nframes
    shapes = {"coord": (nf, n, 3), "force": (nf, n, 3), "box": (nf, 3, 3), "virial": (nf, 3, 3), "energy": (nf,)}
    for key in _PARAMS:  # any width (the model's numb_fparam / numb_aparam)
        if getattr(system, key) is not None:
            shapes[key] = (nf,) + ((n,) if key == "aparam" else ()) + np.shape(getattr(system, key))[-1:]
    for key, shape in shapes.items():
        arr = getattr(system, key)
        if arr is not None and np.shape(arr) != shape:
            raise DataError(f"{path}: System.{key} has shape {np.shape(arr)}, expected {shape}")
    if nf == 0:
        raise DataError(f"{path}: System has 0 frames, nothing to write")
    if system.atype.size and (system.atype.min() < 0 or system.atype.max() >= len(system.type_map)):
        raise DataError(f"{path}: System.atype has ids outside type_map {system.type_map}")


def write_system(system: System, path, set_size: int = 2000, overwrite: bool = False, dtype=np.float64) -> None:
    """Write ``system`` as a deepmd/npy directory at ``path``, atomically.

    Files are written into a temporary directory next to ``path`` that is then renamed
    into place, so readers never see a half-written system. An existing non-empty
    directory is only replaced with ``overwrite=True``. ``dtype`` is the float dtype on disk.
    """
    path = os.fspath(path)
    target = Path(path)
    _check_for_write(system, path)
    if set_size < 1:
        raise DataError(f"{path}: set_size must be >= 1, got {set_size}")
    tmp = temp_dir_for(target, overwrite)
    try:
        np.savetxt(tmp / "type.raw", system.atype.astype(np.int64), fmt="%d")
        (tmp / "type_map.raw").write_text("".join(f"{n}\n" for n in system.type_map))
        if not system.pbc:
            (tmp / "nopbc").touch()
        nf, n = system.nframes, system.natoms
        for i, start in enumerate(range(0, nf, set_size)):
            sl = slice(start, min(start + set_size, nf))
            sdir = tmp / f"set.{i:03d}"
            sdir.mkdir()
            arrays = {
                "coord": system.coord[sl].reshape(-1, n * 3),
                "box": None if system.box is None else system.box[sl].reshape(-1, 9),
                "energy": None if system.energy is None else system.energy[sl].reshape(-1),
                "force": None if system.force is None else system.force[sl].reshape(-1, n * 3),
                "virial": None if system.virial is None else system.virial[sl].reshape(-1, 9),
                "fparam": None if system.fparam is None else system.fparam[sl],
                "aparam": None if system.aparam is None else system.aparam[sl].reshape(len(system.aparam[sl]), -1),
            }
            for key, arr in arrays.items():
                if arr is not None:
                    np.save(sdir / f"{key}.npy", np.ascontiguousarray(arr, dtype=dtype))
        replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def temp_dir_for(target: Path, overwrite: bool) -> Path:
    """Check that ``target`` may be (re)written and make a temp dir next to it."""
    if target.exists():
        if not target.is_dir():
            raise DataError(f"{target}: exists and is not a directory")
        if any(target.iterdir()) and not overwrite:
            raise DataError(f"{target}: directory exists and is not empty (pass overwrite=True to replace it)")
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))


def replace_dir(tmp: Path, target: Path) -> None:
    """Move the finished directory ``tmp`` to ``target``, replacing what is there."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700; give it ordinary permissions
    if not target.exists():
        os.replace(tmp, target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    os.replace(target, old / "d")
    try:
        os.replace(tmp, target)
    except BaseException:
        os.replace(old / "d", target)  # put the old data back
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)


def read_atom_energy(system) -> np.ndarray:
    """(F, N): the per-atom energy labels (set.*/atom_ener.npy) of a system, read on demand (only `dpmd test -a`
    needs them, so load_system does not keep them); a mixed-type folder's part reads its frames and real atoms of
    the folder."""
    store = _open(system.source or system.path)
    try:
        natoms = system.natoms if system.source is None else len(_read_atype(store))
        parts, real = [], []
        for set_name in store.sets():
            name = f"{set_name}/atom_ener.npy"
            if not store.has(name):
                raise DataError(f"{store.where(name)}: missing (-a/--atomic tests per-atom energies: every set "
                                f"needs atom_ener.npy)")
            arr = _numeric(store, name, store.read_array(name))
            if arr.size % natoms:
                raise DataError(f"{store.where(name)}: expected {natoms} values per frame (from type.raw), "
                                f"got {arr.size} values")
            parts.append(arr.reshape(-1, natoms))
            if system.source is not None:
                real.append(_read_real_types(store, set_name, len(parts[-1]), natoms) != VIRTUAL)
    finally:
        if isinstance(store, _H5Store):
            store.close()
    atom_ener = np.concatenate(parts)
    if system.source is None:
        if len(atom_ener) != system.nframes:
            raise DataError(f"{store.label}: atom_ener.npy holds {len(atom_ener)} frames, coord.npy {system.nframes}")
        return atom_ener
    # a part: its frames of the folder (real_atom_types.npy, read with atom_ener.npy's frame count, checks that
    # the two agree), without the virtual atoms
    frames = system.source_frames
    return atom_ener[frames][:, np.concatenate(real)[frames[0]]]
