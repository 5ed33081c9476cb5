"""The se_e3 descriptor (DeePMD-kit's DescrptSeT): DeePMD-kit's own numbers and statistics, physics, the
backends, training and freezing.  tests/fixtures/deepmd_se_e3 (README there): two DeePMD-kit 3.2 checkpoints,
without and with exclude_types."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import yaml

from dpmd import ops
from dpmd.data import load_system
from dpmd.errors import ConfigError, DpmdError
from dpmd.geometry.graph import build_graph
from dpmd.model import DeepPot, load_model
from dpmd.model.export import script_model
from dpmd.model.forces import evaluate
from dpmd.model.stats import descriptor_stats
from tests.conftest import EXAMPLE, REPO, random_rotation, triclinic_water

pytestmark = pytest.mark.filterwarnings(r"ignore:.*torch\.jit\..*deprecated:DeprecationWarning")

FIXTURE = REPO / "tests" / "fixtures" / "deepmd_se_e3"
SUFFIXES = ["", "_exclude"]  # model{suffix}.ckpt.pt: exclude_types [] and [[0, 1]]


@pytest.fixture(scope="module")
def models():
    return {s: load_model(FIXTURE / f"model{s}.ckpt.pt") for s in SUFFIXES}


def unbiased(model):
    """A copy without the per-type energy bias (a constant whose rounding would only blur finite differences)."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        model.fitting.energy_bias.zero_()
    return model


def energy(model, coord, atype, box):
    return float(model(coord, atype, box)["energy"])


# ------------------------------------------------------------------------------------- DeePMD-kit identity
@pytest.mark.parametrize("suffix", SUFFIXES)
def test_deepmd_checkpoint_gives_deepmd_numbers(models, suffix):
    model, ref = models[suffix], np.load(FIXTURE / f"reference{suffix}.npz")
    out = model(torch.tensor(ref["coord"]), torch.tensor(ref["atype"]), torch.tensor(ref["box"]))
    np.testing.assert_allclose(out["energy"].numpy(), ref["energy"], rtol=1e-12, atol=1e-10)
    for k in ("atom_energy", "force", "virial"):
        np.testing.assert_allclose(out[k].numpy(), ref[k], rtol=0, atol=1e-10, err_msg=k)
    out = model(torch.tensor(ref["nopbc_coord"]), torch.tensor(ref["nopbc_atype"]), None)
    for k in ("energy", "atom_energy", "force", "virial"):
        np.testing.assert_allclose(out[k].numpy(), ref[f"nopbc_{k}"], rtol=0, atol=1e-10, err_msg=k)


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_statistics_equal_deepmd(models, suffix):
    """The statistics of the 6 training frames are the mean / stddev DeePMD-kit stored (every slot's row)."""
    stored = torch.load(FIXTURE / f"model{suffix}.ckpt.pt", weights_only=True)
    prefix = "model.Default.atomic_model.descriptor.seat."
    model = copy.deepcopy(models[suffix])
    with torch.no_grad():
        model.descriptor.mean.fill_(7.0)
        model.descriptor.std.fill_(7.0)
    descriptor_stats(model, [load_system(EXAMPLE, type_map=["O", "H"]).subset(range(6))])
    torch.testing.assert_close(model.descriptor.mean, stored[prefix + "mean"][:, 0], rtol=0, atol=1e-12)
    torch.testing.assert_close(model.descriptor.std, stored[prefix + "stddev"][:, 0], rtol=0, atol=1e-12)


def test_unsupported_checkpoints_are_one_line_errors(tmp_path):
    state = torch.load(FIXTURE / "model.ckpt.pt", weights_only=True)
    key = "model.Default.atomic_model.descriptor.seat.mean"
    bad = dict(state)
    bad[key] = state[key].clone()
    bad[key][0, :, 2] = 0.1
    torch.save(bad, tmp_path / "angular_mean.pt")
    with pytest.raises(DpmdError, match="angular_mean.pt: descriptor.seat.mean has a non-zero angular part"):
        load_model(tmp_path / "angular_mean.pt")
    bad = dict(state)
    bad["model.Default.atomic_model.descriptor.seat.compress_data.0"] = torch.ones(3, dtype=torch.float64)
    torch.save(bad, tmp_path / "compressed.pt")
    with pytest.raises(DpmdError, match="compressed.pt: a compressed se_e3 descriptor"):
        load_model(tmp_path / "compressed.pt")


def test_same_seed_gives_deepmd_initial_weights(models):
    """A fresh descriptor with input.json's seed has DeePMD-kit's initial weights (init_descriptor.pt: DeePMD-kit's
    DescrptSeT of that section, untrained)."""
    from dpmd.model.descriptor.se_t import DescriptorSeT

    deepmd = DescriptorSeT.deepmd_state(torch.load(FIXTURE / "init_descriptor.pt", weights_only=True), "init")
    ours = DeepPot(models[""].config).descriptor.state_dict()
    nets = [k for k in ours if k.startswith("embeddings.")]
    assert len(nets) == 3 * 8 and sorted(nets) == sorted(k for k in deepmd if k.startswith("embeddings."))
    for k in nets:
        assert torch.equal(ours[k], deepmd[k]), k


