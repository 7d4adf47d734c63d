"""Per-sample Fisher information: empirical, sampled and expected.

All three are means over samples n of squared **per-sample** gradients of a log-likelihood,
computed at minibatch cost: one forward, then one backward of the *sum* of per-sample losses,
with per-layer rules (:mod:`.rules`, driven by :mod:`._persample`) that square per-sample
gradients without forming them where an identity allows (``nn.Linear``:
``sum_n (delta_n a_n^T)**2 = (delta**2)^T a**2``).

The model's output must be logits ``[N, C]``: C >= 2 class scores (softmax likelihood), or
``[N, 1]``, one logit of a binary classifier (Bernoulli likelihood, p = sigmoid(z), as trained
with ``BCEWithLogitsLoss``).

* ``empirical_fisher``: g_n = grad of the loss at the true label y_n.
* ``fisher``: g_n = grad of -log p(y~_n | x_n) with y~_n drawn from the model's predictive
  distribution (seeded generator; the global RNG is left alone).
* ``expected_fisher``: the exact expectation over classes, sum_c p(c|x_n) g_{n,c}**2. With J the
  Jacobian of the logits, g_c = J^T (p - e_c) and sum_c p_c g_c g_c^T = J^T (diag(p) - p p^T) J
  = (S^T J)^T (S^T J) with S = diag(sqrt p) - p sqrt(p)^T, so sum_c p_c g_c**2 = sum_k (S^T J)_k**2.
  S has rank C - 1, and C - 1 columns suffice (:func:`softmax_sqrt_hessian`); they are
  backpropagated over the one forward, in vmapped pieces or one at a time, and the per-layer rules
  treat each (column, sample) pair as a sample or sum the columns together. One logit:
  S = sqrt(p(1-p)).
"""

from __future__ import annotations

import copy
from typing import Callable, Dict, Iterable, List, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._common import all_reduce_sums, batches, functional_forward, model_forward, per_sample_criterion
from ._persample import PerSampleGradNorms

__all__ = ["empirical_fisher", "fisher", "expected_fisher", "per_sample_mean", "sample_labels",
           "softmax_sqrt_hessian", "LossTerm"]


class LossTerm(NamedTuple):
    """What one batch backpropagates: per-sample losses ``root`` [N] (``cot`` None), or model
    outputs ``root`` [N, ...] with K cotangents per sample ``cot`` [K, N, ...] (each
    ``<root[n], cot[k, n]>`` is one per-sample "loss"). ``recompute(outputs) -> root`` is used
    by the whole-model fallback; anything random or detached is fixed inside it."""

    root: Tensor
    recompute: Callable[[Tensor], Tensor]
    cot: Optional[Tensor] = None


def per_sample_mean(
    model: nn.Module,
    data: Iterable,
    names: Sequence[str],
    make_terms: Callable[[Tensor, Optional[Tensor]], List],
    *,
    power: int,
    device,
    need_labels: bool,
    estimator: str,
    limit: Optional[int] = None,
    chunk_size: Optional[int] = None,
) -> Dict[str, Tensor]:
    """Mean over samples n of ``sum_k |grad l_k(x_n)|**power``.

    ``make_terms(outputs, y)`` returns the :class:`LossTerm` s of one batch (or plain
    ``(losses, recompute)`` pairs). Sums are accumulated in float32 or wider and cast to each
    parameter's dtype at the end. Under ``torch.distributed`` the sums and sample counts are
    all-reduced, so each rank may pass its own shard of the data and all get the estimate on
    the union.
    """
    n = 0
    params = dict(model.named_parameters())
    with PerSampleGradNorms(model, names, power=power, chunk_size=chunk_size) as psg:
        for x, y, t in batches(data, device, need_labels, estimator, limit):
            terms = [LossTerm(*tm) for tm in make_terms(model_forward(model, x, t), y)]
            for k, term in enumerate(terms):

                def fallback(ps, recompute=term.recompute, x=x, t=t):
                    return recompute(functional_forward(model, ps, x, t))

                retain = k < len(terms) - 1
                if term.cot is None:
                    psg.backward(term.root, retain_graph=retain, fallback=fallback)
                else:
                    psg.backward_batched(term.root, term.cot, retain_graph=retain, fallback=fallback)
            n += x.shape[0]
            terms = term = None  # this batch's graph goes before the next forward, not after it
        sums = dict(psg.sums)
    n = all_reduce_sums(sums, n)  # distributed: each rank saw its shard of the data
    if n == 0:
        raise ValueError(f"estimator {estimator!r} got empty data: no samples to estimate importances from")
    return {k: (v.detach() / n).to(params[k].dtype) for k, v in sums.items()}


