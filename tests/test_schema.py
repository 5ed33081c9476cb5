"""The training input's schema (issue 17): DeePMD-kit 3's keys, defaults and aliases; DeePMD-kit's example inputs
resolve to the model DeePMD-kit builds and train; what dpmd does not implement is refused in one line; YAML 1.2
numbers; the keys exclude_types, set_davg_zero, stat_file, numb_epoch, sys_probs, the optimizer section and the
learning-rate options behave as in DeePMD-kit."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import yaml

from dpmd.cli import main
from dpmd.errors import ConfigError
from dpmd.model import DeepPot
from dpmd.schema import load_yaml
from dpmd.train.config import TRAIN_ARGS, normalize_input, read_input
from dpmd.train.sampler import system_probabilities
from dpmd.train.schedule import learning_rate
from dpmd.train.trainer import Trainer
from tests.conftest import EXAMPLE, small_config
from tests.fixtures.deepmd_inputs.deepmd_examples import ACCEPTED, HERE, fill_paths, load_example


def example(name: str) -> dict:
    return fill_paths(load_example(name), str(EXAMPLE))


def small_input(steps=3, **training) -> dict:
    cfg = {"model": small_config(), "learning_rate": {"start_lr": 1e-3, "stop_lr": 1e-5, "decay_steps": 10},
           "loss": {}, "training": {"training_data": {"systems": [str(EXAMPLE)], "batch_size": 1},
                                    "numb_steps": steps, "seed": 1, "disp_freq": 100, "save_freq": 100}}
    cfg["model"]["data_stat_nbatch"] = 2
    cfg["training"].update(training)
    return cfg


def refused(cfg, *fragments) -> str:
    with pytest.raises(ConfigError) as err:
        normalize_input(cfg)
    message = str(err.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


# ------------------------------------------------------------------ DeePMD-kit's keys and defaults
def _dpmd_keys(arg, path, out):
    out[path] = arg
    if path == "model/descriptor[hybrid]/list":  # its entries are descriptor sections (listed above)
        return
    for sub in arg.sub_fields.values():
        _dpmd_keys(sub, f"{path}/{sub.name}" if path else sub.name, out)
    for variant in arg.sub_variants.values():
        out[f"{path}/{variant.flag_name}"] = variant
        for name, chosen in variant.choice_dict.items():
            out[f"{path}[{name}]"] = chosen
            below = f"{path}[{name}]" if path == "model/descriptor" else path  # (as make_reference.py lists them)
            for sub in chosen.sub_fields.values():
                _dpmd_keys(sub, f"{below}/{sub.name}", out)


def test_every_deepmd_key_has_deepmds_default_and_aliases():
    deepmd = json.loads((HERE / "argcheck_keys.json").read_text())
    deepmd.pop("_deepmd_version")
    ours = {}
    _dpmd_keys(TRAIN_ARGS, "", ours)
    ours.pop("")
    missing = sorted(set(deepmd) - set(ours))
    assert not missing, f"DeePMD-kit keys dpmd does not know: {missing}"
    required_here = {"model/type_map", "training/training_data"}  # optional in DeePMD-kit (multi-task), needed here
    for path, ref in deepmd.items():
        arg = ours[path]
        if hasattr(arg, "flag_name"):  # a Variant: its default type (dpmd's descriptor has one: its only type)
            assert arg.default_tag == ref.get("default", "se_e2_a" if path == "model/descriptor/type" else ""), path
            continue
        assert sorted(arg.alias) == ref["alias"], path
        if "optional" in ref and path not in required_here:  # ([type] entries have none)
            assert arg.optional == ref["optional"], path
        if "default" in ref and ref.get("optional", True):  # (a required key's default means nothing)
            assert arg.default == ref["default"], path
    extra = sorted(p for p in set(ours) - set(deepmd) if not p.startswith(tuple(f"{o}/" for o in (
        "model/type_embedding", "model/modifier", "model/compress", "model/spin", "nvnmd"))))
    # dpmd's own: training.device (where training runs), DeePMD-kit 1's set_prefix (DeePMD-kit drops it with a
    # warning)
    assert extra == ["training/device", "training/training_data/set_prefix", "training/validation_data/set_prefix"]


@pytest.mark.parametrize("name", ACCEPTED)
def test_deepmd_examples_resolve_as_deepmd_resolves_them(name):
    """Key by key, what dpmd resolves equals what DeePMD-kit 3.2 resolves (resolved/<name>, written by DeePMD-kit
    itself): the same architecture, schedule, loss and run."""
    ref = json.loads((HERE / "resolved" / name).read_text())
    ours = normalize_input(example(name))

    def compare(a, b, where):
        for k, v in b.items():
            if k == "systems":
                continue
            assert k in a, f"{where}.{k} missing"
            if isinstance(v, dict):  # (DeePMD-kit leaves `validating` empty: its defaults apply later)
                assert isinstance(a[k], dict), f"{where}.{k}: dpmd {a[k]!r}"
                compare(a[k], v, f"{where}.{k}")
            else:
                assert a[k] == v, f"{where}.{k}: dpmd {a[k]!r}, DeePMD-kit {v!r}"

    ref.pop("_deepmd_version")
    compare(ours, ref, "input")


def test_model_compression_input_builds_deepmds_two_sided_model():
    # the case: no type_one_side in the input, so one embedding net per (centre, neighbour) type pair
    cfg = normalize_input(example("model_compression.json"))
    model = DeepPot(cfg["model"])
    assert cfg["model"]["descriptor"]["type_one_side"] is False and len(model.descriptor.embeddings) == 4
    assert [layer.matrix.shape[1] for layer in model.descriptor.embeddings[0].layers] == [4, 8, 17, 17]


def test_a_deepmd_example_trains_unchanged(tmp_path, monkeypatch):
    """examples/water/se_e2_a/input_torch.json as it is (only data paths and the run's length changed): trains,
    saves its statistics in ./se_e2_a, and a second run reads them instead of computing them."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "input.json").write_text(json.dumps(example("water_se_e2_a_torch.json")))
    assert main(["train", "input.json", "--set", "training.numb_steps=2", "-o", "run1"]) == 0
    first = torch.load(tmp_path / "run1" / "model.ckpt-2.pt", weights_only=True)
    assert first["config"]["model"]["descriptor"]["type_one_side"] is True
    assert (tmp_path / "se_e2_a" / "O H").is_dir()

    def no_statistics(*_, **__):
        raise AssertionError("statistics recomputed despite the stat file")

    monkeypatch.setattr("dpmd.train.trainer.descriptor_stats", no_statistics)
    cfg = read_input("input.json", ["training.numb_steps=1"])
    trainer = Trainer(cfg, out_dir=tmp_path / "run2", progress=False)
    for k in ("descriptor.mean", "descriptor.std"):
        assert torch.equal(trainer.model.state_dict()[k], first["model"][k])


# ------------------------------------------------------------------ aliases
@pytest.mark.parametrize("section, alias, name, value", [
    ("model.descriptor", "n_axis_neuron", "axis_neuron", 8),
    ("model.fitting_net", "n_neuron", "neuron", [8, 8]),
    ("training", "stop_batch", "numb_steps", 7),
    ("training", "num_step", "numb_steps", 7),
    ("training", "num_steps", "numb_steps", 7),
    ("training", "numb_step", "numb_steps", 7),
    ("training", "numb_epoch", "numb_epoch", 2),
    ("training", "num_epoch", "numb_epoch", 2),
    ("training", "num_epochs", "numb_epoch", 2),
    ("training", "numb_epochs", "numb_epoch", 2),
    ("training.training_data", "auto_prob_style", "auto_prob", "prob_uniform"),
    ("training.training_data", "sys_weights", "sys_probs", [1.0]),
    ("training.validation_data", "numb_batch", "numb_btch", 4),
    ("training.validation_data", "auto_prob_style", "auto_prob", "prob_uniform"),
    ("training.validation_data", "sys_weights", "sys_probs", [1.0]),
])
def test_aliases(section, alias, name, value):
    cfg = small_input()
    cfg["training"]["validation_data"] = {"systems": [str(EXAMPLE)]}
    node = cfg
    for part in section.split("."):
        node = node[part]
    node.pop(name, None)
    if name == "numb_epoch":
        del cfg["training"]["numb_steps"]
    node[alias] = value
    out = normalize_input(cfg)
    for part in section.split("."):
        out = out[part]
    assert out[name] == value and alias not in out or alias == name
    if alias != name:
        node[name] = value
        refused(cfg, f"'{section}.{name}' and '{section}.{alias}' are the same key")


@pytest.mark.parametrize("section, alias, name", [
    ("model.descriptor", "se_a", "se_e2_a"), ("loss", "ener_hess", "ener")])
def test_type_aliases(section, alias, name):
    cfg = small_input()
    node = cfg
    for part in section.split("."):
        node = node[part]
    node["type"] = alias
    out = normalize_input(cfg)
    for part in section.split("."):
        out = out[part]
    assert out["type"] == name


# ------------------------------------------------------------------ YAML numbers
def test_yaml_reads_numbers_as_yaml_1_2():
    data = load_yaml("a: 1e-3\nb: 1.0e3\nc: -2E+2\nd: 10\ne: '1e-3'\nf: .inf\ng: 1.5\nh: 1_000\ni: 6.\n")
    assert data == {"a": 1e-3, "b": 1000.0, "c": -200.0, "d": 10, "e": "1e-3", "f": math.inf, "g": 1.5, "h": 1000,
                    "i": 6.0}
    assert [type(data[k]) for k in "abcd"] == [float, float, float, int]
    assert yaml.safe_load("a: 1e-3") == {"a": "1e-3"}  # what PyYAML alone makes of it


def test_yaml_input_and_set_take_exponent_numbers(tmp_path):
    text = yaml.safe_dump(small_input()).replace("start_lr: 0.001", "start_lr: 1e-3")
    assert "start_lr: 1e-3" in text
    (tmp_path / "input.yaml").write_text(text)
    cfg = read_input(tmp_path / "input.yaml", ["learning_rate.stop_lr=2e-6", "loss.start_pref_f=1e3"])
    assert cfg["learning_rate"]["start_lr"] == 1e-3 and cfg["learning_rate"]["stop_lr"] == 2e-6
    assert cfg["loss"]["start_pref_f"] == 1000.0
    with pytest.raises(ConfigError, match="'learning_rate.start_lr' must be a number, got \"1e-3\""):
        read_input(tmp_path / "input.yaml", ["learning_rate.start_lr='1e-3'"])


# ------------------------------------------------------------------ what dpmd does not implement: one line
@pytest.mark.parametrize("kind", ["dpa2", "dpa3", "se_a_tpe", "loc_frame", "se_a_mask", "se_e3_tebd", "dpa4",
                                  "nonsense"])
def test_other_descriptor_types_are_refused_by_name(kind):
    cfg = small_input()
    cfg["model"]["descriptor"] = {"type": kind, "sel": [10, 20], "repinit": {}}
    refused(cfg, f"model.descriptor: descriptor type '{kind}' is not supported (supported: hybrid, se_atten, "
                 f"se_atten_v2, se_e2_a, se_e2_r, se_e3, dpa1 (= se_atten), se_a (= se_e2_a)")


@pytest.mark.parametrize("name, kind", [("water_dpa2_small.json", "dpa2")])
def test_deepmd_inputs_of_other_descriptors_say_so(name, kind):
    message = refused(example(name), f"descriptor type '{kind}' is not supported")
    assert "unknown key" not in message


@pytest.mark.parametrize("where, kind, noun", [
    ("model.fitting_net", "dipole", "fitting net"), ("model.fitting_net", "polar", "fitting net"),
    ("model.fitting_net", "dos", "fitting net"), ("model.fitting_net", "property", "fitting net"),
    ("loss", "tensor", "loss"), ("loss", "dos", "loss"), ("learning_rate", "cosine", "learning rate"),
    ("optimizer", "AdamW", "optimizer"), ("optimizer", "LKF", "optimizer"), ("model", "frozen", "model"),
])
def test_other_types_are_refused_by_name(where, kind, noun):
    cfg = small_input()
    node = cfg
    for part in where.split("."):
        node = node.setdefault(part, {})
    node["type"] = kind
    refused(cfg, f"{where}: {noun} type '{kind}' is not supported")


@pytest.mark.parametrize("name, fragment", [
    ("water_se_e2_a_tebd.json", "'model.type_embedding' = {\"neuron\": [2, 4, 8]"),
])
def test_deepmd_examples_using_tensorflow_only_keys_are_refused(name, fragment):
    refused(example(name), fragment, "is not supported yet")


@pytest.mark.parametrize("path, value", [
    ("model.descriptor.env_protection", 0.1), ("model.fitting_net.atom_ener", [1.0, None]),
    ("model.fitting_net.layer_name", ["a", "b", "c"]), ("model.pair_exclude_types", [[0, 1]]),
    ("model.use_srtab", "table.txt"), ("loss.relative_f", 0.1), ("loss.use_huber", True), ("loss.loss_func", "mae"),
    ("loss.start_pref_ae", 1.0), ("training.enable_ema", True), ("training.tensorboard", True),
    ("training.save_dir", "ckpts"), ("training.training_data.rglob_patterns", ["*"]), ("nvnmd", {"enable": True}),
    ("validating.full_validation", True), ("training.zero_stage", 2),
])
def test_deepmd_keys_not_implemented_are_refused_unless_default(path, value):
    cfg = small_input()
    *sections, name = path.split(".")
    node = cfg
    for part in sections:
        node = node.setdefault(part, {})
    node[name] = value
    refused(cfg, f"'{path}' = {json.dumps(value)} is not supported yet")


def test_deepmds_other_batch_size_rules_are_refused():
    cfg = small_input()
    cfg["training"]["training_data"]["batch_size"] = "filter:64"
    refused(cfg, "'training.training_data.batch_size' = 'filter:64' is not supported yet")


def test_batch_size_rules_and_system_probabilities_as_deepmd_kit():
    """auto:N rounds the frames up to N atoms, max:N down (at least one frame), as DeePMD-kit's DpLoaderSet;
    prob_sys_size weighs systems by their batches counted as its DataLoader does (a last, short batch counts)."""
    from types import SimpleNamespace

    from dpmd.train.sampler import BatchSampler, resolve_batch_sizes

    systems = [SimpleNamespace(natoms=192, nframes=5, source=None, source_frames=None),   # not mixed-type parts
               SimpleNamespace(natoms=12, nframes=100, source=None, source_frames=None)]
    assert resolve_batch_sizes("auto", systems) == [1, 3]
    assert resolve_batch_sizes("auto:400", systems) == [3, 34]
    assert resolve_batch_sizes("max:400", systems) == [2, 33]
    assert resolve_batch_sizes("max:100", systems) == [1, 8]      # 100 // 192 = 0 frames: one
    sampler = BatchSampler(systems, 2, "prob_sys_size", seed=1)
    np.testing.assert_allclose(sampler.probs.numpy(), [3 / 53, 50 / 53])   # ceil(5 / 2) = 3 batches, not 2
    cfg = small_input()
    cfg["training"]["training_data"]["batch_size"] = "max:64"
    assert normalize_input(cfg)["training"]["training_data"]["batch_size"] == "max:64"


def test_unknown_keys_list_the_valid_ones():
    cfg = small_input()
    cfg["model"]["descriptor"]["rcutt"] = 3.0
    message = refused(cfg, "unknown key 'model.descriptor.rcutt'; valid keys: ")
    assert "rcut, rcut_smth" in message and "exclude_types" in message


def test_type_is_checked_before_keys():
    cfg = small_input()
    cfg["model"]["descriptor"] = {"type": "dpa3", "repflow": {}}
    refused(cfg, "descriptor type 'dpa3' is not supported")
    cfg["model"]["descriptor"] = {"type": 3}
    refused(cfg, "'model.descriptor.type' must be a string, got 3")


# ------------------------------------------------------------------ exclude_types, set_davg_zero, trainable
def _reference_descriptor(desc, coord, atype, excluded):
    """DeePMD-kit's se_e2_a by its definition, atom by atom, without PBC: sel slots per neighbour type, a normalised
    row per real neighbour (zero for an excluded pair), -mean/std for an empty slot."""
    nt, out = desc.ntypes, []
    for i in range(len(atype)):
        ti = int(atype[i])
        T = torch.zeros(4, desc.width, dtype=torch.float64)
        for tj in range(nt):
            rows = []
            for j in range(len(atype)):
                r = coord[j] - coord[i]
                if j != i and int(atype[j]) == tj and float(r.norm()) < desc.rcut:
                    rows.append(desc.env_rows(r[None])[0])
            rows = [(row - desc.mean[ti]) / desc.std[ti] for row in rows]
            if (ti, tj) in excluded:
                rows = [torch.zeros(4, dtype=torch.float64) for _ in rows]
            rows += [-desc.mean[ti] / desc.std[ti]] * (desc.sel[tj] - len(rows))
            net = desc.embeddings[tj if desc.type_one_side else tj * nt + ti]
            for row in rows:
                T += row[:, None] * net(row[None, :1])[0][None, :]
        T /= desc.nnei
        out.append((T.T @ T[:, :desc.axis_neuron]).reshape(-1))
    return torch.stack(out)


@pytest.mark.parametrize("type_one_side", [True, False])
def test_exclude_types_zero_the_rows_of_excluded_pairs(water, type_one_side):
    coord, atype, _ = water
    keep = torch.argsort((coord - coord[0]).norm(dim=1))[:24]  # a cluster of O and H, no PBC
    coord, atype = coord[keep], atype[keep]
    assert 0 < int(atype.sum()) < 24
    cfg = small_config(type_one_side=type_one_side)
    cfg["descriptor"]["exclude_types"] = [[0, 1]]
    model = DeepPot(cfg)
    with torch.no_grad():
        model.descriptor.mean[:, 0] = torch.tensor([0.05, 0.04])
        model.descriptor.std[:] = torch.tensor([[0.09, 0.06, 0.06, 0.06], [0.08, 0.05, 0.05, 0.05]])
    from dpmd.geometry.graph import build_graph, edge_vectors

    graph = build_graph(coord, atype, None, model.rcut)
    edge_type = atype[graph["neighbor"]]
    desc = model.descriptor
    with torch.no_grad():
        got = desc(edge_vectors(graph), graph["center"], atype, edge_type)
        ref = _reference_descriptor(desc, coord, atype, {(0, 1), (1, 0)})
        plain = DeepPot(small_config(type_one_side=type_one_side))
        plain.load_state_dict(model.state_dict())
        unexcluded = plain.descriptor(edge_vectors(graph), graph["center"], atype, edge_type)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    assert not torch.allclose(got, unexcluded)  # the exclusion changed something
    # DeePMD's padded layout (the MD engine's GPU path) gives the same descriptors
    order = torch.argsort(atype, stable=True)
    counts = torch.bincount(atype, minlength=2).tolist()
    padded_vec, padded_center, padded_type = [], [], []
    for new, i in enumerate(order.tolist()):
        for t in range(2):
            mine = [e for e in range(len(graph["center"])) if graph["center"][e] == i and edge_type[e] == t]
            vecs = [edge_vectors(graph)[e] for e in mine]
            vecs += [torch.tensor([10.0, 0.0, 0.0], dtype=torch.float64)] * (desc.sel[t] - len(vecs))
            padded_vec += vecs
            padded_center += [new] * desc.sel[t]
            padded_type += [t] * desc.sel[t]
    with torch.no_grad():
        padded = desc(torch.stack(padded_vec), torch.tensor(padded_center), atype[order], torch.tensor(padded_type),
                      type_counts=counts)
    torch.testing.assert_close(padded, got[order], rtol=1e-10, atol=1e-12)


def test_exclude_types_survive_freezing(water):
    from dpmd.model.export import script_model

    cfg = small_config()
    cfg["descriptor"]["exclude_types"] = [[1, 1]]
    model = DeepPot(cfg).eval()
    eager, frozen = model(*water), script_model(model)(*water)
    assert float(frozen["energy"]) == pytest.approx(float(eager["energy"]), rel=1e-12)
    torch.testing.assert_close(frozen["force"], eager["force"], rtol=1e-10, atol=1e-12)


def test_exclude_types_are_checked_against_the_type_map(tmp_path):
    cfg = small_input()
    cfg["model"]["descriptor"]["exclude_types"] = [[0, 1]]
    cfg["model"]["descriptor"]["exclude_types"] = [[0, 2]]
    refused(cfg, "'model.descriptor.exclude_types' = [[0, 2]]: type 2 is not in model.type_map (2 types)")
    cfg["model"]["descriptor"]["exclude_types"] = [[0, 1, 1]]
    refused(cfg, "'model.descriptor.exclude_types' must be a list of [type, type] pairs")


def test_statistics_count_excluded_pairs_as_empty_slots(tmp_path):
    """DeePMD-kit's env-matrix statistics with exclude_types: an excluded pair's row is zero but its slot still
    counts.  With O-H excluded, the O centres' radial mean is the sum over their O neighbours alone, over all
    sel slots of every O atom."""
    from dpmd.data import load_system, write_system
    from dpmd.geometry.graph import build_graph, edge_vectors

    s = load_system(EXAMPLE, type_map=["O", "H"]).subset([0])
    write_system(s, tmp_path / "one")   # one frame: the statistics read it whatever the shuffle
    cfg = small_input(steps=1)
    cfg["training"]["training_data"]["systems"] = [str(tmp_path / "one")]
    cfg["model"]["descriptor"]["exclude_types"] = [[0, 1]]
    trainer = Trainer(normalize_input(cfg), out_dir=tmp_path / "run", progress=False)
    trainer.run()   # training with excluded pairs runs
    desc = trainer.model.descriptor
    graph = build_graph(s.coord[0], s.atype, s.box[0], desc.rcut)
    rows = desc.env_rows(edge_vectors(graph)).double()
    oo = (graph["atype"][graph["center"]] == 0) & (graph["atype"][graph["neighbor"]] == 0)
    expected = float(rows[oo, 0].sum()) / (int((graph["atype"] == 0).sum()) * desc.nnei)
    assert float(desc.mean[0, 0]) == pytest.approx(expected, rel=1e-10)   # a buffer: training leaves it


def test_set_davg_zero_keeps_the_mean_at_zero(tmp_path):
    plain = Trainer(normalize_input(small_input()), out_dir=tmp_path / "a", progress=False).model
    cfg = small_input()
    cfg["model"]["descriptor"]["set_davg_zero"] = True
    zero = Trainer(normalize_input(cfg), out_dir=tmp_path / "b", progress=False).model
    assert plain.descriptor.mean.abs().sum() > 0 and torch.equal(zero.descriptor.mean, torch.zeros_like(
        zero.descriptor.mean))
    assert torch.equal(zero.descriptor.std, plain.descriptor.std)


def test_trainable_false_freezes_the_weights(tmp_path):
    cfg = small_input(steps=2)
    cfg["model"]["descriptor"]["trainable"] = False
    cfg["model"]["fitting_net"]["trainable"] = [True, True, True]
    trainer = Trainer(normalize_input(cfg), out_dir=tmp_path, progress=False)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.run()
    after = trainer.model.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in after if k.startswith("descriptor.embeddings"))
    assert not all(torch.equal(after[k], before[k]) for k in after if k.startswith("fitting.nets"))
    cfg["model"]["fitting_net"]["trainable"] = [True, False, True]
    refused(cfg, "both false: there is nothing to train")


