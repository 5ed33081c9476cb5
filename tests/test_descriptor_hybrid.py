"""The hybrid descriptor (dpmd.model.descriptor.hybrid): DeePMD-kit's numbers and statistics, physics at each
entry's cut-off, each entry's own sel, the config of its entries, training and the frozen model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dpmd.data import load_system
from dpmd.errors import ConfigError, NeighborOverflowError
from dpmd.geometry.graph import build_graph
from dpmd.geometry.neighbor import NeighborList, check_sel, count_neighbors
from dpmd.model import DeepPot, load_model
from tests.conftest import REPO, triclinic_water
from tests.test_descriptor_se_r import (assert_converted_matches_deepmd, assert_matches_deepmd, assert_stats_match,
                                        check_continuity_at, check_forces_and_virial, check_frozen_equals_eager,
                                        check_invariances, train_and_freeze, training_frames,
                                        unbiased)

FIXTURE = REPO / "tests" / "fixtures" / "deepmd_hybrid"

pytestmark = pytest.mark.filterwarnings(r"ignore:.*torch\.jit\..*deprecated:DeprecationWarning")


def hybrid_config(a: dict, r: dict) -> dict:
    """A hybrid of an se_e2_a and an se_e2_r (tiny nets) with these changes to each."""
    return {"type_map": ["O", "H"], "fitting_net": {"neuron": [8, 8], "seed": 1},
            "descriptor": {"type": "hybrid", "list": [
                {"type": "se_e2_a", "sel": [12, 24], "rcut": 3.0, "rcut_smth": 0.5, "neuron": [4, 8],
                 "axis_neuron": 2, "seed": 1, **a},
                {"type": "se_r", "sel": [30, 60], "rcut": 5.0, "rcut_smth": 1.0, "neuron": [4, 8], "seed": 2, **r}]}}


@pytest.fixture(scope="module")
def deepmd_model():
    return load_model(FIXTURE / "model.ckpt.pt")


@pytest.mark.parametrize("name", ["model", "model_exclude"])
def test_deepmd_checkpoint_gives_its_numbers(name, tmp_path):
    """model_exclude: the se_e2_a entry (rcut 3.5 Å) has exclude_types [[0, 1]], so O-H pairs between 3.5 and 5 Å
    fill some of its slots as excluded neighbours (DeePMD-kit's rule, see dpmd.model.descriptor.hybrid)."""
    model = load_model(FIXTURE / f"{name}.ckpt.pt")
    assert model.rcut == 5.0 and model.sel == [28, 48]  # DeePMD-kit's: the largest of each
    assert model.descriptor.dim_out == 8 * 4 + 8
    ref = np.load(FIXTURE / f"{name}.npz")
    assert_matches_deepmd(model, ref)
    assert_converted_matches_deepmd(model, ref, tmp_path)


def test_statistics_equal_deepmd_kit(tmp_path):
    system = load_system(training_frames(tmp_path), type_map=["O", "H"])
    for name in ("model", "model_exclude"):
        assert_stats_match(FIXTURE / f"{name}.ckpt.pt", system)


def test_output_is_the_entries_side_by_side(deepmd_model, water):
    """The hybrid's output is each entry's own output (on the edges within its own rcut), in list order."""
    coord, atype, box = water
    graph = build_graph(coord, atype, box, deepmd_model.rcut)
    vec = coord[graph["neighbor"]] - coord[graph["center"]] + graph["shift"] @ box
    center, nbr_type = graph["center"], atype[graph["neighbor"]]
    desc = deepmd_model.descriptor
    whole = desc(vec, center, atype, nbr_type)
    start = 0
    for sub in desc.descriptors:
        near = vec.norm(dim=1) < sub.rcut
        part = sub(vec[near], center[near], atype, nbr_type[near])
        torch.testing.assert_close(whole[:, start:start + sub.dim_out], part, rtol=0, atol=0)
        start += sub.dim_out
    assert start == whole.shape[1]


# ---------------------------------------------------------------------------- physics
@pytest.mark.parametrize("name", ["model", "model_exclude"])
def test_forces_virial_invariances(name, water):
    model = unbiased(load_model(FIXTURE / f"{name}.ckpt.pt"))
    coord, atype, box = triclinic_water(water, seed=2)
    check_forces_and_virial(model, coord, atype, box)
    check_invariances(model, coord, atype, box)


def test_continuous_at_each_cutoff():
    model = unbiased(load_model(FIXTURE / "model.ckpt.pt"))
    for sub in model.descriptor.descriptors:  # se_e2_a at 3.5 Å (within se_e2_r's 5 Å), se_e2_r at 5 Å
        check_continuity_at(model, sub.rcut)


# ---------------------------------------------------------------------------- sel
def test_each_entry_checks_its_own_sel(water):
    """Each entry's neighbours within its own rcut are checked against its own sel; the model's sel (the
    largest per type) within the largest rcut does not see an entry with a small sel."""
    coord, atype, box = water
    model = DeepPot(hybrid_config({"sel": [4, 24]}, {}))
    graph = build_graph(coord, atype, box, model.rcut)
    assert model.sel == [30, 60]
    counts = count_neighbors(NeighborList(graph["center"], graph["neighbor"], graph["shift"]), atype, 2, len(atype))
    check_sel(counts, atype, model.sel, model.type_map)  # the model-level check passes ...
    with pytest.raises(NeighborOverflowError, match=r"atom \d+ \(type [OH]\) has \d+ neighbours of type O within "
                                                    r"descriptor.list\[0\]'s rcut 3 but sel allows 4 .*"
                                                    r"raise descriptor.list\[0\].sel"):
        model.descriptor.check_sel(graph, model.type_map)  # ... the entry's does not
    DeepPot(hybrid_config({}, {})).descriptor.check_sel(graph, model.type_map)
    two = build_graph(torch.stack([coord, coord]), atype, torch.stack([box, box]), model.rcut)
    with pytest.raises(NeighborOverflowError, match=r"atom \d+ of frame 0 "):
        model.descriptor.check_sel(two, model.type_map)


# ---------------------------------------------------------------------------- config, training, freezing
def test_entries_are_normalised_and_checked():
    d = DeepPot(hybrid_config({}, {})).config["descriptor"]
    assert [e["type"] for e in d["list"]] == ["se_e2_a", "se_e2_r"]  # se_r: DeePMD-kit's alias
    assert d["list"][0]["type_one_side"] is False and d["list"][1]["exclude_types"] == []  # defaults filled in
    bad = [({"rcut_smth": 3.5}, {}, r"'model.descriptor.list\[0\].rcut_smth' must be in \[0, rcut = 3.0\)"),
           ({}, {"axis_neuron": 4}, r"unknown key 'model.descriptor.list\[1\].axis_neuron'"),
           ({"type": "se_e9"}, {}, r"model.descriptor.list\[0\]: descriptor type 'se_e9' is not supported"),
           ({}, {"sel": [30]}, r"model.descriptor.list\[1\].sel has 1 entries but model.type_map has 2")]
    for a, r, message in bad:
        with pytest.raises(ConfigError, match=message):
            DeepPot(hybrid_config(a, r))
    nested = hybrid_config({}, {})
    nested["descriptor"]["list"].append({"type": "hybrid", "list": nested["descriptor"]["list"][:1]})
    with pytest.raises(ConfigError, match=r"'model.descriptor.list\[2\].type' is hybrid: the entries of a hybrid"):
        DeepPot(nested)
    with pytest.raises(ConfigError, match=r"'model.descriptor.list' must be a non-empty list"):
        DeepPot({"type_map": ["O", "H"], "descriptor": {"type": "hybrid", "list": []}, "fitting_net": {}})


def test_exclude_types_per_entry(water):
    """An entry's own exclude_types reaches it (the hybrid's output changes only in that entry's columns)."""
    coord, atype, box = water
    plain, excl = DeepPot(hybrid_config({}, {})), DeepPot(hybrid_config({}, {"exclude_types": [[0, 1]]}))
    excl.load_state_dict(plain.state_dict())
    graph = build_graph(coord, atype, box, plain.rcut)
    vec = coord[graph["neighbor"]] - coord[graph["center"]] + graph["shift"] @ box
    args = (vec, graph["center"], atype, atype[graph["neighbor"]])
    a, b = plain.descriptor(*args), excl.descriptor(*args)
    width = plain.descriptor.descriptors[0].dim_out
    assert torch.equal(a[:, :width], b[:, :width]) and not torch.allclose(a[:, width:], b[:, width:])


def test_train_and_freeze(tmp_path, water):
    config = hybrid_config({"sel": "auto", "set_davg_zero": True}, {"sel": "auto:1.2"})["descriptor"]
    eager, frozen = train_and_freeze(tmp_path, config)
    a, r = eager.descriptor.descriptors
    assert a.sel != r.sel  # each entry's sel: auto counted within its own rcut
    assert torch.equal(a.mean, torch.zeros_like(a.mean)) and r.mean.abs().max() > 0  # set_davg_zero of one entry
    check_frozen_equals_eager(eager, frozen, water)
