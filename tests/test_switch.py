"""The quintic switch near rcut: full relative accuracy, so that no path's rounding shows in the forces."""

from fractions import Fraction

import torch

from dpmd.geometry.graph import build_graph
from dpmd.model import DeepPot, evaluate
from dpmd.model.descriptor import smooth_switch


def test_switch_keeps_its_relative_accuracy_just_inside_rcut():
    rmin, rmax = 0.5, 4.0
    r = torch.tensor([rmax - d for d in (1e-3, 1e-5, 3e-5, 1e-7)], dtype=torch.float64)
    got = smooth_switch(r, rmin, rmax)
    for x, sw in zip(r.tolist(), got.tolist()):
        u = Fraction((x - rmin) / (rmax - rmin))  # the rounded u the code sees, then exact arithmetic:
        exact = u ** 3 * (-6 * u * u + 15 * u - 10) + 1  # what a rounding-free polynomial gives
        # the expanded form keeps only ~1e-16 absolute: 1e-6 relative 1e-3 Å inside rcut, nothing 1e-7 Å inside
        assert abs(sw - float(exact)) <= 1e-14 * float(exact), (x, sw, float(exact))


def test_forces_of_a_pair_just_inside_rcut_agree_between_training_and_inference():
    """A pair 3e-5 Å inside rcut: the switch there is ~1e-13, which the expanded quintic computes to ~1e-3
    relative (it cancels); se_atten's attn_dotr direction (F.normalize, 1e-12 clamp) would carry that rounding
    into the forces, differently on the training path (torch) and the inference path (kernels)."""
    cfg = {"type_map": ["O", "H"],
           "descriptor": {"type": "se_atten", "sel": 8, "rcut": 4.0, "rcut_smth": 0.5, "neuron": [4, 8],
                          "axis_neuron": 4, "tebd_dim": 4, "attn": 8, "attn_layer": 1, "seed": 1},
           "fitting_net": {"neuron": [8, 8], "seed": 1}}
    model = DeepPot(cfg)
    coord = torch.tensor([[0.0, 0.0, 0.0], [4.0 - 3e-5, 0.0, 0.0], [1.0, 0.9, 0.0], [2.9, -0.8, 0.3]],
                         dtype=torch.float64)
    graph = build_graph(coord, torch.tensor([0, 1, 1, 0]), None, model.rcut)
    train = evaluate(model, graph, create_graph=True)["force"].detach()
    infer = evaluate(model.eval(), graph)["force"]
    torch.testing.assert_close(train, infer, rtol=0, atol=1e-10)
