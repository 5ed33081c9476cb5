"""Frozen model files are read without running their code: load_model never calls torch.jit.load (which
compiles the archive's TorchScript and runs any __setstate__ in it); the weights come from data.pkl through a
restricted unpickler and equal what torch.jit.load's state_dict() gives."""

from __future__ import annotations

import json
import os
import pickle
import pickletools
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Dict, Tuple

import pytest
import torch

from conftest import DEEPMD_REF, REPO, make_model
from dpmd import ops
from dpmd.errors import DpmdError
from dpmd.model import load_model, save_model
from dpmd.model.compress import compress_model
from dpmd.model.export import METADATA_FILE, model_metadata
from dpmd.model.io import _read_weights, read_metadata

pytestmark = pytest.mark.filterwarnings(r"ignore:.*torch\.jit\..*deprecated:DeprecationWarning")

EXAMPLE_MODEL = REPO / "examples" / "water" / "model_small.pth"
DEEPMD_CKPT = DEEPMD_REF / "model.ckpt.pt"
TRAP = "TRAP: the archive's code ran"


@pytest.fixture(scope="module")
def frozen(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("safety") / "model.pth"
    save_model(make_model(), path)
    return path


def _frozen(kind: str, folder: Path) -> Path:
    if kind == "example":
        path = EXAMPLE_MODEL
    else:
        if kind == "deepmd-kit" and not DEEPMD_CKPT.is_file():
            pytest.skip(f"{DEEPMD_CKPT} not present")
        model = {"small": make_model, "float32": lambda: make_model(precision="float32"),
                 "compressed": lambda: compress_model(make_model(), min_nbor_dist=0.9),
                 "deepmd-kit": lambda: load_model(DEEPMD_CKPT)}[kind]()
        path = folder / f"{kind}.pth"
        save_model(model, path)
    if read_metadata(path).get("ops_library") and not ops.available():
        pytest.skip("torch.jit.load of this file needs the kernel library, which is not built here")
    return path


def _archive_state(path: Path) -> dict:
    with zipfile.ZipFile(path) as zf:
        return _read_weights(path, zf, zf.namelist()[0].partition("/")[0])


def _rezip(src: Path, dst: Path, edits: dict) -> None:
    """Copy an archive, replacing the entries named in `edits` (by their path below the archive's folder) with
    edit(bytes) -> bytes, or dropping them where the edit gives None; CRCs stay valid."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for item in zin.infolist():
            edit = edits.get(item.filename.partition("/")[2])
            data = zin.read(item.filename) if edit is None else edit(zin.read(item.filename))
            if data is not None:
                zout.writestr(item, data)


def _refusal(path: Path) -> str:
    with pytest.raises(DpmdError) as err:
        load_model(path)
    message = str(err.value)
    assert "\n" not in message and str(path) in message and "refusing to load it" in message, message
    return message


@pytest.mark.parametrize("kind", ["small", "compressed", "float32", "example", "deepmd-kit"])
def test_weights_equal_those_of_torch_jit_load(kind, tmp_path):
    path = _frozen(kind, tmp_path)
    expected = torch.jit.load(str(path), map_location="cpu").state_dict()
    ours = _archive_state(path)
    assert list(ours) == list(expected)  # names and order
    for name, tensor in expected.items():
        got = ours[name]
        assert (got.dtype, got.shape, got.stride()) == (tensor.dtype, tensor.shape, tensor.stride()), name
        assert torch.equal(got, tensor), name
    loaded = load_model(path)  # its non-persistent buffers are rebuilt from the config, equal to the archive's too
    torch.testing.assert_close({**dict(loaded.named_parameters()), **dict(loaded.named_buffers())}, expected,
                               rtol=0, atol=0)


def test_load_model_never_calls_torch_jit_load(frozen, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("torch.jit.load was called")

    monkeypatch.setattr(torch.jit, "load", refuse)
    monkeypatch.setattr(torch._C, "import_ir_module", refuse)
    torch.testing.assert_close(load_model(frozen).state_dict(), make_model().state_dict(), rtol=0, atol=0)


class _Calls:
    """Pickles as the call func(*args), as a data.pkl crafted to run code would."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


@pytest.mark.parametrize("func", [os.system, eval], ids=["os.system", "builtins.eval"])
def test_data_pkl_referring_to_other_code_is_refused(frozen, tmp_path, func):
    target = tmp_path / "pwned"
    payload = _Calls(func, f"touch {target}" if func is os.system else f"open({str(target)!r}, 'w')")
    bad = tmp_path / "bad.pth"
    _rezip(frozen, bad, {"data.pkl": lambda data: pickle.dumps(payload, protocol=2, fix_imports=False)})
    message = _refusal(bad)
    assert f"refers to the Python object {func.__module__}.{func.__name__}" in message, message
    assert not target.exists()


def _first_storage_numel(numel: int):
    """An edit of data.pkl: the first storage's declared size becomes `numel` (its persistent id is
    ('storage', type, key, location, numel) TUPLE BINPERSID)."""
    def edit(data: bytes) -> bytes:
        ops_ = list(pickletools.genops(data))
        i = next(k for k, (op, _, _) in enumerate(ops_) if op.name == "BINPERSID")
        op, _, pos = ops_[i - 2]
        assert op.name == "BININT1" and ops_[i - 1][0].name == "TUPLE"
        return data[:pos + 1] + bytes([numel]) + data[pos + 2:]
    return edit


# the small model's first storage, data/0, is descriptor.mean: 2 x 4 float64 values, 64 bytes
BAD_ARCHIVES = {
    "missing record": ({"data/0": lambda data: None}, "refers to the record data/0, which the archive lacks"),
    "short record": ({"data/0": lambda data: data[:32]}, "record data/0 holds 32 bytes, not the 8 "),
    "view beyond storage": ({"data/0": lambda data: data[:32], "data.pkl": _first_storage_numel(4)},
                            "tensor of size [2, 4], stride [4, 1] and offset 0 beyond its storage data/0 of 4 values"),
    "no module": ({"data.pkl": lambda data: pickle.dumps({"descriptor.mean": 1.0}, protocol=2)},
                  "does not hold a TorchScript module"),
    "truncated pickle": ({"data.pkl": lambda data: data[:len(data) // 2]}, "unreadable data.pkl"),
    "no data.pkl": ({"data.pkl": lambda data: None}, "unreadable data.pkl (KeyError"),
}


@pytest.mark.parametrize("case", BAD_ARCHIVES)
def test_unexpected_data_pkl_is_one_line(frozen, tmp_path, case):
    edits, expected = BAD_ARCHIVES[case]
    bad = tmp_path / "bad.pth"
    _rezip(frozen, bad, edits)
    assert expected in _refusal(bad)


# ---- an archive whose TorchScript code has a side effect when loaded: torch.jit.load runs it, dpmd does not

class _DictTrap(torch.nn.Module):
    """Its __setstate__ (run by torch.jit.load) prints; its state is a dict, as plain modules' is."""

    def __init__(self):
        super().__init__()
        self.count = 7

    @torch.jit.export
    def __getstate__(self) -> Dict[str, int]:
        return {"count": self.count, "training": int(self.training)}

    @torch.jit.export
    def __setstate__(self, state: Dict[str, int]) -> None:
        print("TRAP: the archive's code ran")
        self.count = state["count"]
        self.training = bool(state["training"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class _TupleTrap(torch.nn.Module):
    """As _DictTrap, with a state that only its own __setstate__ could interpret."""

    def __init__(self):
        super().__init__()
        self.count = 7

    @torch.jit.export
    def __getstate__(self) -> Tuple[int, bool]:
        return self.count, self.training

    @torch.jit.export
    def __setstate__(self, state: Tuple[int, bool]) -> None:
        print("TRAP: the archive's code ran")
        self.count = state[0]
        self.training = state[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class _Host(torch.nn.Module):
    """A dpmd model's descriptor and fitting net beside a trap."""

    def __init__(self, model, trap):
        super().__init__()
        self.descriptor = model.descriptor
        self.fitting = model.fitting
        self.trap = trap

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.trap(x)


@pytest.mark.parametrize("trap", [_DictTrap, _TupleTrap])
def test_archive_code_is_never_run(trap, tmp_path, capfd):
    model = make_model()
    path = tmp_path / "trap.pth"
    torch.jit.save(torch.jit.script(_Host(model, trap())), str(path),
                   _extra_files={METADATA_FILE: json.dumps(model_metadata(model))})
    capfd.readouterr()
    torch.jit.load(str(path))  # torch runs the archive's __setstate__ while loading ...
    assert TRAP in capfd.readouterr().out
    if trap is _DictTrap:  # ... dpmd reads the weights and leaves the code alone
        torch.testing.assert_close(load_model(path).state_dict(), model.state_dict(), rtol=0, atol=0)
    else:
        assert "its module trap (__torch__.test_model_file_safety._TupleTrap) was saved by its own __getstate__" \
            in _refusal(path)
    assert TRAP not in capfd.readouterr().out


LOAD_WITHOUT_LIBRARY = """
import sys, torch
from dpmd import ops
from dpmd.model import load_model
coord, atype, box = torch.load(sys.argv[2])
print("available", ops.available(), "energy", repr(float(load_model(sys.argv[1])(coord, atype, box)["energy"])))
"""


@pytest.mark.skipif(not ops.available(), reason="kernel library not built (dpmd build-ops)")
def test_model_frozen_with_the_kernel_library_loads_without_it(frozen, water, tmp_path):
    assert read_metadata(frozen)["ops_library"] is True  # torch.jit.load would need the library
    torch.save(water, tmp_path / "water.pt")
    proc = subprocess.run([sys.executable, "-c", LOAD_WITHOUT_LIBRARY, str(frozen), str(tmp_path / "water.pt")],
                          capture_output=True, text=True, cwd=REPO, timeout=300,
                          env={**os.environ, "DPMD_OPS": "0", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    available, energy = proc.stdout.split()[1::2]
    assert available == "False"
    with ops.reference_only():
        assert float(energy) == pytest.approx(float(make_model()(*water)["energy"]), abs=1e-9)
