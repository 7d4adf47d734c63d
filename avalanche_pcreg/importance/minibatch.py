"""The squared *minibatch* gradient that Avalanche 0.6's ``EWCPlugin`` calls a Fisher.

Kept for exact parity: ``sum_b (grad of the mean loss over minibatch b)**2 / (number of
minibatches)``, over a ``DataLoader(dataset, batch_size)`` without shuffling, in eval mode.

Its scale depends on the batch size: for B samples a batch it is about 1/B of the per-sample
Fisher plus the squared mean gradient, so it needs a lambda orders of magnitude larger than the
per-sample estimators (van de Ven 2025). Compare methods at each one's own tuned lambda.
"""

from __future__ import annotations

import torch

from ._common import batches, model_forward

__all__ = ["minibatch_fisher"]


def minibatch_fisher(model, data, *, names, criterion=None, device=None, limit=None, **_):
    """Squared minibatch-mean gradients, averaged over minibatches (Avalanche ``EWCPlugin``)."""
    crit = criterion if criterion is not None else torch.nn.CrossEntropyLoss()
    params = dict(model.named_parameters())
    targets = [params[n] for n in names]
    sums = {n: torch.zeros_like(p) for n, p in zip(names, targets)}
    count = 0
    for x, y, t in batches(data, device, True, "minibatch_fisher", limit):
        loss = crit(model_forward(model, x, t), y)
        grads = torch.autograd.grad(loss, targets, allow_unused=True)
        for n, g in zip(names, grads):
            if g is not None:
                sums[n] += g.pow(2)
        count += 1
    if count == 0:
        raise ValueError("estimator 'minibatch_fisher' got empty data: no samples to estimate importances from")
    return {n: s / float(count) for n, s in sums.items()}
