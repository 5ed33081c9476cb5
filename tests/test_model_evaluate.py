"""dpmd.model.forces.evaluate with ghost atoms (an MPI rank's view: ncenters = its local atoms, then ghosts):
after the reverse communication (ghost forces added to their owners) it is the periodic evaluation; the
padded neighbour format flags the rows whose neighbours do not fit in sel."""

from __future__ import annotations

import torch

from conftest import make_model, triclinic_water
from dpmd.geometry.graph import build_graph, edge_vectors
from dpmd.geometry.neighbor import NeighborList, count_neighbors, padded_edges
from dpmd.model.forces import evaluate


def test_ghost_atoms_with_ncenters_equal_the_periodic_frame(water):
    model = make_model()
    coord, atype, box = triclinic_water(water, scale=0.5, seed=11)
    n = len(atype)
    periodic = build_graph(coord, atype, box, model.rcut)
    ref = evaluate(model, periodic, atom_virial=False)
    # every neighbour image with a non-zero lattice shift becomes a ghost atom of its own
    vec = edge_vectors(periodic)
    shift = periodic["shift"].round().long()
    image = ~(shift == 0).all(1)
    keys = sorted({(int(j), *s) for j, s in zip(periodic["neighbor"][image].tolist(), shift[image].tolist())})
    ghost_of = {k: n + g for g, k in enumerate(keys)}
    owner = torch.tensor([k[0] for k in keys], dtype=torch.long)
    ghost_x = coord[owner] + torch.tensor([k[1:] for k in keys], dtype=coord.dtype) @ box
    neighbor = periodic["neighbor"].clone()
    for e in image.nonzero().squeeze(1).tolist():
        neighbor[e] = ghost_of[(int(neighbor[e]), *shift[e].tolist())]
    graph = {"coord": torch.cat([coord, ghost_x]), "atype": torch.cat([atype, atype[owner]]),
             "center": periodic["center"], "neighbor": neighbor, "edge_vec": vec}
    out = evaluate(model, graph, ncenters=n)
    assert out["force"].shape == (n + len(keys), 3) and out["atom_energy"].shape == (n,)
    force = out["force"][:n].index_add(0, owner, out["force"][n:])  # the reverse communication
    torch.testing.assert_close(force, ref["force"], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out["energy"], ref["energy"], rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(out["virial"], ref["virial"], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out["atom_energy"], ref["atom_energy"], rtol=1e-12, atol=1e-12)


def test_padded_format_flags_the_rows_over_sel(water):
    model = make_model()
    coord, atype, box = triclinic_water(water, scale=0.5, seed=11)
    graph = build_graph(coord, atype, box, model.rcut)
    counts = count_neighbors(NeighborList(graph["center"], graph["neighbor"], graph["shift"]), atype, 2, len(atype))
    sel = [int(counts[:, 0].max()) - 1, int(counts[:, 1].max())]   # one O slot short for the fullest atoms
    rows = torch.arange(len(atype))
    vec, neighbor, overflow = padded_edges(graph["center"], graph["neighbor"], edge_vectors(graph), atype, rows,
                                           sel, model.rcut)
    assert torch.equal(overflow, counts[:, 0] > sel[0])
    assert vec.shape == (len(atype) * sum(sel), 3) and neighbor.shape == (len(atype) * sum(sel),)
    inside = (vec * vec).sum(-1).view(len(atype), -1) < model.rcut ** 2   # the real neighbours kept per row
    assert torch.equal(inside.sum(1), torch.minimum(counts, torch.tensor(sel)).sum(1))