# ------------------------------------------------------------------------------------------------- physics
@pytest.fixture(scope="module")
def cell():
    s = load_system(EXAMPLE, type_map=["O", "H"])
    return triclinic_water((torch.tensor(s.coord[0]), torch.tensor(s.atype), torch.tensor(s.box[0])), seed=1)


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_forces_are_minus_energy_gradient(models, cell, suffix):
    model = unbiased(models[suffix])
    coord, atype, box = cell
    force = model(coord, atype, box)["force"]
    h = 1e-5
    for i in (0, 5, len(atype) - 1):
        for k in range(3):
            cp, cm = coord.clone(), coord.clone()
            cp[i, k] += h
            cm[i, k] -= h
            fd = -(energy(model, cp, atype, box) - energy(model, cm, atype, box)) / (2 * h)
            assert force[i, k].item() == pytest.approx(fd, abs=1e-8, rel=1e-6)


def test_virial_is_finite_strain_derivative(models, cell):
    model = unbiased(models[""])
    coord, atype, box = cell
    virial = model(coord, atype, box)["virial"].reshape(3, 3)
    h = 1e-6
    for a in range(3):
        for b in range(3):
            eps = torch.zeros(3, 3, dtype=torch.float64)
            eps[a, b] = h
            plus, minus = torch.eye(3, dtype=torch.float64) + eps, torch.eye(3, dtype=torch.float64) - eps
            dE = energy(model, coord @ plus.T, atype, box @ plus.T) - energy(model, coord @ minus.T, atype, box @ minus.T)
            assert virial[a, b].item() == pytest.approx(-dE / (2 * h), abs=1e-7)
    assert torch.allclose(virial, virial.T, atol=1e-10)


def test_invariances(models, cell):
    model = models[""]
    coord, atype, box = cell
    ref = model(coord, atype, box)
    e0 = float(ref["energy"])
    rot = random_rotation(4)
    out = model(coord @ rot.T, atype, box @ rot.T)
    assert float(out["energy"]) == pytest.approx(e0, abs=1e-10)
    assert torch.allclose(out["force"], ref["force"] @ rot.T, atol=1e-10)
    assert energy(model, coord + torch.tensor([0.3, -1.7, 2.9], dtype=torch.float64), atype, box) == pytest.approx(
        e0, abs=1e-10)
    perm = torch.randperm(len(atype), generator=torch.Generator().manual_seed(6))
    out = model(coord[perm], atype[perm], box)
    assert float(out["energy"]) == pytest.approx(e0, abs=1e-10)
    assert torch.allclose(out["force"], ref["force"][perm], atol=1e-10)
    assert torch.allclose(out["atom_energy"], ref["atom_energy"][perm], atol=1e-12)


def test_continuous_across_cutoff(models):
    """A neighbour leaving the sphere of atom 0: energy and forces go smoothly to the values without it."""
    model = models[""]
    atype = torch.tensor([0, 1, 1, 0])
    rc = model.rcut

    def at(d):  # atom 3 is within rcut of atom 0 only, at an angle to the others (a three-body term)
        coord = torch.tensor([[0.0, 0.0, 0.0], [-0.96, 0.0, 0.0], [0.3, 0.9, 0.0], [0.0, -0.6 * d, 0.8 * d]],
                             dtype=torch.float64)
        return model(coord, atype)

    inside, outside = at(rc - 1e-6), at(rc + 1e-6)
    assert float(inside["energy"]) == pytest.approx(float(outside["energy"]), abs=1e-12)
    assert torch.allclose(inside["force"], outside["force"], atol=1e-9)
    assert outside["force"][3].abs().max() == 0.0
    assert abs(float(at(2.5)["energy"]) - float(at(3.0)["energy"])) > 1e-6


