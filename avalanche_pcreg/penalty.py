"""Penalty kernels: ``factor * (sum_i A_i * (theta_i - mu_i)**2 + c)``.

Framework-free (torch only). Two implementations sit side by side, as in ``torch/optim``:

* ``foreach``: multi-tensor ``torch._foreach_*`` kernels, a handful of launches whatever the
  number of parameters; the default on CUDA, where the caching allocator makes temporaries free
  and kernel launches are what costs;
* ``forloop``: one short kernel chain per parameter; the default on the CPU. With a
  :class:`Workspace` it writes into persistent buffers, because on the CPU allocating (and
  page-faulting) fresh parameter-sized temporaries every step costs more than the arithmetic.

Both run inside one ``torch.autograd.Function``, so the penalty is an ordinary node of the loss
graph (other plugins see it in ``strategy.loss``; ``torch.autograd.grad`` works through it),
while its backward is a single scaled copy of ``A * (theta - mu)`` saved by the forward:
``d/dtheta = 2 * factor * A * (theta - mu)``. Nothing here synchronises host and device.

``A`` must be non-negative (the foreach path reduces ``A * d**2`` with an L1 norm). Callers
(:class:`~avalanche_pcreg.state.ConsolidatedState`, :class:`~avalanche_pcreg.regularizer.ParameterChangeReg`)
validate this once, not every step.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import Tensor

__all__ = ["quadratic_penalty", "default_impl", "Workspace"]

_IMPLS = ("foreach", "forloop")


def default_impl(tensors: Sequence[Tensor]) -> str:
    """``"foreach"`` on CUDA, ``"forloop"`` elsewhere."""
    if tensors and tensors[0].is_cuda:
        return "foreach"
    return "forloop"


class Workspace:
    """Persistent scratch buffers for the for-loop kernel (two parameter-sized tensors each).

    One graph at a time uses them: a second penalty built before the first one's backward
    (``busy``) falls back to fresh temporaries. The buffer read by the backward is saved with
    ``save_for_backward``, so an overwrite while a graph still needs it raises instead of
    giving a wrong gradient. Gradients are returned in these buffers; autograd copies or adds
    them into ``.grad`` and never keeps them there.
    """

    def __init__(self):
        self._bufs: List[Tensor] = []
        self.busy = False

    def buffers(self, params: Sequence[Tensor]):
        shapes = [(tuple(p.shape), p.dtype, p.device) for p in params]
        if [(tuple(b.shape), b.dtype, b.device) for b in self._bufs[0::2]] != shapes:
            self._bufs = [torch.empty(s, dtype=d, device=dev) for s, d, dev in shapes for _ in (0, 1)]
        return self._bufs[0::2], self._bufs[1::2]

    def release(self) -> None:
        self.busy = False

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._bufs)


def _forward_foreach(params, weights, anchors):
    diffs = torch._foreach_sub(params, anchors)
    wdiffs = torch._foreach_mul(diffs, weights)
    torch._foreach_mul_(diffs, wdiffs)  # A * d**2 >= 0, so its L1 norm is its sum
    # accumulated in float64: a float32 L1 norm over millions of entries drifts by ~1e-4
    value = torch.stack(torch._foreach_norm(diffs, 1, dtype=torch.float64)).sum().to(params[0].dtype)
    return value, wdiffs, None


def _forward_forloop(params, weights, anchors, workspace: Optional[Workspace]):
    if workspace is not None:
        diffs, wdiffs = workspace.buffers(params)
        for p, w, a, d, wd in zip(params, weights, anchors, diffs, wdiffs):
            torch.sub(p, a, out=d)
            torch.mul(d, w, out=wd)
    else:
        diffs = [p - a for p, a in zip(params, anchors)]
        wdiffs = [d * w for d, w in zip(diffs, weights)]
    dots = [torch.dot(wd.reshape(-1), d.reshape(-1)) for wd, d in zip(wdiffs, diffs)]
    value = dots[0] if len(dots) == 1 else torch.stack(dots).sum()
    # The backward writes the gradients into the (now free) difference buffers.
    return value, wdiffs, (diffs if workspace is not None else None)


class _QuadraticPenalty(torch.autograd.Function):
    @staticmethod
    def forward(ctx, factor, const, impl, workspace, weights, anchors, *params):
        device_type = params[0].device.type
        with torch.no_grad(), torch.autocast(device_type=device_type, enabled=False):
            if impl == "foreach":
                value, wdiffs, out = _forward_foreach(params, weights, anchors)
            else:
                value, wdiffs, out = _forward_forloop(params, weights, anchors, workspace)
            if const is not None:
                value = value + const
            value = value * factor
        ctx.factor = factor
        ctx.impl = impl
        ctx.out = out
        ctx.workspace = workspace if out is not None else None
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
            if ctx.workspace is not None:
                ctx.workspace.release()
            grads = [scale * w * (p - a) for p, w, a in zip(params, ctx.weights, ctx.anchors)]
        elif ctx.impl == "foreach":
            grads = torch._foreach_mul(wdiffs, scale)
        elif ctx.out is not None:
            grads = ctx.out
            for wd, g in zip(wdiffs, grads):
                torch.mul(wd, scale, out=g)
            ctx.workspace.release()
        else:
            grads = [wd * scale for wd in wdiffs]
        return (None, None, None, None, None, None, *grads)


def quadratic_penalty(
    params: Sequence[Tensor],
    weights: Sequence[Tensor],
    anchors: Sequence[Tensor],
    factor: float,
    const: Optional[Tensor] = None,
    impl: Optional[str] = None,
    workspace: Optional[Workspace] = None,
) -> Tensor:
    """``factor * (sum_i sum(weights_i * (params_i - anchors_i)**2) + const)``.

    ``params``, ``weights`` and ``anchors`` are equally long sequences of same-shaped tensors
    (``weights`` >= 0). The gradient flows to ``params`` only. ``const`` is an optional 0-dim
    tensor that changes the value, not the gradient. ``impl`` is ``"foreach"``, ``"forloop"``
    or None (automatic). ``workspace`` lends persistent buffers to the for-loop kernel.
    Computed in the parameters' dtype with autocast disabled.
    """
    if impl is None:
        impl = default_impl(params)
    elif impl not in _IMPLS:
        raise ValueError(f"impl must be one of {_IMPLS}, got {impl!r}")
    if not params:
        z = torch.zeros(())
        return z if const is None else (const * factor)
    if workspace is not None:
        if workspace.busy or impl != "forloop":
            workspace = None
        else:
            workspace.busy = True
    return _QuadraticPenalty.apply(
        float(factor), const, impl, workspace, tuple(weights), tuple(anchors), *params
    )
