"""Quantum ESPRESSO pw.x: `input` from DP-GEN's user_fp_params ({control, system, electrons} namelists and
kspacing), the pseudopotentials fp_pp_path/fp_pp_files copied into the task folder, the frame as ibrav 0 with the
cell and positions in Å (ASE's writer); `output` read with dpdata (qe/pw/scf), whose "!    total energy" is the
free energy when smearing is on (QE prints the internal energy separately)."""

from __future__ import annotations

import copy
import io
import re

from dpmd.errors import ConfigError

from .base import Code, copy_per_element, kmesh, per_element, positive_numbers

NAMELISTS = ("control", "system", "electrons")


class QuantumEspresso(Code):
    name = "qe"
    keys = frozenset({"fp_pp_path", "fp_pp_files", "user_fp_params"})
    default_command = "pw.x"
    output = "output"

    def prepare(self, lab, type_map, base):
        params = lab.get("user_fp_params")
        if not isinstance(params, dict):
            raise ConfigError("'labeller.user_fp_params' is required for qe: {control: {...}, system: {...}, "
                              "electrons: {...}, kspacing: Å⁻¹} (pw.x namelists, DP-GEN's layout)")
        unknown = sorted(set(params) - set(NAMELISTS) - {"kspacing"})
        if unknown:
            raise ConfigError(f"'labeller.user_fp_params.{unknown[0]}': unknown key; valid: "
                              f"{', '.join(NAMELISTS)}, kspacing")
        for name in NAMELISTS:
            if not isinstance(params.get(name, {}), dict):
                raise ConfigError(f"'labeller.user_fp_params.{name}' must be a mapping of pw.x keywords")
        if "kspacing" not in params:
            raise ConfigError("'labeller.user_fp_params.kspacing' is required for qe (Å⁻¹, 2π included): "
                              "the k-point mesh is made from it")
        positive_numbers(params["kspacing"], "user_fp_params.kspacing", 1)
        lab["fp_pp_files"] = per_element(lab, "fp_pp_files", type_map, base)
        return lab

    def shell(self, command):
        return f"{command} -in input"

    def write(self, system, folder, lab):
        from ase.io.espresso import write_espresso_in

        params = lab["user_fp_params"]
        sections = {name: copy.deepcopy(params.get(name, {})) for name in NAMELISTS}
        # one SCF with forces and stress, the pseudopotentials next to the input
        sections["control"].update(calculation="scf", tprnfor=True, tstress=True, pseudo_dir="./")
        atoms = system.to("ase/structure")[0]
        pseudo = dict(zip(system["atom_names"],
                          copy_per_element(lab["fp_pp_files"], system["atom_names"], folder)))
        mesh = kmesh(system["cells"][0], params["kspacing"])
        text = io.StringIO()
        write_espresso_in(text, atoms, input_data=sections, pseudopotentials=pseudo,
                          kpts=None if mesh == [1, 1, 1] else mesh)   # None: K_POINTS gamma
        # ASE writes every namelist; an SCF needs only these three, and pw.x before 7.1 has no &RISM
        (folder / "input").write_text(re.sub(r"^&(?!CONTROL|SYSTEM|ELECTRONS)\w+\n/\n", "", text.getvalue(),
                                             flags=re.M))
        return ["input", *pseudo.values()]

    def unconverged(self, text):
        if "convergence NOT achieved" in text:
            return "SCF not converged ('convergence NOT achieved')"
        return None

    def unfinished(self, text):
        if "JOB DONE." not in text:
            return "no 'JOB DONE.' (crashed or killed)"
        return None

    def read(self, folder, output):
        import dpdata

        return dpdata.LabeledSystem(str(folder / output), fmt="qe/pw/scf")   # reads `input` beside it too
