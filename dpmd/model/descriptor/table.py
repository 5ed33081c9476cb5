"""A descriptor's embedding nets, evaluated as nets or as tables (a compressed model, dpmd.model.compress).

A descriptor with one scalar-input embedding net per type (or pair of types) inherits EmbeddingTable and asks
it for what its forward needs, the same calls compressed or not (the choice of net, linearised net, fused
table kernel or table made here, once):

    embed(i, x)                       G_i(x) (n, M) of net i at inputs x (n,)
    embedding_sum(out, i, x, w, c)    out + sum_e w_e G_i(x_e) per centre c_e
    embedding_block(i, r, c, ncent)   sum_e r_e^T G_i(r_e[0]) per centre (ncent, 4, M)
    _check_table(x, ...)              inputs beyond the tables: an error naming the atoms (no-op uncompressed)

After enable_compression G_i is read from net i's piecewise quintic table, and the sums run in the kernel
library's (or Triton's) fused tabulate-and-contract op where it applies (first derivatives: forces); else a net
is linearised in its input where the backend allows it (dpmd.model.network: exact forces, cheaper derivatives).

Layout (one grid for every net of the descriptor; dpmd.model.compress.table_layout):

    [start, lower)  n_coarse_low intervals of step_coarse   (se_e3 only: its input x is symmetric around 0)
    [lower, upper)  n_fine intervals of step                 (the training data's range)
    [upper, end]    n_coarse intervals of step_coarse        (the extrapolated range, extrapolate x the data's)

with start = lower - n_coarse_low * step_coarse.  The coefficients are the descriptor's buffer `table`
(nets, intervals, 6, M): on each interval p(t) = sum_k c_k t^k, t = x - node (so a file compressed before this
class existed loads as it is: same name, same shape, same checksum).

Safety: an input outside [start, end] is an error naming the atoms and the shortest distance the tables
cover (`table_rmin`, per centre type), never an extrapolation; with check_frequency N > 0 every N-th evaluation
warns about inputs in the coarse range.  `edge_outside_table` (the frozen model's and DeepPot's check before
evaluating) asks the descriptor for one value per edge, `edge_table_input`, that bounds what the edge feeds
the tables.
"""

from __future__ import annotations

import math
import warnings
from typing import List, Optional, Tuple

import torch

from dpmd import ops
from dpmd.errors import ConfigError
from dpmd.model import deferred
from dpmd.model.network import embedding_with_tangent, linearize_at
from dpmd.ops import Backend, contraction


