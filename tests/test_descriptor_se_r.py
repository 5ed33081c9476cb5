"""The se_e2_r descriptor (dpmd.model.descriptor.se_r): DeePMD-kit's numbers and statistics, physics, training and
the frozen model.  The physics helpers here serve tests/test_descriptor_hybrid.py too."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from dpmd.data import load_system
from dpmd.geometry.graph import build_graph
from dpmd.errors import ConfigError
from dpmd.model import DeepPot, load_model, save_model
from dpmd.model.forces import evaluate
from dpmd.model.stats import descriptor_stats
from dpmd.train.config import normalize_input
from dpmd.train.freeze import freeze
from dpmd.train.trainer import Trainer
from tests.conftest import EXAMPLE, REPO, random_rotation, triclinic_water

FIXTURE = REPO / "tests" / "fixtures" / "deepmd_se_e2_r"
NFRAMES = 4  # the fixtures' training frames (make_fixture.py)

pytestmark = pytest.mark.filterwarnings(r"ignore:.*torch\.jit\..*deprecated:DeprecationWarning")


# ---------------------------------------------------------------------------- helpers (also for hybrid)
def assert_matches_deepmd(model, ref) -> None:
    """A model's periodic and open-system results against DeePMD-kit's (a make_fixture.py npz)."""
    for prefix, box in (("", torch.tensor(ref["box"])), ("open_", None)):
        out = model(torch.tensor(ref[f"{prefix}coord"]), torch.tensor(ref[f"{prefix}atype"]), box)
        np.testing.assert_allclose(out["energy"].numpy(), ref[f"{prefix}energy"], rtol=1e-12, atol=1e-10)
        for k in ("atom_energy", "force", "virial"):
            np.testing.assert_allclose(out[k].numpy(), ref[f"{prefix}{k}"], rtol=0, atol=1e-10, err_msg=prefix + k)


def training_frames(tmp_path):
    """The fixtures' training system, the first NFRAMES frames of examples/water/data_0, written under tmp_path."""
    root = tmp_path / "data"
    if not root.is_dir():
        (root / "set.000").mkdir(parents=True)
        for name in ("type.raw", "type_map.raw"):
            shutil.copy(EXAMPLE / name, root / name)
        for name in ("coord", "box", "energy", "force"):
            np.save(root / "set.000" / f"{name}.npy", np.load(EXAMPLE / "set.000" / f"{name}.npy")[:NFRAMES])
    return root


def assert_stats_match(checkpoint, system) -> None:
    """dpmd's statistics of a fresh model on the training frames equal the checkpoint's (DeePMD-kit's)."""
    stored = load_model(checkpoint)
    fresh = DeepPot(stored.config)
    descriptor_stats(fresh, [system], max_frames=10)
    ours = dict(fresh.descriptor.named_buffers())
    for name, value in stored.descriptor.named_buffers():
        assert not torch.equal(value, torch.ones_like(value)) and not torch.equal(value, torch.zeros_like(value))
        torch.testing.assert_close(ours[name], value, rtol=1e-12, atol=1e-15, msg=lambda m: f"{name}: {m}")


def unbiased(model):
    """The model without its per-type energy bias (a large constant that only adds rounding error to finite
    differences of the energy)."""
    with torch.no_grad():
        model.fitting.energy_bias.zero_()
    return model.eval()


def energy(model, coord, atype, box=None) -> float:
    return float(model(coord, atype, box)["energy"])


