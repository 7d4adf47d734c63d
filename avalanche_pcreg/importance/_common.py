"""Plumbing shared by the estimators: batches, forward with task labels, eval mode, names."""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Mapping
from typing import Callable, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def is_multitask(model: nn.Module) -> bool:
    """An Avalanche ``MultiTaskModule`` (looked up lazily: the math needs only torch)."""
    try:
        from .. import _avalanche  # noqa: F401  (Avalanche's import without qpsolvers' warning)
        from avalanche.models import MultiTaskModule
    except ImportError:  # pragma: no cover - avalanche is a dependency, but keep torch-only use possible
        return False
    target = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    return isinstance(target, MultiTaskModule)


_TRANSFORM_EXAMPLE = ("e.g. output_transform=lambda out: out[0] for a tuple, or lambda out: out['logits'] "
                      "for a dict (an argument of compute_importance and of ParameterChangePlugin)")


def check_output_transform(output_transform):
    """``output_transform`` is None or a callable; TypeError otherwise."""
    if output_transform is not None and not callable(output_transform):
        raise TypeError(
            "output_transform must be a callable model_output -> logits Tensor (or None), got "
            f"{type(output_transform).__name__} {output_transform!r}; {_TRANSFORM_EXAMPLE}"
        )
    return output_transform


def _describe(out) -> str:
    if isinstance(out, Mapping):
        return f"a {type(out).__name__} with keys {list(out.keys())}"
    if isinstance(out, (tuple, list)):
        kinds = [type(o).__name__ for o in out]
        return f"a {type(out).__name__} of {len(out)} items ({', '.join(kinds)})"
    return f"a {type(out).__name__}"


def to_logits(out, output_transform=None) -> Tensor:
    """The logits in a model's output.

    With ``output_transform``: its result, which must be a Tensor. Without: a Tensor as is; and,
    only where unambiguous, a mapping (``dict``, Hugging Face ``ModelOutput``) with a Tensor under
    ``"logits"`` or with a single entry that is a Tensor, or an object with a Tensor ``.logits``
    attribute. Anything else (a tuple, a mapping of several tensors without ``"logits"``...) is a
    TypeError asking for ``output_transform``.
    """
    if output_transform is not None:
        logits = output_transform(out)
        if not isinstance(logits, Tensor):
            raise TypeError(
                f"output_transform must return the logits as a Tensor; given {_describe(out)} it returned "
                f"{_describe(logits)}"
            )
        return logits
    if isinstance(out, Tensor):
        return out
    if isinstance(out, Mapping):
        if isinstance(out.get("logits"), Tensor):
            return out["logits"]
        if len(out) == 1 and isinstance(next(iter(out.values())), Tensor):
            return next(iter(out.values()))
    elif isinstance(getattr(out, "logits", None), Tensor):
        return out.logits
    raise TypeError(
        f"the model returned {_describe(out)}, not a Tensor of logits, and which part holds the logits "
        "is ambiguous; pass output_transform= (a callable model_output -> logits Tensor), "
        f"{_TRANSFORM_EXAMPLE}"
    )


def model_output(model: nn.Module, x: Tensor, t: Optional[Tensor]):
    """``avalanche_forward``: the model's raw output (task labels reach multi-head models, plain
    models get ``x`` only). What a strategy hands its criterion."""
    if is_multitask(model):
        if t is None:
            raise ValueError(
                f"{type(model).__name__} is a multi-task model and needs task labels, but the data "
                "yields (x, y) only; give a dataset that yields (x, y, task_label)"
            )
        return model(x, t)
    return model(x)


def model_forward(model: nn.Module, x: Tensor, t: Optional[Tensor], output_transform: Optional[Callable] = None) -> Tensor:
    """``avalanche_forward``, then the logits: task labels reach multi-head models, plain models
    get ``x`` only; the output goes through ``output_transform`` (:func:`to_logits`)."""
    return to_logits(model_output(model, x, t), output_transform)


def functional_forward(model: nn.Module, params: dict, x: Tensor, t: Optional[Tensor],
                       output_transform: Optional[Callable] = None) -> Tensor:
    """:func:`model_forward` with some parameters substituted (``torch.func.functional_call``)."""
    args = (x, t) if is_multitask(model) else (x,)
    return to_logits(torch.func.functional_call(model, params, args), output_transform)


def unpack(batch, need_labels: bool, estimator: str) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """``(x, y, t)`` from a batch ``(x, y[, ..., task_label])``; ``t`` is the last element."""
    if isinstance(batch, Tensor):
        batch = (batch,)
    if not isinstance(batch, (list, tuple)) or len(batch) == 0:
        raise ValueError(f"estimator {estimator!r}: a batch must be a tuple (x, y[, task_label]), got {type(batch).__name__}")
    x = batch[0]
    y = batch[1] if len(batch) >= 2 else None
    t = batch[-1] if len(batch) >= 3 else None
    if need_labels and y is None:
        raise ValueError(
            f"estimator {estimator!r} needs labels, but the data yields inputs only; "
            "give a dataset that yields (x, y[, task_label])"
        )
    return x, y, t


