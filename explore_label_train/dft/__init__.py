"""File-based first-principles labellers: VASP, CP2K, Quantum ESPRESSO pw.x, ABACUS, Gaussian.

One task folder per frame.  `make_task` writes the code's inputs from the user's templates (config keys as in
DP-GEN's param.json) and `frame.json` (the frame, and how the inputs reorder and rotate it); `task_command` is
the shell line the dispatcher runs in the folder; `parse` reads the output with dpdata and returns the label
(energy, forces, virial) in the frame's own atom order and orientation, or raises LabelFailed naming the code,
the reason (SCF not converged, crashed, unreadable) and the file.  `label(payload)` does all three in a worker
(the local dispatcher); `prepare_job` writes the folder and names the command and files of a cluster job, whose
fetched folder the dispatcher then parses.

    labeller: {code: vasp, command: "mpirun -n 32 vasp_std", fp_incar: INCAR, fp_pp_path: pp/,
               fp_pp_files: [O/POTCAR, H/POTCAR]}

`command` is the program with its launcher; the labeller adds the input and output files (`-i input.inp >
output` for CP2K).  Frames without a cell are put in a cubic box of `box` Å (their label has no virial);
Gaussian takes molecules only.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np

from dpmd.errors import ConfigError, DpmdError

from .abacus import Abacus
from .base import LabelFailed
from .cp2k import Cp2k
from .gaussian import Gaussian
from .qe import QuantumEspresso
from .vasp import Vasp

__all__ = ["CODES", "LabelFailed", "check_settings", "fingerprint", "make_task", "task_command", "transfer_files",
           "prepare_job", "parse", "label"]

CODES = {code.name: code for code in (Vasp(), Cp2k(), QuantumEspresso(), Abacus(), Gaussian())}
ALIASES = {"pwscf": "qe"}   # DP-GEN's fp_style name
COMMON = {"code", "command", "box"}
FRAME = "frame.json"        # the frame and its bookkeeping, in every task folder
EXIT = "exit_code"          # the command's exit status, written by task_command's line
POSITION_TOLERANCE = 1e-3   # Å: the output's geometry must be the frame's


def check_settings(lab: dict, type_map, base_dir) -> dict:
    """Validate a `labeller: {code: ...}` block; return it with defaults and absolute paths (relative ones
    start at base_dir, the campaign file's folder).  A list fp_pp_files / fp_orb_files follows type_map."""
    lab = dict(lab)
    name = ALIASES.get(lab.get("code"), lab.get("code"))
    if name not in CODES:
        raise ConfigError(f"'labeller.code': unknown code {lab.get('code')!r}; valid: {', '.join(CODES)}, pwscf")
    code = CODES[name]
    unknown = sorted(set(lab) - COMMON - code.keys - {"type_map"})
    if unknown:
        raise ConfigError(f"'labeller.{unknown[0]}': unknown key for code {name}; valid: "
                          f"{', '.join(sorted(COMMON | code.keys))}")
    lab["code"] = name
    lab["type_map"] = list(type_map)   # inputs that group atoms by element list them in this order, as DP-GEN
    lab.setdefault("command", code.default_command)
    if not isinstance(lab["command"], str) or not lab["command"].strip():
        raise ConfigError(f"'labeller.command' must be the command that runs {name}, got {lab['command']!r}")
    box = lab.setdefault("box", None)
    if box is not None and not (isinstance(box, (int, float)) and not isinstance(box, bool) and box > 0):
        raise ConfigError(f"'labeller.box' must be a positive edge length in Å (or null), got {box!r}")
    return code.prepare(lab, list(type_map), Path(base_dir))


def fingerprint(lab: dict) -> str:
    """12 hex digits of sha256 over the settings and the content of every file they name (templates,
    pseudopotentials), not the command: labels made with an edited INCAR or POTCAR come from another method."""
    digest = hashlib.sha256(json.dumps({k: v for k, v in lab.items() if k != "command"}, sort_keys=True).encode())

    def files(value):
        if isinstance(value, dict):
            return [f for v in value.values() for f in files(v)]
        return [value] if isinstance(value, str) and os.path.isabs(value) and os.path.isfile(value) else []

    for path in sorted(files(lab)):
        digest.update(Path(path).read_bytes())
    return digest.hexdigest()[:12]


def _frame(frame):
    """(symbols, positions, cell or None) from an ase.Atoms or a {symbols, positions, cell} payload."""
    if hasattr(frame, "get_chemical_symbols"):
        return frame.get_chemical_symbols(), frame.positions.copy(), (
            np.array(frame.cell) if frame.pbc.any() else None)
    cell = frame.get("cell")
    return list(frame["symbols"]), np.asarray(frame["positions"], dtype=float), (
        None if cell is None else np.asarray(cell, dtype=float))


def make_task(lab: dict, frame, folder) -> Path:
    """Write the task folder of one frame: the code's inputs and frame.json.  A folder left by an earlier
    attempt of the task (it holds frame.json) is emptied first, so no old output is read as this one's."""
    import dpdata

    code = CODES[lab["code"]]
    symbols, positions, cell = _frame(frame)
    folder = Path(folder)
    if (folder / FRAME).is_file():
        shutil.rmtree(folder)
    elif folder.is_dir() and any(folder.iterdir()):
        raise DpmdError(f"{folder}: not empty and not a labelling task folder (no {FRAME}); refusing to write in it")
    if code.molecules_only and cell is not None:
        raise LabelFailed(f"{code.name}: labels molecules only; this frame has a periodic cell")
    if not code.molecules_only and cell is None and lab["box"] is None:
        raise LabelFailed(f"{code.name}: the frame has no cell; set labeller.box (Å) to label it in a cubic box")
    species = [el for el in lab["type_map"] if el in symbols] + [el for el in dict.fromkeys(symbols)
                                                                if el not in lab["type_map"]]
    order = (np.argsort([species.index(s) for s in symbols], kind="stable") if code.group_species
             else np.arange(len(symbols)))
    written = cell if cell is not None else np.eye(3) * (lab["box"] or 0.0)
    system = dpdata.System(data={
        "atom_names": species, "atom_numbs": [symbols.count(s) for s in species],
        "atom_types": np.array([species.index(s) for s in symbols])[order],
        "coords": positions[order][None], "cells": written[None], "orig": np.zeros(3),
        "nopbc": code.molecules_only})
    # dpdata turns periodic cells read from VASP and QE outputs lower-triangular: write them so (the same
    # function), keep the rotation, undo it on the label
    rotation = system.rot_frame_lower_triangular(0) if cell is not None else np.eye(3)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / FRAME).write_text("{}")   # first: a folder cut short while being written is still known as ours
    inputs = code.write(system, folder, lab)
    meta = {"code": code.name, "command": lab["command"], "output": code.output_path(lab), "inputs": inputs,
            "symbols": symbols, "positions": positions.tolist(), "cell": None if cell is None else cell.tolist(),
            "order": order.tolist(), "rotation": rotation.tolist(),
            "written_cell": None if code.molecules_only else system["cells"][0].tolist()}
    (folder / FRAME).write_text(json.dumps(meta))
    return folder


