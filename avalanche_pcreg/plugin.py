"""``ParameterChangePlugin``: the Avalanche glue around the state, the estimators and the kernels.

Where it lives in Avalanche's loop (0.6):

* ``before_training_exp``: the model has adapted (heads have grown); the state is aligned to
  the current parameters (grown entries padded and free), and SI starts its path integral.
* ``before_backward``: ``strategy.loss += penalty``.
* ``before_update`` / ``after_update``: SI's path integral (only with ``importance="si"``).
* ``after_training_epoch``: the epoch's mean penalty is published.
* ``after_training_exp``: at a real task boundary, importances are estimated, merged with the
  current parameters as anchors, and swapped in only once everything succeeded.

Everything is keyed by parameter name and read from ``strategy.model`` every time.
"""

from __future__ import annotations

import fnmatch
import time
import warnings
import weakref
from typing import Callable, Dict, Iterable, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from avalanche.core import SupervisedPlugin
from avalanche.evaluation.metric_results import MetricValue
from avalanche.training.utils import _at_task_boundary

from ._checks import check_choice, check_nonneg_finite, check_positive_int
from .importance import SITracker, compute_importance, resolve_method
from .importance._common import check_output_transform
from .importance._persample import DEFAULT_CHUNK
from .penalty import Workspace
from .state import ConsolidatedState

__all__ = ["ParameterChangePlugin", "IMPORTANCE_DATA"]

IMPORTANCE_DATA = ("experience", "adapted")
PLUGIN_VERSION = 1
METRIC_PREFIX = "ParameterChange"


def _patterns(arg: str, value) -> Optional[tuple]:
    if value is None:
        return None
    if isinstance(value, str):
        value = (value,)
    if not isinstance(value, Iterable):
        raise TypeError(f"{arg} must be a name pattern (str) or a list of them, got {type(value).__name__} {value!r}")
    value = tuple(value)
    if not value or not all(isinstance(v, str) for v in value):
        raise TypeError(f"{arg} must be a name pattern (str) or a non-empty list of them, got {value!r}")
    return value


