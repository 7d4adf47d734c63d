"""``nn.Linear``: g_i = Σ_positions δ_i a_iᵀ (a single row: the outer product δ_i a_iᵀ).

Closed forms: Σ_i |δ_i a_iᵀ|^p = (|δ|^p)ᵀ |a|^p, one matmul, on one row per sample; per chunk of
samples (bmm) on sequences. The gradient sum Σ_i g_i is δᵀ a whatever the shape.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..quantity import GradientSum, Sums
from ..sums import chunks
from .base import Rule, pow_, register_rule


def _gradient_sums(a, d, attrs) -> dict:
    """Σ_i g_i: δᵀ a over every row and position, and Σ δ."""
    d2 = d.reshape(-1, d.shape[-1])
    out = {}
    if "weight" in attrs:
        out["weight"] = torch.mm(d2.t(), a.reshape(-1, a.shape[-1]))
    if "bias" in attrs:
        out["bias"] = d2.sum(0)
    return out


@register_rule(nn.Linear)
class LinearRule(Rule):
    params = ("weight", "bias")

    def sample_dims(self, module, x):
        return tuple(range(x.dim() - 1))  # any leading dimension ([N, in], [T, N, in], ...)

    def supports(self, module, x):
        return x.is_floating_point() and x.dim() >= 2

    def per_sample(self, module, a, d):
        n = a.shape[0]
        a3 = a.reshape(n, -1, a.shape[-1])
        d3 = d.reshape(n, -1, d.shape[-1])
        return {"weight": torch.bmm(d3.transpose(1, 2), a3), "bias": d3.sum(1)}

    def sums(self, module, a, d, req):
        power, want = req.power, req.attrs
        if isinstance(req.quantity, GradientSum):
            values = _gradient_sums(a, d, want)
            return Sums(values, dict(values) if req.totals else None)
        if power is None:  # another quantity: from the per-sample gradients
            return super().sums(module, a, d, req)
        values = {}
        if a.dim() == 2:
            # Σ_i |δ_i a_iᵀ|^p = (|δ|^p)ᵀ |a|^p: one matmul, no per-sample tensor.
            dp = pow_(d, power)
            if "weight" in want:
                values["weight"] = torch.mm(dp.t(), pow_(a, power))
            if "bias" in want:
                values["bias"] = dp.sum(0)
        else:
            n = a.shape[0]
            a3 = a.reshape(n, -1, a.shape[-1])
            d3 = d.reshape(n, -1, d.shape[-1])
            if "weight" in want:
                acc = torch.zeros(d3.shape[-1], a3.shape[-1], dtype=d.dtype, device=d.device)
                step = min(req.chunk, req.policy.chunk_bytes // max(acc.numel() * acc.element_size(), 1))
                for s, e in chunks(n, step):
                    acc += pow_(torch.bmm(d3[s:e].transpose(1, 2), a3[s:e]), power).sum(0)
                values["weight"] = acc
            if "bias" in want:
                values["bias"] = pow_(d3.sum(1), power).sum(0)
        return Sums(values, _gradient_sums(a, d, want) if req.totals else None)

    def column_sums(self, module, a, d, req):
        if a.dim() != 2 or req.power is None:
            return super().column_sums(module, a, d, req)
        # K cotangents per sample, one row each: Σ_{k,i} |δ_{k,i} a_iᵀ|^p = (Σ_k |δ_k|^p)ᵀ |a|^p.
        acc = _ColumnPowers(a, d.shape[1:], req.power, req.attrs & {"weight", "bias"})
        acc.add(d)
        totals = None
        if req.totals:
            ds = d.sum(0)
            totals = {}
            if "weight" in req.attrs:
                totals["weight"] = torch.mm(ds.t(), a)
            if "bias" in req.attrs:
                totals["bias"] = ds.sum(0)
        return Sums(acc.result(), totals)

    def column_accumulator(self, module, a, out_shape, req):
        if a.dim() != 2 or req.power is None:
            return None
        return _ColumnPowers(a, out_shape, req.power, req.attrs & {"weight", "bias"})


class _ColumnPowers:
    """Σ_k |δ_k|^p per sample and output as the columns arrive ([N, out]); at the end
    Σ_{k,i} |δ_{k,i} a_iᵀ|^p = (Σ_k |δ_k|^p)ᵀ |a|^p, one matmul for all K columns."""

    def __init__(self, a, out_shape, power, covers):
        self.a, self.power, self.covers = a, power, tuple(covers)
        self.dp = None  # [N, out]
        self.nbytes = math.prod(out_shape) * a.element_size()

    def add(self, d):
        """``d``: [k, N, out], k columns of this piece, added one at a time (no temporary of d's
        size)."""
        if self.dp is None:
            self.dp = torch.zeros_like(d[0])
        for dk in d:
            if self.power == 2:
                self.dp.addcmul_(dk, dk)
            else:
                self.dp.add_(dk.abs())

    def result(self) -> dict:
        out = {}
        if self.dp is not None:
            if "weight" in self.covers:
                out["weight"] = torch.mm(self.dp.t(), pow_(self.a, self.power))
            if "bias" in self.covers:
                out["bias"] = self.dp.sum(0)
        return out
