"""What :class:`~avalanche_pcreg.ParameterChangePlugin` watches while a strategy trains.

The plugin computes importances, keeps the consolidated state and adds the penalty to the loss;
:class:`PenaltyMonitor`, which the plugin owns and calls from its callbacks, watches the penalty:

* the epoch's penalty log: one float64 entry per step, kept on the penalty's device (off the CPU
  no host synchronisation per step, one copy into the log), and the epoch's mean published as
  ``ParameterChange/penalty_epoch``;
* a non-finite penalty: reported at once on the CPU, at the end of the epoch elsewhere (with the
  iteration where it first appeared); ``on_nonfinite`` raises or warns once;
* the penalty against the task loss: one warning per experience above ``warn_ratio``;
* a template that never fires ``before_backward`` (the penalty could not be added): an error;
* after the last epoch of an experience with a penalty, whether the penalty holds the model at
  its anchors (``warn_frozen``).

The figures and the messages themselves come from :mod:`avalanche_pcreg._guards`.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import Tensor

from . import _avalanche  # noqa: F401  (before Avalanche: its import without qpsolvers' warning)
from avalanche.evaluation.metric_results import MetricValue

from ._guards import PlasticityMonitor, held_message, held_statistics, near_chance, penalty_ratio_message
from .factor_search import optimizer_like, probe_balance
from .selection import named_parameters, unwrap

__all__ = ["PenaltyMonitor", "publish", "experience_id", "METRIC_PREFIX"]

METRIC_PREFIX = "ParameterChange"


def experience_id(strategy, experience=None):
    """The experience's ``current_experience`` (default: the strategy's current experience), else
    the strategy's count of trained experiences."""
    experience = strategy.experience if experience is None else experience
    return getattr(experience, "current_experience", strategy.clock.train_exp_counter)


def publish(strategy, origin, name: str, value: float, x: int) -> None:
    """``ParameterChange/<name>`` to the strategy's evaluator (and so its loggers), if it has one."""
    evaluator = getattr(strategy, "evaluator", None)
    if evaluator is not None:
        evaluator.publish_metric_value(MetricValue(origin, f"{METRIC_PREFIX}/{name}", value, x))