def short(x: float) -> str:
    """x to 4 decimals, for messages (TorchScript has no format specs)."""
    n = int(math.floor(abs(x) * 1e4 + 0.5))
    frac = str(n % 10000)
    while len(frac) < 4:
        frac = "0" + frac
    return ("-" if x < 0 else "") + str(n // 10000) + "." + frac


def outside_table_message(where: str, r: float, rmin: float, center_type: int) -> str:
    """One line for an edge outside a compressed model's tables (`where` names the atoms)."""
    return ("dpmd: compressed model: " + where + " at distance " + short(r) + " Å is outside the "
            + "embedding tables (they cover r >= " + short(rmin) + " Å around type-" + str(center_type)
            + " centres); compress again with a larger --extrapolate")


with warnings.catch_warnings():  # torch >= 2.10 flags TorchScript as deprecated; libtorch still loads it
    warnings.filterwarnings("ignore", message=".*torch.jit.interface.*deprecated", category=DeprecationWarning)

    @torch.jit.interface
    class EmbeddingNet(torch.nn.Module):
        """An embedding net as TorchScript sees it: what lets it call net i of a ModuleList at a runtime index."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            pass


class EmbeddingTable:
    """Mixin of a descriptor (an nn.Module with `embeddings`, `width`, `mean`, `ntypes`, and
    `edge_table_input(edge_vec, center_type_of_edge)`): its embedding nets as nets or tables, and the tables'
    checks.  A mixin, not a submodule, so that the coefficients stay the descriptor's own buffer `table`.  The
    subclass lists "compressed" and "use_ops" in __constants__ (TorchScript then compiles the table code only for
    a compressed model, the kernel library's calls only for a copy that dpmd.model.export scripts with it)."""

    linearize_nets = True  # nets linearised in their input where the backend allows it (Backend.linearize)

    def _init_table(self, ntypes: int) -> None:
        self.compressed = False
        self.table_lower, self.table_upper, self.table_end = 0.0, 0.0, 0.0
        self.table_step, self.table_step_coarse = 1.0, 1.0
        self.table_fine, self.table_coarse, self.table_coarse_low = 0, 0, 0
        self.table_rmin = [0.0] * ntypes  # per centre type: the shortest distance the tables cover
        self.check_frequency, self.evaluations = -1, 0

    def enable_compression(self, layout: dict, check_frequency: int = -1) -> None:
        """Use tabulated embeddings with the layout of dpmd.model.compress.table_layout; the coefficients (buffer
        `table`) are filled by dpmd.model.compress or loaded from a state_dict."""
        if "list" in layout:
            raise ConfigError("'model.compress' has a hybrid descriptor's `list` of layouts, but the descriptor is "
                              "not a hybrid")
        self.compressed = True
        self.table_lower, self.table_upper = float(layout["lower"]), float(layout["upper"])
        self.table_end = float(layout["end"])
        self.table_step, self.table_step_coarse = float(layout["step"]), float(layout["step_coarse"])
        self.table_fine, self.table_coarse = int(layout["n_fine"]), int(layout["n_coarse"])
        self.table_coarse_low = int(layout.get("n_coarse_low", 0))
        self.table_rmin = [float(r) for r in layout["rmin"]]
        self.check_frequency = int(check_frequency)
        nint = self.table_coarse_low + self.table_fine + self.table_coarse
        self.register_buffer("table", self.mean.new_zeros([len(self.embeddings), nint, 6, self.width]))

    def _table_start(self) -> float:
        return self.table_lower - self.table_coarse_low * self.table_step_coarse

    def _locate(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(interval (n,), t = x - node (n, 1)) of inputs x (n,)."""
        low = self.table_coarse_low
        fine = x < self.table_upper
        k_fine = torch.floor((x - self.table_lower) / self.table_step).clamp(0, self.table_fine - 1)
        k_coarse = torch.floor((x - self.table_upper) / self.table_step_coarse).clamp(0, self.table_coarse - 1)
        node = torch.where(fine, self.table_lower + k_fine * self.table_step,
                           self.table_upper + k_coarse * self.table_step_coarse)
        interval = torch.where(fine, k_fine + low, k_coarse + (low + self.table_fine)).to(torch.long)
        if low > 0:
            below = x < self.table_lower
            start = self._table_start()
            k_low = torch.floor((x - start) / self.table_step_coarse).clamp(0, low - 1)
            node = torch.where(below, start + k_low * self.table_step_coarse, node)
            interval = torch.where(below, k_low.to(torch.long), interval)
        return interval, (x - node).unsqueeze(1)

    @torch.jit.unused
    def resolve_backend(self, backend: Optional[Backend], tensor: torch.Tensor) -> Backend:
        """The caller's backend (dpmd.ops.resolve), or, for a caller that passes none, the one its context gives."""
        return ops.resolve(tensor) if backend is None else backend

    def embed(self, i: int, x: torch.Tensor, backend: Optional[Backend] = None) -> torch.Tensor:
        """G_i(x) (n, M) of net i at inputs x (n,): its table (compressed), else the net, linearised in x where a
        backend is given that allows it (_tangent)."""
        if self.compressed:
            return self._tabulate(i, x)
        if not torch.jit.is_scripting():
            tangent = self._tangent(i, x, backend)
            if tangent is not None:
                return linearize_at(*tangent, x)
        return self._net_forward(i, x)

    def _net_forward(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Net i at inputs x (n,), as it is (a descriptor whose nets are not a ModuleList `embeddings` overrides
        this: TorchScript skips a property)."""
        net: EmbeddingNet = self.embeddings[i]
        return net.forward(x.unsqueeze(1))

    def embedding_sum(self, out: torch.Tensor, i: int, x: torch.Tensor, weight: Optional[torch.Tensor],
                      c: torch.Tensor, backend: Optional[Backend] = None) -> torch.Tensor:
        """out (ncent, M) + sum_e weight_e G_i(x_e) per centre; x, weight (None: 1), c (n,), c ascending."""
        if self.compressed:  # the fused kernels with rows (x, weight, 0, 0) where they apply
            zero = torch.zeros_like(x)
            w = torch.ones_like(x) if weight is None else weight
            fused = self._fused_block(i, torch.stack([x, w, zero, zero], 1), c, out.shape[0], backend)
            if fused is not None:
                return out + fused[:, 1]
        g = self.embed(i, x, backend)
        if weight is not None:
            g = weight.unsqueeze(1) * g
        if self.compressed:  # (summed apart, as the fused kernels sum)
            return out + g.new_zeros(out.shape).index_add(0, c, g)
        return out.index_add(0, c, g)

    def embedding_block(self, i: int, r: torch.Tensor, c: torch.Tensor, ncent: int, per_center: int = 0,
                        backend: Optional[Backend] = None) -> torch.Tensor:
        """sum_e r_e^T G_i(r_e[0]) per centre (ncent, 4, M); rows r (n, 4), centres c (n,) ascending (per_center
        > 0: every centre has exactly that many edges): the fused table kernels where they apply, training's
        contraction of a linearised net (it differentiates again), else G (embed) and _block."""
        if not torch.jit.is_scripting():
            backend = self.resolve_backend(backend, r)
        if self.compressed:
            fused = self._fused_block(i, r, c, ncent, backend)
            if fused is not None:
                return fused
        elif not torch.jit.is_scripting():
            if backend is not None and backend.any_order:
                tangent = self._tangent(i, r[:, 0], backend)
                if tangent is not None:
                    return contraction.contract_linearized(r, tangent[0], tangent[1], c, ncent)
        return self._block(r, self.embed(i, r[:, 0], backend), c, ncent, per_center, backend)

    def _block(self, r: torch.Tensor, g: torch.Tensor, c: torch.Tensor, ncent: int, per_center: int = 0,
               backend: Optional[Backend] = None) -> torch.Tensor:
        """sum_j R_j^T G_j (n_centers, 4, M) over the edges of one net: rows r (n, 4), embeddings g (n, M),
        centres c (n,) in ascending order; per_center > 0: every centre has exactly that many edges."""
        if not torch.jit.is_scripting():
            backend = self.resolve_backend(backend, r)
        if per_center > 0 and not torch.jit.is_scripting():
            if not backend.kernels and not backend.any_order:
                # padded layout: a dense block already, no counts to read back from the device
                return torch.bmm(r.view(ncent, per_center, 4).transpose(1, 2), g.view(ncent, per_center, self.width))
        if self.use_ops:  # frozen with the kernel library: a segment sum, no padding
            return torch.ops.dpmd.contract(r, g, c, ncent)
        if not torch.jit.is_scripting():
            if backend.kernels:
                return ops.contract(r, g, c, ncent)
            if backend.any_order:  # training: kernels that differentiate again
                return contraction.contract(r, g, c, ncent)
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

    @torch.jit.unused
    def _tangent(self, i: int, x: torch.Tensor, backend: Optional[Backend]):
        """(G, dG/dx) (n, M) of net i at x (n,) in one forward sweep, for the net linearised in x (exact value and
        first derivative, no double differentiation; dpmd.model.network) where the backend and the descriptor
        allow it (Backend.linearize, linearize_nets), else None."""
        if not self._linearizable(i, backend):
            return None
        return embedding_with_tangent(self.embeddings[i], x, weight_gradients=not backend.forces_only,
                                      fused=backend.any_order)

    @torch.jit.unused
    def _linearizable(self, i: int, backend: Optional[Backend]) -> bool:
        """Net i may run linearised in its input: a net, not a table, where the backend and the descriptor allow
        it (Backend.linearize, linearize_nets)."""
        return (not self.compressed and backend is not None and self.linearize_nets and backend.linearize
                and self.embeddings[i].can_linearize())

    @torch.jit.unused
    def _tables(self) -> List[torch.Tensor]:
        """The tables (for caches keyed on the weights): [table] when compressed, else none."""
        return [self.table] if self.compressed else []

    def _tabulate(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Embedding (n, M) of net i at inputs x (n,) from its quintic table (the reference evaluation; autograd
        differentiates the polynomial any number of times)."""
        interval, t = self._locate(x)
        coef = self.table[i].reshape(-1, self.width)  # rows interval * 6 + power
        g = coef.index_select(0, interval * 6 + 5)
        for p in range(4, -1, -1):  # Horner
            g = g * t + coef.index_select(0, interval * 6 + p)
        return g

    def _fused_block(self, i: int, r: torch.Tensor, c: torch.Tensor, ncent: int,
                     backend: Optional[Backend]) -> Optional[torch.Tensor]:
        """sum_e r_e^T G_i(r_e[0]) per centre (ncent, 4, M) of tabulated G in the fused kernels (the kernel library,
        Triton on CUDA; differentiable once: forces, not training); r (n, 4), c (n,) ascending.  None where they do
        not apply: no kernels, or an input below `lower` (the kernels know no coarse intervals there)."""
        if self.use_ops:  # frozen with the kernel library
            if self._fusable(r[:, 0]):
                return torch.ops.dpmd.tabulate_fusion_se_a(
                    self.table[i][self.table_coarse_low:], r, c, ncent, self.table_lower, self.table_upper,
                    self.table_step, self.table_step_coarse, self.table_fine, self.table_coarse)
        if not torch.jit.is_scripting():
            return self._fast_tabulated_block(i, r, c, ncent, backend)
        return None

    @torch.jit.unused
    def _fast_tabulated_block(self, i: int, r: torch.Tensor, c: torch.Tensor, ncent: int, backend: Optional[Backend]):
        """_fused_block in eager code (the backend says which kernels)."""
        from dpmd.ops import triton_tabulate

        if not self._fused_kernels(backend) or not self._fusable(r[:, 0]):
            return None
        table = self.table[i][self.table_coarse_low:]
        grid = (self.table_lower, self.table_upper, self.table_step, self.table_step_coarse, self.table_fine,
                self.table_coarse)
        if backend.kernels:
            return torch.ops.dpmd.tabulate_fusion_se_a(table, r, c, ncent, *grid)
        return triton_tabulate.tabulate_fusion(table, r, c, ncent, grid)

    @torch.jit.unused
    def _fused_kernels(self, backend: Optional[Backend]) -> bool:
        """The backend has fused table kernels for this (compressed) descriptor."""
        return self.compressed and backend is not None and (backend.kernels or backend.triton)

    def _fusable(self, x: torch.Tensor) -> bool:
        return self.table_coarse_low == 0 or not bool((x < self.table_lower).any())

    def _table_slack(self) -> float:
        # s >= 0 exactly, but float32 rounds the switch near rcut to about -1e-6: allow 1 % of a step below
        return 1e-4 * max(1.0, abs(self.table_lower))

    def outside_table(self, x: torch.Tensor) -> torch.Tensor:
        """Which table inputs lie outside the tables (bool, x's shape)."""
        return (x > self.table_end) | (x < self._table_start() - self._table_slack()) | torch.isnan(x)

    def table_violation(self, x: torch.Tensor) -> int:
        """Index of the first table input outside the tables, -1 if none."""
        bad = self.outside_table(x)
        if not bool(bad.any()):
            return -1
        return int(bad.nonzero()[0, 0])

    def in_coarse_range(self, x: torch.Tensor) -> torch.Tensor:
        """Which table inputs lie in the coarse (extrapolated) range (bool, x's shape)."""
        if self.table_coarse_low > 0:
            return (x >= self.table_upper) | (x < self.table_lower)
        return x >= self.table_upper

    def edge_outside_table(self, edge_vec: torch.Tensor, center_type_of_edge: torch.Tensor) -> int:
        """Index of the first edge (vectors (E, 3)) outside the tables, -1 if none."""
        if edge_vec.shape[0] == 0:
            return -1
        return self.table_violation(self.edge_table_input(edge_vec.to(self.mean.dtype), center_type_of_edge))

    def table_message(self, where: str, r: float, center_type: int) -> str:
        """One line for an edge outside the tables (`where` names the atoms)."""
        return outside_table_message(where, r, self.table_rmin[center_type], center_type)

    def _check_table(self, x: torch.Tensor, edge_vec: torch.Tensor, center: torch.Tensor, center_type: torch.Tensor,
                     neighbor_type: torch.Tensor, deferred_check: bool = False, real: Optional[torch.Tensor] = None):
        """Never extrapolate silently: an edge whose table input x (one per edge) is beyond the tables is an
        error; with check_frequency N > 0, every N-th evaluation also warns about inputs in the coarse range.
        deferred_check: without a read back from the device when a caller collects flags (_check_table_deferred).
        real: which inputs are real neighbours (the others are not looked up).  Nothing to check in an
        uncompressed model."""
        if self.compressed:
            if real is not None:
                x = torch.where(real, x, torch.full_like(x, self.table_lower))
            if deferred_check and not torch.jit.is_scripting():
                self._check_table_deferred(x, edge_vec, center, center_type, neighbor_type)
            else:
                self._report_table(self.table_violation(x), self.in_coarse_range(x), edge_vec, center, center_type,
                                   neighbor_type)

    @torch.jit.unused
    def _check_table_deferred(self, x: torch.Tensor, edge_vec, center, center_type, neighbor_type) -> None:
        """_check_table without a read back from the device when a caller collects flags (dpmd.model.deferred:
        the MD engine's sync-free steps); the flag's owner reruns the checked path to name the atoms."""
        if not deferred.record(self.outside_table(x).any()):
            self._check_table(x, edge_vec, center, center_type, neighbor_type)

    def _report_table(self, k: int, coarse: torch.Tensor, edge_vec: torch.Tensor, center: torch.Tensor,
                      center_type: torch.Tensor, neighbor_type: torch.Tensor) -> None:
        """k: the first edge outside the tables (-1: none); coarse.sum(): inputs in the coarse range."""
        if k >= 0:
            r = float(torch.linalg.vector_norm(edge_vec[k].detach(), 2.0, dim=-1))
            tc = int(center_type[center[k]])
            where = "an edge from a type-" + str(tc) + " centre to a type-" + str(int(neighbor_type[k])) + " neighbour"
            raise RuntimeError(self.table_message(where, r, tc))
        if self.check_frequency > 0:
            self.evaluations += 1
            if self.evaluations % self.check_frequency == 0:
                n = int(coarse.sum())
                if n > 0:
                    warnings.warn("dpmd: compressed model: " + str(n) + " edges in the coarse (extrapolated) part "
                                  + "of the embedding tables at evaluation " + str(self.evaluations))


def max_rmin(descriptors: list, ntypes: int) -> List[float]:
    """Per centre type, the shortest distance that every one of several compressed descriptors covers."""
    return [max(d.table_rmin[t] for d in descriptors) for t in range(ntypes)]
