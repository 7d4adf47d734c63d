"""Drop-in strategy classes for Avalanche 0.6's regularization strategies.

Change one import::

    from avalanche.training import EWC, SynapticIntelligence, MAS    # before
    from avalanche_pcreg.training import EWC, SynapticIntelligence, MAS  # after

Each class takes exactly the keyword arguments of its Avalanche 0.6 counterpart (``RWalk`` takes
those of ``RWalkPlugin``, ``L2`` those of ``EWC`` but the mode), plus ``importance=`` (and
``importance_scale=``, ``factor_search=`` where they apply). ``importance``'s
default is Avalanche's own definition, so the swap changes nothing (the per-iteration losses and
the final parameters match Avalanche's plugin within float32 rounding; see docs/migration.md);
naming one of our estimators switches to it. Each class is a :class:`~avalanche.training.Naive`
with a :class:`~avalanche_pcreg.ParameterChangePlugin` appended to ``plugins``; the plugin is
``strategy.pcreg``.

Our state is consolidated (one importance and one anchor per parameter, O(P) memory, whatever the
number of experiences). ``keep_importance_data=True`` (``EWC``, ``L2``) also keeps each experience's
importances for inspection, in ``strategy.pcreg.kept_importances`` (O(TP) memory, on the CPU).

Every factor argument (``ewc_lambda``, ``si_lambda``, ``lambda_reg``, ``l2_lambda``) may be
``"auto"``: the factor is then chosen at the start of each experience by a short search on that
experience's own data (De Lange et al. 2021; :mod:`avalanche_pcreg.factor_search`,
docs/factor-search.md), with the options of ``factor_search=`` (a
:class:`~avalanche_pcreg.factor_search.FactorSearch` or a dict of its fields).
"""

from __future__ import annotations

import numbers
from typing import Callable, List, Optional, Sequence, Union

import torch
from torch.nn import CrossEntropyLoss, Module
from torch.nn.modules.batchnorm import _NormBase
from torch.optim import Optimizer

from . import _avalanche  # noqa: F401  (before Avalanche: its import without qpsolvers' warning)
from avalanche.core import SupervisedPlugin
from avalanche.training.plugins.evaluation import EvaluationPlugin, default_evaluator
from avalanche.training.supervised import Naive
from avalanche.training.templates.base_sgd import CriterionType

from ._checks import check_nonneg_finite
from .plugin import ParameterChangePlugin
from .selection import module_parameter_names

__all__ = ["EWC", "SynapticIntelligence", "MAS", "RWalk", "L2"]


def _plugin(*args, **kwargs) -> ParameterChangePlugin:
    """Our plugin with the SGD stability guard on: where Avalanche's run would diverge to NaN,
    the penalty's importances are capped for the experience (with a warning); elsewhere the
    guard does not bind and the numbers are Avalanche's."""
    return ParameterChangePlugin(*args, stability_guard=True, **kwargs)


def _factor(name: str, value):
    """A factor argument: a number >= 0 (returned as it is; the plugin checks it) or ``"auto"``."""
    if isinstance(value, str) and value != "auto":
        raise TypeError(f"{name} must be a real number >= 0 or 'auto', got str {value!r}")
    return value


def _with(plugins, plugin):
    """Avalanche appends its plugin to the caller's list (in place); so do we."""
    if plugins is None:
        return [plugin]
    if isinstance(plugins, list):
        plugins.append(plugin)
        return plugins
    return [*plugins, plugin]


class _PCRegStrategy(Naive):
    def _attach(self, plugin: ParameterChangePlugin) -> ParameterChangePlugin:
        self.pcreg = plugin
        return plugin


