"""Tests for dpmd.data: deepmd/npy + HDF5 readers, atomic writer, dpdata conversion."""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from dpmd.data import System, convert, find_systems, load_system, load_systems, write_system
from dpmd.data.convert import add_convert_arguments, guess_format, run_convert
from dpmd.errors import DataError

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "water" / "data_0"
SHARED = REPO / ".." / "shared" / "data" / "water"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="shared water data not available")


def make_system(nframes=5, natoms=4, pbc=True, labels=True, seed=0, type_map=("O", "H")) -> System:
    rng = np.random.default_rng(seed)
    atype = np.arange(natoms, dtype=np.int64) % len(type_map)
    box = np.tile(np.diag([5.0, 6.0, 7.0]), (nframes, 1, 1)) + rng.normal(scale=0.01, size=(nframes, 3, 3))
    return System(
        path="mem",
        type_map=list(type_map),
        atype=atype,
        coord=rng.uniform(0, 5, size=(nframes, natoms, 3)),
        box=box if pbc else None,
        energy=rng.normal(size=nframes) if labels else None,
        force=rng.normal(size=(nframes, natoms, 3)) if labels else None,
        virial=rng.normal(size=(nframes, 3, 3)) if labels else None,
    )


def assert_same(a: System, b: System):
    assert a.type_map == b.type_map
    np.testing.assert_array_equal(a.atype, b.atype)
    for key in ("coord", "box", "energy", "force", "virial"):
        x, y = getattr(a, key), getattr(b, key)
        assert (x is None) == (y is None), key
        if x is not None:
            np.testing.assert_array_equal(x, y, err_msg=key)


# --------------------------------------------------------------------------- reading


def test_example_water():
    s = load_system(EXAMPLE)
    assert (s.nframes, s.natoms) == (40, 192)
    assert s.type_map == ["O", "H"] and s.pbc
    assert s.atype.dtype == np.int64 and list(np.bincount(s.atype)) == [64, 128]
    for key, shape in {"coord": (40, 192, 3), "box": (40, 3, 3), "energy": (40,), "force": (40, 192, 3)}.items():
        arr = getattr(s, key)
        assert arr.dtype == np.float64 and arr.shape == shape, key
    assert s.virial is None
    assert np.allclose(s.box[0], np.diag(np.diag(s.box[0])))  # cubic box, rows = lattice vectors


def test_type_remap_swaps_ids():
    s = load_system(EXAMPLE)
    r = load_system(EXAMPLE, type_map=["H", "O"])
    assert r.type_map == ["H", "O"]
    np.testing.assert_array_equal(r.atype, 1 - s.atype)
    # a model type_map with extra elements keeps ids by name
    r = load_system(EXAMPLE, type_map=["C", "H", "N", "O"])
    np.testing.assert_array_equal(r.atype, np.where(s.atype == 0, 3, 1))


@needs_shared
def test_shared_water_and_multiple_sets():
    systems = load_systems(SHARED)  # directory of systems -> find_systems
    assert [Path(s.path).name for s in systems] == ["data_0", "data_1", "data_2"]
    assert [s.nframes for s in systems] == [80, 160, 80]  # data_1 has set.000 + set.001
    assert all(s.natoms == 192 and s.coord.dtype == np.float64 for s in systems)
    d1 = load_system(SHARED / "data_1")
    second = np.load(SHARED / "data_1" / "set.001" / "coord.npy").reshape(80, 192, 3)
    np.testing.assert_array_equal(d1.coord[80:], second.astype(np.float64))
    # the example is the first 40 frames of data_0
    assert_same(load_system(SHARED / "data_0").subset(slice(0, 40)), load_system(EXAMPLE))


def test_multiple_sets_concatenated(tmp_path):
    s = make_system(nframes=7)
    write_system(s, tmp_path / "sys", set_size=3)
    assert sorted(p.name for p in (tmp_path / "sys").glob("set.*")) == ["set.000", "set.001", "set.002"]
    assert_same(load_system(tmp_path / "sys"), s)


