"""Mixed-type data (deepmd/npy/mixed, as dpdata writes it): read as the ordinary systems it was made from, trained
on identically, bad files refused in one line naming the file."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dpmd.data import load_system, load_systems
from dpmd.data.system import read_atom_energy, source_groups
from dpmd.errors import DataError
from tests.conftest import EXAMPLE

dpdata = pytest.importorskip("dpdata")
LABELS = ("coord", "box", "energy", "force", "virial")


def compositions(nframes=(3, 2)) -> list:
    """Two compositions of the same 192 atoms: the water frames as they are, and with 3 O and 2 H swapped."""
    water = dpdata.LabeledSystem(str(EXAMPLE), fmt="deepmd/npy")
    a = water.sub_system(list(range(nframes[0])))
    b = water.sub_system(list(range(10, 10 + nframes[1])))
    types = b.data["atom_types"].copy()
    o, h = np.flatnonzero(types == 0)[:3], np.flatnonzero(types == 1)[:2]
    types[o], types[h] = 1, 0
    b.data["atom_types"] = types
    b.data["atom_numbs"] = [int((types == t).sum()) for t in range(2)]
    return [a, b]


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """The two compositions as ordinary systems (ord_0, ord_1) and as one mixed folder (mixed/192)."""
    root = tmp_path_factory.mktemp("mixed")
    parts = compositions()
    for k, s in enumerate(parts):
        s.to("deepmd/npy", str(root / f"ord_{k}"))
    dpdata.MultiSystems(*parts).to("deepmd/npy/mixed", str(root / "mixed"))
    return root


def test_mixed_folder_reads_as_the_ordinary_systems(written):
    folder = written / "mixed" / "192"
    assert (folder / "set.000" / "real_atom_types.npy").is_file()
    type_map = ["H", "O"]  # the model's order differs from the files' (O H): remapped by name
    mixed = load_systems([folder], type_map=type_map)
    plain = load_systems([written / "ord_0", written / "ord_1"], type_map=type_map)
    assert len(mixed) == 2 and source_groups(mixed) == [0, 0] and source_groups(plain) == [0, 1]
    for m, p in zip(mixed, plain):
        assert m.type_map == type_map and np.array_equal(m.atype, p.atype)
        for key in LABELS:
            a, b = getattr(m, key), getattr(p, key)
            assert (a is None and b is None) or np.array_equal(a, b), key
    assert [s.path for s in mixed] == [f"{folder}[frames 0-2]", f"{folder}[frames 3-4]"]
    assert mixed[1].source == str(folder) and mixed[1].source_frames.tolist() == [3, 4]
    # a subset keeps the folder's frame numbers (what `dpmd test` reads atom_ener.npy by)
    assert mixed[1].subset([1]).source_frames.tolist() == [4]
    # without a model type_map the folder's own names are used
    assert load_systems(folder)[0].type_map == ["O", "H"]


def test_interleaved_compositions_and_sets(tmp_path):
    """Compositions interleaved over frames and split over sets: each part is its frames, in order."""
    a, b = compositions((3, 3))
    folder = tmp_path / "mix"
    dpdata.MultiSystems(a, b).to("deepmd/npy/mixed", str(tmp_path / "tmp"))
    src = tmp_path / "tmp" / "192"
    order = [0, 3, 1, 4, 5, 2]  # frames of a: 0-2, of b: 3-5
    arrays = {f.stem: np.load(f) for f in (src / "set.000").iterdir()}
    for k, frames in enumerate((order[:4], order[4:])):
        (folder / f"set.{k:03d}").mkdir(parents=True)
        for name, arr in arrays.items():
            np.save(folder / f"set.{k:03d}" / f"{name}.npy", arr[frames])
    for name in ("type.raw", "type_map.raw"):
        (folder / name).write_text((src / name).read_text())
    np.save(folder / "set.000" / "atom_ener.npy", np.arange(4 * 192.0).reshape(4, 192))
    np.save(folder / "set.001" / "atom_ener.npy", np.arange(4 * 192.0, 6 * 192.0).reshape(2, 192))
    parts = load_systems(folder)
    assert [s.path for s in parts] == [f"{folder}[frames 0,2,5]", f"{folder}[frames 1,3-4]"]
    whole = load_systems(src)
    for part, ref in zip(parts, whole):
        assert np.array_equal(part.atype, ref.atype) and np.array_equal(part.coord, ref.coord)
        assert np.array_equal(part.force, ref.force) and np.array_equal(part.energy, ref.energy)
    # per-atom energies of `dpmd test -a` come from the folder's frames of each part
    assert np.array_equal(read_atom_energy(parts[1]), np.arange(6 * 192.0).reshape(6, 192)[[1, 3, 4]])


def test_virtual_atoms_are_dropped(tmp_path):
    """dpdata's atom_numb_pad pads compositions with virtual atoms (type -1, at the origin): DeePMD-kit leaves them
    out, so each part holds only its real atoms."""
    a, b = compositions()
    small = a.sub_system([0])
    keep = np.r_[0:4, 64:72]  # 4 O, 8 H: 12 atoms, padded to 16
    small.data["coords"] = small.data["coords"][:, keep]
    small.data["forces"] = small.data["forces"][:, keep]
    small.data["atom_types"] = small.data["atom_types"][keep]
    small.data["atom_numbs"] = [4, 8]
    dpdata.MultiSystems(small).to("deepmd/npy/mixed", str(tmp_path / "m"), atom_numb_pad=8)
    folder = tmp_path / "m" / "16"
    assert (np.load(folder / "set.000" / "real_atom_types.npy") == -1).sum() == 4
    (part,) = load_systems(folder)
    assert part.natoms == 12 and np.array_equal(part.coord[0], small.data["coords"][0])
    assert np.array_equal(part.force[0], small.data["forces"][0])
    real = np.load(folder / "set.000" / "real_atom_types.npy")[0] != -1
    np.save(folder / "set.000" / "atom_ener.npy", np.arange(16.0)[None])
    assert np.array_equal(read_atom_energy(part), np.arange(16.0)[None, real])


def test_mixed_hdf5_group(tmp_path, written):
    """The same layout inside an HDF5 group (DeePMD-kit's file.h5#/group) reads as the folder does."""
    h5py = pytest.importorskip("h5py")
    folder = written / "mixed" / "192"
    f = tmp_path / "data.h5"
    with h5py.File(f, "w") as h5:
        g = h5.create_group("alloy")
        g.create_dataset("type.raw", data=np.loadtxt(folder / "type.raw", dtype=np.int64))
        g.create_dataset("type_map.raw", data=np.array((folder / "type_map.raw").read_text().split(), dtype="S"))
        for npy in (folder / "set.000").iterdir():
            g.create_dataset(f"set.000/{npy.name}", data=np.load(npy))
    from_h5, from_dir = load_systems(f"{f}#/alloy"), load_systems(folder)
    assert [s.path for s in from_h5] == [f"{f}#/alloy[frames 0-2]", f"{f}#/alloy[frames 3-4]"]
    for a, b in zip(from_h5, from_dir):
        assert np.array_equal(a.atype, b.atype) and np.array_equal(a.coord, b.coord)
        assert np.array_equal(a.force, b.force)


def replayed(sequence):
    """A sampler's `next` that gives (system, frames) from `sequence`."""
    def next_batch(rank=0):
        i, frames = next(sequence)
        return i, torch.tensor(frames)
    return next_batch


def test_training_on_mixed_equals_training_on_the_ordinary_systems(written, tmp_path):
    """The same batches give the same steps: the lcurve and the weights agree.  (The draws differ: DeePMD-kit's
    random stream counts the folder as one system.  The statistics read every frame of both, in another order.)"""
    import itertools

    from dpmd.train.config import normalize_input
    from dpmd.train.trainer import Trainer
    from tests.test_train import small_input

    steps = [(0, [2]), (1, [1]), (0, [0]), (1, [0]), (0, [1])]   # (composition, frame): both parts, every frame
    results = []
    for name, systems in (("mixed", [written / "mixed" / "192"]), ("plain", [written / "ord_0", written / "ord_1"])):
        cfg = small_input(tmp_path, steps=4, disp_freq=2, save_freq=4)
        cfg["model"]["descriptor"]["sel"] = [30, 60]
        cfg["training"]["training_data"]["systems"] = [str(s) for s in systems]
        cfg["training"]["validation_data"]["systems"] = [str(s) for s in systems]
        trainer = Trainer(normalize_input(cfg), out_dir=tmp_path / name, progress=False)
        for sampler in (trainer.sampler, trainer.valid_sampler):
            sampler.next = replayed(itertools.cycle(steps))
        trainer.run()
        results.append((np.loadtxt(tmp_path / name / "lcurve.out"), trainer.model.state_dict()))
    (lc_m, w_m), (lc_p, w_p) = results
    assert lc_m.shape == lc_p.shape and np.allclose(lc_m, lc_p, rtol=1e-9, atol=0)
    assert all(torch.allclose(w_m[k], w_p[k], rtol=1e-9, atol=1e-12) for k in w_p)


def test_a_mixed_folder_weighs_as_one_system(written):
    """DeePMD-kit counts a mixed-type folder as ONE system (prob_sys_size by all its batches; prob_uniform,
    sys_probs and batch_size lists per folder); within it each composition is drawn by its frames."""
    from dpmd.train.sampler import BatchSampler

    systems = load_systems([written / "mixed" / "192", written / "ord_0"], type_map=["O", "H"])  # 3 + 2 | 3 frames
    uniform = BatchSampler(systems, 1, "prob_uniform", 1, workers=0)
    assert np.allclose(uniform.probs.numpy(), [0.5 * 3 / 5, 0.5 * 2 / 5, 0.5])
    by_size = BatchSampler(systems, 2, "prob_sys_size", 1, workers=0)  # ceil(5 / 2) = 3 and ceil(3 / 2) = 2 batches
    assert np.allclose(by_size.probs.numpy(), [0.6 * 3 / 5, 0.6 * 2 / 5, 0.4]) and by_size.sizes == [2, 2, 2]
    listed = BatchSampler(systems, [4, 1], "prob_uniform", 1, sys_probs=[0.2, 0.8], workers=0)
    assert np.allclose(listed.probs.numpy(), [0.2 * 3 / 5, 0.2 * 2 / 5, 0.8]) and listed.sizes == [3, 2, 1]
    counts = np.bincount([uniform.next()[0] for _ in range(4000)], minlength=3) / 4000
    assert np.allclose(counts, uniform.probs.numpy(), atol=0.03)


def mixed_folder(tmp_path, written):
    """A writable copy of the mixed folder."""
    import shutil

    folder = tmp_path / "m"
    shutil.copytree(written / "mixed" / "192", folder)
    return folder


@pytest.mark.parametrize("mutate, message", [
    (lambda t: t.__setitem__((1, 5), 2), "set.000/real_atom_types.npy: frame 1, atom 5 has type 2, but "
                                         "type_map.raw names only 2 types ['O', 'H']"),
    (lambda t: t[:, :-1], "set.000/real_atom_types.npy: has shape (5, 191), expected [5, 192]"),
    (lambda t: t[:-1], "set.000/real_atom_types.npy: has shape (4, 192), expected [5, 192]"),
    (lambda t: t.astype(np.float64) + 0.5, "set.000/real_atom_types.npy: has dtype float64, expected integer"),
    (lambda t: t.__setitem__((0, 7), -3), "set.000/real_atom_types.npy: frame 0, atom 7 has type -3, expected"),
])
def test_bad_real_atom_types_are_one_line_errors(tmp_path, written, mutate, message):
    folder = mixed_folder(tmp_path, written)
    path = folder / "set.000" / "real_atom_types.npy"
    types = np.load(path)
    changed = mutate(types)
    np.save(path, types if changed is None else changed)
    with pytest.raises(DataError) as err:
        load_systems(folder)
    assert message in str(err.value) and str(path) in str(err.value) and "\n" not in str(err.value)


def test_mixed_folder_mistakes(tmp_path, written):
    folder = mixed_folder(tmp_path, written)
    with pytest.raises(DataError, match=r"m: a mixed-type system with 2 compositions"):
        load_system(folder)  # one System is asked for (e.g. an MD start structure): not a silent first part
    with pytest.raises(DataError, match=r"type_map.raw: element 'H' is not in the model's type_map \['O', 'C'\]"):
        load_systems(folder, type_map=["O", "C"])
    set1 = folder / "set.001"
    set1.mkdir()
    for name in ("coord", "box", "energy", "force"):
        np.save(set1 / f"{name}.npy", np.load(folder / "set.000" / f"{name}.npy")[:1])
    with pytest.raises(DataError, match=r"set.001: lacks real_atom_types.npy, but set.000 does"):
        load_systems(folder)
    (folder / "type_map.raw").unlink()
    np.save(set1 / "real_atom_types.npy", np.load(folder / "set.000" / "real_atom_types.npy")[:1])
    with pytest.raises(DataError, match=r"type_map.raw: missing \(a mixed-type system needs it"):
        load_systems(folder)
    # with the model's type_map the ids index it (as for an ordinary system without type_map.raw)
    assert [s.nframes for s in load_systems(folder, type_map=["O", "H"])] == [4, 2]


@pytest.mark.parametrize("fmt", ["auto", "deepmd/npy"])
def test_convert_splits_a_mixed_folder(tmp_path, written, fmt):
    """`dpmd convert` of a mixed folder: one ordinary system per composition (read as plain deepmd/npy, every atom
    would take type.raw's placeholder type 0)."""
    from dpmd.data import convert

    out = convert(written / "mixed" / "192", fmt, tmp_path / "out")
    assert len(out) == 2
    plain = load_systems([written / "ord_0", written / "ord_1"], type_map=["O", "H"])
    for path in out:
        (s,) = load_systems([path], type_map=["O", "H"])
        ref = next(p for p in plain if np.array_equal(np.bincount(p.atype), np.bincount(s.atype)))
        assert np.array_equal(s.atype, ref.atype)
        for key in LABELS:
            a, b = getattr(s, key), getattr(ref, key)
            assert (a is None) == (b is None) and (a is None or np.allclose(a, b)), key
