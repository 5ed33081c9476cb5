"""ABACUS: INPUT from DP-GEN's fp_incar (an INPUT file) or user_fp_params ({key: value}), set to one SCF with
forces and stress; STRU from the frame (dpdata's writer) with fp_pp_files, fp_orb_files (LCAO) and
fp_dpks_descriptor copied from fp_pp_path into the task folder; KPT from k_points or fp_kpt_file unless INPUT sets
kspacing or gamma_only 1.  OUT.<suffix>/running_scf.log is read with dpdata (abacus/scf)."""

from __future__ import annotations

import shutil
from pathlib import Path

from ase.data import atomic_masses, atomic_numbers

from dpmd.errors import ConfigError

from .base import Code, config_file, copy_per_element, per_element


def input_parameters(lab: dict) -> dict:
    """The INPUT keys every task starts from, {key: value text}: the fp_incar file's (its INPUT_PARAMETERS
    header and # comments dropped) or user_fp_params."""
    if "user_fp_params" in lab:
        return {str(k): str(v) for k, v in lab["user_fp_params"].items()}
    params = {}
    for line in Path(lab["fp_incar"]).read_text().splitlines():
        words = line.split("#", 1)[0].split()
        if len(words) >= 2:
            params[words[0]] = " ".join(words[1:])
    return params


class Abacus(Code):
    name = "abacus"
    keys = frozenset({"fp_pp_path", "fp_pp_files", "fp_orb_files", "fp_incar", "user_fp_params", "fp_kpt_file",
                      "k_points", "fp_dpks_descriptor"})
    default_command = "abacus"
    group_species = True

    def prepare(self, lab, type_map, base):
        if ("fp_incar" in lab) == ("user_fp_params" in lab):
            raise ConfigError("abacus needs one of 'labeller.fp_incar' (an INPUT file) and "
                              "'labeller.user_fp_params' ({key: value}), not both")
        if "fp_incar" in lab:
            lab["fp_incar"] = config_file(lab, "fp_incar", base)
        elif not isinstance(lab["user_fp_params"], dict):
            raise ConfigError(f"'labeller.user_fp_params' must be a mapping of INPUT keys, "
                              f"got {lab['user_fp_params']!r}")
        params = input_parameters(lab)
        lab["fp_pp_files"] = per_element(lab, "fp_pp_files", type_map, base)
        if params.get("basis_type", "pw").lower().startswith("lcao"):
            if "fp_orb_files" not in lab:
                raise ConfigError("'labeller.fp_orb_files' is required for abacus with basis_type lcao: "
                                  "one numerical orbital file per element")
            lab["fp_orb_files"] = per_element(lab, "fp_orb_files", type_map, base)
        if "fp_dpks_descriptor" in lab:
            path = (base / lab.get("fp_pp_path", ".") / str(lab["fp_dpks_descriptor"])).resolve()
            if not path.is_file():
                raise ConfigError(f"'labeller.fp_dpks_descriptor': no file {path}")
            lab["fp_dpks_descriptor"] = str(path)
        if "kspacing" in params or params.get("gamma_only") == "1":
            lab.pop("k_points", None)      # ignored then, as in DP-GEN
            lab.pop("fp_kpt_file", None)
        elif "k_points" in lab:
            k = lab["k_points"]
            if not (isinstance(k, list) and len(k) == 6 and all(isinstance(x, int) for x in k)):
                raise ConfigError(f"'labeller.k_points' must be 6 integers [n1, n2, n3, shift1, shift2, shift3], "
                                  f"got {k!r}")
        elif "fp_kpt_file" in lab:
            lab["fp_kpt_file"] = config_file(lab, "fp_kpt_file", base)
        else:
            raise ConfigError("abacus needs k-points: kspacing or gamma_only 1 in INPUT, 'labeller.k_points' or "
                              "'labeller.fp_kpt_file'")
        return lab

    def output_path(self, lab):
        return f"OUT.{input_parameters(lab).get('suffix', 'ABACUS')}/running_scf.log"

    def write(self, system, folder, lab):
        names = system["atom_names"]
        files = ["INPUT", "STRU"]
        pp = copy_per_element(lab["fp_pp_files"], names, folder)
        orb = copy_per_element(lab["fp_orb_files"], names, folder) if "fp_orb_files" in lab else None
        descriptor = None
        if "fp_dpks_descriptor" in lab:
            descriptor = Path(lab["fp_dpks_descriptor"]).name
            shutil.copyfile(lab["fp_dpks_descriptor"], folder / descriptor)
            files.append(descriptor)
        system.to("abacus/stru", folder / "STRU", pp_file=pp, numerical_orbital=orb, numerical_descriptor=descriptor,
                  mass=[float(atomic_masses[atomic_numbers[el]]) for el in names])
        params = dict(input_parameters(lab), calculation="scf", cal_force="1", cal_stress="1", pseudo_dir="./",
                      stru_file="STRU")
        if orb:
            params["orbital_dir"] = "./"
        (folder / "INPUT").write_text("INPUT_PARAMETERS\n" + "".join(f"{k} {v}\n" for k, v in params.items()))
        if "k_points" in lab:
            (folder / "KPT").write_text("K_POINTS\n0\nGamma\n" + " ".join(map(str, lab["k_points"])) + "\n")
            files.append("KPT")
        elif "fp_kpt_file" in lab:
            shutil.copyfile(lab["fp_kpt_file"], folder / "KPT")
            files.append("KPT")
        return files + pp + (orb or [])

    def unconverged(self, text):
        if "convergence has not been achieved" in text.lower():
            return "SCF not converged ('convergence has not been achieved')"
        return None

    def unfinished(self, text):
        if "final etot is" not in text and "TOTAL ENERGY" not in text:
            return "no final energy (crashed or killed)"
        return None

    def read(self, folder, output):
        import dpdata

        return dpdata.LabeledSystem(str(folder), fmt="abacus/scf")   # INPUT, STRU and OUT.<suffix>/ in folder