def test_nopbc_and_float32(tmp_path):
    s = make_system(pbc=False, labels=False)
    write_system(s, tmp_path / "mol", dtype=np.float32)
    assert (tmp_path / "mol" / "nopbc").exists()
    assert not (tmp_path / "mol" / "set.000" / "box.npy").exists()
    r = load_system(tmp_path / "mol")
    assert not r.pbc and r.box is None and r.energy is None
    assert r.coord.dtype == np.float64
    np.testing.assert_allclose(r.coord, s.coord, rtol=1e-6)
    # with nopbc a box.npy on disk is ignored
    np.save(tmp_path / "mol" / "set.000" / "box.npy", np.zeros((5, 9)))
    assert load_system(tmp_path / "mol").box is None


def test_no_type_map_raw(tmp_path):
    s = make_system()
    write_system(s, tmp_path / "sys")
    (tmp_path / "sys" / "type_map.raw").unlink()
    assert load_system(tmp_path / "sys").type_map == ["Type_0", "Type_1"]
    r = load_system(tmp_path / "sys", type_map=["Cu", "Zn", "Al"])  # ids index the model's type_map
    assert r.type_map == ["Cu", "Zn", "Al"]
    np.testing.assert_array_equal(r.atype, s.atype)


def test_subset():
    s = make_system(nframes=6)
    t = s.subset([4, 1])
    np.testing.assert_array_equal(t.coord, s.coord[[4, 1]])
    np.testing.assert_array_equal(t.energy, s.energy[[4, 1]])
    assert s.subset(slice(1, 3)).nframes == 2 and s.subset(2).nframes == 1


def test_load_systems_shares_type_map(tmp_path):
    write_system(make_system(type_map=("O", "H")), tmp_path / "a")
    write_system(make_system(type_map=("Cu", "O")), tmp_path / "b")
    a, b = load_systems([tmp_path / "a", tmp_path / "b"])
    assert a.type_map == b.type_map == ["O", "H", "Cu"]
    np.testing.assert_array_equal(b.atype, [2, 0, 2, 0])


# --------------------------------------------------------------------------- HDF5


def write_h5_group(g, s: System):
    g.create_dataset("type.raw", data=s.atype)
    g.create_dataset("type_map.raw", data=np.array(s.type_map, dtype="S"))
    if not s.pbc:
        g.create_dataset("nopbc", data=True)
    for i, sl in enumerate([slice(0, 2), slice(2, None)]):
        sg = g.create_group(f"set.{i:03d}")
        sg.create_dataset("coord.npy", data=s.coord[sl].reshape(-1, s.natoms * 3))
        if s.pbc:
            sg.create_dataset("box.npy", data=s.box[sl].reshape(-1, 9).astype(np.float32))
        if s.energy is not None:
            sg.create_dataset("energy.npy", data=s.energy[sl])
            sg.create_dataset("force.npy", data=s.force[sl].reshape(-1, s.natoms * 3))
            sg.create_dataset("virial.npy", data=s.virial[sl].reshape(-1, 9))


def test_hdf5_roundtrip(tmp_path):
    h5py = pytest.importorskip("h5py")
    s1, s2 = make_system(seed=1), make_system(nframes=3, pbc=False, seed=2)
    f = tmp_path / "data.h5"
    with h5py.File(f, "w") as h5:
        write_h5_group(h5.create_group("water/sys1"), s1)
        write_h5_group(h5.create_group("mol"), s2)
    assert find_systems(f) == [f"{f}#/mol", f"{f}#/water/sys1"]
    r1 = load_system(f"{f}#/water/sys1")
    assert r1.path == f"{f}#/water/sys1"
    s1.box = s1.box.astype(np.float32).astype(np.float64)  # stored as float32 above
    assert_same(r1, s1)
    assert_same(load_system(f"{f}#/mol"), s2)
    assert [x.nframes for x in load_systems(f)] == [3, 5]
    # root-group system, addressed by the bare file name
    g = tmp_path / "root.hdf5"
    with h5py.File(g, "w") as h5:
        write_h5_group(h5, s2)
    assert find_systems(g) == [f"{g}#/"]
    assert_same(load_system(g), s2)
    # find_systems on a directory also lists groups of h5 files in it
    assert len(find_systems(tmp_path)) == 3
    with pytest.raises(DataError, match="data.h5.*nope"):
        load_system(f"{f}#/nope")
    with h5py.File(f, "a") as h5:
        del h5["mol/set.001/coord.npy"]
        h5["water/sys1/set.000/box.npy"][0, 0] = np.nan
    with pytest.raises(DataError, match=r"data.h5#/mol/set.001/coord.npy: missing"):
        load_system(f"{f}#/mol")
    with pytest.raises(DataError, match=r"data.h5#/water/sys1/set.000/box.npy: frame 0 holds a non-finite"):
        load_system(f"{f}#/water/sys1")