def batches(loader: Iterable, device, need_labels: bool, estimator: str,
            limit: Optional[int] = None) -> Iterator[Tuple[Tensor, Optional[Tensor], Optional[Tensor]]]:
    """Batches moved to ``device``; stops after ``limit`` samples when given."""
    seen = 0
    for batch in loader:
        x, y, t = unpack(batch, need_labels, estimator)
        if limit is not None:
            room = limit - seen
            if room <= 0:
                break
            if x.shape[0] > room:
                x, y, t = x[:room], (y[:room] if y is not None else None), (t[:room] if isinstance(t, Tensor) else t)
        x = x.to(device, non_blocking=True)
        if y is not None:
            y = y.to(device, non_blocking=True)
        if isinstance(t, Tensor):
            t = t.to(device, non_blocking=True)
        seen += x.shape[0]
        yield x, y, t


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """``model.eval()`` for the block, then restore each module's **own** training flag.

    RNN modules on CUDA cannot run backward in eval mode (cuDNN); they are put in train mode,
    which changes nothing when their dropout is 0 (a warning says so otherwise).

    Avalanche's train/eval-switching wrappers (``TrainEvalModel`` in ICaRL, ``SCRModel``:
    modules with a ``train_classifier`` and an ``eval_classifier``) keep their own flag set, so
    the pass goes through the classifier that training optimises rather than the NCM head used
    for evaluation; their children are still in eval mode.
    """
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        for m in model.modules():
            if hasattr(m, "train_classifier") and hasattr(m, "eval_classifier"):
                m.training = True
        for m in model.modules():
            if isinstance(m, nn.RNNBase) and any(p.is_cuda for p in m.parameters(recurse=False)):
                if m.dropout > 0:
                    warnings.warn(
                        f"{type(m).__name__} on CUDA cannot backpropagate in eval mode; it runs in train "
                        f"mode for the importance pass, so its dropout={m.dropout} is active"
                    )
                m.train()
        yield model
    finally:
        for m, flag in flags:
            m.training = flag


def resolve_names(model: nn.Module, names: Optional[Sequence[str]]) -> List[str]:
    """The parameters to estimate: ``names`` or, when None, every parameter with requires_grad."""
    params = dict(model.named_parameters())
    if names is None:
        return [n for n, p in params.items() if p.requires_grad]
    names = list(names)
    unknown = [n for n in names if n not in params]
    if unknown:
        raise ValueError(f"parameter names {unknown} are not among the model's parameters")
    return names


def model_device(model: nn.Module):
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


# ----------------------------------------------------------------------------- criteria
#: how to give a criterion the per-sample estimators can use (quoted by the errors below)
CRITERION_HOW = (
    "pass ParameterChangePlugin(criterion=...) or compute_importance(..., criterion=...): a torch loss (nn.MSELoss(), "
    "nn.BCEWithLogitsLoss(), ...; it is used with reduction='none') or a callable (output, target) -> "
    "per-sample losses of shape [N] (or [N, ...], summed per sample)"
)

SOFTMAX, BERNOULLI, GAUSSIAN = "softmax", "bernoulli", "gaussian"

# Losses whose input and target have the same shape, element by element: a target of another
# shape with as many elements (``[N]`` for an ``[N, 1]`` output) is reshaped to the output's.
_ELEMENTWISE = (nn.MSELoss, nn.L1Loss, nn.HuberLoss, nn.SmoothL1Loss, nn.BCEWithLogitsLoss, nn.BCELoss,
                nn.SoftMarginLoss)


class StrategyCriterion:
    """The strategy's own criterion, as the plugin hands it to an estimator when the user gave
    none (an estimator registered with ``strategy_criterion=True``). Calling it calls the criterion.

    The estimators use it as the strategy does: ``minibatch_fisher`` calls it as it is, on the
    model's raw output (as Avalanche's ``EWCPlugin`` does); the per-sample estimators use it when
    it is a torch loss (per sample, with ``reduction='none'``) and otherwise fall back to the
    classifier's likelihood on class-index targets, with a warning (float targets: an error).
    """

    def __init__(self, criterion: Callable):
        self.criterion = criterion

    def __call__(self, output, target):
        return self.criterion(output, target)

    def __repr__(self):
        return f"StrategyCriterion({self.criterion!r})"


def unwrap_criterion(criterion):
    """The criterion inside a :class:`StrategyCriterion`, else ``criterion``."""
    return criterion.criterion if isinstance(criterion, StrategyCriterion) else criterion


