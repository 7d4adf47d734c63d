"""The MAS importance of Avalanche 0.6's ``MASPlugin`` (after FACIL), kept for exact parity.

``mean over minibatches of |d/dtheta mean_n ||f(x_n)||**2|``: the absolute value of the
*minibatch* gradient, over a ``DataLoader(dataset, batch_size)`` without shuffling. Aljundi et al.
2018 average the absolute *per-sample* gradients (``importance="mas"``); since
``|mean_n g_n| <= mean_n |g_n|`` this one is smaller, and more so for larger batches.

Avalanche runs this pass with the model in train mode (the ``avalanche_mas`` registration asks the
plugin not to switch to eval mode) and with a DataLoader that draws its seed from the global RNG.
Avalanche's ``alpha`` (``I <- alpha * I + (1 - alpha) * I_new`` after the first experience) is
``mode="online", decay=alpha, running_average=True`` on the plugin. The loop (``loss.backward()``
and ``.grad``, as Avalanche) is :func:`.minibatch.minibatch_importance`.
"""

from __future__ import annotations

import torch

from .minibatch import minibatch_importance

__all__ = ["avalanche_mas"]


def _mean_sq_norm(out, _y):
    return torch.norm(out, p="fro", dim=1).pow(2).mean()


def avalanche_mas(model, data, *, names, device=None, limit=None, **_):
    """|gradient of the batch-mean squared output norm|, averaged over minibatches."""
    return minibatch_importance(model, data, names, _mean_sq_norm, torch.abs, estimator="avalanche_mas",
                                need_labels=False, device=device, limit=limit)