def _check_logits(out: Tensor, estimator: str) -> None:
    if out.dim() != 2 or out.shape[1] < 1:
        raise ValueError(
            f"estimator {estimator!r}: the model output has shape {tuple(out.shape)}; expected logits "
            "of shape [N, C] (C >= 2 class scores, softmax) or [N, 1] (one logit of a binary classifier, "
            "sigmoid). Outputs such as [N, T, C] or [N, C, L] are not a per-sample likelihood it "
            "knows: reshape them in the model, or pass a callable importance"
        )


def _is_binary(out: Tensor) -> bool:
    return out.dim() == 2 and out.shape[1] == 1


def _bernoulli_nll(z: Tensor, y: Tensor) -> Tensor:
    """-log p(y | z) for one logit per sample: BCE with logits, per sample [N]."""
    return F.binary_cross_entropy_with_logits(z[:, 0], y.reshape(-1).to(z.dtype), reduction="none")


def _empirical_losses(criterion: Optional[Callable]) -> Callable[[Tensor, Tensor], Tensor]:
    crit = per_sample_criterion(criterion)

    def losses(out: Tensor, y: Tensor) -> Tensor:
        if _is_binary(out) and (criterion is None or isinstance(criterion, nn.BCEWithLogitsLoss)):
            if criterion is None:
                return _bernoulli_nll(out, y)
            c = copy.copy(criterion)
            c.reduction = "none"
            return c(out, y.reshape(out.shape).to(out.dtype)).reshape(out.shape[0], -1).sum(1)
        if criterion is None:
            _check_logits(out, "empirical_fisher")
            return crit(out, y)
        try:
            return crit(out, y)
        except ValueError:
            if out.dim() != 2:  # the shape is the problem, say so
                _check_logits(out, "empirical_fisher")
            raise

    return losses


def empirical_fisher(model, data, *, names, criterion=None, device=None, limit=None, chunk_size=None, **_):
    """Empirical Fisher: mean over samples of the squared per-sample gradient at the true label.

    ``criterion`` (default cross-entropy; for ``[N, 1]`` logits, BCE with logits) is used per
    sample (``reduction='none'``).
    """
    crit = _empirical_losses(criterion)

    def terms(out, y):
        return [LossTerm(crit(out, y), lambda o: crit(o, y))]

    return per_sample_mean(model, data, names, terms, power=2, device=device, need_labels=True,
                           estimator="empirical_fisher", limit=limit, chunk_size=chunk_size)