def task_command(lab: dict) -> str:
    """The shell line run in a task folder.  It always succeeds, leaving the code's exit status in exit_code
    for parse: a failed calculation is a failed task, not a failed cluster job to resubmit.  The output file
    exists afterwards even when the code never wrote it (an empty one reads as a crash in parse), because a
    dispatcher that copies files back fails the whole job over a missing one."""
    code = CODES[lab["code"]]
    line = f"{code.shell(lab['command'])} > {code.stdout} 2>&1; echo $? > {EXIT}"
    output = code.output_path(lab)
    if output != code.stdout:
        folder = os.path.dirname(output)
        line += f"; {f'mkdir -p {folder}; ' if folder else ''}touch {output}"
    return line


def transfer_files(folder) -> tuple[list, list]:
    """(forward, backward) files of a task folder, for a dispatcher that copies them to and from a cluster."""
    meta = json.loads((Path(folder) / FRAME).read_text())
    code = CODES[meta["code"]]
    return meta["inputs"], sorted({meta["output"].split("/")[0], code.stdout, EXIT})


def prepare_job(payload: dict, folder, write: bool = True) -> tuple[str, list, list]:
    """One label task as a cluster job (explore_label_train.dispatch.DPDispatcherPool): the task folder written
    (write=False: kept as an earlier, identical attempt wrote it), then (the shell line, files to send, files
    to fetch back).  The dispatcher reads the fetched folder with `parse`."""
    if write:
        make_task(payload["dft"], payload, folder)
    return (task_command(payload["dft"]), *transfer_files(folder))


def _last_line(path: Path) -> str:
    """What a crashed run printed last (a launcher's or the code's own error), for the task's reason."""
    text = path.read_text(errors="replace").strip() if path.is_file() else ""
    if not text:
        return f"; {path.name} is empty or missing"
    return f"; last line of {path.name}: {text.splitlines()[-1].strip()[:200]!r}"


