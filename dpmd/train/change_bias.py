"""`dpmd change-bias`: re-fit or set a model's per-type energy bias, like DeePMD-kit's `dp change-bias`.

    dpmd change-bias MODEL -s SYSTEMS [-n NUMB_BATCH] [-m change|set] -o OUTPUT
    dpmd change-bias MODEL -f DATAFILE ...
    dpmd change-bias MODEL -b BIAS_O BIAS_H ... -o OUTPUT

-m change (DeePMD-kit's change-by-statistic, what `dpmd train --finetune` does, by the same function):
bias += least squares of (label energy - model energy) on the per-type atom counts.  -m set
(set-by-statistic): bias = least squares of the label energies on the counts, whatever the model predicts.
-n N reads N frames of each system, evenly spread (0: all).  -b sets the bias to the given values, one per
element of the model's type_map.  MODEL is a frozen dpmd model, a dpmd training checkpoint or a DeePMD-kit
checkpoint; OUTPUT (default MODEL_updated.pth) is a frozen dpmd model, written atomically.
(torch is imported when the command runs, so that building the `dpmd` parser stays quick.)
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np

from dpmd.data import load_systems
from dpmd.errors import DpmdError
from dpmd.train.test import read_datafile


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("INPUT", help="frozen dpmd model, dpmd training checkpoint or DeePMD-kit checkpoint")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("-s", "--system", nargs="+", default=["."],
                        help="systems, or directories searched recursively for them")
    source.add_argument("-f", "--datafile", default=None, help="a file listing one system per line")
    source.add_argument("-b", "--bias-value", type=float, nargs="+", default=None,
                        help="the energy bias of each element of the model's type_map (eV), e.g. -93.57 -187.1")
    parser.add_argument("-n", "--numb-batch", type=int, default=0,
                        help="frames read from each system, evenly spread (0: all)")
    parser.add_argument("-m", "--mode", choices=["change", "set"], default="change",
                        help="change: shift the bias by the least squares of the model's energy errors (as "
                             "--finetune); set: the least squares of the label energies")
    parser.add_argument("-o", "--output", default=None, help="output model file (default: INPUT_updated.pth)")
    parser.add_argument("--model-branch", default=None,
                        help="multi-task branch (dpmd models are single-task: leave it out)")


def run(args) -> None:
    from dpmd.model import load_model, save_model

    if args.model_branch is not None:
        raise DpmdError(f"--model-branch {args.model_branch}: {args.INPUT} is a single-task model (dpmd models "
                        f"have one branch); leave --model-branch out")
    if args.numb_batch < 0:
        raise DpmdError(f"-n/--numb-batch: expected 0 (all frames) or a positive number, got {args.numb_batch}")
    model = load_model(args.INPUT)
    old = model.fitting.energy_bias.detach().clone()
    if args.bias_value is not None:
        set_bias(model, args.bias_value)
    else:
        paths = read_datafile(args.datafile) if args.datafile else args.system
        change_bias(model, load_systems(paths, type_map=model.type_map), args.numb_batch, args.mode)
    output = args.output or str(Path(args.INPUT).with_name(Path(args.INPUT).stem + "_updated.pth"))
    save_model(model, output)
    log = logging.getLogger(__name__)
    log.info(f"Change output bias of {model.type_map} from {old.numpy()} to {model.fitting.energy_bias.numpy()}.")
    log.info(f"Saved model to {output}")


def set_bias(model, values) -> None:
    import torch

    if len(values) != model.ntypes:
        raise DpmdError(f"-b/--bias-value: {len(values)} values given, expected one per element of the type_map "
                        f"{model.type_map}")
    with torch.no_grad():
        model.fitting.energy_bias.copy_(torch.as_tensor(values, dtype=model.fitting.energy_bias.dtype))


def change_bias(model, systems, numb_batch: int = 0, mode: str = "change") -> np.ndarray:
    """Re-fit model's energy bias on systems (numb_batch frames of each, 0: all); returns the new bias."""
    from dpmd.model.stats import energy_bias, refit_energy_bias, stat_frames

    labelled = [s for s in systems if s.energy is not None]
    if not labelled:
        raise DpmdError(f"{systems[0].path}: no energy.npy in the data: the energy bias needs labelled energies")
    if mode == "change":
        refit_energy_bias(model, labelled, max_frames=numb_batch or max(s.nframes for s in labelled))
    elif mode == "set":
        energy_bias(model, [s.subset(list(stat_frames(s.nframes, numb_batch))) for s in labelled],
                    rcond=model.config["fitting_net"]["rcond"])
    else:
        raise DpmdError(f"-m/--mode: expected change or set, got {mode!r}")
    return model.fitting.energy_bias.detach().numpy().copy()
