"""Per-sample Fisher information: empirical, sampled and expected.

All three are means over samples n of squared **per-sample** gradients of a log-likelihood,
computed at minibatch cost: one forward, then one backward of the *sum* of per-sample losses,
with per-layer rules (:mod:`._persample`) that square per-sample gradients without forming
them where an identity allows (``nn.Linear``: ``sum_n (delta_n a_n^T)**2 = (delta**2)^T a**2``).

* ``empirical_fisher``: g_n = grad of the loss at the true label y_n.
* ``fisher``: g_n = grad of -log p(y~_n | x_n) with y~_n drawn from the model's predictive
  distribution (seeded generator; the global RNG is left alone).
* ``expected_fisher``: the exact expectation over classes, sum_c p(c|x_n) g_{n,c}**2, as C
  backward passes over one forward, with sqrt(p_c) folded into each sample's loss.
"""

from __future__ import annotations

from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._common import all_reduce_sums, batches, functional_forward, model_forward, per_sample_criterion
from ._persample import DEFAULT_CHUNK, PerSampleGradNorms

__all__ = ["empirical_fisher", "fisher", "expected_fisher", "per_sample_mean", "sample_labels"]

# One loss vector [N] and how to recompute it from outputs (for layers without a per-layer rule).
LossTerm = Tuple[Tensor, Callable[[Tensor], Tensor]]


def per_sample_mean(
    model: nn.Module,
    data: Iterable,
    names: Sequence[str],
    make_terms: Callable[[Tensor, Optional[Tensor]], List[LossTerm]],
    *,
    power: int,
    device,
    need_labels: bool,
    estimator: str,
    limit: Optional[int] = None,
    chunk_size: int = DEFAULT_CHUNK,
) -> Dict[str, Tensor]:
    """Mean over samples n of ``sum_k |grad l_k(x_n)|**power``.

    ``make_terms(outputs, y)`` returns the loss vectors ``l_k`` of one batch (one for most
    estimators, C for the expected Fisher), each with a function that recomputes it from
    outputs; anything random or detached (sampled labels, p_c) is fixed inside ``make_terms``.
    Under ``torch.distributed`` the sums and sample counts are all-reduced, so each rank may
    pass its own shard of the data and all get the estimate on the union.
    """
    n = 0
    with PerSampleGradNorms(model, names, power=power, chunk_size=chunk_size) as psg:
        for x, y, t in batches(data, device, need_labels, estimator, limit):
            terms = make_terms(model_forward(model, x, t), y)
            for k, (losses, recompute) in enumerate(terms):

                def fallback(params, recompute=recompute, x=x, t=t):
                    return recompute(functional_forward(model, params, x, t))

                psg.backward(losses, retain_graph=k < len(terms) - 1, fallback=fallback)
            n += x.shape[0]
        sums = dict(psg.sums)
    n = all_reduce_sums(sums, n)  # distributed: each rank saw its shard of the data
    if n == 0:
        raise ValueError(f"estimator {estimator!r} got empty data: no samples to estimate importances from")
    return {k: v.detach() / n for k, v in sums.items()}


def empirical_fisher(model, data, *, names, criterion=None, device=None, limit=None, chunk_size=DEFAULT_CHUNK, **_):
    """Empirical Fisher: mean over samples of the squared per-sample gradient at the true label.

    ``criterion`` (default cross-entropy) is used per sample (``reduction='none'``).
    """
    crit = per_sample_criterion(criterion)

    def terms(out, y):
        return [(crit(out, y), lambda o: crit(o, y))]

    return per_sample_mean(model, data, names, terms, power=2, device=device, need_labels=True,
                           estimator="empirical_fisher", limit=limit, chunk_size=chunk_size)


def fisher(model, data, *, names, device=None, seed=0, limit=None, chunk_size=DEFAULT_CHUNK, uniforms=None, **_):
    """Fisher at one label per sample drawn from the model's p(.|x).

    Sample n's label is the inverse CDF of p(.|x_n) at a uniform u_n. ``compute_importance``
    draws u for every sample up front from a generator seeded with ``seed`` (the global RNG is
    left alone) and shards it with the data, so the labels do not depend on batching or on the
    number of distributed ranks. Given a DataLoader, u is drawn batch by batch instead.
    """
    gen = torch.Generator()
    gen.manual_seed(int(seed))
    offset = [0]

    def terms(out, _y):
        b = out.shape[0]
        if uniforms is not None:
            u = uniforms[offset[0]: offset[0] + b]
            offset[0] += b
        else:
            u = torch.rand(b, generator=gen, dtype=torch.float64)
        labels = sample_labels(out.detach(), u.to(out.device))
        return [(F.cross_entropy(out, labels, reduction="none"),
                 lambda o: F.cross_entropy(o, labels, reduction="none"))]

    return per_sample_mean(model, data, names, terms, power=2, device=device, need_labels=False,
                           estimator="fisher", limit=limit, chunk_size=chunk_size)


def sample_labels(logits: Tensor, u: Tensor) -> Tensor:
    """Inverse-CDF draw from softmax(logits) at uniforms u (float64): the first class whose
    cumulative probability exceeds u."""
    cdf = torch.softmax(logits.to(torch.float64), dim=-1).cumsum(-1)
    return (cdf <= u.unsqueeze(-1)).sum(-1).clamp_max(logits.shape[-1] - 1)


def expected_fisher(model, data, *, names, device=None, limit=None, chunk_size=DEFAULT_CHUNK, **_):
    """Exact expected Fisher: mean over samples of ``sum_c p(c|x) g_c**2``.

    One forward and C backward passes a batch (C = number of outputs), never N*C.
    """

    def terms(out, _y):
        logp = torch.log_softmax(out, dim=-1)
        root_p = logp.detach().exp().sqrt()
        return [
            (-root_p[:, c] * logp[:, c],
             lambda o, c=c: -root_p[:, c] * torch.log_softmax(o, dim=-1)[:, c])
            for c in range(out.shape[-1])
        ]

    return per_sample_mean(model, data, names, terms, power=2, device=device, need_labels=False,
                           estimator="expected_fisher", limit=limit, chunk_size=chunk_size)

empirical_fisher.shardable = True
fisher.uses_uniforms = True
fisher.shardable = True
fisher.uses_uniforms = True
expected_fisher.shardable = True
fisher.uses_uniforms = True
