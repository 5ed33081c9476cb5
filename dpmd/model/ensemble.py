"""An ensemble of models on one graph: the model deviation's forces, virials and energies.

Models that share a layout (same config apart from seeds, hence same parameter shapes) can be
evaluated in one batched pass: their parameters are stacked and `torch.func.vmap` maps one
model's energy-and-gradient over them, so every matrix product runs once for all models.  That
pays on a GPU (fewer, larger kernels); on the CPU the stacked pass measured 1.3-1.5x slower than
one model after another (4 water models, 192 atoms), so `batched=None` picks it on CUDA only.
"""

from __future__ import annotations

import copy

import torch

from dpmd import ops
from dpmd.model.forces import assemble, check_neighbors, edge_gradients, evaluate


def _layout(model) -> dict:
    """The model's config without seeds: equal layouts have parameters of equal shapes."""
    cfg = copy.deepcopy(model.config)
    for section in cfg.values():
        if isinstance(section, dict):
            section.pop("seed", None)
    return cfg


def shares_layout(models) -> bool:
    first = models[0]
    return all(_layout(m) == _layout(first) and type(m) is type(first) for m in models[1:])


def evaluate_ensemble(models, graph: dict, *, batched: bool | None = None, chunk_atoms: int | None = None) -> list:
    """evaluate(model, graph) for each model (a list of dicts), batched when the layouts allow it."""
    device = graph["coord"].device
    if batched is None:
        batched = device.type == "cuda"
    if not batched or len(models) < 2 or not shares_layout(models):
        return [evaluate(m, graph, chunk_atoms=chunk_atoms) for m in models]
    check_neighbors(models[0], graph)  # equal layouts: equal sel
    params, buffers = torch.func.stack_module_state(list(models))
    template = _AtomicEnergy(models[0])

    def energy(p, b, vec, center, center_type, neighbor_type, atom_params):
        e = torch.func.functional_call(template, ({"m." + k: v for k, v in p.items()},
                                                  {"m." + k: v for k, v in b.items()}),
                                       (vec, center, center_type, neighbor_type, atom_params))
        return e.sum(), e

    grad_all = torch.func.vmap(torch.func.grad(energy, argnums=2, has_aux=True),
                               in_dims=(0, 0, None, None, None, None, None))

    def energy_and_gradient(vec, center, center_type, neighbor_type, atom_params=None):
        g, e = grad_all(params, buffers, vec.detach(), center, center_type, neighbor_type, atom_params)
        return e, g

    with ops.reference_only():  # the kernels have no batching rule; the reference path vmaps
        atom_energy, g, vec = edge_gradients(energy_and_gradient, graph, chunk_atoms=chunk_atoms)
    nframes, natoms = graph["box"].shape[0], graph["atype"].numel()
    return [assemble(atom_energy[k], g[k], vec, graph["center"], graph["neighbor"], graph["batch"], nframes, natoms)
            for k in range(len(models))]


class _AtomicEnergy(torch.nn.Module):
    """A module whose forward is the wrapped model's atomic_energy (what functional_call calls)."""

    def __init__(self, model):
        super().__init__()
        self.m = model

    def forward(self, vec, center, center_type, neighbor_type, params=None):
        if params is None:  # (a model without fparam/aparam need not know the keyword)
            return self.m.atomic_energy(vec, center, center_type, neighbor_type)
        return self.m.atomic_energy(vec, center, center_type, neighbor_type, params=params)
