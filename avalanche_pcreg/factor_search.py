"""``factor="auto"``: a continual search for the factor, one experience at a time.

The continual hyperparameter framework of De Lange et al. (TPAMI 2021, "A continual learning
survey: defying forgetting in classification tasks", Sec. 5.2; FACIL's ``GridSearch`` implements it
for class-incremental learning), on the data of the **current** experience only:

1. *Maximal plasticity.* A copy of the model, from where the experience starts, is fine-tuned on a
   seeded split of the experience's training data (``1 - validation`` of it) for ``epochs``
   epochs, without the penalty; its accuracy on the held-out rest is the plastic accuracy ``A*``.
2. *Stability decay.* From a high factor ``f0``, a fresh copy is trained the same way **with** the
   penalty, and the factor is multiplied by ``decay`` until the held-out accuracy reaches
   ``(1 - tol) * A*`` (at most ``max_steps`` factors).
3. The first factor that reaches it is the factor of the experience's real training.

``f0`` is scale-aware: importances differ by orders of magnitude between estimators (uniform,
Fisher, MAS, SI...), so no fixed start fits all. The plastic phase gives the *balance factor*

    f_bal = (L(θ_0) - L(θ_plastic)) / (P(θ_plastic) - P(θ_0)),

with L the task loss on the held-out split and ``P = Σ A (θ - μ)²`` the penalty at factor 1: at
``f_bal``, the penalty the plastic solution pays equals the loss it gains, so a much larger factor
keeps the model at its start (no plasticity) and the search starts above it, at
``f0 = start_ratio * f_bal``.

Everything runs on deep copies: the model the strategy trains, its optimizer and the global random
number generators are left as they were. The real training then uses all of the experience's data.
"""

from __future__ import annotations

import copy
import math
import numbers
import time
from dataclasses import asdict, dataclass, fields
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import torch
from torch import Tensor, nn

from .importance._common import model_output, to_logits, unpack

__all__ = ["FactorSearch", "SearchResult", "search_factor", "optimizer_like", "as_factor_search", "balance_factor",
           "probe_balance"]


# factors rejected without training (admissible() False) before the search gives up and uses 0
_MAX_REJECTED = 200


