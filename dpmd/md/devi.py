"""Model deviation with DeePMD-kit's definitions (deepmd.infer.model_devi).

Inputs are stacked over models: force (M, F, N, 3), virial (M, F, 3, 3), energy (M, F).
    devi_f(atom) = | std_models(force) |  (population std per component, then the norm over x, y, z)
    max/min/avg_devi_f = max/min/mean over atoms
    devi_v = std_models(virial / natoms), per component;  max/min over the 9 components,
    avg_devi_v = |devi_v| / 3 = sqrt(mean over components of devi_v^2)
    devi_e = std_models(energy / natoms)
Options of `dp model-devi` (dpmd.model_devi):
    relative=eps: devi_f(atom) / (|mean_models(force)| + eps);
    relative_v=eps: devi_v / (|mean_models(virial / natoms)| + eps), per component (what DeePMD-kit's
    pair_style deepmd does; its Python dp model-devi divides by the norm over the 9 components instead, which
    broadcasts only for 1 or 9 frames);
    reference (labels force (F, N, 3), virial (F, 3, 3), energy (F,)): the RMS error of the models against the
    labels replaces the std, and the labels' magnitudes replace the means in the relative forms (`--real_error`).
"""

from __future__ import annotations

import torch

COLUMNS = ["step", "max_devi_v", "min_devi_v", "avg_devi_v", "max_devi_f", "min_devi_f", "avg_devi_f", "devi_e"]


def _spread(x: torch.Tensor, reference: torch.Tensor | None) -> torch.Tensor:
    """Over the models (dim 0): the population std, or the RMS error against reference."""
    if reference is None:
        return x.std(dim=0, unbiased=False)
    return (x - reference).square().mean(dim=0).sqrt()


def force_deviation(force: torch.Tensor, relative: float | None = None,
                    reference: torch.Tensor | None = None) -> torch.Tensor:
    """(F, N): each atom's force deviation (the per-atom columns of `--atomic`)."""
    devi = _spread(force, reference).norm(dim=-1)
    if relative is not None:
        magnitude = (force.mean(dim=0) if reference is None else reference).norm(dim=-1)
        devi = devi / (magnitude + relative)
    return devi


def model_deviation(force: torch.Tensor, virial: torch.Tensor, energy: torch.Tensor, natoms: int, *,
                    relative: float | None = None, relative_v: float | None = None,
                    reference: dict | None = None) -> torch.Tensor:
    """(F, 7): max_devi_v min_devi_v avg_devi_v max_devi_f min_devi_f avg_devi_f devi_e."""
    ref = reference or {}
    ref_v = None if ref.get("virial") is None else ref["virial"].reshape(-1, 9) / natoms
    ref_e = None if ref.get("energy") is None else ref["energy"] / natoms
    devi_f = force_deviation(force, relative, ref.get("force"))                              # (F, N)
    per_atom_v = virial.reshape(virial.shape[0], virial.shape[1], 9) / natoms
    devi_v = _spread(per_atom_v, ref_v)                                                       # (F, 9)
    if relative_v is not None:
        devi_v = devi_v / ((per_atom_v.mean(dim=0) if ref_v is None else ref_v).abs() + relative_v)
    devi_e = _spread(energy / natoms, ref_e)                                                  # (F,)
    return torch.stack([devi_v.amax(-1), devi_v.amin(-1), devi_v.norm(dim=-1) / 3.0,
                        devi_f.amax(-1), devi_f.amin(-1), devi_f.mean(-1), devi_e], dim=1)


def header() -> str:
    return "#%11s" % COLUMNS[0] + "".join("%19s" % c for c in COLUMNS[1:])


def format_row(step: int, values) -> str:
    return "%12d" % step + "".join("%19.6e" % v for v in values)