# --------------------------------------------------------------------------- writing


def test_write_roundtrip_atomic(tmp_path):
    s = make_system()
    out = tmp_path / "nested" / "sys"
    write_system(s, out)
    assert_same(load_system(out), s)
    assert sorted(os.listdir(out.parent)) == ["sys"]  # no temp dirs left behind
    assert (out / "type.raw").read_text().split() == ["0", "1", "0", "1"]
    with pytest.raises(DataError, match="sys.*not empty"):
        write_system(make_system(seed=5), out)
    assert_same(load_system(out), s)  # untouched
    s5 = make_system(seed=5)
    write_system(s5, out, overwrite=True)
    assert_same(load_system(out), s5)
    assert sorted(os.listdir(out.parent)) == ["sys"]
    empty = tmp_path / "empty"
    empty.mkdir()
    write_system(s, empty)  # an empty existing dir is fine
    assert_same(load_system(empty), s)


def test_write_failure_leaves_nothing(tmp_path):
    s = make_system()
    s.force = s.force[:, :2]  # wrong shape
    with pytest.raises(DataError, match="force"):
        write_system(s, tmp_path / "bad")
    assert os.listdir(tmp_path) == []


def test_find_systems(tmp_path):
    for name in ["b/sys2", "a/sys1", "a/sys1/deeper", "c"]:
        write_system(make_system(), tmp_path / name)
    (tmp_path / "not_a_system").mkdir()
    found = find_systems(tmp_path)
    assert found == [str(tmp_path / n) for n in ["a/sys1", "a/sys1/deeper", "b/sys2", "c"]]
    with pytest.raises(DataError, match="missing_root"):
        find_systems(tmp_path / "missing_root")


# --------------------------------------------------------------------------- errors


@pytest.fixture
def sysdir(tmp_path):
    d = tmp_path / "data_0"
    write_system(make_system(nframes=4, natoms=4), d)
    return d


def _save(path, arr):
    np.save(path, arr, allow_pickle=True)


