"""dpmd's kernel library (csrc/): C++/OpenMP and CUDA kernels registered as `torch.ops.dpmd.*`.

    dpmd.ops.build() -> Path                compile (once; cached by source hash; progress logged) and load it
    dpmd.ops.library_path() -> Path | None  the built library for these sources, or None
    dpmd.ops.available() -> bool            loads the library if it is built; never builds it

Which implementation runs is decided once per evaluation: `resolve(tensor, first_derivative)` returns a
`Backend` (kernels / any-order kernels / linearised nets / Triton, for that device and derivative order),
which dpmd.model.forces.evaluate passes down to the model; the model only reads its fields.  The kernels
are used when all of these hold, else the pure-PyTorch reference runs:
  - the library is built (`dpmd build-ops`) and DPMD_OPS is not 0;
  - the caller only needs first derivatives (evaluate(create_graph=False); a descriptor called without a
    backend resolves one for training, the safe default): most ops' backward is not itself differentiable;
  - not inside `reference_only()` (the one public switch, for tests and benchmarks).
Training (create_graph=True: its force loss differentiates the forces again) uses the contraction ops
of dpmd.ops.contraction, which differentiate to any order, and the PyTorch reference for the rest.
When the library would be used but is not built, one line is printed once per process.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from pathlib import Path
from typing import Dict

import torch

from dpmd.ops import build as _build
from dpmd.ops.backend import REFERENCE, Backend

MISSING_WARNING = "dpmd: kernel library not built (run `dpmd build-ops`); using the PyTorch reference path"

_state = {"loaded": None, "warned": False}
_local = threading.local()


def build() -> Path:
    """Compile the library (if not already built for these sources) and load it into this process.
    Once a library is loaded, that one is returned: a process cannot register the ops twice."""
    if _state["loaded"] is not None:
        return _state["loaded"]
    path = _build.build()
    _load(path)
    return path


def library_path() -> Path | None:
    """The library this process has loaded, else the built one for these sources, else None."""
    if _state["loaded"] is not None:
        return _state["loaded"]
    path = _build.target_path()
    return path if path.is_file() else None


def disabled() -> bool:
    return os.environ.get("DPMD_OPS", "1").strip().lower() in ("0", "false", "no", "off")


def available() -> bool:
    """True when the library is built and loaded (loading it now if needed); never builds."""
    if _state["loaded"] is not None:
        return True
    if disabled():
        return False
    path = library_path()
    if path is None:
        return False
    _load(path)
    return True


def has_cuda() -> bool:
    """The loaded library has CUDA kernels (it was built against a CUDA PyTorch)."""
    return _state["loaded"] is not None and "-cuda-" in _state["loaded"].parent.name


def _load(path: Path) -> None:
    if _state["loaded"] is not None:
        return
    torch.ops.load_library(str(path))
    _state["loaded"] = path


@contextlib.contextmanager
def _flag(name: str):
    previous = getattr(_local, name, False)
    setattr(_local, name, True)
    try:
        yield
    finally:
        setattr(_local, name, previous)


def reference_only():
    """Force the PyTorch reference path inside this block, whatever is entered inside it (tests, benchmarks)."""
    return _flag("reference")


def weight_gradients_only():
    """Within this block forces are differentiated again with respect to the weights only (training's
    force loss), never the positions: the model may linearise its embedding nets (dpmd.model.network)."""
    return _flag("weights_only")


def reference_forced() -> bool:
    return getattr(_local, "reference", False) or torch.jit.is_scripting()


def linearize_embeddings(first_derivative: bool) -> bool:
    """May the model use dpmd.model.network.linearized_embedding (exact forces, no second derivatives in
    the positions)?  Yes for forces only and for training's force loss; DPMD_LINEARIZE=0 turns it off."""
    if reference_forced() or not (first_derivative or getattr(_local, "weights_only", False)):
        return False
    return os.environ.get("DPMD_LINEARIZE", "1").strip().lower() not in ("0", "false", "no", "off")


