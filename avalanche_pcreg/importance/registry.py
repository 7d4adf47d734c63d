"""The registry of importance estimators: one :class:`Estimator` record per name, the single
source of what the importance pass and the plugin need to know about an estimator (whether it
shards, draws uniforms, owns its RNG, runs in eval mode, takes the strategy's criterion).
"""

from __future__ import annotations

import functools
from collections.abc import MutableMapping
from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch

from .fisher import empirical_fisher, expected_fisher, fisher
from .kfac import kfac
from .mas import mas
from .minibatch import avalanche_mas, minibatch_fisher
from .rwalk import RWalkFisherTracker, RWalkTracker
from .si import AvalancheSITracker, SITracker
from .trajectory import TrajectoryEstimator

__all__ = ["Estimator", "ESTIMATORS", "IMPORTANCE_ESTIMATORS", "TRAJECTORY_ESTIMATORS", "register_importance",
           "resolve_estimator", "data_pass_estimator", "valid_methods", "uniform"]


def uniform(model, data, *, names, **_):
    """All ones: L2 regularization. Reads no data."""
    params = dict(model.named_parameters())
    return {n: torch.ones_like(params[n]) for n in names}


@dataclass(frozen=True)
class Estimator:
    """What the registry knows about one estimator.

    :param fn: a data-pass estimator ``fn(model, loader, **kw) -> {name: Tensor}``; None for a
        trajectory estimator.
    :param tracker: a factory ``(**options) -> TrajectoryEstimator`` for a path-based estimator.
    :param shardable: under ``torch.distributed``, a Dataset is split by rank and the estimator
        all-reduces its sums (per-sample estimators).
    :param uses_uniforms: it receives ``uniforms=`` (one per global sample, drawn up front).
    :param own_rng: the importance DataLoader gets its own generator (True), or draws its seed from
        the global RNG as Avalanche's plugins do (False, for exact parity of the next experience).
    :param eval_mode: run the pass in eval mode (True), or in the mode training left the model in
        (False: Avalanche's ``MASPlugin`` runs its pass in train mode).
    :param strategy_criterion: with no ``criterion`` given, the plugin passes the strategy's
        criterion, wrapped in a :class:`._common.StrategyCriterion` (callable as the criterion);
        otherwise None (the estimator's default). The per-sample Fisher estimators use it per sample
        or as their likelihood; ``minibatch_fisher`` calls it as it is, as Avalanche's ``EWCPlugin``.
    """

    name: str
    fn: Optional[Callable] = None
    tracker: Optional[Callable[..., TrajectoryEstimator]] = None
    shardable: bool = False
    uses_uniforms: bool = False
    own_rng: bool = True
    eval_mode: bool = True
    strategy_criterion: bool = False

    @property
    def trajectory(self) -> bool:
        return self.tracker is not None


#: every registered estimator, by name
ESTIMATORS: Dict[str, Estimator] = {}


class _View(MutableMapping):
    """A live ``name -> fn`` (or ``name -> tracker factory``) view of :data:`ESTIMATORS`."""

    def __init__(self, trajectory: bool):
        self._trajectory = trajectory

    def _names(self):
        return [n for n, r in ESTIMATORS.items() if r.trajectory == self._trajectory]

    def __getitem__(self, name):
        rec = ESTIMATORS.get(name)
        if rec is None or rec.trajectory != self._trajectory:
            raise KeyError(name)
        return rec.tracker if self._trajectory else rec.fn

    def __setitem__(self, name, value):
        if self._trajectory:
            register_importance(name, tracker=value)
        else:
            register_importance(name, value)

    def __delitem__(self, name):
        self[name]  # KeyError when absent or of the other kind
        del ESTIMATORS[name]

    def __iter__(self):
        return iter(self._names())

    def __len__(self):
        return len(self._names())

    def __repr__(self):
        return f"{type(self).__name__}({self._names()})"


#: data-pass estimators, ``name -> fn`` (a live view of :data:`ESTIMATORS`)
IMPORTANCE_ESTIMATORS = _View(trajectory=False)
#: path-based estimators, ``name -> tracker factory`` (available in the plugin)
TRAJECTORY_ESTIMATORS = _View(trajectory=True)


