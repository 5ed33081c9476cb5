"""The deployable (TorchScript) form of a DeepPot: what `dpmd freeze` writes and C++ (libtorch) loads.

`FrozenDeepPot` wraps a model's descriptor and fitting net (sharing their weights) in a
module that `torch.jit.script` compiles; its forward is the whole inference path,
derivatives included, so a C++ caller needs nothing but `torch::jit::load`:

    forward(coord (N, 3), atype (N,), box (3, 3) or None,
            center (E,), neighbor (E,), shift (E, 3) or None,
            nlocal = -1, atom_virial = False, fparam = None, aparam = None) -> Dict[str, Tensor]

    energy ()              sum of the atomic energies of the local atoms
    atom_energy (nlocal,)
    force (N, 3)           on every atom, ghosts included
    virial (9,)            -sum_e g_e (x) r_e, DeePMD's sign and row-major order
    atom_virial (N, 9)     only with atom_virial=True; each edge's virial shared by its two atoms

Edges are a *full* neighbour list (every pair in both directions), r_e = coord[neighbor] -
coord[center] (+ shift @ box when both are given).  Edges at or beyond rcut are dropped, so
a list with a skin (LAMMPS) can be passed as is; more than `sel` neighbours of one type
within rcut is an error, as in the eager model.

Two ways of supplying the environment:
  periodic:  coord holds the N atoms of the cell, edges carry integer lattice shifts (the
             edge list of dpmd.geometry.neighbor), nlocal = -1;
  ghost:     coord holds nlocal local atoms followed by ghost atoms (periodic images or
             other ranks' atoms, as LAMMPS provides them), edges go from local centres to
             any atom, shift = None.  Ghosts contribute no energy; the forces (and atomic
             virials) on them are returned so that the caller can add them to their owners
             (LAMMPS's reverse communication).
fparam (numb_fparam values) and aparam (numb_aparam values for every atom, or per local atom, or per atom
ghosts included) are the model's frame and atomic parameters, for a model that takes them (get_dim_fparam,
get_dim_aparam; without fparam a model with a default_fparam uses it).
Without center/neighbor the module finds neighbours itself (`neighbor_list`: dpmd.geometry.neighbor's cell
list, O(N)).
"""

from __future__ import annotations

import hashlib
import json
import warnings
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from dpmd import ops
from dpmd.geometry.neighbor import first_over_sel, reference_edges, sel_group_name, sel_overflow_message
from dpmd.model.deeppot import DeepPot
from dpmd.model.forces import DEFAULT_CHUNK_ATOMS, EdgeEnergyModel, assemble

FORMAT = "dpmd-model"
FORMAT_VERSION = 2  # 1: torch.save dict {format, version, config, state_dict}; 2: TorchScript archive
METADATA_FILE = "dpmd.json"  # TorchScript extra file holding the metadata (also the `metadata` attribute)


def dpmd_version() -> str:
    try:
        from importlib.metadata import version

        return version("dpmd")
    except Exception:  # not installed (source tree on sys.path)
        return "unknown"


def weights_checksum(state: Dict[str, torch.Tensor]) -> str:
    """sha256 over every tensor of a state dict (name, dtype, shape and exact bytes, in name order): recorded
    in the model file at save time, compared on load, so that a damaged weight never loads silently."""
    digest = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{list(t.shape)};".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def first_nonfinite(state: Dict[str, torch.Tensor]) -> Optional[str]:
    """The name of the first floating-point tensor of a state dict with a NaN or inf, or None."""
    return next((name for name, t in state.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())),
                None)


