"""Per-sample Fisher information: empirical, sampled and expected.

All three are means over samples n of squared **per-sample** gradients of a loss, computed at
minibatch cost: one forward, then one backward of the *sum* of per-sample losses, with per-layer
rules (:mod:`.persample.rules`, driven by :mod:`.persample.engine`) that square per-sample gradients without
forming them where an identity allows (``nn.Linear``: ``sum_n (delta_n a_n^T)**2 = (delta**2)^T a**2``).
Every estimator takes the pass's ``output_transform`` (model output -> logits) and execution
``policy`` (:class:`.persample.Policy`) as arguments.

The criterion decides the loss and the likelihood (docs/design.md, "Criteria and likelihoods"):

* ``empirical_fisher``: g_n = grad of the criterion's loss on sample n at its true target: the
  criterion with ``reduction='none'``, summed over the non-sample dimensions
  (:func:`._common.per_sample_criterion`). Any torch loss, or a callable returning per-sample losses.
* ``fisher``: g_n = grad of -log p(y~_n | x_n) with y~_n drawn from the model's predictive
  distribution (seeded generator; the global RNG is left alone).
* ``expected_fisher``: the exact expectation over outcomes, E_y[g_{n,y}**2] = diag(J^T H J) with J
  the Jacobian of the outputs and H = S S^T the Hessian of -log p in the outputs; the K columns of
  S are backpropagated over the one forward, in vmapped pieces or one at a time.

The two last need a likelihood: the softmax over C >= 2 classes (``CrossEntropyLoss``,
``NLLLoss``; :func:`softmax_sqrt_hessian`: H = diag(p) - p p^T, rank C - 1, so C - 1 columns),
independent Bernoullis, one per output (``BCEWithLogitsLoss``; :func:`bernoulli_sqrt_hessian`:
S = diag(sqrt(p (1 - p)))), or a unit-variance Gaussian per output (``MSELoss``;
:func:`gaussian_sqrt_hessian`: S = I, so the Fisher of the mean is J^T J). Without a criterion
(``compute_importance``'s default) the output decides: ``[N, C]`` logits are a softmax over
C >= 2 classes, ``[N, 1]`` one logit of a binary classifier (Bernoulli, as trained with
``BCEWithLogitsLoss``). Other criteria have no likelihood here: a ValueError says so.
"""

from __future__ import annotations

import warnings
from typing import Callable, Dict, Iterable, List, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._common import (BERNOULLI, CRITERION_HOW, GAUSSIAN, SOFTMAX, StrategyCriterion, all_reduce_sums, batches,
                      criterion_likelihood, describe_criterion, functional_forward, is_torch_loss, model_forward,
                      per_sample_criterion, unwrap_criterion)
from .persample import PerSampleGradNorms, Policy, Quantity

__all__ = ["empirical_fisher", "fisher", "expected_fisher", "per_sample_mean", "sample_labels", "sample_outcomes",
           "softmax_sqrt_hessian", "bernoulli_sqrt_hessian", "gaussian_sqrt_hessian", "LossTerm"]


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
    output_transform: Optional[Callable] = None,
    policy: Optional[Policy] = None,
    quantity: Optional[Quantity] = None,
) -> Dict[str, Tensor]:
    """Mean over samples n of ``sum_k |grad l_k(x_n)|**power``.

    ``make_terms(outputs, y)`` returns the :class:`LossTerm` s of one batch (or plain
    ``(losses, recompute)`` pairs); ``outputs`` are the logits (the model's output through
    ``output_transform``). Sums are accumulated in float32 or wider and cast to each parameter's
    dtype at the end (sums of another shape, e.g. ``quantity=KroneckerFactors()``'s packed blocks,
    stay in their accumulation dtype). Under ``torch.distributed`` the sums and sample counts are all-reduced, so
    each rank may pass its own shard of the data and all get the estimate on the union.
    """
    n = 0
    params = dict(model.named_parameters())
    with PerSampleGradNorms(model, names, power=power, chunk_size=chunk_size, policy=policy, quantity=quantity) as psg:
        for x, y, t in batches(data, device, need_labels, estimator, limit):
            terms = [LossTerm(*tm) for tm in make_terms(model_forward(model, x, t, output_transform), y)]
            for k, term in enumerate(terms):

                def fallback(ps, recompute=term.recompute, x=x, t=t):
                    return recompute(functional_forward(model, ps, x, t, output_transform))

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
    return {k: (v.detach() / n).to(params[k].dtype if v.shape == params[k].shape else v.dtype)
            for k, v in sums.items()}


