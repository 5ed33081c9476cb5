"""se_atten / se_atten_v2 with use_econf_tebd: the type embedding of each element's electronic configuration.

The configurations against the filling rules, DeePMD-kit's own numbers from its checkpoints
(tests/fixtures/deepmd_econf, README there), its initial weights, forces as energy gradients, and
train -> freeze -> test."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dpmd.errors import ConfigError
from dpmd.model import DeepPot, load_model
from dpmd.model.args import normalize_model_config
from dpmd.model.descriptor import econf
from dpmd.model.descriptor.type_embedding import TypeEmbedding
from dpmd.model.export import script_model
from tests.conftest import REPO, finite_difference_force

FIXTURE = REPO / "tests" / "fixtures" / "deepmd_econf"
TYPE_MAP = ["Cu", "Ag", "Au"]


# ----------------------------------------------------------------------------------- the configurations
@pytest.mark.parametrize("symbol, expected", [
    ("H", "1s1"),
    ("O", "1s2 2s2 2p4"),
    ("Fe", "1s2 2s2 2p6 3s2 3p6 4s2 3d6"),                      # Madelung's order: 4s before 3d
    ("Cu", "1s2 2s2 2p6 3s2 3p6 4s1 3d10"),                     # a filled 3d takes an electron from 4s
    ("Pd", "1s2 2s2 2p6 3s2 3p6 4s2 3d10 4p6 4d10"),            # both 5s electrons in 4d
    ("Gd", "[Xe] 4f7 5d1 6s2"),                                # a half-filled 4f, one electron in 5d
])
def test_configurations_by_hand(symbol, expected):
    xe = "1s2 2s2 2p6 3s2 3p6 4s2 3d10 4p6 5s2 4d10 5p6"
    shells = dict((s[:2], int(s[2:])) for s in expected.replace("[Xe]", xe).split())
    assert econf.configuration(symbol) == shells


def test_filling_rules_for_all_elements():
    """Neutral atoms: as many electrons as protons; no subshell over 2(2l + 1); Hund's rule in every subshell; the
    vector of +-1/sqrt(118) entries has unit length."""
    assert len(econf.ELEMENTS) == 118 and econf.ECONF_DIM == 118
    for z, symbol in enumerate(econf.ELEMENTS, 1):
        shells = econf.configuration(symbol)
        assert sum(shells.values()) == z, symbol
        assert all(0 < n <= 2 * (2 * "spdf".index(s[1]) + 1) for s, n in shells.items()), symbol
        occupations = econf.orbital_occupations(symbol)
        assert sum(occupations) == z
        start = 0
        for shell in econf.SUBSHELLS:  # per subshell: pairs only once every orbital has an electron
            orbitals = occupations[start:start + 2 * "spdf".index(shell[1]) + 1]
            start += len(orbitals)
            assert orbitals == sorted(orbitals, reverse=True), (symbol, shell)
            assert 2 not in orbitals or 0 not in orbitals, (symbol, shell)
        assert np.linalg.norm(econf.econf_vector(symbol)) == pytest.approx(1.0, abs=1e-14)
    # O's 2p: one pair and two single electrons, in DeePMD-kit's spin form (1, 1), (-1, 1), (-1, 1)
    o = np.round(np.array(econf.econf_vector("O")) * np.sqrt(118))
    assert o[4:10].tolist() == [1, 1, -1, 1, -1, 1]  # (after 1s and 2s: two numbers each)


def test_unknown_element_is_a_one_line_error():
    descriptor = {"type": "se_atten_v2", "sel": 30, "use_econf_tebd": True}
    with pytest.raises(ConfigError, match=r"'model.descriptor.use_econf_tebd': type_map entry 'Xx' is not an "
                                          r"element"):
        normalize_model_config({"type_map": ["O", "Xx"], "descriptor": descriptor, "fitting_net": {}})
    hybrid = {"type": "hybrid", "list": [{"type": "se_e2_a", "sel": [4, 4]}, descriptor]}
    with pytest.raises(ConfigError, match="type_map entry 'type_1'"):
        normalize_model_config({"type_map": ["O", "type_1"], "descriptor": hybrid, "fitting_net": {}})
    normalize_model_config({"type_map": ["O", "type_1"], "descriptor": dict(descriptor, use_econf_tebd=False),
                            "fitting_net": {}})  # one-hot types: any names


# ------------------------------------------------------------------------------- DeePMD-kit's numbers
def check(out, ref, prefix=""):
    np.testing.assert_allclose(out["energy"].numpy(), ref[prefix + "energy"], rtol=1e-12, atol=1e-10)
    for name in ("atom_energy", "force", "virial"):
        np.testing.assert_allclose(out[name].reshape(ref[prefix + name].shape).numpy(), ref[prefix + name],
                                   atol=1e-10, err_msg=prefix + name)


@pytest.mark.parametrize("name", ["v2", "concat"])
def test_checkpoint_reproduces_deepmd(name):
    ref = np.load(FIXTURE / f"{name}.npz")
    model = load_model(FIXTURE / f"{name}.ckpt.pt")
    assert model.type_map == TYPE_MAP and model.descriptor.type_embedding.matrix.shape[0] == 118
    check(model(torch.tensor(ref["coord"]), torch.tensor(ref["atype"]), torch.tensor(ref["box"])), ref)
    check(model(torch.tensor(ref["open_coord"]), torch.tensor(ref["open_atype"]), None), ref, "open_")
    scripted = script_model(model)  # TorchScript (what `dpmd freeze` writes)
    out = scripted(torch.tensor(ref["coord"][1]), torch.tensor(ref["atype"]), torch.tensor(ref["box"][1]))
    np.testing.assert_allclose(float(out["energy"]), ref["energy"][1], rtol=1e-12)
    np.testing.assert_allclose(out["force"].numpy(), ref["force"][1], atol=1e-10)


def test_initial_weights_are_deepmds():
    """A seed gives DeePMD-kit's initial descriptor weights (the type embedding's matrix (118, tebd_dim)), and its
    type embedding for the widths whose layer adds the configuration back (118, 236), bias and padding row too."""
    cfg = json.loads((FIXTURE / "input.json").read_text())["model"]
    initial = torch.load(FIXTURE / "init_descriptor.pt", weights_only=True)
    desc = DeepPot(cfg).descriptor
    theirs = desc.deepmd_state({k.split(".descriptor.", 1)[1]: v for k, v in initial.items()}, "fixture")
    ours = desc.state_dict()
    assert set(theirs) == set(ours)
    for name, value in theirs.items():
        if name not in ("mean", "std"):
            assert torch.equal(ours[name], value), name
    ref = np.load(FIXTURE / "tebd.npz")
    for dim in (118, 236):
        embedding = TypeEmbedding(3, dim, True, torch.float64, 5, econf.econf_matrix(TYPE_MAP))
        assert embedding.residual
        np.testing.assert_array_equal(embedding().detach().numpy(), ref[f"dim{dim}"])


def test_forces_are_minus_the_energy_gradient():
    ref = np.load(FIXTURE / "v2.npz")
    model = load_model(FIXTURE / "v2.ckpt.pt")
    coord, atype, box = torch.tensor(ref["coord"][0]), torch.tensor(ref["atype"]), torch.tensor(ref["box"][0])
    force = model(coord, atype, box)["force"]
    energy = lambda c: float(model(c, atype, box)["energy"])  # noqa: E731
    for i, k in ((0, 0), (5, 1), (17, 2), (31, 0)):
        assert float(force[i, k]) == pytest.approx(finite_difference_force(energy, coord, i, k), abs=1e-7)


# ----------------------------------------------------------------------------------- train and freeze
def test_train_freeze_and_test(tmp_path):
    from dpmd.data import System, write_system
    from dpmd.train.config import normalize_input
    from dpmd.train.freeze import freeze
    from dpmd.train.test import test_model
    from dpmd.train.trainer import Trainer

    ref = np.load(FIXTURE / "v2.npz")  # two Cu/Ag/Au frames labelled by DeePMD-kit's model
    system = System(path=str(tmp_path / "sys"), type_map=TYPE_MAP, atype=ref["atype"], coord=ref["coord"],
                    box=ref["box"], energy=ref["energy"], force=ref["force"], virial=ref["virial"].reshape(2, 3, 3))
    write_system(system, tmp_path / "sys")
    cfg = json.loads((FIXTURE / "input.json").read_text())
    cfg["training"].update(training_data={"systems": [str(tmp_path / "sys")], "batch_size": 1}, numb_steps=2,
                           save_freq=2, disp_freq=2, device="cpu")
    trainer = Trainer(normalize_input(cfg), out_dir=tmp_path / "run", progress=False)
    before = trainer.model.descriptor.type_embedding.matrix.detach().clone()
    trainer.run()
    assert not torch.equal(before, trainer.model.descriptor.type_embedding.matrix)
    freeze(tmp_path / "run", tmp_path / "frozen.pth")
    coord, atype, box = torch.tensor(ref["coord"][1]), torch.tensor(ref["atype"]), torch.tensor(ref["box"][1])
    eager = trainer.model.eval()(coord, atype, box)
    for frozen in (load_model(tmp_path / "frozen.pth"), torch.jit.load(str(tmp_path / "frozen.pth"))):
        out = frozen(coord, atype, box)
        assert float(out["energy"]) == pytest.approx(float(eager["energy"]), rel=1e-12)
        assert torch.allclose(out["force"], eager["force"], atol=1e-10)
    result = test_model(tmp_path / "frozen.pth", [str(tmp_path / "sys")], log=lambda *a: None)
    assert result["overall"]["nframes"] == 2 and np.isfinite(result["overall"]["rmse_f"])