def fisher(model, data, *, names, device=None, seed=0, limit=None, chunk_size=None, uniforms=None, **_):
    """Fisher at one label per sample drawn from the model's p(.|x).

    Sample n's label is the inverse CDF of p(.|x_n) at a uniform u_n (one logit: classes
    (0, 1) with p = (1 - sigmoid(z), sigmoid(z))). ``compute_importance`` draws u for every
    sample up front from a generator seeded with ``seed`` (the global RNG is left alone) and
    shards it with the data, so the labels do not depend on batching or on the number of
    distributed ranks. Given a DataLoader, u is drawn batch by batch instead.
    """
    gen = torch.Generator()
    gen.manual_seed(int(seed))
    offset = [0]

    def terms(out, _y):
        _check_logits(out, "fisher")
        b = out.shape[0]
        if uniforms is not None:
            u = uniforms[offset[0]: offset[0] + b]
            offset[0] += b
        else:
            u = torch.rand(b, generator=gen, dtype=torch.float64)
        labels = sample_labels(out.detach(), u.to(out.device))
        if _is_binary(out):
            return [LossTerm(_bernoulli_nll(out, labels), lambda o: _bernoulli_nll(o, labels))]
        return [LossTerm(F.cross_entropy(out, labels, reduction="none"),
                         lambda o: F.cross_entropy(o, labels, reduction="none"))]

    return per_sample_mean(model, data, names, terms, power=2, device=device, need_labels=False,
                           estimator="fisher", limit=limit, chunk_size=chunk_size)


def sample_labels(logits: Tensor, u: Tensor) -> Tensor:
    """Inverse-CDF draw at uniforms u (float64): the first class whose cumulative probability
    exceeds u. ``[N, C]``: softmax over C classes; ``[N, 1]``: classes (0, 1), p(1) = sigmoid."""
    if _is_binary(logits):
        p1 = torch.sigmoid(logits[:, 0].to(torch.float64))
        return (u >= 1 - p1).long()
    cdf = torch.softmax(logits.to(torch.float64), dim=-1).cumsum(-1)
    return (cdf <= u.unsqueeze(-1)).sum(-1).clamp_max(logits.shape[-1] - 1)


def softmax_sqrt_hessian(logits: Tensor) -> Tensor:
    """S with S Sᵀ = the Hessian of -log p in the logits, as cotangents ``[K, N, C]``.

    Softmax over C ≥ 2 classes: the Hessian diag(p) - p pᵀ has rank C - 1 (√p spans
    the null space of diag(√p) - p √pᵀ), so K = C - 1 columns suffice:
    S = diag(√p) Q, with Q the first C - 1 columns of the Householder reflection
    I - 2 v vᵀ / vᵀv, v = √p + e_C, which maps √p to -e_C (Q Qᵀ = I - √p √pᵀ, and
    vᵀv = 2 (1 + √p_C) ≥ 2 keeps it stable). Formed in float64.
    One logit (Bernoulli): S = √(p (1 - p)) (K = 1)."""
    z = logits.detach()
    if _is_binary(z):
        p = torch.sigmoid(z)
        return (p * (1 - p)).sqrt().unsqueeze(0)
    c = z.shape[1]
    rp = torch.softmax(z.to(torch.float64), dim=-1).sqrt()  # [N, C]
    v = rp.clone()
    v[:, -1] += 1
    # cot[k, n, i] = √p[n, i] (δ_ik - v[n, i] v[n, k] / v[n, C-1])   (vᵀv = 2 v[n, C-1])
    q = torch.eye(c, c - 1, dtype=v.dtype, device=v.device) - v.unsqueeze(2) * (v[:, :-1] / v[:, -1:]).unsqueeze(1)
    return (rp.unsqueeze(2) * q).permute(2, 0, 1).to(z.dtype)


def expected_fisher(model, data, *, names, device=None, limit=None, chunk_size=None, **_):
    """Exact expected Fisher: mean over samples of ``sum_c p(c|x) g_c**2``.

    One forward and one (vmapped) backward a batch for the C - 1 columns of the Hessian's
    square root together (:func:`softmax_sqrt_hessian`); where the batched backward is not
    supported, C - 1 backward passes over the one forward.
    """

    def terms(out, _y):
        _check_logits(out, "expected_fisher")
        return [LossTerm(out, lambda o: o, softmax_sqrt_hessian(out))]

    return per_sample_mean(model, data, names, terms, power=2, device=device, need_labels=False,
                           estimator="expected_fisher", limit=limit, chunk_size=chunk_size)


empirical_fisher.shardable = True
fisher.uses_uniforms = True
fisher.shardable = True
expected_fisher.shardable = True
