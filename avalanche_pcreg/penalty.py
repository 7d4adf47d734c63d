"""Penalty kernels: ``factor * (sum_i A_i * (theta_i - mu_i)**2 + c)``.

Framework-free (torch only). Two implementations sit side by side, as in ``torch/optim``:

* ``foreach``: multi-tensor ``torch._foreach_*`` kernels, a handful of launches whatever the
  number of parameters (the default on CUDA);
* ``forloop``: one small kernel chain per parameter (the reference, and the default on CPU
  where the multi-tensor path has no fused kernels and loses to a plain loop on small models).

Both run inside one ``torch.autograd.Function`` so the penalty is an ordinary node of the loss
graph (other plugins see it in ``strategy.loss``), while the backward is a single scaled copy of
``A * (theta - mu)`` saved by the forward: ``d/dtheta = 2 * factor * A * (theta - mu)``.
No ``.item()`` or other host-device synchronisation happens here.

``A`` must be non-negative: the foreach path reduces ``A * d**2`` with an L1 norm.
Callers (:class:`~avalanche_pcreg.state.ConsolidatedState`,
:class:`~avalanche_pcreg.regularizer.ParameterChangeReg`) validate this once, not every step.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

__all__ = ["quadratic_penalty", "default_impl"]

_IMPLS = ("foreach", "forloop")


def default_impl(tensors: Sequence[Tensor]) -> str:
    """``"foreach"`` on CUDA, ``"forloop"`` elsewhere."""
    if tensors and tensors[0].is_cuda:
        return "foreach"
    return "forloop"


def _forward_foreach(params, weights, anchors):
    diffs = torch._foreach_sub(params, anchors)
    wdiffs = torch._foreach_mul(diffs, weights)
    torch._foreach_mul_(diffs, wdiffs)  # A * d**2 >= 0, so its L1 norm is its sum
    value = torch.stack(torch._foreach_norm(diffs, 1)).sum()
    return value, wdiffs


def _forward_forloop(params, weights, anchors):
    wdiffs = []
    value = None
    for p, w, a in zip(params, weights, anchors):
        d = p - a
        wd = d * w
        term = torch.dot(wd.reshape(-1), d.reshape(-1))
        value = term if value is None else value + term
        wdiffs.append(wd)
    return value, wdiffs


class _QuadraticPenalty(torch.autograd.Function):
    @staticmethod
    def forward(ctx, factor, const, impl, weights, anchors, *params):
        with torch.no_grad():
            if impl == "foreach":
                value, wdiffs = _forward_foreach(params, weights, anchors)
            else:
                value, wdiffs = _forward_forloop(params, weights, anchors)
            if const is not None:
                value = value + const
            value = value * factor
        ctx.factor = factor
        ctx.impl = impl
        ctx.save_for_backward(*wdiffs)
        return value

    @staticmethod
    def backward(ctx, grad_out):
        wdiffs = ctx.saved_tensors
        scale = grad_out * (2.0 * ctx.factor)
        if ctx.impl == "foreach":
            grads = torch._foreach_mul(wdiffs, scale)
        else:
            grads = [wd * scale for wd in wdiffs]
        return (None, None, None, None, None, *grads)


def quadratic_penalty(
    params: Sequence[Tensor],
    weights: Sequence[Tensor],
    anchors: Sequence[Tensor],
    factor: float,
    const: Optional[Tensor] = None,
    impl: Optional[str] = None,
) -> Tensor:
    """``factor * (sum_i sum(weights_i * (params_i - anchors_i)**2) + const)``.

    ``params``, ``weights`` and ``anchors`` are equally long sequences of same-shaped tensors.
    The gradient flows to ``params`` only. ``const`` is an optional 0-dim tensor that changes
    the value, not the gradient. ``impl`` is ``"foreach"``, ``"forloop"`` or None (automatic).
    An empty sequence gives a zero that still carries ``requires_grad=False``.
    """
    if impl is None:
        impl = default_impl(params)
    elif impl not in _IMPLS:
        raise ValueError(f"impl must be one of {_IMPLS}, got {impl!r}")
    if not params:
        z = torch.zeros(())
        return z if const is None else (const * factor)
    return _QuadraticPenalty.apply(
        float(factor), const, impl, tuple(weights), tuple(anchors), *params
    )