def describe_criterion(criterion) -> str:
    c = unwrap_criterion(criterion)
    what = getattr(c, "__name__", None) if not isinstance(c, nn.Module) else None
    what = what or type(c).__name__
    return f"the strategy's criterion {what}" if isinstance(criterion, StrategyCriterion) else f"criterion {what}"


def check_criterion(criterion):
    """``criterion`` is None or a callable; TypeError otherwise."""
    if criterion is not None and not callable(criterion):
        raise TypeError(f"criterion must be a callable (output, target) -> loss, or None; got "
                        f"{type(criterion).__name__} {criterion!r}; {CRITERION_HOW}")
    return criterion


def is_torch_loss(criterion) -> bool:
    """A torch loss module (``nn.MSELoss``, ``nn.CrossEntropyLoss``...: a ``_Loss`` with ``reduction``)."""
    return isinstance(criterion, nn.modules.loss._Loss)


def criterion_likelihood(criterion) -> Optional[str]:
    """The likelihood a criterion is the negative log of: ``"softmax"`` (``CrossEntropyLoss``,
    ``NLLLoss``), ``"bernoulli"`` (``BCEWithLogitsLoss``), ``"gaussian"`` (``MSELoss``), else None."""
    c = unwrap_criterion(criterion)
    if isinstance(c, (nn.CrossEntropyLoss, nn.NLLLoss)):
        return SOFTMAX
    if isinstance(c, nn.BCEWithLogitsLoss):
        return BERNOULLI
    if isinstance(c, nn.MSELoss):
        return GAUSSIAN
    return None


def per_sample_criterion(criterion: Optional[Callable]) -> Callable[[Tensor, Tensor], Tensor]:
    """A callable ``(output, target) -> per-sample losses [N]``.

    None -> cross-entropy. A module with a ``reduction`` attribute (``nn.MSELoss``,
    ``nn.CrossEntropyLoss`` ...) is copied with ``reduction='none'`` and its result summed over
    every dimension but the first: sample n's loss is the criterion with ``reduction='sum'`` on
    sample n alone (class weights included: ``weight[y_n] * loss_n``; a sample whose target is
    ``ignore_index`` has loss 0). For the elementwise losses (``MSELoss``, ``BCEWithLogitsLoss``,
    ``L1Loss``, ``HuberLoss``...) a target with as many elements as the output is reshaped to the
    output's shape and cast to its dtype. Any other callable must return ``[N]`` (or ``[N, ...]``,
    summed per sample).
    """
    if criterion is None:
        return lambda out, y: F.cross_entropy(out, y, reduction="none")
    check_criterion(criterion)
    if hasattr(criterion, "reduction"):
        crit = copy.copy(criterion)
        crit.reduction = "none"
        reduced = True
    else:
        crit, reduced = criterion, False
    elementwise = isinstance(criterion, _ELEMENTWISE)

    def per_sample(out: Tensor, y: Tensor) -> Tensor:
        if elementwise and isinstance(out, Tensor) and isinstance(y, Tensor):
            if y.shape != out.shape and y.numel() == out.numel():
                y = y.reshape(out.shape)
            if y.dtype != out.dtype:
                y = y.to(out.dtype)
        losses = crit(out, y)
        n = out.shape[0]
        if not isinstance(losses, Tensor) or losses.dim() == 0 or losses.shape[0] != n:
            shape = tuple(losses.shape) if isinstance(losses, Tensor) else type(losses).__name__
            done = " with reduction='none'" if reduced else ""
            raise ValueError(
                f"criterion must return per-sample losses of shape ({n},) for per-sample estimators; "
                f"{describe_criterion(criterion)}{done} returned {shape}; {CRITERION_HOW}"
            )
        return losses.reshape(n, -1).sum(1) if losses.dim() > 1 else losses

    return per_sample


def dist_rank_world() -> Tuple[int, int]:
    """``(rank, world_size)`` of an initialised ``torch.distributed`` group, else ``(0, 1)``."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def all_reduce_sums(sums: dict, n: int) -> int:
    """Sum ``sums`` (in place) and the sample count ``n`` over ranks; returns the global count.

    One collective per tensor plus one for the count, the same on every rank whatever its
    number of batches, so no rank waits on another.
    """
    _, world = dist_rank_world()
    if world == 1:
        return n
    dist = torch.distributed
    for key in sorted(sums):
        dist.all_reduce(sums[key], op=dist.ReduceOp.SUM)
    device = next(iter(sums.values())).device if sums else torch.device("cpu")
    count = torch.tensor([float(n)], dtype=torch.float64, device=device)
    dist.all_reduce(count, op=dist.ReduceOp.SUM)
    return int(count.item())
