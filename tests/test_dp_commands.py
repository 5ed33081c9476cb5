"""The `dp` commands DeePMD-kit users type every day: model-devi, change-bias, show, and test's -f/-a/-r/--shuffle-test.

model-devi gives the deviation `dpmd md` writes for the same frames and DeePMD-kit's formulas for its options;
change-bias gives the bias `dpmd train --finetune` fits, and the per-type energies of synthetic labels."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch

from conftest import EXAMPLE, make_model, small_config
from dpmd import model_devi
from dpmd import show as show_cmd
from dpmd.data import System, load_system, write_system
from dpmd.errors import DataError, DpmdError
from dpmd.md import Simulation
from dpmd.md.devi import COLUMNS
from dpmd.model import load_model, save_model
from dpmd.train import change_bias as change_bias_cmd
from dpmd.train import test as test_cmd


def parse(module, argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    return parser.parse_args([str(a) for a in argv])


def perturbed_model(seed: int, scale: float = 0.05):
    """make_model() with every weight moved a little: a second member of an ensemble."""
    model = make_model()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model


def read_model_devi(path) -> list[tuple[str, list[str], np.ndarray]]:
    """[(system path, column names, rows)] of a `dp model-devi` file: per system `# path`, `# step ...`, rows."""
    blocks = []
    lines = open(path).read().splitlines()
    for i, line in enumerate(lines):
        if line.startswith("# ") and i + 1 < len(lines) and lines[i + 1].startswith("# step"):
            blocks.append((line[2:], lines[i + 1][2:].split(), []))
        elif not line.startswith("#"):
            blocks[-1][2].append([float(v) for v in line.split()])
    return [(name, cols, np.array(rows)) for name, cols, rows in blocks]


@pytest.fixture(scope="module")
def ensemble(tmp_path_factory):
    """Three model files of one layout and different weights."""
    folder = tmp_path_factory.mktemp("ensemble")
    paths = []
    for k, model in enumerate([make_model(), perturbed_model(1), perturbed_model(2)]):
        paths.append(folder / f"graph.{k:03d}.pth")
        save_model(model, paths[-1])
    return paths


def water_frames(nframes=3, natoms=None) -> System:
    s = load_system(EXAMPLE, ["O", "H"]).subset(range(nframes))
    if natoms is not None:  # the first natoms atoms, as a cluster without periodic boundaries
        s = System(path="", type_map=s.type_map, atype=s.atype[:natoms], coord=s.coord[:, :natoms],
                   energy=s.energy, force=s.force[:, :natoms])
    return s


# ---------------------------------------------------------------------------------------------- model-devi

def test_model_devi_equals_the_deviation_md_writes(tmp_path, ensemble):
    """An NVE run of two models writes model_devi.out every 5 steps; its frames as a deepmd/npy system give the
    same rows through `dpmd model-devi -f 5` (to 1e-10 at full precision; the files agree to their 7 digits)."""
    models = [load_model(p) for p in ensemble[:2]]
    s = load_system(EXAMPLE, ["O", "H"])
    symbols = [s.type_map[t] for t in s.atype]
    sim = Simulation(models, s.coord[0], symbols, s.box[0], ensemble="nve", timestep=0.5, seed=1, thermo_freq=0,
                     model_devi_freq=5, output_dir=tmp_path / "md", log=None)
    coords, boxes = [s.coord[0]], [s.box[0]]
    for step in (5, 10, 15):
        sim.run(5)
        assert sim.state.step == step
        coords.append(sim.state.positions[0].numpy().copy())
        boxes.append(sim.state.box[0].numpy().copy())
    sim.close()
    write_system(System(path="", type_map=s.type_map, atype=s.atype, coord=np.array(coords), box=np.array(boxes)),
                 tmp_path / "traj")

    model_devi.run(parse(model_devi, ["-m", *ensemble[:2], "-s", tmp_path / "traj", "-f", 5,
                                      "-o", tmp_path / "model_devi.out"]))
    md_rows = np.loadtxt(tmp_path / "md" / "model_devi.out")
    [(name, columns, rows)] = read_model_devi(tmp_path / "model_devi.out")
    assert name == str(tmp_path / "traj") and columns == COLUMNS
    assert rows[:, 0].tolist() == md_rows[:, 0].tolist() == [0, 5, 10, 15]
    np.testing.assert_allclose(rows, md_rows, rtol=1e-6, atol=0)
    assert rows[:, 1:].min() > 0

    [(_, exact)] = model_devi.make_model_devi(models, [tmp_path / "traj"], frequency=5)
    history = np.array([row for _, d in sim.devi_history for row in d])
    np.testing.assert_allclose(exact[:, 1:], history, rtol=1e-10, atol=1e-14)


def _deepmd_formulas(preds, natoms, relative=None, relative_v=None, labels=None):
    """DeePMD-kit's calc_model_devi_f/v/e (deepmd/infer/model_devi.py) in numpy, relative_v per component
    (pair_style deepmd's compute_relative_std); labels (energy, force; no virial): --real_error."""
    e = np.stack([p["energy"] for p in preds]) / natoms
    f = np.stack([p["force"] for p in preds])
    v = np.stack([p["virial"] for p in preds]) / natoms
    if labels is None:
        devi_f, mag_f = np.linalg.norm(np.std(f, axis=0), axis=-1), np.linalg.norm(f.mean(0), axis=-1)
        devi_v, devi_e = np.std(v, axis=0), np.std(e, axis=0)
        if relative_v is not None:
            devi_v = devi_v / (np.abs(v.mean(0)) + relative_v)
    else:
        devi_f = np.linalg.norm(np.sqrt(np.mean((f - labels["force"]) ** 2, axis=0)), axis=-1)
        mag_f = np.linalg.norm(labels["force"], axis=-1)
        devi_v = np.full(v.shape[1:], np.nan)   # no virial labels
        devi_e = np.sqrt(np.mean((e - labels["energy"] / natoms) ** 2, axis=0))
    if relative is not None:
        devi_f = devi_f / (mag_f + relative)
    return np.column_stack([devi_v.max(-1), devi_v.min(-1), np.linalg.norm(devi_v, axis=-1) / 3,
                            devi_f.max(-1), devi_f.min(-1), devi_f.mean(-1), devi_e, devi_f])


@pytest.mark.parametrize("options", [{}, {"relative": 1.0, "relative_v": 0.5}, {"real_error": True, "relative": 0.2}])
def test_model_devi_options_follow_deepmd_kit(tmp_path, ensemble, options):
    """--atomic, --relative, --relative_v, --real_error against DeePMD-kit's formulas on each model's own
    forward pass; a periodic and a non-periodic system go into one file, each with its block."""
    write_system(water_frames(3), tmp_path / "pbc")
    write_system(water_frames(2, natoms=30), tmp_path / "cluster")
    argv = ["-m", *ensemble, "-s", tmp_path, "-f", 10, "--atomic", "-o", tmp_path / "devi.out"]
    for key, value in options.items():
        argv += [f"--{key}"] if value is True else [f"--{key}", value]
    model_devi.run(parse(model_devi, argv))
    blocks = read_model_devi(tmp_path / "devi.out")
    assert [name for name, _, _ in blocks] == [str(tmp_path / "cluster"), str(tmp_path / "pbc")]

    models = [load_model(p) for p in ensemble]
    exact = model_devi.make_model_devi(models, [tmp_path], frequency=10, atomic=True,
                                       **{k: v for k, v in options.items()})
    for (name, columns, rows), (_, full), system in zip(blocks, exact, [water_frames(2, 30), water_frames(3)]):
        assert columns == COLUMNS + ["atm_devi_f(N)"]
        assert rows.shape == full.shape == (system.nframes, 8 + system.natoms)
        assert rows[:, 0].tolist() == [10 * k for k in range(system.nframes)]
        box = None if system.box is None else torch.as_tensor(system.box)
        preds = [{k: v.detach().numpy() for k, v in m(torch.as_tensor(system.coord), torch.as_tensor(system.atype),
                                                      box).items()} for m in models]
        labels = {"energy": system.energy, "force": system.force} if options.get("real_error") else None
        expect = _deepmd_formulas(preds, system.natoms, options.get("relative"), options.get("relative_v"), labels)
        np.testing.assert_allclose(full[:, 1:], expect, rtol=1e-10, atol=1e-14)
        np.testing.assert_allclose(rows[:, 1:], expect, rtol=1e-6, atol=0)


def test_model_devi_file_is_deepmd_kits_layout(tmp_path, ensemble):
    write_system(water_frames(2), tmp_path / "sys")
    model_devi.run(parse(model_devi, ["-m", *ensemble, "-s", tmp_path / "sys", "-o", tmp_path / "devi.out"]))
    lines = (tmp_path / "devi.out").read_text().splitlines()
    assert lines[0] == f"# {tmp_path / 'sys'}"
    assert lines[1] == "# step      " + "".join(f"{c:19s}" for c in COLUMNS[1:])
    assert lines[2].startswith("           0       ") and len(lines[2]) == 12 + 7 * 19 and len(lines) == 4


def test_model_devi_mistakes_are_one_line_errors(tmp_path, ensemble):
    unlabelled = water_frames(1)
    unlabelled.energy = unlabelled.force = None
    write_system(unlabelled, tmp_path / "sys")
    other = make_model()
    other.type_map = ["H", "O"]
    with pytest.raises(DpmdError, match=r"type_maps differ \(\['O', 'H'\] and \['H', 'O'\]\)"):
        model_devi.make_model_devi([load_model(ensemble[0]), other], [tmp_path / "sys"])
    with pytest.raises(DpmdError, match="at least 2 models, got 1"):
        model_devi.run(parse(model_devi, ["-m", ensemble[0], "-s", tmp_path / "sys", "-o", tmp_path / "devi.out"]))
    with pytest.raises(DpmdError, match="--real_error needs labels"):
        model_devi.make_model_devi([load_model(p) for p in ensemble], [tmp_path / "sys"], real_error=True)
    with pytest.raises(DataError, match="nothere: does not exist"):
        model_devi.run(parse(model_devi, ["-m", *ensemble, "-s", tmp_path / "nothere", "-o", tmp_path / "devi.out"]))
    assert not (tmp_path / "devi.out").exists()


# ---------------------------------------------------------------------------------------------- change-bias

def test_change_bias_equals_the_finetune_bias(tmp_path):
    """`change-bias -m change -n 10` re-fits the bias as `dpmd train --finetune` does (data_stat_nbatch 10)."""
    from dpmd.train.config import normalize_input
    from dpmd.train.trainer import Trainer

    save_model(make_model(), tmp_path / "model.pth")
    config = {"model": small_config(), "learning_rate": {"start_lr": 1e-3, "decay_steps": 10},
              "loss": {"type": "ener"},
              "training": {"training_data": {"systems": [str(EXAMPLE)], "batch_size": 1}, "numb_steps": 10}}
    fine = Trainer(normalize_input(config), finetune=str(tmp_path / "model.pth"), out_dir=tmp_path / "ft",
                   progress=False)
    change_bias_cmd.run(parse(change_bias_cmd, [tmp_path / "model.pth", "-s", EXAMPLE, "-n", 10,
                                                "-o", tmp_path / "out.pth"]))
    bias = load_model(tmp_path / "out.pth").fitting.energy_bias
    np.testing.assert_allclose(bias.numpy(), fine.model.fitting.energy_bias.detach().numpy(), rtol=0, atol=1e-10)
    assert not torch.allclose(bias, make_model().fitting.energy_bias)


def _two_compositions(tmp_path, energy_of) -> list[str]:
    """Water frames and the same frames without their last 20 H atoms, labelled energy_of(system)."""
    full = water_frames(4)
    cut = System(path="", type_map=full.type_map, atype=full.atype[:-20], coord=full.coord[:, :-20], box=full.box)
    paths = []
    for name, s in (("full", full), ("cut", cut)):
        s.energy, s.force = energy_of(s), None
        write_system(s, tmp_path / name)
        paths.append(str(tmp_path / name))
    return paths


def test_change_bias_modes_recover_per_type_energies(tmp_path):
    """set: labels that are sums of per-type energies give those energies; change: labels = model + per-type
    shifts give the old bias + the shifts; -b: the given values.  The output model's energies move by them."""
    model = make_model()
    save_model(model, tmp_path / "model.pth")
    per_type = np.array([-93.25, -187.125])
    counts = lambda s: np.bincount(s.atype, minlength=2).astype(float)  # noqa: E731
    systems = _two_compositions(tmp_path, lambda s: np.full(s.nframes, counts(s) @ per_type))
    change_bias_cmd.run(parse(change_bias_cmd, [tmp_path / "model.pth", "-s", *systems, "-m", "set",
                                                "-o", tmp_path / "set.pth"]))
    np.testing.assert_allclose(load_model(tmp_path / "set.pth").fitting.energy_bias.numpy(), per_type, atol=1e-8)

    shift = np.array([0.125, -0.25])
    predict = lambda s: model(torch.as_tensor(s.coord), torch.as_tensor(s.atype),  # noqa: E731
                              torch.as_tensor(s.box))["energy"].detach().numpy()
    systems = _two_compositions(tmp_path / "c", lambda s: predict(s) + counts(s) @ shift)
    change_bias_cmd.run(parse(change_bias_cmd, [tmp_path / "model.pth", "-s", *systems, "-n", 2,
                                                "-o", tmp_path / "changed.pth"]))
    changed = load_model(tmp_path / "changed.pth")
    np.testing.assert_allclose(changed.fitting.energy_bias.numpy(), model.fitting.energy_bias.numpy() + shift,
                               atol=1e-8)
    s = load_system(systems[1], ["O", "H"])
    np.testing.assert_allclose(changed(torch.as_tensor(s.coord), torch.as_tensor(s.atype), torch.as_tensor(s.box))
                               ["energy"].detach().numpy(), s.energy, atol=1e-7)

    (tmp_path / "list.txt").write_text(f"{systems[0]}\n\n{systems[1]}\n")
    change_bias_cmd.run(parse(change_bias_cmd, [tmp_path / "model.pth", "-f", tmp_path / "list.txt",
                                                "-o", tmp_path / "listed.pth"]))
    assert torch.equal(load_model(tmp_path / "listed.pth").fitting.energy_bias, changed.fitting.energy_bias)
    change_bias_cmd.run(parse(change_bias_cmd, [tmp_path / "model.pth", "-b", -90.5, -180.25]))
    assert load_model(tmp_path / "model_updated.pth").fitting.energy_bias.tolist() == [-90.5, -180.25]


def test_change_bias_mistakes_are_one_line_errors(tmp_path):
    save_model(make_model(), tmp_path / "model.pth")
    with pytest.raises(DpmdError, match=r"3 values given, expected one per element of the type_map \['O', 'H'\]"):
        change_bias_cmd.run(parse(change_bias_cmd, [tmp_path / "model.pth", "-b", 1, 2, 3]))
    write_system(water_frames(1, natoms=6), tmp_path / "unlabelled")
    (tmp_path / "unlabelled" / "set.000" / "energy.npy").unlink()
    with pytest.raises(DpmdError, match="unlabelled: no energy.npy in the data"):
        change_bias_cmd.run(parse(change_bias_cmd, [tmp_path / "model.pth", "-s", tmp_path / "unlabelled"]))
    with pytest.raises(DpmdError, match="is a single-task model"):
        change_bias_cmd.run(parse(change_bias_cmd, [tmp_path / "model.pth", "--model-branch", "water"]))
    with pytest.raises(SystemExit):  # -s and -b exclude each other, as in DeePMD-kit
        parse(change_bias_cmd, [tmp_path / "model.pth", "-s", EXAMPLE, "-b", 1, 2])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pth", "unlabelled"]


# ---------------------------------------------------------------------------------------------- show

def test_show_prints_what_dp_show_prints(tmp_path, capsys):
    model = make_model()
    with torch.no_grad():
        model.fitting.energy_bias[:] = torch.tensor([-93.5, 0.0])   # no H in the data the bias was fitted on
    save_model(model, tmp_path / "model.pth")
    show_cmd.run(parse(show_cmd, [tmp_path / "model.pth", "observed-type", "size", "type-map", "descriptor"]))
    lines = capsys.readouterr().out.splitlines()
    desc = sum(p.numel() for p in model.descriptor.parameters())
    fit = sum(p.numel() for p in model.fitting.parameters())
    assert lines == ["This is a singletask model", "The type_map is ['O', 'H']",
                     f"The descriptor parameter is {model.config['descriptor']}", "Parameter counts:",
                     f"Parameters in descriptor: {desc:,}", f"Parameters in fitting-net: {fit:,}",
                     f"Parameters in total: {desc + fit:,}", "The observed types for this model:",
                     "Number of observed types: 1", "Observed types: ['O']"]
    assert show_cmd.observed_types(make_model()) == ["H", "O"]   # by atomic number
    with pytest.raises(DpmdError, match="'model-branch' attribute requires a multitask model"):
        show_cmd.run(parse(show_cmd, [tmp_path / "model.pth", "type-map", "model-branch"]))
    with pytest.raises(SystemExit):
        parse(show_cmd, [tmp_path / "model.pth", "sizes"])


# ---------------------------------------------------------------------------------------------- test

def test_test_datafile_shuffle_and_seed(tmp_path, capsys):
    save_model(make_model(), tmp_path / "model.pth")
    (tmp_path / "list.txt").write_text(f"{EXAMPLE}\n")
    base = ["-m", tmp_path / "model.pth", "-n", 4]
    test_cmd.run(parse(test_cmd, base + ["-f", tmp_path / "list.txt", "-d", tmp_path / "listed"]))
    test_cmd.run(parse(test_cmd, base + ["-s", EXAMPLE, "-d", tmp_path / "first"]))
    energy = load_system(EXAMPLE).energy
    first = np.loadtxt(tmp_path / "first.e.out")
    assert np.array_equal(np.loadtxt(tmp_path / "listed.e.out"), first)
    assert first[:, 0].tolist() == energy[:4].tolist()

    for seed, name in ((7, "a"), (7, "b"), (8, "c")):
        test_cmd.run(parse(test_cmd, base + ["-s", EXAMPLE, "--shuffle-test", "-r", seed, "-d", tmp_path / name]))
    drawn = {n: np.loadtxt(tmp_path / f"{n}.e.out")[:, 0] for n in "abc"}
    assert drawn["a"].tolist() == energy[np.random.default_rng(7).permutation(40)[:4]].tolist()
    assert np.array_equal(drawn["a"], drawn["b"]) and not np.array_equal(drawn["a"], drawn["c"])
    capsys.readouterr()


def test_test_atomic_compares_atom_energies(tmp_path, capsys):
    model = make_model()
    save_model(model, tmp_path / "model.pth")
    system = water_frames(3)
    write_system(system, tmp_path / "sys")
    atom_energy = model(torch.as_tensor(system.coord), torch.as_tensor(system.atype),
                        torch.as_tensor(system.box))["atom_energy"].detach().numpy()
    offset = np.where(np.arange(system.natoms) % 2, 0.25, -0.25)   # |error| 0.25 eV on every atom
    np.save(tmp_path / "sys" / "set.000" / "atom_ener.npy", (atom_energy + offset).reshape(3, -1))
    result = test_cmd.test_model(tmp_path / "model.pth", [tmp_path / "sys"], 2, atomic=True, log=lambda *_: None)
    row = result["systems"][0]
    assert row["nframes"] == 2 and row["rmse_ae"] == pytest.approx(0.25, abs=1e-10)
    assert row["mae_ae"] == pytest.approx(0.25, abs=1e-10) and "rmse_ae" not in result["overall"]
    test_cmd.run(parse(test_cmd, ["-m", tmp_path / "model.pth", "-s", tmp_path / "sys", "-a"]))
    assert "AE RMSE 2.5000e-01 MAE 2.5000e-01 eV" in capsys.readouterr().out

    (tmp_path / "sys" / "set.000" / "atom_ener.npy").unlink()
    with pytest.raises(DataError, match=r"sys/set.000/atom_ener.npy: missing \(-a/--atomic"):
        test_cmd.run(parse(test_cmd, ["-m", tmp_path / "model.pth", "-s", tmp_path / "sys", "-a"]))
