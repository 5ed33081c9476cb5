"""`dpmd model-devi`: the deviation of several models over the frames of datasets, like DeePMD-kit's
`dp model-devi` (deepmd/infer/model_devi.py).

    dpmd model-devi -m graph.000.pth graph.001.pth ... -s SYSTEMS -o model_devi.out [-f FREQ]
                    [--relative EPS] [--relative_v EPS] [--atomic] [--real_error]

Every model is evaluated on every frame of every system (deepmd/npy or HDF5, found recursively under each
-s path); the columns are those `dpmd md` writes, computed by the same function (dpmd.md.devi), so the same
frames give the same numbers.  As in DeePMD-kit all systems go into the one output file, each as a block
headed by `# <system path>` and DeePMD-kit's column line, with `step` = frame index x FREQ (the frame
index counts on through the system's sets).  --atomic appends each atom's force deviation.  The file is
written whole at the end (DeePMD-kit appends to an existing file; dpmd replaces it).
(torch is imported when the command runs, so that building the `dpmd` parser stays quick.)
"""

from __future__ import annotations

import argparse
import io
import logging

import numpy as np

from dpmd.data import check_params, load_systems
from dpmd.errors import DpmdError

DEFAULT_MODELS = [f"graph.{k:03d}.pth" for k in range(4)]
FRAME_ATOMS = 20_000  # atoms (all frames together) per model evaluation


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-m", "--models", nargs="+", default=DEFAULT_MODELS,
                        help="model files (frozen dpmd models, dpmd or DeePMD-kit checkpoints) with the same type_map")
    parser.add_argument("-s", "--system", nargs="+", default=["."],
                        help="systems, or directories searched recursively for them")
    parser.add_argument("-S", "--set-prefix", default=None, help=argparse.SUPPRESS)  # deprecated in DeePMD-kit
    parser.add_argument("-o", "--output", default="model_devi.out", help="output file")
    parser.add_argument("-f", "--frequency", type=int, default=1,
                        help="steps between the frames of the trajectory: step = frame index x FREQUENCY")
    parser.add_argument("--real_error", action="store_true",
                        help="the RMS error of the models against the systems' labels instead of their deviation")
    parser.add_argument("--atomic", action="store_true", help="also write each atom's force deviation")
    parser.add_argument("--relative", type=float, default=None,
                        help="relative force deviation: devi_f / (|mean force| + RELATIVE) (eV/Å)")
    parser.add_argument("--relative_v", type=float, default=None,
                        help="relative virial deviation: devi_v / (|mean virial| + RELATIVE_V), per component (eV)")


def run(args) -> None:
    from dpmd.model import load_model
    from dpmd.files import atomic_write

    if args.frequency < 1:
        raise DpmdError(f"-f/--frequency: expected a positive number of steps, got {args.frequency}")
    models = [load_model(path) for path in args.models]
    blocks = make_model_devi(models, args.system, frequency=args.frequency, real_error=args.real_error,
                             atomic=args.atomic, relative=args.relative, relative_v=args.relative_v)
    atomic_write(args.output, lambda fh: fh.write("".join(format_block(path, devi, args.atomic)
                                                           for path, devi in blocks)), mode="w")
    logging.getLogger(__name__).info(f"model-devi: {len(models)} models, {sum(len(d) for _, d in blocks)} frames of {len(blocks)} "
          f"system(s) -> {args.output}")


