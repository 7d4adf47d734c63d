"""``ParameterChangePlugin``: the Avalanche glue around the state, the estimators and the kernels.

Where it lives in Avalanche's loop (0.6):

* ``before_training_exp``: the model has adapted (heads have grown); the state is aligned to
  the current parameters (grown entries padded and free), and a trajectory estimator (SI,
  RWalk) starts its path statistics. With ``factor="auto"`` the factor is searched for here, on
  copies of the model and the experience's data (:mod:`avalanche_pcreg.factor_search`).
* ``before_training_iteration``, ``after_backward``, ``before_update``, ``after_update``: forwarded
  to a trajectory estimator (``si``, ``avalanche_si``, ``rwalk``, ...; see ``importance.trajectory``).
* ``before_backward``: ``strategy.loss += penalty``.
* ``after_training_exp``: at a real task boundary, importances are estimated (``_estimate``),
  merged with the current parameters as anchors (``_merge``), and swapped in only once everything
  succeeded.

What the plugin watches meanwhile (the epoch's penalty log and its published mean, non-finite
penalties, the penalty against the task loss, a penalty that holds the model) is
:class:`avalanche_pcreg.monitoring.PenaltyMonitor`'s, which the callbacks call. The less often
changed settings are one frozen :class:`avalanche_pcreg.options.PluginOptions`, checked in one place.

Everything is keyed by canonical parameter name (:mod:`avalanche_pcreg.selection`: no
DDP/DataParallel/``torch.compile`` prefix) and read from ``strategy.model`` every time. Which
parameters are regularized lives in :mod:`avalanche_pcreg.selection`, what the importance pass
reads in :mod:`avalanche_pcreg._data`; only the callbacks live here.
"""

from __future__ import annotations

import time
import warnings
import weakref
from typing import Callable, Dict, Optional, Union

import torch
from torch import Tensor, nn

from . import _avalanche  # noqa: F401  (before Avalanche: its import without qpsolvers' warning)
from avalanche.core import SupervisedPlugin
from avalanche.training.utils import _at_task_boundary

from ._checks import check_finite_parameter, check_nonneg_finite
from ._data import IMPORTANCE_DATA, importance_criterion, importance_dataset
from ._guards import capped, sgd_instability
from .factor_search import as_factor_search, optimizer_like, search_factor
from ._stats import importance_stats
from .importance import TrajectoryEstimator, compute_importance, resolve_estimator
from .importance._common import eval_mode, model_output
from .importance.kfac import KroneckerImportance
from .importance.persample import Policy
from .monitoring import PenaltyMonitor, experience_id, publish
from .options import OPTION_NAMES, OptionAttribute, PluginOptions
from .selection import ParameterSelection, canonical_name, named_parameters, raw_names, unwrap
from .state import ConsolidatedState

__all__ = ["ParameterChangePlugin", "PluginOptions", "IMPORTANCE_DATA"]

PLUGIN_VERSION = 1