def _check_logits(out: Tensor, estimator: str) -> None:
    if out.dim() != 2 or out.shape[1] < 1:
        raise ValueError(
            f"estimator {estimator!r}: the model output has shape {tuple(out.shape)}; expected logits "
            "of shape [N, C] (C >= 2 class scores, softmax) or [N, 1] (one logit of a binary classifier, "
            "sigmoid). Outputs such as [N, T, C] or [N, C, L] are not a per-sample likelihood it "
            "knows: reshape them in the model, or pass a callable importance"
        )


def _check_softmax(out: Tensor, estimator: str, criterion) -> None:
    if out.dim() != 2 or out.shape[1] < 2:
        raise ValueError(
            f"estimator {estimator!r}: {describe_criterion(criterion)} is a softmax over classes, which needs "
            f"logits of shape [N, C] with C >= 2; the model output has shape {tuple(out.shape)}. For one logit "
            "of a binary classifier use nn.BCEWithLogitsLoss(); reshape [N, T, C] or [N, C, L] outputs in the model"
        )


def _is_binary(out: Tensor) -> bool:
    return out.dim() == 2 and out.shape[1] == 1


def _bernoulli_nll(z: Tensor, y: Tensor) -> Tensor:
    """-log p(y | z) for one logit per sample: BCE with logits, per sample [N]."""
    return F.binary_cross_entropy_with_logits(z[:, 0], y.reshape(-1).to(z.dtype), reduction="none")


def _bernoulli_nll_all(z: Tensor, y: Tensor) -> Tensor:
    """-log p(y | z) for independent Bernoullis, one per output, summed per sample [N]."""
    return F.binary_cross_entropy_with_logits(z, y.to(z.dtype), reduction="none").reshape(z.shape[0], -1).sum(1)


class _Fallback:
    """The classifier's own likelihood for a strategy criterion that is not a torch loss: softmax
    over ``[N, C]`` logits (class-index targets only), Bernoulli for ``[N, 1]``; warned once a pass."""

    def __init__(self, criterion, estimator: str):
        self.criterion, self.estimator, self.warned = criterion, estimator, False
        self.why = ("cannot be evaluated per sample" if estimator == "empirical_fisher"
                    else "gives no likelihood of the outputs")

    def check(self, out: Tensor, y: Optional[Tensor]) -> None:
        if isinstance(y, Tensor) and not _is_binary(out) and (y.is_floating_point() or y.is_complex()):
            raise ValueError(
                f"estimator {self.estimator!r}: {describe_criterion(self.criterion)} is not a torch loss, so it "
                f"{self.why}, and the targets ({y.dtype}, shape {tuple(y.shape)}) are not "
                f"class indices, so the classifier's cross-entropy does not apply either; {CRITERION_HOW}"
            )
        if not self.warned:
            self.warned = True
            kind = "Bernoulli log-likelihood of the one logit" if _is_binary(out) else \
                "softmax log-likelihood (cross-entropy on the class-index targets)"
            warnings.warn(
                f"estimator {self.estimator!r}: {describe_criterion(self.criterion)} is not a torch loss, so it "
                f"{self.why}; the importances use the model's {kind} instead. To use "
                "another loss, pass ParameterChangePlugin(criterion=...): a torch loss or a callable "
                "(output, target) -> per-sample losses [N]",
                stacklevel=2,
            )


def _default_losses(out: Tensor, y: Tensor, estimator: str) -> Tensor:
    """No criterion: one logit is a Bernoulli, ``[N, C]`` logits a softmax on class indices."""
    if _is_binary(out):
        return _bernoulli_nll(out, y)
    _check_logits(out, estimator)
    if y.is_floating_point() or y.is_complex():
        raise ValueError(
            f"estimator {estimator!r} got no criterion, so it uses cross-entropy on class-index targets, but "
            f"the targets are {y.dtype} of shape {tuple(y.shape)}: pass the loss the model was trained with as "
            "criterion= (nn.MSELoss() for regression, nn.BCEWithLogitsLoss() for multi-label targets, "
            "nn.CrossEntropyLoss() for class probabilities)"
        )
    return F.cross_entropy(out, y, reduction="none")


