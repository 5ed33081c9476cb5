"""Triton kernels of the compressed model's fused tabulated embedding x environment-matrix contraction.

The same contraction as torch.ops.dpmd.tabulate_fusion_se_a (csrc/kernels/tabulate.h) for CUDA tensors:

    T[c] = sum_{e: center[e] = c} rows[e]^T G(rows[e][0])        (ncent, 4, M)

with G the piecewise quintic table of one embedding net (dpmd.model.compress; layout (intervals, 6, M)).
`tabulate_fusion` is differentiable once (forces), like the C++ op.  The descriptor uses it on CUDA
devices when the kernel library is not loaded.  Tests run it on the CPU with TRITON_INTERPRET=1.
Triton is optional: `available()` is False when it cannot be imported.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # optional extra
    triton = None


def available() -> bool:
    return triton is not None


if triton is not None:

    @triton.jit
    def _locate(x, lower, upper, step, step_coarse, n_fine, n_coarse):
        """Interval index and offset t = x - node (x clamped to the first/last interval)."""
        kf = tl.minimum(tl.maximum(tl.floor((x - lower) / step), 0.0), n_fine - 1.0)
        kc = tl.minimum(tl.maximum(tl.floor((x - upper) / step_coarse), 0.0), n_coarse - 1.0)
        fine = x < upper
        node = tl.where(fine, lower + kf * step, upper + kc * step_coarse)
        interval = tl.where(fine, kf, kc + n_fine).to(tl.int64)
        return interval, x - node

    @triton.jit
    def _forward_kernel(table, rows, offsets, out, m, lower, upper, step, step_coarse, n_fine, n_coarse,
                        BLOCK_M: tl.constexpr):
        c = tl.program_id(0)
        k = tl.arange(0, BLOCK_M)
        mask = k < m
        acc0 = tl.zeros([BLOCK_M], dtype=out.dtype.element_ty)
        acc1 = tl.zeros([BLOCK_M], dtype=out.dtype.element_ty)
        acc2 = tl.zeros([BLOCK_M], dtype=out.dtype.element_ty)
        acc3 = tl.zeros([BLOCK_M], dtype=out.dtype.element_ty)
        start = tl.load(offsets + c)
        end = tl.load(offsets + c + 1)
        for e in range(start, end):
            r0 = tl.load(rows + e * 4)
            r1 = tl.load(rows + e * 4 + 1)
            r2 = tl.load(rows + e * 4 + 2)
            r3 = tl.load(rows + e * 4 + 3)
            interval, t = _locate(r0, lower, upper, step, step_coarse, n_fine, n_coarse)
            coef = table + interval * 6 * m + k
            g = tl.load(coef + 5 * m, mask=mask, other=0.0)
            g = g * t + tl.load(coef + 4 * m, mask=mask, other=0.0)
            g = g * t + tl.load(coef + 3 * m, mask=mask, other=0.0)
            g = g * t + tl.load(coef + 2 * m, mask=mask, other=0.0)
            g = g * t + tl.load(coef + m, mask=mask, other=0.0)
            g = g * t + tl.load(coef, mask=mask, other=0.0)
            acc0 += r0 * g
            acc1 += r1 * g
            acc2 += r2 * g
            acc3 += r3 * g
        o = out + c * 4 * m + k
        tl.store(o, acc0, mask=mask)
        tl.store(o + m, acc1, mask=mask)
        tl.store(o + 2 * m, acc2, mask=mask)
        tl.store(o + 3 * m, acc3, mask=mask)

    @triton.jit
    def _backward_kernel(table, rows, center, grad_out, grad_rows, m, lower, upper, step, step_coarse, n_fine,
                         n_coarse, BLOCK_M: tl.constexpr):
        e = tl.program_id(0)
        k = tl.arange(0, BLOCK_M)
        mask = k < m
        r0 = tl.load(rows + e * 4)
        r1 = tl.load(rows + e * 4 + 1)
        r2 = tl.load(rows + e * 4 + 2)
        r3 = tl.load(rows + e * 4 + 3)
        interval, t = _locate(r0, lower, upper, step, step_coarse, n_fine, n_coarse)
        coef = table + interval * 6 * m + k
        c1 = tl.load(coef + m, mask=mask, other=0.0)
        c2 = tl.load(coef + 2 * m, mask=mask, other=0.0)
        c3 = tl.load(coef + 3 * m, mask=mask, other=0.0)
        c4 = tl.load(coef + 4 * m, mask=mask, other=0.0)
        c5 = tl.load(coef + 5 * m, mask=mask, other=0.0)
        g = ((((c5 * t + c4) * t + c3) * t + c2) * t + c1) * t + tl.load(coef, mask=mask, other=0.0)
        dg = (((5.0 * c5 * t + 4.0 * c4) * t + 3.0 * c3) * t + 2.0 * c2) * t + c1
        go = grad_out + tl.load(center + e) * 4 * m + k
        a0 = tl.load(go, mask=mask, other=0.0)
        a1 = tl.load(go + m, mask=mask, other=0.0)
        a2 = tl.load(go + 2 * m, mask=mask, other=0.0)
        a3 = tl.load(go + 3 * m, mask=mask, other=0.0)
        dx = tl.sum((a0 * r0 + a1 * r1 + a2 * r2 + a3 * r3) * dg, axis=0)
        tl.store(grad_rows + e * 4, tl.sum(a0 * g, axis=0) + dx)
        tl.store(grad_rows + e * 4 + 1, tl.sum(a1 * g, axis=0))
        tl.store(grad_rows + e * 4 + 2, tl.sum(a2 * g, axis=0))
        tl.store(grad_rows + e * 4 + 3, tl.sum(a3 * g, axis=0))


def _grid_args(grid: tuple):
    lower, upper, step, step_coarse, n_fine, n_coarse = grid
    return float(lower), float(upper), float(step), float(step_coarse), float(n_fine), float(n_coarse)


class _TabulateFusion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, table, rows, center, ncent: int, grid: tuple):
        table, rows, center = table.contiguous(), rows.contiguous(), center.contiguous()
        m = table.shape[2]
        offsets = torch.searchsorted(center, torch.arange(ncent + 1, device=center.device))
        out = rows.new_empty([ncent, 4, m])
        if ncent > 0:
            _forward_kernel[(ncent,)](table, rows, offsets, out, m, *_grid_args(grid),
                                      BLOCK_M=triton.next_power_of_2(m))
        ctx.save_for_backward(table, rows, center)
        ctx.grid = grid
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        table, rows, center = ctx.saved_tensors
        grad_rows = torch.empty_like(rows)
        n, m = rows.shape[0], table.shape[2]
        if n > 0:
            _backward_kernel[(n,)](table, rows, center, grad_out.contiguous(), grad_rows, m, *_grid_args(ctx.grid),
                                   BLOCK_M=triton.next_power_of_2(m))
        return None, grad_rows, None, None, None


def tabulate_fusion(table: torch.Tensor, rows: torch.Tensor, center: torch.Tensor, ncent: int,
                    grid: tuple) -> torch.Tensor:
    """T (ncent, 4, M) = sum over each centre's edges of rows^T G(rows[:, 0]); table (intervals, 6, M),
    rows (n, 4), center (n,) ascending, grid = (lower, upper, step, step_coarse, n_fine, n_coarse)."""
    if triton is None:
        raise RuntimeError("dpmd: triton is not installed (pip install triton)")
    return _TabulateFusion.apply(table, rows, center, ncent, grid)