class PenaltyMonitor:
    """The penalty log, the non-finite and penalty/loss guards and the held-model check of one plugin.

    :param on_nonfinite: ``"raise"`` (FloatingPointError) or ``"warn"`` (once per monitor).
    :param warn_ratio: warn when the first non-zero penalty of an experience exceeds the task loss
        by this factor; None: never.
    :param warn_frozen: after the last epoch of an experience with a penalty, check whether the
        penalty holds the model.
    :param output_transform: how the held-model check reads logits from the model's output.
    :param impl: the penalty kernel of the held-model check's figures.
    :param importance: the estimator's name, for the messages.
    :param importance_scale: for the penalty/loss message.
    :param auto: the factor is chosen by ``factor="auto"`` (the held-model message's advice).
    """

    # devices where reading the penalty every step costs nothing (no asynchronous queue to drain)
    check_every_step_on = ("cpu",)

    def __init__(self, *, on_nonfinite: str, warn_ratio: Optional[float], warn_frozen: bool, output_transform,
                 impl: Optional[str], importance: str, importance_scale: float, auto: bool):
        self.on_nonfinite, self.warn_ratio, self.warn_frozen = on_nonfinite, warn_ratio, warn_frozen
        self.output_transform, self.impl, self.auto = output_transform, impl, auto
        self.importance, self.importance_scale = importance, importance_scale
        self.warned_nonfinite = False
        self.epoch = 0  # the current epoch of the experience, for messages
        self.ratio_checked = True  # the penalty/loss check runs once per experience
        self.frozen_check = False  # this experience has a penalty: check it after its last epoch
        self.plasticity: Optional[PlasticityMonitor] = None  # the last epoch's training accuracy
        self.reset_epoch()

    # ------------------------------------------------------------------ experience and epoch
    def reset_epoch(self) -> None:
        """Per-epoch counters and the epoch's penalty log."""
        self.iterations = 0
        self.backwards = 0
        # The epoch's penalties, one float64 entry per backward, kept where they were computed, and
        # their iterations (on the host).
        self.log: Optional[Tensor] = None
        self.log_iterations: list = []

    def begin_experience(self, penalized: bool) -> None:
        """At ``before_training_exp``; ``penalized``: the state is not empty and the factor > 0."""
        self.ratio_checked = self.warn_ratio is None
        self.frozen_check = self.warn_frozen and penalized
        self.plasticity = None

    def begin_epoch(self, strategy) -> None:
        self.reset_epoch()  # an epoch interrupted by an exception leaks nothing into this one
        self.epoch = strategy.clock.train_exp_epochs
        # the held-by-the-penalty check reads the training accuracy of the experience's last epoch
        last = self.epoch == int(getattr(strategy, "train_epochs", 1) or 1) - 1
        self.plasticity = PlasticityMonitor() if self.frozen_check and last else None

    def count_iteration(self) -> None:
        self.iterations += 1

    def count_backward(self) -> None:
        self.backwards += 1

    def after_iteration(self, strategy) -> None:
        if self.plasticity is not None:
            self.plasticity.update(strategy.mb_output, strategy.mb_y, self.output_transform)

    def end_epoch(self, strategy, origin, factor: float, state) -> None:
        """At ``after_training_epoch``: refuse a template that never fired ``before_backward``, read
        the log (the first non-finite iteration, off the CPU; the mean, published for ``origin``),
        and after the last epoch of an experience with a penalty run the held-model check on
        ``state`` (the state the penalty used) at ``factor``."""
        if self.iterations > 0 and self.backwards == 0:
            raise RuntimeError(
                f"{type(strategy).__name__} ran {self.iterations} training iterations without firing "
                "before_backward, so ParameterChangePlugin cannot add its penalty to the loss (meta-learning "
                "templates such as MER/LaMAML and StreamingLDA work this way). Refusing to train silently "
                "without the regularizer."
            )
        count = len(self.log_iterations)
        if count:
            values = self.log[:count]
            if values.device.type not in self.check_every_step_on:
                bad = torch.nonzero(~torch.isfinite(values))  # the epoch's one host synchronisation
                if bad.numel():
                    self._nonfinite(strategy, None, self.log_iterations[int(bad[0, 0])], factor)
            mean = float(values.sum()) / count
            publish(strategy, origin, "penalty_epoch", mean, strategy.clock.train_iterations)
        self.reset_epoch()
        if self.plasticity is not None:  # the last epoch of an experience with a penalty
            plasticity, self.plasticity = self.plasticity, None
            self._check_held(strategy, plasticity, state, factor)

    # ------------------------------------------------------------------ the penalty of a step
    def check_ratio(self, strategy, pen: Tensor, factor: float) -> None:
        """Before the penalty joins ``strategy.loss``: warn once per experience when it dwarfs the
        task loss (one host synchronisation per iteration until a non-zero penalty was seen)."""
        if self.ratio_checked:
            return
        p, loss = float(pen.detach()), float(strategy.loss.detach())
        if p == 0.0:
            return  # at the anchor: look again on the next iteration
        self.ratio_checked = True
        msg = penalty_ratio_message(p, loss, self.warn_ratio, exp_id=experience_id(strategy), factor=factor,
                                    importance=self.importance, importance_scale=self.importance_scale)
        if msg:
            warnings.warn(msg, RuntimeWarning)

    def record(self, strategy, pen: Tensor, factor: float) -> None:
        """Log the step's penalty; on the CPU, check it is finite at once (elsewhere the log is read
        once, at the end of the epoch)."""
        detached = pen.detach()
        self._append(detached)
        if detached.device.type in self.check_every_step_on:
            value = float(detached)  # free on the CPU
            if not abs(value) < float("inf"):  # NaN or +-inf (a Python comparison: no tensor op)
                self._nonfinite(strategy, value, self.iterations, factor)

    def _append(self, value: Tensor) -> None:
        """Append ``value`` to the epoch's log: one copy into a float64 buffer on its device (grown by
        doubling), and the iteration on the host."""
        i, log = len(self.log_iterations), self.log
        if log is None or i == log.numel() or log.device != value.device:
            grown = torch.empty(max(64, 2 * i), dtype=torch.float64, device=value.device)
            if i:
                grown[:i].copy_(log[:i])
            self.log = log = grown
        log[i].copy_(value)
        self.log_iterations.append(self.iterations)

    def _nonfinite(self, strategy, value: Optional[float], iteration: int, factor: float) -> None:
        what = "not finite" if value is None else f"{value} (not finite)"
        msg = (f"ParameterChangePlugin penalty is {what} at experience {experience_id(strategy)}, epoch "
               f"{self.epoch}, iteration {iteration} of the epoch, with factor={factor}: "
               "the model (or the loaded state) diverged; lower the learning rate or the factor")
        if self.on_nonfinite == "raise":
            raise FloatingPointError(msg + " (on_nonfinite='warn' trains on with a warning)")
        if not self.warned_nonfinite:
            self.warned_nonfinite = True
            # the frame that fired the plugin's callback (the plugin's callback calls this monitor)
            warnings.warn(msg + " (warned once)", RuntimeWarning, stacklevel=4)

    # ------------------------------------------------------------------ the held-model check
    def _check_held(self, strategy, plasticity: PlasticityMonitor, state, factor: float) -> None:
        """After the last epoch of an experience with a penalty: warn when the training accuracy is
        near chance, the penalty's gradient is at least half the task loss's and the factor is above
        twice the balance factor of a short probe (any optimizer)."""
        accuracy, n_classes = plasticity.result()
        if accuracy is None or not near_chance(accuracy, n_classes) or factor == 0:
            return
        x, y, t = getattr(strategy, "mb_x", None), getattr(strategy, "mb_y", None), getattr(strategy, "mb_task_id", None)
        if not isinstance(x, Tensor) or not isinstance(y, Tensor):
            return
        model = unwrap(strategy.model)
        try:
            stats = held_statistics(model, state, factor, x, y, t, strategy._criterion, impl=self.impl)
        except Exception:  # noqa: BLE001  a strategy whose minibatch is not (x, y) as it trains on (AR1...):
            return  # the check is a diagnosis, never a reason for a run to fail
        if stats is None or stats["pen_grad"] < 0.5 * stats["task_grad"]:
            return
        try:
            balance = probe_balance(model, x, y, t, make_optimizer=lambda copy: optimizer_like(strategy.optimizer, model, copy),
                                    criterion=strategy._criterion,
                                    penalty=lambda copy, f: state.penalty(named_parameters(copy), f, impl=self.impl))
        except Exception:  # noqa: BLE001  an optimizer that cannot be rebuilt...: the warning goes without it
            balance = None
        if balance is not None and factor < 2.0 * balance:
            return  # the factor is not above the balance: whatever holds the model, it is not the penalty alone
        warnings.warn(held_message(exp_id=experience_id(strategy), accuracy=accuracy, n_classes=n_classes,
                                   factor=factor, importance=self.importance,
                                   optimizer=type(strategy.optimizer).__name__, pen_grad=stats["pen_grad"],
                                   task_grad=stats["task_grad"], cosine=stats["cosine"], balance=balance,
                                   auto=self.auto), RuntimeWarning)
