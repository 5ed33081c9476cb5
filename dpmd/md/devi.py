"""Model deviation with DeePMD-kit's definitions (deepmd.infer.model_devi).

Inputs are stacked over models: force (M, F, N, 3), virial (M, F, 3, 3), energy (M, F).
    devi_f(atom) = | std_models(force) |  (population std per component, then the norm over x, y, z)
    max/min/avg_devi_f = max/min/mean over atoms
    devi_v = std_models(virial / natoms), per component;  max/min over the 9 components,
    avg_devi_v = |devi_v| / 3 = sqrt(mean over components of devi_v^2)
    devi_e = std_models(energy / natoms)
"""

from __future__ import annotations

import torch

COLUMNS = ["step", "max_devi_v", "min_devi_v", "avg_devi_v", "max_devi_f", "min_devi_f", "avg_devi_f", "devi_e"]


def model_deviation(force: torch.Tensor, virial: torch.Tensor, energy: torch.Tensor, natoms: int) -> torch.Tensor:
    """(F, 7): max_devi_v min_devi_v avg_devi_v max_devi_f min_devi_f avg_devi_f devi_e."""
    devi_f = force.std(dim=0, unbiased=False).norm(dim=-1)                                  # (F, N)
    devi_v = (virial.reshape(virial.shape[0], virial.shape[1], 9) / natoms).std(dim=0, unbiased=False)  # (F, 9)
    devi_e = (energy / natoms).std(dim=0, unbiased=False)                                    # (F,)
    return torch.stack([devi_v.amax(-1), devi_v.amin(-1), devi_v.norm(dim=-1) / 3.0,
                        devi_f.amax(-1), devi_f.amin(-1), devi_f.mean(-1), devi_e], dim=1)


def header() -> str:
    return "#%11s" % COLUMNS[0] + "".join("%19s" % c for c in COLUMNS[1:])


def format_row(step: int, values) -> str:
    return "%12d" % step + "".join("%19.6e" % v for v in values)
