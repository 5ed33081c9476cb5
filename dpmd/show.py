"""`dpmd show MODEL ATTRIBUTES...`: what a model file holds, in the words of DeePMD-kit's `dp show`.

    dpmd show model.pth type-map descriptor fitting-net size observed-type

MODEL is a frozen dpmd model, a dpmd training checkpoint or a DeePMD-kit checkpoint.  Attributes are shown in
DeePMD-kit's order whatever the order given: type-map, the descriptor and fitting-net sections of the model
config (with dpmd's defaults filled in), size (parameter counts), observed-type (the elements whose energy
bias is not zero, i.e. that were in the data the bias was fitted on, by atomic number).  dpmd models are
single-task: `model-branch`, which lists a multi-task model's branches, is an error as in DeePMD-kit.
"""

from __future__ import annotations

import argparse

from dpmd.errors import DpmdError

ATTRIBUTES = ["model-branch", "type-map", "descriptor", "fitting-net", "size", "observed-type"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("INPUT", help="frozen dpmd model, dpmd training checkpoint or DeePMD-kit checkpoint")
    parser.add_argument("ATTRIBUTES", nargs="+", choices=ATTRIBUTES, metavar="ATTRIBUTE",
                        help=f"what to show: {', '.join(ATTRIBUTES)}")


def run(args) -> None:
    for line in show(args.INPUT, args.ATTRIBUTES):
        print(line)


def show(path, attributes) -> list[str]:
    from dpmd.model import load_model  # (torch: imported when the command runs, not when the parser is built)

    model = load_model(path)
    if "model-branch" in attributes:
        raise DpmdError(f"{path}: the 'model-branch' attribute requires a multitask model; this is a single-task "
                        f"model (dpmd models have one branch)")
    lines = ["This is a singletask model"]
    if "type-map" in attributes:
        lines.append(f"The type_map is {model.type_map}")
    if "descriptor" in attributes:
        lines.append(f"The descriptor parameter is {model.config['descriptor']}")
    if "fitting-net" in attributes:
        lines.append(f"The fitting_net parameter is {model.config['fitting_net']}")
    if "size" in attributes:
        sizes = parameter_counts(model)
        lines.append("Parameter counts:")
        lines += [f"Parameters in {k}: {sizes[k]:,}" for k in sorted(sizes)]
    if "observed-type" in attributes:
        observed = observed_types(model)
        lines += ["The observed types for this model:", f"Number of observed types: {len(observed)}",
                  f"Observed types: {observed}"]
    return lines


def parameter_counts(model) -> dict[str, int]:
    """Trainable numbers in the descriptor, the fitting net and both (DeePMD-kit's get_model_size)."""
    params = dict(model.named_parameters())
    counts = {"descriptor": sum(p.numel() for k, p in params.items() if k.startswith("descriptor.")),
              "fitting-net": sum(p.numel() for k, p in params.items() if k.startswith("fitting."))}
    counts["total"] = counts["descriptor"] + counts["fitting-net"]
    return counts


def observed_types(model) -> list[str]:
    """The elements with a nonzero energy bias (|bias| > 1e-6 eV, DeePMD-kit's test), by atomic number: the
    least-squares bias of an element absent from the data is zero."""
    from ase.data import atomic_numbers

    bias = model.fitting.energy_bias.detach().abs().reshape(-1).tolist()
    seen = [name for name, b in zip(model.type_map, bias) if b > 1e-6]
    return sorted(seen, key=lambda name: atomic_numbers.get(name, float("inf")))