def check_forces_and_virial(model, coord, atype, box) -> None:
    """Forces = -dE/dx (central differences), virial = -dE/d(strain)."""
    out = model(coord, atype, box)
    h = 1e-5
    for i in (0, 1, coord.shape[0] - 1):
        for k in range(3):
            cp, cm = coord.clone(), coord.clone()
            cp[i, k] += h
            cm[i, k] -= h
            fd = -(energy(model, cp, atype, box) - energy(model, cm, atype, box)) / (2 * h)
            assert out["force"][i, k].item() == pytest.approx(fd, abs=1e-8, rel=1e-6)
    virial = out["virial"].reshape(3, 3)
    eye = torch.eye(3, dtype=torch.float64)
    for a in range(3):
        for b in range(3):
            eps = torch.zeros(3, 3, dtype=torch.float64)
            eps[a, b] = 1e-6
            de = (energy(model, coord @ (eye + eps).T, atype, box @ (eye + eps).T)
                  - energy(model, coord @ (eye - eps).T, atype, box @ (eye - eps).T))
            assert virial[a, b].item() == pytest.approx(-de / 2e-6, abs=1e-7)
    assert torch.allclose(virial, virial.T, atol=1e-10)
    assert out["force"].abs().max() > 1e-3  # (not a constant model)


def check_invariances(model, coord, atype, box) -> None:
    ref = model(coord, atype, box)
    e0 = float(ref["energy"])
    rot = random_rotation(4)
    out = model(coord @ rot.T, atype, box @ rot.T)
    assert float(out["energy"]) == pytest.approx(e0, abs=1e-10)
    assert torch.allclose(out["force"], ref["force"] @ rot.T, atol=1e-10)
    shift = torch.tensor([0.3, -1.7, 2.9], dtype=torch.float64)
    assert energy(model, coord + shift, atype, box) == pytest.approx(e0, abs=1e-10)
    perm = torch.randperm(coord.shape[0], generator=torch.Generator().manual_seed(6))
    out = model(coord[perm], atype[perm], box)
    assert float(out["energy"]) == pytest.approx(e0, abs=1e-10)
    assert torch.allclose(out["force"], ref["force"][perm], atol=1e-10)
    assert torch.allclose(out["atom_energy"], ref["atom_energy"][perm], atol=1e-12)


def check_continuity_at(model, rc: float, atype=(0, 1, 1), h: float = 1e-6) -> None:
    """Atom 2 (type atype[2]) crosses the cut-off rc of atom 0 along x (and is beyond rc of atom 1): no jump, the
    energy changes across it by what the force says (-F dx) and the forces by O(h)."""
    types = torch.tensor(list(atype))

    def at(d):
        return model(torch.tensor([[0.0, 0.0, 0.0], [-0.96, 0.0, 0.0], [d, 0.0, 0.0]], dtype=torch.float64), types)

    inside, outside = at(rc - h), at(rc + h)
    de = float(outside["energy"]) - float(inside["energy"])
    assert de == pytest.approx(-float(inside["force"][2, 0] + outside["force"][2, 0]) * h, abs=1e-13)
    assert torch.allclose(inside["force"], outside["force"], atol=100 * h)
    assert abs(float(at(rc - 0.3)["energy"]) - float(outside["energy"])) > 1e-8  # the neighbour matters inside


def train_and_freeze(tmp_path, descriptor: dict):
    """A few steps of training with this descriptor section (a DeePMD-kit-style input), then freezing: the
    trained eager model and the frozen TorchScript file."""
    cfg = normalize_input({
        "model": {"type_map": ["O", "H"], "descriptor": descriptor, "fitting_net": {"neuron": [8, 8], "seed": 1}},
        "learning_rate": {"type": "exp", "start_lr": 2e-3, "stop_lr": 1e-4, "decay_steps": 2},
        "loss": {"type": "ener", "start_pref_e": 0.02, "limit_pref_e": 1, "start_pref_f": 1000, "limit_pref_f": 1},
        "training": {"training_data": {"systems": [str(training_frames(tmp_path))], "batch_size": 1},
                     "numb_steps": 4, "seed": 7, "disp_freq": 2, "save_freq": 4, "device": "cpu"}})
    trainer = Trainer(cfg, out_dir=tmp_path / "run", progress=False)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.run()
    after = trainer.model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before if "descriptor" in k)  # the descriptor trains
    freeze(tmp_path / "run", tmp_path / "frozen.pth")
    return trainer.model.eval(), torch.jit.load(str(tmp_path / "frozen.pth"))


