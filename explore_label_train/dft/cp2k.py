"""CP2K: input.inp from the user's template (DP-GEN's external_input_path rules: the line `ABC ...` in &CELL
becomes the frame's A, B, C vectors, and &COORD holds `@include coord.xyz`), coord.xyz from the frame (element
symbols as kinds); the output read with dpdata (cp2k/output).  The template must print forces (&PRINT &FORCES ON)
and, for a virial, the stress tensor (STRESS_TENSOR ANALYTICAL, &STRESS_TENSOR ON), at PRINT_LEVEL MEDIUM or
above (dpdata reads the coordinates from the atom table printed there)."""

from __future__ import annotations

import re
from pathlib import Path

from dpmd.errors import ConfigError

from .base import Code, config_file

_ABC = re.compile(r"^(\s*)ABC\b.*$", re.MULTILINE | re.IGNORECASE)


class Cp2k(Code):
    name = "cp2k"
    keys = frozenset({"external_input_path"})
    default_command = "cp2k.psmp"
    output = "output"

    def prepare(self, lab, type_map, base):
        if "external_input_path" not in lab:
            raise ConfigError("'labeller.external_input_path' is required for cp2k: the CP2K input template "
                              "(DP-GEN's user_fp_params dictionaries are not supported: write them out as a template)")
        lab["external_input_path"] = path = config_file(lab, "external_input_path", base)
        text = Path(path).read_text()
        if len(_ABC.findall(text)) != 1:
            raise ConfigError(f"'labeller.external_input_path' {path}: needs one line `ABC ...` in &CELL, "
                              "replaced by the frame's cell vectors")
        if not re.search(r"@include\s+coord\.xyz", text, re.IGNORECASE):
            raise ConfigError(f"'labeller.external_input_path' {path}: needs `@include coord.xyz` in &COORD, "
                              "the frame's coordinates")
        return lab

    def shell(self, command):
        return f"{command} -i input.inp"

    def write(self, system, folder, lab):
        a, b, c = (" ".join(f"{x:.10f}" for x in v) for v in system["cells"][0])
        template = Path(lab["external_input_path"]).read_text()
        (folder / "input.inp").write_text(_ABC.sub(lambda m: f"{m[1]}A {a}\n{m[1]}B {b}\n{m[1]}C {c}", template))
        names = system["atom_names"]
        (folder / "coord.xyz").write_text("".join(f"{names[t]} {x:.10f} {y:.10f} {z:.10f}\n"
                                                  for t, (x, y, z) in zip(system["atom_types"], system["coords"][0])))
        return ["input.inp", "coord.xyz"]

    def unconverged(self, text):
        if "SCF run NOT converged" in text:
            return "SCF not converged ('SCF run NOT converged')"
        return None

    def unfinished(self, text):
        if "PROGRAM ENDED AT" not in text:
            return "no 'PROGRAM ENDED AT' (crashed or killed)"
        return None

    def read(self, folder, output):
        import dpdata

        return dpdata.LabeledSystem(str(folder / output), fmt="cp2k/output")
