"""``nn.Embedding``: sample i's gradient of row v is the sum of δ over i's positions holding
index v; scatter-add per (sample, row), then square per sample before summing.

``scale_grad_by_freq=True`` divides the gradient of row v by the number of times v occurs in the
call's input. Over a batch that number counts every sample's occurrences, so the batch gradient
couples the samples. Sample i's own gradient -- the one a training step on sample i alone would
take -- divides by the occurrences within sample i; the rule uses those counts for the per-sample
sums and the batch counts for Σ_i g_i (what the engine compares with the true minibatch gradient).

``nn.EmbeddingBag`` has no rule (the per-layer fallback does it). With ``scale_grad_by_freq`` the
engine evaluates its call bag by bag (:func:`per_bag_embedding_bag`), bags being samples.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..quantity import Sums
from .base import Rule, register_rule


@register_rule(nn.Embedding)
class EmbeddingRule(Rule):
    params = ("weight",)

    def sample_dims(self, module, x):
        return tuple(range(x.dim()))

    def supports(self, module, x):
        return x.dim() >= 1 and not x.is_floating_point() and module.max_norm is None

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
        key = sample * v + flat
        out.index_add_(0, key, df)
        if module.scale_grad_by_freq:  # occurrences within each sample
            cnt = torch.zeros(a.shape[0] * v, dtype=d.dtype, device=d.device)
            cnt.index_add_(0, key, torch.ones_like(key, dtype=d.dtype))
            out /= cnt.clamp_min(1).unsqueeze(1)
        return {"weight": out.reshape(a.shape[0], v, dim)}

    def sums(self, module, a, d, req):
        if "weight" not in req.attrs:
            return Sums({}, {} if req.totals else None)
        flat, df, sample, v, dim = self._rows(module, a, d)
        freq = module.scale_grad_by_freq
        uniq, inv, cnt = torch.unique(sample * v + flat, return_inverse=True, return_counts=True)
        agg = torch.zeros(uniq.numel(), dim, dtype=d.dtype, device=d.device).index_add_(0, inv, df)
        if freq:  # sample i's gradient: occurrences within sample i
            agg /= cnt.to(d.dtype).unsqueeze(1)
        res = torch.zeros(v, dim, dtype=d.dtype, device=d.device).index_add_(0, uniq % v, req.quantity.of(agg))
        totals = None
        if req.totals:
            if freq:  # the minibatch gradient: occurrences over the whole call
                per_row = torch.bincount(flat, minlength=v).to(d.dtype)
                df = df / per_row[flat].unsqueeze(1)
            totals = {"weight": torch.zeros(v, dim, dtype=d.dtype, device=d.device).index_add_(0, flat, df)}
        return Sums({"weight": res}, totals)


def _occurrences(key: Tensor) -> Tensor:
    """For each entry of the 1-D integer ``key``, how many entries hold the same value."""
    srt = key.sort().values
    return torch.searchsorted(srt, key, right=True) - torch.searchsorted(srt, key)


def per_bag_embedding_bag(m: nn.EmbeddingBag, args, kwargs, out: Tensor) -> Tensor:
    """The output of an ``nn.EmbeddingBag(scale_grad_by_freq=True)`` call with the gradient each
    bag would get in a call of its own: the gradient of row v from bag b is divided by the
    occurrences of v within bag b, not within the whole call. The values are ``out``'s exactly
    (the original output, detached, plus an exact zero that carries the gradient)."""
    x = args[0] if args else kwargs["input"]
    offsets = args[1] if len(args) > 1 else kwargs.get("offsets")
    psw = args[2] if len(args) > 2 else kwargs.get("per_sample_weights")
    w = m.weight
    flat = x.reshape(-1).long()
    pos = torch.arange(flat.numel(), device=flat.device)
    if x.dim() == 2:
        bag = pos // max(x.shape[1], 1)
    else:
        starts = offsets[:-1] if m.include_last_offset else offsets
        bag = torch.searchsorted(starts.long().contiguous(), pos, right=True) - 1
    cnt = _occurrences(bag * w.shape[0] + flat).to(w.dtype)
    rows = F.embedding(flat, w)  # the module's own call has already applied max_norm, if any
    rows = rows + (1 / cnt - 1).unsqueeze(1) * (rows - rows.detach())  # gradient scaled by 1/cnt
    pad = None
    if m.padding_idx is not None:
        pad = flat.numel()
        rows = torch.cat([rows, rows.new_zeros(1, rows.shape[1])])
        pos = torch.where(flat == m.padding_idx, torch.full_like(pos, pad), pos)
    iso = F.embedding_bag(pos.reshape(x.shape), rows, offsets if x.dim() == 1 else None, mode=m.mode,
                          per_sample_weights=psw, include_last_offset=m.include_last_offset, padding_idx=pad)
    return out.detach() + (iso - iso.detach())