def _unwrap(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel / DataParallel, so names carry no 'module.'."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


class ParameterChangePlugin(SupervisedPlugin):
    """Parameter-change regularization ``factor * sum_i w_i (theta_i - theta*_i)**2``.

    :param factor: lambda/2 of the EWC paper; equals Avalanche's ``ewc_lambda``. Finite, >= 0.
    :param importance: an estimator name (``uniform``, ``empirical_fisher``, ``fisher``,
        ``expected_fisher``, ``minibatch_fisher``, ``mas``, ``si``) or a callable
        ``(model, data, **kw) -> {name: Tensor}``.
    :param mode: ``"separate"`` (one quadratic per past experience, stored consolidated) or
        ``"online"`` (F <- decay * F + F_new, theta* <- theta_now).
    :param decay: online mode's decay (default 1.0); an error with ``mode="separate"``.
    :param batch_size: batch size of the importance pass; None uses ``train_mb_size``.
    :param num_samples: a seeded random subset of the experience; None uses all of it.
    :param criterion: the loss of ``empirical_fisher`` (per sample) and ``minibatch_fisher``.
        None: cross-entropy for the per-sample Fisher (the model's log-likelihood) and the
        strategy's criterion for ``minibatch_fisher`` (as Avalanche's ``EWCPlugin``).
    :param include, exclude: name patterns (``fnmatch``, e.g. ``"features.*"``,
        ``"*.bn*"``) of parameters to regularize / leave out.
    :param parameters: a callable ``(name, param) -> bool`` selecting parameters.
    :param importance_data: ``"experience"`` (the experience's dataset) or ``"adapted"`` (what
        the strategy trained on, replay buffer included); both with eval transforms.
    :param xi: SI's damping term in ``omega / (delta**2 + xi)``.
    :param seed: seeds the importance subset and ``fisher``'s sampled labels.
    :param impl: penalty kernel, ``"foreach"`` or ``"forloop"``; None picks per device.
    :param output_transform: ``model_output -> logits`` for the importance pass of a model that
        returns a tuple, dict or object (see :func:`compute_importance`); ``criterion`` then gets logits.

    Frozen parameters (``requires_grad=False``) are never regularized. Parameters that got no
    gradient get zero importance.
    """

    def __init__(
        self,
        factor: float,
        importance: Union[str, Callable] = "empirical_fisher",
        mode: str = "separate",
        decay: Optional[float] = None,
        *,
        batch_size: Optional[int] = None,
        num_samples: Optional[int] = None,
        criterion: Optional[Callable] = None,
        include=None,
        exclude=None,
        parameters: Optional[Callable[[str, Tensor], bool]] = None,
        importance_data: str = "experience",
        xi: float = 0.1,
        seed: int = 0,
        impl: Optional[str] = None,
        chunk_size: int = DEFAULT_CHUNK,
        output_transform: Optional[Callable] = None,
    ):
        super().__init__()
        self.factor = check_nonneg_finite("factor", factor)
        # The state checks mode and decay, and resolves online mode's default decay (1.0).
        self._state = ConsolidatedState(mode, decay)
        if importance == "si":
            self.importance_name, self._estimator = "si", None
        else:
            self.importance_name, self._estimator = resolve_method(importance)
        self.mode, self.decay = self._state.mode, self._state.decay
        self.batch_size = check_positive_int("batch_size", batch_size, allow_none=True)
        self.num_samples = check_positive_int("num_samples", num_samples, allow_none=True)
        self.criterion = criterion
        self.include, self.exclude = _patterns("include", include), _patterns("exclude", exclude)
        if parameters is not None and not callable(parameters):
            raise TypeError(f"parameters must be a callable (name, param) -> bool, got {type(parameters).__name__}")
        self.parameters = parameters
        self.importance_data = check_choice("importance_data", importance_data, IMPORTANCE_DATA)
        if impl is not None:
            check_choice("impl", impl, ("foreach", "forloop"))
        self.seed, self.impl = int(seed), impl
        self.chunk_size = check_positive_int("chunk_size", chunk_size)
        self.output_transform = check_output_transform(output_transform)
        self._si = SITracker(xi) if self.importance_name == "si" else None
        self.xi = xi

        self._workspace = Workspace()  # per-step scratch of the CPU kernel (not part of the state)
        self._owner = None  # weakref to the strategy this instance is bound to
        self._patterns_checked = False
        self._selected_names: tuple = ()
        self._open_task = None  # an online task whose end the stream did not flag (yet)
        self._reset_counters()
        self._pen_sum: Optional[Tensor] = None
        self._pen_count = 0
        self.history: list = []  # one dict of figures per consolidation

    # ------------------------------------------------------------------ public state
    @property
    def state(self) -> ConsolidatedState:
        return self._state

    @property
    def importances(self) -> Dict[str, Tensor]:
        """A (the consolidated importance) per parameter name."""
        return dict(self._state.importances)

    @property
    def anchors(self) -> Dict[str, Tensor]:
        """mu (the consolidated anchor) per parameter name."""
        return dict(self._state.anchors)

    @property
    def num_consolidations(self) -> int:
        return self._state.num_consolidations

    def penalty(self, model: nn.Module) -> Tensor:
        """The penalty the plugin adds to the loss for ``model`` now (differentiable)."""
        return self._state.penalty(dict(_unwrap(model).named_parameters()), self.factor, impl=self.impl)

    def selected_parameters(self, model: nn.Module) -> Dict[str, Tensor]:
        """The parameters this plugin regularizes, by name (trainable and selected)."""
        out = {}
        for name, p in _unwrap(model).named_parameters():
            if not p.requires_grad:
                continue
            if self.include is not None and not any(fnmatch.fnmatchcase(name, pat) for pat in self.include):
                continue
            if self.exclude is not None and any(fnmatch.fnmatchcase(name, pat) for pat in self.exclude):
                continue
            if self.parameters is not None and not self.parameters(name, p):
                continue
            out[name] = p
        return out

    def _check_patterns(self, model: nn.Module) -> None:
        if self._patterns_checked:
            return
        names = [n for n, _ in _unwrap(model).named_parameters()]
        for arg, pats in (("include", self.include), ("exclude", self.exclude)):
            for pat in pats or ():
                if not any(fnmatch.fnmatchcase(n, pat) for n in names):
                    raise ValueError(
                        f"{arg} pattern {pat!r} matches no parameter of the model; parameter names are "
                        f"{names[:8]}{' ...' if len(names) > 8 else ''}"
                    )
        self._patterns_checked = True

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict:
        return {"version": PLUGIN_VERSION, "importance": self.importance_name, "factor": self.factor,
                "state": self._state.state_dict(), "history": list(self.history)}

    def load_state_dict(self, sd: dict, map_location=None) -> None:
        if not isinstance(sd, dict):
            raise TypeError(f"state_dict must be a dict, got {type(sd).__name__}")
        missing = [k for k in ("version", "importance", "state") if k not in sd]
        if missing:
            raise ValueError(f"plugin state_dict is missing keys {missing}")
        if sd["version"] != PLUGIN_VERSION:
            raise ValueError(f"plugin state_dict has version {sd['version']!r}; this library reads version {PLUGIN_VERSION}")
        state = ConsolidatedState.from_state_dict(sd["state"], map_location=map_location)
        if (state.mode, state.decay) != (self.mode, self.decay):
            raise ValueError(
                f"state_dict was saved with mode={state.mode!r}, decay={state.decay!r}; this plugin has "
                f"mode={self.mode!r}, decay={self.decay!r}"
            )
        self._state = state
        self.history = list(sd.get("history", []))

    def __getstate__(self):
        d = self.__dict__.copy()
        d["_owner"] = None  # weak references do not pickle; rebound on the next training run
        d["_workspace"] = Workspace()  # scratch, rebuilt on the next step
        d["_open_task"] = None
        return d

    # ------------------------------------------------------------------ callbacks
    def _reset_counters(self) -> None:
        self._iterations = 0
        self._backwards = 0

    def before_training(self, strategy, *args, **kwargs):
        owner = self._owner() if self._owner is not None else None
        if owner is not None and owner is not strategy:
            raise RuntimeError(
                f"this ParameterChangePlugin is already attached to another strategy "
                f"({type(owner).__name__}); use one plugin instance per strategy (copy the state with "
                "state_dict()/load_state_dict())"
            )
        self._owner = weakref.ref(strategy)

    def before_training_exp(self, strategy, *args, **kwargs):
        self._check_patterns(strategy.model)
        if self._open_task is not None and _at_task_boundary(strategy.experience, before=True):
            # A new task starts but the previous one was never closed by an is_last_subexp flag:
            # consolidate it now, with the model as it left that task.
            self._consolidate(strategy, self._open_task)
        params = self.selected_parameters(strategy.model)
        self._selected_names = tuple(params)
        self._state = self._state.aligned(params)
        if self._si is not None and _at_task_boundary(strategy.experience, before=True):
            self._si.begin(params)

    def before_training_epoch(self, strategy, *args, **kwargs):
        self._reset_counters()

    def before_training_iteration(self, strategy, *args, **kwargs):
        self._iterations += 1
        self._workspace.release()  # the previous iteration's graph is done

    def before_backward(self, strategy, *args, **kwargs):
        self._backwards += 1
        if self._state.empty:
            return
        params = dict(_unwrap(strategy.model).named_parameters())
        name, A = next(iter(self._state.importances.items()))
        if name in params and params[name].device != A.device:  # the model moved mid-experience
            self._state = self._state.aligned(params)
        pen = self._state.penalty(params, self.factor, impl=self.impl, workspace=self._workspace)
        strategy.loss += pen
        detached = pen.detach()
        self._pen_sum = detached if self._pen_sum is None else self._pen_sum + detached
        self._pen_count += 1

    def _si_params(self, strategy) -> Dict[str, Tensor]:
        # Selection is resolved once per experience (patterns are not matched every step);
        # the tensors themselves are read from strategy.model every time.
        named = dict(_unwrap(strategy.model).named_parameters())
        return {n: named[n] for n in self._selected_names if n in named}

    def before_update(self, strategy, *args, **kwargs):
        if self._si is not None:
            self._si.before_update(self._si_params(strategy))

    def after_update(self, strategy, *args, **kwargs):
        if self._si is not None:
            self._si.after_update(self._si_params(strategy))

    def after_training_epoch(self, strategy, *args, **kwargs):
        if self._iterations > 0 and self._backwards == 0:
            raise RuntimeError(
                f"{type(strategy).__name__} ran {self._iterations} training iterations without firing "
                "before_backward, so ParameterChangePlugin cannot add its penalty to the loss (meta-learning "
                "templates such as MER/LaMAML and StreamingLDA work this way). Refusing to train silently "
                "without the regularizer."
            )
        if self._pen_count:
            mean = (self._pen_sum / self._pen_count).item()
            self._publish(strategy, "penalty_epoch", mean, strategy.clock.train_iterations)
        self._pen_sum, self._pen_count = None, 0

    def after_training_exp(self, strategy, *args, **kwargs):
        experience = strategy.experience
        if not _at_task_boundary(experience, before=False):
            # An online mini-experience inside a task: remember it, in case the stream never
            # flags a last one (Avalanche 0.6's split_online_stream with drop_last=False).
            self._open_task = experience
            return
        self._consolidate(strategy, experience)

    def _consolidate(self, strategy, experience) -> None:
        self._open_task = None
        model = _unwrap(strategy.model)
        params = self.selected_parameters(model)
        exp_id = getattr(experience, "current_experience", strategy.clock.train_exp_counter)
        start = time.perf_counter()
        if self._si is not None:
            importances = self._si.importance(params)
        else:
            data = self._importance_dataset(strategy, experience)
            if data is None or len(data) == 0:
                warnings.warn(
                    f"experience {exp_id} has no samples: importance pass skipped, ParameterChangePlugin state unchanged"
                )
                return
            importances = compute_importance(
                model, data, self._estimator,
                criterion=self._criterion_for(strategy),
                batch_size=self.batch_size or strategy.train_mb_size,
                num_samples=self.num_samples,
                device=strategy.device,
                names=list(params),
                seed=self.seed + int(strategy.clock.train_exp_counter),
                chunk_size=self.chunk_size,
                output_transform=self.output_transform,
            )
        # Anything that fails above or here leaves self._state as it was.
        new_state = self._state.consolidated(importances, params, estimator=self.importance_name)
        elapsed = time.perf_counter() - start
        self._state = new_state
        self._publish_importance_stats(strategy, importances, elapsed, exp_id)

    # ------------------------------------------------------------------ helpers
    def _importance_dataset(self, strategy, experience):
        if self.importance_data == "adapted":
            # What the strategy trained on: Avalanche's multi-dataset loaders (ReplayDataLoader:
            # the experience plus the replay buffer) keep their parts in `.datasets`.
            parts = getattr(getattr(strategy, "dataloader", None), "datasets", None)
            if parts and all(hasattr(d, "concat") for d in parts):
                data = parts[0]
                for part in parts[1:]:
                    data = data.concat(part)
            else:
                data = strategy.adapted_dataset
        else:
            # On an online stream with task boundaries the task's data is the whole origin
            # experience, not only the last mini-experience.
            origin = getattr(experience, "origin_experience", None)
            use_origin = origin is not None and getattr(experience, "access_task_boundaries", False)
            data = origin.dataset if use_origin else experience.dataset
        if data is not None and hasattr(data, "eval"):
            data = data.eval()
        return data

    def _criterion_for(self, strategy):
        if self.criterion is not None:
            return self.criterion
        if self.importance_name == "minibatch_fisher":
            return getattr(strategy, "_criterion", None)
        return None

    def _publish(self, strategy, name: str, value: float, x: int) -> None:
        evaluator = getattr(strategy, "evaluator", None)
        if evaluator is None:
            return
        evaluator.publish_metric_value(MetricValue(self, f"{METRIC_PREFIX}/{name}", value, x))

    def _publish_importance_stats(self, strategy, importances, elapsed, exp_id) -> None:
        total = sum(t.numel() for t in importances.values())
        if total:
            flat_sum = sum(t.double().sum() for t in importances.values())
            flat_max = max(t.max() for t in importances.values() if t.numel())
            zeros = sum((t == 0).sum() for t in importances.values())
            stats = {
                "importance_mean": float(flat_sum) / total,
                "importance_max": float(flat_max),
                "importance_zero_frac": float(zeros) / total,
            }
        else:
            stats = {"importance_mean": 0.0, "importance_max": 0.0, "importance_zero_frac": 0.0}
        stats["importance_time_s"] = elapsed
        x = int(strategy.clock.train_exp_counter)
        for k, v in stats.items():
            self._publish(strategy, k, v, x)
        self.history.append({"experience": exp_id, **stats, "state_bytes": self._state.nbytes()})