# ------------------------------------------------------------------ stat_file, numb_epoch, sys_probs
@pytest.mark.parametrize("name", ["stats", "stats.hdf5"])
def test_stat_file_saves_then_reads(tmp_path, name, monkeypatch):
    cfg = small_input(stat_file=str(tmp_path / name))
    first = Trainer(normalize_input(cfg), out_dir=tmp_path / "a", progress=False).model
    monkeypatch.setattr("dpmd.train.trainer.descriptor_stats", lambda *a, **k: pytest.fail("recomputed"))
    monkeypatch.setattr("dpmd.train.trainer.energy_bias", lambda *a, **k: pytest.fail("recomputed"))
    cfg["training"]["stat_file_mode"] = "read"
    second = Trainer(normalize_input(cfg), out_dir=tmp_path / "b", progress=False).model
    for k in ("descriptor.mean", "descriptor.std"):
        assert torch.equal(first.state_dict()[k], second.state_dict()[k])
    cfg["model"]["descriptor"]["rcut"] = 3.5  # another model: nothing saved for it, and read mode may not compute
    with pytest.raises(ConfigError, match="holds no statistics of this model .* stat_file_mode is read"):
        Trainer(normalize_input(cfg), out_dir=tmp_path / "c", progress=False)


def test_numb_epoch_sets_the_steps_as_deepmd_counts_them(tmp_path):
    cfg = small_input()
    del cfg["training"]["numb_steps"]
    cfg["training"]["numb_epoch"] = 0.5
    cfg["training"]["training_data"]["batch_size"] = 3  # 40 frames: 14 batches per epoch
    trainer = Trainer(normalize_input(cfg), out_dir=tmp_path, progress=False)
    assert trainer.config["training"]["numb_steps"] == 7
    cfg["training"]["numb_steps"] = 5
    refused(cfg, "'training.numb_steps' and 'training.numb_epoch' are both given")


