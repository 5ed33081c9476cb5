"""The one data contract passed to models: a dict of named tensors for a batch of frames.

    coord   (N, 3)     positions of all atoms of all frames, concatenated
    atype   (N,)       type index into the model's type_map
    batch   (N,)       frame index of each atom
    box     (F, 3, 3)  lattice vectors as rows; zeros for a frame with open boundaries
    center, neighbor (E,), shift (E, 3)  edges, sorted by centre (see dpmd.geometry.neighbor)

    edge_vec (E, 3)    optional: the edge vectors, when the caller has them already (the MD
                       engine's Verlet filter); must equal what `edge_vectors` computes
    fparam  (F, nfp)   frame parameters, for a model with numb_fparam = nfp > 0 (else absent)
    aparam  (N, nap)   atomic parameters, for a model with numb_aparam = nap > 0 (else absent)
                       (DeepPot.fitting.param_inputs checks and shapes both; `atom_params` hands them on)

Edge vectors come from `edge_vectors`, and gradients with respect to them give forces and the
virial in one place (dpmd.model.forces).
"""

from __future__ import annotations

import torch

from dpmd.geometry.neighbor import NeighborList, build_neighbor_list


def build_graph(coord, atype, box=None, rcut: float | None = None, neighbors: list[NeighborList] | None = None,
                dtype=torch.float64) -> dict:
    """Graph for one frame (coord (N, 3)) or a batch of frames of equal size (coord (F, N, 3)).

    box: None (open boundaries), (3, 3) or (F, 3, 3).  Neighbour lists are built with
    `rcut` unless given (one per frame).
    """
    coord = torch.as_tensor(coord, dtype=dtype)
    if coord.dim() == 2:
        coord = coord.unsqueeze(0)
    nframes, natoms = coord.shape[:2]
    atype = torch.as_tensor(atype, dtype=torch.long, device=coord.device)
    if atype.dim() == 1:
        atype = atype.expand(nframes, natoms)
    if box is None:
        boxes = torch.zeros(nframes, 3, 3, dtype=dtype, device=coord.device)
    else:
        boxes = torch.as_tensor(box, dtype=dtype, device=coord.device).reshape(-1, 3, 3).expand(nframes, 3, 3)
    if neighbors is None:
        if rcut is None:
            raise ValueError("build_graph needs rcut or precomputed neighbours")
        neighbors = [build_neighbor_list(coord[f], None if box is None else boxes[f], rcut) for f in range(nframes)]
    offset = [f * natoms for f in range(nframes)]
    return {
        "coord": coord.reshape(-1, 3),
        "atype": atype.reshape(-1),
        "batch": torch.arange(nframes, device=coord.device).repeat_interleave(natoms),
        "box": boxes.contiguous(),
        "center": torch.cat([nl.center + o for nl, o in zip(neighbors, offset)]),
        "neighbor": torch.cat([nl.neighbor + o for nl, o in zip(neighbors, offset)]),
        "shift": torch.cat([nl.shift for nl in neighbors]).to(dtype),
        "natoms": natoms,
    }


def atom_params(graph: dict, atoms: slice) -> torch.Tensor | None:
    """The fitting net's extra inputs of the atoms in `atoms` (a range of centres): each atom's frame's fparam
    followed by its own aparam, (n, nfp + nap); None when the graph has neither."""
    parts = []
    fparam, aparam = graph.get("fparam"), graph.get("aparam")
    if fparam is not None:
        n = len(range(*atoms.indices(graph["atype"].numel())))
        # one frame (the MD engine's ghost-atom graphs carry no `batch`): every atom has its fparam
        parts.append(fparam.expand(n, -1) if fparam.shape[0] == 1 else fparam.index_select(0, graph["batch"][atoms]))
    if aparam is not None:
        parts.append(aparam[atoms])
    return torch.cat(parts, 1) if parts else None


def edge_vectors(graph: dict, edges: slice = slice(None)) -> torch.Tensor:
    """r_e = coord[neighbor] - coord[center] + shift @ box, for the edges selected by `edges`."""
    if "edge_vec" in graph:
        return graph["edge_vec"][edges]
    center, neighbor = graph["center"][edges], graph["neighbor"][edges]
    coord, box, shift = graph["coord"], graph["box"], graph["shift"][edges]
    vec = coord.index_select(0, neighbor) - coord.index_select(0, center)
    if box.shape[0] == 1:  # one frame: one small matrix product instead of a 3x3 product per edge
        return vec + shift @ box[0]
    return vec + torch.einsum("ei,eij->ej", shift, box.index_select(0, graph["batch"].index_select(0, center)))
