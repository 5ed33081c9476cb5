"""training.mixed_precision, as DeePMD-kit's TensorFlow backend defines it: the nets' weights in float32
(output_prec), their arithmetic in float16 / bfloat16 (compute_prec) during training only."""

from __future__ import annotations

import pytest
import torch

from dpmd.errors import ConfigError
from dpmd.model import DeepPot, load_model
from dpmd.model.network import MLP, set_compute_precision
from dpmd.train.config import normalize_input
from tests.conftest import small_config
from tests.test_train import run, small_input


@pytest.mark.parametrize("compute", ["float16", "bfloat16"])
def test_a_net_computes_in_compute_prec_and_answers_in_its_weights_precision(compute):
    net = MLP(3, [8, 8], linear_out=1, dtype=torch.float32, seed=3)
    x = torch.randn(50, 3, generator=torch.Generator().manual_seed(0))
    exact = net(x)
    set_compute_precision(net, compute)
    mixed = net(x)
    assert mixed.dtype == torch.float32
    # float16 keeps ~3 decimal digits, bfloat16 ~2: close to the float32 result, but not equal to it
    tolerance = 5e-3 if compute == "float16" else 5e-2
    assert 0 < float((mixed - exact).detach().abs().max()) < tolerance * float(exact.detach().abs().max())
    mixed.sum().backward()  # the float32 weights get float32 gradients
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in net.parameters())
    scripted = torch.jit.script(net)  # TorchScript computes in compute_prec too (its kernels may round differently)
    assert float((scripted(x) - mixed).detach().abs().max()) < tolerance * float(exact.detach().abs().max())


def test_mixed_precision_training_keeps_float32_weights_and_reports_the_force_error(tmp_path):
    cfg = small_input(tmp_path, steps=10, mixed_precision={"compute_prec": "bfloat16"})
    last = run(cfg, tmp_path)
    model = load_model(tmp_path / "model.ckpt.pt")
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert model.config["descriptor"]["precision"] == model.config["fitting_net"]["precision"] == "float32"
    # the model is evaluated as saved: in float32 arithmetic
    assert all(m.compute == 0 for m in model.modules() if isinstance(m, MLP))
    error = last["mixed_precision_force_error"]
    assert 0 < error < 0.5  # eV/Å: bfloat16 arithmetic, forces of ~1 eV/Å


def test_mixed_precision_keys_are_deepmds():
    cfg = small_input(None, mixed_precision={"compute_prec": "float16"})
    assert normalize_input(cfg)["training"]["mixed_precision"] == {"output_prec": "float32", "compute_prec": "float16"}
    for bad, fragment in (({"compute_prec": "float64"}, "'training.mixed_precision.compute_prec' must be one of "
                                                        "float16, bfloat16"),
                          ({"compute_prec": "float16", "output_prec": "float64"},
                           "'training.mixed_precision.output_prec' must be one of float32"),
                          ({}, "training.mixed_precision.compute_prec")):
        with pytest.raises(ConfigError, match=fragment.replace(".", r"\.")):
            normalize_input(small_input(None, mixed_precision=bad))


def test_a_frozen_model_of_mixed_precision_nets_is_the_float32_model(tmp_path):
    model = DeepPot(small_config(precision="float32"))
    set_compute_precision(model, "float16")
    frozen_config = DeepPot(model.config)
    assert all(m.compute == 0 for m in frozen_config.modules() if isinstance(m, MLP))
