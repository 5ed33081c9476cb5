"""`training.stat_file`: a fresh model's data statistics in DeePMD-kit 3's layout (its PyTorch backend), so that
`dpmd train` reads a file written by `dp --pt train` and the other way round.

As in DeePMD-kit, the path is an HDF5 file when it ends in .h5 or .hdf5 (needs h5py), else a directory holding
one .npy-format file per entry (no suffix).  A model's entries live under a group named by its type map joined
with spaces:

    <type map>/<hash>/r_<t>, a_<t>   (3,) number, sum and squared sum of the environment matrix's radial (r) and
                                     angular (a) entries of the centres of type t, over all nnei slots (empty
                                     slots and excluded pairs count as zeros); <hash>: sha1 of the descriptor's
                                     settings (DeePMD-kit's EnvMatStatSe.get_hash); se_e2_r has r_<t> only; a
                                     hybrid has one such group per entry
    <type map>/bias_atom_energy      (ntypes, 1) least-squares energy per atom of each type
    <type map>/std_atom_energy       (ntypes, 1) the standard deviation of the frames' residual energies
    <type map>/observed_type         the type names in the data, by atomic number (DeePMD-kit's `observed_type`)

The descriptor's mean / std follow from the raw sums (dpmd.model.stats, DeePMD-kit's EnvMatStatSe.__call__), so a
file written from other frames or by the other program gives the same normalisation as it does there.  The
entries dpmd wrote before it used this layout (<type map>/dpmd-<hash>/davg, dstd, bias_atom_energy) are ignored
and left in the file.  Like DeePMD-kit's, the entries do not follow changes to the data: delete the file after
changing the training systems.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import torch

from dpmd.errors import ConfigError
from dpmd.files import atomic_write
from dpmd.model import stats
from dpmd.model.stats import env_width, stat_leaves

ENERGY = ("bias_atom_energy", "std_atom_energy")   # one pair: both or neither (DeePMD-kit's rule)
OBSERVED = "observed_type"


# ------------------------------------------------------------------ names
def group(model) -> str:
    return " ".join(model.type_map)


def env_hash(desc) -> str:
    """DeePMD-kit's EnvMatStatSe.get_hash: the settings the environment statistics depend on, in its key order
    (exclude_types is not among them there either)."""
    keys = {"type": "se_a" if env_width(desc) == 4 else "se_r", "ntypes": desc.ntypes, "rcut": round(desc.rcut, 2),
            "rcut_smth": round(desc.rcut_smth, 2), "nsel": desc.nnei, "sel": list(desc.sel),
            "mixed_types": bool(desc.mixed_types)}
    return hashlib.sha1(json.dumps(keys).encode("utf-8")).hexdigest()


def env_names(model) -> list[str]:
    """The entries of the descriptor's statistics (every entry of a hybrid)."""
    return [f"{group(model)}/{env_hash(leaf)}/{name}" for leaf in stat_leaves(model.descriptor)
            for name in _item_names(leaf)]


def energy_names(model) -> list[str]:
    return [f"{group(model)}/{name}" for name in ENERGY]


def observed_name(model) -> str:
    return f"{group(model)}/{OBSERVED}"


def _item_names(desc) -> list[str]:
    kinds = ("r", "a") if env_width(desc) == 4 else ("r",)
    return [f"{kind}_{t}" for t in range(desc.ntypes) for kind in kinds]


# ------------------------------------------------------------------ environment statistics
def env_items(model, moments: list[torch.Tensor]) -> dict[str, np.ndarray]:
    """The entries of the descriptor's raw statistics (dpmd.model.stats.env_moments), by name."""
    out = {}
    for leaf, m in zip(stat_leaves(model.descriptor), moments):
        prefix = f"{group(model)}/{env_hash(leaf)}"
        for t in range(model.ntypes):
            out[f"{prefix}/r_{t}"] = m[t, 0].double().numpy().copy()
            if env_width(leaf) == 4:
                out[f"{prefix}/a_{t}"] = m[t, 1].double().numpy().copy()
    return out


def set_env_stats(model, saved: dict[str, np.ndarray], protection: float) -> None:
    """The descriptor's mean / std from the raw statistics saved under their names (dpmd.model.stats.set_env_stats:
    DeePMD-kit's formula)."""
    for leaf in stat_leaves(model.descriptor):
        prefix = f"{group(model)}/{env_hash(leaf)}"
        m = torch.zeros(leaf.ntypes, 2, 3, dtype=torch.float64)
        for t in range(leaf.ntypes):
            m[t, 0] = torch.as_tensor(saved[f"{prefix}/r_{t}"])
            if env_width(leaf) == 4:
                m[t, 1] = torch.as_tensor(saved[f"{prefix}/a_{t}"])
        stats.set_env_stats(leaf, m, protection)


