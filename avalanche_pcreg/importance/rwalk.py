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

Under ``torch.distributed`` every rank must hold the same path statistics. The training gradient
of a ``DistributedDataParallel`` model (``rwalk_fisher``) is already averaged over ranks and the
parameters are replicas, so its statistics agree as they are. The task gradient of ``rwalk``
comes from an extra pass on the unwrapped model over the rank's own minibatch, which DDP does not
reduce: :class:`RWalkTracker` averages it over ranks (as DDP averages gradients, and as
Avalanche's ``RWalkPlugin`` gets it from a backward through DDP): per iteration, one collective
for which gradients exist (read on the host: the one host round trip of the step, only under
``torch.distributed``) and one per dtype of the gradients. With equal minibatch sizes on every rank (Avalanche's ``DistributedSampler`` pads
shards to equal size) that is the gradient of the criterion on the ranks' minibatches together,
so the estimate is the one of a single process trained on those union minibatches.
"""

from __future__ import annotations

from typing import Dict, List, Mapping, Optional

import torch
from torch import Tensor

from .._checks import check_nonneg_finite, check_positive_int
from ._common import dist_rank_world
from .trajectory import TrajectoryEstimator, grow

__all__ = ["RWalkTracker", "RWalkFisherTracker", "mean_over_ranks"]


def mean_over_ranks(params: Mapping[str, Tensor], grads: Mapping[str, Optional[Tensor]]) -> Dict[str, Tensor]:
    """``grads`` averaged over the ranks of an initialised ``torch.distributed`` group (the
    gradients that are not None, as they are, otherwise).

    A gradient that is None on some ranks (a parameter their minibatch did not use: a head of
    another task) counts as zeros there, as DDP counts it; one that is None on every rank stays
    out. Every rank makes the same collectives: one for which gradients exist, then one per
    (dtype, device) group of flattened gradients.
    """
    _, world = dist_rank_world()
    if world == 1:
        return {n: g for n, g in grads.items() if g is not None}
    dist = torch.distributed
    names = sorted(grads)
    if not names:
        return {}
    device = params[names[0]].device
    present = torch.tensor([0.0 if grads[n] is None else 1.0 for n in names], dtype=torch.float32, device=device)
    dist.all_reduce(present, op=dist.ReduceOp.SUM)
    names = [n for n, k in zip(names, present.tolist()) if k > 0]
    groups: Dict[tuple, List[str]] = {}
    for n in names:
        groups.setdefault((params[n].dtype, params[n].device), []).append(n)
    out: Dict[str, Tensor] = {}
    for (dtype, dev), members in groups.items():
        parts = [(grads[n] if grads[n] is not None else torch.zeros_like(params[n])).detach().to(dtype).reshape(-1)
                 for n in members]
        flat = torch.cat(parts).to(dev)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat.div_(world)
        for n, piece in zip(members, torch.split(flat, [t.numel() for t in parts])):
            out[n] = piece.view(params[n].shape)
    return out


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
        # Under torch.distributed the ranks' gradients (each of its own minibatch) are averaged.
        self._record_gradient(mean_over_ranks(params, {n: (g.detach() if g is not None else None)
                                                       for n, g in grads.items()}))

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
