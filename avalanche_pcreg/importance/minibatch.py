"""The importances of Avalanche 0.6's ``EWCPlugin`` and ``MASPlugin``, kept for exact parity: one
loop over minibatches that backpropagates a minibatch loss and accumulates a power of the
minibatch gradient.

* ``minibatch_fisher`` (``EWCPlugin``): ``sum_b (grad of the mean loss over minibatch b)**2 /
  (number of minibatches)``, over a ``DataLoader(dataset, batch_size)`` without shuffling, in eval
  mode. Its scale depends on the batch size: for B samples a batch it is about 1/B of the
  per-sample Fisher plus the squared mean gradient, so it needs a lambda orders of magnitude
  larger than the per-sample estimators (van de Ven 2025). Compare methods at each one's own
  tuned lambda.
* ``avalanche_mas`` (``MASPlugin``, after FACIL): ``mean over minibatches of |d/dtheta mean_n
  ||f(x_n)||**2|``, the absolute value of the *minibatch* gradient. Aljundi et al. 2018 average the
  absolute *per-sample* gradients (``importance="mas"``); since ``|mean_n g_n| <= mean_n |g_n|``
  this one is smaller, and more so for larger batches. Avalanche runs this pass in train mode
  (the ``avalanche_mas`` registration asks for no switch to eval mode) with a DataLoader that draws
  its seed from the global RNG. Avalanche's ``alpha`` (``I <- alpha * I + (1 - alpha) * I_new``
  after the first experience) is ``mode="online", decay=alpha, running_average=True`` on the plugin.

Gradients are taken as Avalanche takes them, ``loss.backward()`` and then each parameter's
``.grad``, so whatever Avalanche's plugins can train through works here too (reentrant
activation checkpointing, which supports no other way). The parameters' ``.grad`` are saved
before the pass and restored after it: the pass leaves no gradient behind and keeps any the
caller had.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from ._common import StrategyCriterion, batches, model_output, to_logits

__all__ = ["minibatch_fisher", "avalanche_mas", "minibatch_importance"]


@contextlib.contextmanager
def _own_grads(model: nn.Module):
    """Within the block the parameters' ``.grad`` belong to the pass; afterwards they are what
    they were before it (``None`` included)."""
    params = list(dict.fromkeys(model.parameters()))
    saved = [p.grad for p in params]
    try:
        yield params
    finally:
        for p, g in zip(params, saved):
            p.grad = g


def _grad_disabled_error(estimator: str) -> RuntimeError:
    how = "torch.inference_mode()" if torch.is_inference_mode_enabled() else "torch.no_grad()"
    return RuntimeError(
        f"estimator {estimator!r} needs gradients, but the model's forward ran under {how}, so its loss has no "
        "graph; run it with gradients enabled (compute_importance enables them itself under torch.no_grad(); "
        "under torch.inference_mode() it cannot)")


def minibatch_importance(model: nn.Module, data, names, loss_fn: Callable, accumulate: Callable[[Tensor], Tensor], *,
                         estimator: str, need_labels: bool, device=None, limit=None, raw_output: bool = False,
                         output_transform: Optional[Callable] = None) -> dict:
    """Mean over minibatches b of ``accumulate(grad of loss_fn(model output, y) on b)``.

    Each minibatch: ``loss.backward()`` with every parameter's ``.grad`` cleared first (as
    Avalanche's ``optimizer.zero_grad()``), then ``accumulate(p.grad)`` is added to the sum of
    each parameter in ``names`` that received a gradient. ``loss_fn`` gets the logits, or with
    ``raw_output`` the model's raw output (what a strategy hands its criterion)."""
    params = dict(model.named_parameters())
    sums = {n: torch.zeros_like(params[n]) for n in names}
    count = 0
    with _own_grads(model) as all_params:
        for x, y, t in batches(data, device, need_labels, estimator, limit):
            for p in all_params:
                p.grad = None
            out = model_output(model, x, t)
            loss = loss_fn(out if raw_output else to_logits(out, output_transform), y)
            if not loss.requires_grad:
                if not torch.is_grad_enabled():
                    raise _grad_disabled_error(estimator)
                raise ValueError(f"estimator {estimator!r}: the loss does not require grad: nothing connects it to "
                                 "the model's parameters")
            loss.backward()
            for n in names:
                g = params[n].grad
                if g is not None:
                    sums[n] += accumulate(g)
            count += 1
    if count == 0:
        raise ValueError(f"estimator {estimator!r} got empty data: no samples to estimate importances from")
    return {n: s / float(count) for n, s in sums.items()}


def minibatch_fisher(model, data, *, names, criterion=None, device=None, limit=None, output_transform=None, **_):
    """Squared minibatch-mean gradients, averaged over minibatches (Avalanche ``EWCPlugin``).

    The criterion is used as it is (its own reduction). The strategy's criterion (the plugin's
    default, a :class:`._common.StrategyCriterion`) gets the model's raw output, as the strategy and
    ``EWCPlugin`` give it; a criterion given by the user gets the logits (after ``output_transform``)."""
    crit = criterion if criterion is not None else torch.nn.CrossEntropyLoss()
    return minibatch_importance(model, data, names, crit, lambda g: g.pow(2), estimator="minibatch_fisher",
                                need_labels=True, device=device, limit=limit,
                                raw_output=isinstance(criterion, StrategyCriterion), output_transform=output_transform)


def _mean_sq_norm(out, _y):
    return torch.norm(out, p="fro", dim=1).pow(2).mean()


def avalanche_mas(model, data, *, names, device=None, limit=None, output_transform=None, **_):
    """|gradient of the batch-mean squared output norm|, averaged over minibatches (Avalanche
    ``MASPlugin``)."""
    return minibatch_importance(model, data, names, _mean_sq_norm, torch.abs, estimator="avalanche_mas",
                                need_labels=False, device=device, limit=limit, output_transform=output_transform)
