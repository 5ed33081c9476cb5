"""Gaussian: `input` from DP-GEN's fp_params (keywords, multiplicity, charge, nproc, basis_set, fragment_guesses,
keywords_high_multiplicity), written by dpdata's gjf writer, DP-GEN's own; `output` read with dpdata
(gaussian/log: the last "SCF Done" energy and the forces in the input orientation).  Molecules only."""

from __future__ import annotations

import importlib.util
import re

from dpmd.errors import ConfigError

from .base import Code

PARAMS = {"keywords", "multiplicity", "charge", "nproc", "basis_set", "fragment_guesses", "keywords_high_multiplicity"}


class Gaussian(Code):
    name = "gaussian"
    keys = frozenset({"fp_params"})
    default_command = "g16"
    output = "output"
    molecules_only = True

    def prepare(self, lab, type_map, base):
        params = lab.get("fp_params")
        if not isinstance(params, dict) or "keywords" not in params:
            raise ConfigError("'labeller.fp_params' is required for gaussian: {keywords: 'force b3lyp/6-31g**', "
                              "multiplicity: 1, nproc: 4, ...} (DP-GEN's layout)")
        unknown = sorted(set(params) - PARAMS)
        if unknown:
            raise ConfigError(f"'labeller.fp_params.{unknown[0]}': unknown key; valid: {', '.join(sorted(PARAMS))}")
        keywords = params["keywords"]
        first = keywords if isinstance(keywords, str) else (keywords or [""])[0]
        if "force" not in str(first).lower():
            raise ConfigError(f"'labeller.fp_params.keywords' {keywords!r} must ask for forces ('force ...')")
        params.setdefault("multiplicity", "auto")
        # dpdata finds the molecules (fragments) of an automatic multiplicity with Open Babel
        if (params["multiplicity"] == "auto" or params.get("fragment_guesses")) and \
                importlib.util.find_spec("openbabel") is None:
            raise ConfigError("'labeller.fp_params.multiplicity' auto needs openbabel (pip install openbabel-wheel); "
                              "give the multiplicity as a number")
        return lab

    def shell(self, command):
        return f"{command} < input"

    def write(self, system, folder, lab):
        system.to("gaussian/gjf", folder / "input", **lab["fp_params"])
        return ["input"]

    def unconverged(self, text):
        if "Convergence failure" in text:
            return "SCF not converged ('Convergence failure -- run terminated.')"
        return None

    def unfinished(self, text):
        # the last step (each --link1-- step starts with "Entering Gaussian System") must end normally
        end = re.search(r"^ (Normal|Error) termination.*$", text[text.rfind("Entering Gaussian System"):], re.M)
        if not end or end[1] != "Normal":
            return f"no 'Normal termination' ({end[0].strip() if end else 'crashed or killed'})"
        return None

    def read(self, folder, output):
        import dpdata

        return dpdata.LabeledSystem(str(folder / output), fmt="gaussian/log")
