"""Training through the attention layers (se_atten / se_atten_v2, attn_layer 2): the smooth attention's
hand-written first and second derivatives (dpmd/model/descriptor/attention.py) give the weight gradients of
training's loss that plain autograd gives under reference_only(), and forces that are the energy's gradient."""

from __future__ import annotations

from unittest import mock

import pytest
import torch

from dpmd import ops
from dpmd.geometry.graph import build_graph
from dpmd.model import DeepPot
from dpmd.model.descriptor import attention
from dpmd.model.forces import evaluate
from dpmd.train.loss import EnergyLoss
from tests.conftest import finite_difference_force, triclinic_water, with_statistics

# se_atten_v2: strip mode, smooth attention (the hand-written derivatives; weights gate rhat_j . rhat_k, or the gate
# alone); se_atten in concat mode without smooth attention (the softmax over real neighbours, plain autograd)
MODELS = {"se_atten_v2": dict(kind="se_atten_v2"),
          "se_atten_v2_gate_only": dict(kind="se_atten_v2", attn_dotr=False, type_one_side=True),
          "se_atten_concat_rough": dict(kind="se_atten", tebd_input_mode="concat", smooth_type_embedding=False)}
LOSS = {"start_pref_e": 0.02, "limit_pref_e": 1.0, "start_pref_f": 1000.0, "limit_pref_f": 1.0,
        "start_pref_v": 0.5, "limit_pref_v": 1.0, "intensive_ener_virial": False}


def atten_model(kind, **desc) -> DeepPot:
    d = {"type": kind, "sel": 40, "rcut": 3.5, "rcut_smth": 0.5, "neuron": [4, 8], "axis_neuron": 4,
         "tebd_dim": 4, "attn": 8, "attn_layer": 2, "seed": 3, **desc}
    return with_statistics(DeepPot({"type_map": ["O", "H"], "descriptor": d,
                                    "fitting_net": {"neuron": [8, 8], "seed": 4}}))


@pytest.fixture(scope="module")
def cell(water):
    return triclinic_water(water)


def loss_gradients(model, graph, label):
    """The weight gradients of one training step's loss, computed as dpmd.train's Trainer does."""
    with ops.weight_gradients_only():
        pred = evaluate(model, graph, create_graph=True)
    pred["virial"] = pred["virial"].reshape(-1, 9)
    loss, _ = EnergyLoss(LOSS, 1e-3)(pred, label, graph["natoms"], 1e-3)
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = None
    loss.backward(inputs=params)
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("name", list(MODELS))
def test_training_gradients_equal_the_reference(name, cell):
    coord, atype, box = cell
    model = atten_model(**MODELS[name]).train()
    graph = build_graph(coord, atype, box, model.rcut)
    gen = torch.Generator().manual_seed(7)
    label = {"energy": torch.tensor([-93.0 * len(atype)], dtype=torch.float64),
             "force": torch.randn(coord.shape, generator=gen, dtype=torch.float64),
             "virial": torch.randn(1, 9, generator=gen, dtype=torch.float64)}
    smooth = model.descriptor.smooth
    with mock.patch.object(attention._SmoothAttention, "apply", wraps=attention._SmoothAttention.apply) as spy:
        fast = loss_gradients(model, graph, label)
    # the hand-written derivatives ran (one call per layer and block) where the attention is smooth, else none
    assert spy.call_count >= (2 if smooth else 0) and (spy.call_count > 0) == smooth
    with ops.reference_only():
        slow = loss_gradients(model, graph, label)
    assert fast.keys() == slow.keys() and any("attention" in k for k in fast)
    for key, ref in slow.items():
        scale = float(ref.abs().max())
        assert float((fast[key] - ref).abs().max()) <= 1e-10 * scale, key
        assert scale > 0 or key.startswith("descriptor.type_embedding"), key  # every weight is trained


@pytest.mark.parametrize("name", list(MODELS))
def test_forces_are_minus_the_energy_gradient(name, cell):
    coord, atype, box = cell
    model = atten_model(**MODELS[name]).eval()
    out = model(coord, atype, box)
    for i in (0, 5, len(atype) - 1):
        for k in range(3):
            fd = finite_difference_force(lambda x: float(model(x, atype, box)["energy"]), coord, i, k)
            assert out["force"][i, k].item() == pytest.approx(fd, abs=1e-7, rel=1e-6)


