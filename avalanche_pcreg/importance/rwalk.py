"""Riemannian Walk (Chaudhry et al. 2018): an EWC++ Fisher plus a normalized path score.

RWalk's penalty is of our form ``sum_i (F_i + S_i) (theta_i - theta*_i)**2``:

* ``F``: EWC++, a running average of squared task-loss gradients kept during training,
  ``F <- alpha * g**2 + (1 - alpha) * F`` at every iteration;
* ``S``: the path score. Over windows of ``delta_t`` iterations the loss change is accumulated,
  ``l -= g * (theta_{t+1} - theta_t)``, and at the window's end ``s += l / (0.5 * F * (theta -
  theta_window_start)**2 + eps)``.

At the boundary both terms are divided by their maxima over all parameters (so each lies in
[0, 1]; negative scores are relu-ed out) and summed.

Two trajectory estimators (see :mod:`.trajectory`):

* :class:`RWalkTracker` (``importance="rwalk"``): Avalanche 0.6's ``RWalkPlugin``, number for
  number. The gradient is that of the strategy's criterion alone on the current minibatch, at the
  start of every iteration, in eval mode (``needs_task_gradient``: the plugin runs that extra
  forward/backward, as Avalanche does); F runs over the whole stream; the scores of successive
  experiences are averaged, ``S <- (S + s) / 2``. Use with ``mode="online", decay=0`` (one
  anchor, the latest parameters) and ``factor = ewc_lambda``.
* :class:`RWalkFisherTracker` (``importance="rwalk_fisher"``, ours): the same path score, from
  the gradient the optimizer already has (no extra pass), per experience, plus the per-sample
  empirical Fisher of the experience for F (``data_estimator``); each experience's ``F/max F +
  relu(s)/max s`` is a separate quadratic of the consolidated state (``mode="separate"``).

All per-step work is multi-tensor ops on the parameters' device; the step counter is a Python int.
"""

from __future__ import annotations

from typing import Dict, List, Mapping, Optional

import torch
from torch import Tensor

from .._checks import check_nonneg_finite, check_positive_int
from .trajectory import TrajectoryEstimator, grow

__all__ = ["RWalkTracker", "RWalkFisherTracker"]


def _normalized_sum(fisher: Mapping[str, Tensor], score: Mapping[str, Tensor], names) -> Dict[str, Tensor]:
    """``F / max F + relu(S) / max S`` with the maxima over all parameters (0 where a max is 0)."""
    names = [n for n in names if n in fisher and n in score]
    if not names:
        return {}
    max_f = torch.stack([fisher[n].max() for n in names]).max()
    max_s = torch.stack([score[n].max() for n in names]).max()
    # A max of 0 (nothing learned) would give 0/0 = NaN, as it does in Avalanche; use 0 there.
    inv_f = torch.where(max_f > 0, 1.0 / max_f, torch.zeros_like(max_f))
    inv_s = torch.where(max_s != 0, 1.0 / max_s, torch.zeros_like(max_s))
    return {n: fisher[n] * inv_f + torch.relu(score[n]) * inv_s for n in names}