def _empirical_losses(criterion: Optional[Callable]) -> Callable[[Tensor, Tensor], Tensor]:
    """Per-sample losses ``(outputs, targets) -> [N]`` of ``empirical_fisher`` for ``criterion``:
    None (the default: cross-entropy, Bernoulli for one logit), a criterion given by the user (any
    torch loss or per-sample callable), or the strategy's (:class:`StrategyCriterion`: used per
    sample when it is a torch loss, else :class:`_Fallback`)."""
    crit = unwrap_criterion(criterion)
    if crit is None:
        return lambda out, y: _default_losses(out, y, "empirical_fisher")
    if isinstance(criterion, StrategyCriterion) and not is_torch_loss(crit):
        fallback = _Fallback(criterion, "empirical_fisher")

        def fallback_losses(out: Tensor, y: Tensor) -> Tensor:
            fallback.check(out, y)
            return _default_losses(out, y, "empirical_fisher")

        return fallback_losses
    per_sample = per_sample_criterion(crit)

    def losses(out: Tensor, y: Tensor) -> Tensor:
        try:
            return per_sample(out, y)
        except (ValueError, RuntimeError) as err:
            if "per-sample losses" in str(err):
                raise
            raise ValueError(
                f"estimator 'empirical_fisher': {describe_criterion(criterion)} failed on outputs of shape "
                f"{tuple(out.shape)} and targets of shape {tuple(y.shape)} ({y.dtype}): {err}"
            ) from err

    return losses


def empirical_fisher(model, data, *, names, criterion=None, device=None, limit=None, chunk_size=None,
                     output_transform=None, policy=None, quantity=None, **_):
    """Empirical Fisher: mean over samples of the squared per-sample gradient at the true target.

    ``criterion`` is used per sample: ``reduction='none'``, summed over the non-sample dimensions
    (:func:`._common.per_sample_criterion`); a callable without ``reduction`` must return
    per-sample losses. None: cross-entropy on class-index targets (for ``[N, 1]`` logits, BCE with
    logits). The strategy's criterion (:class:`._common.StrategyCriterion`) is used when it is a
    torch loss; otherwise the model's likelihood on class-index targets, with a warning.
    """
    crit = _empirical_losses(criterion)

    def terms(out, y):
        return [LossTerm(crit(out, y), lambda o: crit(o, y))]

    return per_sample_mean(model, data, names, terms, power=2, device=device, need_labels=True,
                           estimator="empirical_fisher", limit=limit, chunk_size=chunk_size,
                           output_transform=output_transform, policy=policy, quantity=quantity)


class _Likelihood:
    """Which likelihood ``fisher`` / ``expected_fisher`` use, from the criterion (checked at once)."""

    def __init__(self, criterion, estimator: str):
        self.criterion, self.estimator = criterion, estimator
        c = unwrap_criterion(criterion)
        self.fallback = None
        self.kind = None if c is None else criterion_likelihood(c)
        if c is not None and self.kind is None:
            if isinstance(criterion, StrategyCriterion) and not is_torch_loss(c):
                self.fallback = _Fallback(criterion, estimator)
            else:
                raise ValueError(
                    f"estimator {estimator!r} needs the likelihood of the model's outputs, and "
                    f"{describe_criterion(criterion)} has none it knows: it knows nn.CrossEntropyLoss / nn.NLLLoss "
                    "(softmax over classes), nn.BCEWithLogitsLoss (an independent Bernoulli per output) and "
                    "nn.MSELoss (a unit-variance Gaussian per output). Use importance='empirical_fisher' (any "
                    "criterion, per sample), or pass one of those as criterion= (ParameterChangePlugin(criterion=...) "
                    "or compute_importance(..., criterion=...))"
                )

    def of(self, out: Tensor, y: Optional[Tensor]) -> str:
        """The likelihood for this batch's outputs."""
        if self.kind is not None:
            if self.kind == SOFTMAX:
                _check_softmax(out, self.estimator, self.criterion)
            return self.kind
        if self.fallback is not None:
            self.fallback.check(out, y)
        if _is_binary(out):
            return BERNOULLI
        _check_logits(out, self.estimator)
        if self.fallback is None and isinstance(y, Tensor) and (y.is_floating_point() or y.is_complex()):
            raise ValueError(
                f"estimator {self.estimator!r} got no criterion, so it uses the softmax likelihood of class "
                f"logits, but the targets are {y.dtype} of shape {tuple(y.shape)}, not class indices: pass the "
                "model's loss as criterion= (nn.MSELoss() for a Gaussian, nn.BCEWithLogitsLoss() for Bernoulli "
                "outputs, nn.CrossEntropyLoss() for a softmax)"
            )
        return SOFTMAX


