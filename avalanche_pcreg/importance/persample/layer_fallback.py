"""The per-layer fallback: per-sample gradients of one module's own parameters with ``torch.func``,
for modules without a rule (or parameters their rule does not cover, or a call it does not support).

``vmap`` over samples of ``grad`` of ⟨module(x_n), δ_n⟩, replaying the module's call on each
sample's captured inputs (:func:`layer_sums`); where the call cannot be vmapped, one ``vjp`` of the
call on the whole batch and δ masked to one sample (and column) at a time (:func:`masked_layer_sums`).
"""

from __future__ import annotations

from typing import Dict, List, Tuple

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from .plan import Axes
from .quantity import Quantity

__all__ = ["layer_sums", "masked_layer_sums"]


def layer_sums(m: nn.Module, attrs: List[str], params: List[Tensor], call, axes: Axes, deltas: list,
               batched: bool, dt: torch.dtype, quantity: Quantity, chunk: int) -> Tuple[Dict, Dict]:
    """``({attr: Σ_n term(g_n)}, {attr: Σ_n g_n})`` of ``m``'s parameters ``attrs`` (tensors
    ``params``) from the captured ``call`` and the δ of its outputs, ``chunk`` samples at a time."""
    from torch.func import functional_call, grad, vmap

    primals = {a: p.detach() for a, p in zip(attrs, params)}
    leaves, spec = tree_flatten((call.args, call.kwargs))
    in_axes, out_axes = axes.inputs, axes.outputs
    n = next(x.shape[a] for x, a in zip(leaves, in_axes) if a is not None)
    off = 1 if batched else 0
    live = [j for j, d in enumerate(deltas) if d is not None]
    pos = call.out_pos

    def f(ps, xs, ds):
        full = [x if a is None else x.unsqueeze(a) for x, a in zip(xs, in_axes)]
        args, kwargs = tree_unflatten(full, spec)
        out = functional_call(m, ps, tuple(args), dict(kwargs))
        outs, _ = tree_flatten(out)
        total = 0
        for j, d in zip(live, ds):
            total = total + (outs[pos[j]] * d.unsqueeze(out_axes[j])).sum()
        return total

    g_fn = grad(f)
    if batched:  # K cotangents per sample: inner vmap over them
        g_fn = vmap(g_fn, in_dims=(None, None, 0))
    vm = vmap(g_fn, in_dims=(None, list(in_axes), [out_axes[j] + off for j in live]))
    values = {a: torch.zeros(p.shape, dtype=dt, device=p.device) for a, p in zip(attrs, params)}
    totals = {a: torch.zeros_like(values[a]) for a in attrs}
    if not live:
        return values, totals
    step = max(1, chunk // (deltas[live[0]].shape[0] if batched else 1))
    red = (0, 1) if batched else (0,)
    for s in range(0, n, step):
        e = min(n, s + step)
        xs = [x if a is None else x.narrow(a, s, e - s) for x, a in zip(leaves, in_axes)]
        ds = [deltas[j].narrow(out_axes[j] + off, s, e - s) for j in live]
        g = vm(primals, xs, ds)
        for a in attrs:
            ga = g[a].to(dt)
            values[a] += quantity.of(ga).sum(red)
            totals[a] += ga.sum(red)
    return values, totals


def masked_layer_sums(m: nn.Module, attrs: List[str], params: List[Tensor], call, axes: Axes, deltas: list,
                      batched: bool, dt: torch.dtype, quantity: Quantity) -> Tuple[Dict, Dict]:
    """:func:`layer_sums` without per-sample calls: one vjp of the module's call on the whole
    batch, then δ masked to one sample (and one column) at a time."""
    from torch.func import functional_call, vjp

    primals = {a: p.detach() for a, p in zip(attrs, params)}
    pos = call.out_pos
    live = [j for j, d in enumerate(deltas) if d is not None]

    def f(ps):
        out = functional_call(m, ps, tuple(call.args), dict(call.kwargs))
        outs, _ = tree_flatten(out)
        return tuple(outs[pos[j]] for j in live)

    with torch.enable_grad():
        vals, vjp_fn = vjp(f, primals)
    values = {a: torch.zeros(p.shape, dtype=dt, device=p.device) for a, p in zip(attrs, params)}
    totals = {a: torch.zeros_like(values[a]) for a in attrs}
    if not live:
        return values, totals
    out_axes = axes.outputs
    n = vals[0].shape[out_axes[live[0]]]
    cols = deltas[live[0]].shape[0] if batched else 1
    for c in range(cols):
        for i in range(n):
            cot = []
            for j, v in zip(live, vals):
                d = deltas[j][c] if batched else deltas[j]
                z = torch.zeros_like(v)
                z.narrow(out_axes[j], i, 1).copy_(d.narrow(out_axes[j], i, 1))
                cot.append(z)
            (g,) = vjp_fn(tuple(cot))
            for a in attrs:
                ga = g[a].to(dt)
                values[a] += quantity.of(ga)
                totals[a] += ga
    return values, totals