def register_importance(name: str, fn: Optional[Callable] = None, *, tracker: Optional[Callable] = None,
                        shardable: Optional[bool] = None, uses_uniforms: Optional[bool] = None,
                        own_rng: bool = True, eval_mode: bool = True, strategy_criterion: bool = False):
    """Register a data-pass estimator ``fn`` (usable as a decorator) or a trajectory ``tracker``
    factory under ``name``, with its record (see :class:`Estimator`).

    ``shardable`` / ``uses_uniforms`` default to the function attributes of the same name, if set.
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"importance estimator name must be a non-empty str, got {name!r}")
    if tracker is not None:
        if fn is not None:
            raise TypeError("give either fn (a data pass) or tracker (a trajectory estimator), not both")
        if not callable(tracker):
            raise TypeError(f"tracker of estimator {name!r} must be callable (a factory), got {type(tracker).__name__}")
        if name in ESTIMATORS:
            raise ValueError(f"importance estimator {name!r} is already registered")
        ESTIMATORS[name] = Estimator(name, tracker=tracker, own_rng=own_rng, eval_mode=eval_mode)
        return tracker

    def deco(f):
        if not callable(f):
            raise TypeError(f"importance estimator {name!r} must be callable, got {type(f).__name__}")
        if name in ESTIMATORS:
            raise ValueError(f"importance estimator {name!r} is already registered")
        ESTIMATORS[name] = Estimator(
            name, fn=f,
            shardable=bool(getattr(f, "shardable", False) if shardable is None else shardable),
            uses_uniforms=bool(getattr(f, "uses_uniforms", False) if uses_uniforms is None else uses_uniforms),
            own_rng=own_rng, eval_mode=eval_mode, strategy_criterion=strategy_criterion,
        )
        return f

    return deco(fn) if fn is not None else deco


register_importance("uniform", uniform)
# The per-sample Fisher estimators take the strategy's criterion: its loss per sample, its likelihood.
register_importance("empirical_fisher", empirical_fisher, shardable=True, strategy_criterion=True)
register_importance("fisher", fisher, shardable=True, uses_uniforms=True, strategy_criterion=True)
register_importance("expected_fisher", expected_fisher, shardable=True, strategy_criterion=True)
# Avalanche's EWCPlugin: its DataLoader draws from the global RNG, with the strategy's criterion.
register_importance("minibatch_fisher", minibatch_fisher, own_rng=False, strategy_criterion=True)
register_importance("mas", mas, shardable=True)
# Avalanche's MASPlugin: global-RNG DataLoader, pass run in train mode.
register_importance("avalanche_mas", avalanche_mas, own_rng=False, eval_mode=False)
# Kronecker-factored blocks (and the diagonal of the same Fisher for every other parameter).
register_importance("kfac", functools.partial(kfac, fisher="expected"), shardable=True, strategy_criterion=True)
register_importance("kfac_sampled", functools.partial(kfac, fisher="sampled"), shardable=True, uses_uniforms=True,
                    strategy_criterion=True)
register_importance("kfac_empirical", functools.partial(kfac, fisher="empirical"), shardable=True,
                    strategy_criterion=True)
register_importance("si", tracker=SITracker)
register_importance("avalanche_si", tracker=AvalancheSITracker)
register_importance("rwalk", tracker=RWalkTracker)
register_importance("rwalk_fisher", tracker=RWalkFisherTracker)


def valid_methods() -> list:
    return sorted(ESTIMATORS)


def _record_for_callable(fn) -> Estimator:
    """A registered estimator's record when ``fn`` is its function, else a record from ``fn``'s
    own ``shardable`` / ``uses_uniforms`` attributes."""
    for rec in ESTIMATORS.values():
        if rec.fn is fn:
            return rec
    name = getattr(fn, "__name__", type(fn).__name__)
    return Estimator(name, fn=fn, shardable=bool(getattr(fn, "shardable", False)),
                     uses_uniforms=bool(getattr(fn, "uses_uniforms", False)))


def _given(tracker):
    return tracker


def resolve_estimator(method) -> Estimator:
    """The record of a registered name, a callable, a trajectory estimator object, or a record."""
    if isinstance(method, Estimator):
        return method
    if isinstance(method, TrajectoryEstimator):
        return Estimator(type(method).__name__, tracker=functools.partial(_given, method))
    if callable(method) and not isinstance(method, str):
        return _record_for_callable(method)
    if isinstance(method, str) and method in ESTIMATORS:
        return ESTIMATORS[method]
    raise ValueError(f"unknown importance method {method!r}; valid names: {', '.join(valid_methods())}")


def data_pass_estimator(method) -> Estimator:
    """The record of a data-pass estimator; ValueError for unknown or path-based names."""
    rec = resolve_estimator(method)
    if rec.trajectory:
        raise ValueError(
            f"importance {rec.name!r} is path-based: it accumulates during training, so it is "
            f"available through ParameterChangePlugin(importance={rec.name!r}), not compute_importance"
        )
    return rec