class EWC(_PCRegStrategy):
    """Elastic Weight Consolidation (Kirkpatrick et al. 2017), as Avalanche 0.6's ``EWC``.

    Penalty ``ewc_lambda * sum_i F_i (theta_i - theta*_i)**2`` (``mode="separate"``: one term per
    past experience, stored consolidated; ``"online"``: ``F <- decay_factor * F + F_new`` and one
    anchor).

    :param importance: the Fisher estimate.

        * ``"minibatch_fisher"`` (default): Avalanche's ``EWCPlugin`` estimate, the squared
          gradient of the minibatch-mean loss over ``DataLoader(experience, train_mb_size)``.
          The swap is exact.
        * ``"empirical_fisher"`` (ours, Kirkpatrick et al.'s definition): the mean squared
          per-sample gradient, at the same cost. It is about ``train_mb_size`` times larger, so
          carry ``ewc_lambda`` over with ``importance_scale`` or divide it (docs/migration.md,
          :func:`~avalanche_pcreg.importance.importance_ratio`). Also ``"fisher"``,
          ``"expected_fisher"``, or any registered name or callable.
    :param ewc_lambda: the factor, or ``"auto"`` (chosen per experience, see ``factor_search``).
    :param factor_search: the options of ``ewc_lambda="auto"``: a
        :class:`~avalanche_pcreg.factor_search.FactorSearch` or a dict of its fields (None: defaults).
    :param importance_scale: multiplies the importances (default 1).
    :param keep_importance_data: also keep each experience's importances, as they were merged, in
        ``strategy.pcreg.kept_importances`` (experience -> {name: tensor}, on the CPU; O(TP) memory).
        Off by default; the penalty uses the consolidated state either way.
    """

    def __init__(
        self,
        *,
        model: Module,
        optimizer: Optimizer,
        criterion: CriterionType,
        ewc_lambda: Union[float, str],
        mode: str = "separate",
        decay_factor: Optional[float] = None,
        keep_importance_data: bool = False,
        train_mb_size: int = 1,
        train_epochs: int = 1,
        eval_mb_size: Optional[int] = None,
        device: Union[str, torch.device] = "cpu",
        plugins: Optional[List[SupervisedPlugin]] = None,
        evaluator: Union[EvaluationPlugin, Callable[[], EvaluationPlugin]] = default_evaluator,
        eval_every=-1,
        importance: Union[str, Callable] = "minibatch_fisher",
        importance_scale: float = 1.0,
        factor_search=None,
        **base_kwargs,
    ):
        if mode not in ("separate", "online"):
            raise ValueError(f"mode must be 'separate' or 'online' (Avalanche EWC), got {mode!r}")
        if mode == "online" and decay_factor is None:
            raise ValueError("mode='online' needs decay_factor (as Avalanche's EWC)")
        if not isinstance(keep_importance_data, bool):
            raise TypeError(f"keep_importance_data must be a bool, got {type(keep_importance_data).__name__}")
        self.keep_importance_data = keep_importance_data
        plugin = _plugin(_factor("ewc_lambda", ewc_lambda), importance, mode, decay_factor,
                         importance_scale=importance_scale, factor_search=factor_search,
                         keep_importance_data=keep_importance_data)
        super().__init__(model=model, optimizer=optimizer, criterion=criterion, train_mb_size=train_mb_size,
                         train_epochs=train_epochs, eval_mb_size=eval_mb_size, device=device,
                         plugins=_with(plugins, plugin), evaluator=evaluator, eval_every=eval_every, **base_kwargs)
        self._attach(plugin)


def _is_norm(module: Module) -> bool:
    return isinstance(module, _NormBase)


def _norm_parameter_names(model: Module) -> frozenset:
    """Canonical names of the parameters of normalization layers (Avalanche's SI never regularizes
    them): the names the plugin selects by, whatever wraps ``model`` (DDP, DataParallel,
    ``torch.compile``)."""
    return frozenset(module_parameter_names(model, _is_norm))


class _NotIn:
    """A picklable ``(name, param) -> bool`` selecting parameters outside a fixed set."""

    def __init__(self, names):
        self.names = frozenset(names)

    def __call__(self, name, _param):
        return name not in self.names


class _LambdaSchedule(SupervisedPlugin):
    """Sets the plugin's factor per experience from a list (Avalanche SI's list ``si_lambda``)."""

    def __init__(self, target: ParameterChangePlugin, factors: Sequence[float]):
        super().__init__()
        self.target, self.factors = target, list(factors)

    def before_training_exp(self, strategy, *args, **kwargs):
        k = int(strategy.clock.train_exp_counter)
        self.target.factor = self.factors[min(k, len(self.factors) - 1)]


