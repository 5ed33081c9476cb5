"""`training.stat_file`: a fresh model's data statistics, saved by one run and read back by the next.

As in DeePMD-kit, the path is an HDF5 file when it ends in .h5 or .hdf5 (needs h5py), else a directory of
.npy files, and the statistics of a model live under a group named by its type map joined with spaces.
Below that, dpmd keeps what it computed, under a name hashing everything the statistics depend on:

    <type map>/dpmd-<hash>/davg              (ntypes, 4) environment-matrix mean (before set_davg_zero)
                          /dstd              (ntypes, 4) its standard deviation (after data_stat_protect)
                          /bias_atom_energy  (ntypes,)   least-squares energy bias per type

DeePMD-kit keeps raw sums there instead (<type map>/<hash>/r_0, a_0, ..., bias_atom_energy): the two sets
of entries can share a file, and neither program reads the other's.  Like DeePMD-kit's, the entries do not
follow changes to the data: delete the file after changing the training systems.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from dpmd.errors import ConfigError
from dpmd.files import atomic_write

NAMES = ("davg", "dstd", "bias_atom_energy")


def group(model_config: dict) -> str:
    """The entry of a model: '<type map>/dpmd-<hash of the keys the statistics depend on>'."""
    d = model_config["descriptor"]
    keys = {"descriptor": "se_e2_a", "rcut": d["rcut"], "rcut_smth": d["rcut_smth"], "sel": d["sel"],
            "exclude_types": d["exclude_types"], "data_stat_nbatch": model_config["data_stat_nbatch"],
            "data_stat_protect": model_config["data_stat_protect"], "rcond": model_config["fitting_net"]["rcond"]}
    digest = hashlib.sha1(json.dumps(keys, sort_keys=True).encode()).hexdigest()
    return f"{' '.join(model_config['type_map'])}/dpmd-{digest}"


def _hdf5(path: Path) -> bool:
    return path.suffix in (".h5", ".hdf5")


def _h5py(path: Path):
    try:
        import h5py
    except ImportError:
        raise ConfigError(f"'training.stat_file' {path}: an HDF5 stat file needs h5py (pip install dpmd[hdf5]); "
                          f"or give a directory") from None
    return h5py


def load(path: str | Path, entry: str) -> dict[str, np.ndarray] | None:
    """The saved statistics of `entry`, or None when the file lacks any of them."""
    path = Path(path)
    try:
        if _hdf5(path):
            if not path.is_file():
                return None
            with _h5py(path).File(path, "r") as fh:
                if not all(f"{entry}/{n}" in fh for n in NAMES):
                    return None
                return {n: np.asarray(fh[f"{entry}/{n}"]) for n in NAMES}
        files = [path / entry / f"{n}.npy" for n in NAMES]
        if not all(f.is_file() for f in files):
            return None
        return {n: np.load(f, allow_pickle=False) for n, f in zip(NAMES, files)}
    except (OSError, ValueError) as err:
        raise ConfigError(f"'training.stat_file' {path}: cannot read {entry}: {str(err).splitlines()[0]}") from None


def save(path: str | Path, entry: str, arrays: dict[str, np.ndarray]) -> None:
    """Write the statistics of `entry` (replacing what the file held for it)."""
    path = Path(path)
    try:
        if _hdf5(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            with _h5py(path).File(path, "a") as fh:
                for name in NAMES:
                    if f"{entry}/{name}" in fh:
                        del fh[f"{entry}/{name}"]
                    fh.create_dataset(f"{entry}/{name}", data=arrays[name])
            return
        for name in NAMES:
            atomic_write(path / entry / f"{name}.npy", lambda fh, a=arrays[name]: np.save(fh, a))
    except OSError as err:
        raise ConfigError(f"'training.stat_file' {path}: cannot write: {str(err).splitlines()[0]}") from None
