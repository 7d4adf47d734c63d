"""Checks that a lambda is on the right scale: the penalty against the task loss, the new
experience's training accuracy when the penalty holds the model (any optimizer), and the
penalty's curvature against plain SGD's stability limit. Torch only; the plugin calls them."""

from __future__ import annotations

import cmath
import math
from typing import Dict, Mapping, Optional, Tuple

import torch
from torch import Tensor


# estimators whose scale is that of a per-sample Fisher: a lambda tuned for Avalanche's minibatch
# Fisher (EWCPlugin) is about batch-size times too strong for them
_PER_SAMPLE_FISHER = ("empirical_fisher", "fisher", "expected_fisher", "rwalk_fisher")


def penalty_ratio_message(pen: float, loss: float, warn_ratio: float, *, exp_id, factor: float,
                          importance: str, importance_scale: float) -> Optional[str]:
    """The warning text when ``pen`` exceeds ``warn_ratio`` times the task loss, else None. It
    names the estimator in use and the factor at which the two would be equal."""
    ratio = pen / abs(loss) if loss != 0 else math.inf
    if ratio <= warn_ratio:
        return None
    balance = factor * abs(loss) / pen if pen > 0 and loss != 0 else 0.0
    msg = (
        f"ParameterChangePlugin: at the first iteration of experience {exp_id} the penalty ({pen:.4g}) is "
        f"{ratio:.3g}x the task loss ({loss:.4g}), above warn_ratio={warn_ratio:g}, with factor={factor:g} and "
        f"importance={importance!r} (importance_scale={importance_scale:g}): the penalty dominates and the model "
        f"will hardly learn the new experience. factor={balance:.3g} would make the two equal at this point; "
        "factor='auto' chooses one per experience on held-out data of the new experience."
    )
    if importance in _PER_SAMPLE_FISHER:
        msg += (" A lambda tuned for Avalanche's minibatch Fisher is about batch-size times too strong for "
                f"{importance!r}: scale it with importance_ratio(model, data, a='minibatch_fisher', "
                f"b={importance!r}) (as importance_scale, or multiply the factor by it)")
    return msg


class PlasticityMonitor:
    """The training accuracy of the first epoch of an experience, accumulated on the device (no
    host synchronisation until :meth:`result`), and the classes its labels cover."""

    def __init__(self):
        self.correct: Optional[Tensor] = None
        self.seen = 0
        self.present: Optional[Tensor] = None
        self.off = False  # outputs or targets that are not classes: no check

    def update(self, output, target, output_transform=None) -> None:
        if self.off:
            return
        from .importance._common import to_logits

        try:
            logits = to_logits(output, output_transform)
        except TypeError:
            self.off = True
            return
        if (not isinstance(target, Tensor) or target.dtype.is_floating_point or target.dim() != 1
                or logits.dim() != 2 or logits.shape[0] != target.shape[0] or logits.shape[1] < 2):
            self.off = True
            return
        hit = (logits.detach().argmax(-1) == target).sum()
        self.correct = hit if self.correct is None else self.correct + hit
        self.seen += int(target.shape[0])
        if self.present is None or self.present.numel() != logits.shape[1] or self.present.device != target.device:
            self.present = torch.zeros(logits.shape[1], dtype=torch.bool, device=target.device)
        self.present[target.clamp(0, logits.shape[1] - 1)] = True

    def result(self) -> Tuple[Optional[float], int]:
        """``(accuracy, number of classes seen)``; ``(None, 0)`` when nothing was measured."""
        if self.off or self.correct is None or not self.seen:
            return None, 0
        return float(self.correct) / self.seen, max(1, int(self.present.sum()))


def near_chance(accuracy: float, n_classes: int, margin: float = 0.1) -> bool:
    """Accuracy within ``margin`` of the way from chance (1 / n_classes) to 1."""
    chance = 1.0 / max(1, n_classes)
    return accuracy < chance + margin * (1.0 - chance)


def held_statistics(model, state, factor: float, x: Tensor, y: Tensor, t, criterion, impl=None) -> Optional[dict]:
    """The gradients of the task loss and of the penalty on one minibatch (eval mode, as the
    importance passes): their norms and cosine, over the parameters the state regularizes.
    None when no regularized parameter gets a task gradient."""
    from .importance._common import eval_mode, model_output
    from .selection import named_parameters

    named = named_parameters(model)
    names = [n for n in state.importances if n in named and named[n].requires_grad]
    if not names:
        return None
    params = [named[n] for n in names]
    with eval_mode(model), torch.enable_grad():
        loss = criterion(model_output(model, x, t), y)
        task = torch.autograd.grad(loss, params, allow_unused=True)
        pen = state.penalty({n: named[n] for n in names}, factor, impl=impl)
        pgrad = torch.autograd.grad(pen, params, allow_unused=True) if pen.requires_grad else [None] * len(params)
    dot = torch.zeros((), dtype=torch.float64, device=params[0].device)
    tt, pp = dot.clone(), dot.clone()
    for g, h in zip(task, pgrad):
        if g is not None:
            tt += g.double().pow(2).sum()
        if h is not None:
            pp += h.double().pow(2).sum()
        if g is not None and h is not None:
            dot += (g.double() * h.double()).sum()
    tt, pp, dot = (float(v) for v in torch.stack([tt, pp, dot]).tolist())
    if tt <= 0:
        return None
    tn, pn = math.sqrt(tt), math.sqrt(pp)
    return {"names": tuple(names), "task_grad": tn, "pen_grad": pn, "cosine": dot / (tn * pn) if pn > 0 else 0.0}


