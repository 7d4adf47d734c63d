"""The penalty kernel of a Kronecker-factored layer: value and gradient from two products a block.

A layer's state is a quadratic in Δ = [W | b] − μ (the weight as a matrix [out, in·kernel], the
bias as the last column when it shares the block):

    R(Δ) = ⟨Δ, Q(Δ)⟩ + 2 ⟨Δ, B⟩ + c,      Q(X) = Σ_t G_t X A_t,

with one pair (A_t, G_t) per kept block (:mod:`.kron_state`). Its gradient is 2 (Q(Δ) + B). The
forward forms M = Q(Δ) + B (two matrix products a block) and keeps it; the value is
⟨Δ, M + B⟩ + c, and the backward is 2 · factor · M: no product is formed twice. Under
``create_graph=True`` the backward forms M again from the saved parameters, differentiably, so second
derivatives (Hessian-vector products: 2 · factor · Q(V)) are right; that path is not the training step.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

__all__ = ["kron_penalty", "kron_apply"]


def kron_apply(delta: Tensor, pairs: Sequence[Tuple[Tensor, Tensor]]) -> Tensor:
    """Q(Δ) = Σ_t G_t Δ A_t."""
    out = None
    for a, g in pairs:
        term = torch.linalg.multi_dot([g, delta, a])
        out = term if out is None else out.add_(term)
    return out


class _KronQuadratic(torch.autograd.Function):
    @staticmethod
    def forward(ctx, factor: float, pairs, mu: Tensor, lin: Optional[Tensor], const: Tensor,
                weight: Tensor, bias: Optional[Tensor]):
        w = weight.detach().reshape(weight.shape[0], -1)
        theta = w if bias is None else torch.cat([w, bias.detach().unsqueeze(1)], 1)
        delta = theta.to(mu.dtype) - mu
        m = kron_apply(delta, pairs)
        if lin is not None:
            m = m.add_(lin)
            value = torch.dot(delta.reshape(-1), (m + lin).reshape(-1))
        else:
            value = torch.dot(delta.reshape(-1), m.reshape(-1))
        ctx.save_for_backward(m, weight, bias)  # the parameters: read back only under create_graph
        ctx.factor, ctx.pairs, ctx.mu, ctx.lin = factor, pairs, mu, lin
        ctx.shapes = (weight.shape, weight.dtype, None if bias is None else bias.dtype)
        return (value.to(torch.float64) + const).mul_(factor).to(weight.dtype)

    @staticmethod
    def backward(ctx, grad):
        m, weight, bias = ctx.saved_tensors
        wshape, wdtype, bdtype = ctx.shapes
        if torch.is_grad_enabled():  # create_graph=True: M again, as a function of the parameters
            w = weight.reshape(wshape[0], -1)
            theta = w if bias is None else torch.cat([w, bias.unsqueeze(1)], 1)
            m = kron_apply(theta.to(ctx.mu.dtype) - ctx.mu, ctx.pairs)
            if ctx.lin is not None:
                m = m + ctx.lin
        g = m.mul(grad.to(m.dtype) * (2.0 * ctx.factor))
        gw = g[:, :wshape[1:].numel()].reshape(wshape).to(wdtype)
        gb = None if bdtype is None else g[:, -1].to(bdtype)
        return None, None, None, None, None, gw, gb


def kron_penalty(factor: float, pairs, mu: Tensor, lin: Optional[Tensor], const: Tensor,
                 weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """factor · (⟨Δ, Q(Δ)⟩ + 2⟨Δ, lin⟩ + const) of one layer, autograd-visible in ``weight`` and
    ``bias`` (Δ = [weight | bias] − mu; ``const`` a float64 scalar; ``lin`` None for zero)."""
    return _KronQuadratic.apply(float(factor), pairs, mu, lin, const, weight, bias)