# ------------------------------------------------------------------------------------------------- backends
@pytest.mark.parametrize("suffix", SUFFIXES)
def test_training_derivatives_equal_the_reference(models, cell, suffix):
    """The force loss's weight gradient with training's backend (linearised nets, any-order kernels) equals the
    plain autograd one (double differentiation through the nets)."""
    coord, atype, box = cell
    graph = build_graph(coord, atype, box, models[suffix].rcut)

    def grads(context):
        model = copy.deepcopy(models[suffix]).train()
        with context:
            force = evaluate(model, graph, create_graph=True)["force"]
        (force * force).sum().backward()
        return [p.grad for p in model.descriptor.embeddings.parameters()]

    for a, b in zip(grads(ops.weight_gradients_only()), grads(ops.reference_only())):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_padded_layout_equals_edge_list(models, cell):
    """The padded layout (forward with type_counts: the MD engine's sync-free path on a GPU) gives the edge
    list's numbers."""
    from dpmd.md.neighbors import VerletList

    model = models["_exclude"]
    coord, atype, box = cell
    n, chunk = len(atype), 8
    verlet = VerletList(model.rcut, 1.0)
    verlet.build(coord[None], box[None])
    rows = torch.argsort(atype, stable=True)
    verlet.pad(rows, atype)
    nl = verlet.within_cutoff(coord[None], box[None], "padded", model.sel)
    assert nl.format == "padded" and not nl.overflow.any()
    graph = {"rows": rows, "row_chunk": chunk, "edge_vec": nl.vec, "neighbor": nl.neighbor, "atype": atype,
             "box": box[None], "natoms": n, "batch": torch.zeros(n, dtype=torch.long),
             "row_type_counts": [torch.bincount(atype[rows[r:r + chunk]], minlength=2).tolist()
                                 for r in range(0, n, chunk)]}
    out = evaluate(model, graph)
    ref = evaluate(model, build_graph(coord, atype, box, model.rcut))
    assert torch.allclose(out["atom_energy"], ref["atom_energy"], atol=1e-12)
    assert torch.allclose(out["force"], ref["force"], atol=1e-12)


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_frozen_model_equals_eager(models, cell, suffix):
    model = models[suffix]
    coord, atype, box = cell
    ref = model(coord, atype, box)
    out = script_model(model)(coord, atype, box)
    assert float(out["energy"]) == pytest.approx(float(ref["energy"]), abs=1e-10)
    for k in ("force", "virial"):
        torch.testing.assert_close(out[k].reshape(ref[k].shape), ref[k], rtol=0, atol=1e-10)


# ------------------------------------------------------------------------------------- config and training
def test_config_keys_and_errors():
    base = {"type_map": ["O", "H"], "fitting_net": {"neuron": [4]},
            "descriptor": {"type": "se_at", "sel": [4, 8], "rcut": 3.0, "neuron": [2, 4], "seed": 1}}
    model = DeepPot(base)
    assert model.config["descriptor"]["type"] == "se_e3" and model.descriptor.dim_out == 4
    assert len(model.descriptor.embeddings) == 3  # (O, O), (O, H), (H, H)
    for change, message in ((("axis_neuron", 4), "axis_neuron"), (("exclude_types", [[0, 2]]), "type 2"),
                            (("env_protection", 1.0), "env_protection"), (("sel", [4]), "sel")):
        config = copy.deepcopy(base)
        config["descriptor"][change[0]] = change[1]
        with pytest.raises(ConfigError, match=message):
            DeepPot(config)


def test_cli_convert_train_and_freeze(tmp_path):
    import subprocess
    import sys

    cfg = {"model": {"type_map": ["O", "H"],
                     "descriptor": {"type": "se_e3", "sel": "auto", "rcut": 3.5, "rcut_smth": 0.5, "neuron": [2, 4],
                                    "exclude_types": [[0, 0]], "seed": 1},
                     "fitting_net": {"neuron": [8], "seed": 1}},
           "learning_rate": {"type": "exp", "start_lr": 2e-3, "stop_lr": 1e-4, "decay_steps": 5},
           "loss": {"type": "ener", "start_pref_e": 0.02, "limit_pref_e": 1, "start_pref_f": 1000,
                    "limit_pref_f": 1},
           "training": {"training_data": {"systems": [str(EXAMPLE)], "batch_size": 1}, "numb_steps": 4,
                        "seed": 1, "disp_freq": 2, "save_freq": 4, "device": "cpu"}}
    (tmp_path / "input.yaml").write_text(yaml.safe_dump(cfg))

    def dpmd(*args):
        res = subprocess.run([sys.executable, "-m", "dpmd.cli", *args, "--threads", "1"] if args[0] == "train" else
                             [sys.executable, "-m", "dpmd.cli", *args], capture_output=True, text=True, cwd=tmp_path)
        assert res.returncode == 0, res.stderr

    dpmd("convert-model", "--from", "deepmd", "-i", str(FIXTURE / "model.ckpt.pt"), "-o", "converted.pth")
    ref = np.load(FIXTURE / "reference.npz")
    out = load_model(tmp_path / "converted.pth")(torch.tensor(ref["coord"][0]), torch.tensor(ref["atype"]),
                                                 torch.tensor(ref["box"][0]))
    np.testing.assert_allclose(out["force"].numpy(), ref["force"][0], rtol=0, atol=1e-10)
    dpmd("train", "input.yaml")
    lcurve = np.loadtxt(tmp_path / "lcurve.out", ndmin=2)
    assert lcurve.shape[0] >= 2 and np.isfinite(lcurve).all()
    dpmd("freeze", "-o", "model.pth")
    frozen = torch.jit.load(str(tmp_path / "model.pth"))
    eager = load_model(tmp_path / "model.ckpt.pt")
    assert eager.config["descriptor"]["type"] == "se_e3"
    s = load_system(EXAMPLE, type_map=["O", "H"])
    coord, atype, box = torch.tensor(s.coord[1]), torch.tensor(s.atype), torch.tensor(s.box[1])
    ref, out = eager(coord, atype, box), frozen(coord, atype, box)
    assert float(out["energy"]) == pytest.approx(float(ref["energy"]), abs=1e-10)
    torch.testing.assert_close(out["force"], ref["force"], rtol=0, atol=1e-10)
