"""Memory Aware Synapses (Aljundi et al. 2018): mean over samples of |d ||f(x)||^2 / d theta|.

Per-sample absolute gradients, at minibatch cost: the same per-layer rules as the Fisher with
``power=1`` (``|delta_n a_n^T| = |delta_n| |a_n|^T`` is rank one too).
"""

from __future__ import annotations

from .fisher import per_sample_mean

__all__ = ["mas"]


def _sq_norm(out):
    return out.pow(2).flatten(1).sum(1)


def mas(model, data, *, names, device=None, limit=None, chunk_size=None, output_transform=None, policy=None, **_):
    """MAS importance: mean over samples of the absolute per-sample gradient of ||f(x)||_2^2."""

    def terms(out, _y):
        return [(_sq_norm(out), _sq_norm)]

    return per_sample_mean(model, data, names, terms, power=1, device=device, need_labels=False,
                           estimator="mas", limit=limit, chunk_size=chunk_size, output_transform=output_transform,
                           policy=policy)
