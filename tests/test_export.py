"""The deployable (TorchScript) model: scripted == eager, ghost mode == periodic, the frozen file."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch

from conftest import DEEPMD_REF, make_model, triclinic_water
import dpmd.ops
from dpmd.geometry.graph import build_graph
from dpmd.geometry.neighbor import build_neighbor_list
from dpmd.errors import NeighborOverflowError
from dpmd.model import DeepPot, load_model, save_model
from dpmd.model.export import METADATA_FILE, script_model
from dpmd.model.forces import evaluate
from dpmd.model.io import read_metadata

pytestmark = pytest.mark.filterwarnings(r"ignore:.*torch\.jit\..*deprecated:DeprecationWarning")

KEYS = ("energy", "atom_energy", "force", "virial", "atom_virial")


@pytest.fixture(scope="module")
def scripted(model):
    return script_model(model)


def eager_reference(model, coord, atype, box):
    graph = build_graph(coord, atype, box, model.rcut)
    out = evaluate(model, graph, atom_virial=True)
    n = coord.shape[0]
    shapes = {"energy": (), "atom_energy": (n,), "force": (n, 3), "virial": (9,), "atom_virial": (n, 9)}
    return graph, {k: out[k].reshape(shapes[k]) for k in KEYS}


def assert_same(out, ref, tol):
    for k in KEYS:
        assert out[k].shape == ref[k].shape, k
        # energies are ~1e3 eV: a relative tolerance for them, absolute for the rest
        torch.testing.assert_close(out[k], ref[k], rtol=tol, atol=tol, msg=lambda m: f"{k}: {m}")


def open_cluster(water):
    coord, atype, _ = water
    keep = (coord - coord[0]).norm(dim=1) < 7.0
    return coord[keep], atype[keep], None


@pytest.mark.parametrize("case", ["periodic", "triclinic", "open"])
def test_scripted_equals_eager(model, scripted, water, case):
    coord, atype, box = {"periodic": water, "triclinic": triclinic_water(water),
                         "open": open_cluster(water)}[case]
    graph, ref = eager_reference(model, coord, atype, box)
    out = scripted(coord, atype, box, graph["center"], graph["neighbor"], graph["shift"], -1, True)
    assert_same(out, ref, 1e-12)
    # without an edge list the module searches neighbours itself (the reference search, compiled in)
    out = scripted(coord, atype, box, atom_virial=True)
    assert_same(out, ref, 1e-12)


def test_scripted_other_architectures(water):
    coord, atype, box = triclinic_water(water)
    for kw in ({"type_one_side": False}, {"resnet_dt": False}):
        model = make_model(**kw)
        _, ref = eager_reference(model, coord, atype, box)
        assert_same(script_model(model)(coord, atype, box, atom_virial=True), ref, 1e-12)


def periodic_ghosts(coord, box, rcut):
    """Wrapped local atoms followed by every periodic image within rcut of the cell: (coord, owner)."""
    inv = torch.linalg.inv(box)
    frac = coord @ inv
    frac = frac - torch.floor(frac)
    margin = rcut * inv.norm(dim=0)  # rcut in fractional units, per lattice direction
    reach = [int(m) for m in torch.ceil(margin)]
    n = coord.shape[0]
    owner, images = [torch.arange(n)], [frac]
    for s in torch.cartesian_prod(*[torch.arange(-m, m + 1) for m in reach]).to(coord.dtype):
        if (s == 0).all():
            continue
        img = frac + s
        inside = ((img > -margin) & (img < 1 + margin)).all(dim=1)
        owner.append(torch.arange(n)[inside])
        images.append(img[inside])
    return torch.cat(images) @ box, torch.cat(owner)


@pytest.mark.parametrize("case", ["periodic", "triclinic"])
def test_ghost_mode_reproduces_periodic(model, scripted, water, case):
    coord, atype, box = water if case == "periodic" else triclinic_water(water)
    _, ref = eager_reference(model, coord, atype, box)
    n = coord.shape[0]
    all_coord, owner = periodic_ghosts(coord, box, model.rcut)
    assert all_coord.shape[0] > n
    # an open-boundary list over local + ghost atoms with a 1 A skin (as LAMMPS's), local centres only
    nl = build_neighbor_list(all_coord, None, model.rcut + 1.0)
    local = nl.center < n
    out = scripted(all_coord, atype[owner], None, nl.center[local], nl.neighbor[local], None, n, True)
    assert out["atom_energy"].shape == (n,) and out["force"].shape == all_coord.shape
    torch.testing.assert_close(out["energy"], ref["energy"], rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(out["atom_energy"], ref["atom_energy"], rtol=0, atol=1e-10)
    folded = torch.zeros(n, 3, dtype=torch.float64).index_add(0, owner, out["force"])
    torch.testing.assert_close(folded, ref["force"], rtol=0, atol=1e-10)
    torch.testing.assert_close(out["virial"], ref["virial"], rtol=0, atol=1e-10)
    folded = torch.zeros(n, 9, dtype=torch.float64).index_add(0, owner, out["atom_virial"])
    torch.testing.assert_close(folded, ref["atom_virial"], rtol=0, atol=1e-10)


def test_scripted_refuses_sel_overflow_in_the_eager_text(water):
    """The frozen model's own check names the atom in the one sel-overflow text, for the model's sel and for a
    hybrid's entry's own sel within its own rcut."""
    from tests.test_descriptor_hybrid import hybrid_config

    coord, atype, box = water
    for model in (make_model(sel=(2, 4)), DeepPot(hybrid_config({"sel": [4, 24]}, {}))):
        with pytest.raises(NeighborOverflowError) as eager:
            evaluate(model, build_graph(coord, atype, box, model.rcut))
        with pytest.raises(torch.jit.Error) as frozen:
            script_model(model)(coord, atype, box)
        assert "descriptor" in str(eager.value) and "dpmd: " + str(eager.value) in str(frozen.value)


def test_frozen_file_loads_everywhere(model, water, tmp_path):
    path = tmp_path / "model.pth"
    save_model(model, path)
    assert [p.name for p in tmp_path.iterdir()] == ["model.pth"]  # written via temp + rename
    # metadata without the training config, without loading any code
    meta = read_metadata(path)
    assert meta["format"] == "dpmd-model" and meta["format_version"] == 2
    assert meta["type_map"] == ["O", "H"] and meta["rcut"] == 4.0 and meta["sel"] == [30, 60]
    assert meta["ntypes"] == 2 and meta["dpmd_version"] and meta["config"]["descriptor"]["neuron"] == [4, 8, 16]
    # TorchScript: as C++ sees it
    extra = {METADATA_FILE: ""}
    module = torch.jit.load(str(path), _extra_files=extra)
    assert json.loads(extra[METADATA_FILE]) == meta == json.loads(module.get_metadata())
    assert module.get_type_map() == ["O", "H"] and module.get_rcut() == 4.0 and module.get_sel() == [30, 60]
    # Python: the eager DeepPot, same weights and statistics
    again = load_model(path)
    assert again.type_map == model.type_map and again.sel == model.sel and again.rcut == model.rcut
    for (k, v), (k2, v2) in zip(model.state_dict().items(), again.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k
    coord, atype, box = water
    _, ref = eager_reference(model, coord, atype, box)
    assert_same(module(coord, atype, box, atom_virial=True), ref, 1e-12)
    e = again(coord, atype, box)
    assert float(e["energy"]) == float(ref["energy"])


def test_legacy_files_still_load(model, tmp_path):
    save_model(model, tmp_path / "v1.pth", deployable=False)
    assert not zipfile.ZipFile(tmp_path / "v1.pth").namelist()[0].endswith("/code/")
    again = load_model(tmp_path / "v1.pth")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    # a TorchScript file that is not a dpmd model is refused with a clear error
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(tmp_path / "other.pt"))
    from dpmd.errors import DpmdError

    with pytest.raises(DpmdError, match="not a dpmd model"):
        load_model(tmp_path / "other.pt")


def test_freeze_writes_torchscript(model, tmp_path):
    from dpmd.train.checkpoint import save_checkpoint
    from dpmd.train.freeze import freeze

    save_checkpoint({"format": "dpmd-checkpoint", "model_config": model.config, "model": model.state_dict()},
                    tmp_path / "model.ckpt", 5, keep=1)
    freeze(tmp_path, tmp_path / "frozen.pth")
    module = torch.jit.load(str(tmp_path / "frozen.pth"))
    assert module.get_type_map() == ["O", "H"]
    assert read_metadata(tmp_path / "frozen.pth")["sel"] == [30, 60]


@pytest.mark.skipif(not DEEPMD_REF.is_dir(), reason="DeePMD-kit checkpoint not available")
def test_scripted_deepmd_reference():
    ref = np.load(DEEPMD_REF / "reference.npz")
    scripted = script_model(load_model(DEEPMD_REF / "model.ckpt.pt"))
    for f in range(2):
        out = scripted(torch.tensor(ref["coord"][f]), torch.tensor(ref["atype"]), torch.tensor(ref["box"][f]))
        np.testing.assert_allclose(float(out["energy"]), ref["energy"][f], rtol=1e-12)
        np.testing.assert_allclose(out["force"].numpy(), ref["force"][f].reshape(-1, 3), atol=1e-12)
        np.testing.assert_allclose(out["virial"].numpy(), ref["virial"][f], atol=1e-10)


CPP = r"""
#include <torch/script.h>
#include <dlfcn.h>
#include <cstdio>
#include <fstream>
#include <vector>