def parse(folder) -> dict:
    """The label of a finished task folder: {energy (eV), forces (N, 3) eV/Å, virial (3, 3) eV or None} in the
    frame's atom order and orientation.  Raises LabelFailed with the reason."""
    from explore_label_train.labelers import check_label

    folder = Path(folder)
    meta = json.loads((folder / FRAME).read_text())
    code = CODES[meta["code"]]
    out = folder / meta["output"]
    if not out.is_file():
        raise LabelFailed(f"{code.name}: no {meta['output']} in {folder} (the run did not start, or its files did "
                          f"not come back){_last_line(folder / code.stdout)}")
    text = out.read_text(errors="replace")
    why = code.unconverged(text)
    if why:
        raise LabelFailed(f"{code.name}: {why} in {out}")
    why = code.unfinished(text)
    if why:
        raise LabelFailed(f"{code.name}: {why} in {out}{_last_line(folder / code.stdout)}")
    status = (folder / EXIT).read_text().strip() if (folder / EXIT).is_file() else "0"
    if status != "0":
        raise LabelFailed(f"{code.name}: `{meta['command']}` exited with status {status} in {folder}"
                          f"{_last_line(folder / code.stdout)}")
    try:
        system = code.read(folder, meta["output"])
    except Exception as err:   # dpdata's parsers raise anything from AssertionError to IndexError
        raise LabelFailed(f"{code.name}: dpdata cannot read {out}: {type(err).__name__}: "
                          f"{str(err).strip().splitlines()[0] if str(err).strip() else ''}") from None
    if len(system) == 0:
        raise LabelFailed(f"{code.name}: dpdata reads no labelled frame from {out}")
    label = _label(system, meta, out)
    why = check_label(label, meta["symbols"])
    if why:
        raise LabelFailed(f"{code.name}: {out} gives {why}")
    return label


def _shown(symbols: list) -> str:
    return " ".join(symbols[:12]) + (" ..." if len(symbols) > 12 else "")


def _label(system, meta: dict, out: Path) -> dict:
    """Frame 0 of dpdata's reading, checked against the frame written, in the frame's order and orientation."""
    symbols, order = meta["symbols"], np.asarray(meta["order"])
    rotation = np.asarray(meta["rotation"])
    expected = [symbols[i] for i in order]
    names = system["atom_names"]
    found = [re.sub(r"[\d_].*", "", str(names[t])) for t in system["atom_types"]]   # CP2K kinds: Fe1, O_h
    if found != expected:
        raise LabelFailed(f"{meta['code']}: {out} holds atoms {_shown(found)}, the task wrote {_shown(expected)}")
    # the geometry in the output is the frame's, up to a uniform shift and wrapping into the cell (CP2K's
    # centring, VASP's wrapping)
    shift = system["coords"][0] - np.asarray(meta["positions"])[order] @ rotation
    shift -= shift[0]
    if meta["written_cell"] is not None:
        box = np.asarray(meta["written_cell"])
        frac = shift @ np.linalg.inv(box)
        shift = (frac - np.round(frac)) @ box
    worst = float(np.abs(shift).max()) if len(shift) else 0.0
    if worst > POSITION_TOLERANCE:
        raise LabelFailed(f"{meta['code']}: the positions in {out} differ from the task's frame by up to "
                          f"{worst:.3g} Å")
    forces = np.empty_like(system["forces"][0])
    forces[order] = system["forces"][0] @ rotation.T
    virial = None
    if meta["cell"] is not None and system.has_virial():   # a molecule in a box has no virial worth learning
        virial = rotation @ system["virials"][0] @ rotation.T
    return {"energy": float(system["energies"][0]), "forces": forces, "virial": virial}


def label(payload: dict) -> dict:
    """Label one frame in this process: payload {symbols, positions, cell, dft: check_settings' block, folder,
    threads (optional: OMP_NUM_THREADS of the code)}.  For a local worker; a cluster dispatcher runs
    make_task, task_command's line (transfer_files) and parse separately."""
    folder = make_task(payload["dft"], payload, payload["folder"])
    env = dict(os.environ)
    if payload.get("threads"):
        env["OMP_NUM_THREADS"] = str(payload["threads"])
    subprocess.run(task_command(payload["dft"]), shell=True, cwd=folder, env=env, stdin=subprocess.DEVNULL,
                   check=False)
    return parse(folder)