def model_metadata(model) -> dict:
    """Everything needed to rebuild and use the model without its training input."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "dpmd_version": dpmd_version(),
        "torch_version": torch.__version__.split("+")[0],
        "type_map": list(model.type_map),
        "ntypes": int(model.ntypes),
        "rcut": float(model.rcut),
        "sel": [int(s) for s in model.sel],
        "config": model.config,  # the normalised model section: rebuilds DeepPot(config)
        "weights_sha256": weights_checksum(model.state_dict()),  # verified by dpmd.model.io.load_model
        "units": {"length": "angstrom", "energy": "eV"},
        "dim_fparam": int(model.numb_fparam),
        "dim_aparam": int(model.numb_aparam),
        "forward": "forward(coord, atype, box=None, center=None, neighbor=None, shift=None, nlocal=-1, "
                   "atom_virial=False, fparam=None, aparam=None) -> {energy, atom_energy, force, virial"
                   "[, atom_virial]}",
    }


class FrozenDeepPot(EdgeEnergyModel, nn.Module):
    """TorchScript-compilable inference module around a DeepPot: its descriptor and fitting net (shared), its
    atomic_energy, and dpmd.model.forces' chunked gradients and assembly; what it adds is the C++ caller's
    interface (ghost atoms, a neighbour list with a skin, the checks that name atoms)."""

    atomic_energy = DeepPot.atomic_energy  # the trained model's own, compiled for this module

    # use_ops: scripted with dpmd's kernel library loaded; the torch.ops.dpmd.* calls are compiled only then
    __constants__ = ["use_ops", "entry_sel_check"]

    def __init__(self, model, chunk_atoms: int = DEFAULT_CHUNK_ATOMS):
        super().__init__()
        self.descriptor = model.descriptor
        self.fitting = model.fitting
        meta = model_metadata(model)
        self.type_map: List[str] = list(meta["type_map"])
        self.sel: List[int] = list(meta["sel"])
        self.rcut: float = meta["rcut"]
        self.ntypes: int = meta["ntypes"]
        self.chunk_atoms: int = int(chunk_atoms)
        self.metadata: str = json.dumps(meta)
        self.use_ops = False
        # a hybrid descriptor: each of its descriptors' own sel within its own rcut is checked too
        self.entry_sel_check = hasattr(model.descriptor, "sel_overflow")

    @torch.jit.export
    def get_type_map(self) -> List[str]:
        return self.type_map

    @torch.jit.export
    def get_rcut(self) -> float:
        return self.rcut

    @torch.jit.export
    def get_sel(self) -> List[int]:
        return self.sel

    @torch.jit.export
    def get_ntypes(self) -> int:
        return self.ntypes

    @torch.jit.export
    def get_metadata(self) -> str:
        return self.metadata

    @torch.jit.export
    def get_dim_fparam(self) -> int:
        return self.fitting.numb_fparam

    @torch.jit.export
    def get_dim_aparam(self) -> int:
        return self.fitting.numb_aparam

    @torch.jit.export
    def has_default_fparam(self) -> bool:
        return self.fitting.default_fparam_tensor is not None

    @torch.jit.export
    def neighbor_list(self, coord: torch.Tensor, box: Optional[torch.Tensor] = None
                      ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Full neighbour list (center, neighbor, shift) within rcut, sorted by centre: dpmd.geometry.neighbor's
        cell list, the kernel library's when scripted with it (the same edges in the same order as
        build_neighbor_list's, so the eager model's graph)."""
        coord = coord.to(torch.float64)
        if box is not None:
            box = box.to(torch.float64).reshape(3, 3)
        if self.use_ops:
            return torch.ops.dpmd.neighbor_list(coord, box, self.rcut)
        return reference_edges(coord, box, self.rcut)

    def forward(self, coord: torch.Tensor, atype: torch.Tensor, box: Optional[torch.Tensor] = None,
                center: Optional[torch.Tensor] = None, neighbor: Optional[torch.Tensor] = None,
                shift: Optional[torch.Tensor] = None, nlocal: int = -1, atom_virial: bool = False,
                fparam: Optional[torch.Tensor] = None, aparam: Optional[torch.Tensor] = None
                ) -> Dict[str, torch.Tensor]:
        dtype = torch.float64
        coord = coord.to(dtype).reshape(-1, 3)
        atype = atype.to(torch.long).reshape(-1)
        natoms = coord.shape[0]
        nloc = natoms if nlocal < 0 else nlocal
        if atype.shape[0] != natoms:
            raise RuntimeError("dpmd: coord and atype describe different numbers of atoms")
        na = self.fitting.numb_aparam
        if aparam is not None and nloc < natoms and na > 0 and aparam.numel() == natoms * na:
            aparam = aparam.reshape(natoms, na)[:nloc]  # given for the ghosts too: only the centres' are used
        fparam, aparam = self.fitting.param_inputs(1, nloc, fparam, aparam)
        params: Optional[torch.Tensor] = None
        if fparam is not None and aparam is not None:
            params = torch.cat([fparam.expand(nloc, -1), aparam], 1)
        elif fparam is not None:
            params = fparam.expand(nloc, -1)
        elif aparam is not None:
            params = aparam
        if center is None or neighbor is None:
            center, neighbor, shift = self.neighbor_list(coord, box)
        center, neighbor = center.to(torch.long), neighbor.to(torch.long)

        vec = coord.index_select(0, neighbor) - coord.index_select(0, center)
        if shift is not None and box is not None:
            vec = vec + shift.to(dtype) @ box.to(dtype).reshape(3, 3)
        vec = vec.detach()
        # only local centres and neighbours within rcut (a neighbour list may carry a skin)
        keep = ((vec * vec).sum(-1) < self.rcut * self.rcut) & (center < nloc)
        if not bool(keep.all()):
            sel = keep.nonzero().squeeze(1)
            center, neighbor, vec = center[sel], neighbor[sel], vec[sel]
        if center.shape[0] > 1 and bool((center[1:] < center[:-1]).any()):
            order = torch.argsort(center, stable=True)
            center, neighbor, vec = center[order], neighbor[order], vec[order]
        neighbor_type = atype.index_select(0, neighbor)
        if self.descriptor.compressed:  # an edge beyond the compressed model's tables: name the atoms
            bad = self.descriptor.edge_outside_table(vec, atype.index_select(0, center))
            if bad >= 0:
                i, j = int(center[bad]), int(neighbor[bad])
                raise RuntimeError(self.descriptor.table_message(
                    "atom " + str(i) + " (" + self.type_map[int(atype[i])] + ") and its neighbour " + str(j) + " ("
                    + self.type_map[int(atype[j])] + ")", float(torch.linalg.vector_norm(vec[bad], 2.0, dim=-1)),
                    int(atype[i])))
        nt = self.ntypes
        found = first_over_sel(torch.bincount(center * nt + neighbor_type, minlength=nloc * nt).reshape(nloc, nt),
                               self.sel)
        if len(found) > 0:
            i, t = found[0], found[1]
            raise RuntimeError("dpmd: " + sel_overflow_message(str(i), self.type_map[int(atype[i])], found[2],
                                                               sel_group_name(t, self.sel, self.type_map),
                                                               self.sel[t], found[3]))
        if self.entry_sel_check:
            found = self.descriptor.sel_overflow(vec, center, neighbor_type, nloc)
            if len(found) > 0:
                i = found[1]
                raise RuntimeError("dpmd: " + self.descriptor.overflow_message(found, str(i),
                                                                               self.type_map[int(atype[i])],
                                                                               self.type_map))

        atom_energy, g = self.edge_gradients(vec, center, neighbor, atype, params, nloc, max(self.chunk_atoms, 1),
                                             False, None)
        atom_energy, g = atom_energy.detach().to(dtype), g.to(dtype)
        atom_frame = torch.zeros([nloc], dtype=torch.long, device=coord.device)
        if self.use_ops:
            force, virial, av = torch.ops.dpmd.assemble(g, vec, center, neighbor, atom_frame, 1, natoms, atom_virial)
            out = ops.assembled(atom_energy, atom_frame, 1, force, virial, av, atom_virial)
        else:
            out = assemble(atom_energy, g, vec, center, neighbor, atom_frame, 1, natoms, atom_virial)
        out["energy"] = out["energy"][0]
        out["virial"] = out["virial"].reshape(9)
        if atom_virial:
            out["atom_virial"] = out["atom_virial"].reshape(natoms, 9)
        return out


def script_model(model, chunk_atoms: int = DEFAULT_CHUNK_ATOMS) -> torch.jit.ScriptModule:
    """The TorchScript module of a DeepPot (weights copied, so the eager model stays independent)."""
    import copy

    frozen = FrozenDeepPot(copy.deepcopy(model).eval(), chunk_atoms)
    if ops.available():  # the archive then calls torch.ops.dpmd.*: loaders need the library (DPMD_OPS=0: portable)
        frozen.use_ops = True
        for part in frozen.descriptor.modules():  # a hybrid's descriptors too
            if hasattr(part, "use_ops"):
                part.use_ops = True
        frozen.metadata = json.dumps({**json.loads(frozen.metadata), "ops_library": True})
    for p in frozen.parameters():
        p.requires_grad_(False)
    with warnings.catch_warnings():  # torch >= 2.10 flags TorchScript as deprecated; libtorch still loads it
        warnings.filterwarnings("ignore", message=".*torch.jit.script.*deprecated", category=DeprecationWarning)
        return torch.jit.script(frozen)
