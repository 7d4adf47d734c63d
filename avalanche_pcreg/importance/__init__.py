"""Importance estimators, each a function, chosen by name from a registry.

===================== ==========================================================================
``uniform``           ones: plain L2 regularization towards the anchor
``empirical_fisher``  mean over samples of the squared per-sample gradient at the true label
``fisher``            the same at one label per sample drawn from p(.|x) (seeded)
``expected_fisher``   exact expectation over classes: mean over samples of sum_c p(c|x) g_c**2
``minibatch_fisher``  squared minibatch-mean gradients: what Avalanche 0.6's ``EWCPlugin`` uses
``mas``               Aljundi et al. 2018: mean over samples of |d ||f(x)||^2 / d theta|
``si``                Synaptic Intelligence: path integral during training (plugin only)
===================== ==========================================================================

Every estimator is ``fn(model, data, *, names, criterion, device, seed, limit, chunk_size)``
returning ``{name: Tensor}``; ``data`` is an iterable of batches ``(x, y[, ..., task_label])``.
Register more with :func:`register_importance`, or pass any callable ``(model, data, **kw)``.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence, Union

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from .._checks import check_importance_tensor, check_positive_int
from ._common import dist_rank_world, eval_mode, model_device, resolve_names
from ._persample import DEFAULT_CHUNK
from .fisher import empirical_fisher, expected_fisher, fisher
from .mas import mas
from .minibatch import minibatch_fisher
from .rules import register_rule
from .si import SITracker

__all__ = [
    "compute_importance",
    "register_importance",
    "IMPORTANCE_ESTIMATORS",
    "TRAJECTORY_ESTIMATORS",
    "SITracker",
    "uniform",
]


def uniform(model, data, *, names, **_):
    """All ones: L2 regularization. Reads no data."""
    params = dict(model.named_parameters())
    return {n: torch.ones_like(params[n]) for n in names}


IMPORTANCE_ESTIMATORS: Dict[str, Callable] = {
    "uniform": uniform,
    "empirical_fisher": empirical_fisher,
    "fisher": fisher,
    "expected_fisher": expected_fisher,
    "minibatch_fisher": minibatch_fisher,
    "mas": mas,
}
# Estimators that need the training trajectory, not a pass over data (available in the plugin).
TRAJECTORY_ESTIMATORS = ("si",)


def register_importance(name: str, fn: Optional[Callable] = None):
    """Register ``fn`` under ``name`` (usable as a decorator)."""

    def deco(f):
        if not callable(f):
            raise TypeError(f"importance estimator {name!r} must be callable, got {type(f).__name__}")
        if name in IMPORTANCE_ESTIMATORS or name in TRAJECTORY_ESTIMATORS:
            raise ValueError(f"importance estimator {name!r} is already registered")
        IMPORTANCE_ESTIMATORS[name] = f
        return f

    return deco(fn) if fn is not None else deco


def valid_methods() -> list:
    return sorted(IMPORTANCE_ESTIMATORS) + list(TRAJECTORY_ESTIMATORS)


def resolve_method(method) -> tuple:
    """``(name, fn)`` for a registered name or a callable; ValueError listing valid names."""
    if callable(method):
        return getattr(method, "__name__", type(method).__name__), method
    if isinstance(method, str):
        if method in IMPORTANCE_ESTIMATORS:
            return method, IMPORTANCE_ESTIMATORS[method]
        if method in TRAJECTORY_ESTIMATORS:
            raise ValueError(
                f"importance {method!r} is path-based: it accumulates during training, so it is "
                "available through ParameterChangePlugin(importance='si'), not compute_importance"
            )
    raise ValueError(f"unknown importance method {method!r}; valid names: {', '.join(valid_methods())}")


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
    chunk_size: int = DEFAULT_CHUNK,
) -> Dict[str, Tensor]:
    """Per-parameter importances ``{name: Tensor}`` of ``model`` on ``data``.

    :param data: a Dataset yielding ``(x, y[, task_label, ...])`` or a DataLoader. Task labels
        reach multi-head models through ``avalanche_forward``.
    :param method: a registered name (see :data:`IMPORTANCE_ESTIMATORS`) or a callable
        ``(model, data, **kw) -> dict``; it receives the DataLoader and the keywords
        ``names, criterion, device, seed, limit, chunk_size``.
    :param criterion: the loss for ``empirical_fisher`` (per sample) and ``minibatch_fisher``;
        default cross-entropy.
    :param num_samples: a seeded random subset of this many samples; None means all.
    :param names: parameters to estimate; default every parameter with requires_grad.
    :param seed: seeds the subset and the labels drawn by ``fisher``.

    Under ``torch.distributed``, the per-sample estimators (``*fisher`` but ``minibatch_fisher``,
    ``mas``) shard a Dataset by rank and all-reduce sums and counts: every rank gets the estimate
    on the union of the data. ``minibatch_fisher`` and user callables see all the data on every rank.

    The model runs in eval mode (no dropout, BatchNorm statistics untouched) and every module's
    own training flag is restored afterwards. Results are checked: NaN, inf or negative entries
    raise ValueError naming the parameter and the estimator.
    """
    name, fn = resolve_method(method)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    check_positive_int("batch_size", batch_size)
    check_positive_int("num_samples", num_samples, allow_none=True)
    names = resolve_names(model, names)
    frozen = [n for n, p in model.named_parameters() if n in set(names) and not p.requires_grad]
    if frozen and name != "uniform":
        raise ValueError(f"parameters {frozen} have requires_grad=False; leave them out of names")
    device = model_device(model) if device is None else torch.device(device)
    loader, limit = make_loader(data, batch_size, num_samples, seed, shuffle_rng=name != "minibatch_fisher",
                                shard=getattr(fn, "shardable", False) and not isinstance(data, DataLoader))
    extra = {}
    shard_info = getattr(loader, "pcreg_shard", None)
    if getattr(fn, "uses_uniforms", False) and shard_info is not None:
        # One uniform per global sample, drawn up front and sharded with the data, so that
        # sampled labels do not depend on how the data is split across ranks.
        total, rank, world = shard_info
        gen = torch.Generator()
        gen.manual_seed(int(seed))
        extra["uniforms"] = torch.rand(total, generator=gen, dtype=torch.float64)[rank::world]
    with eval_mode(model):
        result = fn(model, loader, names=names, criterion=criterion, device=device, seed=seed,
                    limit=limit, chunk_size=chunk_size, **extra)
    if not isinstance(result, dict):
        raise TypeError(f"importance estimator {name!r} must return a dict name -> Tensor, got {type(result).__name__}")
    result = {n: imp.detach() if isinstance(imp, Tensor) else imp for n, imp in result.items()}
    params = dict(model.named_parameters())
    for n, imp in result.items():
        if n not in params:
            raise ValueError(f"importance estimator {name!r} returned parameter {n!r}, which the model does not have")
        check_importance_tensor(n, imp, name)
        if tuple(imp.shape) != tuple(params[n].shape):
            raise ValueError(
                f"importance estimator {name!r} returned shape {tuple(imp.shape)} for parameter {n!r}, "
                f"which has shape {tuple(params[n].shape)}"
            )
    return result
