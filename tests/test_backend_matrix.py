"""One evaluation path, every backend: layout (edge list | DeePMD's padded rows) x compressed x backend (the
PyTorch reference | the kernel library | Triton, in its CPU interpreter) x derivative order (forces | forces
differentiated again, as training's force loss and the deviation bias do).

Every cell equals the reference on the edge list to 1e-10 (Triton on a 9-atom cluster: its interpreter is
slow); the reference itself matches finite differences.
Cells that do not exist are left out: the padded layout and Triton serve forces only, and Triton only the
tabulated embedding of a compressed model.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO, make_model, triclinic_water
from dpmd import ops
from dpmd.geometry.graph import build_graph, edge_vectors
from dpmd.geometry.neighbor import padded_edges
from dpmd.model.compress import compress_model
from dpmd.model.forces import evaluate
from dpmd.ops import Backend

F64 = torch.float64
KEYS = ("energy", "atom_energy", "force", "virial")


@functools.cache
def frame():
    """About 20 atoms of water in a sheared cell (the example frame's first atoms: no data files needed)."""
    from conftest import EXAMPLE
    from dpmd.data import load_system

    s = load_system(EXAMPLE, type_map=["O", "H"])
    water = torch.tensor(s.coord[0]).reshape(-1, 3), torch.tensor(s.atype), torch.tensor(s.box[0]).reshape(3, 3)
    return triclinic_water(water, scale=0.5, seed=7)


def cluster():
    """Three O and six H of frame() in open space: a small system for Triton's (slow) CPU interpreter."""
    coord, atype, _ = frame()
    pick = torch.cat([(atype == 0).nonzero()[:3, 0], (atype == 1).nonzero()[:6, 0]])
    return coord[pick], atype[pick], None


@functools.cache
def models():
    model = make_model()
    return {False: model, True: compress_model(model, 0.9)}


def padded_graph(model, coord, atype, box, chunk=8) -> dict:
    """A padded graph (evaluate): rows grouped by type, sum(sel) slots per row in blocks of sel[t] for
    neighbour type t (dpmd.geometry.neighbor.padded_edges)."""
    graph = build_graph(coord, atype, box, model.rcut)
    rows = torch.argsort(atype, stable=True)
    vec, neighbor, overflow = padded_edges(graph["center"], graph["neighbor"], edge_vectors(graph), atype, rows,
                                           model.sel, model.rcut)
    assert not overflow.any()
    return {"rows": rows, "row_chunk": chunk, "edge_vec": vec, "neighbor": neighbor, "atype": atype,
            "box": graph["box"], "natoms": len(atype), "batch": torch.zeros(len(atype), dtype=torch.long),
            "row_type_counts": [torch.bincount(atype[rows[r:r + chunk]], minlength=2).tolist()
                                for r in range(0, len(atype), chunk)]}


def forces(model, layout, backend=None, chunk_atoms=None, system=frame):
    coord, atype, box = system()
    if layout == "padded":
        return evaluate(model, padded_graph(model, coord, atype, box), backend=backend)
    return evaluate(model, build_graph(coord, atype, box, model.rcut), backend=backend, chunk_atoms=chunk_atoms)


def second_derivatives(model):
    """d(sum F^2)/dx (positions) and the force loss's gradients in the trainable weights."""
    coord, atype, box = frame()
    x = coord.clone().requires_grad_()
    out = evaluate(model, build_graph(x, atype, box, model.rcut), create_graph=True)
    (dx,) = torch.autograd.grad((out["force"] ** 2).sum(), x)
    # a compressed model's embedding nets are its tables (buffers): the fitting net's weights are its trainable ones
    weights = list(model.fitting.parameters() if model.descriptor.compressed else model.parameters())
    with ops.weight_gradients_only():
        out = evaluate(model, build_graph(coord, atype, box, model.rcut), create_graph=True)
        grads = torch.autograd.grad((out["force"] ** 2).sum() + out["energy"].sum(), weights)
    return [dx, *grads]


def assert_same(out, ref, tol=1e-10):
    for k in KEYS:
        torch.testing.assert_close(out[k], ref[k], rtol=tol, atol=tol)


@pytest.mark.parametrize("compressed", [False, True], ids=["net", "compressed"])
def test_reference_forces_are_minus_the_energy_gradient(compressed):
    model = models()[compressed]
    coord, atype, box = frame()
    with ops.reference_only():
        out = forces(model, "edges")

        def energy(x):
            return float(evaluate(model, build_graph(x, atype, box, model.rcut))["energy"][0])

        h = 1e-5
        for i, d in ((0, 0), (3, 2), (len(atype) - 1, 1)):
            plus, minus = coord.clone(), coord.clone()
            plus[i, d] += h
            minus[i, d] -= h
            assert abs(-(energy(plus) - energy(minus)) / (2 * h) - float(out["force"][i, d])) < 1e-6


@pytest.mark.parametrize("compressed", [False, True], ids=["net", "compressed"])
@pytest.mark.parametrize("backend", ["reference", "kernels"])
@pytest.mark.parametrize("layout", ["edges", "padded"])
def test_forces(layout, backend, compressed, request):
    model = models()[compressed]
    with ops.reference_only():
        ref = forces(model, "edges")
        if backend == "reference":
            assert_same(forces(model, layout), ref)
            return
    request.getfixturevalue("lib")
    coord = frame()[0]
    assert ops.resolve(coord, first_derivative=True).kernels  # the library really runs
    assert_same(forces(model, layout), ref)
    if layout == "edges":  # chunks of atoms: the same numbers
        assert_same(forces(model, layout, chunk_atoms=5), ref)


@pytest.mark.parametrize("compressed", [False, True], ids=["net", "compressed"])
def test_second_derivatives_through_kernels(compressed, lib):
    model = models()[compressed]
    with ops.reference_only():
        ref = second_derivatives(model)
    assert ops.resolve(frame()[0], first_derivative=False).any_order
    assert all(float(g.abs().max()) > 0 for g in ref)
    for a, b in zip(second_derivatives(model), ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_reference_second_derivative_in_positions_is_the_force_gradient():
    """d(sum F^2)/dx of the reference against finite differences of sum F^2."""
    model = models()[False]
    coord, atype, box = frame()
    with ops.reference_only():
        dx = second_derivatives(model)[0]

        def f2(x):
            return float((evaluate(model, build_graph(x, atype, box, model.rcut))["force"] ** 2).sum())

        h = 1e-5
        for i, d in ((1, 0), (4, 1)):
            plus, minus = coord.clone(), coord.clone()
            plus[i, d] += h
            minus[i, d] -= h
            assert abs((f2(plus) - f2(minus)) / (2 * h) - float(dx[i, d])) < 1e-5 * max(1.0, abs(float(dx[i, d])))


TRITON_SCRIPT = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
from dpmd import ops
from dpmd.ops import Backend
from test_backend_matrix import cluster, forces, models, KEYS
model = models()[True]
with ops.reference_only():
    ref = forces(model, "edges", system=cluster)
triton = Backend(kernels=False, any_order=False, linearize=False, forces_only=True, triton=True)
calls = []
from dpmd.ops import triton_tabulate
real = triton_tabulate.tabulate_fusion
triton_tabulate.tabulate_fusion = lambda *a: calls.append(1) or real(*a)
errors = {}
for layout in ("edges", "padded"):
    out = forces(model, layout, backend=triton, system=cluster)
    errors[layout] = max(float((out[k] - ref[k]).abs().max()) for k in KEYS)
print(json.dumps({"errors": errors, "calls": len(calls)}))
"""


@pytest.fixture(scope="module")
def triton_cells():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-c", TRITON_SCRIPT, str(REPO / "tests")], env=env, capture_output=True,
                         text=True, timeout=600, cwd=REPO)
    assert res.returncode == 0, res.stderr[-2000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("layout", ["edges", "padded"])
def test_forces_compressed_triton_interpreter(layout, triton_cells):
    assert triton_cells["calls"] > 0
    assert triton_cells["errors"][layout] < 1e-10


def test_backend_is_resolved_from_the_request():
    """reference_only() wins over everything; a second derivative never gets the first-derivative kernels."""
    coord = frame()[0]
    with ops.reference_only():
        assert ops.resolve(coord, first_derivative=True) == Backend(False, False, False, True, False)
    second = ops.resolve(coord, first_derivative=False)
    assert not second.kernels and not second.forces_only and not second.linearize
    # the attention kernels (CPU only) wherever the library's kernels of either order run
    for backend in (second, ops.resolve(coord, first_derivative=True)):
        assert backend.attention == (ops.available() and (backend.kernels or backend.any_order))
    with ops.weight_gradients_only():
        assert ops.resolve(coord, first_derivative=False).linearize == (os.environ.get("DPMD_LINEARIZE", "1") != "0")
