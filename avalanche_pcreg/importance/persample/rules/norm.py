"""Affine normalisation layers: g_i(weight) = Σ_positions δ_i x̂_i, g_i(bias) = Σ_positions δ_i.

``nn.LayerNorm``, ``nn.GroupNorm`` and ``nn.InstanceNorm*`` normalise each sample on its own
(InstanceNorm with running statistics or with its own per-sample statistics: never with the
batch's). ``nn.BatchNorm*`` does so only when it uses its running statistics (eval mode with
``track_running_stats=True``). With batch statistics (train mode, or ``track_running_stats=False``
in any mode) a BatchNorm call mixes the samples. During a per-sample pass the engine then
evaluates the layer on each sample alone -- for an input with positions besides the sample and
channel axes (``[N, C, L]``, ``[N, C, H, W]``...) that is BatchNorm on a batch of one, i.e. each
sample normalised with its own statistics over its positions (:func:`per_sample_batch_norm`) --
and this rule's x̂ is that per-sample normalisation. An ``[N, C]`` input cannot be normalised
one sample at a time: :func:`batch_norm_coupling` says why, and the engine warns that the
importances depend on the batch.
"""

from __future__ import annotations

import math
from typing import Optional

import torch.nn.functional as F
from torch import Tensor, nn

from ..quantity import Sums
from ..sums import chunks
from .base import Rule, register_rule


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

    def sums(self, module, a, d, req):
        want, of = req.attrs, req.quantity.of
        red = self._red(module, a)
        values, totals = {}, {}
        if "weight" in want:
            pw = tw = None
            for s, e in chunks(a.shape[0], req.chunk):
                g = d[s:e] * self._xhat(module, a[s:e])
                if red:
                    g = g.sum(red)
                ps = of(g).sum(0)
                pw = ps if pw is None else pw + ps
                if req.totals:
                    ts = g.sum(0)
                    tw = ts if tw is None else tw + ts
            values["weight"] = pw
            if req.totals:
                totals["weight"] = tw
        if "bias" in want:
            g = d.sum(red) if red else d
            values["bias"] = of(g).sum(0)
            if req.totals:
                totals["bias"] = g.sum(0)
        return Sums(values, totals if req.totals else None)


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


def uses_batch_stats(m: nn.Module) -> bool:
    """Whether a ``_BatchNorm`` module normalises with the statistics of its input batch (train
    mode, or no running statistics), as ``_BatchNorm.forward`` decides."""
    return bool(m.training or (m.running_mean is None and m.running_var is None))


def batch_norm_coupling(m: nn.Module, x: Tensor) -> Optional[str]:
    """None when a ``_BatchNorm`` call on ``x`` (sample axis 0) is per-sample or can be evaluated
    on each sample alone; else why its output mixes the samples irreducibly."""
    if not uses_batch_stats(m):
        return None
    if x.dim() >= 3 and math.prod(x.shape[2:]) > 1:
        return None  # each sample alone: statistics over its own positions
    why = "train mode" if m.training else "track_running_stats=False"
    return (f"it normalises with the statistics of the whole batch ({why}) and its input of shape "
            f"{tuple(x.shape)} has no positions besides the sample and channel axes, so a sample "
            "cannot be normalised on its own")


def per_sample_batch_norm(m: nn.Module, x: Tensor) -> Tensor:
    """A batch-statistics ``_BatchNorm`` evaluated on each sample of ``x`` alone (a batch of one
    each): every sample normalised over its own positions, with the module's affine parameters."""
    return F.instance_norm(x, None, None, m.weight, m.bias, True, 0.0, m.eps)


class BatchNormRule(NormRule):
    """Running statistics: x̂ from them. Batch statistics on an input with positions: x̂ of each
    sample alone (the engine evaluates the layer that way, :func:`per_sample_batch_norm`)."""

    def supports(self, module, x):
        return x.is_floating_point() and x.dim() >= 2 and batch_norm_coupling(module, x) is None

    def couples_samples(self, module, x):
        return batch_norm_coupling(module, x) is not None

    def _xhat(self, m, x):
        if uses_batch_stats(m):
            return F.instance_norm(x, None, None, None, None, True, 0.0, m.eps)
        return F.batch_norm(x, m.running_mean.to(x.dtype), m.running_var.to(x.dtype), None, None, False, 0.0, m.eps)


for _bn in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
    register_rule(_bn, BatchNormRule())
