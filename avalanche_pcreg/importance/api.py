"""The public entry points: :func:`compute_importance` and :func:`importance_ratio`."""

from __future__ import annotations

import contextlib
import inspect
from typing import Callable, Dict, Optional, Sequence, Union

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from .._checks import check_importance_tensors, check_positive_int
from ._common import check_criterion, check_output_transform, eval_mode, model_device, resolve_names
from .loading import make_loader, shard_uniforms
from .kfac import KroneckerImportance, check_blocks
from .persample import Policy, default_policy
from .registry import data_pass_estimator

__all__ = ["compute_importance", "importance_ratio"]


def _takes(fn, name: str) -> bool:
    """Whether ``fn`` accepts the keyword ``name`` (a parameter of that name, or ``**kw``)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # a callable without a signature: only the documented keywords
        return False
    return any(p.name == name and p.kind is not p.POSITIONAL_ONLY or p.kind is p.VAR_KEYWORD for p in params)


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
    policy: Optional[Policy] = None,
) -> Dict[str, Tensor]:
    """Per-parameter importances ``{name: Tensor}`` of ``model`` on ``data``.

    :param data: a Dataset yielding ``(x, y[, task_label, ...])`` or a DataLoader. Task labels
        reach multi-head models through ``avalanche_forward``.
    :param method: a registered name (see :data:`IMPORTANCE_ESTIMATORS`) or a callable
        ``(model, data, **kw) -> dict``; it receives the DataLoader and the keywords
        ``names, criterion, device, seed, limit, chunk_size``, and ``output_transform`` and
        ``policy`` when its signature takes them (a parameter of that name, or ``**kw``).
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
        sequences, fallbacks), which bounds the pass's extra memory; None: the policy's (16 on the
        CPU, 256 on a GPU, each also capped by bytes: 16 MiB on the CPU, 256 MiB on a GPU).
    :param output_transform: a callable ``model_output -> logits Tensor`` for models that return
        a tuple, a dict or an object (e.g. ``lambda out: out[0]``); every registered estimator,
        and the ``criterion``, then sees the logits (a user callable gets it as an argument when it
        takes one, and the model as it is).
        Without it, a Tensor is used as is; a mapping with a ``"logits"`` Tensor or a single
        Tensor entry, and an object with a ``.logits`` Tensor (Hugging Face outputs), give those
        logits; any other output is a TypeError.
    :param policy: how the per-sample engine runs (chunk sizes, byte budgets, convolution paths:
        :class:`~avalanche_pcreg.importance.persample.Policy`); None: the device's
        (``Policy.for_device(device)``, or the one installed by ``using_policy``). ``chunk_size``,
        when given, replaces its ``chunk_size``. It changes speed and memory, never a result beyond
        floating-point rounding.

    Under ``torch.distributed``, the per-sample estimators (``*fisher`` but ``minibatch_fisher``,
    ``mas``) shard a Dataset by rank and all-reduce sums and counts: every rank gets the estimate
    on the union of the data. ``minibatch_fisher`` and user callables see all the data on every rank.

    The model runs in eval mode (no dropout, BatchNorm statistics untouched) and every module's
    own training flag is restored afterwards. Results are checked: NaN, inf or negative entries
    raise ValueError naming the parameter and the estimator. Gradients are enabled for the pass
    (a call under ``torch.no_grad()`` works); under ``torch.inference_mode()`` it is a RuntimeError.
    """
    rec = data_pass_estimator(method)
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
    if policy is not None and not isinstance(policy, Policy):
        raise TypeError(f"policy must be a Policy (avalanche_pcreg.importance.Policy), got {type(policy).__name__}")
    names = resolve_names(model, names)
    frozen = [n for n, p in model.named_parameters() if n in set(names) and not p.requires_grad]
    if frozen and name != "uniform":
        raise ValueError(f"parameters {frozen} have requires_grad=False; leave them out of names")
    device = model_device(model) if device is None else torch.device(device)
    loader, limit, shard = make_loader(data, batch_size, num_samples, seed, shuffle_rng=rec.own_rng,
                                       shard=rec.shardable and not isinstance(data, DataLoader))
    extra = {}
    if rec.uses_uniforms and shard is not None:
        extra["uniforms"] = shard_uniforms(shard, seed)
    for key, value in (("output_transform", output_transform),
                       ("policy", default_policy(device) if policy is None else policy)):
        if _takes(fn, key):
            extra[key] = value
    # torch.enable_grad(): a call under torch.no_grad() (e.g. from evaluation code) still gets gradients
    with (eval_mode(model) if rec.eval_mode else contextlib.nullcontext()), torch.enable_grad():
        result = fn(model, loader, names=names, criterion=criterion, device=device, seed=seed,
                    limit=limit, chunk_size=chunk_size, **extra)
    if isinstance(result, KroneckerImportance):
        check_blocks(result, dict(model.named_parameters()), name)
        result.diagonal = _checked(result.diagonal, model, name)
        return result
    if not isinstance(result, dict):
        raise TypeError(f"importance estimator {name!r} must return a dict name -> Tensor, got {type(result).__name__}")
    return _checked(result, model, name)


def _checked(result: dict, model: nn.Module, name: str) -> dict:
    """``result`` detached, after checking names, values (finite, >= 0) and shapes."""
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
