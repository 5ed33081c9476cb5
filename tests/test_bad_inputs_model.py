"""Bad inputs to the model, inference, compression and data-reading side (issue 16): every one is a one-line
DpmdError naming the culprit, nothing half-written is left behind, and no file runs code when loaded."""

from __future__ import annotations

import errno
import json
import shutil
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from ase import Atoms

from dpmd.calculator import DP
from dpmd.cli import main
from dpmd.data import System, load_system, write_system
from dpmd.data.system import find_close_pair
from dpmd.errors import DataError, DpmdError
from dpmd.model import DeepPot, load_model, save_model
from dpmd.model.compress import compress_model
from dpmd.model.export import METADATA_FILE, weights_checksum
from dpmd.model.io import atomic_torch_save, read_metadata
from tests.conftest import DEEPMD_REF, EXAMPLE, REPO, make_model, small_config

pytestmark = pytest.mark.filterwarnings(r"ignore:.*torch\.jit\..*deprecated:DeprecationWarning")


def one_line(message: str) -> str:
    message = message.strip()
    assert "\n" not in message and "Traceback" not in message, message
    return message


# ---------------------------------------------------------------------------------------------- model files

@pytest.fixture(scope="module")
def frozen(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("frozen") / "model.pth"
    save_model(make_model(), path)
    return path


def _local_data_offset(raw: bytes, info: zipfile.ZipInfo) -> int:
    """Where an entry's bytes start: after its local header, whose name and extra lengths are its own."""
    start = info.header_offset
    name_len = int.from_bytes(raw[start + 26:start + 28], "little")
    extra_len = int.from_bytes(raw[start + 28:start + 30], "little")
    return start + 30 + name_len + extra_len


def _largest_weight(zf: zipfile.ZipFile) -> zipfile.ZipInfo:
    return max((i for i in zf.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)


def _rezip(src: Path, dst: Path, edit) -> None:
    """Copy a zip archive entry by entry, edit(name, bytes) -> bytes: valid CRCs, changed content."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for item in zin.infolist():
            zout.writestr(item, edit(item.filename, zin.read(item.filename)))


class WritesAFile:
    """A pickle that creates a file when loaded, as a malicious checkpoint would run code."""

    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return open, (self.target, "w")


def _flip_raw_byte(frozen: Path, out: Path) -> None:
    raw = bytearray(frozen.read_bytes())
    with zipfile.ZipFile(frozen) as zf:
        info = _largest_weight(zf)
    raw[_local_data_offset(bytes(raw), info) + info.file_size // 2] ^= 0x01
    out.write_bytes(bytes(raw))


def _edit_weight(frozen: Path, out: Path) -> None:
    with zipfile.ZipFile(frozen) as zf:
        target = _largest_weight(zf).filename

    def edit(name, data):
        if name != target:
            return data
        data = bytearray(data)
        data[len(data) // 2] ^= 0x01
        return bytes(data)

    _rezip(frozen, out, edit)


def _nan_weights(frozen: Path, out: Path) -> None:
    model = make_model()
    with torch.no_grad():
        model.fitting.energy_bias[1] = float("nan")
    save_model(model, out)


def _edited_v1_dict(frozen: Path, out: Path) -> None:
    save_model(make_model(), out, deployable=False)
    blob = torch.load(out, weights_only=True)
    blob["state_dict"]["descriptor.std"][0, 0] *= 1.5
    torch.save(blob, out)


def _torchscript_not_dpmd(frozen: Path, out: Path) -> None:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(out))


BAD_MODEL_FILES = {
    "empty": (lambda f, out: out.write_bytes(b""), "empty file (0 bytes)"),
    "truncated": (lambda f, out: out.write_bytes(f.read_bytes()[: f.stat().st_size // 2]), "truncated or corrupt"),
    "garbage": (lambda f, out: out.write_bytes(np.random.default_rng(0).bytes(4000)), "not a PyTorch file"),
    "text": (lambda f, out: out.write_text("type_map: [O, H]\n"), "not a PyTorch file"),
    "code": (lambda f, out: torch.save({"model": WritesAFile(out.with_name("pwned"))}, out),
             "loading it would run code; refusing"),
    "numpy array": (lambda f, out: torch.save({"model": np.zeros(3)}, out), "loading it would run code; refusing"),
    "flipped byte": (_flip_raw_byte, "fails its CRC check"),
    "edited weight": (_edit_weight, "differ from the checksum recorded"),
    "edited v1 dict": (_edited_v1_dict, "differ from the checksum recorded"),
    "nan weights": (_nan_weights, "fitting.energy_bias holds NaN or inf"),
    "md checkpoint": (lambda f, out: torch.save({"format": "dpmd-md-checkpoint", "state": {}}, out),
                      "'dpmd-md-checkpoint' file"),
    "a list": (lambda f, out: torch.save([1, 2], out), "holds a list"),
    "other torchscript": (_torchscript_not_dpmd, "not a dpmd model"),
}


def _md_input(tmp_path: Path, model, steps: int = 1) -> Path:
    cfg = {"structure": {"system": str(EXAMPLE), "frame": 0}, "models": [str(model)], "steps": steps,
           "thermo_freq": 1, "traj_freq": 0, "checkpoint_freq": 0, "output_dir": str(tmp_path / "md_out")}
    path = tmp_path / "md.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _error_of(entry: str, path: Path, tmp_path: Path, capsys) -> str:
    """The one-line error of an entry point given the model file `path`."""
    if entry in ("load_model", "DP"):
        with pytest.raises(DpmdError) as err:
            load_model(path) if entry == "load_model" else DP(str(path))
        return one_line(str(err.value))
    argv = (["md", str(_md_input(tmp_path, path))] if entry == "md"
            else ["test", "-m", str(path), "-s", str(EXAMPLE), "-n", "1"])
    assert main(argv) == 1
    out = capsys.readouterr()
    assert out.err.startswith(f"dpmd {entry}: error: ")
    return one_line(out.err)


@pytest.mark.parametrize("entry", ["load_model", "DP", "md", "test"])
@pytest.mark.parametrize("case", BAD_MODEL_FILES)
def test_bad_model_file_is_one_line_naming_it(frozen, tmp_path, capsys, case, entry):
    make, expected = BAD_MODEL_FILES[case]
    path = tmp_path / "bad.pth"
    make(frozen, path)
    message = _error_of(entry, path, tmp_path, capsys)
    assert str(path) in message and expected in message, message
    assert not (tmp_path / "pwned").exists()  # nothing was unpickled
    assert not (tmp_path / "md_out").exists()  # md checks its models before creating its output folder


@pytest.mark.parametrize("case, expected", [("empty", "empty file"), ("truncated", "truncated or corrupt"),
                                            ("garbage", "not a PyTorch file"), ("code", "would run code; refusing"),
                                            ("a list", "not a dpmd md checkpoint")])
def test_bad_md_restart_file_is_one_line_naming_it(frozen, tmp_path, capsys, case, expected):
    make = BAD_MODEL_FILES[case][0]
    path = tmp_path / "checkpoint.pt"
    make(frozen, path)
    assert main(["md", str(_md_input(tmp_path, frozen)), "--restart", str(path)]) == 1
    message = one_line(capsys.readouterr().err)
    assert str(path) in message and expected in message, message
    assert not (tmp_path / "pwned").exists()


def test_md_with_a_bad_structure_creates_no_output_folder(frozen, tmp_path, capsys):
    cfg = yaml.safe_load(_md_input(tmp_path, frozen).read_text())
    cfg["structure"] = str(tmp_path / "missing.xyz")
    (tmp_path / "md.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["md", str(tmp_path / "md.yaml")]) == 1
    assert "missing.xyz: file not found" in one_line(capsys.readouterr().err)
    assert not (tmp_path / "md_out").exists()


def test_checksum_is_recorded_and_files_without_one_still_load(frozen, tmp_path):
    meta = read_metadata(frozen)
    model = load_model(frozen)
    assert meta["weights_sha256"] == weights_checksum(model.state_dict()) == weights_checksum(make_model().state_dict())

    def drop_checksum(name, data):  # a file written before checksums existed
        if not name.endswith("/extra/" + METADATA_FILE):
            return data
        return json.dumps({k: v for k, v in json.loads(data).items() if k != "weights_sha256"}).encode()

    old = tmp_path / "old.pth"
    _rezip(frozen, old, drop_checksum)
    assert "weights_sha256" not in read_metadata(old)
    torch.testing.assert_close(load_model(old).state_dict(), model.state_dict(), rtol=0, atol=0)


def test_checksum_sees_every_bit():
    state = make_model().state_dict()
    before = weights_checksum(state)
    flat = state["descriptor.std"].view(-1).view(torch.int64)
    flat[3] ^= 1  # the lowest mantissa bit of one number
    assert weights_checksum(state) != before


@pytest.mark.parametrize("path", [REPO / "examples" / "water" / "model_small.pth",
                                  DEEPMD_REF / "model.ckpt.pt"], ids=["example", "deepmd-kit"])
def test_shipped_model_files_still_load(path):
    if not path.is_file():
        pytest.skip(f"{path} not present")
    assert load_model(path).type_map == ["O", "H"]


# ---------------------------------------------------------------------------------------------- training checkpoints

@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """The checkpoint of a real 2-step training run."""
    from dpmd.train.config import normalize_input
    from dpmd.train.trainer import Trainer
    from tests.test_train import small_input

    out = tmp_path_factory.mktemp("train")
    cfg = small_input(out, steps=2, save_freq=2, disp_freq=1)
    cfg["training"].pop("validation_data")
    Trainer(normalize_input(cfg), out_dir=out, progress=False).run()
    return out / "model.ckpt.pt"


def test_training_checkpoint_loads_for_inference(trained, water):
    blob = torch.load(trained, weights_only=True)
    model = load_model(trained)
    torch.testing.assert_close(model.state_dict(), blob["model"], rtol=0, atol=0)
    reference = DeepPot(blob["model_config"])
    reference.load_state_dict(blob["model"])
    coord, atype, box = water
    atoms = Atoms(["O" if t == 0 else "H" for t in atype.tolist()], positions=coord.numpy(), cell=box.numpy(), pbc=True)
    atoms.calc = DP(str(trained))
    assert atoms.get_potential_energy() == pytest.approx(float(reference(coord, atype, box)["energy"]), abs=1e-9)


def test_training_checkpoint_runs_md_and_test(trained, tmp_path, capsys):
    assert main(["test", "-m", str(trained), "-s", str(EXAMPLE), "-n", "1"]) == 0
    assert main(["md", str(_md_input(tmp_path, trained, steps=2))]) == 0
    assert "md: 2 steps" in capsys.readouterr().err  # (logged: stderr)
    assert (tmp_path / "md_out" / "checkpoint.pt").is_file()


# ---------------------------------------------------------------------------------------------- atomic writes

def _failing_save(error):
    def save(obj, fh, *args, **kwargs):
        fh.write(b"x" * 4096)  # half-written, then the disk is full
        raise error
    return save


FULL_DISK = {
    "ENOSPC": OSError(errno.ENOSPC, "No space left on device"),
    "torch zip writer": RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 4160 vs 4096"),
}


@pytest.mark.parametrize("case", FULL_DISK)
def test_full_disk_keeps_the_previous_file(tmp_path, monkeypatch, case):
    path = tmp_path / "state.pt"
    atomic_torch_save({"step": 1}, path)
    before = path.read_bytes()
    monkeypatch.setattr(torch, "save", _failing_save(FULL_DISK[case]))
    monkeypatch.setattr(shutil, "disk_usage", lambda p: SimpleNamespace(total=10 << 30, used=10 << 30, free=0))
    with pytest.raises(DpmdError) as err:
        atomic_torch_save({"step": 2}, path)
    assert one_line(str(err.value)) == f"writing {path} failed: no space left on device (0.0 MB free in {tmp_path})"
    assert path.read_bytes() == before and sorted(tmp_path.iterdir()) == [path]


def test_other_write_failures_give_their_own_reason(tmp_path, monkeypatch):
    path = tmp_path / "state.pt"
    monkeypatch.setattr(torch, "save", _failing_save(OSError(errno.EIO, "Input/output error")))
    with pytest.raises(DpmdError) as err:
        atomic_torch_save({"step": 2}, path)
    assert one_line(str(err.value)) == f"writing {path} failed: Input/output error"
    assert list(tmp_path.iterdir()) == []


def test_full_disk_during_a_training_checkpoint_keeps_the_earlier_ones(tmp_path, monkeypatch):
    from dpmd.train.checkpoint import save_checkpoint

    prefix = tmp_path / "model.ckpt"
    for step in (1, 2):
        save_checkpoint({"format": "dpmd-checkpoint", "step": step, "model": {"w": torch.full((64,), float(step))}},
                        prefix, step, keep=5)
    files = {p.name: p.read_bytes() for p in tmp_path.iterdir() if not p.is_symlink()}
    monkeypatch.setattr(torch, "save", _failing_save(OSError(errno.ENOSPC, "No space left on device")))
    with pytest.raises(DpmdError, match=r"model\.ckpt-3\.pt failed: no space left on device \(.* MB free in "):
        save_checkpoint({"format": "dpmd-checkpoint", "step": 3, "model": {}}, prefix, 3, keep=5)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if not p.is_symlink()} == files
    assert (tmp_path / "model.ckpt.pt").resolve().name == "model.ckpt-2.pt"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp file left


# ---------------------------------------------------------------------------------------------- the ASE calculator

def test_empty_atoms_give_zero(model):
    for atoms in (Atoms(), Atoms(cell=[5, 5, 5], pbc=True)):
        atoms.calc = DP(model)
        assert atoms.get_potential_energy() == 0.0
        assert atoms.get_forces().shape == (0, 3)
        if atoms.pbc.all():
            assert np.array_equal(atoms.get_stress(), np.zeros(6))


def _water(**kw):
    return Atoms("OHH", positions=[[1.0, 1.0, 1.0], [1.96, 1.0, 1.0], [1.0, 1.96, 1.0]], **kw)


def _with(atoms, index, position):
    atoms.positions[index] = position
    return atoms


BAD_ATOMS = {
    "nan position": (lambda: _with(_water(), 2, [np.nan, 0, 0]), "atom 2 has a non-finite position"),
    "inf position": (lambda: _with(_water(cell=[9, 9, 9], pbc=True), 1, [np.inf, 0, 0]),
                     "atom 1 has a non-finite position"),
    "inf cell": (lambda: _water(cell=[9, 9, np.inf], pbc=True), "cell holds non-finite values"),
    "flat cell": (lambda: _water(cell=[9, 9, 0], pbc=True), "has volume 0"),
    "same spot": (lambda: _with(_water(), 2, [1.96, 1.0, 1.0]), "atoms 1 and 2 are 0 Å apart"),
    "periodic image": (lambda: _with(_water(cell=[9, 9, 9], pbc=True), 2, [9.98, 1.0, 1.0]),
                       "atoms 0 and 2 are 0.02 Å apart (periodic image)"),
}


@pytest.mark.parametrize("case", BAD_ATOMS)
def test_bad_atoms_name_the_atom(model, case):
    make, expected = BAD_ATOMS[case]
    atoms = make()
    atoms.calc = DP(model)
    with pytest.raises(DpmdError) as err:
        atoms.get_potential_energy()
    assert expected in one_line(str(err.value))


def test_non_finite_model_output_names_the_atom():
    model = make_model()
    with torch.no_grad():
        model.fitting.energy_bias[1] = float("nan")  # every H atom
    atoms = _water(cell=[9, 9, 9], pbc=True)
    atoms.calc = DP(model)
    with pytest.raises(DpmdError, match=r"non-finite energy or force at atom 1 \(H\)"):
        atoms.get_potential_energy()


# ---------------------------------------------------------------------------------------------- the data reader

def _system(nframes=3, natoms=6, pbc=True) -> System:
    rng = np.random.default_rng(0)
    grid = np.stack(np.meshgrid(*[np.arange(2)] * 3, indexing="ij"), -1).reshape(-1, 3)[:natoms] * 2.5 + 1.0
    return System(path="mem", type_map=["O", "H"], atype=np.arange(natoms) % 2,
                  coord=grid + rng.normal(scale=0.1, size=(nframes, natoms, 3)),
                  box=np.tile(np.eye(3) * 6.0, (nframes, 1, 1)) if pbc else None,
                  energy=rng.normal(size=nframes), force=rng.normal(size=(nframes, natoms, 3)),
                  virial=rng.normal(size=(nframes, 3, 3)))


def _set(system, key, frame, index, value):
    getattr(system, key)[(frame, *index)] = value
    return system


BAD_DATA = {
    "nan coord": (lambda s: _set(s, "coord", 2, (4, 1), np.nan),
                  "set.000/coord.npy: frame 2, atom 4 holds a non-finite"),
    "inf force": (lambda s: _set(s, "force", 1, (3, 0), -np.inf),
                  "set.000/force.npy: frame 1, atom 3 holds a non-finite"),
    "nan energy": (lambda s: _set(s, "energy", 1, (), np.nan), "set.000/energy.npy: frame 1 holds a non-finite"),
    "inf virial": (lambda s: _set(s, "virial", 0, (2, 2), np.inf), "set.000/virial.npy: frame 0 holds a non-finite"),
    "nan box": (lambda s: _set(s, "box", 2, (0, 1), np.nan), "set.000/box.npy: frame 2 holds a non-finite"),
    "same spot": (lambda s: _set(s, "coord", 1, (5,), s.coord[1, 2]),
                  "set.000/coord.npy: frame 1: atoms 2 and 5 are 0 Å"),
    "periodic image": (lambda s: _set(_set(s, "coord", 2, (0,), [0.01, 3.0, 3.0]), "coord", 2, (3,), [5.97, 3.0, 3.0]),
                       "frame 2: atoms 0 and 3 are 0.04 Å apart (periodic image)"),
}


@pytest.mark.parametrize("case, pbc", [pytest.param(case, pbc, id=f"{case}-{'periodic' if pbc else 'open'}")
                                       for case in BAD_DATA for pbc in (True, False)
                                       if pbc or case not in ("nan box", "periodic image")])
def test_bad_data_names_system_file_frame_and_atoms(tmp_path, case, pbc):
    breaker, expected = BAD_DATA[case]
    write_system(breaker(_system(pbc=pbc)), tmp_path / "sys")
    with pytest.raises(DataError) as err:
        load_system(tmp_path / "sys")
    message = one_line(str(err.value))
    assert str(tmp_path / "sys") in message and expected in message, message


def test_clean_data_loads(tmp_path):
    write_system(_system(), tmp_path / "sys")
    assert load_system(tmp_path / "sys").nframes == 3


def test_close_pairs_match_brute_force():
    """Random (triclinic, wrapped or not) frames with a planted close pair or none: the grid finds a pair
    exactly when there is one, and its reported distance is the true minimum-image distance."""
    rng = np.random.default_rng(1)
    images = np.array(np.meshgrid(*[np.arange(-4, 5)] * 3, indexing="ij")).reshape(3, -1).T  # enough for |frac| < 3
    for trial in range(150):
        nf, n, d = int(rng.integers(1, 4)), int(rng.integers(2, 25)), float(rng.choice([0.1, 0.4]))
        box = None
        if trial % 3:
            box = np.stack([np.diag(rng.uniform(1.0, 4.0, 3)) + rng.uniform(-0.8, 0.8, (3, 3)) for _ in range(nf)])
            coord = np.einsum("fni,fij->fnj", rng.uniform(-0.5, 1.5, (nf, n, 3)), box)
        else:
            coord = rng.uniform(-3, 3, (nf, n, 3))
        if rng.random() < 0.6:
            f, (i, j) = rng.integers(nf), rng.choice(n, 2, replace=False)
            lattice = box[f, rng.integers(3)] if box is not None else 0  # maybe through the boundary
            coord[f, j] = coord[f, i] + rng.normal(size=3) * 0.4 * d + lattice
        diff = coord[:, None, :, :] - coord[:, :, None, :]  # (F, N, N, 3): x_j - x_i
        shifts = np.zeros((1, 1, 3)) if box is None else images @ box  # (F or 1, images, 3)
        dist = np.linalg.norm(diff[:, :, :, None, :] + shifts[:, None, None, :, :], axis=-1).min(-1)
        dist[:, np.arange(n), np.arange(n)] = np.inf
        found = find_close_pair(coord, box, d)
        assert (found is not None) == bool((dist < d).any()), trial
        if found is not None:
            f, i, j, r, _ = found
            assert i < j and r < d and r == pytest.approx(dist[f, i, j], abs=1e-9), trial


# ---------------------------------------------------------------------------------------------- compression

def _no_statistics():
    return DeepPot(small_config())


def _zero_std():
    model = make_model()
    model.descriptor.std[1, 2] = 0.0
    return model


def _nan_weight():
    model = make_model()
    with torch.no_grad():
        model.descriptor.embeddings[0].layers[1].bias[0] = float("nan")  # in-memory: load_model would refuse it
    return model


BAD_COMPRESS = {
    "step 1e-9": (make_model, {"step": 1e-9}, "needs 1.91e+10 table intervals"),
    "tiny step": (make_model, {"step": 1e-300}, "the limit is 1 GiB: use --step >= 2.8e-05"),
    "huge extrapolate": (make_model, {"extrapolate": 1e308}, "use a smaller --extrapolate"),
    "min_nbor_dist > rcut": (make_model, {"min_nbor_dist": 5.0}, "below the model's rcut 4.0 Å, got 5.0"),
    "min_nbor_dist 0": (make_model, {"min_nbor_dist": 0.0}, "min_nbor_dist must be > 0 Å"),
    "std 0": (_zero_std, {}, "descriptor std of type H (column 2) is 0"),
    "no statistics": (_no_statistics, {}, "no data statistics (descriptor mean 0 and std 1"),
    "nan weight": (_nan_weight, {}, "descriptor.embeddings.0.layers.1.bias holds NaN or inf"),
}


@pytest.mark.parametrize("case", BAD_COMPRESS)
def test_bad_compression_is_one_line(case):
    make, kwargs, expected = BAD_COMPRESS[case]
    kwargs = {"min_nbor_dist": 0.9, **kwargs}
    with pytest.raises(DpmdError) as err:
        compress_model(make(), **kwargs)
    assert expected in one_line(str(err.value))


@pytest.mark.parametrize("case", ["step 1e-9", "min_nbor_dist > rcut", "std 0", "no statistics"])
def test_bad_compression_cli_writes_nothing(tmp_path, capsys, case):
    make, kwargs, expected = BAD_COMPRESS[case]
    kwargs = {"min_nbor_dist": 0.9, **kwargs}
    save_model(make(), tmp_path / "in.pth")
    argv = ["compress", "-i", str(tmp_path / "in.pth"), "-o", str(tmp_path / "out.pth"),
            "--min-nbor-dist", str(kwargs.pop("min_nbor_dist"))]
    for key, value in kwargs.items():
        argv += [f"--{key}", str(value)]
    assert main(argv) == 1
    assert expected in one_line(capsys.readouterr().err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.pth"]