class _PathScore(TrajectoryEstimator):
    def __init__(self, alpha: float, delta_t: int):
        alpha = check_nonneg_finite("ewc_alpha", alpha)
        if alpha > 1:
            raise ValueError(f"ewc_alpha must be in [0, 1], got {alpha!r}")
        self.alpha = alpha
        self.delta_t = check_positive_int("delta_t", delta_t)
        self.eps = float(torch.finfo(torch.float32).eps)
        self.names: List[str] = []
        self.fisher: Dict[str, Tensor] = {}      # EWC++ running average of g**2
        self.grad: Dict[str, Tensor] = {}        # the gradient of this iteration
        self.window_loss: Dict[str, Tensor] = {}
        self.window_start: Dict[str, Tensor] = {}
        self.score: Dict[str, Tensor] = {}       # this experience's partial scores
        self.steps = 0                           # iterations seen (Avalanche: clock.train_iterations)
        self._before: Optional[List[Tensor]] = None

    def _sync(self, params: Mapping[str, Tensor]) -> None:
        for n, p in params.items():
            for buf in (self.window_loss, self.window_start, self.score):
                buf[n] = grow(buf.get(n), p)
            if n in self.fisher:
                self.fisher[n] = grow(self.fisher[n], p)
        self.names = list(params)

    def begin(self, params: Mapping[str, Tensor]) -> None:
        """Avalanche's ``before_training``: window and scores restart at the current parameters."""
        self._sync(params)
        for n, p in params.items():
            self.window_loss[n].zero_()
            self.score[n].zero_()
            self.window_start[n] = p.detach().clone()
        self._before = None

    def _record_gradient(self, grads: Dict[str, Tensor]) -> None:
        """``F <- alpha g**2 + (1 - alpha) F`` (F = g**2 the first time a parameter has one)."""
        self.grad = grads
        fresh = [n for n in grads if n not in self.fisher]
        for n in fresh:
            self.fisher[n] = grads[n] * grads[n]
        old = [n for n in grads if n not in fresh]
        if old:
            f = [self.fisher[n] for n in old]
            g = [grads[n] for n in old]
            torch._foreach_mul_(f, 1.0 - self.alpha)
            torch._foreach_addcmul_(f, g, g, value=self.alpha)

    def before_update(self, params: Mapping[str, Tensor]) -> None:
        self._sync(params)
        self._before = torch._foreach_mul([params[n].detach() for n in self.names], 1.0)

    def after_update(self, params: Mapping[str, Tensor]) -> None:
        befores, self._before = self._before, None
        self.steps += 1
        if befores is not None:
            live = [(n, b) for n, b in zip(self.names, befores) if n in self.grad]
            if live:
                names = [n for n, _ in live]
                # window_loss -= g * (theta_after - theta_before)
                deltas = torch._foreach_sub([params[n].detach() for n in names], [b for _, b in live])
                torch._foreach_addcmul_([self.window_loss[n] for n in names], [self.grad[n] for n in names],
                                        deltas, value=-1.0)
        if self.steps % self.delta_t == 0:
            self._close_window(params)

    @torch.no_grad()
    def _close_window(self, params: Mapping[str, Tensor]) -> None:
        names = [n for n in self.names if n in self.fisher]
        if names:
            d = torch._foreach_sub([params[n].detach() for n in names], [self.window_start[n] for n in names])
            torch._foreach_mul_(d, d)
            torch._foreach_mul_(d, [self.fisher[n] for n in names])
            torch._foreach_mul_(d, 0.5)
            torch._foreach_add_(d, self.eps)
            torch._foreach_add_([self.score[n] for n in names],
                                torch._foreach_div([self.window_loss[n] for n in names], d))
        for n in self.names:
            self.window_loss[n].zero_()
            self.window_start[n] = params[n].detach().clone()


class RWalkTracker(_PathScore):
    """Avalanche 0.6 ``RWalkPlugin`` (``ewc_alpha``, ``delta_t`` as there)."""

    needs_task_gradient = True

    def __init__(self, ewc_alpha: float = 0.9, delta_t: int = 10):
        super().__init__(ewc_alpha, delta_t)
        self.exp_score: Optional[Dict[str, Tensor]] = None  # averaged over experiences

    def task_gradient(self, params, grads) -> None:
        self._record_gradient({n: g.detach() for n, g in grads.items() if g is not None})

    def importance(self, params, data_importance=None) -> Dict[str, Tensor]:
        self._sync(params)
        if self.exp_score is None:
            self.exp_score = {n: s.clone() for n, s in self.score.items()}
        else:
            # Avalanche drops parameters that had no score before (they do not count).
            self.exp_score = {n: 0.5 * (grow(self.exp_score[n], s) + s)
                              for n, s in self.score.items() if n in self.exp_score}
        for n in self.score:
            self.score[n].zero_()
        return _normalized_sum(self.fisher, self.exp_score, self.names)


class RWalkFisherTracker(_PathScore):
    """RWalk's path score per experience plus the per-sample empirical Fisher (ours)."""

    data_estimator = "empirical_fisher"

    def __init__(self, ewc_alpha: float = 0.9, delta_t: int = 10):
        super().__init__(ewc_alpha, delta_t)

    def after_backward(self, params: Mapping[str, Tensor]) -> None:
        self._record_gradient({n: p.grad.detach().clone() for n, p in params.items() if p.grad is not None})

    def importance(self, params, data_importance=None) -> Dict[str, Tensor]:
        self._sync(params)
        if data_importance is None:
            raise ValueError("rwalk_fisher needs the empirical Fisher of the experience (data_importance)")
        out = _normalized_sum(data_importance, self.score, self.names)
        for n in self.score:
            self.score[n].zero_()
        return out