def check_frozen_equals_eager(eager, frozen, water) -> None:
    coord, atype, box = triclinic_water(water)
    ref = eager(coord, atype, box)
    out = frozen(coord, atype, box)
    assert float(out["energy"]) == pytest.approx(float(ref["energy"]), rel=1e-12)
    assert torch.allclose(out["force"], ref["force"], atol=1e-12)
    assert torch.allclose(out["virial"], ref["virial"], atol=1e-10)


# ---------------------------------------------------------------------------- DeePMD-kit's numbers
@pytest.fixture(scope="module", params=["model", "model_exclude"])
def deepmd_model(request):
    """model: type_one_side true; model_exclude: type_one_side false and exclude_types [[0, 1]] (README)."""
    return request.param, load_model(FIXTURE / f"{request.param}.ckpt.pt")


def assert_converted_matches_deepmd(model, ref, tmp_path) -> None:
    """`dpmd convert-model` (save_model of the imported checkpoint): the TorchScript file, and the model
    load_model rebuilds from it, give DeePMD-kit's numbers."""
    save_model(model, tmp_path / "converted.pth")
    assert_matches_deepmd(load_model(tmp_path / "converted.pth"), ref)
    scripted = torch.jit.load(str(tmp_path / "converted.pth"))
    out = scripted(torch.tensor(ref["coord"][1]), torch.tensor(ref["atype"]), torch.tensor(ref["box"][1]))
    np.testing.assert_allclose(float(out["energy"]), ref["energy"][1], rtol=1e-12)
    np.testing.assert_allclose(out["force"].numpy(), ref["force"][1], atol=1e-10)
    np.testing.assert_allclose(out["virial"].numpy(), ref["virial"][1], atol=1e-10)


def test_deepmd_checkpoint_gives_its_numbers(deepmd_model, tmp_path):
    name, model = deepmd_model
    ref = np.load(FIXTURE / f"{name}.npz")
    assert_matches_deepmd(model, ref)
    assert_converted_matches_deepmd(model, ref, tmp_path)


def test_exclude_types_and_type_one_side_as_deepmd_kit():
    """exclude_types changes the numbers (the fixture exercises it); type_one_side does not (DeePMD-kit's
    PyTorch backend has one net per neighbour type either way)."""
    model = load_model(FIXTURE / "model_exclude.ckpt.pt")
    ref = np.load(FIXTURE / "model_exclude.npz")
    coord, atype, box = (torch.tensor(ref[k][0] if k != "atype" else ref[k]) for k in ("coord", "atype", "box"))
    for change, differs in (({"exclude_types": []}, True), ({"type_one_side": True}, False)):
        config = {**model.config, "descriptor": {**model.config["descriptor"], **change}}
        other = DeepPot(config)
        other.load_state_dict(model.state_dict())
        e = energy(other.eval(), coord, atype, box)
        assert (abs(e - ref["energy"][0]) > 1e-3) == differs, change


def test_statistics_equal_deepmd_kit(tmp_path):
    system = load_system(training_frames(tmp_path), type_map=["O", "H"])
    for name in ("model", "model_exclude"):
        assert_stats_match(FIXTURE / f"{name}.ckpt.pt", system)


# ---------------------------------------------------------------------------- physics
@pytest.mark.parametrize("name", ["model", "model_exclude"])
def test_forces_virial_invariances(name, water):
    model = unbiased(load_model(FIXTURE / f"{name}.ckpt.pt"))
    coord, atype, box = triclinic_water(water, seed=2)
    check_forces_and_virial(model, coord, atype, box)
    check_invariances(model, coord, atype, box)


def check_padded_layout(model, coord, atype, box) -> None:
    """The MD engine's padded layout (forward with type_counts, the sync-free path on a GPU) gives the edge list's
    numbers."""
    from tests.test_backend_matrix import padded_graph

    out = evaluate(model, padded_graph(model, coord, atype, box))
    ref = evaluate(model, build_graph(coord, atype, box, model.rcut))
    assert torch.allclose(out["atom_energy"], ref["atom_energy"], atol=1e-12)
    assert torch.allclose(out["force"], ref["force"], atol=1e-12)
    assert torch.allclose(out["virial"], ref["virial"], atol=1e-10)


