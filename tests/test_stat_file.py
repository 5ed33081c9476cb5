"""training.stat_file in DeePMD-kit 3's layout: dpmd reads the files `dp --pt train` wrote
(tests/fixtures/deepmd_stat_file: its make_fixture.py and README) and gets DeePMD-kit's own davg / dstd and energy
bias without computing them; dpmd writes, for the same frames, the arrays DeePMD-kit wrote."""

from __future__ import annotations

import json
import shutil

import h5py
import numpy as np
import pytest
import torch

from dpmd.data import load_system, write_system
from dpmd.errors import ConfigError
from dpmd.train import stat_file
from dpmd.train.config import normalize_input
from dpmd.train.trainer import Trainer
from tests.conftest import EXAMPLE, REPO

FIXTURE = REPO / "tests" / "fixtures" / "deepmd_stat_file"
GROUP = "O H/c11273f3b506e71e40dd8ad97f5d96e2ca26e27e"   # DeePMD-kit's hash of the fixture's se_e2_a settings


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The fixture's training system: the first 4 frames of examples/water/data_0."""
    path = tmp_path_factory.mktemp("data") / "water4"
    write_system(load_system(EXAMPLE, type_map=["O", "H"]).subset(range(4)), path)
    return path


def config(data, stat_path, mode="update", name="input.json") -> dict:
    """A fixture's input for dpmd: the statistics read DeePMD-kit's one batch of 4 frames (data_stat_nbatch 1)."""
    cfg = json.loads((FIXTURE / name).read_text())
    cfg["training"].update(stat_file=str(stat_path), stat_file_mode=mode)
    cfg["training"]["training_data"]["systems"] = [str(data)]
    return normalize_input(cfg)


def no_computing(monkeypatch):
    for name in ("descriptor_stats", "energy_bias"):
        monkeypatch.setattr(f"dpmd.train.trainer.{name}", lambda *a, **k: pytest.fail("recomputed"))


def entries(path) -> dict[str, np.ndarray]:
    """Every array of a stat file by its name in the file."""
    if path.suffix == ".hdf5":
        out = {}
        with h5py.File(path, "r") as fh:
            fh.visititems(lambda name, obj: out.update({name: obj[()]}) if isinstance(obj, h5py.Dataset) else None)
        return out
    return {str(f.relative_to(path)): np.load(f, allow_pickle=False) for f in path.rglob("*") if f.is_file()}


@pytest.mark.parametrize("name", ["stat.hdf5", "stat_dir"])
def test_reads_deepmds_statistics(tmp_path, data, name, monkeypatch):
    """DeePMD-kit's file in read mode: dpmd computes nothing and gets the davg / dstd and energy bias of
    DeePMD-kit's checkpoint (the same run that wrote the file)."""
    copy = tmp_path / name
    (shutil.copy if name.endswith(".hdf5") else shutil.copytree)(FIXTURE / name, copy)
    no_computing(monkeypatch)
    model = Trainer(config(data, copy, "read"), out_dir=tmp_path / "run", progress=False).model
    ref = np.load(FIXTURE / "reference.npz")
    mean, std = ref["descriptor.sea.mean"], ref["descriptor.sea.stddev"]   # one row per neighbour slot, all equal
    assert np.all(mean == mean[:, :1]) and np.all(std == std[:, :1])
    np.testing.assert_allclose(model.descriptor.mean.numpy(), mean[:, 0], rtol=0, atol=1e-12)
    np.testing.assert_allclose(model.descriptor.std.numpy(), std[:, 0], rtol=0, atol=1e-12)
    np.testing.assert_allclose(model.fitting.energy_bias.numpy(), ref["out_bias"].reshape(-1), rtol=1e-12)
    assert entries(copy).keys() == entries(FIXTURE / name).keys()  # read mode writes nothing


@pytest.mark.parametrize("name", ["stat.hdf5", "stat_dir"])
def test_writes_deepmds_arrays(tmp_path, data, name):
    """For the same 4 frames dpmd writes the entries DeePMD-kit wrote, under the same names, with its numbers."""
    Trainer(config(data, tmp_path / name), out_dir=tmp_path / "run", progress=False)
    ours, theirs = entries(tmp_path / name), entries(FIXTURE / name)
    assert ours.keys() == theirs.keys() and f"{GROUP}/r_0" in ours
    for key in theirs:
        assert ours[key].dtype == theirs[key].dtype and ours[key].shape == theirs[key].shape, key
        if key.endswith("observed_type"):
            assert list(ours[key]) == [b"H", b"O"] == list(theirs[key])
        else:
            np.testing.assert_allclose(ours[key], theirs[key], rtol=1e-12, err_msg=key)


