"""The MAS importance of Avalanche 0.6's ``MASPlugin`` (after FACIL), kept for exact parity.

``mean over minibatches of |d/dtheta mean_n ||f(x_n)||**2|``: the absolute value of the
*minibatch* gradient, over a ``DataLoader(dataset, batch_size)`` without shuffling. Aljundi et al.
2018 average the absolute *per-sample* gradients (``importance="mas"``); since
``|mean_n g_n| <= mean_n |g_n|`` this one is smaller, and more so for larger batches.

Avalanche runs this pass with the model in train mode (the ``avalanche_mas`` registration asks the
plugin not to switch to eval mode) and with a DataLoader that draws its seed from the global RNG.
Avalanche's ``alpha`` (``I <- alpha * I + (1 - alpha) * I_new`` after the first experience) is
``mode="online", decay=alpha, running_average=True`` on the plugin.
"""

from __future__ import annotations

import torch

from ._common import batches, model_forward

__all__ = ["avalanche_mas"]


def avalanche_mas(model, data, *, names, device=None, limit=None, **_):
    """|gradient of the batch-mean squared output norm|, averaged over minibatches."""
    params = dict(model.named_parameters())
    targets = [params[n] for n in names]
    sums = {n: torch.zeros_like(p) for n, p in zip(names, targets)}
    count = 0
    for x, _y, t in batches(data, device, False, "avalanche_mas", limit):
        out = model_forward(model, x, t)
        loss = torch.norm(out, p="fro", dim=1).pow(2).mean()
        grads = torch.autograd.grad(loss, targets, allow_unused=True)
        for n, g in zip(names, grads):
            if g is not None:
                sums[n] += g.abs()
        count += 1
    if count == 0:
        raise ValueError("estimator 'avalanche_mas' got empty data: no samples to estimate importances from")
    return {n: s / float(count) for n, s in sums.items()}