def test_padded_layout(water):
    model = load_model(FIXTURE / "model_exclude.ckpt.pt")
    check_padded_layout(model, *triclinic_water(water))


def test_continuous_at_rcut():
    model = unbiased(load_model(FIXTURE / "model.ckpt.pt"))
    check_continuity_at(model, model.rcut)
    # with exclude_types [[0, 1]] a pair that is not excluded (H-H) still leaves smoothly
    excl = unbiased(load_model(FIXTURE / "model_exclude.ckpt.pt"))
    check_continuity_at(excl, excl.rcut, atype=(1, 0, 1))


def test_second_derivatives_for_the_force_loss(water):
    """Training differentiates forces again: d(sum F^2)/d(weights) of the descriptor equals finite differences."""
    model = unbiased(load_model(FIXTURE / "model.ckpt.pt"))
    coord, atype, box = triclinic_water(water)
    weight = model.descriptor.embeddings[1].layers[0].matrix

    graph = build_graph(coord, atype, box, model.rcut)

    def loss():
        f = evaluate(model, graph, create_graph=True)["force"]  # as the trainer's force loss does
        return (f * f).sum()

    (g,) = torch.autograd.grad(loss(), weight)
    h = 1e-6
    with torch.no_grad():
        weight[0, 2] += h
    plus = loss().item()
    with torch.no_grad():
        weight[0, 2] -= 2 * h
    minus = loss().item()
    with torch.no_grad():
        weight[0, 2] += h
    assert g[0, 2].item() == pytest.approx((plus - minus) / (2 * h), rel=1e-5)
    assert abs(g[0, 2].item()) > 1e-6


# ---------------------------------------------------------------------------- config, training, freezing
def test_config_is_deepmd_kits():
    def config(**descriptor):
        return {"type_map": ["O", "H"], "descriptor": {"sel": [4, 8], "rcut": 3.0, **descriptor}, "fitting_net": {}}

    d = DeepPot(config(type="se_r")).config["descriptor"]  # (DeePMD-kit's alias)
    assert d["type"] == "se_e2_r" and d["neuron"] == [10, 20, 40] and d["rcut_smth"] == 0.5
    assert d["type_one_side"] is False and d["exclude_types"] == [] and d["set_davg_zero"] is False
    with pytest.raises(ConfigError, match="unknown key 'model.descriptor.axis_neuron'"):
        DeepPot(config(type="se_e2_r", axis_neuron=4))
    with pytest.raises(ConfigError, match="exclude_types.*type 2 is not in model.type_map"):
        DeepPot(config(type="se_e2_r", exclude_types=[[0, 2]]))
    with pytest.raises(ConfigError, match="env_protection.*not supported"):
        DeepPot(config(type="se_e2_r", env_protection=0.1))


def test_same_seed_gives_deepmd_kits_initial_weights():
    """DeePMD-kit's seeding: net t of a descriptor with seed s draws from child_seed(s, t), so a fresh model has
    the weights DeePMD-kit initialised; training moved them only by its few steps of small learning rate."""
    trained = load_model(FIXTURE / "model.ckpt.pt")
    fresh = DeepPot(trained.config)
    for (name, a), b in zip(fresh.descriptor.embeddings.named_parameters(), trained.descriptor.embeddings.parameters()):
        assert (a - b).abs().max() < 0.01, name
    assert (DeepPot({**trained.config, "descriptor": {**trained.config["descriptor"], "seed": 2}}).descriptor
            .embeddings[0].layers[0].matrix - trained.descriptor.embeddings[0].layers[0].matrix).abs().max() > 0.05


def test_train_and_freeze(tmp_path, water):
    eager, frozen = train_and_freeze(tmp_path, {"type": "se_e2_r", "sel": "auto", "rcut": 4.0, "rcut_smth": 1.0,
                                                "neuron": [4, 8], "exclude_types": [[1, 1]], "seed": 1})
    check_frozen_equals_eager(eager, frozen, water)
