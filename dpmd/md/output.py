"""Output files: thermo log, trajectories (extxyz, LAMMPS dump), model_devi.out.

Every writer appends to a text file; `sizes()` gives the byte sizes recorded in a checkpoint,
and `truncate()` cuts files back to them on restart, so a restarted run writes exactly what an
uninterrupted one would have.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from dpmd.md import devi

THERMO_COLUMNS = ["step", "time", "pe", "ke", "temp", "press", "vol", "etotal", "econserve"]
THERMO_UNITS = ["", "ps", "eV", "eV", "K", "bar", "Å^3", "eV", "eV"]  # LAMMPS metal units


class TextFile:
    def __init__(self, path: Path, header: str | None = None, restart: bool = False):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fh = open(self.path, "a" if restart else "w")
        if header is not None and not restart:
            self.fh.write(header + "\n")

    def write(self, text: str) -> None:
        self.fh.write(text)

    def flush(self) -> None:
        self.fh.flush()

    def close(self) -> None:
        self.fh.close()


def thermo_header() -> str:
    names = [f"{c}({u})" if u else c for c, u in zip(THERMO_COLUMNS, THERMO_UNITS)]
    return "#%9s" % names[0] + "%12s" % names[1] + "".join("%18s" % c for c in names[2:])


def thermo_row(step: int, time_ps: float, values) -> str:
    pe, ke, temp, press, vol, etot, cons = values
    return ("%10d%12.5f%18.8f%18.8f%18.4f%18.4f%18.4f%18.8f%18.8f\n"
            % (step, time_ps, pe, ke, temp, press, vol, etot, cons))


def _wrap(positions: np.ndarray, box: np.ndarray | None) -> np.ndarray:
    if box is None:
        return positions
    frac = positions @ np.linalg.inv(box)
    return (frac - np.floor(frac)) @ box


def extxyz_frame(step: int, symbols, positions, box, velocities=None, forces=None, energy=None) -> str:
    """One extxyz frame (positions wrapped into the box), readable by ase.io.read."""
    from ase import Atoms, units
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.io import write

    atoms = Atoms(symbols=symbols, positions=_wrap(positions, box), cell=box if box is not None else None,
                  pbc=box is not None)
    if velocities is not None:
        atoms.set_velocities(velocities / (1000.0 * units.fs))  # Å/ps -> ASE units
    if forces is not None:
        atoms.calc = SinglePointCalculator(atoms, energy=energy, forces=forces)
    atoms.info["step"] = step
    buf = io.StringIO()
    write(buf, atoms, format="extxyz", parallel=False)   # (ASE's parallel mode broadcasts over mpi4py's world)
    return buf.getvalue()


def lammps_frame(step: int, types, positions, box) -> str:
    """One LAMMPS dump frame (`ITEM: ATOMS id type x y z`, types 1-based), in LAMMPS' restricted triclinic frame."""
    n = len(types)
    lines = [f"ITEM: TIMESTEP\n{step}\nITEM: NUMBER OF ATOMS\n{n}\n"]
    if box is None:
        lo, hi = positions.min(0), positions.max(0)
        lines.append("ITEM: BOX BOUNDS ff ff ff\n" + "".join(f"{a:.10g} {b:.10g}\n" for a, b in zip(lo, hi)))
        pos = positions
    else:
        pos = _wrap(positions, box)
        q, r = np.linalg.qr(box.T)          # box.T = q r; r.T is lower triangular: LAMMPS' frame
        sign = np.sign(np.diag(r))
        sign[sign == 0] = 1
        q, r = q * sign, (r.T * sign).T
        lmp = r.T
        pos = pos @ q
        xx, yy, zz = lmp[0, 0], lmp[1, 1], lmp[2, 2]
        xy, xz, yz = lmp[1, 0], lmp[2, 0], lmp[2, 1]
        if abs(xy) < 1e-12 and abs(xz) < 1e-12 and abs(yz) < 1e-12:
            lines.append(f"ITEM: BOX BOUNDS pp pp pp\n0 {xx:.10g}\n0 {yy:.10g}\n0 {zz:.10g}\n")
        else:
            xlo = min(0.0, xy, xz, xy + xz)
            xhi = xx + max(0.0, xy, xz, xy + xz)
            lines.append(f"ITEM: BOX BOUNDS xy xz yz pp pp pp\n{xlo:.10g} {xhi:.10g} {xy:.10g}\n"
                         f"{min(0.0, yz):.10g} {yy + max(0.0, yz):.10g} {xz:.10g}\n0 {zz:.10g} {yz:.10g}\n")
    lines.append("ITEM: ATOMS id type x y z\n")
    lines.extend(f"{i + 1} {int(t) + 1} {x:.10f} {y:.10f} {z:.10f}\n" for i, (t, (x, y, z)) in enumerate(zip(types, pos)))
    return "".join(lines)


class SystemOutput:
    """The files of one system (one frame of a batch) in `directory`."""

    def __init__(self, directory: Path, traj_format: list[str], with_devi: bool, restart: bool = False):
        self.dir = Path(directory)
        self.thermo = TextFile(self.dir / "thermo.log", thermo_header(), restart)
        self.traj = {}
        if "extxyz" in traj_format:
            self.traj["extxyz"] = TextFile(self.dir / "traj.extxyz", None, restart)
        if "lammps" in traj_format:
            self.traj["lammps"] = TextFile(self.dir / "dump.lammpstrj", None, restart)
        self.devi = TextFile(self.dir / "model_devi.out", devi.header(), restart) if with_devi else None

    def files(self) -> list[TextFile]:
        return [self.thermo, *self.traj.values()] + ([self.devi] if self.devi else [])

    def flush(self) -> None:
        for f in self.files():
            f.flush()

    def close(self) -> None:
        for f in self.files():
            f.close()


def sizes(outputs: list[SystemOutput]) -> dict:
    for o in outputs:
        o.flush()
    return {str(f.path): f.path.stat().st_size for o in outputs for f in o.files()}


def truncate(recorded: dict) -> None:
    for path, size in recorded.items():
        p = Path(path)
        if p.exists():
            with open(p, "r+b") as fh:
                fh.truncate(size)