BREAKERS = {
    "missing type.raw": (lambda d: (d / "type.raw").unlink(), "type.raw"),
    "non-integer type.raw": (lambda d: (d / "type.raw").write_text("0\n1\nx\n1\n"), "type.raw"),
    "float type.raw": (lambda d: (d / "type.raw").write_text("0\n1.5\n0\n1\n"), "type.raw"),
    "no set": (lambda d: shutil.rmtree(d / "set.000"), "data_0"),
    "set without coord": (lambda d: (d / "set.000" / "coord.npy").unlink(), "coord.npy"),
    "empty set": (lambda d: _save(d / "set.000" / "coord.npy", np.zeros((0, 12))), "coord.npy"),
    "coord per frame": (lambda d: _save(d / "set.000" / "coord.npy", np.zeros((4, 11))), "coord.npy"),
    "force per frame": (lambda d: _save(d / "set.000" / "force.npy", np.zeros((4, 10))), "force.npy"),
    "force rows": (lambda d: _save(d / "set.000" / "force.npy", np.zeros((3, 12))), "force.npy"),
    "box rows": (lambda d: _save(d / "set.000" / "box.npy", np.ones((5, 9))), "box.npy"),
    "box per frame": (lambda d: _save(d / "set.000" / "box.npy", np.ones((4, 6))), "box.npy"),
    "virial per frame": (lambda d: _save(d / "set.000" / "virial.npy", np.ones((4, 3))), "virial.npy"),
    "energy rows": (lambda d: _save(d / "set.000" / "energy.npy", np.ones(5)), "energy.npy"),
    "box strings": (lambda d: _save(d / "set.000" / "box.npy", np.array([["1"] * 9] * 4)), "box.npy"),
    "box objects": (lambda d: _save(d / "set.000" / "box.npy", np.array([[None] * 9] * 4)), "box.npy: holds Python"),
    "nan coord": (lambda d: _save(d / "set.000" / "coord.npy", np.full((4, 12), np.nan)), "coord.npy"),
    "inf energy": (lambda d: _save(d / "set.000" / "energy.npy", np.array([0, np.inf, 0, 0])), "energy.npy"),
    "missing box": (lambda d: (d / "set.000" / "box.npy").unlink(), "box.npy"),
    "singular box": (lambda d: _save(d / "set.000" / "box.npy", np.zeros((4, 9))), "box.npy"),
    "garbage npy": (lambda d: (d / "set.000" / "force.npy").write_bytes(b"not numpy"), "force.npy: not a valid .npy"),
    "type id beyond type_map.raw": (lambda d: (d / "type.raw").write_text("0\n1\n2\n1\n"), "type.raw"),
    "label in one set only": (
        lambda d: (shutil.copytree(d / "set.000", d / "set.001"), (d / "set.001" / "virial.npy").unlink()),
        "set.001/virial.npy",
    ),
}


@pytest.mark.parametrize("case", BREAKERS)
def test_errors_name_the_file(sysdir, case):
    breaker, name = BREAKERS[case]
    breaker(sysdir)
    with pytest.raises(DataError) as err:
        load_system(sysdir)
    msg = str(err.value)
    assert name in msg and str(sysdir) in msg and "\n" not in msg


def test_error_messages_are_specific(sysdir, tmp_path):
    _save(sysdir / "set.000" / "coord.npy", np.zeros((4, 10)))
    with pytest.raises(DataError, match=r"coord\.npy: expected 4\*3=12 values per frame \(from type.raw\), got 10"):
        load_system(sysdir)
    with pytest.raises(DataError, match="nowhere.*does not exist"):
        load_system(tmp_path / "nowhere")


def test_type_map_errors(sysdir):
    with pytest.raises(DataError, match=r"type_map.raw: element 'H' is not in the model's type_map \['O', 'C'\]"):
        load_system(sysdir, type_map=["O", "C"])
    (sysdir / "type_map.raw").unlink()
    with pytest.raises(DataError, match=r"type.raw: atom 1 has type 1.*\['O'\]"):
        load_system(sysdir, type_map=["O"])


# --------------------------------------------------------------------------- convert (dpdata)


def ase_frames(n=3, seed=0):
    from ase.build import bulk
    from ase.calculators.singlepoint import SinglePointCalculator

    rng = np.random.default_rng(seed)
    frames = []
    for i in range(n):
        a = bulk("NaCl", "rocksalt", a=5.6, cubic=True)
        a.rattle(0.05, seed=i)
        a.calc = SinglePointCalculator(a, energy=-10.0 - i, forces=rng.normal(size=(len(a), 3)))
        frames.append(a)
    return frames


def test_convert_extxyz_roundtrip(tmp_path):
    pytest.importorskip("dpdata")
    import ase.io

    frames = ase_frames()
    ase.io.write(tmp_path / "train.xyz", frames, format="extxyz")
    out = convert(tmp_path / "train.xyz", "auto", tmp_path / "npy", type_map=["Cl", "Na"])
    assert out == [str(tmp_path / "npy")]
    s = load_system(out[0])
    assert s.type_map == ["Cl", "Na"] and s.nframes == 3 and s.natoms == 8
    for i, a in enumerate(frames):  # back equals the input (same atom order)
        assert [s.type_map[t] for t in s.atype] == a.get_chemical_symbols()
        np.testing.assert_allclose(s.coord[i], a.positions, atol=1e-8)
        np.testing.assert_allclose(s.box[i], a.cell[:], atol=1e-8)
        np.testing.assert_allclose(s.force[i], a.get_forces(), atol=1e-8)
        assert s.energy[i] == pytest.approx(a.get_potential_energy())
    # the same file read through ase.io (format "ase/structure") gives the same data
    assert_same(load_system(convert(tmp_path / "train.xyz", "ase/structure", tmp_path / "npy2", ["Cl", "Na"])[0]), s)


