"""The se_e2_a contraction T[c] = sum_{e of c} rows[e]^T emb[e] as three kernel-library ops closed under
differentiation, so that training (whose force loss differentiates the forces again) can use them:

    contract(a (E,K), b (E,M))  -> T (ncent,K,M)   d/da = project(b, dT)     d/db = expand(a, dT)
    expand(a (E,K), T)          -> (E,M)            d/da = project(gout, T)  d/dT = contract(a, gout)
    project(b (E,M), T)         -> (E,K)            d/db = expand(gout, T)   d/dT = contract(gout, b)

Edges are sorted by centre (`center` ascending).  CPU, and CUDA in a CUDA build; the PyTorch reference is DescriptorSeA._block.

contract_linearized is the same contraction with an embedding linearised in s = rows[:, 0]
(dpmd.model.network): emb = g + (s - s0) g', so d/drows gains r . project(g', dT) in column 0.
"""

from __future__ import annotations

import torch


def _needed(ctx, i: int, tensor: torch.Tensor) -> bool:
    """Does this backward pass need the gradient of input i?  ctx.needs_input_grad says whether it could;
    the engine knows whether the current pass reaches it (a force pass never reaches the weights, the
    trainer's weight pass never reaches the edge vectors), which saves an edge-sized kernel each time."""
    if not ctx.needs_input_grad[i]:
        return False
    try:
        return torch._C._will_engine_execute_node(torch.autograd.graph.get_gradient_edge(tensor).node)
    except (AttributeError, RuntimeError):  # an older torch, or not inside a backward pass: compute it
        return True


class _Contract(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, center, ncent: int):
        ctx.save_for_backward(a, b, center)
        return torch.ops.dpmd.contract(a, b, center, ncent)

    @staticmethod
    def backward(ctx, grad):
        a, b, center = ctx.saved_tensors
        da = _Project.apply(b, grad, center) if _needed(ctx, 0, a) else None
        db = _Expand.apply(a, grad, center) if _needed(ctx, 1, b) else None
        return da, db, None, None


class _Expand(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, t, center):
        ctx.save_for_backward(a, t, center)
        return torch.ops.dpmd.edge_expand(a, t, center)

    @staticmethod
    def backward(ctx, grad):
        a, t, center = ctx.saved_tensors
        da = _Project.apply(grad, t, center) if _needed(ctx, 0, a) else None
        dt = _Contract.apply(a, grad, center, t.shape[0]) if _needed(ctx, 1, t) else None
        return da, dt, None


class _Project(torch.autograd.Function):
    @staticmethod
    def forward(ctx, b, t, center):
        ctx.save_for_backward(b, t, center)
        return torch.ops.dpmd.edge_project(b, t, center)

    @staticmethod
    def backward(ctx, grad):
        b, t, center = ctx.saved_tensors
        db = _Expand.apply(grad, t, center) if _needed(ctx, 0, b) else None
        dt = _Contract.apply(grad, b, center, t.shape[0]) if _needed(ctx, 1, t) else None
        return db, dt, None


class _ContractLinearized(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, g, gp, center, ncent: int):
        ctx.save_for_backward(a, g, gp, center)
        return torch.ops.dpmd.contract(a, g, center, ncent)

    @staticmethod
    def backward(ctx, grad):
        a, g, gp, center = ctx.saved_tensors
        da = dg = None
        if _needed(ctx, 0, a):
            ds = (a * _Project.apply(gp, grad, center)).sum(1, keepdim=True)
            da = _Project.apply(g, grad, center) + torch.cat([ds, torch.zeros_like(a[:, 1:])], 1)
        if _needed(ctx, 1, g):
            dg = _Expand.apply(a, grad, center)
        return da, dg, None, None, None


def contract(rows: torch.Tensor, emb: torch.Tensor, center: torch.Tensor, ncent: int) -> torch.Tensor:
    """T (ncent, K, M), differentiable to any order in rows and emb."""
    return _Contract.apply(rows.contiguous(), emb.contiguous(), center.contiguous(), ncent)


def contract_linearized(rows: torch.Tensor, g: torch.Tensor, gp: torch.Tensor, center: torch.Tensor,
                        ncent: int) -> torch.Tensor:
    """T (ncent, K, M) of rows with the embedding g + (rows[:, 0] - s0) gp (value g; see the module doc)."""
    return _ContractLinearized.apply(rows.contiguous(), g.contiguous(), gp.contiguous(), center.contiguous(), ncent)