class SynapticIntelligence(_PCRegStrategy):
    """Synaptic Intelligence (Zenke et al. 2017), as Avalanche 0.6's ``SynapticIntelligence``.

    Penalty ``si_lambda / 2 * sum_i W_i (theta_i - theta*_i)**2`` with one anchor, the parameters
    at the end of the last experience. Normalization-layer parameters are left out, as in
    Avalanche, also when ``model`` is wrapped (DDP, DataParallel, ``torch.compile``): they are
    found by module type and named as the plain model names them. ``si_lambda`` may be a list: one
    value per experience, the last one repeated; or ``"auto"``: the plugin's factor (``si_lambda / 2``)
    is chosen per experience (``factor_search``: its options, as in :class:`EWC`).

    :param importance:

        * ``"avalanche_si"`` (default): Avalanche's ``W = clamp(-sum_exp trajectory / (delta**2 +
          eps), max=0.001)``. This is what Avalanche computes where its parameter copies are copies
          (CUDA); on CPU Avalanche 0.6's SI is a no-op (its copies are views of the live
          parameters), ours is not. Entries Avalanche would leave negative are 0 here.
        * ``"si"`` (ours, Zenke et al.'s definition): ``Omega += omega / (delta**2 + xi)`` with
          ``xi = 0.1`` and no clipping, summed over experiences (``mode="online", decay=1``).
          ``eps`` is not used. Tune ``si_lambda`` again: without the 0.001 clip the importances
          are orders of magnitude larger.
    """

    def __init__(
        self,
        *,
        model: Module,
        optimizer: Optimizer,
        criterion: CriterionType,
        si_lambda: Union[float, Sequence[float], str],
        eps: float = 0.0000001,
        train_mb_size: int = 1,
        train_epochs: int = 1,
        eval_mb_size: int = 1,
        device: Union[str, torch.device] = "cpu",
        plugins: Optional[Sequence["SupervisedPlugin"]] = None,
        evaluator: Union[EvaluationPlugin, Callable[[], EvaluationPlugin]] = default_evaluator,
        eval_every=-1,
        importance: str = "avalanche_si",
        factor_search=None,
        **base_kwargs,
    ):
        lambdas = list(si_lambda) if isinstance(si_lambda, (list, tuple)) else [si_lambda]
        if not lambdas:
            raise ValueError("si_lambda must be a number, a non-empty list of numbers or 'auto'")
        if _factor("si_lambda", si_lambda) == "auto":
            factors = ["auto"]
        else:
            factors = [check_nonneg_finite("si_lambda", v) / 2.0 for v in lambdas]
        check_nonneg_finite("eps", eps)
        select = _NotIn(_norm_parameter_names(model))
        if importance == "avalanche_si":
            plugin = _plugin(factors[0], "avalanche_si", "online", decay=0.0, parameters=select,
                             estimator_options={"eps": eps}, factor_search=factor_search)
        elif importance == "si":
            plugin = _plugin(factors[0], "si", "online", decay=1.0, parameters=select, factor_search=factor_search)
        else:
            raise ValueError(f"importance must be 'avalanche_si' or 'si' for SynapticIntelligence, got {importance!r}")
        extra = [plugin] if len(factors) == 1 else [_LambdaSchedule(plugin, factors), plugin]
        plugins = list(plugins) if plugins is not None else []
        super().__init__(model=model, optimizer=optimizer, criterion=criterion, train_mb_size=train_mb_size,
                         train_epochs=train_epochs, eval_mb_size=eval_mb_size, device=device,
                         plugins=plugins + extra, evaluator=evaluator, eval_every=eval_every, **base_kwargs)
        self._attach(plugin)


class MAS(_PCRegStrategy):
    """Memory Aware Synapses (Aljundi et al. 2018), as Avalanche 0.6's ``MAS``.

    Penalty ``lambda_reg * sum_i I_i (theta_i - theta*_i)**2`` with one anchor (the latest
    parameters) and ``I <- alpha * I + (1 - alpha) * I_new`` after the first experience.

    :param importance:

        * ``"avalanche_mas"`` (default): Avalanche's ``|gradient of the minibatch-mean ||f(x)||**2|``,
          averaged over minibatches of ``train_mb_size``, computed in train mode. Exact swap.
        * ``"mas"`` (ours, Aljundi et al.'s definition): the mean over samples of the absolute
          per-sample gradient, at minibatch cost, in eval mode. It is at least as large.
    :param lambda_reg: the factor, or ``"auto"`` (``factor_search``: its options, as in :class:`EWC`).
    :param verbose: accepted for compatibility (no progress bar).
    """

    def __init__(
        self,
        *,
        model: Module,
        optimizer: Optimizer,
        criterion: CriterionType,
        lambda_reg: Union[float, str] = 1.0,
        alpha: float = 0.5,
        verbose: bool = False,
        train_mb_size: int = 1,
        train_epochs: int = 1,
        eval_mb_size: int = 1,
        device: Union[str, torch.device] = "cpu",
        plugins: Optional[List[SupervisedPlugin]] = None,
        evaluator: Union[EvaluationPlugin, Callable[[], EvaluationPlugin]] = default_evaluator,
        eval_every=-1,
        importance: Union[str, Callable] = "avalanche_mas",
        importance_scale: float = 1.0,
        factor_search=None,
        **base_kwargs,
    ):
        alpha = check_nonneg_finite("alpha", alpha)
        if alpha > 1:
            raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
        self.verbose = verbose
        plugin = _plugin(_factor("lambda_reg", lambda_reg), importance, "online", decay=alpha, running_average=True,
                         importance_scale=importance_scale, factor_search=factor_search)
        super().__init__(model=model, optimizer=optimizer, criterion=criterion, train_mb_size=train_mb_size,
                         train_epochs=train_epochs, eval_mb_size=eval_mb_size, device=device,
                         plugins=_with(plugins, plugin), evaluator=evaluator, eval_every=eval_every, **base_kwargs)
        self._attach(plugin)