def fisher(model, data, *, names, criterion=None, device=None, seed=0, limit=None, chunk_size=None, uniforms=None,
           output_transform=None, policy=None, quantity=None, **_):
    """Fisher at one outcome per sample drawn from the model's predictive distribution.

    Sample n's outcome comes from a uniform u_n: a softmax class is the inverse CDF of p(.|x_n) at
    u_n (one logit: classes (0, 1) with p = (1 - sigmoid(z), sigmoid(z))); Bernoulli outputs (k of
    them, k > 1) and Gaussian outputs y~ = f(x_n) + eps are drawn from a generator seeded with u_n
    (:func:`sample_outcomes`). ``compute_importance`` draws u for every sample up front from a
    generator seeded with ``seed`` (the global RNG is left alone) and shards it with the data, so
    the outcomes do not depend on batching or on the number of distributed ranks. Given a
    DataLoader, u is drawn batch by batch instead. ``criterion`` picks the likelihood (see
    :func:`expected_fisher`).
    """
    likelihood = _Likelihood(criterion, "fisher")
    gen = torch.Generator()
    gen.manual_seed(int(seed))
    offset = [0]

    def terms(out, y):
        kind = likelihood.of(out, y)
        b = out.shape[0]
        if uniforms is not None:
            u = uniforms[offset[0]: offset[0] + b]
            offset[0] += b
        else:
            u = torch.rand(b, generator=gen, dtype=torch.float64)
        u = u.to(out.device)
        if kind == SOFTMAX or (kind == BERNOULLI and _is_binary(out)):
            labels = sample_labels(out.detach(), u)
            if kind == BERNOULLI:
                return [LossTerm(_bernoulli_nll(out, labels), lambda o: _bernoulli_nll(o, labels))]
            return [LossTerm(F.cross_entropy(out, labels, reduction="none"),
                             lambda o: F.cross_entropy(o, labels, reduction="none"))]
        drawn = sample_outcomes(out.detach(), u, kind)
        if kind == BERNOULLI:
            return [LossTerm(_bernoulli_nll_all(out, drawn), lambda o: _bernoulli_nll_all(o, drawn))]
        # Gaussian, unit variance: -log N(y~; f, I) = |y~ - f|**2 / 2 + const with y~ = f(x) + eps drawn
        # and fixed; its gradient in f, at f(x), is -eps: that of the per-sample "loss" -<f, eps>
        # (squared, the sign goes).
        eps = drawn

        def gaussian(o):
            return (o * eps).reshape(o.shape[0], -1).sum(1)

        return [LossTerm(gaussian(out), gaussian)]

    return per_sample_mean(model, data, names, terms, power=2, device=device, need_labels=False,
                           estimator="fisher", limit=limit, chunk_size=chunk_size,
                           output_transform=output_transform, policy=policy, quantity=quantity)


def sample_labels(logits: Tensor, u: Tensor) -> Tensor:
    """Inverse-CDF draw at uniforms u (float64): the first class whose cumulative probability
    exceeds u. ``[N, C]``: softmax over C classes; ``[N, 1]``: classes (0, 1), p(1) = sigmoid."""
    if _is_binary(logits):
        p1 = torch.sigmoid(logits[:, 0].to(torch.float64))
        return (u >= 1 - p1).long()
    cdf = torch.softmax(logits.to(torch.float64), dim=-1).cumsum(-1)
    return (cdf <= u.unsqueeze(-1)).sum(-1).clamp_max(logits.shape[-1] - 1)


