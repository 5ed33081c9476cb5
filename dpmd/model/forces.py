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

One path for every caller: `evaluate` (training, `dpmd md`, MPI ranks with ncenters=nlocal, the ASE
calculator) and the frozen TorchScript model (dpmd.model.export) run the same chunked loop
(EdgeEnergyModel.edge_gradients) and the same assembly (`assemble`).  Which implementation runs is resolved
once per evaluation (dpmd.ops.resolve) and passed down: with the kernel library built, inference
(create_graph=False) runs the environment matrix, the contraction and this assembly as C++/CUDA ops; with
create_graph=True (training: the force loss differentiates forces again) only the contraction ops that
differentiate to any order (dpmd.ops.contraction) run, the rest is the PyTorch reference.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch

from dpmd import ops
from dpmd.errors import DpmdError
from dpmd.geometry.graph import atom_params, edge_vectors
from dpmd.geometry.neighbor import NeighborList, check_sel, count_neighbors
from dpmd.ops import Backend

DEFAULT_CHUNK_ATOMS = 512


def chunk_bounds(center: torch.Tensor, ncenters: int, chunk: int, per_center: int) -> List[int]:
    """Where the edges of each chunk of `chunk` centres begin (and the last ends): edges sorted by centre, or
    per_center > 0 edges for every centre (padded rows)."""
    if per_center > 0:
        return [min(a, ncenters) * per_center for a in range(0, ncenters + chunk, chunk)]
    bounds: List[int] = torch.searchsorted(
        center, torch.arange(0, ncenters + chunk, chunk, device=center.device)).tolist()
    return bounds