def held_message(*, exp_id, accuracy: float, n_classes: int, factor: float, importance: str,
                 optimizer: str, pen_grad: float, task_grad: float, cosine: float,
                 balance: Optional[float], auto: bool = False) -> str:
    """The warning text of a run held at its anchors by the penalty, with the balance factor (see
    :func:`avalanche_pcreg.factor_search.balance_factor`) when it could be measured."""
    what = ("" if balance is None else
            f"The balance factor is {balance:.3g} (a few unpenalized steps on the last minibatch gain as much task "
            "loss as they cost penalty at that factor; a factor well above it holds the model): use a factor "
            "below it, ")
    if auto:
        what += ("" if balance is None else "or, as factor='auto' chose this one, ") + (
            "give the search longer phases (FactorSearch(epochs=None)) or a smaller tol")
    else:
        what += "or let factor='auto' choose it per experience on the new experience's data"
    return (
        f"ParameterChangePlugin: the penalty holds the model at its anchors in experience {exp_id}: in its last "
        f"training epoch the accuracy on the experience's data is {accuracy:.3f} (chance: "
        f"{1.0 / max(1, n_classes):.3f}, {n_classes} classes), and the penalty's gradient ({pen_grad:.3g}) is "
        f"{pen_grad / task_grad:.2g} times the task loss's gradient ({task_grad:.3g}; cosine {cosine:+.2f}), with "
        f"factor={factor:g}, importance={importance!r} and {optimizer}: the run forgets little but learns nothing "
        "new. " + what + " (docs/factor-search.md). warn_frozen=False turns this check off"
    )


def sgd_instability(optimizer, importances: Mapping[str, Tensor], names_by_id: Mapping[int, str], factor: float,
                    steps: Optional[int], importance: str, bind_growth: Optional[float],
                    blocks: Optional[Mapping[str, float]] = None):
    """``(messages, caps)`` for the parameter groups of a ``torch.optim.SGD`` where the penalty
    alone is unstable: ``lr * 2 * factor * max(A) > 2 * (1 + momentum)``. ``blocks``: the largest
    curvature of each Kronecker-factored layer by parameter name (:meth:`.KronState.curvatures`),
    which counts as its ``max(A)``.

    Along the parameter with the largest ``A`` the heavy-ball update multiplies a deviation from
    the anchor by ``rho > 1`` a step (the largest root of ``z**2 - (1 + momentum - a) z +
    momentum``, ``a = lr * 2 * factor * A``), so by ``rho**steps`` over the experience. ``caps``
    maps the names of the groups whose growth exceeds ``bind_growth`` (None: never) to
    ``(1 + momentum) / (lr * 2 * factor)``, half the limit. One host sync per group.
    """
    messages, caps = [], {}
    blocks = blocks or {}
    if not isinstance(optimizer, torch.optim.SGD) or factor == 0 or not (importances or blocks):
        return messages, caps
    for group in optimizer.param_groups:
        lr, beta = float(group.get("lr", 0.0)), float(group.get("momentum", 0.0))
        if group.get("dampening", 0.0) or group.get("nesterov", False) or lr <= 0:
            continue
        named = [names_by_id[id(p)] for p in group["params"] if id(p) in names_by_id]
        names = [n for n in named if n in importances and importances[n].numel()]
        in_blocks = [n for n in named if n in blocks]
        if not names and not in_blocks:
            continue
        max_a = float(torch.stack([importances[n].max().float() for n in names]).max()) if names else 0.0
        block = max(in_blocks, key=blocks.get, default=None)
        if block is not None and blocks[block] > max_a:
            max_a = blocks[block]
        else:
            block = None
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
            caps.update({n: cap for n in names + in_blocks})
        messages.append(
            f"ParameterChangePlugin: the penalty alone makes SGD unstable: lr * 2 * factor * max(A) = "
            f"{lr:g} * 2 * {factor:g} * {max_a:.4g} = {a:.4g} > 2 * (1 + momentum) = {limit:g}: the parameters "
            f"with the largest importance ({importance!r}"
            + (f"; max(A) is the top eigenvalue of the Kronecker block of {block!r}, λ(G)·λ(A)" if block else "")
            + ") oscillate, their distance to the anchor growing "
            f"{rho:.3g}x per step ({growth:.3g}x over the experience's "
            f"{steps if steps is not None else 'unknown number of'} iterations) and the loss can go to inf/NaN. "
            f"Use factor < {limit / (lr * 2.0 * max_a):.4g} (or a smaller lr)."
            + (f" stability_guard: the penalty uses A capped at {cap:.4g} during this experience"
               + (" (a Kronecker block scaled down to that curvature)" if in_blocks else "")
               + " (the stored state is unchanged)." if bind else "")
        )
    return messages, caps


def capped(importances: Mapping[str, Tensor], caps: Dict[str, float]) -> Dict[str, Tensor]:
    return {n: (A.clamp(max=caps[n]) if n in caps else A) for n, A in importances.items()}
