"""DPA-1 (se_atten / dpa1 / se_atten_v2): DeePMD-kit's own numbers from its checkpoints, its statistics,
physics (forces, virial, invariances, continuity at rcut), training and the frozen TorchScript model."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from dpmd.errors import ConfigError
from dpmd.geometry.graph import build_graph, edge_vectors
from dpmd.data import load_system
from dpmd.model import DeepPot, load_model
from dpmd.model.stats import descriptor_stats
from dpmd.model.args import normalize_model_config
from dpmd.model.export import script_model
from tests.conftest import EXAMPLE, REPO, random_rotation, triclinic_water

FIXTURES = REPO / "tests" / "fixtures"
CHECKPOINTS = [FIXTURES / "deepmd_se_atten" / f"{n}.ckpt.pt" for n in ("attn2", "attn0", "rough")] + \
              [FIXTURES / "deepmd_se_atten_v2" / f"{n}.ckpt.pt" for n in ("v2", "v2_one_side")]


def load_deepmd(path) -> DeepPot:
    """DeePMD-kit's checkpoint as dpmd loads it (`load_model`, `dpmd convert-model`): its one fitting net for all
    types (a mixed-types descriptor's) included."""
    return load_model(path)


def check(out, ref, prefix=""):
    np.testing.assert_allclose(out["energy"].numpy(), ref[prefix + "energy"], rtol=1e-12, atol=1e-10)
    for name in ("atom_energy", "force", "virial"):
        np.testing.assert_allclose(out[name].reshape(ref[prefix + name].shape).numpy(), ref[prefix + name],
                                   atol=1e-10, err_msg=prefix + name)


# ------------------------------------------------------------------------------- DeePMD-kit's numbers
@pytest.mark.parametrize("path", CHECKPOINTS, ids=lambda p: p.stem.split(".")[0])
def test_checkpoint_reproduces_deepmd(path):
    ref = np.load(path.with_name(path.name.replace(".ckpt.pt", ".npz")))
    model = load_deepmd(path)
    assert model.descriptor.mixed_types and model.descriptor.sel == [40]
    check(model(torch.tensor(ref["coord"]), torch.tensor(ref["atype"]), torch.tensor(ref["box"])), ref)
    check(model(torch.tensor(ref["open_coord"]), torch.tensor(ref["open_atype"]), None), ref, "open_")
    # TorchScript (what `dpmd freeze` writes) gives the same numbers
    scripted = script_model(model)
    out = scripted(torch.tensor(ref["coord"][1]), torch.tensor(ref["atype"]), torch.tensor(ref["box"][1]))
    np.testing.assert_allclose(float(out["energy"]), ref["energy"][1], rtol=1e-12)
    np.testing.assert_allclose(out["force"].numpy(), ref["force"][1], atol=1e-10)


@pytest.mark.parametrize("folder", ["deepmd_se_atten", "deepmd_se_atten_v2"])
def test_initial_weights_are_deepmds(folder):
    """The same seed gives DeePMD-kit's initial descriptor weights, bit for bit (type embedding, embedding and
    strip nets, attention layers)."""
    cfg = json.loads((FIXTURES / folder / "input.json").read_text())["model"]
    initial = torch.load(FIXTURES / folder / "init_descriptor.pt", weights_only=True)
    desc = DeepPot(cfg).descriptor
    theirs = desc.deepmd_state({k.split(".descriptor.", 1)[1]: v for k, v in initial.items()}, folder)
    ours = desc.state_dict()
    assert set(theirs) == set(ours)
    for name, value in theirs.items():
        if name not in ("mean", "std"):  # (statistics: from data)
            assert torch.equal(ours[name], value), name


def test_deepmd_padding_takes_the_first_atoms_type():
    """DeePMD-kit's empty slots take the type embedding of the frame's first atom: with a non-zero mean in concat
    mode its energy changes when the atoms are listed in reverse (first atom H).  dpmd's (pad_type 0) does not,
    and with pad_type 1 it gives DeePMD-kit's numbers of the reversed frame."""
    path = FIXTURES / "deepmd_se_atten" / "attn2.ckpt.pt"
    ref = np.load(path.with_name("attn2.npz"))
    model = load_deepmd(path)
    coord, atype, box = (torch.tensor(ref["coord"][0]).flip(0), torch.tensor(ref["atype"]).flip(0),
                         torch.tensor(ref["box"][0]))
    assert abs(ref["rev_energy"][0] - ref["energy"][0]) > 1e-2  # DeePMD-kit's dependence on atom order
    np.testing.assert_allclose(float(model(coord, atype, box)["energy"]), ref["energy"][0], rtol=1e-12)
    model.descriptor.pad_type = 1
    check({k: v.unsqueeze(0) for k, v in model(coord, atype, box).items()}, ref, "rev_")
    # strip mode with smooth weights (v2) does not depend on it: DeePMD-kit's reversed frame is the same
    v2 = np.load(FIXTURES / "deepmd_se_atten_v2" / "v2.npz")
    np.testing.assert_allclose(v2["rev_energy"][0], v2["energy"][0], rtol=1e-12)


@pytest.mark.parametrize("name", ["deepmd_se_atten/attn2", "deepmd_se_atten/rough", "deepmd_se_atten_v2/v2_one_side"])
def test_statistics_are_deepmds(name):
    """mean / std from the 4 training frames equal those DeePMD-kit stored (make_fixture.py trained on them;
    set_davg_zero false, with and without excluded pairs)."""
    path = FIXTURES / f"{name}.ckpt.pt"
    state = torch.load(path, map_location="cpu", weights_only=True)
    stored = {k.rpartition(".")[2]: v[:, 0] for k, v in state.items() if re.search(r"se_atten\.(mean|stddev)$", k)}
    model = DeepPot(state["_extra_state"]["model_params"])
    descriptor_stats(model, [load_system(EXAMPLE, type_map=["O", "H"]).subset(range(4))])
    desc = model.descriptor
    torch.testing.assert_close(desc.std, stored["stddev"], rtol=1e-10, atol=0)
    torch.testing.assert_close(desc.mean, stored["mean"], rtol=1e-10, atol=1e-14)


def test_config_keys_and_errors():
    cfg = normalize_model_config({"type_map": ["O", "H"], "descriptor": {"type": "dpa1", "sel": [10, 20]},
                                  "fitting_net": {}})
    d = cfg["descriptor"]
    assert d["type"] == "se_atten" and d["set_davg_zero"] and not d["smooth_type_embedding"]
    assert d["attn_layer"] == 2 and d["tebd_input_mode"] == "concat" and d["concat_output_tebd"]
    desc = DeepPot(cfg).descriptor
    assert desc.sel == [30] and desc.nnei == 30 and desc.dim_out == 40 * 4 + 8
    v2 = normalize_model_config({"type_map": ["O", "H"], "descriptor": {"type": "se_atten_v2", "sel": 30},
                                 "fitting_net": {}})["descriptor"]
    assert not v2["set_davg_zero"] and "tebd_input_mode" not in v2
    assert DeepPot({"type_map": ["O", "H"], "descriptor": v2, "fitting_net": {}}).descriptor.strip
    old = {"type": "se_atten", "sel": 30, "stripped_type_embedding": True}  # DeePMD-kit's deprecated switch
    assert DeepPot({"type_map": ["O", "H"], "descriptor": old, "fitting_net": {}}).descriptor.strip
    for bad, match in (({"tebd_input_mode": "mix"}, "concat or strip"), ({"attn_mask": True}, "attn_mask"),
                       ({"sel": 0}, "sel"), ({"axis_neuron": 50}, "axis_neuron")):
        with pytest.raises(ConfigError, match=match):
            normalize_model_config({"type_map": ["O", "H"], "fitting_net": {},
                                    "descriptor": {"type": "se_atten", "sel": 30, **bad}})


# ------------------------------------------------------------------------------------------ physics
def atten_model(kind="se_atten", **desc) -> DeepPot:
    d = {"type": kind, "sel": 40, "rcut": 3.5, "rcut_smth": 0.5, "neuron": [4, 8], "axis_neuron": 4,
         "tebd_dim": 4, "attn": 8, "attn_layer": 2, "seed": 3}
    d.update(desc)
    model = DeepPot({"type_map": ["O", "H"], "descriptor": d, "fitting_net": {"neuron": [8, 8], "seed": 4}})
    with torch.no_grad():  # non-trivial normalisation, as after data statistics
        model.descriptor.mean[:, 0] = torch.tensor([0.05, 0.04])
        model.descriptor.std[:] = torch.tensor([[0.09, 0.06, 0.06, 0.06], [0.08, 0.05, 0.05, 0.05]])
        model.fitting.energy_bias[:] = torch.tensor([-93.5, -187.1])
    return model.eval()


VARIANTS = {
    "concat": dict(smooth_type_embedding=True, exclude_types=[[0, 1]]),
    "strip": dict(kind="se_atten_v2", type_one_side=True),
    "rough": dict(smooth_type_embedding=False, attn_layer=1, normalize=False, temperature=0.5, attn_dotr=False),
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request):
    return atten_model(**VARIANTS[request.param])


@pytest.fixture(scope="module")
def cell(water):
    return triclinic_water(water)


def energy(model, coord, atype, box) -> float:
    return float(model(coord, atype, box)["energy"])


def test_forces_and_virial_are_derivatives(variant, cell):
    coord, atype, box = cell
    out = variant(coord, atype, box)
    h = 1e-5
    for i in (0, 7, len(atype) - 1):
        for k in range(3):
            cp, cm = coord.clone(), coord.clone()
            cp[i, k] += h
            cm[i, k] -= h
            fd = -(energy(variant, cp, atype, box) - energy(variant, cm, atype, box)) / (2 * h)
            assert out["force"][i, k].item() == pytest.approx(fd, abs=1e-7, rel=1e-6)
    virial = out["virial"].reshape(3, 3)
    for a in range(3):
        for b in range(3):
            eps = torch.zeros(3, 3, dtype=torch.float64)
            eps[a, b] = 1e-6
            plus, minus = torch.eye(3, dtype=torch.float64) + eps, torch.eye(3, dtype=torch.float64) - eps
            de = (energy(variant, coord @ plus.T, atype, box @ plus.T)
                  - energy(variant, coord @ minus.T, atype, box @ minus.T))
            assert virial[a, b].item() == pytest.approx(-de / 2e-6, abs=1e-6)


def test_force_loss_gradient_is_exact(variant, cell):
    """Training differentiates the forces again, with respect to the weights: d(F . u)/dw by autograd equals the
    finite difference in w (attention, type embedding and embedding weights)."""
    from dpmd.model.forces import evaluate

    coord, atype, box = cell
    graph = build_graph(coord, atype, box, variant.rcut)
    u = torch.randn(coord.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    desc = variant.descriptor
    params = [desc.type_embedding.matrix, desc.embedding.layers[0].matrix]
    if len(desc.attention) > 0:
        params.append(desc.attention[0].in_proj.matrix)

    def loss():
        return (evaluate(variant, graph, create_graph=True)["force"] * u).sum()

    grads = torch.autograd.grad(loss(), params)
    h = 1e-6
    with torch.no_grad():
        for p, g in zip(params, grads):
            flat = p.view(-1)
            k = int(g.abs().view(-1).argmax())
            flat[k] += h
            up = float(loss())
            flat[k] -= 2 * h
            down = float(loss())
            flat[k] += h
            assert float(g.view(-1)[k]) == pytest.approx((up - down) / (2 * h), rel=1e-5, abs=1e-7)


def test_rotation_translation_permutation_invariance(variant, cell):
    coord, atype, box = cell
    ref = variant(coord, atype, box)
    rot = random_rotation(1)
    out = variant(coord @ rot.T + torch.tensor([0.3, -1.2, 2.0], dtype=torch.float64), atype, box @ rot.T)
    assert float(out["energy"]) == pytest.approx(float(ref["energy"]), abs=1e-9)
    assert torch.allclose(out["force"], ref["force"] @ rot.T, atol=1e-9)
    perm = torch.randperm(len(atype), generator=torch.Generator().manual_seed(6))
    out = variant(coord[perm], atype[perm], box)
    assert torch.allclose(out["atom_energy"], ref["atom_energy"][perm], atol=1e-10)
    assert torch.allclose(out["force"], ref["force"][perm], atol=1e-9)
    # evaluated in chunks of atoms (what large systems do): the same numbers
    out = variant(coord, atype, box, chunk_atoms=5)
    assert torch.allclose(out["force"], ref["force"], atol=1e-12)
    assert torch.allclose(out["virial"], ref["virial"], atol=1e-12)


def test_neighbour_order_does_not_matter(variant, cell):
    """The descriptor of a centre does not depend on the order of its edges (DeePMD-kit sorts by distance)."""
    coord, atype, box = cell
    g = build_graph(coord, atype, box, variant.rcut)
    vec, c = edge_vectors(g), g["center"]
    d0 = variant.descriptor(vec, c, atype, atype[g["neighbor"]])
    shuffle = torch.randperm(len(c), generator=torch.Generator().manual_seed(2))
    d1 = variant.descriptor(vec[shuffle], c[shuffle], atype, atype[g["neighbor"]][shuffle])
    assert torch.allclose(d0, d1, atol=1e-12)
    # an edge beyond rcut in the list counts as an empty slot
    far = torch.tensor([[variant.rcut + 0.1, 0.0, 0.0]], dtype=torch.float64)
    d2 = variant.descriptor(torch.cat([vec, far]), torch.cat([c, c[:1]]), atype,
                            torch.cat([atype[g["neighbor"]], atype[:1]]))
    assert torch.allclose(d0, d2, atol=1e-12)


@pytest.mark.parametrize("kind, desc", [("se_atten_v2", {}), ("se_atten", {"smooth_type_embedding": True})],
                         ids=["strip", "concat"])
def test_continuous_across_cutoff(kind, desc):
    """A neighbour leaving the sphere: energy and forces go smoothly to the no-neighbour values (smooth attention;
    in concat mode DeePMD-kit's definition is continuous with a zero mean, its default set_davg_zero)."""
    model = atten_model(kind, **desc)
    if kind == "se_atten":
        model.descriptor.mean.zero_()
    atype = torch.tensor([0, 1, 1, 1])
    rc = model.rcut

    def at(d):
        # atom 3 is within rcut of atom 0 only: crossing rcut changes nothing else
        coord = torch.tensor([[0.0, 0.0, 0.0], [-0.96, 0.0, 0.0], [0.0, 0.9, 0.0], [d, 0.0, 0.0]], dtype=torch.float64)
        return model(coord, atype)

    inside, outside = at(rc - 1e-6), at(rc + 1e-6)
    assert float(inside["energy"]) == pytest.approx(float(outside["energy"]), abs=1e-12)
    assert torch.allclose(inside["force"], outside["force"], atol=1e-9)
    assert outside["force"][3].abs().max() == 0.0
    assert abs(float(at(2.0)["energy"]) - float(at(3.0)["energy"])) > 1e-6


def test_batched_ensemble_equals_one_by_one(cell):
    """The model deviation's vmapped ensemble (two models, different seeds) gives each model's own numbers."""
    from dpmd.model.ensemble import evaluate_ensemble

    coord, atype, box = cell
    models = [atten_model(**VARIANTS["concat"], seed=s) for s in (3, 9)]
    outs = evaluate_ensemble(models, build_graph(coord, atype, box, models[0].rcut), batched=True)
    for model, out in zip(models, outs):
        ref = model(coord, atype, box)
        assert torch.allclose(out["force"], ref["force"], atol=1e-12)
        assert torch.allclose(out["energy"], ref["energy"], rtol=1e-14)
    assert not torch.allclose(outs[0]["force"], outs[1]["force"])


FAST_PATHS = {**VARIANTS, "strip_attn0": dict(kind="se_atten_v2", attn_layer=0),
              "strip_two_sides": dict(kind="se_atten_v2", exclude_types=[[1, 1]]),
              "strip_attn0_one_side": dict(kind="se_atten_v2", attn_layer=0, type_one_side=True),
              "strip_rough_attn0": dict(tebd_input_mode="strip", smooth_type_embedding=False, attn_layer=0,
                                        exclude_types=[[0, 1]])}


@pytest.mark.parametrize("name", list(FAST_PATHS))
def test_fast_paths_equal_the_reference(name, cell):
    """What runs by default (the kernel library's rows and contraction, the embedding linearised in s and sw,
    the attention's hand-written backward for forces, weight-only terms cached) gives the PyTorch reference's
    energy, forces and virial, and, under training's weight_gradients_only, its force-loss weight gradients."""
    from dpmd import ops
    from dpmd.model.forces import evaluate

    coord, atype, box = cell
    model = atten_model(**FAST_PATHS[name])
    out = model(coord, atype, box)
    again = model(coord, atype, box)  # the cached weight terms
    with ops.reference_only():
        ref = model(coord, atype, box)
    for key in ("energy", "atom_energy", "force", "virial"):
        assert torch.allclose(out[key], ref[key], rtol=1e-12, atol=1e-10), key
        assert torch.equal(again[key], out[key]), key
    graph = build_graph(coord, atype, box, model.rcut)
    u = torch.randn(coord.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    params = [p for p in model.parameters() if p.requires_grad]

    def weight_gradients():
        with ops.weight_gradients_only():
            loss = (evaluate(model, graph, create_graph=True)["force"] * u).sum()
        return torch.autograd.grad(loss, params, allow_unused=True)

    model.train()
    fast = weight_gradients()
    with ops.reference_only():
        slow = weight_gradients()
    for p, a, b in zip(params, fast, slow):
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.allclose(a, b, rtol=1e-9, atol=1e-10)


def test_cached_weight_terms_follow_the_weights(cell):
    """Inference caches what depends on the weights alone (type embedding, strip table, padding); an in-place
    update of the weights (an optimizer step, a load) is seen at the next call."""
    coord, atype, box = cell
    model = atten_model(kind="se_atten_v2")
    before = model(coord, atype, box)["energy"]
    with torch.no_grad():
        model.descriptor.type_embedding.matrix.mul_(1.1)
        model.descriptor.embedding_strip.layers[0].bias.add_(0.1)
    fresh = atten_model(kind="se_atten_v2")
    fresh.load_state_dict(model.state_dict())
    after = model(coord, atype, box)["energy"]
    assert float(after) != pytest.approx(float(before), abs=1e-6)
    assert float(after) == pytest.approx(float(fresh(coord, atype, box)["energy"]), abs=1e-12)


@pytest.mark.parametrize("kind", ["se_e2_a", "se_atten_v2"])
def test_weight_caches_see_a_fused_optimizer_step(cell, kind):
    """Evaluations in eval mode cache weight-only terms; fused Adam (training's) updates the weights without
    bumping their version counters, in train mode: the next evaluation in eval mode sees the new weights."""
    from dpmd.model.forces import evaluate
    from dpmd.train.trainer import adam
    from tests.conftest import make_model

    coord, atype, box = cell
    model = (make_model() if kind == "se_e2_a" else atten_model(kind=kind)).eval()
    before = model(coord, atype, box)["energy"]
    model.train()
    opt = adam(model.parameters(), lr=0.05)
    loss = evaluate(model, build_graph(coord, atype, box, model.rcut), create_graph=True)["force"].square().sum()
    loss.backward()
    opt.step()
    fresh = make_model() if kind == "se_e2_a" else atten_model(kind=kind)
    fresh.load_state_dict(model.state_dict())
    after = model.eval()(coord, atype, box)["energy"]
    assert float(after) != pytest.approx(float(before), abs=1e-6)
    assert float(after) == pytest.approx(float(fresh.eval()(coord, atype, box)["energy"]), abs=1e-12)


def test_too_many_neighbours_is_an_error(cell):
    coord, atype, box = cell
    model = atten_model(sel=8, attn_layer=0)
    with pytest.raises(RuntimeError, match="neighbours within rcut but sel allows 8"):
        model(coord, atype, box)


# ----------------------------------------------------------------------------------- train and freeze
def test_train_and_freeze(tmp_path):
    from dpmd.model import load_model
    from dpmd.train.config import normalize_input
    from dpmd.train.freeze import freeze
    from dpmd.train.trainer import Trainer

    cfg = json.loads((FIXTURES / "deepmd_se_atten" / "input.json").read_text())
    cfg["model"]["descriptor"].update(sel="auto", neuron=[4, 8], attn=8, attn_layer=1)
    cfg["model"]["fitting_net"]["neuron"] = [8, 8]
    cfg["training"].update(training_data={"systems": [str(EXAMPLE)], "batch_size": 1}, numb_steps=3, save_freq=3,
                           disp_freq=3, device="cpu")
    trainer = Trainer(normalize_input(cfg), out_dir=tmp_path, progress=False)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.run()
    after = trainer.model.state_dict()
    for name in ("descriptor.attention.0.in_proj.matrix", "descriptor.type_embedding.matrix"):
        assert not torch.equal(before[name], after[name]), name
    freeze(tmp_path, tmp_path / "frozen.pth")
    frozen = load_model(tmp_path / "frozen.pth")
    coord, atype, box = (torch.tensor(np.load(EXAMPLE / "set.000" / "coord.npy")[0].reshape(-1, 3)),
                         torch.tensor(np.loadtxt(EXAMPLE / "type.raw", dtype=int)),
                         torch.tensor(np.load(EXAMPLE / "set.000" / "box.npy")[0].reshape(3, 3)))
    eager = trainer.model.eval()(coord, atype, box)
    out = frozen(coord, atype, box)
    assert float(out["energy"]) == pytest.approx(float(eager["energy"]), rel=1e-12)
    assert torch.allclose(out["force"], eager["force"], atol=1e-10)


def test_convert_model_cli_reproduces_deepmd(tmp_path):
    """`dpmd convert-model` of a DeePMD-kit dpa1 checkpoint: the written model is DeePMD-kit's."""
    from dpmd.cli import main

    path = CHECKPOINTS[0]
    assert main(["convert-model", "-i", str(path), "-o", str(tmp_path / "model.pth")]) == 0
    ref = np.load(path.with_name(path.name.replace(".ckpt.pt", ".npz")))
    model = load_model(tmp_path / "model.pth")
    assert len(model.fitting.nets) == 1   # DeePMD-kit's one fitting net after a mixed-types descriptor
    check(model(torch.tensor(ref["coord"]), torch.tensor(ref["atype"]), torch.tensor(ref["box"])), ref)


@pytest.mark.parametrize("kind", ["se_atten", "se_e3"])
def test_set_davg_zero_keeps_the_trained_models_mean_at_zero(tmp_path, kind):
    """set_davg_zero (se_atten's default, se_e3's when given) zeroes the statistics' mean, as in DeePMD-kit."""
    from dpmd.train.config import normalize_input
    from dpmd.train.trainer import Trainer

    descriptor = ({"type": "se_atten", "sel": 40, "rcut": 4.0, "neuron": [4, 8], "attn": 8, "attn_layer": 1}
                  if kind == "se_atten" else
                  {"type": "se_e3", "sel": [16, 28], "rcut": 4.0, "neuron": [2, 4], "set_davg_zero": True})
    cfg = {"model": {"type_map": ["O", "H"], "descriptor": descriptor, "fitting_net": {"neuron": [8]}},
           "learning_rate": {"start_lr": 1e-3, "stop_lr": 1e-5, "decay_steps": 10}, "loss": {},
           "training": {"training_data": {"systems": [str(EXAMPLE)], "batch_size": 1}, "numb_steps": 1,
                        "save_freq": 1, "disp_freq": 1, "device": "cpu"}}
    trainer = Trainer(normalize_input(cfg), out_dir=tmp_path, progress=False)
    desc = trainer.model.descriptor
    assert torch.equal(desc.mean, torch.zeros_like(desc.mean)) and bool((desc.std != 1).any())
