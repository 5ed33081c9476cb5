"""The batched (vmap) ensemble pass equals evaluating the models one by one."""

from __future__ import annotations

import copy

import torch

from conftest import make_model, triclinic_water
from dpmd.geometry.graph import build_graph
from dpmd.model.ensemble import evaluate_ensemble, shares_layout
from dpmd.model.forces import evaluate


def perturbed_models(k: int):
    base = make_model()
    models = [base]
    for i in range(1, k):
        m = copy.deepcopy(base)
        gen = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
            m.descriptor.std.mul_(1.0 + 0.1 * i)   # buffers differ too
        models.append(m)
    return models


def test_batched_ensemble_equals_one_by_one(water):
    models = perturbed_models(3)
    coord, atype, box = triclinic_water(water)
    graph = build_graph(torch.stack([coord, coord + 0.05]), atype, box, models[0].rcut)
    batched = evaluate_ensemble(models, graph, batched=True, chunk_atoms=16)
    for m, out in zip(models, batched):
        ref = evaluate(m, graph)
        for key in ("energy", "force", "virial", "atom_energy"):
            torch.testing.assert_close(out[key], ref[key], rtol=0, atol=1e-10)
    # the models really differ, so equal results are not an accident
    assert (batched[0]["force"] - batched[1]["force"]).abs().max() > 1e-3


def test_different_layouts_fall_back_to_one_by_one(water):
    a = make_model()
    b = make_model(type_one_side=False)
    assert not shares_layout([a, b]) and shares_layout(perturbed_models(2))
    coord, atype, box = water
    graph = build_graph(coord, atype, box, a.rcut)
    outs = evaluate_ensemble([a, b], graph, batched=True)
    torch.testing.assert_close(outs[1]["force"], evaluate(b, graph)["force"], rtol=0, atol=1e-12)
