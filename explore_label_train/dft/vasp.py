"""VASP: POSCAR from the frame, INCAR from fp_incar, POTCAR from fp_pp_path/fp_pp_files, KPOINTS from the INCAR's
KSPACING/KGAMMA (or fp_aniso_kspacing), as DP-GEN writes them; OUTCAR read with dpdata.

The label is the first ionic step (the POSCAR's geometry).  Its energy is dpdata's, "free  energy   TOTEN": the
free energy F, whose derivatives the forces are, not the σ→0 extrapolation.  The SCF counts as converged only
if it stopped before NELM electronic steps (dpdata's and DP-GEN's rule)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from dpmd.errors import ConfigError

from .base import Code, config_file, kmesh, per_element, positive_numbers


def read_incar(path) -> dict:
    """INCAR tags as {KEY: value text}: `KEY = value`, several per line with `;`, comments after # or !."""
    tags = {}
    for line in Path(path).read_text().splitlines():
        for statement in re.split(r"[#!]", line, maxsplit=1)[0].split(";"):
            if "=" in statement:
                key, value = statement.split("=", 1)
                tags[key.strip().upper()] = value.strip()
    return tags


def _kpoints(lab: dict, cell) -> str:
    tags = read_incar(lab["fp_incar"])
    spacing = lab.get("fp_aniso_kspacing") or float(tags["KSPACING"])
    gamma = tags.get("KGAMMA", "T").strip(".").upper().startswith("T")   # VASP's default KGAMMA is .TRUE.
    mesh = kmesh(cell, spacing)
    return (f"Automatic mesh\n0\n{'Gamma' if gamma else 'Monkhorst-Pack'}\n"
            f"{mesh[0]} {mesh[1]} {mesh[2]}\n0 0 0\n")


class Vasp(Code):
    name = "vasp"
    keys = frozenset({"fp_incar", "fp_pp_path", "fp_pp_files", "fp_aniso_kspacing"})
    default_command = "vasp_std"
    output = "OUTCAR"
    stdout = "fp.log"
    group_species = True

    def prepare(self, lab, type_map, base):
        lab["fp_incar"] = config_file(lab, "fp_incar", base)
        lab["fp_pp_files"] = per_element(lab, "fp_pp_files", type_map, base)
        tags = read_incar(lab["fp_incar"])
        if lab.get("fp_aniso_kspacing") is not None:
            lab["fp_aniso_kspacing"] = positive_numbers(lab["fp_aniso_kspacing"], "fp_aniso_kspacing", 3)
        elif "KSPACING" not in tags:
            raise ConfigError(f"'labeller.fp_incar' {lab['fp_incar']} sets no KSPACING: the KPOINTS file is made "
                              "from it (or from labeller.fp_aniso_kspacing)")
        else:
            positive_numbers(tags["KSPACING"], "fp_incar KSPACING", 1)
        if int(float(tags.get("NSW", "0"))) > 1:
            raise ConfigError(f"'labeller.fp_incar' {lab['fp_incar']} sets NSW = {tags['NSW']}: a label is one "
                              "SCF of the frame, set NSW = 0")
        return lab

    def write(self, system, folder, lab):
        system.to("vasp/poscar", folder / "POSCAR")
        shutil.copyfile(lab["fp_incar"], folder / "INCAR")
        # POTCAR: the POSCAR's elements in its order (dpdata reads the element names back from the POTCAR titles)
        (folder / "POTCAR").write_text("".join(Path(lab["fp_pp_files"][el]).read_text()
                                               for el in system["atom_names"]))
        (folder / "KPOINTS").write_text(_kpoints(lab, system["cells"][0]))
        return ["POSCAR", "INCAR", "POTCAR", "KPOINTS"]

    def unconverged(self, text):
        nelm = re.search(r"\bNELM\s*=\s*(\d+)", text)
        steps = re.findall(r"Iteration\s+1\(\s*(\d+)\)", text)   # electronic steps of ionic step 1
        if nelm and steps and int(steps[-1]) >= int(nelm[1]):
            return f"SCF not converged (NELM = {nelm[1]} reached)"
        return None

    def unfinished(self, text):
        if "free  energy   TOTEN" not in text:
            return "no ionic step finished (crashed or killed)"
        return None

    def read(self, folder, output):
        import dpdata

        # every ionic step: the label is step 1 whichever later ones converged (failure checked step 1)
        return dpdata.LabeledSystem(str(folder / output), fmt="vasp/outcar", convergence_check=False)