class EdgeEnergyModel:
    """The derivative half of a model, mixed into modules that define
        atomic_energy(edge_vec, center, center_type, neighbor_type, type_counts, params, backend) -> (n,)
    (dpmd.model.deeppot.DeepPot, dpmd.model.export.FrozenDeepPot).  TorchScript-compatible."""

    def energy_and_gradient(self, vec: torch.Tensor, center: torch.Tensor, center_type: torch.Tensor,
                            neighbor_type: torch.Tensor, params: Optional[torch.Tensor], create_graph: bool,
                            backend: Optional[Backend], type_counts: Optional[List[int]] = None
                            ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Atomic energies of one chunk and dE/d(edge vectors)."""
        e = self.atomic_energy(vec, center, center_type, neighbor_type, type_counts, params, backend)
        # allow_unused: a chunk of isolated atoms has no edges, hence no gradient
        g = torch.autograd.grad([e.sum()], [vec], create_graph=create_graph, allow_unused=True)[0]
        if g is None:
            return e, torch.zeros_like(vec)
        return e, g

    def edge_gradients(self, vec: torch.Tensor, center: torch.Tensor, neighbor: torch.Tensor, atype: torch.Tensor,
                       params: Optional[torch.Tensor], ncenters: int, chunk: int, create_graph: bool,
                       backend: Optional[Backend], slot_types: Optional[torch.Tensor] = None,
                       chunk_type_counts: Optional[List[List[int]]] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Atomic energies (..., ncenters) and g = dE/dr (..., E, 3), in chunks of `chunk` centre atoms: the one
        loop of every caller.  atype: the types of the centres first (of every atom in the edge layout),
        params: the centres' fparam and aparam.  Two layouts:
          edge list (slot_types None): edges (vec, center, neighbor) sorted by centre, so each chunk owns a
              contiguous range of them, found by a search;
          DeePMD's padded rows (slot_types: the neighbour type of each of a row's nnei slots, (nnei,) the same
              for every row, or (ncenters, nnei) row by row: a mixed-type list, whose slots hold neighbours of
              any type): every centre has nnei edges, centres grouped by type with chunk_type_counts[k] in chunk
              k; every bound is then known on the host and nothing is read back from the device (center, neighbor
              are not used)."""
        per_center = 0 if slot_types is None else slot_types.shape[-1]
        bounds = chunk_bounds(center, ncenters, chunk, per_center)
        energies: List[torch.Tensor] = []
        grads: List[torch.Tensor] = []
        k = 0
        for a0 in range(0, ncenters, chunk):
            a1 = min(a0 + chunk, ncenters)
            b0, b1 = bounds[k], bounds[k + 1]
            k += 1
            v = vec[b0:b1]
            if not v.requires_grad:
                v = v.detach().requires_grad_()
            if slot_types is None:
                c, nt = center[b0:b1] - a0, atype.index_select(0, neighbor[b0:b1])
            else:
                c = torch.arange(a1 - a0, device=vec.device).repeat_interleave(per_center)
                nt = slot_types.repeat(a1 - a0) if slot_types.dim() == 1 else slot_types[a0:a1].reshape(-1)
            e, g = self.energy_and_gradient(v, c, atype[a0:a1], nt,
                                            None if params is None else params[a0:a1], create_graph, backend,
                                            None if chunk_type_counts is None else chunk_type_counts[k - 1])
            energies.append(e if create_graph else e.detach())
            grads.append(g)
        if len(energies) == 1:  # one chunk: no copies
            return energies[0], grads[0]
        if len(energies) == 0:  # no centres
            return vec.new_zeros([0]), torch.zeros_like(vec)
        return torch.cat(energies, -1), torch.cat(grads, -2)


class _Function(EdgeEnergyModel):
    """edge_gradients' loop around a function (vec, center, center_type, neighbor_type, params) -> (e, g)."""

    def __init__(self, fn):
        self.fn = fn

    def energy_and_gradient(self, vec, center, center_type, neighbor_type, params, create_graph, backend,
                            type_counts=None):
        return self.fn(vec, center, center_type, neighbor_type, params)


def check_neighbors(model, graph: dict) -> None:
    """Neighbour overflow beyond `sel` is an error naming the atom (index within its frame)."""
    atype = graph["atype"]
    counts = count_neighbors(NeighborList(graph["center"], graph["neighbor"], graph.get("shift")), atype,
                             model.ntypes, atype.numel())
    check_sel(counts, atype, model.sel, model.type_map, graph.get("natoms", 0))
    entries = getattr(getattr(model, "descriptor", None), "check_sel", None)
    if entries is not None:  # a hybrid: each descriptor's own sel within its own rcut
        entries(graph, model.type_map)


def evaluate(model, graph: dict, *, create_graph: bool = False, chunk_atoms: int | None = None,
             atom_virial: bool = False, ncenters: int | None = None, backend: Backend | None = None,
             check_sel: bool = True) -> dict:
    """energy (F,), atom_energy (N,), force (N, 3), virial (F, 3, 3) [, atom_virial (N, 3, 3)] of a graph in
    either layout: an edge list, or DeePMD's padded rows (a graph with `rows`: _evaluate_padded).

    create_graph=True keeps the graph for training on forces (no chunking then).
    ncenters: only atoms 0..ncenters-1 are centres, the others ghosts (an MPI rank's local atoms, then the
    ghosts, one frame; the graph needs no box or batch when it carries edge_vec): atom_energy covers the
    centres, energy and virial their edges, force every atom, ghosts included (for the caller's reverse
    communication).
    backend: what runs; None: resolved here from the request (create_graph), the device and the library.
    check_sel=False: the caller checked the neighbour counts against sel itself (MPI: collectively, since a
    check that raises on some ranks only would leave the others waiting).
    """
    if "rows" in graph:
        if create_graph or atom_virial or ncenters is not None:
            raise ValueError("evaluate: a padded graph gives forces, energy and virial only")
        return _evaluate_padded(model, graph, backend)
    if check_sel:
        check_neighbors(model, graph)
    if backend is None:  # most kernels' backward gives first derivatives only: training's force loss needs others
        backend = ops.resolve(graph["coord"], first_derivative=not create_graph)
    atom_energy, g, vec = edge_gradients(model if isinstance(model, EdgeEnergyModel)
                                         else energy_and_gradient(model, create_graph),
                                         graph, create_graph, chunk_atoms, ncenters, backend)
    natoms = graph["atype"].numel()
    nc = natoms if ncenters is None else ncenters
    batch = graph.get("batch")
    atom_frame = (batch[:nc] if batch is not None
                  else torch.zeros(nc, dtype=torch.long, device=graph["coord"].device))
    nframes = graph["box"].shape[0] if "box" in graph else 1
    return assemble(atom_energy, g, vec, graph["center"], graph["neighbor"], atom_frame, nframes, natoms,
                    atom_virial, backend)


def energy_and_gradient(model, create_graph: bool = False):
    """The function edge_gradients evaluates per chunk for any model with atomic_energy (a test's pair
    potential too): its atomic energies and dE/d(edge vectors)."""
    def fn(vec, center, center_type, neighbor_type, params=None):
        # (a model without fparam/aparam, e.g. a test's pair potential, need not know the keyword)
        e = (model.atomic_energy(vec, center, center_type, neighbor_type) if params is None
             else model.atomic_energy(vec, center, center_type, neighbor_type, params=params))
        # allow_unused: a chunk of isolated atoms has no edges, hence no gradient
        (g,) = torch.autograd.grad(e.sum(), vec, create_graph=create_graph, allow_unused=True)
        return e, (torch.zeros_like(vec) if g is None else g)
    return fn


def edge_gradients(energy_and_gradient, graph: dict, create_graph: bool = False, chunk_atoms: int | None = None,
                   ncenters: int | None = None, backend: Backend | None = None):
    """Atomic energies (..., N) and their gradients g = dE/dr (..., E, 3) with respect to the edge vectors
    (..., E, 3), evaluated in chunks of centre atoms (EdgeEnergyModel.edge_gradients).  A leading axis (...,
    an ensemble's models) is allowed.  energy_and_gradient: an EdgeEnergyModel (a DeepPot), or a function
    (vec (E, 3), center, center_type, neighbor_type, params) -> (e (..., n), g (..., E, 3)), params: the chunk's
    centres' fparam and aparam (None when the graph has neither).
    ncenters: only atoms 0..ncenters-1 are centres (the others are ghosts: neighbours only)."""
    natoms_total = graph["atype"].numel() if ncenters is None else ncenters
    chunk = natoms_total if create_graph else (chunk_atoms or DEFAULT_CHUNK_ATOMS)
    model = (energy_and_gradient if isinstance(energy_and_gradient, EdgeEnergyModel)
             else _Function(energy_and_gradient))
    with torch.enable_grad():
        vec = edge_vectors(graph)
        e, g = model.edge_gradients(vec, graph["center"], graph["neighbor"], graph["atype"],
                                    atom_params(graph, slice(0, natoms_total)), natoms_total, max(chunk, 1),
                                    create_graph, backend)
    dtype = graph["coord"].dtype
    return e.to(dtype), g.to(dtype), vec.detach()


def assemble(atom_energy: torch.Tensor, g: torch.Tensor, vec: torch.Tensor, center: torch.Tensor,
             neighbor: torch.Tensor, atom_frame: torch.Tensor, nframes: int, natoms: int,
             atom_virial: bool = False, backend: Optional[Backend] = None) -> Dict[str, torch.Tensor]:
    """Frame energies, forces and virials from atomic energies and edge gradients g = dE/dr.

    atom_energy and atom_frame cover the centre atoms (indices < len(atom_energy)); forces
    cover all `natoms` atoms an edge can reach (ghosts included).  TorchScript-compatible:
    the frozen model (dpmd.model.export) calls it too (with the library: dpmd.ops.assemble).
    """
    if not torch.jit.is_scripting():
        if backend is not None and backend.kernels and not g.requires_grad:  # one pass over the edges
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


def layouts(model) -> Tuple[str, ...]:
    """The edge layouts model.atomic_energy takes: its descriptor's `layouts` ("edges": an edge list; "padded":
    DeePMD's padded rows); edge lists for a model without a descriptor (a test's pair
    potential) or a descriptor that declares none."""
    return getattr(getattr(model, "descriptor", None), "layouts", ("edges",))


def sel_limits(model) -> List[Tuple[float, List[int], bool]]:
    """The (rcut, sel, mixed_types) that neighbour counts must fit besides the model's own sel within its rcut: a
    hybrid descriptor's entries, each within its own rcut (dpmd.model.descriptor.hybrid); none for other models.
    The builder of a padded layout checks them (dpmd.md.neighbors.VerletList.within_cutoff, format padded)."""
    desc = getattr(model, "descriptor", None)
    return list(zip(desc.entry_rcut, desc.entry_sel, desc.entry_mixed)) if hasattr(desc, "entry_sel") else []


def _evaluate_padded(model, graph: dict, backend: Backend | None = None) -> dict:
    """evaluate() of edges in DeePMD's padded layout (what the MD engine hands over on a GPU): every shape is
    known on the host, so nothing is read back from the device.  graph holds
      rows (R,): the centre atom of each row, grouped by type (the model's type_map order);
      row_chunk, row_type_counts: rows are evaluated in chunks of row_chunk, and these are the counts of each
          type in each chunk (host integers);
      edge_vec (R * nnei, 3) and neighbor (R * nnei,): nnei = sum(sel) slots per row in blocks of sel[t]
          slots for neighbour type t (a mixed-type descriptor's: one block of neighbours of any type); an empty
          slot has the row's own atom and a vector beyond rcut;
      atype, batch, box, natoms[, fparam, aparam] as in evaluate().
    No `sel` check here: the caller that built the slots knows whether a neighbour did not fit (sel_limits).
    backend: what runs (None: resolved here, for forces)."""
    if "padded" not in layouts(model):
        raise DpmdError(f"evaluate: a padded graph, but {type(model.descriptor).__name__} has no padded layout "
                        f"(it takes {', '.join(layouts(model))}); evaluate an edge list")
    rows, vec_all, neighbor = graph["rows"], graph["edge_vec"], graph["neighbor"]
    nnei, nrows = model.descriptor.nnei, rows.shape[0]
    if backend is None:
        backend = ops.resolve(vec_all, first_derivative=True)
    params = atom_params(graph, slice(None))
    if model.descriptor.mixed_types:  # each slot's type is its atom's (an empty slot's: the row's)
        slot_types = graph["atype"].index_select(0, neighbor).view(nrows, nnei)
    else:
        slot_types = model.descriptor.slot_types(rows.device)
    with torch.enable_grad():  # the rows are the centres of the loop, in row order
        e, g = model.edge_gradients(vec_all, rows, neighbor, graph["atype"].index_select(0, rows),
                                    None if params is None else params.index_select(0, rows), nrows,
                                    graph["row_chunk"], False, backend, slot_types, graph["row_type_counts"])
    g = g.to(vec_all.dtype)
    natoms = graph["atype"].numel()
    atom_energy = torch.zeros(natoms, dtype=g.dtype, device=g.device).index_copy(0, rows, e.to(g.dtype))
    return assemble(atom_energy, g, vec_all, rows.repeat_interleave(nnei), neighbor, graph["batch"],
                    graph["box"].shape[0], natoms, False, backend)
