"""DeepPot-SE descriptor, two-body embedding with full radial and angular information (`se_e2_a`).

DeePMD-kit's definition, evaluated on an edge list instead of a padded neighbour matrix:

  environment row of neighbour j of atom i:  (s, s x/r, s y/r, s z/r)  with s = sw(r)/r,
      sw the quintic switch from 1 at rcut_smth to 0 at rcut;
  normalised per centre type:                R = (row - mean[t_i]) / std[t_i];
  embedding of every neighbour:              G = net_{t_j}(R[:, 0])  (net_{t_i,t_j} if not type_one_side);
  T_i = (1/nnei) sum_j R_j^T G_j   (4 x M),  D_i = T_i^T T_i[:, :axis_neuron]   (M x axis_neuron).

DeePMD pads every neighbour list to `sel` slots; an empty slot has a zero row, which
normalisation turns into the constant -mean/std and so still feeds T_i.  Padded slots are
kept out of the arithmetic here: their total contribution is (sel - count) times one
embedding evaluation per (centre type, net), which reproduces DeePMD-kit's numbers exactly.
"""

from __future__ import annotations

from typing import List

import torch
from torch import nn

from dpmd.model.network import MLP


def smooth_switch(r: torch.Tensor, rmin: float, rmax: float) -> torch.Tensor:
    """1 below rmin, 0 above rmax, C2-continuous quintic in between."""
    u = ((r - rmin) / (rmax - rmin)).clamp(0.0, 1.0)
    return u * u * u * (-6.0 * u * u + 15.0 * u - 10.0) + 1.0


class DescriptorSeA(nn.Module):
    def __init__(self, ntypes: int, sel: list[int], rcut: float, rcut_smth: float, neuron=(25, 50, 100),
                 axis_neuron: int = 16, resnet_dt: bool = False, type_one_side: bool = True,
                 activation_function: str = "tanh", dtype=torch.float64, generator=None):
        super().__init__()
        if len(sel) != ntypes:
            raise ValueError(f"descriptor.sel has {len(sel)} entries but type_map has {ntypes} types")
        if not 0 <= rcut_smth < rcut:
            raise ValueError(f"descriptor: need 0 <= rcut_smth < rcut, got rcut_smth={rcut_smth}, rcut={rcut}")
        if axis_neuron > neuron[-1]:
            raise ValueError(f"descriptor.axis_neuron={axis_neuron} exceeds the last embedding width {neuron[-1]}")
        self.ntypes, self.sel, self.rcut, self.rcut_smth = ntypes, list(sel), float(rcut), float(rcut_smth)
        self.axis_neuron, self.type_one_side = axis_neuron, type_one_side
        self.nnei = sum(sel)
        self.width = neuron[-1]
        nnets = ntypes if type_one_side else ntypes * ntypes
        # net index: neighbour type, or neighbour type * ntypes + centre type (DeePMD's order)
        self.embeddings = nn.ModuleList(
            MLP(1, list(neuron), activation=activation_function, resnet_dt=resnet_dt, dtype=dtype, generator=generator)
            for _ in range(nnets)
        )
        self.register_buffer("mean", torch.zeros(ntypes, 4, dtype=dtype))
        self.register_buffer("std", torch.ones(ntypes, 4, dtype=dtype))

    @property
    def dim_out(self) -> int:
        return self.width * self.axis_neuron

    def env_rows(self, edge_vec: torch.Tensor) -> torch.Tensor:
        """Un-normalised environment rows (E, 4) from edge vectors (E, 3)."""
        r = torch.linalg.vector_norm(edge_vec, 2.0, dim=-1, keepdim=True)  # = Tensor.norm(dim=-1); scriptable
        s = smooth_switch(r, self.rcut_smth, self.rcut) / r
        return torch.cat([s, s * edge_vec / r], dim=-1)

    def forward(self, edge_vec, center, center_type, neighbor_type):
        """Descriptors (n_centers, M * axis_neuron).

        edge_vec (E, 3) vectors from centre to neighbour; center (E,) index in [0, n_centers);
        center_type (n_centers,); neighbor_type (E,).
        """
        dtype = self.mean.dtype
        ncent = center_type.shape[0]
        ct_edge = center_type[center]
        rows = (self.env_rows(edge_vec.to(dtype)) - self.mean[ct_edge]) / self.std[ct_edge]
        key = neighbor_type if self.type_one_side else neighbor_type * self.ntypes + ct_edge
        # Edges grouped by net, then by centre: each group becomes a dense (centre, slot)
        # block padded only to the largest real count, so T is one batched matmul per net.
        order = torch.argsort(key * ncent + center)
        counts: List[int] = torch.bincount(key, minlength=len(self.embeddings)).tolist()
        rows, center_sorted = rows[order], center[order]

        T = rows.new_zeros([ncent, 4, self.width])
        start = 0
        for i, net in enumerate(self.embeddings):  # (enumerate, no continue: TorchScript-compilable)
            n = counts[i]
            if n > 0:
                r = rows[start:start + n]
                T = T + self._block(r, net(r[:, :1]), center_sorted[start:start + n], ncent)
            start += n
        T = T + self._padding(center, center_type, neighbor_type)
        T = T / self.nnei
        D = torch.bmm(T.transpose(1, 2), T[:, :, : self.axis_neuron])
        return D.reshape(ncent, -1)

    def _block(self, r: torch.Tensor, g: torch.Tensor, c: torch.Tensor, ncent: int) -> torch.Tensor:
        """sum_j R_j^T G_j (n_centers, 4, M) over the edges of one net: rows r (n, 4), embeddings g (n, M),
        centres c (n,) in ascending order."""
        n = r.shape[0]
        per_center = torch.bincount(c, minlength=ncent)
        nmax = int(per_center.max())
        slot = torch.arange(n, device=c.device) - (torch.cumsum(per_center, 0) - per_center)[c]
        flat = c * nmax + slot
        r_pad = r.new_zeros([ncent * nmax, 4])
        r_pad[flat] = r
        g_pad = g.new_zeros([ncent * nmax, self.width])
        g_pad[flat] = g
        r_pad, g_pad = r_pad.view(ncent, nmax, 4), g_pad.view(ncent, nmax, self.width)
        return torch.bmm(r_pad.transpose(1, 2), g_pad)

    def _padding(self, center, center_type, neighbor_type):
        """Contribution of DeePMD's empty neighbour slots, (n_centers, 4, M)."""
        ncent, nt = center_type.shape[0], self.ntypes
        count = torch.bincount(center * nt + neighbor_type, minlength=ncent * nt).reshape(ncent, nt)
        n_pad = (torch.tensor(self.sel, device=count.device) - count).to(self.mean.dtype)  # (ncent, nt)
        pad_row = -self.mean / self.std  # (nt_center, 4): a zero row, normalised
        # per_pair[tc * nt + tn]: one padded slot of centre type tc in the block of neighbour type tn
        per_pair: List[torch.Tensor] = [pad_row.new_empty(0)] * (nt * nt)
        for i, net in enumerate(self.embeddings):  # net i serves neighbour type i, or pair (i // nt, i % nt)
            for tc in range(nt):
                if self.type_one_side or tc == i % nt:
                    tn = i if self.type_one_side else i // nt
                    g = net(pad_row[tc, :1].unsqueeze(0))[0]
                    per_pair[tc * nt + tn] = pad_row[tc].unsqueeze(1) * g.unsqueeze(0)
        table = torch.stack(per_pair).reshape(nt, nt, 4, self.width)[center_type]  # (ncent, nt, 4, M)
        return torch.einsum("cn,cnkm->ckm", n_pad, table)
