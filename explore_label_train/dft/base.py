"""What the five codes share: the failure type, config helpers, and the interface each code module fills in."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from dpmd.errors import ConfigError, DpmdError


class LabelFailed(DpmdError, RuntimeError):
    """A task gave no label (SCF not converged, crashed run, unreadable output): one line naming the code,
    the reason and the file (a DpmdError: the dispatcher records the line as the task's reason, as it is)."""


class Code:
    """One first-principles code.  A subclass sets the class attributes below and defines
        write(system, folder, lab) -> [input file names]   the inputs of one frame (a one-frame dpdata.System)
        unconverged(text) -> reason or None                  the SCF did not converge (a text scan of the output)
        unfinished(text) -> reason or None                   the run crashed or was killed before its end
        read(folder, output) -> dpdata.LabeledSystem         dpdata's reading of the output
    and, where it has config keys or a special command line, prepare, output_path and shell."""

    name = ""
    keys: frozenset = frozenset()   # labeller keys besides code, command, box
    default_command = ""
    output = ""                     # the file parse reads, relative to the task folder
    stdout = "output"               # where the command's stdout and stderr go
    group_species = False           # inputs list the atoms grouped by element (POSCAR, STRU)
    molecules_only = False          # no periodic cell (Gaussian)

    def prepare(self, lab: dict, type_map: list, base: Path) -> dict:
        return lab

    def output_path(self, lab: dict) -> str:
        return self.output

    def shell(self, command: str) -> str:
        """The command line run in the task folder, before redirection."""
        return command


def config_file(lab: dict, key: str, base: Path) -> str:
    """labeller[key] as an absolute path to an existing file (relative paths start at the campaign's folder)."""
    value = lab.get(key)
    if not isinstance(value, str) or not value:
        raise ConfigError(f"'labeller.{key}' must be a file name, got {value!r}")
    path = (base / value).resolve()
    if not path.is_file():
        raise ConfigError(f"'labeller.{key}': no file {path}")
    return str(path)


def per_element(lab: dict, key: str, type_map: list, base: Path) -> dict:
    """labeller[key] (DP-GEN's fp_pp_files / fp_orb_files: a list in type_map order, or {element: file}),
    under labeller.fp_pp_path, as {element: absolute path}, every file present."""
    value = lab.get(key)
    if isinstance(value, list):
        if len(value) != len(type_map):
            raise ConfigError(f"'labeller.{key}' lists {len(value)} files for the {len(type_map)} elements of "
                              f"type_map {type_map}: give one per element, in type_map order, or a mapping")
        value = dict(zip(type_map, value))
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise ConfigError(f"'labeller.{key}' must be a list of file names in type_map order or "
                          f"{{element: file}}, got {value!r}")
    missing = [el for el in type_map if el not in value]
    if missing:
        raise ConfigError(f"'labeller.{key}' has no file for {', '.join(missing)} (type_map {type_map})")
    folder = base / lab.get("fp_pp_path", ".")
    files = {}
    for el, name in value.items():
        path = (folder / name).resolve()
        if not path.is_file():
            raise ConfigError(f"'labeller.{key}': no file {path} for {el}")
        files[el] = str(path)
    return files


def copy_per_element(files: dict, elements: list, folder: Path) -> list:
    """Copy the files of these elements into the task folder (a cluster job sees only the folder); their names."""
    names = []
    for el in elements:
        shutil.copyfile(files[el], folder / Path(files[el]).name)
        names.append(Path(files[el]).name)
    return names


def kmesh(cell, kspacing) -> list:
    """k-point mesh from a spacing (Å⁻¹, 2π included, one per reciprocal vector): VASP's KSPACING rule, DP-GEN's
    fp_aniso_kspacing and QE kspacing, N = max(1, ceil(2π |b_i| / kspacing_i))."""
    spacing = np.broadcast_to(np.asarray(kspacing, dtype=float), (3,))
    recip = np.linalg.inv(np.asarray(cell, dtype=float)).T
    return [max(1, int(np.ceil(2 * np.pi * np.linalg.norm(b) / s))) for b, s in zip(recip, spacing)]


def positive_numbers(value, key: str, count: int) -> list:
    try:
        numbers = [float(v) for v in (value if isinstance(value, (list, tuple)) else [value])]
    except (TypeError, ValueError):
        numbers = []
    if len(numbers) != count or min(numbers) <= 0:
        wanted = "a positive number" if count == 1 else f"{count} positive numbers"
        raise ConfigError(f"'labeller.{key}' must be {wanted}, got {value!r}")
    return numbers