@pytest.mark.parametrize("fused", [False, True], ids=["pytorch", "kernels"])
def test_smooth_attention_second_derivatives(fused):
    """The layer's function alone, with its row and softmax passes in PyTorch or in the kernel library: first
    and second derivatives against finite differences, in the projections and (through the gate sw_j sw_k and
    the weights gate rhat_j . rhat_k) in the positions; and a zero projection (its norm clamped) against plain
    autograd's first derivative."""
    gen = torch.Generator().manual_seed(0)
    qkv = torch.randn(2, 5, 12, generator=gen, dtype=torch.float64, requires_grad=True)
    sw = torch.rand(2, 5, 1, generator=gen, dtype=torch.float64).requires_grad_()
    rvec = torch.randn(2, 5, 3, generator=gen, dtype=torch.float64, requires_grad=True)

    def layer(qkv, sw, rvec):
        gate = sw * sw.transpose(1, 2)
        rhat = torch.nn.functional.normalize(rvec, dim=-1)
        weight = gate * torch.bmm(rhat, rhat.transpose(1, 2))
        return attention._SmoothAttention.apply(qkv, gate, weight, 0.5, 20.0, 20.5, 3e-9, (True, fused))

    assert torch.autograd.gradcheck(layer, (qkv, sw, rvec))
    assert torch.autograd.gradgradcheck(layer, (qkv, sw, rvec))
    with torch.no_grad():
        qkv[0, 1, :4] = 0.0
    go = torch.randn(2, 5, 4, generator=gen, dtype=torch.float64)
    (fast,) = torch.autograd.grad(layer(qkv, sw, rvec), qkv, go)
    q, k, v = qkv.split(4, dim=-1)
    unit = torch.nn.functional.normalize
    gate = sw * sw.transpose(1, 2)
    e = torch.exp((torch.bmm(unit(q, dim=-1) * 0.5, unit(k, dim=-1).transpose(1, 2)) + 20.0) * gate - 20.5)
    rhat = unit(rvec, dim=-1)
    o = torch.bmm(e * gate * torch.bmm(rhat, rhat.transpose(1, 2)), unit(v, dim=-1)) / (e.sum(-1, keepdim=True) + 3e-9)
    (slow,) = torch.autograd.grad(o, qkv, go)
    assert torch.allclose(fast, slow, rtol=1e-12, atol=1e-14)


def test_second_derivative_in_the_positions_equals_the_reference(cell):
    """Outside weight_gradients_only() the force loss reaches the positions too (the gate and the weights'
    derivatives included): d(F . u)/dx equals plain autograd's."""
    coord, atype, box = cell
    model = atten_model(kind="se_atten_v2").eval()
    u = torch.randn(coord.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)

    def force_gradient():
        x = coord.clone().requires_grad_()
        out = evaluate(model, build_graph(x, atype, box, model.rcut), create_graph=True)
        return torch.autograd.grad((out["force"] * u).sum(), x)[0]

    fast = force_gradient()
    with ops.reference_only():
        slow = force_gradient()
    assert torch.allclose(fast, slow, rtol=1e-10, atol=1e-10 * float(slow.abs().max()))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("positions", [True, False])
def test_attention_kernels_equal_their_pytorch_reference(dtype, positions):
    """The kernel library's passes (csrc/kernels/attention.h) against the same arithmetic in PyTorch: the
    layer's output, its first derivatives and their derivatives (training's force loss), with a clamped zero
    projection, a centre with unfilled slots and one without neighbours; float64 to 1e-12, float32 to 1e-5."""
    gen = torch.Generator().manual_seed(5)
    c, s, h = 3, 7, 6
    qkv0 = torch.randn(c, s, 3 * h, generator=gen, dtype=dtype)
    qkv0[1, 2, h:2 * h] = 0.0
    sw0 = torch.rand(c, s, 1, generator=gen, dtype=dtype)
    sw0[0, 5:] = 0.0
    sw0[2] = 0.0
    rvec0 = torch.randn(c, s, 3, generator=gen, dtype=dtype)
    go = torch.randn(c, s, h, generator=gen, dtype=dtype)
    w_q, w_g = torch.randn(c, s, 3 * h, generator=gen, dtype=dtype), torch.randn(c, s, s, generator=gen, dtype=dtype)

    def run(fused):
        qkv, sw, rvec = (x.clone().requires_grad_() for x in (qkv0, sw0, rvec0))
        gate = sw * sw.transpose(1, 2)
        rhat = torch.nn.functional.normalize(rvec, dim=-1)
        weight = gate * torch.bmm(rhat, rhat.transpose(1, 2))
        o = attention._SmoothAttention.apply(qkv, gate, weight, 0.5, 20.0, 20.5, 3e-9, (positions, fused))
        first = torch.autograd.grad(o, (qkv, gate, weight), go, create_graph=True)
        loss = (first[0] * w_q).sum() + (first[1] * w_g).sum() + (first[2] * w_g.transpose(1, 2)).sum() + (o * go).sum()
        second = torch.autograd.grad(loss, (qkv, sw, rvec) if positions else (qkv,))
        return (o,) + first + second

    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for fast, ref in zip((x.detach() for x in run(True)), (x.detach() for x in run(False))):
        scale = float(ref.abs().max())
        assert scale > 0
        assert float((fast - ref).abs().max()) <= tol * scale
