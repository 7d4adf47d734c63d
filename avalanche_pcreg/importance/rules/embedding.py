"""``nn.Embedding``: sample i's gradient of row v is the sum of δ over i's positions holding
index v; scatter-add per (sample, row), then square per sample before summing."""

from __future__ import annotations

import torch
from torch import nn

from ._registry import Rule, _pow, register_rule


@register_rule(nn.Embedding)
class EmbeddingRule(Rule):
    params = ("weight",)

    def sample_dims(self, module, x):
        return tuple(range(x.dim()))

    def supports(self, module, x):
        return (x.dim() >= 1 and not x.is_floating_point() and module.max_norm is None
                and not module.scale_grad_by_freq)

    def _rows(self, m, idx, d):
        n = idx.shape[0]
        v, dim = m.weight.shape
        flat = idx.reshape(-1).long()
        df = d.reshape(-1, dim)
        sample = torch.arange(n, device=idx.device).repeat_interleave(flat.numel() // max(n, 1))
        if m.padding_idx is not None:
            keep = flat != m.padding_idx
            flat, df, sample = flat[keep], df[keep], sample[keep]
        return flat, df, sample, v, dim

    def per_sample(self, module, a, d):
        flat, df, sample, v, dim = self._rows(module, a, d)
        out = torch.zeros(a.shape[0] * v, dim, dtype=d.dtype, device=d.device)
        out.index_add_(0, sample * v + flat, df)
        return {"weight": out.reshape(a.shape[0], v, dim)}

    def sums(self, module, a, d, want, power, chunk, total):
        if "weight" not in set(want):
            return {}, ({} if total else None)
        flat, df, sample, v, dim = self._rows(module, a, d)
        uniq, inv = torch.unique(sample * v + flat, return_inverse=True)
        agg = torch.zeros(uniq.numel(), dim, dtype=d.dtype, device=d.device).index_add_(0, inv, df)
        res = torch.zeros(v, dim, dtype=d.dtype, device=d.device).index_add_(0, uniq % v, _pow(agg, power))
        tots = None
        if total:
            tots = {"weight": torch.zeros(v, dim, dtype=d.dtype, device=d.device).index_add_(0, flat, df)}
        return {"weight": res}, tots
