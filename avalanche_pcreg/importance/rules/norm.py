"""Affine normalisation layers: g_i(weight) = Σ_positions δ_i x̂_i, g_i(bias) = Σ_positions δ_i.

``nn.LayerNorm`` and ``nn.GroupNorm`` normalise each sample on its own; ``nn.BatchNorm*`` only
when it uses its running statistics (eval mode). With batch statistics a BatchNorm call mixes
the samples, and its parameters go to the whole-model fallback.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from ._registry import Rule, _chunks, _pow, register_rule


class NormRule(Rule):
    params = ("weight", "bias")

    def _red(self, m, a):
        return tuple(range(2, a.dim()))

    def _xhat(self, m, x):
        raise NotImplementedError

    def per_sample(self, module, a, d):
        red = self._red(module, a)
        gw = d * self._xhat(module, a)
        return {"weight": gw.sum(red) if red else gw, "bias": d.sum(red) if red else d}

    def sums(self, module, a, d, want, power, chunk, total):
        want = set(want)
        red = self._red(module, a)
        pows, tots = {}, {}
        if "weight" in want:
            pw = tw = None
            for s, e in _chunks(a.shape[0], chunk):
                g = d[s:e] * self._xhat(module, a[s:e])
                if red:
                    g = g.sum(red)
                ps = _pow(g, power).sum(0)
                pw = ps if pw is None else pw + ps
                if total:
                    ts = g.sum(0)
                    tw = ts if tw is None else tw + ts
            pows["weight"] = pw
            if total:
                tots["weight"] = tw
        if "bias" in want:
            g = d.sum(red) if red else d
            pows["bias"] = _pow(g, power).sum(0)
            if total:
                tots["bias"] = g.sum(0)
        return pows, (tots if total else None)


@register_rule(nn.LayerNorm)
class LayerNormRule(NormRule):
    def sample_dims(self, module, x):
        return tuple(range(x.dim() - len(module.normalized_shape)))

    def supports(self, module, x):
        return x.is_floating_point() and x.dim() > len(module.normalized_shape)

    def _red(self, m, a):
        return tuple(range(1, a.dim() - len(m.normalized_shape)))

    def _xhat(self, m, x):
        return F.layer_norm(x, tuple(m.normalized_shape), None, None, m.eps)


@register_rule(nn.GroupNorm)
class GroupNormRule(NormRule):
    def supports(self, module, x):
        return x.is_floating_point() and x.dim() >= 2

    def _xhat(self, m, x):
        return F.group_norm(x, m.num_groups, None, None, m.eps)


class BatchNormRule(NormRule):
    @staticmethod
    def _running(m):
        return not m.training and m.running_mean is not None and m.running_var is not None

    def supports(self, module, x):
        return x.is_floating_point() and x.dim() >= 2 and self._running(module)

    def couples_samples(self, module, x):
        return not self._running(module)

    def _xhat(self, m, x):
        return F.batch_norm(x, m.running_mean.to(x.dtype), m.running_var.to(x.dtype), None, None, False, 0.0, m.eps)


for _bn in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
    register_rule(_bn, BatchNormRule())