def sample_outcomes(outputs: Tensor, u: Tensor, likelihood: str) -> Tensor:
    """Outcomes drawn for ``fisher`` from independent Bernoullis (``"bernoulli"``: 0/1 per output,
    p = sigmoid(output)) or unit-variance Gaussians (``"gaussian"``: y~ = output + eps, returned as
    eps), shaped as ``outputs`` [N, ...], in its dtype. Sample n's draws come from a generator seeded
    with its uniform u_n (float64): they depend on u_n only, not on the batch."""
    n = outputs.shape[0]
    k = outputs[0].numel() if n else 0
    draws = torch.empty(n, k, dtype=torch.float64)
    g = torch.Generator()
    for i, ui in enumerate(u.detach().cpu().to(torch.float64).tolist()):
        g.manual_seed(int(ui * 2.0 ** 53))
        if likelihood == BERNOULLI:
            draws[i] = torch.rand(k, generator=g, dtype=torch.float64)
        elif likelihood == GAUSSIAN:
            draws[i] = torch.randn(k, generator=g, dtype=torch.float64)
        else:
            raise ValueError(f"sample_outcomes: likelihood must be 'bernoulli' or 'gaussian', got {likelihood!r}")
    draws = draws.to(outputs.device)
    if likelihood == BERNOULLI:
        p = torch.sigmoid(outputs.detach().to(torch.float64)).reshape(n, k)
        draws = (draws < p).to(torch.float64)
    return draws.reshape(outputs.shape).to(outputs.dtype)


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


def bernoulli_sqrt_hessian(outputs: Tensor) -> Tensor:
    """S with S Sᵀ = the Hessian of -log p in the logits for independent Bernoullis, one per
    output (p = sigmoid): diag(p (1 - p)), so S = diag(√(p (1 - p))), as cotangents ``[K, N, ...]``
    with K the number of outputs per sample (column k is √(p_k (1 - p_k)) at output k, 0 elsewhere)."""
    z = outputs.detach()
    n, k = z.shape[0], z[0].numel() if z.shape[0] else 0
    p = torch.sigmoid(z.to(torch.float64)).reshape(n, k)
    cols = torch.diag_embed((p * (1 - p)).sqrt()).permute(1, 0, 2)  # [K, N, K]: cols[j, n, i] = s[n, i] δ_ij
    return cols.reshape(k, *z.shape).to(z.dtype)


def gaussian_sqrt_hessian(outputs: Tensor) -> Tensor:
    """S with S Sᵀ = the Hessian of -log p in the means of a unit-variance Gaussian per output: I,
    as cotangents ``[K, N, ...]`` (column k is 1 at output k): the expected Fisher is diag(JᵀJ)."""
    z = outputs.detach()
    n, k = z.shape[0], z[0].numel() if z.shape[0] else 0
    eye = torch.eye(k, dtype=z.dtype, device=z.device)
    return eye.unsqueeze(1).expand(k, n, k).reshape(k, *z.shape).contiguous()


def expected_fisher(model, data, *, names, criterion=None, device=None, limit=None, chunk_size=None,
                    output_transform=None, policy=None, quantity=None, **_):
    """Exact expected Fisher: mean over samples of ``E_y[g_y**2]`` under the model's likelihood.

    ``criterion`` picks the likelihood: ``CrossEntropyLoss`` / ``NLLLoss`` a softmax over classes
    (``sum_c p(c|x) g_c**2``), ``BCEWithLogitsLoss`` an independent Bernoulli per output,
    ``MSELoss`` a unit-variance Gaussian per output (diag(JᵀJ)); the losses' options (class
    weights, ``pos_weight``, label smoothing) are not part of a likelihood and are not used. None:
    softmax for ``[N, C]`` logits, Bernoulli for ``[N, 1]``. Any other criterion: ValueError.
    One forward and one (vmapped) backward a batch for the K columns of the Hessian's square root
    together (:func:`softmax_sqrt_hessian`: C - 1 columns; :func:`bernoulli_sqrt_hessian`,
    :func:`gaussian_sqrt_hessian`: one per output); where the batched backward is not supported,
    K backward passes over the one forward.
    """
    likelihood = _Likelihood(criterion, "expected_fisher")
    roots = {SOFTMAX: softmax_sqrt_hessian, BERNOULLI: bernoulli_sqrt_hessian, GAUSSIAN: gaussian_sqrt_hessian}

    def terms(out, y):
        cot = roots[likelihood.of(out, y)](out)
        return [LossTerm(out, lambda o: o, cot)]

    return per_sample_mean(model, data, names, terms, power=2, device=device, need_labels=False,
                           estimator="expected_fisher", limit=limit, chunk_size=chunk_size,
                           output_transform=output_transform, policy=policy, quantity=quantity)