def test_convert_mixed_compositions(tmp_path):
    pytest.importorskip("dpdata")
    import ase.io
    from ase.build import molecule
    from ase.calculators.singlepoint import SinglePointCalculator

    w = molecule("H2O")
    w.calc = SinglePointCalculator(w, energy=-3.0, forces=np.ones((3, 3)))
    ase.io.write(tmp_path / "mix.extxyz", ase_frames(2) + [w], format="extxyz")
    out = convert(tmp_path / "mix.extxyz", "extxyz", tmp_path / "out")
    assert sorted(Path(p).name for p in out) == ["Cl4Na4", "H2O1"]
    systems = load_systems(tmp_path / "out")
    assert len({tuple(s.type_map) for s in systems}) == 1  # one shared type map
    mol = [s for s in systems if s.natoms == 3][0]
    assert not mol.pbc and mol.nframes == 1
    assert sorted(os.listdir(tmp_path)) == ["mix.extxyz", "out"]


def test_convert_vasp_outcar(tmp_path):
    pytest.importorskip("dpdata")
    import ase
    import ase.io

    outcar = Path(ase.__file__).parent / "test" / "testdata" / "vasp" / "OUTCAR_example_1"
    if not outcar.exists():
        pytest.skip("no sample OUTCAR")
    assert guess_format(outcar) == "vasp/outcar"
    s = load_system(convert(outcar, "auto", tmp_path / "vasp")[0])
    a = ase.io.read(outcar)
    np.testing.assert_allclose(s.coord[0], a.positions)
    np.testing.assert_allclose(s.force[0], a.get_forces())
    assert s.energy[0] == pytest.approx(a.get_potential_energy(force_consistent=True))
    assert s.virial is not None


def test_convert_errors(tmp_path):
    pytest.importorskip("dpdata")
    bad = tmp_path / "junk.xyz"
    bad.write_text("this is not\nan xyz file\n")
    with pytest.raises(DataError, match="junk.xyz.*unknown format 'vasp/nope'.*vasp/outcar"):
        convert(bad, "vasp/nope", tmp_path / "o")
    with pytest.raises(DataError, match="junk.xyz: no frames found when reading as 'extxyz'"):
        convert(bad, "auto", tmp_path / "o")
    (tmp_path / "OUTCAR").write_text("garbage\n" * 10)
    with pytest.raises(DataError, match="OUTCAR: cannot read as 'vasp/outcar'") as err:
        convert(tmp_path / "OUTCAR", "auto", tmp_path / "o")
    assert "\n" not in str(err.value)
    with pytest.raises(DataError, match="cannot guess"):
        convert(bad.rename(tmp_path / "junk.dat"), "auto", tmp_path / "o")
    with pytest.raises(DataError, match="missing.xyz: does not exist"):
        convert(tmp_path / "missing.xyz", "auto", tmp_path / "o")
    import ase.io

    ase.io.write(tmp_path / "ok.xyz", ase_frames(1), format="extxyz")
    with pytest.raises(DataError, match="'Cl' is not in the type_map"):
        convert(tmp_path / "ok.xyz", "auto", tmp_path / "o", type_map=["O", "H", "Na"])
    assert not (tmp_path / "o").exists()


