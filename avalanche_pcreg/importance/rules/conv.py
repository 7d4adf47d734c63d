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

    def _weight_chunks(self, m, a, d, chunk):
        n = a.shape[0]
        k, stride, dil, pad, pre_pad = _unfold_args(m)
        groups, cout = m.groups, m.out_channels
        dg = d.reshape(n, groups, cout // groups, -1)  # [N, G, o, L]
        for s, e in _chunks(n, chunk):
            x = a[s:e]
            if pre_pad is not None:
                x = F.pad(x, pre_pad)
            if isinstance(m, nn.Conv1d):
                x = x.unsqueeze(2)
            u = F.unfold(x, k, dilation=dil, padding=pad, stride=stride)  # [c, Cin*K, L]
            u = u.reshape(e - s, groups, -1, u.shape[-1])
            yield torch.einsum("ngol,ngkl->ngok", dg[s:e], u).reshape(e - s, *m.weight.shape)

    def per_sample(self, module, a, d):
        w = torch.cat(list(self._weight_chunks(module, a, d, a.shape[0])))
        return {"weight": w, "bias": d.reshape(d.shape[0], d.shape[1], -1).sum(-1)}

    def sums(self, module, a, d, want, power, chunk, total):
        want = set(want)
        pows, tots = {}, {}
        if "weight" in want:
            pw = tw = None
            for g in self._weight_chunks(module, a, d, chunk):
                ps = _pow(g, power).sum(0)
                pw = ps if pw is None else pw + ps
                if total:
                    ts = g.sum(0)
                    tw = ts if tw is None else tw + ts
            pows["weight"] = pw
            if total:
                tots["weight"] = tw
        if "bias" in want:
            gb = d.reshape(d.shape[0], d.shape[1], -1).sum(-1)
            pows["bias"] = _pow(gb, power).sum(0)
            if total:
                tots["bias"] = gb.sum(0)
        return pows, (tots if total else None)


@register_rule(nn.Conv2d)
class Conv2dRule(ConvRule):
    ndim = 2


@register_rule(nn.Conv1d)
class Conv1dRule(ConvRule):
    ndim = 1
