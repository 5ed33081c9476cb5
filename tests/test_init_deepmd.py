"""Seeded initial weights are DeePMD-kit's: the same model section gives the same weights, bit for bit."""

from __future__ import annotations

import torch

from dpmd.model import DeepPot

# DeePMD-kit 3.2's (PyTorch) freshly built model of this section: get_model(model_args().normalize_value(...)),
# first and last entry of a few parameters, covering the hash of the seeds, the seed of each layer (matrix, then
# bias, then idt from one generator), the nets' seeding order of a two-sided descriptor and the output layer
CONFIG = {
    "type_map": ["O", "H"],
    "descriptor": {"type": "se_e2_a", "sel": [46, 92], "rcut": 6.0, "rcut_smth": 0.5, "neuron": [4, 8, 16],
                   "axis_neuron": 4, "resnet_dt": True, "type_one_side": False, "seed": 7},
    "fitting_net": {"neuron": [12, 12], "resnet_dt": True, "seed": 8},
}
DEEPMD = {
    "descriptor.embeddings.1.layers.0.matrix": (0.20908318323722927, 0.44020143259558475),
    "descriptor.embeddings.2.layers.2.bias": (0.5126175254547446, -0.02836204423151118),
    "descriptor.embeddings.3.layers.1.idt": (0.10131748964421596, 0.10103604909765189),
    "fitting.nets.1.layers.0.matrix": (-0.177021317572866, -0.05527880402762353),
    "fitting.nets.0.layers.1.idt": (0.09907752420953304, 0.09933348175999734),
    "fitting.nets.1.layers.2.matrix": (0.6163421571333942, -0.44552418779394287),
    "fitting.nets.1.layers.2.bias": (0.030071669648414078, 0.030071669648414078),
}


def test_seeded_weights_are_deepmd_kits():
    params = dict(DeepPot(CONFIG).named_parameters())
    for name, (first, last) in DEEPMD.items():
        flat = params[name].detach().flatten()
        assert (flat[0].item(), flat[-1].item()) == (first, last), name


def test_unseeded_nets_differ_and_seeds_repeat():
    """seed None draws from torch's global generator (two models differ); a seed gives the same weights again."""
    unseeded = dict(CONFIG, descriptor=dict(CONFIG["descriptor"], seed=None))
    a, b = DeepPot(unseeded), DeepPot(unseeded)
    assert not torch.equal(a.descriptor.embeddings[0].layers[0].matrix, b.descriptor.embeddings[0].layers[0].matrix)
    assert torch.equal(a.fitting.nets[0].layers[0].matrix, b.fitting.nets[0].layers[0].matrix)