def test_numb_epoch_of_the_deepmd_example(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    trainer = Trainer(normalize_input(example("water_se_e2_a_torch_num_epoch.json")), out_dir=tmp_path,
                      progress=False)
    assert trainer.config["training"]["numb_steps"] == 100 * 40  # num_epoch 100, batch 1, 40 frames
    assert (tmp_path / "se_e2_a.hdf5").is_file()


def test_sys_probs_follow_deepmds_rule():
    np.testing.assert_allclose(system_probabilities("prob_uniform", [1, 2, 3], [0.2, 0.3, 0.5]), [0.2, 0.3, 0.5])
    # negative entries share what the others leave, in proportion to their batches
    np.testing.assert_allclose(system_probabilities("prob_uniform", [1, 2, 6], [0.2, -1, -1]), [0.2, 0.2, 0.6])
    cfg = small_input()
    cfg["training"]["training_data"]["sys_probs"] = [0.5]
    refused(cfg, "sys_probs", "must sum to 1")
    cfg["training"]["training_data"]["sys_probs"] = [0.5, 0.5]
    refused(cfg, "'training.training_data.sys_probs' lists 2 values for 1 systems")


# ------------------------------------------------------------------ learning rate, optimizer, loss
def _lr(**section):
    cfg = small_input()
    cfg["learning_rate"] = {"start_lr": 1e-3, "decay_steps": 10, **section}
    return learning_rate(normalize_input(cfg)["learning_rate"], 100)


def test_learning_rate_options_follow_deepmd():
    assert _lr()(100) == pytest.approx(5e-8) and _lr().stop_lr == 5e-8  # DeePMD-kit's default stop_lr
    assert _lr(stop_lr_ratio=0.01)(100) == pytest.approx(1e-5)
    rate = _lr(decay_rate=0.5)
    assert rate(25) == 1e-3 * 0.5 ** 2 and rate(10**4) == 5e-8  # never below stop_lr
    smooth = _lr(stop_lr=1e-5, smooth=True)
    assert smooth(5) == pytest.approx(1e-3 * (1e-2) ** (5 / 100))
    warm = _lr(stop_lr=1e-5, warmup_steps=20, warmup_start_factor=0.1)
    assert warm(0) == pytest.approx(1e-4) and warm(10) == pytest.approx(5.5e-4)
    assert warm(20) == 1e-3 and warm(100) == pytest.approx(1e-5)  # decays over the 80 steps after warmup
    assert _lr(stop_lr=1e-5, warmup_ratio=0.2).warmup_steps == 20
    cfg = small_input()
    cfg["learning_rate"].update(stop_lr_ratio=0.1)
    refused(cfg, "'learning_rate.stop_lr' and 'learning_rate.stop_lr_ratio' are both given")
    cfg = small_input()
    cfg["learning_rate"].update(decay_rate=1.5)
    refused(cfg, "'learning_rate.decay_rate' must be in (0, 1], got 1.5")


def test_optimizer_section_reaches_adam(tmp_path):
    cfg = small_input()
    cfg["optimizer"] = {"type": "Adam", "adam_beta1": 0.8, "adam_beta2": 0.99, "weight_decay": 1e-4}
    group = Trainer(normalize_input(cfg), out_dir=tmp_path, progress=False).optimizer.param_groups[0]
    assert group["betas"] == (0.8, 0.99) and group["weight_decay"] == 1e-4


def test_deepmd_31_optimizer_and_warmup_keys_in_training_are_moved():
    cfg = small_input(opt_type="Adam", adam_beta2=0.95, warmup_steps=2)
    out = normalize_input(cfg)
    assert out["optimizer"]["type"] == "Adam" and out["optimizer"]["adam_beta2"] == 0.95
    assert out["learning_rate"]["warmup_steps"] == 2
    refused(small_input(opt_type="LKF"), "optimizer type 'LKF' is not supported")


def test_intensive_ener_virial_scales_energy_by_one_over_n_squared():
    from dpmd.train.loss import EnergyLoss

    base = normalize_input(small_input())["loss"]
    pred = {"energy": torch.tensor([3.0]), "force": torch.zeros(4, 3), "virial": torch.zeros(1, 9)}
    label = {"energy": torch.tensor([1.0]), "force": torch.zeros(4, 3), "virial": None}
    extensive, _ = EnergyLoss(base, 1e-3)(pred, label, 4, 1e-3)
    intensive, _ = EnergyLoss({**base, "intensive_ener_virial": True}, 1e-3)(pred, label, 4, 1e-3)
    assert float(extensive) == pytest.approx(0.02 * 4 / 4) and float(intensive) == pytest.approx(0.02 * 4 / 16)


# ------------------------------------------------------------------ the CLI
def test_doc_train_input_and_version(capsys):
    assert main(["doc-train-input"]) == 0
    text = capsys.readouterr().out
    assert "argument path: ``model[standard]/descriptor[se_e2_a]/type_one_side``" in text
    assert "type: ``bool``, optional, default: ``False``" in text
    assert main(["doc-train-input", "--out-type", "json_schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert schema["properties"]["training"]["properties"]["numb_steps"]["type"] == ["integer"]
    assert main(["doc-train-input", "--out-type", "json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["name"] == "model"
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.startswith("dpmd ")
