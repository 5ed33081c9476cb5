"""Uncertainty-biased exploration ("reinforced dynamics", Zhang, Wang & E, PRL 2018): a bias potential that
pulls the MD towards configurations where the ensemble disagrees.

Per system, with F_i^m the force of model m on atom i (M models, N atoms):

    sigma_i^2  = mean_m |F_i^m - mean_m F_i^m|^2        (DeePMD's devi_f of atom i, squared)
    sigma      = sqrt(mean_i sigma_i^2)                  (a smooth stand-in for max_devi_f)
    E_bias     = -strength * tanh(sigma / scale)         strength in eV, scale in eV/Å

The bias is bounded (between -strength and 0) and flattens once sigma passes `scale` (by default the
upper trust level), so the dynamics is drawn towards uncertain regions without running away into
unphysical ones.  Its forces and virial are exact derivatives: the ensemble forces are taken with
create_graph=True and E_bias is differentiated again (second derivatives through every model), for the
positions and for a homogeneous strain of positions and cell (virial, DeePMD's sign).  It plugs into
dpmd.md.Simulation(bias=DeviationBias(...)) and adds to the driving model's energy, forces and virial.
"""

from __future__ import annotations

import torch

from dpmd.model.forces import evaluate


class DeviationBias:
    def __init__(self, strength: float, scale: float):
        self.strength, self.scale = float(strength), float(scale)

    def sigma_and_energy(self, models, graph: dict):
        """(sigma (F,), E_bias (F,)) as differentiable functions of graph coord and box."""
        nf, n = graph["box"].shape[0], graph["natoms"]
        forces = torch.stack([evaluate(m, graph, create_graph=True)["force"].reshape(nf, n, 3) for m in models])
        sigma2_atom = ((forces - forces.mean(0)) ** 2).sum(-1).mean(0)          # (F, N)
        sigma = torch.sqrt(sigma2_atom.mean(-1) + 1e-12)
        return sigma, -self.strength * torch.tanh(sigma / self.scale)

    def __call__(self, models, graph: dict, out: dict) -> dict:
        """out (the driving model's energy (F,), force (F*N, 3), virial (F, 3, 3)) plus the bias's."""
        if len(models) < 2:
            raise ValueError("the deviation bias needs an ensemble of at least two models")
        nf, n = graph["box"].shape[0], graph["natoms"]
        with torch.enable_grad():
            coord = graph["coord"].detach().requires_grad_()
            strain = torch.zeros(nf, 3, 3, dtype=coord.dtype, device=coord.device, requires_grad=True)
            deform = torch.eye(3, dtype=coord.dtype, device=coord.device) + strain
            strained = {k: v for k, v in graph.items() if k != "edge_vec"}   # recomputed from coord and box
            strained.update(coord=torch.bmm(coord.reshape(nf, n, 3), deform).reshape(-1, 3),
                            box=torch.bmm(graph["box"].detach(), deform))
            _, energy = self.sigma_and_energy(models, strained)
            d_coord, d_strain = torch.autograd.grad(energy.sum(), [coord, strain])
        out = dict(out)
        out["energy"] = out["energy"] + energy.detach()
        out["force"] = out["force"] - d_coord
        out["virial"] = out["virial"] - d_strain.transpose(1, 2)
        return out
