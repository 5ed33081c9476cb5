"""Energy, forces and virial for any model that maps edge vectors to atomic energies.

This is the only place where derivatives are taken.  A model provides
    model.atomic_energy(edge_vec, center, center_type, neighbor_type) -> (n_centers,)
(with params=: the centres' fparam and aparam, when the graph carries them: dpmd.geometry.graph.atom_params)
and everything else follows from g_e = dE/dr_e, the gradient with respect to each edge
vector r_e = x_j - x_i + shift @ box:
    F_i = sum_{e: center i} g_e - sum_{e: neighbour i} g_e
    W   = - sum_e g_e (x) r_e            (virial, -dE/d(strain); DeePMD-kit's sign)
Large systems are evaluated in chunks of centre atoms so memory stays bounded: the
energy is a sum of atomic terms, each depending only on its own edges.

With the kernel library built (dpmd.ops), inference (create_graph=False) runs the environment
matrix, the contraction and this assembly as C++/CUDA ops behind the same calls; with create_graph=True
(training: the force loss differentiates forces again) only the contraction ops that differentiate to any
order (dpmd.ops.contraction) run, the rest is the PyTorch reference.
"""

from __future__ import annotations

import contextlib
from typing import Dict

import torch

from dpmd import ops

from dpmd.geometry.graph import atom_params, edge_vectors
from dpmd.geometry.neighbor import NeighborList, check_sel, count_neighbors

DEFAULT_CHUNK_ATOMS = 512


def check_neighbors(model, graph: dict) -> None:
    """Neighbour overflow beyond `sel` is an error naming the atom (index within its frame)."""
    atype = graph["atype"]
    counts = count_neighbors(NeighborList(graph["center"], graph["neighbor"], graph["shift"]), atype,
                             model.ntypes, atype.numel())
    try:
        check_sel(counts, atype, model.sel, model.type_map)
    except Exception as err:
        natoms = graph["natoms"]
        if atype.numel() > natoms:  # name the frame too
            i = int((counts > torch.tensor(model.sel, device=counts.device)).any(1).nonzero()[0])
            msg = str(err).replace(f"atom {i} ", f"atom {i % natoms} of frame {i // natoms} ", 1)
            raise type(err)(msg) from None
        raise


def evaluate(model, graph: dict, *, create_graph: bool = False, chunk_atoms: int | None = None,
             atom_virial: bool = False) -> dict:
    """energy (F,), atom_energy (N,), force (N, 3), virial (F, 3, 3) [, atom_virial (N, 3, 3)].

    create_graph=True keeps the graph for training on forces (no chunking then).
    """
    check_neighbors(model, graph)
    # most kernels' backward gives first derivatives only: the force loss of training needs other code
    kernels = contextlib.nullcontext if create_graph else ops.first_derivative_only
    with kernels():
        atom_energy, g, vec = edge_gradients(energy_and_gradient(model, create_graph), graph, create_graph,
                                             chunk_atoms)
        return assemble(atom_energy, g, vec, graph["center"], graph["neighbor"], graph["batch"],
                        graph["box"].shape[0], graph["atype"].numel(), atom_virial)


def energy_and_gradient(model, create_graph: bool = False):
    """The function edge_gradients evaluates per chunk: a model's atomic energies and dE/d(edge vectors)."""
    def fn(vec, center, center_type, neighbor_type, params=None):
        # (a model without fparam/aparam, e.g. a test's pair potential, need not know the keyword)
        e = (model.atomic_energy(vec, center, center_type, neighbor_type) if params is None
             else model.atomic_energy(vec, center, center_type, neighbor_type, params=params))
        # allow_unused: a chunk of isolated atoms has no edges, hence no gradient
        (g,) = torch.autograd.grad(e.sum(), vec, create_graph=create_graph, allow_unused=True)
        return e, (torch.zeros_like(vec) if g is None else g)
    return fn


def edge_gradients(energy_and_gradient, graph: dict, create_graph: bool = False, chunk_atoms: int | None = None,
                   ncenters: int | None = None):
    """Atomic energies (..., N) and their gradients g = dE/dr (..., E, 3) with respect to the edge vectors
    (..., E, 3), evaluated in chunks of centre atoms.  A leading axis (..., an ensemble's models) is allowed:
    energy_and_gradient(vec (E, 3), center, center_type, neighbor_type, params) -> (e (..., n), g (..., E, 3)),
    params: the chunk's centres' fparam and aparam (None when the graph has neither).
    ncenters: only atoms 0..ncenters-1 are centres (the others are ghosts: neighbours only)."""
    natoms_total = graph["atype"].numel() if ncenters is None else ncenters
    center, neighbor, atype = graph["center"], graph["neighbor"], graph["atype"]
    chunk = natoms_total if create_graph else (chunk_atoms or DEFAULT_CHUNK_ATOMS)
    # edges are sorted by centre: each chunk of atoms owns a contiguous range of edges
    bounds = torch.searchsorted(center, torch.arange(0, natoms_total + chunk, chunk, device=center.device)).tolist()
    dtype = graph["coord"].dtype
    energies, g_parts, vec_parts = [], [], []
    with torch.enable_grad():
        for k, a0 in enumerate(range(0, natoms_total, chunk)):
            a1 = min(a0 + chunk, natoms_total)
            edges = slice(bounds[k], bounds[k + 1])
            vec = edge_vectors(graph, edges)
            vec = vec if vec.requires_grad else vec.detach().requires_grad_()
            e, g = energy_and_gradient(vec, center[edges] - a0, atype[a0:a1], atype[neighbor[edges]],
                                       atom_params(graph, slice(a0, a1)))
            energies.append(e if create_graph else e.detach())
            g_parts.append(g)
            vec_parts.append(vec.detach())
    if len(energies) == 1:   # one chunk: no copies
        return energies[0].to(dtype), g_parts[0].to(dtype), vec_parts[0]
    return torch.cat(energies, dim=-1).to(dtype), torch.cat(g_parts, dim=-2).to(dtype), torch.cat(vec_parts)