class RWalk(_PCRegStrategy):
    """Riemannian Walk (Chaudhry et al. 2018): Avalanche 0.6's ``RWalkPlugin`` on ``Naive``.

    Penalty ``ewc_lambda * sum_i (F_i / max F + relu(S_i) / max S) (theta_i - theta*_i)**2``.

    :param importance:

        * ``"rwalk"`` (default): Avalanche's ``RWalkPlugin``, number for number: an EWC++
          Fisher (``ewc_alpha``) from an extra eval-mode backward of the criterion at every
          iteration, path scores over windows of ``delta_t`` iterations averaged over
          experiences, one anchor (the latest parameters).
        * ``"rwalk_fisher"`` (ours): the same path score from the gradient the optimizer already
          has (no extra backward), plus the per-sample empirical Fisher of each experience, one
          consolidated quadratic per experience (``mode="separate"``).
    :param ewc_lambda: the factor, or ``"auto"`` (``factor_search``: its options, as in :class:`EWC`).
    """

    def __init__(
        self,
        *,
        model: Module,
        optimizer: Optimizer,
        criterion: CriterionType = CrossEntropyLoss(),
        ewc_lambda: Union[float, str] = 0.1,
        ewc_alpha: float = 0.9,
        delta_t: int = 10,
        train_mb_size: int = 1,
        train_epochs: int = 1,
        eval_mb_size: Optional[int] = None,
        device: Union[str, torch.device] = "cpu",
        plugins: Optional[List[SupervisedPlugin]] = None,
        evaluator: Union[EvaluationPlugin, Callable[[], EvaluationPlugin]] = default_evaluator,
        eval_every=-1,
        importance: str = "rwalk",
        factor_search=None,
        **base_kwargs,
    ):
        opts = {"ewc_alpha": ewc_alpha, "delta_t": delta_t}
        ewc_lambda = _factor("ewc_lambda", ewc_lambda)
        if importance == "rwalk":
            plugin = _plugin(ewc_lambda, "rwalk", "online", decay=0.0, estimator_options=opts,
                             factor_search=factor_search)
        elif importance == "rwalk_fisher":
            plugin = _plugin(ewc_lambda, "rwalk_fisher", "separate", estimator_options=opts,
                             factor_search=factor_search)
        else:
            raise ValueError(f"importance must be 'rwalk' or 'rwalk_fisher' for RWalk, got {importance!r}")
        super().__init__(model=model, optimizer=optimizer, criterion=criterion, train_mb_size=train_mb_size,
                         train_epochs=train_epochs, eval_mb_size=eval_mb_size, device=device,
                         plugins=_with(plugins, plugin), evaluator=evaluator, eval_every=eval_every, **base_kwargs)
        self._attach(plugin)


class L2(_PCRegStrategy):
    """L2 regularization towards past solutions: ``l2_lambda * sum_i (theta_i - theta*_i)**2``.

    Avalanche has no L2 strategy class; this one takes ``EWC``'s arguments with ``l2_lambda`` for
    ``ewc_lambda`` (``mode="separate"``: one anchor per past experience, consolidated to their mean
    with weight T; ``"online"``: the latest anchor, ``decay_factor`` weighing the older ones).

    :param l2_lambda: the factor, or ``"auto"`` (``factor_search``: its options, as in :class:`EWC`).
    :param importance: ``"uniform"`` (default); any other estimator makes it EWC-like.
    :param keep_importance_data: as in :class:`EWC`.
    """

    def __init__(
        self,
        *,
        model: Module,
        optimizer: Optimizer,
        criterion: CriterionType,
        l2_lambda: Union[float, str],
        mode: str = "separate",
        decay_factor: Optional[float] = None,
        keep_importance_data: bool = False,
        train_mb_size: int = 1,
        train_epochs: int = 1,
        eval_mb_size: Optional[int] = None,
        device: Union[str, torch.device] = "cpu",
        plugins: Optional[List[SupervisedPlugin]] = None,
        evaluator: Union[EvaluationPlugin, Callable[[], EvaluationPlugin]] = default_evaluator,
        eval_every=-1,
        importance: Union[str, Callable] = "uniform",
        factor_search=None,
        **base_kwargs,
    ):
        plugin = _plugin(_factor("l2_lambda", l2_lambda), importance, mode, decay_factor, factor_search=factor_search,
                         keep_importance_data=keep_importance_data)
        super().__init__(model=model, optimizer=optimizer, criterion=criterion, train_mb_size=train_mb_size,
                         train_epochs=train_epochs, eval_mb_size=eval_mb_size, device=device,
                         plugins=_with(plugins, plugin), evaluator=evaluator, eval_every=eval_every, **base_kwargs)
        self._attach(plugin)