def make_model_devi(models, systems, *, frequency: int = 1, real_error: bool = False, atomic: bool = False,
                    relative: float | None = None, relative_v: float | None = None) -> list[tuple[str, np.ndarray]]:
    """[(system path, rows)] with rows (F, 8 [+ natoms]): step, the 7 deviation columns [, per-atom devi_f]."""
    import torch

    from dpmd.md.devi import force_deviation, model_deviation

    if len(models) < 2 and not real_error:
        raise DpmdError(f"-m/--models: the deviation needs at least 2 models, got {len(models)}")
    type_map = models[0].type_map
    for model in models[1:]:
        if model.type_map != type_map:
            raise DpmdError(f"-m/--models: the models' type_maps differ ({type_map} and {model.type_map})")
    blocks = []
    for system in load_systems(systems, type_map=type_map):
        for model in models:
            check_params(system, model.numb_fparam, model.numb_aparam, model.fitting.default_fparam_tensor)
        energy, force, virial = predict(models, system)
        reference = None
        if real_error:
            reference = {k: None if getattr(system, k) is None else torch.as_tensor(getattr(system, k))
                         for k in ("energy", "force", "virial")}
            if all(v is None for v in reference.values()):
                raise DpmdError(f"{system.path}: --real_error needs labels (energy.npy, force.npy or virial.npy)")
        cols = [model_deviation(force, virial, energy, system.natoms, relative=relative, relative_v=relative_v,
                                reference=reference)]
        if atomic:
            cols.append(force_deviation(force, relative, None if reference is None else reference["force"]))
        devi = torch.cat(cols, dim=1).numpy()
        if reference is not None:  # a label the system lacks: its columns are unknown
            missing = {"virial": [0, 1, 2], "force": [3, 4, 5] + list(range(7, devi.shape[1])), "energy": [6]}
            for key, columns in missing.items():
                if reference[key] is None:
                    devi[:, columns] = np.nan
        steps = np.arange(system.nframes, dtype=np.float64)[:, None] * frequency
        blocks.append((system.path, np.concatenate([steps, devi], axis=1)))
    return blocks


def predict(models, system) -> tuple:
    """energy (M, F), force (M, F, N, 3), virial (M, F, 3, 3) of every model on every frame (tensors); models
    of one cutoff share a neighbour list and go through one ensemble call (dpmd.model.ensemble)."""
    import torch

    from dpmd.geometry.graph import build_graph
    from dpmd.model.ensemble import evaluate_ensemble

    by_rcut: dict[tuple, list[int]] = {}   # one graph per cutoff and parameter layout
    for k, model in enumerate(models):
        by_rcut.setdefault((model.rcut, model.numb_fparam, model.numb_aparam), []).append(k)
    n = system.natoms
    atype = torch.as_tensor(system.atype)
    chunk = max(1, FRAME_ATOMS // n)
    parts = []
    for f0 in range(0, system.nframes, chunk):
        f1 = min(system.nframes, f0 + chunk)
        coord = torch.as_tensor(system.coord[f0:f1])
        box = None if system.box is None else torch.as_tensor(system.box[f0:f1])
        outs: list = [None] * len(models)
        for (rcut, _, _), members in by_rcut.items():
            graph = build_graph(coord, atype, box, rcut)
            first = models[members[0]]
            graph.update(first.graph_params(f1 - f0, n, **first.data_params(system, slice(f0, f1))))
            with torch.no_grad():
                for k, out in zip(members, evaluate_ensemble([models[k] for k in members], graph)):
                    outs[k] = out
        parts.append([torch.stack([o["energy"] for o in outs]),
                      torch.stack([o["force"].reshape(f1 - f0, n, 3) for o in outs]),
                      torch.stack([o["virial"].reshape(f1 - f0, 3, 3) for o in outs])])
    energy, force, virial = (torch.cat(p, dim=1).double() for p in zip(*parts))
    return energy, force, virial


def format_block(path: str, devi: np.ndarray, atomic: bool) -> str:
    """One system's block as DeePMD-kit's write_model_devi_out writes it (np.savetxt, `# ` headers)."""
    from dpmd.md.devi import COLUMNS

    header = f"{path}\n{'step':10s}" + "".join(f"{c:19s}" for c in COLUMNS[1:])
    if atomic:
        header += f"{'atm_devi_f(N)':19s}"
    buf = io.StringIO()
    np.savetxt(buf, devi, fmt=["%12d"] + ["%19.6e"] * (devi.shape[1] - 1), delimiter="", header=header)
    return buf.getvalue()