def assemble(atom_energy: torch.Tensor, g: torch.Tensor, vec: torch.Tensor, center: torch.Tensor,
             neighbor: torch.Tensor, atom_frame: torch.Tensor, nframes: int, natoms: int,
             atom_virial: bool = False) -> Dict[str, torch.Tensor]:
    """Frame energies, forces and virials from atomic energies and edge gradients g = dE/dr.

    atom_energy and atom_frame cover the centre atoms (indices < len(atom_energy)); forces
    cover all `natoms` atoms an edge can reach (ghosts included).  TorchScript-compatible:
    the frozen model (dpmd.model.export) calls it too.
    """
    if not torch.jit.is_scripting():
        if ops.active(g) and not g.requires_grad:  # one pass over the edges instead of index_add
            return ops.assemble(atom_energy, g, vec, center, neighbor, atom_frame, nframes, natoms, atom_virial)
    force = torch.zeros([natoms, 3], dtype=g.dtype, device=g.device)
    force = force.index_add(0, center, g).index_add(0, neighbor, -g)
    edge_virial = -(g.unsqueeze(2) * vec.unsqueeze(1))  # (E, 3, 3)
    out = {
        "energy": torch.zeros([nframes], dtype=g.dtype, device=g.device).index_add(0, atom_frame, atom_energy),
        "atom_energy": atom_energy,
        "force": force,
        "virial": torch.zeros([nframes, 3, 3], dtype=g.dtype, device=g.device).index_add(
            0, atom_frame.index_select(0, center), edge_virial),
    }
    if atom_virial:  # each edge's virial shared equally by its two atoms
        half = 0.5 * edge_virial
        out["atom_virial"] = torch.zeros([natoms, 3, 3], dtype=g.dtype, device=g.device).index_add(
            0, center, half).index_add(0, neighbor, half)
    return out


def evaluate_padded(model, graph: dict) -> dict:
    """evaluate() for edges in DeePMD's padded layout (what the MD engine hands over on a GPU): every shape is
    known on the host, so nothing is read back from the device.  graph holds
      rows (R,): the centre atom of each row, grouped by type (the model's type_map order);
      row_chunk, row_type_counts: rows are evaluated in chunks of row_chunk, and these are the counts of each
          type in each chunk (host integers);
      edge_vec (R * nnei, 3) and neighbor (R * nnei,): nnei = sum(sel) slots per row in blocks of sel[t]
          slots for neighbour type t; an empty slot has the row's own atom and a vector beyond rcut;
      atype, batch, box, natoms[, fparam, aparam] as in evaluate().
    No `sel` check here: the caller that built the slots knows whether a neighbour did not fit."""
    rows, vec_all, neighbor = graph["rows"], graph["edge_vec"], graph["neighbor"]
    nnei, nrows = model.descriptor.nnei, rows.shape[0]
    chunk = graph["row_chunk"]
    slot_type = model.descriptor.slot_types(rows.device)
    params = atom_params(graph, slice(None))
    energies, g_parts = [], []
    with ops.first_derivative_only(), torch.enable_grad():
        for k, r0 in enumerate(range(0, nrows, chunk)):
            r1 = min(r0 + chunk, nrows)
            vec = vec_all[r0 * nnei:r1 * nnei].detach().requires_grad_()
            center = torch.arange(r1 - r0, device=rows.device).repeat_interleave(nnei)
            e = model.atomic_energy(vec, center, graph["atype"].index_select(0, rows[r0:r1]),
                                    slot_type.repeat(r1 - r0), graph["row_type_counts"][k],
                                    params=None if params is None else params.index_select(0, rows[r0:r1]))
            (g,) = torch.autograd.grad(e.sum(), vec)
            energies.append(e.detach())
            g_parts.append(g)
        g = torch.cat(g_parts).to(vec_all.dtype)
        natoms = graph["atype"].numel()
        atom_energy = torch.zeros(natoms, dtype=g.dtype, device=g.device).index_copy(0, rows, torch.cat(energies).to(g.dtype))
        return assemble(atom_energy, g, vec_all, rows.repeat_interleave(nnei), neighbor, graph["batch"],
                        graph["box"].shape[0], natoms)
