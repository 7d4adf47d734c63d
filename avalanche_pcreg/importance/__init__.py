"""Importance estimators, chosen by name from a registry of estimator records.

===================== ==========================================================================
``uniform``           ones: plain L2 regularization towards the anchor
``empirical_fisher``  mean over samples of the squared per-sample gradient of the criterion at the true target
``fisher``            the same at one outcome per sample drawn from the model's likelihood (seeded)
``expected_fisher``   exact expectation over outcomes: mean over samples of E_y[g_y**2] (softmax: sum_c p(c|x) g_c**2)
``minibatch_fisher``  squared minibatch-mean gradients: what Avalanche 0.6's ``EWCPlugin`` uses
``mas``               Aljundi et al. 2018: mean over samples of |d ||f(x)||^2 / d theta|
``avalanche_mas``     |minibatch-mean gradient of ||f(x)||^2|: what Avalanche 0.6's ``MASPlugin`` uses
``si``                Synaptic Intelligence: path integral during training (trajectory, plugin only)
``avalanche_si``      Avalanche 0.6 ``SynapticIntelligencePlugin``'s path integral (trajectory)
``rwalk``             Avalanche 0.6 ``RWalkPlugin``: EWC++ Fisher + path score (trajectory)
``rwalk_fisher``      RWalk's path score + the per-sample empirical Fisher, per experience (trajectory)
===================== ==========================================================================

A data-pass estimator is ``fn(model, data, *, names, criterion, device, seed, limit, chunk_size)``
returning ``{name: Tensor}``; ``data`` is an iterable of batches ``(x, y[, ..., task_label])``.
A trajectory estimator is an object with the callbacks of :class:`.trajectory.TrajectoryEstimator`,
which the plugin forwards during training (see :mod:`.trajectory`).
Register more with :func:`register_importance`, or pass any callable ``(model, data, **kw)``.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import MutableMapping
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence, Union

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from .._checks import check_importance_tensors, check_positive_int
from ._common import check_criterion, check_output_transform, dist_rank_world, eval_mode, model_device, resolve_names, using_output_transform
from .avalanche_mas import avalanche_mas
from .fisher import empirical_fisher, expected_fisher, fisher
from .mas import mas
from .minibatch import minibatch_fisher
from .rules import register_rule
from .rwalk import RWalkFisherTracker, RWalkTracker
from .si import AvalancheSITracker, SITracker
from .trajectory import TrajectoryEstimator

__all__ = [
    "compute_importance",
    "register_importance",
    "importance_ratio",
    "Estimator",
    "ESTIMATORS",
    "IMPORTANCE_ESTIMATORS",
    "TRAJECTORY_ESTIMATORS",
    "TrajectoryEstimator",
    "SITracker",
    "AvalancheSITracker",
    "RWalkTracker",
    "RWalkFisherTracker",
    "register_rule",
    "uniform",
]


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
register_importance("si", tracker=SITracker)
register_importance("avalanche_si", tracker=AvalancheSITracker)
register_importance("rwalk", tracker=RWalkTracker)
register_importance("rwalk_fisher", tracker=RWalkFisherTracker)


def valid_methods() -> list:
    return sorted(ESTIMATORS)


def _record_for_callable(fn) -> Estimator:
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


def _data_pass_estimator(method) -> Estimator:
    """The record of a data-pass estimator; ValueError for unknown or path-based names."""
    rec = resolve_estimator(method)
    if rec.trajectory:
        raise ValueError(
            f"importance {rec.name!r} is path-based: it accumulates during training, so it is "
            f"available through ParameterChangePlugin(importance={rec.name!r}), not compute_importance"
        )
    return rec


def resolve_method(method) -> tuple:
    """``(name, fn)`` for a data-pass estimator; ValueError for unknown or path-based names."""
    rec = _data_pass_estimator(method)
    return rec.name, rec.fn


def _take(dataset, idx):
    """The samples ``idx`` of ``dataset``; Avalanche datasets keep their collate_fn and transforms."""
    if hasattr(dataset, "subset"):
        return dataset.subset(idx)
    return torch.utils.data.Subset(dataset, idx)


def _subset(dataset, num_samples: int, seed: int):
    n = len(dataset)
    gen = torch.Generator()
    gen.manual_seed(int(seed))
    return _take(dataset, torch.randperm(n, generator=gen)[: min(num_samples, n)].tolist())


def make_loader(data, batch_size: int, num_samples: Optional[int], seed: int, *, shuffle_rng: bool = True,
                shard: bool = False):
    """A DataLoader (no shuffling) over ``data`` or a seeded random subset of it.

    ``shuffle_rng=True`` gives the loader its own generator so that iterating it does not
    advance the global RNG (training stays reproducible with and without the plugin);
    ``minibatch_fisher`` passes False to draw exactly as Avalanche's ``EWCPlugin`` does.
    ``shard=True`` under ``torch.distributed`` keeps this rank's share (indices rank::world).
    Returns ``(loader, limit)``; ``limit`` caps samples when ``data`` is already a DataLoader.
    """
    if isinstance(data, DataLoader):
        return data, num_samples
    if not isinstance(data, Dataset) and not hasattr(data, "__getitem__"):
        raise TypeError(f"data must be a Dataset or a DataLoader, got {type(data).__name__}")
    if len(data) == 0:
        raise ValueError("data is empty: no samples to estimate importances from")
    if num_samples is not None:
        data = _subset(data, num_samples, seed)
    total = len(data)
    rank, world = dist_rank_world()
    if shard and world > 1:
        data = _take(data, list(range(rank, total, world)))
    else:
        rank, world = 0, 1
    collate = getattr(data, "collate_fn", None)
    gen = torch.Generator() if shuffle_rng else None
    if gen is not None:
        gen.manual_seed(int(seed))
    loader = DataLoader(data, batch_size=batch_size, shuffle=False, collate_fn=collate, generator=gen)
    loader.pcreg_shard = (total, rank, world)  # which global samples this rank's loader holds
    return loader, None


@contextlib.contextmanager
def _keep_mode(model):
    yield model


def compute_importance(
    model: nn.Module,
    data: Union[Dataset, DataLoader],
    method: Union[str, Callable] = "empirical_fisher",
    *,
    criterion: Optional[Callable] = None,
    batch_size: int = 64,
    num_samples: Optional[int] = None,
    device=None,
    names: Optional[Sequence[str]] = None,
    seed: int = 0,
    chunk_size: Optional[int] = None,
    output_transform: Optional[Callable] = None,
) -> Dict[str, Tensor]:
    """Per-parameter importances ``{name: Tensor}`` of ``model`` on ``data``.

    :param data: a Dataset yielding ``(x, y[, task_label, ...])`` or a DataLoader. Task labels
        reach multi-head models through ``avalanche_forward``.
    :param method: a registered name (see :data:`IMPORTANCE_ESTIMATORS`) or a callable
        ``(model, data, **kw) -> dict``; it receives the DataLoader and the keywords
        ``names, criterion, device, seed, limit, chunk_size``.
    :param criterion: the loss: ``empirical_fisher`` uses it per sample (``reduction='none'``,
        summed over the non-sample dimensions; a callable without ``reduction`` must return
        per-sample losses ``[N]``), ``minibatch_fisher`` as it is; for ``fisher`` and
        ``expected_fisher`` it names the likelihood (``CrossEntropyLoss`` / ``NLLLoss``: softmax,
        ``BCEWithLogitsLoss``: a Bernoulli per output, ``MSELoss``: a unit-variance Gaussian per
        output; any other is a ValueError). Default: cross-entropy on class-index targets (float
        targets are a ValueError), a softmax likelihood; one logit ``[N, 1]``: Bernoulli.
        It gets the logits (after ``output_transform``). ``mas`` and ``uniform`` use none.
    :param num_samples: a seeded random subset of this many samples; None means all.
    :param names: parameters to estimate; default every parameter with requires_grad.
    :param seed: seeds the subset and the labels drawn by ``fisher``.
    :param chunk_size: samples whose per-sample gradients are formed at once (convolutions,
        sequences, fallbacks), which bounds the pass's extra memory; None: 16 on the CPU, 256 on
        a GPU, each also capped by bytes (16 MiB on the CPU, 256 MiB on a GPU).
    :param output_transform: a callable ``model_output -> logits Tensor`` for models that return
        a tuple, a dict or an object (e.g. ``lambda out: out[0]``); every registered estimator,
        and the ``criterion``, then sees the logits (a user callable gets the model as it is).
        Without it, a Tensor is used as is; a mapping with a ``"logits"`` Tensor or a single
        Tensor entry, and an object with a ``.logits`` Tensor (Hugging Face outputs), give those
        logits; any other output is a TypeError.

    Under ``torch.distributed``, the per-sample estimators (``*fisher`` but ``minibatch_fisher``,
    ``mas``) shard a Dataset by rank and all-reduce sums and counts: every rank gets the estimate
    on the union of the data. ``minibatch_fisher`` and user callables see all the data on every rank.

    The model runs in eval mode (no dropout, BatchNorm statistics untouched) and every module's
    own training flag is restored afterwards. Results are checked: NaN, inf or negative entries
    raise ValueError naming the parameter and the estimator. Gradients are enabled for the pass
    (a call under ``torch.no_grad()`` works); under ``torch.inference_mode()`` it is a RuntimeError.
    """
    rec = _data_pass_estimator(method)
    name, fn = rec.name, rec.fn
    if torch.is_inference_mode_enabled():
        raise RuntimeError(
            "compute_importance cannot run under torch.inference_mode(): importances are gradients, and "
            "inference mode forbids them (even torch.enable_grad() cannot turn them back on inside it); call it "
            "outside the inference_mode block (under torch.no_grad() it enables gradients itself)")
    check_output_transform(output_transform)
    check_criterion(criterion)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    check_positive_int("batch_size", batch_size)
    check_positive_int("num_samples", num_samples, allow_none=True)
    check_positive_int("chunk_size", chunk_size, allow_none=True)
    names = resolve_names(model, names)
    frozen = [n for n, p in model.named_parameters() if n in set(names) and not p.requires_grad]
    if frozen and name != "uniform":
        raise ValueError(f"parameters {frozen} have requires_grad=False; leave them out of names")
    device = model_device(model) if device is None else torch.device(device)
    loader, limit = make_loader(data, batch_size, num_samples, seed, shuffle_rng=rec.own_rng,
                                shard=rec.shardable and not isinstance(data, DataLoader))
    extra = {}
    shard_info = getattr(loader, "pcreg_shard", None)
    if rec.uses_uniforms and shard_info is not None:
        # One uniform per global sample, drawn up front and sharded with the data, so that
        # sampled labels do not depend on how the data is split across ranks.
        total, rank, world = shard_info
        gen = torch.Generator()
        gen.manual_seed(int(seed))
        extra["uniforms"] = torch.rand(total, generator=gen, dtype=torch.float64)[rank::world]
    # torch.enable_grad(): a call under torch.no_grad() (e.g. from evaluation code) still gets gradients
    with (eval_mode(model) if rec.eval_mode else _keep_mode(model)), using_output_transform(output_transform), \
            torch.enable_grad():
        result = fn(model, loader, names=names, criterion=criterion, device=device, seed=seed,
                    limit=limit, chunk_size=chunk_size, **extra)
    if not isinstance(result, dict):
        raise TypeError(f"importance estimator {name!r} must return a dict name -> Tensor, got {type(result).__name__}")
    result = {n: imp.detach() if isinstance(imp, Tensor) else imp for n, imp in result.items()}
    params = dict(model.named_parameters())
    for n in result:
        if n not in params:
            raise ValueError(f"importance estimator {name!r} returned parameter {n!r}, which the model does not have")
    check_importance_tensors(result, name)
    for n, imp in result.items():
        if tuple(imp.shape) != tuple(params[n].shape):
            raise ValueError(
                f"importance estimator {name!r} returned shape {tuple(imp.shape)} for parameter {n!r}, "
                f"which has shape {tuple(params[n].shape)}"
            )
    return result


def importance_ratio(
    model: nn.Module,
    data: Union[Dataset, DataLoader],
    a: Union[str, Callable] = "minibatch_fisher",
    b: Union[str, Callable] = "empirical_fisher",
    *,
    batch_size: int = 64,
    criterion: Optional[Callable] = None,
    num_samples: Optional[int] = None,
    names: Optional[Sequence[str]] = None,
    device=None,
    seed: int = 0,
) -> float:
    """``sum(importance a) / sum(importance b)`` over every regularized entry of ``model`` on ``data``.

    Carries a lambda tuned for estimator ``a`` to estimator ``b``: the penalty
    ``lambda * sum_i w_i (theta_i - theta*_i)**2`` has about the same size with
    ``ParameterChangePlugin(lambda, b, importance_scale=r)`` as with ``(lambda, a)``, where ``r``
    is this ratio. Call it on the model trained on the first experience, with that experience's
    data, and ``batch_size`` equal to the training minibatch size when ``a`` is
    ``"minibatch_fisher"`` (Avalanche's EWC uses ``train_mb_size``; the ratio is about
    ``1 / batch_size``). The global RNG is left as it was.
    """
    with torch.random.fork_rng(devices=[]):
        ia = compute_importance(model, data, a, criterion=criterion, batch_size=batch_size, num_samples=num_samples,
                                names=names, device=device, seed=seed)
        ib = compute_importance(model, data, b, criterion=criterion, batch_size=batch_size, num_samples=num_samples,
                                names=names, device=device, seed=seed)
    sa = sum(float(t.double().sum()) for t in ia.values())
    sb = sum(float(t.double().sum()) for t in ib.values())
    if sb == 0:
        raise ValueError(f"importance {b!r} is 0 everywhere on this data: no ratio to {a!r}")
    return sa / sb