def any_order(tensor: torch.Tensor) -> bool:
    """May the current call use the kernels that differentiate to any order (dpmd.ops.contraction: training
    and second derivatives)?  Library built (with CUDA for a CUDA tensor), not inside reference_only()."""
    if reference_forced() or not available():
        return False
    return tensor.device.type == "cpu" or (tensor.is_cuda and has_cuda())


def _kernels_for(tensor: torch.Tensor | None) -> bool:
    """The library is loaded with kernels for `tensor`'s device; warns once when it is not built."""
    if available():
        return tensor is None or tensor.device.type == "cpu" or (tensor.is_cuda and has_cuda())
    if not disabled() and not _state["warned"]:
        _state["warned"] = True
        print(MISSING_WARNING, file=sys.stderr)
    return False


# ---- the backend (dpmd.ops.backend): which implementation runs, decided once per evaluation ----

def resolve(tensor: torch.Tensor, first_derivative: bool = False) -> Backend:
    """The backend of an evaluation on `tensor`'s device, from these inputs:
      first_derivative: only forces are differentiated (True), or forces are differentiated again (False:
          training's force loss, second derivatives; the default: safe for any caller);
      reference_only() (or TorchScript): the PyTorch reference, whatever else holds;
      weight_gradients_only(): the second derivative is taken in the weights only, so nets may be linearised;
      the kernel library: built and loaded, not DPMD_OPS=0, with CUDA kernels for a CUDA tensor;
      DPMD_LINEARIZE=0: never linearise; Triton importable (CUDA, compressed model, no CUDA library)."""
    if reference_forced():
        return REFERENCE._replace(forces_only=first_derivative)
    kernels = first_derivative and _kernels_for(tensor)
    linearize = linearize_embeddings(first_derivative)
    order_any = any_order(tensor)
    triton = False
    if first_derivative and tensor.is_cuda and not kernels:
        from dpmd.ops import triton_tabulate

        triton = triton_tabulate.available()
    return Backend(kernels=kernels, any_order=order_any, linearize=linearize, forces_only=first_derivative,
                   triton=triton, attention=(kernels or order_any) and tensor.device.type == "cpu")


# ---- thin wrappers around the ops (eager callers) ----

def env_rows(edge_vec: torch.Tensor, rcut_smth: float, rcut: float) -> torch.Tensor:
    """(s, s x/r, s y/r, s z/r) rows (E, 4) of edge vectors (E, 3); differentiable once."""
    return torch.ops.dpmd.env_mat(edge_vec, rcut_smth, rcut)


def contract(rows: torch.Tensor, emb: torch.Tensor, center: torch.Tensor, ncent: int) -> torch.Tensor:
    """T[c] = sum_{e: center[e] = c} rows[e]^T emb[e], (ncent, 4, M); center ascending."""
    return torch.ops.dpmd.contract(rows, emb, center, ncent)


def assemble(atom_energy, g, vec, center, neighbor, atom_frame, nframes: int, natoms: int,
             atom_virial: bool = False) -> Dict[str, torch.Tensor]:
    """What dpmd.model.forces.assemble computes, in one pass over the edges."""
    force, virial, av = torch.ops.dpmd.assemble(g, vec, center, neighbor, atom_frame, nframes, natoms,
                                                atom_virial)
    return assembled(atom_energy, atom_frame, nframes, force, virial, av, atom_virial)


def assembled(atom_energy, atom_frame, nframes: int, force, virial, av, atom_virial: bool) -> Dict[str, torch.Tensor]:
    """The outputs of dpmd.model.forces.assemble from torch.ops.dpmd.assemble's (TorchScript-compatible: the
    frozen model calls the op itself, so that its graph shows it)."""
    energy = torch.zeros([nframes], dtype=force.dtype, device=force.device).index_add(0, atom_frame, atom_energy)
    out = {"energy": energy, "atom_energy": atom_energy, "force": force, "virial": virial}
    if atom_virial:
        out["atom_virial"] = av
    return out


def neighbor_list(coord: torch.Tensor, box: torch.Tensor | None, rcut: float):
    """(center, neighbor, shift) like dpmd.geometry.neighbor.build_neighbor_list, same order."""
    return torch.ops.dpmd.neighbor_list(coord, box, rcut)
