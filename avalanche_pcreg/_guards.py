"""Checks that a lambda is on the right scale: the penalty against the task loss, and the
penalty's curvature against plain SGD's stability limit. Torch only; the plugin calls them."""

from __future__ import annotations

import cmath
import math
from typing import Dict, Mapping, Optional

import torch
from torch import Tensor


def penalty_ratio_message(pen: float, loss: float, warn_ratio: float, *, exp_id, factor: float,
                          importance: str, importance_scale: float) -> Optional[str]:
    """The warning text when ``pen`` exceeds ``warn_ratio`` times the task loss, else None."""
    ratio = pen / abs(loss) if loss != 0 else math.inf
    if ratio <= warn_ratio:
        return None
    return (
        f"ParameterChangePlugin: at the first iteration of experience {exp_id} the penalty ({pen:.4g}) is "
        f"{ratio:.3g}x the task loss ({loss:.4g}), above warn_ratio={warn_ratio:g}, with factor={factor:g} and "
        f"importance={importance!r} (importance_scale={importance_scale:g}). A lambda tuned for Avalanche's "
        "minibatch Fisher is about batch-size times too strong for the per-sample estimators: scale it with "
        f"importance_ratio(model, data, a='minibatch_fisher', b={importance!r}) (as importance_scale, or "
        "multiply the factor by it)"
    )


def sgd_instability(optimizer, importances: Mapping[str, Tensor], names_by_id: Mapping[int, str], factor: float,
                    steps: Optional[int], importance: str, bind_growth: Optional[float]):
    """``(messages, caps)`` for the parameter groups of a ``torch.optim.SGD`` where the penalty
    alone is unstable: ``lr * 2 * factor * max(A) > 2 * (1 + momentum)``.

    Along the parameter with the largest ``A`` the heavy-ball update multiplies a deviation from
    the anchor by ``rho > 1`` a step (the largest root of ``z**2 - (1 + momentum - a) z +
    momentum``, ``a = lr * 2 * factor * A``), so by ``rho**steps`` over the experience. ``caps``
    maps the names of the groups whose growth exceeds ``bind_growth`` (None: never) to
    ``(1 + momentum) / (lr * 2 * factor)``, half the limit. One host sync per group.
    """
    messages, caps = [], {}
    if not isinstance(optimizer, torch.optim.SGD) or factor == 0 or not importances:
        return messages, caps
    for group in optimizer.param_groups:
        lr, beta = float(group.get("lr", 0.0)), float(group.get("momentum", 0.0))
        if group.get("dampening", 0.0) or group.get("nesterov", False) or lr <= 0:
            continue
        names = [names_by_id[id(p)] for p in group["params"] if id(p) in names_by_id]
        names = [n for n in names if n in importances and importances[n].numel()]
        if not names:
            continue
        max_a = float(torch.stack([importances[n].max().float() for n in names]).max())
        a, limit = lr * 2.0 * factor * max_a, 2.0 * (1.0 + beta)
        if a <= limit:
            continue
        b = 1.0 + beta - a
        root = cmath.sqrt(b * b - 4.0 * beta)
        rho = max(abs((b + root) / 2), abs((b - root) / 2))
        growth = math.inf if steps is None else math.exp(min(steps * math.log(rho), 700.0))
        cap = (1.0 + beta) / (lr * 2.0 * factor)
        bind = bind_growth is not None and growth > bind_growth
        if bind:
            caps.update({n: cap for n in names})
        messages.append(
            f"ParameterChangePlugin: the penalty alone makes SGD unstable: lr * 2 * factor * max(A) = "
            f"{lr:g} * 2 * {factor:g} * {max_a:.4g} = {a:.4g} > 2 * (1 + momentum) = {limit:g}: the parameters "
            f"with the largest importance ({importance!r}) oscillate, their distance to the anchor growing "
            f"{rho:.3g}x per step ({growth:.3g}x over the experience's "
            f"{steps if steps is not None else 'unknown number of'} iterations) and the loss can go to inf/NaN. "
            f"Use factor < {limit / (lr * 2.0 * max_a):.4g} (or a smaller lr)."
            + (f" stability_guard: the penalty uses A capped at {cap:.4g} during this experience (the stored "
               "state is unchanged)." if bind else "")
        )
    return messages, caps


def capped(importances: Mapping[str, Tensor], caps: Dict[str, float]) -> Dict[str, Tensor]:
    return {n: (A.clamp(max=caps[n]) if n in caps else A) for n, A in importances.items()}
