"""``nn.Conv1d`` / ``nn.Conv2d``: per-sample weight gradients by unfold, chunk by chunk.

g_i = Σ_positions δ_i[:, l] u_i[:, l]ᵀ with u = unfold(a) (the patches), per group.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._registry import Rule, _chunks, _pow, register_rule


def _unfold_args(m):
    k, stride, dil = tuple(m.kernel_size), tuple(m.stride), tuple(m.dilation)
    pad, pre_pad = m.padding, None
    if isinstance(pad, str):
        if pad == "valid":
            pad = (0,) * len(k)
        else:  # 'same': left = total // 2, right = total - left (as ATen does)
            tot = [di * (ki - 1) for di, ki in zip(dil, k)]
            pre_pad = []
            for t in reversed(tot):
                pre_pad += [t // 2, t - t // 2]
            pad = (0,) * len(k)
    pad = tuple(pad)
    if isinstance(m, nn.Conv1d):
        k, stride, dil, pad = (1,) + k, (1,) + stride, (1,) + dil, (0,) + pad
    return k, stride, dil, pad, pre_pad


class ConvRule(Rule):
    params = ("weight", "bias")
    ndim = 2

    def supports(self, module, x):
        return x.is_floating_point() and x.dim() == self.ndim + 2 and module.padding_mode == "zeros"

    def _weight_chunks(self, m, a, d, chunk, k=None):
        """Per-sample weight gradients chunk by chunk: [c, *w.shape], or [k, c, *w.shape] when
        ``d`` has K cotangents per sample in front (the patches are unfolded once for all K)."""
        n = a.shape[0]
        kk, stride, dil, pad, pre_pad = _unfold_args(m)
        groups, cout = m.groups, m.out_channels
        lead = () if k is None else (k,)
        dg = d.reshape(*lead, n, groups, cout // groups, -1)  # [(K,) N, G, o, L]
        step = chunk if k is None else max(1, chunk // k)
        for s, e in _chunks(n, step):
            x = a[s:e]
            if pre_pad is not None:
                x = F.pad(x, pre_pad)
            if isinstance(m, nn.Conv1d):
                x = x.unsqueeze(2)
            u = F.unfold(x, kk, dilation=dil, padding=pad, stride=stride)  # [c, Cin*K, L]
            u = u.reshape(e - s, groups, -1, u.shape[-1])
            if k is None:
                yield torch.einsum("ngol,ngkl->ngok", dg[s:e], u).reshape(e - s, *m.weight.shape)
            else:
                yield torch.einsum("jngol,ngkl->jngok", dg[:, s:e], u).reshape(k, e - s, *m.weight.shape)

    def per_sample(self, module, a, d):
        w = torch.cat(list(self._weight_chunks(module, a, d, a.shape[0])))
        return {"weight": w, "bias": d.reshape(d.shape[0], d.shape[1], -1).sum(-1)}

    def _sums(self, module, a, d, want, power, chunk, total, k):
        want = set(want)
        pows, tots = {}, {}
        red = (0,) if k is None else (0, 1)
        if "weight" in want:
            pw = tw = None
            for g in self._weight_chunks(module, a, d, chunk, k):
                ps = _pow(g, power).sum(red)
                pw = ps if pw is None else pw + ps
                if total:
                    ts = g.sum(red)
                    tw = ts if tw is None else tw + ts
            pows["weight"] = pw
            if total:
                tots["weight"] = tw
        if "bias" in want:
            lead = d.shape[:len(red) + 1]  # [(K,) N, C]
            gb = d.reshape(*lead, -1).sum(-1)
            pows["bias"] = _pow(gb, power).sum(red)
            if total:
                tots["bias"] = gb.sum(red)
        return pows, (tots if total else None)

    def sums(self, module, a, d, want, power, chunk, total):
        return self._sums(module, a, d, want, power, chunk, total, None)

    def sums_multi(self, module, a, d, want, power, chunk, total):
        return self._sums(module, a, d, want, power, chunk, total, d.shape[0])


@register_rule(nn.Conv2d)
class Conv2dRule(ConvRule):
    ndim = 2


@register_rule(nn.Conv1d)
class Conv1dRule(ConvRule):
    ndim = 1
