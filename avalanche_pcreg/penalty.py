"""Penalty kernels: ``factor * (sum_i A_i * (theta_i - mu_i)**2 + c)``.

Framework-free (torch only). Two implementations sit side by side, as in ``torch/optim``:

* ``foreach``: multi-tensor ``torch._foreach_*`` kernels, a handful of launches whatever the
  number of parameters; the default on CUDA, where the caching allocator makes temporaries free
  and kernel launches are what costs;
* ``forloop``: one short kernel chain per parameter; the default on the CPU.

Both run inside one ``torch.autograd.Function``, so the penalty is an ordinary node of the loss
graph (other plugins see it in ``strategy.loss``; ``torch.autograd.grad`` works through it),
while its backward is a single scaled copy of ``A * (theta - mu)`` saved by the forward:
``d/dtheta = 2 * factor * A * (theta - mu)``. Nothing here synchronises host and device. Every
gradient is a fresh tensor: nothing handed out by the backward is reused by a later step.

``A`` must be non-negative (the foreach path reduces ``A * d**2`` with an L1 norm). Callers
(:class:`~avalanche_pcreg.state.ConsolidatedState`, :class:`~avalanche_pcreg.regularizer.ParameterChangeReg`)
validate this once, not every step.
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
    # accumulated in float64: a float32 L1 norm over millions of entries drifts by ~1e-4
    value = torch.stack(torch._foreach_norm(diffs, 1, dtype=torch.float64)).sum().to(params[0].dtype)
    return value, wdiffs


def _forward_forloop(params, weights, anchors):
    wdiffs, dots = [], []
    for p, w, a in zip(params, weights, anchors):
        d = p - a
        wd = d * w
        wdiffs.append(wd)
        dots.append(torch.dot(wd.reshape(-1), d.reshape(-1)))
    value = dots[0] if len(dots) == 1 else torch.stack(dots).sum()
    return value, wdiffs


class _QuadraticPenalty(torch.autograd.Function):
    @staticmethod
    def forward(ctx, factor, const, impl, weights, anchors, *params):
        device_type = params[0].device.type
        with torch.no_grad(), torch.autocast(device_type=device_type, enabled=False):
            if impl == "foreach":
                value, wdiffs = _forward_foreach(params, weights, anchors)
            else:
                value, wdiffs = _forward_forloop(params, weights, anchors)
            if const is not None:
                # a float64 constant (one too large for the parameters' dtype) makes the value float64
                value = value.to(torch.promote_types(value.dtype, const.dtype)) + const
            value = value * factor
        ctx.factor = factor
        ctx.impl = impl
        ctx.weights, ctx.anchors = weights, anchors
        ctx.save_for_backward(*wdiffs, *params)
        return value

    @staticmethod
    def backward(ctx, grad_out):
        saved = ctx.saved_tensors
        wdiffs, params = saved[: len(saved) // 2], saved[len(saved) // 2 :]
        scale = grad_out * (2.0 * ctx.factor)
        if torch.is_grad_enabled():
            # create_graph=True: a differentiable backward, so second derivatives
            # (2 * factor * A on the diagonal) are right. Not the hot path.
            grads = [(scale * w * (p - a)).to(p.dtype) for p, w, a in zip(params, ctx.weights, ctx.anchors)]
        else:
            scale = scale.to(wdiffs[0].dtype)
            if ctx.impl == "foreach":
                grads = torch._foreach_mul(wdiffs, scale)
            else:
                grads = [wd * scale for wd in wdiffs]
            if grads[0].dtype != params[0].dtype:  # float32 state of bf16/fp16 parameters
                grads = [g.to(p.dtype) for g, p in zip(grads, params)]
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

    ``params``, ``weights`` and ``anchors`` are equally long sequences of same-shaped tensors
    (``weights`` >= 0). The gradient flows to ``params`` only. ``const`` is an optional 0-dim
    tensor that changes the value, not the gradient. ``impl`` is ``"foreach"``, ``"forloop"``
    or None (automatic). Computed in the promoted dtype of the parameters and the weights
    (float32 state of bf16 parameters: float32) with autocast disabled; a float64 ``const``
    makes the value float64. The gradient has the parameters' dtype.
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