# ------------------------------------------------------------------ energy
def energy_items(model, systems, bias: np.ndarray) -> dict[str, np.ndarray]:
    """bias_atom_energy and std_atom_energy of a least-squares bias fitted to the frames of `systems` (those of
    dpmd.model.stats.energy_bias): the std of the residual frame energies, one per type (DeePMD-kit's)."""
    nt = model.ntypes
    counts = [np.repeat(np.bincount(s.atype, minlength=nt)[None], s.nframes, axis=0) for s in systems
              if s.energy is not None]
    energies = [s.energy for s in systems if s.energy is not None]
    residual = np.concatenate(energies) - np.concatenate(counts).astype(float) @ np.asarray(bias, dtype=float)
    names = energy_names(model)
    return {names[0]: np.asarray(bias, dtype=float).reshape(nt, 1), names[1]: np.full((nt, 1), residual.std())}


def observed_item(model, systems) -> dict[str, np.ndarray]:
    """The type names present in the data, by atomic number (unknown names last), as bytes (DeePMD-kit's)."""
    from ase.data import atomic_numbers

    present = sorted({int(t) for s in systems for t in np.unique(s.atype)})
    names = sorted((model.type_map[t] for t in present), key=lambda n: atomic_numbers.get(n) or float("inf"))
    return {observed_name(model): np.array(names, dtype="S")}


# ------------------------------------------------------------------ file
def _hdf5(path: Path) -> bool:
    return path.suffix.lower() in (".h5", ".hdf5")


def _h5py(path: Path):
    try:
        import h5py
    except ImportError:
        raise ConfigError(f"'training.stat_file' {path}: an HDF5 stat file needs h5py (pip install dpmd[hdf5]); "
                          f"or give a directory") from None
    return h5py


def load(path: str | Path, names) -> dict[str, np.ndarray]:
    """The entries `names` that the file holds (the others are absent from the result)."""
    path = Path(path)
    out = {}
    try:
        if _hdf5(path):
            if not path.exists():
                return out
            h5py = _h5py(path)
            with h5py.File(path, "r") as fh:
                for name in names:
                    if isinstance(fh.get(name), h5py.Dataset):
                        out[name] = np.asarray(fh[name])
            return out
        for name in names:
            if (path / name).is_file():
                out[name] = np.load(path / name, allow_pickle=False)
        return out
    except (OSError, ValueError) as err:
        raise ConfigError(f"'training.stat_file' {path}: cannot read it: {str(err).splitlines()[0]}") from None


def check_shapes(path, model, saved: dict[str, np.ndarray]) -> None:
    """One line naming the first entry whose shape is not this model's."""
    expected = {name: (3,) for name in env_names(model)}
    expected.update({name: (model.ntypes, 1) for name in energy_names(model)})
    for name, value in saved.items():
        if name in expected and value.shape != expected[name]:
            raise ConfigError(f"'training.stat_file' {path}: {name} has shape {list(value.shape)}, expected "
                              f"{list(expected[name])}")


def save(path: str | Path, arrays: dict[str, np.ndarray]) -> None:
    """Write the entries (replacing those of the same names).  An HDF5 file is rewritten whole into a temporary
    copy that then replaces it; a directory gets one atomically written file per entry, the pair of
    bias_atom_energy and std_atom_energy last, so an interrupted write leaves entries that both programs
    recompute rather than read."""
    path = Path(path)
    try:
        if _hdf5(path):
            h5py = _h5py(path)

            def write(fh):
                if path.is_file():
                    with open(path, "rb") as old:
                        shutil.copyfileobj(old, fh)
                    fh.seek(0)
                with h5py.File(fh, "a") as h5:
                    for name, value in arrays.items():
                        if name in h5:
                            del h5[name]
                        h5.create_dataset(name, data=value)

            atomic_write(path, write, mode="w+b")
            return
        for name in sorted(arrays, key=lambda n: n.rsplit("/", 1)[-1] in ENERGY):
            atomic_write(path / name, lambda fh, a=arrays[name]: np.save(fh, a))
    except OSError as err:
        raise ConfigError(f"'training.stat_file' {path}: cannot write: {str(err).splitlines()[0]}") from None