def test_every_descriptor_type_of_a_hybrid(tmp_path, data, monkeypatch):
    """se_e2_a, se_e2_r, se_e3 and se_atten in one hybrid: dpmd reads each entry's statistics from DeePMD-kit's
    file (its hashes, r_<t> alone for se_e2_r) and, computing them, writes DeePMD-kit's arrays."""
    ref = np.load(FIXTURE / "reference_hybrid.npz")
    no_computing(monkeypatch)
    cfg = config(data, FIXTURE / "stat_hybrid.hdf5", "read", name="input_hybrid.json")
    model = Trainer(cfg, out_dir=tmp_path / "a", progress=False).model
    for i, (entry, name) in enumerate(zip(model.descriptor.descriptors, ["sea.", "", "seat.", "se_atten."])):
        mean, std = ref[f"descriptor.descrpt_list.{i}.{name}mean"], ref[f"descriptor.descrpt_list.{i}.{name}stddev"]
        np.testing.assert_allclose(entry.mean.numpy(), mean[:, 0], rtol=0, atol=1e-12, err_msg=str(i))
        np.testing.assert_allclose(entry.std.numpy(), std[:, 0], rtol=0, atol=1e-12, err_msg=str(i))
    monkeypatch.undo()
    Trainer(config(data, tmp_path / "ours.hdf5", name="input_hybrid.json"), out_dir=tmp_path / "b", progress=False)
    ours, theirs = entries(tmp_path / "ours.hdf5"), entries(FIXTURE / "stat_hybrid.hdf5")
    assert ours.keys() == theirs.keys() and len([k for k in theirs if k.endswith("/r_0")]) == 4
    for key in theirs:
        if not key.endswith("observed_type"):
            np.testing.assert_allclose(ours[key], theirs[key], rtol=1e-12, err_msg=key)


@pytest.mark.parametrize("name", ["stat.hdf5", "stat_dir"])
def test_a_partial_file_is_completed_and_read_mode_names_what_is_missing(tmp_path, data, name, monkeypatch):
    """update: DeePMD-kit's descriptor entries are read, the missing energy bias is computed and added, the other
    entries kept; read: a file without this model's entries is a one-line error naming the first one missing."""
    copy = tmp_path / name
    theirs = entries(FIXTURE / name)
    if name.endswith(".hdf5"):
        shutil.copy(FIXTURE / name, copy)
        with h5py.File(copy, "a") as fh:
            del fh["O H/bias_atom_energy"], fh["O H/std_atom_energy"]
    else:
        shutil.copytree(FIXTURE / name, copy)
        for entry in ("bias_atom_energy", "std_atom_energy"):
            (copy / "O H" / entry).unlink()
    monkeypatch.setattr("dpmd.train.trainer.descriptor_stats", lambda *a, **k: pytest.fail("recomputed"))
    Trainer(config(data, copy), out_dir=tmp_path / "a", progress=False)
    ours = entries(copy)
    assert ours.keys() == theirs.keys()
    for key in theirs:
        if not key.endswith("observed_type"):
            np.testing.assert_allclose(ours[key], theirs[key], rtol=1e-12, err_msg=key)

    cfg = config(data, copy, "read")
    cfg["model"]["descriptor"]["rcut"] = 5.0  # another model: another hash
    with pytest.raises(ConfigError, match=rf"^'training.stat_file' .*{name} holds no statistics of this model "
                                          r"\(O H/[0-9a-f]{40}/r_0\) and stat_file_mode is read$"):
        Trainer(cfg, out_dir=tmp_path / "b", progress=False)


def test_an_entry_of_the_wrong_shape_is_one_line(tmp_path, data):
    copy = tmp_path / "stat.hdf5"
    shutil.copy(FIXTURE / "stat.hdf5", copy)
    with h5py.File(copy, "a") as fh:
        del fh[f"{GROUP}/a_1"]
        fh[f"{GROUP}/a_1"] = np.zeros(2)
    with pytest.raises(ConfigError, match=rf"stat.hdf5: {GROUP}/a_1 has shape \[2\], expected \[3\]$"):
        Trainer(config(data, copy), out_dir=tmp_path / "run", progress=False)


def test_statistics_from_the_sums_follow_deepmds_definition():
    """mean = sum / number; std = sqrt(squares / number - mean^2), raised to the protection; a type without
    atoms: mean 0, std 0.1 (DeePMD-kit's defaults)."""
    from tests.conftest import make_model

    model = make_model()
    prefix = f"{stat_file.group(model)}/{stat_file.env_hash(model.descriptor)}"
    saved = {f"{prefix}/r_0": np.array([10.0, 2.0, 1.0]), f"{prefix}/a_0": np.array([30.0, 0.3, 0.0003]),
             f"{prefix}/r_1": np.zeros(3), f"{prefix}/a_1": np.zeros(3)}
    stat_file.set_env_stats(model, saved, protection=0.01)
    torch.testing.assert_close(model.descriptor.mean, torch.tensor([[0.2, 0, 0, 0], [0, 0, 0, 0]],
                                                                   dtype=torch.float64))
    torch.testing.assert_close(model.descriptor.std, torch.tensor([[0.06 ** 0.5, 0.01, 0.01, 0.01], [0.1] * 4],
                                                                  dtype=torch.float64))
