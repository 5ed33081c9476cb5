"""`dpmd test`: errors of a model on labelled data, per system and overall, like DeePMD-kit's `dp test`.

    dpmd test -m MODEL -s SYSTEMS... | -f DATAFILE  [-n N] [-r SEED --shuffle-test] [-a] [-d PREFIX] [--plot PNG]

Energy errors are reported per atom (eV/atom), forces per component (eV/Å), virials per atom.
`-n N` tests N frames of each system (0: all): the first N, or with --shuffle-test N drawn at random (seeded
by -r).  `-a/--atomic` also tests per-atom energies against each set's atom_ener.npy (eV, per system only).
`-d PREFIX` writes DeePMD's per-frame files (PREFIX.e.out, .e_peratom.out, .f.out, .v.out, .v_peratom.out:
reference columns first, then predictions); `--plot` draws parity plots (model against the reference labels).
(torch is imported when the command runs, so that building the `dpmd` parser stays quick.)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from dpmd.data import check_params, load_systems
from dpmd.data.system import read_atom_energy
from dpmd.errors import DataError, DpmdError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-m", "--model", default="frozen_model.pth",
                        help="model file (frozen dpmd model, dpmd or DeePMD-kit checkpoint)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("-s", "--system", "--systems", dest="systems", nargs="+", default=["."],
                        help="systems, or directories searched recursively for them")
    source.add_argument("-f", "--datafile", default=None, help="a file listing one system per line")
    parser.add_argument("-S", "--set-prefix", default=None, help=argparse.SUPPRESS)  # deprecated in DeePMD-kit
    parser.add_argument("-n", "--numb-test", type=int, default=0, help="frames per system (0: all)")
    parser.add_argument("-r", "--rand-seed", type=int, default=None, help="seed of --shuffle-test")
    parser.add_argument("--shuffle-test", action="store_true", help="test frames drawn at random (with -n)")
    parser.add_argument("-d", "--detail-file", default=None, help="prefix of per-frame output files")
    parser.add_argument("-a", "--atomic", action="store_true",
                        help="also test per-atom energies (every set needs atom_ener.npy)")
    parser.add_argument("--plot", default=None,
                        help="write parity plots (model against reference labels, with RMSEs) to this image")


def run(args) -> None:
    if args.numb_test < 0:
        raise DpmdError(f"-n/--numb-test: expected 0 (all frames) or a positive number, got {args.numb_test}")
    systems = read_datafile(args.datafile) if args.datafile else args.systems
    test_model(args.model, systems, args.numb_test or None, args.detail_file, args.plot, atomic=args.atomic,
               shuffle=args.shuffle_test, seed=args.rand_seed)


def read_datafile(path) -> list[str]:
    """The systems listed in a DeePMD-kit datafile: one path per line (blank lines skipped)."""
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise DpmdError(f"{path}: cannot read the datafile ({err.strerror or err})") from None
    systems = [line.strip() for line in lines if line.strip()]
    if not systems:
        raise DpmdError(f"{path}: the datafile lists no systems (expected one system path per line)")
    return systems


def _errors(pred: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    diff = (pred - ref).ravel()
    return float(np.sqrt(np.mean(diff ** 2))), float(np.mean(np.abs(diff)))


def evaluate_system(model, system, nframes: int | None = None, batch: int = 1) -> dict:
    import torch

    n = system.nframes if nframes is None else min(nframes, system.nframes)
    out = {"energy": [], "force": [], "virial": [], "atom_energy": []}
    atype = torch.as_tensor(system.atype)
    for f0 in range(0, n, batch):
        f1 = min(n, f0 + batch)
        box = None if system.box is None else torch.as_tensor(system.box[f0:f1])
        res = model(torch.as_tensor(system.coord[f0:f1]), atype, box, **model.data_params(system, slice(f0, f1)))
        for k in out:
            out[k].append(res[k].detach().cpu().numpy())
    return {k: np.concatenate(v) for k, v in out.items()} | {"nframes": n}


def test_model(model_path, systems, nframes=None, detail_prefix=None, plot=None, log=print, *, atomic=False,
               shuffle=False, seed=None) -> dict:
    from dpmd.model import load_model

    model = load_model(model_path)
    data = load_systems(systems, type_map=model.type_map)
    for s in data:  # a system without the model's fparam / aparam: one line naming it
        check_params(s, model.numb_fparam, model.numb_aparam, model.fitting.default_fparam_tensor)
    atom_energies = [read_atom_energy(s) for s in data] if atomic else None  # a missing file fails first
    rng = np.random.default_rng(seed)
    results, pooled = [], {"e": [], "f": [], "v": []}
    for k, full in enumerate(data):
        order = rng.permutation(full.nframes) if shuffle else np.arange(full.nframes)
        frames = order[:nframes]
        s = full.subset(frames)
        pred = evaluate_system(model, s)
        n, natoms = pred["nframes"], s.natoms
        row = {"system": s.path, "nframes": n, "natoms": natoms}
        if s.energy is not None:
            e_ref, e_pred = s.energy, pred["energy"]
            row["rmse_e"], row["mae_e"] = _errors(e_pred / natoms, e_ref / natoms)
            pooled["e"].append((e_pred / natoms, e_ref / natoms))
        if s.force is not None:
            f_ref, f_pred = s.force.reshape(n, -1, 3), pred["force"].reshape(n, -1, 3)
            row["rmse_f"], row["mae_f"] = _errors(f_pred, f_ref)
            pooled["f"].append((f_pred.ravel(), f_ref.ravel()))
        if s.virial is not None:
            v_ref, v_pred = s.virial.reshape(n, 9), pred["virial"].reshape(n, 9)
            row["rmse_v"], row["mae_v"] = _errors(v_pred / natoms, v_ref / natoms)
            pooled["v"].append(((v_pred / natoms).ravel(), (v_ref / natoms).ravel()))
        if atomic:  # per system only, as in DeePMD-kit
            row["rmse_ae"], row["mae_ae"] = _errors(pred["atom_energy"], atom_energies[k][frames])
        results.append(row)
        log(_format_row(row))
        if detail_prefix:
            _write_detail(detail_prefix, k, s, pred, n)
    overall = {"system": "all", "nframes": sum(r["nframes"] for r in results)}
    for key, parts in pooled.items():
        if parts:
            p = np.concatenate([a.ravel() for a, _ in parts])
            r = np.concatenate([b.ravel() for _, b in parts])
            overall[f"rmse_{key}"], overall[f"mae_{key}"] = _errors(p, r)
    log(_format_row(overall))
    if plot:
        _parity_plot(pooled, plot)
    return {"systems": results, "overall": overall}


def _format_row(row: dict) -> str:
    parts = [f"{row['system']}: {row['nframes']} frames"]
    units = {"e": "eV/atom", "f": "eV/Å", "v": "eV/atom", "ae": "eV"}
    for key, unit in units.items():
        if f"rmse_{key}" in row:
            parts.append(f"{key.upper()} RMSE {row[f'rmse_{key}']:.4e} MAE {row[f'mae_{key}']:.4e} {unit}")
    return "  ".join(parts)


def _write_detail(prefix: str, k: int, system, pred: dict, n: int) -> None:
    prefix = f"{prefix}.{k}" if k else prefix
    natoms = system.natoms
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    if system.energy is not None:
        e = np.column_stack([system.energy[:n], pred["energy"]])
        np.savetxt(f"{prefix}.e.out", e, header=f"{system.path}: data_e pred_e")
        np.savetxt(f"{prefix}.e_peratom.out", e / natoms, header=f"{system.path}: data_e pred_e")
    if system.force is not None:
        f = np.column_stack([system.force[:n].reshape(-1, 3), pred["force"].reshape(-1, 3)])
        np.savetxt(f"{prefix}.f.out", f, header=f"{system.path}: data_fx data_fy data_fz pred_fx pred_fy pred_fz")
    if system.virial is not None:
        v = np.column_stack([system.virial[:n].reshape(n, 9), pred["virial"].reshape(n, 9)])
        cols = " ".join(f"data_v{i}" for i in "xx xy xz yx yy yz zx zy zz".split()) + " " + " ".join(
            f"pred_v{i}" for i in "xx xy xz yx yy yz zx zy zz".split())
        np.savetxt(f"{prefix}.v.out", v, header=f"{system.path}: {cols}")
        np.savetxt(f"{prefix}.v_peratom.out", v / natoms, header=f"{system.path}: {cols}")


def _parity_plot(pooled: dict, path) -> None:
    import matplotlib.pyplot as plt

    fig = parity_figure(pooled)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parity_figure(pooled: dict):
    """Model against reference labels, one panel per quantity, titled with its RMSE and unit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in ("e", "f", "v") if pooled[k]]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 4.2), squeeze=False)
    quantities = {"e": ("energy", "eV/atom"), "f": ("force", "eV/Å"), "v": ("virial", "eV/atom")}
    for ax, key in zip(axes[0], keys):
        pred = np.concatenate([a.ravel() for a, _ in pooled[key]])
        ref = np.concatenate([b.ravel() for _, b in pooled[key]])
        ax.scatter(ref, pred, s=2, alpha=0.5)
        lo, hi = min(ref.min(), pred.min()), max(ref.max(), pred.max())
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
        rmse = float(np.sqrt(np.mean((pred - ref) ** 2)))
        what, unit = quantities[key]
        ax.set(xlabel=f"reference {what} ({unit})", ylabel=f"model {what} ({unit})",
               title=f"{what}: RMSE {rmse:.3e} {unit}")
    fig.tight_layout()
    return fig
