"""dpmd's activation functions are DeePMD-kit's: same names, same values and derivatives in float64."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dpmd.errors import ConfigError
from dpmd.model.args import normalize_model_config
from dpmd.model.network import ACTIVATIONS, Layer


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _silut(threshold):
    sig = _sigmoid(threshold)
    slope, const = sig + threshold * sig * (1 - sig), threshold * sig
    return lambda x: np.where(x < threshold, x * _sigmoid(x), np.tanh(slope * (x - threshold)) + const)


# DeePMD-kit 3.2's definitions, written out as in deepmd/dpmodel/utils/network.py get_activation_fn
_GELU = lambda x: 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))  # noqa: E731
DEEPMD = {
    "tanh": np.tanh,
    "relu": lambda x: x * (x > 0),
    "relu6": lambda x: np.where(x < 0, 0.0, np.where(x > 6, 6.0, x)),
    "softplus": lambda x: np.log1p(np.exp(x)),
    "sigmoid": _sigmoid,
    "gelu": _GELU,
    "gelu_tf": _GELU,
    "silu": lambda x: x * _sigmoid(x),
    "silut": _silut(3.0),
    "silut:2.5": _silut(2.5),
    "custom_silu:4": _silut(4.0),
    "linear": lambda x: x,
    "none": lambda x: x,
}


def test_the_list_is_deepmd_kits():
    # deepmd.common.VALID_ACTIVATION of DeePMD-kit 3.2
    assert set(ACTIVATIONS) == {"relu", "relu6", "softplus", "sigmoid", "tanh", "gelu", "gelu_tf", "silu", "silut",
                                "none", "linear"}


@pytest.mark.parametrize("name", sorted(DEEPMD))
def test_value_and_derivative_match_deepmd(name):
    # away from the kinks of relu / relu6 (0, 6), where the finite difference is not a derivative
    x = np.concatenate([np.linspace(-7.9, 7.9, 80), [-0.3, 0.4, 2.4, 2.6, 3.1, 3.9, 4.1, 5.7, 6.3]])
    layer = Layer(1, 1, activation=name)
    with torch.no_grad():
        layer.matrix.fill_(1.0)
        layer.bias.zero_()
    xt = torch.tensor(x, dtype=torch.float64).unsqueeze(1).requires_grad_()
    y = layer(xt)
    (dy,) = torch.autograd.grad(y.sum(), xt)
    ref = DEEPMD[name]
    h = 1e-6
    np.testing.assert_allclose(y.detach().numpy()[:, 0], ref(x), rtol=1e-14, atol=1e-14)
    np.testing.assert_allclose(dy.numpy()[:, 0], (ref(x + h) - ref(x - h)) / (2 * h), atol=1e-8)


def test_silut_is_continuous_in_value_and_slope_at_its_threshold():
    layer = Layer(1, 1, activation="silut:2.5")
    with torch.no_grad():
        layer.matrix.fill_(1.0)
        layer.bias.zero_()
    x = torch.tensor([[2.5 - 1e-9], [2.5 + 1e-9]], dtype=torch.float64, requires_grad=True)
    y = layer(x)
    (dy,) = torch.autograd.grad(y.sum(), x)
    assert math.isclose(y[0, 0].item(), y[1, 0].item(), abs_tol=1e-8)
    assert math.isclose(dy[0, 0].item(), dy[1, 0].item(), abs_tol=1e-8)


def _config(activation):
    return {"type_map": ["O", "H"],
            "descriptor": {"sel": [4, 8], "rcut": 4.0, "neuron": [4, 8], "axis_neuron": 2,
                           "activation_function": activation},
            "fitting_net": {"neuron": [8], "activation_function": activation}}


@pytest.mark.parametrize("name", ["gelu", "gelu_tf", "relu6", "silu", "silut:2.5"])
def test_model_config_accepts_deepmd_names_and_scripts(name):
    from dpmd.model import DeepPot

    model = DeepPot(_config(name))
    coord = torch.tensor([[0.0, 0.0, 0.0], [0.9, 0.2, 0.0], [-0.3, 0.8, 0.1]], dtype=torch.float64)
    out = model(coord, torch.tensor([0, 1, 1]))
    assert torch.isfinite(out["force"]).all()
    torch.jit.script(model.fitting.nets[0])  # the frozen model scripts every layer


def test_unknown_activation_is_one_line_naming_the_key():
    with pytest.raises(ConfigError, match=r"activation_function.* must be one of .*gelu_tf.*got \"swish\""):
        normalize_model_config(_config("swish"))


def test_names_are_case_insensitive_as_in_deepmd():
    assert Layer(1, 1, activation="TANH").activation == "tanh"
    assert Layer(1, 1, activation="SiLUT:2").silut_threshold == 2.0