def _fraction(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"FactorSearch {name} must be a real number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not (0.0 < value < 1.0):
        raise ValueError(f"FactorSearch {name} must be in (0, 1), got {value!r}")
    return value


def _count(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"FactorSearch {name} must be a positive int, got {type(value).__name__} {value!r}")
    return int(value)


@dataclass(frozen=True)
class FactorSearch:
    """Options of ``factor="auto"`` (see the module docstring for the protocol).

    :param tol: the accepted accuracy drop, relative: the factor is accepted when the held-out
        accuracy is at least ``(1 - tol) * A*`` (De Lange et al.'s ``p``, FACIL's
        ``--gridsearch-acc-drop-thr``; both 0.2).
    :param decay: the factor is multiplied by it after each rejected try (De Lange et al. and
        FACIL: 0.5).
    :param epochs: epochs of each short training phase (plastic and penalized); None: the strategy's
        ``train_epochs`` (phases as long as the real training, on 1 - ``validation`` of its data:
        slower, and closer to what the real training will do). When the plastic
        phase does not learn enough for the threshold to ask for any learning (``(1 - tol) * A*`` not
        above the accuracy the model has before it), the phases are lengthened: the epochs double, up
        to ``max_epochs``.
    :param max_epochs: the longest phase; None (default): as many iterations as the strategy's real
        training of the experience (``train_epochs`` epochs of all its data).
    :param validation: the fraction of the experience's training data held out to measure the
        accuracies (seeded; the phases train on the rest).
    :param max_steps: the most factors trained per experience. When none reaches the threshold the
        smallest one tried is used, and the record says so (``met=False``). Factors rejected without
        training (those that make plain SGD unstable) are not counted.
    :param start_ratio: the first factor tried is ``start_ratio`` times the balance factor measured
        by the plastic phase.
    """

    tol: float = 0.2
    decay: float = 0.5
    epochs: Optional[int] = 1
    max_epochs: Optional[int] = None
    validation: float = 0.2
    max_steps: int = 10
    start_ratio: float = 16.0

    def __post_init__(self):
        object.__setattr__(self, "tol", _fraction("tol", self.tol))
        object.__setattr__(self, "decay", _fraction("decay", self.decay))
        object.__setattr__(self, "validation", _fraction("validation", self.validation))
        if self.epochs is not None:
            object.__setattr__(self, "epochs", _count("epochs", self.epochs))
        object.__setattr__(self, "max_steps", _count("max_steps", self.max_steps))
        if self.max_epochs is not None:
            object.__setattr__(self, "max_epochs", _count("max_epochs", self.max_epochs))
            if self.epochs is not None and self.max_epochs < self.epochs:
                raise ValueError(f"FactorSearch max_epochs must be >= epochs ({self.epochs}), got {self.max_epochs}")
        r = self.start_ratio
        if isinstance(r, bool) or not isinstance(r, numbers.Real):
            raise TypeError(f"FactorSearch start_ratio must be a real number, got {type(r).__name__} {r!r}")
        if not (math.isfinite(float(r)) and float(r) > 0):
            raise ValueError(f"FactorSearch start_ratio must be finite and > 0, got {r!r}")
        object.__setattr__(self, "start_ratio", float(r))

    def as_dict(self) -> Dict[str, Any]:
        return asdict(self)


def as_factor_search(value) -> FactorSearch:
    """``factor_search=``: a :class:`FactorSearch`, a dict of its fields, or None (the defaults)."""
    if value is None:
        return FactorSearch()
    if isinstance(value, FactorSearch):
        return value
    if isinstance(value, Mapping):
        known = {f.name for f in fields(FactorSearch)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise TypeError(f"factor_search has unknown options {unknown}; FactorSearch takes {sorted(known)}")
        return FactorSearch(**value)
    raise TypeError(f"factor_search must be a FactorSearch, a dict of its options or None, got "
                    f"{type(value).__name__} {value!r}")


@dataclass
class SearchResult:
    """What one search found (one experience). ``tried``: ``[(factor, held-out accuracy), ...]``, the
    accuracy None for a factor rejected without training (see ``admissible``)."""

    factor: float
    met: bool
    plastic_accuracy: float
    threshold: float
    accuracy: float
    start_accuracy: float
    balance: float
    start: float
    tried: List[Tuple[float, Optional[float]]]
    epochs: int
    n_train: int
    n_valid: int
    time_s: float

    def record(self) -> Dict[str, Any]:
        d = asdict(self)
        d["tried"] = [list(t) for t in self.tried]
        return d


# ----------------------------------------------------------------------------- pieces


def optimizer_like(optimizer: torch.optim.Optimizer, source: nn.Module, target: nn.Module) -> torch.optim.Optimizer:
    """A fresh optimizer of ``optimizer``'s class for ``target``, a copy of ``source``: the same
    parameter groups (matched by parameter name) and hyperparameters, no state."""
    names = {id(p): n for n, p in source.named_parameters()}
    params = dict(target.named_parameters())
    groups, seen = [], set()
    for group in optimizer.param_groups:
        ps = [params[names[id(p)]] for p in group["params"] if id(p) in names and names[id(p)] in params]
        seen.update(id(p) for p in ps)
        if ps:
            groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": ps})
    if not groups:
        raise ValueError("factor='auto': the strategy's optimizer holds none of the model's parameters")
    try:
        return type(optimizer)(groups, **optimizer.defaults)
    except TypeError:
        return type(optimizer)(groups)


def _view(dataset, group: str):
    """The dataset with its ``train``/``eval`` transforms (Avalanche datasets), else as it is."""
    fn = getattr(dataset, group, None)
    return fn() if callable(fn) else dataset


def _subset(dataset, indices: List[int]):
    if hasattr(dataset, "subset"):
        return dataset.subset(indices)
    return torch.utils.data.Subset(dataset, indices)


def _loader(dataset, batch_size: int, shuffle: bool, generator: Optional[torch.Generator]):
    """The search's loaders (one place, so that what they read can be checked)."""
    collate = getattr(dataset, "collate_fn", None)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator,
                                       num_workers=0, collate_fn=collate)


def split_indices(n: int, validation: float, seed: int) -> Tuple[List[int], List[int]]:
    """A seeded split of ``range(n)``: (train, held out), the held-out part ``round(validation * n)``
    samples (at least one of each)."""
    if n < 2:
        raise ValueError(f"factor='auto' needs at least 2 samples in the experience to hold some out, got {n}")
    g = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(n, generator=g).tolist()
    k = min(n - 1, max(1, int(round(validation * n))))
    return sorted(perm[k:]), sorted(perm[:k])


def _batches(loader, device):
    for batch in loader:
        x, y, t = unpack(batch, True, "factor='auto'")
        x, y = x.to(device), y.to(device)
        if isinstance(t, Tensor):
            t = t.to(device)
        yield x, y, t


@torch.no_grad()
def evaluate(model: nn.Module, loader, criterion, device, output_transform=None) -> Tuple[float, float]:
    """(mean loss, accuracy) of ``model`` over ``loader``, in eval mode."""
    was = model.training
    model.eval()
    total, correct, n = 0.0, 0, 0
    try:
        for x, y, t in _batches(loader, device):
            out = model_output(model, x, t)
            loss = criterion(out, y)
            logits = to_logits(out, output_transform)
            if y.dtype.is_floating_point or y.dim() != 1:
                raise ValueError("factor='auto' measures accuracy, so it needs class-index targets (integer "
                                 f"[N] labels); got {y.dtype} of shape {tuple(y.shape)}")
            total += float(loss) * x.shape[0]
            correct += int((logits.argmax(-1) == y).sum())
            n += x.shape[0]
    finally:
        model.train(was)
    return (total / n if n else float("nan")), (correct / n if n else float("nan"))


def train_phase(model: nn.Module, loader, make_optimizer, criterion, device, epochs: int,
                penalty: Optional[Callable[[nn.Module], Tensor]] = None) -> bool:
    """Train ``model`` in place for ``epochs`` epochs (task loss, plus ``penalty(model)`` when
    given). False when the loss stopped being finite (the phase is then abandoned)."""
    opt = make_optimizer(model)
    model.train()
    for _ in range(epochs):
        for x, y, t in _batches(loader, device):
            opt.zero_grad(set_to_none=True)
            loss = criterion(model_output(model, x, t), y)
            if penalty is not None:
                loss = loss + penalty(model)
            if not bool(torch.isfinite(loss.detach())):
                return False
            loss.backward()
            opt.step()
    return True


def balance_factor(loss_start: float, loss_end: float, pen_start: float, pen_end: float) -> Optional[float]:
    """``(L_start - L_end) / (P_end - P_start)``: the factor at which the penalty (``P`` at factor 1)
    that an unpenalized fine-tuning from ``start`` to ``end`` pays equals the task loss it gains.
    None where the fine-tuning gained nothing or paid nothing."""
    gain, cost = loss_start - loss_end, pen_end - pen_start
    if not (math.isfinite(gain) and math.isfinite(cost)) or gain <= 0 or cost <= 0:
        return None
    return gain / cost


def probe_balance(model: nn.Module, x: Tensor, y: Tensor, t, *, make_optimizer, criterion,
                  penalty: Callable[[nn.Module, float], Tensor], steps: int = 20) -> Optional[float]:
    """The balance factor (:func:`balance_factor`) of ``steps`` unpenalized steps of a fresh
    optimizer on one minibatch, from ``model``'s parameters (on a copy; the global random number
    generators are restored)."""
    device = x.device
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        m = copy.deepcopy(model)
        m.eval()  # no dropout, BatchNorm statistics untouched (the importance passes' habit)

        def task() -> float:
            with torch.no_grad():
                return float(criterion(model_output(m, x, t), y))

        with torch.no_grad():
            loss0, pen0 = task(), float(penalty(m, 1.0))
        opt = make_optimizer(m)
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            loss = criterion(model_output(m, x, t), y)
            if not bool(torch.isfinite(loss.detach())):
                return None
            loss.backward()
            opt.step()
        with torch.no_grad():
            loss1, pen1 = task(), float(penalty(m, 1.0))
    return balance_factor(loss0, loss1, pen0, pen1)


# ----------------------------------------------------------------------------- the search


def search_factor(
    model: nn.Module,
    dataset,
    *,
    options: FactorSearch,
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
    criterion: Callable,
    penalty: Callable[[nn.Module, float], Tensor],
    batch_size: int,
    eval_batch_size: Optional[int] = None,
    device=None,
    seed: int = 0,
    output_transform=None,
    train_epochs: int = 1,
    admissible: Optional[Callable[[float], bool]] = None,
) -> SearchResult:
    """Run the search for one experience (``dataset``: its training data, nothing else).

    ``model`` is copied, never trained. ``make_optimizer(copy)`` gives a fresh optimizer for a copy,
    ``penalty(copy, factor)`` the regularizer's penalty at ``factor`` (``penalty(copy, 1.0)`` is
    also used for the balance factor). ``train_epochs``: the real training's epochs over all of
    ``dataset``; when ``options.max_epochs`` is None the longest phase has as many iterations.
    ``admissible(factor)``: False rejects a factor without training (the plugin rejects those that
    make plain SGD unstable over the real training, which a short phase may not reveal); such tries
    are recorded with accuracy None. Deterministic given ``seed``; the global random number
    generators are restored afterwards."""
    t0 = time.perf_counter()
    device = torch.device(device) if device is not None else next(model.parameters()).device
    train_idx, valid_idx = split_indices(len(dataset), options.validation, seed)
    train_data = _subset(_view(dataset, "train"), train_idx)
    valid_data = _subset(_view(dataset, "eval"), valid_idx)
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        start = copy.deepcopy(model)

        def loader():  # the same seeded order in every phase
            return _loader(train_data, batch_size, True, torch.Generator().manual_seed(int(seed)))

        valid = _loader(valid_data, eval_batch_size or batch_size, False, None)

        def phase(factor: Optional[float], epochs: int):
            torch.manual_seed(int(seed))  # dropout and the like: the same draws in every phase
            m = copy.deepcopy(start)
            pen = None if factor is None else (lambda mm: penalty(mm, factor))
            ok = train_phase(m, loader(), make_optimizer, criterion, device, epochs, pen)
            loss, acc = evaluate(m, valid, criterion, device, output_transform) if ok else (math.inf, 0.0)
            return m, loss, acc

        loss0, acc0 = evaluate(start, valid, criterion, device, output_transform)
        first = options.epochs if options.epochs is not None else int(train_epochs)
        longest = options.max_epochs or max(first, math.ceil(
            int(train_epochs) * math.ceil(len(dataset) / batch_size) / math.ceil(len(train_idx) / batch_size)))
        epochs = first
        plastic, loss_p, acc_star = phase(None, epochs)
        while (1.0 - options.tol) * acc_star <= acc0 and epochs < longest:
            # the threshold would ask for no learning at all: lengthen the phases
            epochs = min(2 * epochs, longest)
            plastic, loss_p, acc_star = phase(None, epochs)
        with torch.no_grad():
            p0, p_plastic = float(penalty(start, 1.0)), float(penalty(plastic, 1.0))
        del plastic
        balance = balance_factor(loss0, loss_p, p0, p_plastic)
        balance = 1.0 if balance is None else balance
        threshold = (1.0 - options.tol) * acc_star
        factor = options.start_ratio * balance
        tried: List[Tuple[float, Optional[float]]] = []
        met, trained = False, 0
        while trained < options.max_steps:
            if admissible is not None and not admissible(factor):
                tried.append((float(factor), None))  # free: not counted in max_steps
                if len(tried) >= _MAX_REJECTED + options.max_steps:
                    factor = 0.0
            else:
                m, _, acc = phase(factor, epochs)
                del m
                trained += 1
                tried.append((float(factor), float(acc)))
                if acc >= threshold or factor == 0.0:
                    met = acc >= threshold
                    break
            factor *= options.decay
        chosen, acc_chosen = tried[-1]
    return SearchResult(factor=chosen, met=met, plastic_accuracy=float(acc_star), threshold=float(threshold),
                        accuracy=float(acc_chosen), start_accuracy=float(acc0), balance=float(balance),
                        start=tried[0][0], tried=tried, epochs=epochs, n_train=len(train_idx), n_valid=len(valid_idx),
                        time_s=time.perf_counter() - t0)