// usage: smoke model.pth frame.txt [dpmd_ops.so]  (frame: n, box (9 numbers), then n lines "type x y z");
// a model frozen with the kernel library calls torch.ops.dpmd.*: load the library before the model
int main(int argc, char** argv) {
  if (argc > 3 && !dlopen(argv[3], RTLD_NOW | RTLD_GLOBAL)) {
    std::fprintf(stderr, "cannot load %s: %s\n", argv[3], dlerror());
    return 2;
  }
  torch::jit::ExtraFilesMap extra{{"dpmd.json", ""}};
  torch::jit::Module m = torch::jit::load(argv[1], torch::kCPU, extra);
  std::ifstream in(argv[2]);
  int64_t n;
  in >> n;
  std::vector<double> box(9), xyz(3 * n);
  std::vector<int64_t> types(n);
  for (auto& b : box) in >> b;
  for (int64_t i = 0; i < n; ++i) in >> types[i] >> xyz[3 * i] >> xyz[3 * i + 1] >> xyz[3 * i + 2];
  auto f64 = torch::TensorOptions().dtype(torch::kFloat64);
  auto coord = torch::from_blob(xyz.data(), {n, 3}, f64).clone();
  auto cell = torch::from_blob(box.data(), {3, 3}, f64).clone();
  auto atype = torch::from_blob(types.data(), {n}, torch::TensorOptions().dtype(torch::kInt64)).clone();
  auto nl = m.get_method("neighbor_list")({coord, cell}).toTuple();
  auto out = m.forward({coord, atype, cell, nl->elements()[0], nl->elements()[1], nl->elements()[2]}).toGenericDict();
  auto force = out.at("force").toTensor();
  std::printf("%zu %.17g %.17g %.17g %.17g\n", extra["dpmd.json"].size(), m.get_method("get_rcut")({}).toDouble(),
              out.at("energy").toTensor().item<double>(), force[0][0].item<double>(),
              out.at("virial").toTensor()[4].item<double>());
  return 0;
}
"""


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler")
def test_cpp_loads_frozen_model(model, water, tmp_path):
    """A libtorch program (torch's own headers and libraries) loads the frozen file and agrees with Python."""
    tdir = os.path.dirname(torch.__file__)
    (tmp_path / "smoke.cpp").write_text(CPP)
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    cmd = ["c++", "-std=c++20", "-O1", "smoke.cpp", f"-I{tdir}/include", f"-I{tdir}/include/torch/csrc/api/include",
           f"-D_GLIBCXX_USE_CXX11_ABI={abi}", f"-L{tdir}/lib", "-ltorch", "-ltorch_cpu", "-lc10",
           f"-Wl,-rpath,{tdir}/lib", "-ldl", "-o", "smoke"]
    res = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot build against libtorch: {res.stderr[-500:]}")
    coord, atype, box = water
    with open(tmp_path / "frame.txt", "w") as fh:
        fh.write(f"{coord.shape[0]}\n" + " ".join(f"{x:.17g}" for x in box.reshape(-1).tolist()) + "\n")
        for t, (x, y, z) in zip(atype.tolist(), coord.tolist()):
            fh.write(f"{t} {x:.17g} {y:.17g} {z:.17g}\n")
    save_model(model, tmp_path / "model.pth")
    args = ["./smoke", "model.pth", "frame.txt"]
    if read_metadata(tmp_path / "model.pth").get("ops_library"):
        args.append(str(dpmd.ops.library_path()))
    res = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr
    meta_len, rcut, energy, f0x, v4 = (float(x) for x in res.stdout.split())
    _, ref = eager_reference(model, coord, atype, box)
    assert meta_len > 100 and rcut == 4.0
    assert abs(energy - float(ref["energy"])) < 1e-10
    assert abs(f0x - float(ref["force"][0, 0])) < 1e-12 and abs(v4 - float(ref["virial"][4])) < 1e-10


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
