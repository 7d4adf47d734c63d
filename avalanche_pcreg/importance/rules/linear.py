"""``nn.Linear``: g_i = Σ_positions δ_i a_iᵀ (a single row: the outer product δ_i a_iᵀ)."""

from __future__ import annotations

import math

import torch
from torch import nn

from ._gemm import mm
from ._registry import Rule, _chunks, _pow, chunk_bytes, register_rule


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

    def sums(self, module, a, d, want, power, chunk, total):
        want = set(want)
        pows, tots = {}, {}
        if a.dim() == 2:
            # Σ_i |δ_i a_iᵀ|^p = (|δ|^p)ᵀ |a|^p: one matmul (oneDNN's where it applies, _gemm), no
            # per-sample tensor.
            dp = _pow(d, power)
            if "weight" in want:
                pows["weight"] = mm(dp.t(), _pow(a, power))
            if "bias" in want:
                pows["bias"] = dp.sum(0)
        else:
            n = a.shape[0]
            a3 = a.reshape(n, -1, a.shape[-1])
            d3 = d.reshape(n, -1, d.shape[-1])
            if "weight" in want:
                acc = torch.zeros(d3.shape[-1], a3.shape[-1], dtype=d.dtype, device=d.device)
                step = min(chunk, chunk_bytes(d.device) // max(acc.numel() * acc.element_size(), 1))
                for s, e in _chunks(n, step):
                    acc += _pow(torch.bmm(d3[s:e].transpose(1, 2), a3[s:e]), power).sum(0)
                pows["weight"] = acc
            if "bias" in want:
                pows["bias"] = _pow(d3.sum(1), power).sum(0)
        if total:
            d2 = d.reshape(-1, d.shape[-1])
            if "weight" in want:
                tots["weight"] = mm(d2.t(), a.reshape(-1, a.shape[-1]))
            if "bias" in want:
                tots["bias"] = d2.sum(0)
        return pows, (tots if total else None)

    def sums_multi(self, module, a, d, want, power, chunk, total):
        if a.dim() != 2:
            return super().sums_multi(module, a, d, want, power, chunk, total)
        # K cotangents per sample, one row each: Σ_{k,i} |δ_{k,i} a_iᵀ|^p = (Σ_k |δ_k|^p)ᵀ |a|^p.
        want = set(want)
        acc = _ColumnPowers(a, d.shape[1:], power, want & {"weight", "bias"})
        acc.add(d)
        pows, tots = acc.result(), {}
        if total:
            ds = d.sum(0)
            if "weight" in want:
                tots["weight"] = mm(ds.t(), a)
            if "bias" in want:
                tots["bias"] = ds.sum(0)
        return pows, (tots if total else None)

    def column_accumulator(self, module, a, out_shape, want, power, chunk, k, max_bytes):
        if a.dim() != 2:
            return None
        acc = _ColumnPowers(a, out_shape, power, set(want) & {"weight", "bias"})
        return acc if acc.nbytes <= max_bytes else None


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
                out["weight"] = mm(self.dp.t(), _pow(self.a, self.power))
            if "bias" in self.covers:
                out["bias"] = self.dp.sum(0)
        return out