def write_qe_cp_traj(prefix: Path, coords_bohr, forces_au, energies_ha):
    """A Quantum ESPRESSO CP run's files (PREFIX.in, .pos, .for, .evp) for a water molecule in a 10 bohr cube."""
    Path(f"{prefix}.in").write_text(
        "&CONTROL\n  calculation = 'cp'\n/\n&SYSTEM\n  ibrav = 1, celldm(1) = 10.0, nat = 3, ntyp = 2\n/\n"
        "ATOMIC_SPECIES\nO 15.999 O.pbe.UPF\nH 1.008 H.pbe.UPF\n"
        "ATOMIC_POSITIONS (bohr)\nO 5.0 5.0 5.0\nH 6.8 5.0 5.0\nH 5.0 6.8 5.0\n")
    steps = [10 * (i + 1) for i in range(len(energies_ha))]

    def blocks(arrays):   # per frame: a "step time" line, then one row per atom
        return "".join(f"{n} {0.001 * n:.4f}\n" + "".join(" ".join(f"{x:.10f}" for x in row) + "\n" for row in a)
                       for n, a in zip(steps, arrays))

    Path(f"{prefix}.pos").write_text(blocks(coords_bohr))
    Path(f"{prefix}.for").write_text(blocks(forces_au))
    header = "#  nfi  time(ps)  ekinc  T_cell(K)  Tion(K)  etot  enthal  econs  econt\n"   # etot: column 5, hartree
    Path(f"{prefix}.evp").write_text(header + "".join(
        f"{n} {0.001 * n:.4f} 0.0 0.0 300.0 {e:.10f} {e:.10f} {e:.10f} {e:.10f}\n" for n, e in zip(steps, energies_ha)))


def test_convert_a_file_prefix(tmp_path):
    """qe/cp/traj reads PREFIX.in, .pos, .evp, .for (PREFIX itself is no file): -f qe/cp/traj or auto; a missing
    file is one line naming it."""
    pytest.importorskip("dpdata")
    from ase.units import Bohr, Hartree

    rng = np.random.default_rng(0)
    coords = 5.0 + np.array([[0.0, 0.0, 0.0], [1.8, 0.0, 0.0], [0.0, 1.8, 0.0]]) + rng.normal(0, 0.05, (2, 3, 3))
    forces, energies = rng.normal(0, 0.01, (2, 3, 3)), [-17.2, -17.1]
    write_qe_cp_traj(tmp_path / "water", coords, forces, energies)
    for fmt in ("qe/cp/traj", "auto"):
        s = load_system(convert(tmp_path / "water", fmt, tmp_path / fmt.replace("/", "_"), ["O", "H"])[0])
        assert s.nframes == 2 and [s.type_map[t] for t in s.atype] == ["O", "H", "H"]
        np.testing.assert_allclose(s.coord.reshape(2, 3, 3), coords * Bohr, rtol=1e-6)
        np.testing.assert_allclose(s.box.reshape(2, 3, 3), np.stack([np.eye(3) * 10 * Bohr] * 2), rtol=1e-6)
        np.testing.assert_allclose(s.force.reshape(2, 3, 3), forces * Hartree / Bohr, rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(s.energy, np.array(energies) * Hartree, rtol=1e-6)
    (tmp_path / "water.for").unlink()
    with pytest.raises(DataError) as err:
        convert(tmp_path / "water", "qe/cp/traj", tmp_path / "o")
    p = tmp_path / "water"
    assert str(err.value) == (f"{p}: qe/cp/traj reads the files of this prefix ({p}.in, {p}.pos, {p}.evp, {p}.for); "
                              f"missing {p}.for")
    with pytest.raises(DataError, match=r"water: does not exist$"):   # auto: no complete prefix either
        convert(tmp_path / "water", "auto", tmp_path / "o")


def test_cli_run_convert(tmp_path, capsys):
    pytest.importorskip("dpdata")
    import ase.io

    ase.io.write(tmp_path / "a.xyz", ase_frames(2), format="extxyz")
    ase.io.write(tmp_path / "b.xyz", ase_frames(3, seed=1), format="extxyz")
    parser = argparse.ArgumentParser()
    add_convert_arguments(parser)
    args = parser.parse_args([str(tmp_path / "a.xyz"), str(tmp_path / "b.xyz"), "-o", str(tmp_path / "out"), "-t", "Na", "Cl"])
    assert run_convert(args) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and "2 frames" in lines[0] and "3 frames" in lines[1] and "8 atoms" in lines[0]
    assert [s.nframes for s in load_systems(tmp_path / "out", type_map=["Na", "Cl"])] == [2, 3]