class ParameterChangePlugin(SupervisedPlugin, supports_distributed=True):
    """Parameter-change regularization ``factor * sum_i w_i (theta_i - theta*_i)**2``.

    :param factor: lambda/2 of the EWC paper; equals Avalanche's ``ewc_lambda``. Finite, >= 0; or
        ``"auto"``: chosen at the start of every experience after the first by a short search on
        that experience's own data (a maximal-plasticity fine-tuning, then a factor decayed from a
        high, scale-aware start until the new experience's held-out accuracy is within ``tol`` of
        the plastic one: De Lange et al. 2021; :mod:`avalanche_pcreg.factor_search`,
        docs/factor-search.md). The search trains copies of the model, never the model; each choice
        goes to ``history`` (``"factor"``, ``"factor_search"``) and to Avalanche's loggers
        (``ParameterChange/factor``, ``.../search_plastic_accuracy``, ``.../search_accuracy``);
        ``state_dict`` keeps the current factor.
    :param factor_search: the options of ``factor="auto"``: a
        :class:`~avalanche_pcreg.factor_search.FactorSearch` (``tol=0.2, decay=0.5, epochs=1,
        validation=0.2, max_steps=10, start_ratio=16``) or a dict of its fields; None: the defaults.
    :param importance: a registered estimator name (data passes: ``uniform``,
        ``empirical_fisher``, ``fisher``, ``expected_fisher``, ``minibatch_fisher``, ``mas``,
        ``avalanche_mas``; Kronecker-factored blocks: ``kfac``, ``kfac_sampled``,
        ``kfac_empirical``, see ``kfac_merge`` and docs/kfac.md; trajectory estimators: ``si``, ``avalanche_si``, ``rwalk``,
        ``rwalk_fisher``), a callable ``(model, data, **kw) -> {name: Tensor}``, or a
        :class:`~avalanche_pcreg.importance.TrajectoryEstimator` object. Avalanche parity:
        ``minibatch_fisher`` (EWCPlugin), ``avalanche_si`` (SynapticIntelligencePlugin, with
        ``mode="online", decay=0`` and ``factor=si_lambda/2``), ``avalanche_mas`` (MASPlugin,
        with ``mode="online", decay=alpha, running_average=True``), ``rwalk`` (RWalkPlugin, with
        ``mode="online", decay=0``); see docs/migration.md and :mod:`avalanche_pcreg.training`.
    :param mode: ``"separate"`` (one quadratic per past experience, stored consolidated) or
        ``"online"`` (F <- decay * F + F_new, theta* <- theta_now).
    :param decay: online mode's decay (default 1.0); an error with ``mode="separate"``.
    :param batch_size: batch size of the importance pass; None uses ``train_mb_size``.
    :param num_samples: a seeded random subset of the experience; None uses all of it.
    :param criterion: the loss of the importance pass; None (default): the strategy's criterion.
        ``empirical_fisher`` (and ``rwalk_fisher``'s Fisher) uses it per sample: a torch loss with
        ``reduction='none'``, summed over the non-sample dimensions (``MSELoss``,
        ``BCEWithLogitsLoss``, ``L1Loss``, ``HuberLoss``, ``CrossEntropyLoss`` with class weights:
        ``weight[y_n] * loss_n``...), or a callable ``(output, target) -> per-sample losses [N]``.
        ``fisher`` and ``expected_fisher`` take its likelihood: ``CrossEntropyLoss`` /
        ``NLLLoss`` a softmax, ``BCEWithLogitsLoss`` a Bernoulli per output, ``MSELoss`` a
        unit-variance Gaussian per output; another criterion is a ValueError naming it.
        ``minibatch_fisher`` uses it as it is (Avalanche's ``EWCPlugin``). A strategy criterion
        that is not a torch loss (a function, ICaRL's loss...) cannot be made per sample: the
        per-sample estimators then use the model's likelihood on class-index targets, with a
        warning, and float targets are a ValueError asking for ``criterion=``.
        What it receives: a criterion given here gets the logits (the output after
        ``output_transform``, or as found in a dict / ``.logits`` output); the strategy's
        criterion, where it is called as it is (``minibatch_fisher``, ``rwalk``'s task gradient),
        gets the model's raw output, as the strategy and Avalanche's plugins give it (a criterion
        written for a dict output keeps working); the per-sample estimators use it only when it
        is a torch loss, which gets the logits.
    :param include, exclude: name patterns (``fnmatch``, e.g. ``"features.*"``,
        ``"*.bn*"``) of parameters to regularize / leave out.
    :param parameters: a callable ``(name, param) -> bool`` selecting parameters.
    :param include_modules, exclude_modules: select by the module that holds a parameter: an
        ``nn.Module`` subclass, a tuple of them, or a predicate ``(module) -> bool``; the parameters
        held directly by the modules it selects are regularized / left out.
        ``exclude_modules=norm_layers`` (:func:`avalanche_pcreg.selection.norm_layers`) leaves out
        every normalization layer (BatchNorm, GroupNorm, LayerNorm, ...) whatever its name.
        ``include_modules`` that holds no parameter is an error at the first experience.
    :param importance_data: ``"experience"`` (the experience's dataset) or ``"adapted"`` (what
        the strategy trained on, replay buffer included); both with eval transforms.
    :param xi: SI's damping term in ``omega / (delta**2 + xi)``.
    :param estimator_options: keyword arguments for a trajectory estimator given by name (e.g.
        ``{"ewc_alpha": 0.9, "delta_t": 10}`` for ``rwalk``, ``{"eps": 1e-7}`` for ``avalanche_si``).
        ``importance`` may also be a :class:`~avalanche_pcreg.importance.TrajectoryEstimator` object.
    :param importance_scale: multiplies every importance before it is merged (> 0). Carries a
        lambda tuned for one estimator to another: ``importance_scale=importance_ratio(model, data,
        a="minibatch_fisher", b="empirical_fisher")`` with Avalanche's ``ewc_lambda`` as ``factor``.
    :param running_average: online mode only: ``A <- decay * A + (1 - decay) * F_new`` after the
        first consolidation (``A = F`` at the first), Avalanche ``MASPlugin``'s ``alpha`` average.
    :param stability_guard: when the penalty alone would make (heavy-ball) SGD blow up over the
        experience (``lr * 2 * factor * A > 2 * (1 + momentum)`` and a deviation amplified more
        than 1e6x over its iterations; checked once per experience), apply the penalty with ``A``
        capped at ``(1 + momentum) / (lr * 2 * factor)`` (half that limit) for the experience,
        with a warning; the stored state is unchanged. A Kronecker-factored layer (``"kfac"``)
        counts with its largest curvature, λ(G)·λ(A), and is scaled down as a whole to the cap.
        False (default): warn only. Where SGD is stable the cap does not bind and nothing changes.
    :param warn_ratio: warn when, on the first iteration of an experience where the penalty is
        non-zero, it exceeds the task loss by this factor (None: never). The warning names the
        estimator in use and the factor at which the two would be equal.
    :param warn_frozen: after the last epoch of an experience with a penalty, warn (any optimizer)
        when the training accuracy on the experience stays near chance (within 10 % of the way
        from chance, 1 / the classes its labels cover, to 1) while the penalty's gradient is at
        least half the task loss's and the factor is above twice the *balance factor* (the factor
        at which a few unpenalized optimizer steps on the last minibatch gain as much task loss
        as they cost penalty, measured on a copy): the penalty holds the model at its anchors.
        The warning names the estimator and the balance factor. True by default.
    :param keep_importance_data: also keep the importances each consolidation merged (after
        ``importance_scale``), per experience, in ``kept_importances`` (``{experience: {name:
        tensor}}``, CPU copies; O(T * P) memory) and in ``state_dict``, for inspection, like
        Avalanche's ``EWCPlugin(keep_importance_data=True)``. The penalty uses the consolidated
        state either way. False by default.
    :param seed: seeds the importance subset and ``fisher``'s sampled labels.
    :param impl: penalty kernel, ``"compiled"``, ``"forloop"`` or ``"foreach"``; None picks per
        device and size (:func:`avalanche_pcreg.penalty.default_impl`).
    :param chunk_size: samples whose per-sample gradients the importance pass forms at once
        (see :func:`~avalanche_pcreg.compute_importance`); None: 16 on the CPU, 256 on a GPU.
    :param strict: stored parameter names missing from the model at the start of an experience
        raise ValueError (True) or warn (False; those entries then add nothing to the penalty).
    :param on_nonfinite: a non-finite penalty raises FloatingPointError (``"raise"``) or warns
        once (``"warn"``).
    :param output_transform: ``model_output -> logits`` for the importance pass of a model that
        returns a tuple, dict or object (see :func:`compute_importance`); the estimators and a
        ``criterion`` given here then get those logits. The strategy's criterion, where called as
        it is (``minibatch_fisher``, ``rwalk``), gets the raw output (see ``criterion``).
    :param policy: how the importance pass's per-sample engine runs (chunk sizes, byte budgets,
        convolution paths): a :class:`~avalanche_pcreg.importance.persample.Policy`, handed to
        :func:`~avalanche_pcreg.compute_importance`, e.g. ``Policy.gpu().replace(chunk_size=64)``
        to bound a GPU pass's memory; ``chunk_size``, when given, replaces its ``chunk_size``.
        None (default): the device's (``Policy.for_device``, or the one installed by
        ``using_policy``). It changes speed and memory, never the importances beyond
        floating-point rounding.
    :param kfac_merge: with a Kronecker-factored importance (``kfac``...), how the blocks of
        several experiences are kept: ``"exact"`` (one pair of factors per experience and layer;
        memory and step cost grow with their number) or ``"nearest"`` (one pair per layer, the
        nearest Kronecker product of the old pair plus the new one: constant cost, an
        approximation whose error docs/kfac.md reports). None (default): ``"exact"`` in separate
        mode, ``"nearest"`` in online mode (one block per layer, decayed and added to, as the
        online Laplace approximation of Ritter et al. 2018).

    The keyword settings other than the parameter selection and ``factor_search`` are held in
    ``options``, a frozen :class:`~avalanche_pcreg.options.PluginOptions` that checks them, and read
    as read-only attributes (``plugin.seed``, ``plugin.policy``, ...).

    Frozen parameters (``requires_grad=False``) are never regularized. Parameters that got no
    gradient get zero importance. Names are those of the plain model: DDP/DataParallel's
    ``module.`` and ``torch.compile``'s ``_orig_mod.`` are looked through.
    """

    # the settings held in ``options`` (a frozen PluginOptions), read-only: plugin.seed, plugin.policy...
    (batch_size, num_samples, criterion, importance_data, xi, seed, impl, chunk_size, estimator_options,
     importance_scale, running_average, stability_guard, warn_ratio, strict, on_nonfinite, output_transform,
     keep_importance_data, warn_frozen, policy, kfac_merge) = (OptionAttribute() for _ in OPTION_NAMES)

    def __init__(
        self,
        factor: Union[float, str],
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
        include_modules=None,
        exclude_modules=None,
        importance_data: str = "experience",
        xi: float = 0.1,
        seed: int = 0,
        impl: Optional[str] = None,
        chunk_size: Optional[int] = None,
        estimator_options: Optional[dict] = None,
        importance_scale: float = 1.0,
        running_average: bool = False,
        stability_guard: bool = False,
        warn_ratio: Optional[float] = 1e4,
        strict: bool = True,
        on_nonfinite: str = "raise",
        output_transform: Optional[Callable] = None,
        factor_search=None,
        keep_importance_data: bool = False,
        warn_frozen: bool = True,
        policy: Optional[Policy] = None,
        kfac_merge: Optional[str] = None,
    ):
        super().__init__()
        # factor="auto": chosen per experience by a short search (avalanche_pcreg.factor_search)
        self.factor_search = None
        if isinstance(factor, str):
            if factor != "auto":
                raise TypeError(f"factor must be a real number >= 0 or 'auto', got str {factor!r}")
            self.factor_search, factor = as_factor_search(factor_search), 0.0
        elif factor_search is not None:
            raise ValueError("factor_search is used only with factor='auto'; got factor="
                             f"{factor!r} with factor_search={factor_search!r}")
        self.factor = check_nonneg_finite("factor", factor)
        self._record = resolve_estimator(importance)
        self.importance_name = self._record.name
        self.options = PluginOptions(
            batch_size=batch_size, num_samples=num_samples, criterion=criterion, importance_data=importance_data,
            xi=xi, seed=seed, impl=impl, chunk_size=chunk_size, estimator_options=estimator_options,
            importance_scale=importance_scale, running_average=running_average, stability_guard=stability_guard,
            warn_ratio=warn_ratio, strict=strict, on_nonfinite=on_nonfinite, output_transform=output_transform,
            keep_importance_data=keep_importance_data, warn_frozen=warn_frozen, policy=policy,
            kfac_merge=kfac_merge)
        # The state checks mode and decay, and resolves online mode's default decay (1.0).
        merge = self.kfac_merge or ("nearest" if mode == "online" else "exact")
        self._state = ConsolidatedState(mode, decay, kfac_merge=merge)
        if self.running_average and self.mode != "online":
            raise ValueError("running_average=True needs mode='online' (it averages A with weight decay)")
        # a trajectory estimator's tracker (None for a data pass), and the data pass's estimator, if any
        self._tracker, self._data_pass = self._estimators(importance)
        self._selection = ParameterSelection(include, exclude, parameters, include_modules, exclude_modules)
        self._monitor = PenaltyMonitor(
            on_nonfinite=self.on_nonfinite, warn_ratio=self.warn_ratio, warn_frozen=self.warn_frozen,
            output_transform=self.output_transform, impl=self.impl, importance=self.importance_name,
            importance_scale=self.importance_scale, auto=self.factor_search is not None)

        self._penalty_state: Optional[ConsolidatedState] = None  # capped by the stability guard
        self._owner = None  # weakref to the strategy this instance is bound to
        self._selected_names: tuple = ()
        self._open_task = None  # an online task whose end the stream did not flag (yet)
        self._search_record: Optional[dict] = None  # the search of the current experience, for history
        self.kept_importances: Dict[int, Dict[str, Tensor]] = {}  # experience -> what it merged (on request)
        self.history: list = []  # one dict of figures per consolidation (timings included)

    def _estimators(self, importance):
        """``(tracker, data pass)``: a trajectory estimator's tracker, built with ``estimator_options``
        (and ``xi`` for ``si``), or None; and the record of the data-pass estimator the end of a task
        runs (the estimator itself, a tracker's ``data_estimator``), or None."""
        options = self.estimator_options
        if options and not (self._record.trajectory and isinstance(importance, str)):
            raise ValueError(
                f"estimator_options are for trajectory estimators given by name; importance {self.importance_name!r} "
                "takes none"
            )
        if not self._record.trajectory:
            return None, self._record
        opts = dict(options or {})
        if self._record.name == "si" and isinstance(importance, str):
            opts.setdefault("xi", self.xi)
        try:
            tracker: TrajectoryEstimator = self._record.tracker(**opts)
        except TypeError as err:
            raise TypeError(f"estimator_options {opts} do not fit importance {self.importance_name!r}: {err}") from None
        if tracker.data_estimator is None:
            return tracker, None
        data_pass = resolve_estimator(tracker.data_estimator)
        if data_pass.trajectory:
            raise ValueError(f"data_estimator {tracker.data_estimator!r} must be a data-pass estimator")
        return tracker, data_pass

    # ------------------------------------------------------------------ public state
    @property
    def state(self) -> ConsolidatedState:
        return self._state

    @property
    def mode(self) -> str:
        return self._state.mode

    @property
    def decay(self) -> Optional[float]:
        return self._state.decay

    @property
    def include(self):
        return self._selection.include

    @property
    def exclude(self):
        return self._selection.exclude

    @property
    def parameters(self):
        return self._selection.parameters

    @property
    def include_modules(self):
        return self._selection.include_modules

    @property
    def exclude_modules(self):
        return self._selection.exclude_modules

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
        return self._state.penalty(named_parameters(model), self.factor, impl=self.impl)

    def selected_parameters(self, model: nn.Module) -> Dict[str, Tensor]:
        """The parameters this plugin regularizes, by canonical name (trainable and selected)."""
        return self._selection.select(named_parameters(model), model)

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict:
        sd = {"version": PLUGIN_VERSION, "importance": self.importance_name, "factor": self.factor,
              "state": self._state.state_dict(), "history": list(self.history)}
        if self._tracker is not None:
            sd["tracker"] = self._tracker.state_dict()
        if self.factor_search is not None:
            sd["factor_search"] = self.factor_search.as_dict()
        if self.keep_importance_data:
            sd["kept_importances"] = {k: dict(v) for k, v in self.kept_importances.items()}
        return sd

    def load_state_dict(self, sd: dict, map_location=None, strict: bool = False) -> None:
        """Restore a :meth:`state_dict`. One saved with another ``importance`` or ``factor`` warns,
        or raises ValueError with ``strict=True``; another mode or decay always raises. With
        ``factor="auto"`` the saved factor (the last one chosen) is taken over."""
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
        differ = [f"{key}={sd[key]!r} (this plugin: {key}={mine!r})"
                  for key, mine in (("importance", self.importance_name), ("factor", self.factor))
                  if key in sd and sd[key] != mine and not (key == "factor" and self.factor_search is not None)]
        if differ:
            msg = ("state_dict was saved with " + ", ".join(differ) + "; the loaded importances and anchors are "
                   "used as they are, with this plugin's settings from now on")
            if strict:
                raise ValueError(msg + " (strict=True)")
            warnings.warn(msg, stacklevel=2)
        self._state = state
        self._penalty_state = None
        self.history = list(sd.get("history", []))
        if self.factor_search is not None and "factor" in sd:
            self.factor = check_nonneg_finite("factor", sd["factor"])
        if self.keep_importance_data:
            self.kept_importances = {int(k): dict(v) for k, v in sd.get("kept_importances", {}).items()}
        if self._tracker is not None and "tracker" in sd:
            self._tracker.load_state_dict(sd["tracker"])

    def __getstate__(self):
        d = self.__dict__.copy()
        d["_owner"] = None  # weak references do not pickle; rebound on the next training run
        d["_open_task"] = None
        return d

    # the monitor's devices with a per-step finiteness check (() forces the other devices' path) and
    # the iterations of the current epoch's penalty log
    @property
    def _check_every_step_on(self) -> tuple:
        return self._monitor.check_every_step_on

    @_check_every_step_on.setter
    def _check_every_step_on(self, devices: tuple) -> None:
        self._monitor.check_every_step_on = devices

    @property
    def _pen_iters(self) -> list:
        return self._monitor.log_iterations

    # ------------------------------------------------------------------ callbacks
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
        named = named_parameters(strategy.model)
        self._selection.check_patterns(named, strategy.model)
        if self._open_task is not None and _at_task_boundary(strategy.experience, before=True):
            # A new task starts but the previous one was never closed by an is_last_subexp flag:
            # consolidate it now, with the model as it left that task.
            self._consolidate(strategy, self._open_task)
        missing = [n for n in self._state.importances if n not in named]
        if missing:
            msg = (f"stored parameters {missing} are missing from the model, so their penalty would be dropped; "
                   f"the model's parameters are {list(named)[:8]}{' ...' if len(named) > 8 else ''}")
            if self.strict:
                raise ValueError(msg + ". Pass strict=False to train on without them.")
            warnings.warn(msg, stacklevel=2)
        params = self._selection.select(named, strategy.model)
        self._selected_names = tuple(params)
        self._state = self._state.aligned(named)
        if self._tracker is not None and _at_task_boundary(strategy.experience, before=True):
            self._tracker.begin(params)
        if (self.factor_search is not None and not self._state.empty
                and _at_task_boundary(strategy.experience, before=True)):
            self._search_factor(strategy)
        self._check_stability(strategy)
        self._monitor.begin_experience(penalized=not self._state.empty and self.factor > 0)

    def before_training_epoch(self, strategy, *args, **kwargs):
        self._monitor.begin_epoch(strategy)

    def before_training_iteration(self, strategy, *args, **kwargs):
        self._monitor.count_iteration()
        if self._tracker is not None and self._tracker.needs_task_gradient:
            self._task_gradient(strategy)

    def _task_gradient(self, strategy) -> None:
        """The gradient of the strategy's criterion alone on the current minibatch, in eval mode
        (as Avalanche's RWalkPlugin computes it), handed to the trajectory estimator. The criterion
        gets the model's raw output, as in training and in Avalanche's RWalkPlugin."""
        params = self._tracked_params(strategy)
        model = unwrap(strategy.model)
        names = [n for n, p in params.items() if p.requires_grad]
        with eval_mode(model), torch.enable_grad():
            out = model_output(model, strategy.mb_x, strategy.mb_task_id)
            loss = strategy._criterion(out, strategy.mb_y)
            grads = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
        self._tracker.task_gradient(params, dict(zip(names, grads)))

    def before_backward(self, strategy, *args, **kwargs):
        self._monitor.count_backward()
        if self._state.empty:
            return
        # names matched to parameters once, until the model's parameters change (ConsolidatedState.bind)
        bound = self._applied_state.bind(strategy.model)
        if bound.moved:  # the model moved to another device mid-experience
            self._state = self._state.aligned(named_parameters(strategy.model))
            self._check_stability(strategy)
            bound = self._applied_state.bind(strategy.model)
        pen = bound(self.factor, impl=self.impl)
        self._monitor.check_ratio(strategy, pen, self.factor)  # against the task loss alone
        strategy.loss += pen
        self._monitor.record(strategy, pen, self.factor)

    def _check_stability(self, strategy) -> None:
        """Warn when the penalty alone makes plain SGD unstable; with ``stability_guard``, cap
        ``A`` for the experience where the run would blow up (see :func:`._guards.sgd_instability`)."""
        self._penalty_state = None
        if self._state.empty:
            return
        try:
            steps = len(strategy.dataloader) * int(strategy.train_epochs)
        except (TypeError, AttributeError):
            steps = None
        names_by_id = {id(p): canonical_name(n) for n, p in unwrap(strategy.model).named_parameters()}
        optimizer = getattr(strategy, "optimizer", None)
        blocks = self._block_curvatures(optimizer)
        messages, caps = sgd_instability(optimizer, self._state.importances, names_by_id, self.factor, steps,
                                         self.importance_name, 1e6 if self.stability_guard else None, blocks)
        for msg in messages:
            warnings.warn(msg, RuntimeWarning)
        if caps:
            state = self._state._copy()
            state.importances = capped(self._state.importances, caps)
            scales = {w: caps[w] / blocks[w] for w in self._state.kron.layers if w in caps and blocks[w] > caps[w]}
            if scales:
                state.kron = self._state.kron.scaled(scales)
            self._penalty_state = state

    def _block_curvatures(self, optimizer) -> Dict[str, float]:
        """The Kronecker-factored layers' largest curvatures (power iterations, once an experience),
        only where the stability check reads them: plain SGD."""
        if not isinstance(optimizer, torch.optim.SGD) or not self._state.kron.layers:
            return {}
        return self._state.kron.curvatures()

    @property
    def _applied_state(self) -> ConsolidatedState:
        """The state the penalty uses: the stored one, or its copy capped by the stability guard."""
        return self._penalty_state if self._penalty_state is not None else self._state

    def _tracked_params(self, strategy) -> Dict[str, Tensor]:
        # Selection is resolved once per experience (patterns are not matched every step);
        # the tensors themselves are read from strategy.model every time.
        named = named_parameters(strategy.model)
        return {n: named[n] for n in self._selected_names if n in named}

    def after_backward(self, strategy, *args, **kwargs):
        if self._tracker is not None:
            self._tracker.after_backward(self._tracked_params(strategy))

    def before_update(self, strategy, *args, **kwargs):
        if self._tracker is not None:
            self._tracker.before_update(self._tracked_params(strategy))

    def after_update(self, strategy, *args, **kwargs):
        if self._tracker is not None:
            self._tracker.after_update(self._tracked_params(strategy))

    def after_training_iteration(self, strategy, *args, **kwargs):
        self._monitor.after_iteration(strategy)

    def after_training_epoch(self, strategy, *args, **kwargs):
        self._monitor.end_epoch(strategy, self, self.factor, self._applied_state)

    def after_training_exp(self, strategy, *args, **kwargs):
        experience = strategy.experience
        if not _at_task_boundary(experience, before=False):
            # An online mini-experience inside a task: remember it, in case the stream never
            # flags a last one (Avalanche 0.6's split_online_stream with drop_last=False).
            self._open_task = experience
            return
        self._consolidate(strategy, experience)

    # ------------------------------------------------------------------ the end of a task
    def _consolidate(self, strategy, experience) -> None:
        """This task's importances (:meth:`_estimate`) merged into a new state (:meth:`_merge`),
        which replaces the current one only once everything succeeded."""
        self._open_task = None
        model = unwrap(strategy.model)
        named = named_parameters(model)
        params = self._selection.select(named, model)
        for name, p in params.items():  # before the importance pass: a clear error, state unchanged
            check_finite_parameter(name, p.detach())
        exp_id = experience_id(strategy, experience)
        start = time.perf_counter()
        data = None
        if self._data_pass is not None:
            data = importance_dataset(strategy, experience, self.importance_data)
            if data is None or len(data) == 0:
                warnings.warn(
                    f"experience {exp_id} has no samples: importance pass skipped, ParameterChangePlugin state unchanged"
                )
                return
        tracker_before = self._tracker.state_dict() if self._tracker is not None else None
        try:  # anything that fails here leaves self._state (and the tracker) as it was
            importances, new_state = self._merge(self._estimate(strategy, model, params, data), named)
        except BaseException:
            if tracker_before is not None:
                self._tracker.load_state_dict(tracker_before)
            raise
        elapsed = time.perf_counter() - start
        self._state = new_state
        self._penalty_state = None
        if self.keep_importance_data:
            self.kept_importances[int(exp_id)] = (
                importances.to("cpu") if isinstance(importances, KroneckerImportance)
                else {n: v.detach().to("cpu", copy=True) for n, v in importances.items()})
        if isinstance(importances, KroneckerImportance):  # the summaries read the blocks' diagonals
            importances = importances.diagonal_view(named)
        self._publish_importance_stats(strategy, importances, elapsed, exp_id)

    def _estimate(self, strategy, model: nn.Module, params: Dict[str, Tensor], data) -> Dict[str, Tensor]:
        """This task's importances of ``params`` by canonical name: the data pass on ``data`` (None
        for a trajectory estimator without one), then a trajectory estimator's path statistics,
        combined with it."""
        data_importance = None
        if data is not None:
            raw = raw_names(model)
            data_importance = compute_importance(
                model, data, self._data_pass,
                criterion=importance_criterion(strategy, self.criterion, self._data_pass.strategy_criterion),
                batch_size=self.batch_size or strategy.train_mb_size,
                num_samples=self.num_samples,
                device=strategy.device,
                names=[raw[n] for n in params],
                seed=self.seed + int(strategy.clock.train_exp_counter),
                chunk_size=self.chunk_size,
                output_transform=self.output_transform,
                policy=self.policy,
            )
            if isinstance(data_importance, KroneckerImportance):
                data_importance = data_importance.renamed(canonical_name)
            else:
                data_importance = {canonical_name(n): t for n, t in data_importance.items()}
        if self._tracker is None:
            return data_importance
        return self._tracker.importance(params, data_importance)

    def _merge(self, importances: Dict[str, Tensor], named: Dict[str, Tensor]):
        """``(importances, state)``: the importances scaled by ``importance_scale`` (and the running
        average's ``1 - decay``), and the current state with them consolidated, a new object (the
        current state is left as it is). Every parameter in ``named`` is an anchor candidate: online
        mode moves (and decays) entries that got no importance too."""
        scale = self.importance_scale
        if self.running_average and not self._state.empty:
            scale *= 1.0 - self.decay
        if scale != 1.0:
            importances = (importances.scaled(scale) if isinstance(importances, KroneckerImportance)
                           else {n: v * scale for n, v in importances.items()})
        return importances, self._state.consolidated(importances, named, estimator=self.importance_name)

    # ------------------------------------------------------------------ factor="auto"
    def _search_factor(self, strategy) -> None:
        """``factor="auto"``: choose this experience's factor by a short search on copies of the model,
        with the experience's own data only (:mod:`avalanche_pcreg.factor_search`)."""
        exp_id = experience_id(strategy)
        model = unwrap(strategy.model)
        optimizer = strategy.optimizer
        data = strategy.experience.dataset
        names_by_id = {id(p): canonical_name(n) for n, p in model.named_parameters()}
        steps = -(-len(data) // int(strategy.train_mb_size)) * int(getattr(strategy, "train_epochs", 1) or 1)
        states: dict = {}

        blocks = self._block_curvatures(optimizer)

        def state_for(factor: float):
            """The stored state at ``factor``; None where the penalty alone would make plain SGD
            unstable (a short phase may not show it; the search then passes over the factor)."""
            if factor not in states:
                unstable, _ = sgd_instability(optimizer, self._state.importances, names_by_id, factor, steps,
                                              self.importance_name, None, blocks)
                states[factor] = None if unstable else self._state
            return states[factor]

        result = search_factor(
            model, data, options=self.factor_search,
            make_optimizer=lambda copy: optimizer_like(optimizer, model, copy),
            criterion=strategy._criterion,
            penalty=lambda copy, f: state_for(f).penalty(named_parameters(copy), f, impl=self.impl),
            batch_size=int(strategy.train_mb_size),
            eval_batch_size=getattr(strategy, "eval_mb_size", None),
            device=strategy.device,
            seed=self.seed + int(strategy.clock.train_exp_counter),
            output_transform=self.output_transform,
            train_epochs=int(getattr(strategy, "train_epochs", 1) or 1),
            admissible=lambda f: state_for(f) is not None,
        )
        self.factor = result.factor
        self._search_record = result.record()
        if not result.met:
            warnings.warn(
                f"factor='auto': in experience {exp_id} no factor tried reached (1 - tol) * the plastic accuracy "
                f"= {result.threshold:.4f} on the held-out data (tried {[f'{f:.3g}' for f, _ in result.tried]}, "
                f"accuracies {[('SGD-unstable' if a is None else f'{a:.3f}') for _, a in result.tried]}); using the "
                f"smallest, {result.factor:.4g}. "
                "Raise FactorSearch(max_steps=...) or lower start_ratio", RuntimeWarning)
        x = int(strategy.clock.train_exp_counter)
        for name, value in (("factor", result.factor), ("search_plastic_accuracy", result.plastic_accuracy),
                            ("search_accuracy", result.accuracy)):
            publish(strategy, self, name, value, x)

    # ------------------------------------------------------------------ reporting
    def _publish_importance_stats(self, strategy, importances, elapsed, exp_id) -> None:
        stats = importance_stats(importances)
        # Only figures that a resumed run reproduces go through the evaluator; wall-clock time
        # stays in plugin.history.
        x = int(strategy.clock.train_exp_counter)
        for k, v in stats.items():
            publish(strategy, self, k, v, x)
        entry = {"experience": exp_id, **stats, "importance_time_s": elapsed, "state_bytes": self._state.nbytes()}
        if self.factor_search is not None:  # the factor this experience trained with, and how it was chosen
            entry["factor"] = self.factor
            if self._search_record is not None:
                entry["factor_search"], self._search_record = self._search_record, None
        self.history.append(entry)
