"""Experiment library behind ``pcreg-compare`` and the notebooks.

Compares the parameter-change plugin (L2, EWC with three per-sample Fisher variants, online EWC,
MAS, SI) against Avalanche 0.6's own ``EWCPlugin`` (separate and online), a naive fine-tuning
lower bound and a joint-training upper bound, on the benchmarks of :mod:`avalanche_pcreg.experiments.data`.

Protocol (the same for every method):

* every run trains with an Avalanche strategy (``Naive`` + plugins, or ``JointTraining``) and is
  scored with Avalanche's own metrics (``accuracy_metrics``, ``forgetting_metrics``,
  ``bwt_metrics`` in an ``EvaluationPlugin``). After training experience ``i`` the model is
  evaluated on the test experiences seen so far (``test_stream[:i+1]``), which gives the
  lower triangle of the accuracy matrix and Avalanche's stream accuracy over the seen
  experiences; after the last experience it is also evaluated on ``valid_stream``.
* ``make_benchmark(..., validation=0.2)``: 20 % of each class of the training data is held out
  (per seed) as the validation stream. All methods train on the remaining 80 %.
* the factor (``ewc_lambda`` for Avalanche, ``factor`` for ours; the same quantity) of each
  method is swept over its own log-spaced grid; every grid point is trained on every seed.
  The factor is chosen per (scenario, method) by the **mean validation accuracy after the
  last experience** (:func:`select_factor`), and the test figures of the runs at that factor
  are reported (mean +- std over seeds). The test stream plays no part in the choice.
* a seed fixes the benchmark (validation split, permutations), the model initialisation and the
  data order; every method sees the same seeds.

Every finished run is appended to ``<out>/runs.jsonl`` as it ends (:class:`ResultStore`); a rerun
skips the runs already there (matched by :func:`run_key`), so an interrupted sweep resumes and ends
with the same tables. ``Settings.device`` runs on a GPU (``"cuda"``) or picks one (``"auto"``).

A run that raises is recorded as failed, with its error (:func:`run_guarded`), and the sweep goes
on; the tables and figures name the failed cells. Methods known to fail in a scenario
(:attr:`Method.unsupported`) are left out of it with a note (:func:`left_out`).

The library functions are :func:`run_one` (one training run -> one row), :func:`plan_runs`,
:func:`execute` (optionally over a process pool), :func:`select_factor` /
:func:`select_factors`, :func:`summarize`, :func:`write_outputs`, :func:`make_plots` and the
all-in-one :func:`run_comparison`.
"""

from __future__ import annotations

import csv
import json
import math
import os
import threading
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from .catalog import (  # noqa: F401  (re-exported: the method table lives in catalog)
    DATASETS, DEFAULT_METHODS, DEVICES, METHODS, MODELS, ONLINE_DECAY, PRESETS, QUICK_METHODS, SCENARIOS,
    Method, method_grid, quick_grid, supported,
)

__all__ = [
    "METHODS",
    "DEFAULT_METHODS",
    "QUICK_METHODS",
    "SCENARIOS",
    "Method",
    "Settings",
    "RunSpec",
    "UserStream",
    "Comparison",
    "PRESETS",
    "method_grid",
    "make_plugins",
    "run_one",
    "run_guarded",
    "plan_runs",
    "left_out",
    "execute",
    "select_factor",
    "select_factors",
    "chosen_rows",
    "summarize",
    "format_summary",
    "format_notes",
    "format_costs",
    "write_outputs",
    "make_plots",
    "run_comparison",
    "resolve_device",
    "check_out_dir",
    "ResultStore",
    "run_key",
    "RESULT_COLUMNS",
]


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class Settings:
    """Everything a run needs besides (scenario, method, seed, factor).

    ``hidden=None`` / ``batch_size=None`` / ``model=None`` pick per dataset: an MLP 2 x 100 and
    batch 32 for the 8x8 digits; the literature setup, an MLP 2 x 400 and batch 128, for MNIST /
    Fashion-MNIST; the conv net (:func:`~avalanche_pcreg.experiments.data.make_model` ``kind="cnn"``,
    4 conv layers and 256 hidden units) and batch 128 for CIFAR. The optimizer is Adam (lr 1e-3)
    for every method. ``device``: ``"cpu"``, ``"cuda"`` (``"cuda:1"``, ...) or ``"auto"`` (cuda
    when available); see :func:`resolve_device`.
    """

    dataset: str = "digits"
    data_root: Optional[str] = None
    epochs: int = 5
    batch_size: Optional[int] = None
    lr: float = 1e-3
    hidden: Optional[int] = None
    layers: int = 2
    validation: float = 0.2
    n_experiences: int = 5
    max_train_per_class: Optional[int] = None
    eval_batch_size: int = 512
    max_test_per_class: Optional[int] = None
    model: Optional[str] = None
    device: str = "cpu"

    def resolved(self) -> "Settings":
        digits = self.dataset == "digits"
        model = self.model if self.model is not None else ("cnn" if self.dataset.startswith("cifar") else "mlp")
        hidden = self.hidden if self.hidden is not None else (
            256 if model == "cnn" else 100 if digits else 400)
        return replace(
            self, model=model, hidden=hidden,
            batch_size=self.batch_size if self.batch_size is not None else (32 if digits else 128),
        )

    def check(self) -> "Settings":
        if self.dataset not in DATASETS:
            raise ValueError(f"unknown dataset {self.dataset!r}; valid datasets: {', '.join(DATASETS)}")
        if self.dataset != "digits":
            if self.data_root is None:
                raise ValueError(f"dataset {self.dataset!r} needs data_root (a directory with its files)")
            if not Path(self.data_root).is_dir():
                raise FileNotFoundError(f"data_root {self.data_root!r} is not a directory")
        for name in ("epochs", "layers", "n_experiences", "eval_batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        for name in ("batch_size", "hidden", "max_train_per_class", "max_test_per_class"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"{name} must be a positive int or None, got {v!r}")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        if not (0.0 < float(self.validation) < 1.0):
            raise ValueError(f"validation must be a fraction in (0, 1): the factors are chosen on it; got {self.validation!r}")
        if self.model is not None and self.model not in MODELS:
            raise ValueError(f"model must be one of {', '.join(MODELS)} or None, got {self.model!r}")
        resolve_device(self.device)
        return self


def resolve_device(device: str) -> str:
    """``"auto"`` -> ``"cuda"`` when torch sees a CUDA device, else ``"cpu"``; ``"cpu"`` as is;
    ``"cuda"`` / ``"cuda:N"`` checked to exist. A ValueError, before any training, otherwise."""
    if not isinstance(device, str):
        raise TypeError(f"device must be a str ('auto', 'cpu', 'cuda' or 'cuda:N'), got {type(device).__name__}")
    d = device.strip().lower()
    if d == "cpu":
        return "cpu"
    if d != "auto" and d != "cuda" and not (d.startswith("cuda:") and d[5:].isdigit()):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    import torch

    available = torch.cuda.is_available()
    if d == "auto":
        return "cuda" if available else "cpu"
    if not available:
        raise ValueError(f"device {device!r} was asked for but torch sees no CUDA device "
                         f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'}); "
                         "use device 'cpu' or 'auto'")
    if ":" in d and int(d[5:]) >= torch.cuda.device_count():
        raise ValueError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) visible")
    return d


@dataclass(frozen=True, eq=False)
class UserStream:
    """Your own Avalanche benchmark as a scenario of :func:`run_comparison` (next to or instead of
    the built-in scenario names).

    ``benchmark``: any Avalanche benchmark with ``train_stream`` and ``test_stream``; its
    ``valid_stream`` chooses the factors, or, where it has none, ``validation`` (a fraction) of each
    training experience is held out, seeded per run (Avalanche's ``benchmark_with_validation_stream``).
    ``model_factory()`` returns a fresh model; it is called after the run's seed is set, so each
    seed gets its own initialisation and every method the same one. ``name`` labels the tables and
    figures. With ``workers > 1`` the stream travels to worker processes: ``model_factory`` must
    then be picklable (a module-level function, not a lambda), or pass ``workers=1``.
    """

    name: str
    benchmark: Any
    model_factory: Callable[[], Any]
    validation: float = 0.2

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name or self.name in SCENARIOS:
            raise ValueError(f"UserStream name must be a non-empty str other than the built-in scenarios "
                             f"{', '.join(SCENARIOS)}; got {self.name!r}")
        for attr in ("train_stream", "test_stream"):
            if not hasattr(self.benchmark, attr):
                raise TypeError(f"UserStream {self.name!r}: benchmark must be an Avalanche benchmark with "
                                f"{attr}; got {type(self.benchmark).__name__}")
        if not callable(self.model_factory):
            raise TypeError(f"UserStream {self.name!r}: model_factory must be a callable () -> nn.Module, "
                            f"got {type(self.model_factory).__name__}")
        if not hasattr(self.benchmark, "valid_stream") and not 0.0 < float(self.validation) < 1.0:
            raise ValueError(f"UserStream {self.name!r}: validation must be a fraction in (0, 1) for a benchmark "
                             f"without valid_stream, got {self.validation!r}")

    def benchmark_for(self, seed: int):
        """The benchmark with a validation stream (split off with ``seed`` where it has none)."""
        if hasattr(self.benchmark, "valid_stream"):
            return self.benchmark
        from avalanche.benchmarks.scenarios.validation_scenario import benchmark_with_validation_stream

        return benchmark_with_validation_stream(self.benchmark, validation_size=float(self.validation),
                                                shuffle=True, seed=int(seed))


Scenario = Union[str, UserStream]


def scenario_name(scenario: Scenario) -> str:
    return scenario.name if isinstance(scenario, UserStream) else scenario


@dataclass(frozen=True)
class RunSpec:
    scenario: str
    method: str
    seed: int
    factor: Optional[float]
    settings: Settings
    stream: Optional[UserStream] = None  # a user's benchmark and model (scenario is then its name)


def run_key(spec: RunSpec) -> str:
    """The identity of a run in a results file: scenario, method, seed, factor and every setting
    that changes its numbers (not the data directory, the device or the evaluation batch size)."""
    s = asdict(spec.settings.resolved())
    for k in ("data_root", "device", "eval_batch_size"):
        s.pop(k, None)
    key = {"scenario": spec.scenario, "method": spec.method, "seed": int(spec.seed), "factor": spec.factor,
           "settings": s}
    if spec.stream is not None:  # the data and model are the user's: the dataset settings do not apply
        for k in ("dataset", "n_experiences", "max_train_per_class", "max_test_per_class", "hidden", "layers",
                  "model", "validation"):
            s.pop(k, None)
        key["stream"] = {"name": spec.stream.name, "validation": float(spec.stream.validation)}
    return json.dumps(key, sort_keys=True)


# --------------------------------------------------------------------------- one run


@lru_cache(maxsize=12)
def _benchmark(scenario, dataset, data_root, seed, validation, n_experiences, max_train_per_class,
               max_test_per_class=None):
    from .data import make_benchmark

    return make_benchmark(
        scenario, dataset, n_experiences=n_experiences, seed=seed, validation=validation,
        data_root=data_root, max_train_per_class=max_train_per_class, max_test_per_class=max_test_per_class,
    )


def _step_timer_cls():
    from avalanche.core import SupervisedPlugin

    class StepTimer(SupervisedPlugin):
        """Wall time of each training iteration (forward, loss + penalty, backward, update)."""

        def __init__(self):
            super().__init__()
            self.per_exp: List[List[float]] = []
            self._t = 0.0

        def before_training_exp(self, strategy, *a, **kw):
            self.per_exp.append([])

        def before_training_iteration(self, strategy, *a, **kw):
            self._t = time.perf_counter()

        def after_training_iteration(self, strategy, *a, **kw):
            self.per_exp[-1].append(time.perf_counter() - self._t)

    return StepTimer


def _timed_after_training_exp(plugin, sink: List[float]):
    """Wrap an Avalanche plugin's ``after_training_exp`` (where EWCPlugin computes importances)
    so that its duration is recorded, like our plugin's ``history[...]['importance_time_s']``."""
    inner = plugin.after_training_exp

    def after_training_exp(strategy, *a, **kw):
        t = time.perf_counter()
        out = inner(strategy, *a, **kw)
        sink.append(time.perf_counter() - t)
        return out

    plugin.after_training_exp = after_training_exp
    return plugin


def make_plugins(method: str, factor: Optional[float], seed: int = 0):
    """The regularization plugin of ``method`` at ``factor`` (a list: empty for naive/joint)."""
    m = METHODS[method]
    if m.kind in ("naive", "joint"):
        return []
    if factor is None and m.kind == "pcreg" and m.options.get("factor") == "auto":
        from ..plugin import ParameterChangePlugin

        return [ParameterChangePlugin(seed=seed, **m.options)]  # the factor is chosen per experience
    if factor is None:
        raise ValueError(f"method {method!r} needs a factor")
    if m.kind == "avalanche":
        from avalanche.training import plugins

        return [getattr(plugins, m.plugin)(ewc_lambda=float(factor), **m.options)]
    from ..plugin import ParameterChangePlugin

    return [ParameterChangePlugin(float(factor), seed=seed, **m.options)]


def _metric_at(metrics: dict, prefix: str, x: int) -> float:
    """The value of the metric whose name starts with ``prefix`` recorded at x position ``x``.

    Avalanche 0.6 names stream metrics after the task label of the last experience evaluated
    (``.../Task004``), so the key is found by prefix; x is the strategy's training-iteration
    count, which differs for every evaluation point of a stream."""
    found = []
    for name, (xs, vs) in metrics.items():
        if name.startswith(prefix):
            found += [v for xx, v in zip(xs, vs) if xx == x]
    if len(found) != 1:
        raise RuntimeError(f"expected one value of {prefix}* at x={x}, found {len(found)}")
    return float(found[0])


def _series(metrics: dict, prefix: str) -> Dict[int, float]:
    out = {}
    for name, (xs, vs) in metrics.items():
        if name.startswith(prefix):
            for xx, v in zip(xs, vs):
                out[int(xx)] = float(v)
    return out


def regularizer_nbytes(plugin) -> int:
    """Bytes of tensors the regularizer keeps between experiences: our plugin's consolidated
    state, or Avalanche ``EWCPlugin``'s ``saved_params`` and ``importances`` (every stored experience)."""
    if hasattr(plugin, "state") and hasattr(plugin.state, "nbytes"):
        return int(plugin.state.nbytes())
    total = 0
    for store in (getattr(plugin, "saved_params", {}), getattr(plugin, "importances", {})):
        for per_exp in store.values():
            for v in per_exp.values():
                t = getattr(v, "data", v)
                total += int(t.numel() * t.element_size())
    return total


def _progress_plugin_cls():
    from avalanche.core import SupervisedPlugin

    class Progress(SupervisedPlugin):
        """Calls ``report(text)`` after each training epoch: experience and epoch counters."""

        def __init__(self, report, n_exp: int, epochs: int):
            super().__init__()
            self.report, self.n_exp, self.epochs = report, n_exp, epochs
            self.exp = 0

        def before_training_exp(self, strategy, *a, **kw):
            self.exp += 1

        def after_training_epoch(self, strategy, *a, **kw):
            ep = int(strategy.clock.train_exp_epochs) + 1
            self.report(f"exp {self.exp}/{self.n_exp} epoch {min(ep, self.epochs)}/{self.epochs}")

    return Progress


def run_one(spec: RunSpec, report=None) -> Dict[str, Any]:
    """Train one (scenario, method, seed, factor) with Avalanche and return its row.

    Row keys: see :data:`RESULT_COLUMNS`, plus ``acc_matrix`` (rows: after training experience
    i; columns: test experience j <= i; from Avalanche's ``Top1_Acc_Exp``), ``acc_curve``
    (Avalanche's ``Top1_Acc_Stream`` over the seen test experiences after each experience),
    ``step_time_per_exp_s``, ``importance_time_per_exp_s`` and ``reg_bytes_per_exp`` (the
    regularizer's stored tensors after each experience, :func:`regularizer_nbytes`).
    ``report``: an optional callable given a short progress text after each training epoch.
    """
    import torch
    from avalanche.evaluation.metrics import accuracy_metrics, bwt_metrics, forgetting_metrics
    from avalanche.training.plugins import EvaluationPlugin
    from avalanche.training.supervised import JointTraining, Naive

    from .data import make_model

    s = spec.settings.resolved()
    device = resolve_device(s.device)
    m = METHODS[spec.method]
    if m.tuned and spec.factor is None:
        raise ValueError(f"method {spec.method!r} needs a factor")
    t_start = time.perf_counter()
    if spec.stream is not None:
        bm = spec.stream.benchmark_for(int(spec.seed))
        torch.manual_seed(int(spec.seed))
        np.random.seed(int(spec.seed) % (2 ** 32))
        model = spec.stream.model_factory()
    else:
        bspec = _benchmark(spec.scenario, s.dataset, s.data_root, int(spec.seed), float(s.validation),
                           s.n_experiences, s.max_train_per_class, s.max_test_per_class)
        bm = bspec.benchmark
        torch.manual_seed(int(spec.seed))
        np.random.seed(int(spec.seed) % (2 ** 32))
        model = make_model(bspec, hidden=s.hidden, layers=s.layers, kind=s.model)
    with warnings.catch_warnings():  # "No loggers specified": metrics are read from the evaluator
        warnings.simplefilter("ignore", UserWarning)
        evaluator = EvaluationPlugin(
            accuracy_metrics(experience=True, stream=True),
            forgetting_metrics(experience=True, stream=True),
            bwt_metrics(experience=True, stream=True),
            loggers=[],
        )
    plugins = make_plugins(spec.method, spec.factor, seed=int(spec.seed))
    imp_times: List[float] = []
    if m.kind == "avalanche":
        _timed_after_training_exp(plugins[0], imp_times)
    timer = _step_timer_cls()()
    extra = [timer]
    if report is not None:
        extra.append(_progress_plugin_cls()(report, 1 if m.kind == "joint" else len(bm.train_stream), s.epochs))
    common = dict(
        model=model, optimizer=torch.optim.Adam(model.parameters(), lr=s.lr),
        criterion=torch.nn.CrossEntropyLoss(), train_mb_size=s.batch_size, train_epochs=s.epochs,
        eval_mb_size=s.eval_batch_size, device=device, plugins=[*plugins, *extra], evaluator=evaluator,
    )
    rows_x: List[int] = []
    reg_bytes: List[int] = []
    n_exp = len(bm.train_stream)
    if m.kind == "joint":
        strategy = JointTraining(**common)
        strategy.train(bm.train_stream)
        strategy.eval(bm.test_stream)
        rows_x.append(int(strategy.clock.train_iterations))
    else:
        strategy = Naive(**common)
        for i, exp in enumerate(bm.train_stream):
            strategy.train(exp)
            reg_bytes.append(regularizer_nbytes(plugins[0]) if plugins else 0)
            strategy.eval(bm.test_stream[: i + 1])
            rows_x.append(int(strategy.clock.train_iterations))
    # validation last: Avalanche's forgetting metrics key experiences by id only, so evaluating
    # valid_stream earlier would overwrite the test stream's reference accuracies
    strategy.eval(bm.valid_stream)
    metrics = evaluator.get_all_metrics()
    x_last = rows_x[-1]

    acc_test = _metric_at(metrics, "Top1_Acc_Stream/eval_phase/test_stream", x_last)
    acc_valid = _metric_at(metrics, "Top1_Acc_Stream/eval_phase/valid_stream", x_last)
    if m.kind == "joint":
        # one training phase: Avalanche would report forgetting 0 over experience 0 only
        forgetting = bwt = float("nan")
    else:
        forgetting = _metric_at(metrics, "StreamForgetting/eval_phase/test_stream", x_last)
        bwt = _metric_at(metrics, "StreamBWT/eval_phase/test_stream", x_last)

    matrix = [[float("nan")] * n_exp for _ in rows_x]
    for name, (xs, vs) in metrics.items():
        if name.startswith("Top1_Acc_Exp/eval_phase/test_stream/"):
            j = int(name.rsplit("/Exp", 1)[1])
            for xx, v in zip(xs, vs):
                if xx in rows_x:
                    matrix[rows_x.index(xx)][j] = float(v)
    curve_map = _series(metrics, "Top1_Acc_Stream/eval_phase/test_stream")
    curve = [curve_map[x] for x in rows_x]

    steps = [t for exp_steps in timer.per_exp for t in exp_steps]
    step_per_exp = [float(np.mean(e)) if e else float("nan") for e in timer.per_exp]
    if m.kind == "pcreg":
        imp_times = [float(h["importance_time_s"]) for h in plugins[0].history]
    wall = time.perf_counter() - t_start
    return {
        "scenario": spec.scenario,
        "dataset": s.dataset if spec.stream is None else spec.stream.name,
        "method": spec.method,
        "seed": int(spec.seed),
        "factor": None if spec.factor is None else float(spec.factor),
        "chosen_factor": None,
        "avg_accuracy": acc_test,
        "avg_forgetting": forgetting,
        "bwt": bwt,
        "valid_accuracy": acc_valid,
        "wall_time_s": wall,
        "mean_step_time_s": float(np.mean(steps)) if steps else float("nan"),
        "importance_time_s": float(np.sum(imp_times)) if m.kind in ("pcreg", "avalanche") else float("nan"),
        "train_iterations": int(x_last),
        "acc_matrix": matrix,
        "acc_curve": curve,
        "step_time_per_exp_s": step_per_exp,
        "importance_time_per_exp_s": [float(t) for t in imp_times],
        "reg_bytes_per_exp": reg_bytes,
        "n_experiences": n_exp,
        "device": device,
    }


# --------------------------------------------------------------------------- many runs


def plan_runs(
    scenarios: Sequence[Scenario],
    methods: Sequence[str],
    seeds: Sequence[int],
    settings: Settings,
    grids: Optional[Mapping[str, Sequence[Optional[float]]]] = None,
    points_per_decade: int = 1,
) -> List[RunSpec]:
    """Every (scenario, method, factor, seed) to train, the longest (permuted) first.

    ``grids`` overrides the factor grid of some methods (``{name: [factors]}``). A method is not
    planned in the scenarios it is known to fail in (:func:`left_out` lists them). A
    :class:`UserStream` is a scenario too.
    """
    check_names(scenarios, methods)
    if not seeds:
        raise ValueError("seeds must not be empty")
    grids = dict(grids or {})
    for name in grids:
        if name not in METHODS:
            raise ValueError(f"grids: unknown method {name!r}; valid methods: {', '.join(METHODS)}")
    plan = []
    rank = _scenario_ranks(scenarios)
    order = sorted(scenarios, key=lambda sc: (scenario_name(sc) != "permuted", rank[scenario_name(sc)]))
    for scenario in order:
        sc = scenario_name(scenario)
        stream = scenario if isinstance(scenario, UserStream) else None
        for seed in seeds:
            for meth in methods:
                if supported(sc, meth) is not None:
                    continue
                grid = grids.get(meth) if meth in grids else method_grid(meth, points_per_decade)
                if METHODS[meth].tuned and (not grid or any(f is None for f in grid)):
                    raise ValueError(f"grids[{meth!r}] must be a non-empty list of factors")
                for f in grid:
                    plan.append(RunSpec(sc, meth, int(seed), None if f is None else float(f), settings, stream))
    return plan


def _scenario_ranks(scenarios: Sequence[Scenario]) -> Dict[str, int]:
    """Table order: the built-in scenarios in their order, then the user's streams as given."""
    names = dict.fromkeys([*SCENARIOS, *(scenario_name(sc) for sc in scenarios)])
    return {n: i for i, n in enumerate(names)}


def left_out(scenarios: Sequence[Scenario], methods: Sequence[str]) -> List[Dict[str, str]]:
    """The (scenario, method) cells :func:`plan_runs` leaves out, each with the reason."""
    names = [scenario_name(sc) for sc in scenarios]
    return [{"scenario": sc, "method": me, "reason": supported(sc, me)}
            for sc in names for me in methods if supported(sc, me) is not None]


def check_names(scenarios: Sequence[Scenario], methods: Sequence[str]) -> None:
    if not scenarios:
        raise ValueError("scenarios must not be empty")
    if not methods:
        raise ValueError("methods must not be empty")
    seen = set()
    for sc in scenarios:
        if not isinstance(sc, UserStream) and sc not in SCENARIOS:
            raise ValueError(f"unknown scenario {sc!r}; valid scenarios: {', '.join(SCENARIOS)}, "
                             "or a UserStream (your own benchmark and model)")
        if scenario_name(sc) in seen:
            raise ValueError(f"scenario {scenario_name(sc)!r} given twice")
        seen.add(scenario_name(sc))
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"unknown method {m!r}; valid methods: {', '.join(METHODS)}")


def _worker_init(progress_queue=None):
    import signal

    import torch

    # Ctrl-C reaches the whole process group: the parent stops the pool; a worker that took the
    # interrupt itself would print its traceback ("Process SpawnPoolWorker-N: ...") on the way out
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    global _PROGRESS_QUEUE
    _PROGRESS_QUEUE = progress_queue


_PROGRESS_QUEUE = None

# Set by an interrupt handler (the CLI's SIGINT handler): :func:`execute` stops before the next run
# even when the KeyboardInterrupt itself was swallowed (raised inside a finalizer, for instance).
STOP = threading.Event()


def failed(row: Mapping[str, Any]) -> bool:
    """Whether ``row`` records a run that raised (see :func:`run_guarded`)."""
    return row.get("status") == "failed"


def run_guarded(spec: RunSpec, report=None) -> Dict[str, Any]:
    """:func:`run_one`, with a run that raises recorded as a failed row instead of ending the sweep:
    ``status`` ``"failed"``, ``error`` (the exception's type and message), NaN figures. An interrupt
    (KeyboardInterrupt) still ends the sweep."""
    t0 = time.perf_counter()
    try:
        return {**run_one(spec, report=report), "status": "ok"}
    except Exception as e:  # any failure of one run: record it, go on with the others
        msg = " ".join(str(e).split())
        return {
            "scenario": spec.scenario, "method": spec.method,
            "dataset": spec.settings.dataset if spec.stream is None else spec.stream.name,
            "seed": int(spec.seed), "factor": None if spec.factor is None else float(spec.factor),
            "chosen_factor": None, "status": "failed",
            "error": f"{type(e).__name__}: {msg}"[:500],
            **{k: float("nan") for k in ("avg_accuracy", "avg_forgetting", "bwt", "valid_accuracy",
                                         "mean_step_time_s", "importance_time_s")},
            "wall_time_s": time.perf_counter() - t0,
        }


def _run_indexed(item):
    i, spec = item
    q = _PROGRESS_QUEUE
    report = None if q is None else (lambda text: q.put((i, text)))
    return i, run_guarded(spec, report=report)


def _describe(spec: RunSpec) -> str:
    f = "" if spec.factor is None else f" factor={spec.factor:.3g}"
    return f"{spec.scenario} {spec.method} seed={spec.seed}{f}"


def execute(plan: Sequence[RunSpec], workers: Optional[int] = None, progress: bool = True,
            desc: str = "runs", on_row=None) -> List[Dict[str, Any]]:
    """Run every spec of ``plan`` and return the rows in plan order.

    ``workers``: processes (None: one per CPU core, at most len(plan)); 1 runs in this process.
    Each worker process uses one torch thread. On a CUDA device the runs go one after the other
    in this process (``workers`` is ignored: one GPU is shared, not split). ``progress`` shows a
    tqdm bar over runs and, under it, the experience and epoch of the runs in progress.
    ``on_row(spec, row)`` is called as each run finishes (the results file appends it there), so
    an interrupted sweep keeps every finished run. A run that raises gives a failed row
    (:func:`run_guarded`) and the others go on.
    """
    from tqdm.auto import tqdm

    plan = list(plan)
    if workers is None:
        workers = os.cpu_count() or 1
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive int or None, got {workers!r}")
    if plan and resolve_device(plan[0].settings.device) != "cpu":
        workers = 1
    workers = max(1, min(workers, len(plan) or 1))
    rows: List[Optional[dict]] = [None] * len(plan)
    bar = tqdm(total=len(plan), desc=desc, disable=not progress, unit="run", dynamic_ncols=True)
    inner = tqdm(total=0, bar_format="{desc}", disable=not progress, position=1, leave=False)
    current: Dict[int, str] = {}

    def show(i, text):
        current[i] = f"{_describe(plan[i])}: {text}"
        inner.set_description_str("  " + " | ".join(current[k] for k in sorted(current))[:200])

    def done(i, row):
        rows[i] = row
        current.pop(i, None)
        if on_row is not None:
            on_row(plan[i], row)
        bar.update(1)

    try:
        if workers == 1:
            import torch

            threads = torch.get_num_threads()
            # one thread, as in the worker processes: step times comparable across --workers
            torch.set_num_threads(1)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    for i, spec in enumerate(plan):
                        if STOP.is_set():
                            raise KeyboardInterrupt
                        show(i, "starting")
                        done(i, run_guarded(spec, report=(lambda t, i=i: show(i, t)) if progress else None))
            finally:
                torch.set_num_threads(threads)
        else:
            import multiprocessing as mp
            import queue as _queue

            ctx = mp.get_context("spawn")  # no fork after torch initialised its thread pools
            q = ctx.Manager().Queue() if progress else None
            with ctx.Pool(workers, initializer=_worker_init, initargs=(q,)) as pool:
                it = pool.imap_unordered(_run_indexed, list(enumerate(plan)), chunksize=1)
                remaining = len(plan)
                while remaining:
                    if STOP.is_set():
                        raise KeyboardInterrupt
                    try:
                        i, row = it.next(timeout=0.5)
                    except mp.TimeoutError:
                        pass
                    else:
                        done(i, row)
                        remaining -= 1
                    while q is not None:
                        try:
                            j, text = q.get_nowait()
                        except _queue.Empty:
                            break
                        if rows[j] is None:
                            show(j, text)
    finally:
        inner.close()
        bar.close()
    return rows  # type: ignore[return-value]


# --------------------------------------------------------------------------- results file


def check_out_dir(out: str | os.PathLike) -> Path:
    """Make sure ``out`` is (or can be made) a writable directory, before any training.

    Raises ValueError naming the path: a file in the way, or no permission to create or write."""
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise ValueError(f"out: {str(out)!r} exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"out: cannot write to {str(out)!r}: {e.strerror or e}") from None
    return out


class ResultStore:
    """``runs.jsonl``: one JSON line per finished run (its :func:`run_key` and row), appended and
    flushed to disk as each run finishes. A line cut short by a kill is dropped on load."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def load(self) -> Dict[str, Dict[str, Any]]:
        out: Dict[str, Dict[str, Any]] = {}
        if not self.path.is_file():
            return out
        good = []
        with open(self.path, "r") as f:
            for line in f:
                if not line.endswith("\n"):
                    break  # a write cut short (the process was killed): rerun that run
                try:
                    rec = json.loads(line)
                    out[rec["key"]] = _unclean(rec["row"])
                except (ValueError, KeyError, TypeError):
                    raise ValueError(f"{self.path}: unreadable line {len(good) + 1}; "
                                     "remove it (or the file) to rerun those runs") from None
                good.append(line)
        if sum(len(l) for l in good) != self.path.stat().st_size:
            with open(self.path, "w") as f:  # drop the partial last line
                f.writelines(good)
        return out

    def append(self, key: str, row: Mapping[str, Any]) -> None:
        line = json.dumps({"key": key, "row": _clean(dict(row))}) + "\n"
        with open(self.path, "a") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    def clear(self) -> None:
        if self.path.exists():
            self.path.unlink()


def _unclean(v):
    """Inverse of :func:`_clean` for rows: None -> NaN in the float columns."""
    if isinstance(v, dict):
        out = {k: _unclean(x) for k, x in v.items()}
        for k in ("avg_accuracy", "avg_forgetting", "bwt", "valid_accuracy", "wall_time_s",
                  "mean_step_time_s", "importance_time_s"):
            if k in out and out[k] is None:
                out[k] = float("nan")
        return out
    if isinstance(v, list):
        return [float("nan") if x is None else _unclean(x) for x in v]
    return v


# --------------------------------------------------------------------------- factor selection


TIE_TOL = 1e-9


def select_factor(factors: Sequence[float], scores: Sequence[Sequence[float]]) -> Tuple[float, int, float]:
    """The factor with the highest mean score.

    ``scores[k]`` are the validation accuracies (one per seed) at ``factors[k]``. NaN scores
    are ignored; ties go to the first (smallest, for a sorted grid) factor. Returns
    ``(factor, index, mean score)``.
    """
    if len(factors) != len(scores):
        raise ValueError(f"factors and scores differ in length: {len(factors)} != {len(scores)}")
    if not factors:
        raise ValueError("factors must not be empty")
    means = []
    for s in scores:
        a = np.asarray(list(s), dtype=float)
        a = a[~np.isnan(a)]
        means.append(float(a.mean()) if a.size else float("nan"))
    means_arr = np.asarray(means)
    if np.all(np.isnan(means_arr)):
        raise ValueError("every score is NaN: nothing to select")
    best = np.nanmax(means_arr)
    # ties (up to rounding of the means) go to the first factor
    k = int(np.flatnonzero(means_arr >= best - TIE_TOL)[0])
    return float(factors[k]), k, float(means_arr[k])


def select_factors(rows: Sequence[Mapping[str, Any]]) -> Dict[Tuple[str, str], Dict[str, Any]]:
    """Per (scenario, method): the factor chosen on mean validation accuracy.

    Values: ``factor`` (None for naive/joint), ``valid_accuracy`` (its mean), ``grid``,
    ``valid_by_factor`` (mean validation accuracy per grid point), ``test_by_factor`` (mean
    test accuracy, for the plots only), ``ties`` (how many grid points share the best mean
    validation accuracy; the smallest factor among them is chosen) and ``at_edge`` (the
    unique best is the smallest or largest point of a grid of >= 3 points: widen the grid).
    Failed runs (:func:`run_guarded`) take no part in the choice: ``n_failed`` counts them and
    ``errors`` lists their distinct errors; ``all_failed`` marks a cell with no finished run.
    """
    groups: Dict[Tuple[str, str], Dict[Optional[float], List[Mapping]]] = {}
    for r in rows:
        groups.setdefault((r["scenario"], r["method"]), {}).setdefault(r["factor"], []).append(r)
    out = {}
    for key, all_by_f in groups.items():
        bad = [r for rs in all_by_f.values() for r in rs if failed(r)]
        fails = {"n_failed": len(bad), "errors": sorted({r.get("error", "") for r in bad}),
                 "all_failed": False}
        by_f = {f: ok for f, rs in all_by_f.items() if (ok := [r for r in rs if not failed(r)])}
        if not by_f or None in by_f:
            rs = by_f.get(None, [])
            out[key] = {"factor": None,
                        "valid_accuracy": float(np.mean([r["valid_accuracy"] for r in rs])) if rs else float("nan"),
                        "grid": [], "valid_by_factor": [], "test_by_factor": [], "at_edge": False, "ties": 0,
                        **fails, "all_failed": not by_f}
            continue
        grid = sorted(by_f)
        f, k, v = select_factor(grid, [[r["valid_accuracy"] for r in by_f[g]] for g in grid])
        valid = [float(np.mean([r["valid_accuracy"] for r in by_f[g]])) for g in grid]
        ties = sum(1 for x in valid if x >= v - TIE_TOL)
        out[key] = {
            "factor": f,
            "valid_accuracy": v,
            "grid": grid,
            "valid_by_factor": valid,
            "test_by_factor": [float(np.mean([r["avg_accuracy"] for r in by_f[g]])) for g in grid],
            "at_edge": len(grid) >= 3 and k in (0, len(grid) - 1) and ties == 1,
            "ties": ties,
            **fails,
        }
    return out


def chosen_rows(rows: Sequence[Mapping[str, Any]], selection: Mapping) -> List[Dict[str, Any]]:
    """The finished rows at each (scenario, method)'s chosen factor, with ``chosen_factor`` filled in."""
    out = []
    for r in rows:
        sel = selection[(r["scenario"], r["method"])]
        if not failed(r) and not sel.get("all_failed") and r["factor"] == sel["factor"]:
            out.append({**r, "chosen_factor": sel["factor"]})
    return out


def _mean_std(vals: Sequence[float]) -> Tuple[float, float]:
    a = np.asarray(vals, dtype=float)
    if a.size == 0 or np.all(np.isnan(a)):
        return float("nan"), float("nan")
    a = a[~np.isnan(a)]
    return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else 0.0


def summarize(chosen: Sequence[Mapping[str, Any]], selection: Mapping) -> List[Dict[str, Any]]:
    """One dict per (scenario, method), in scenario then method order: test accuracy,
    forgetting and BWT mean and std (sample std over seeds), chosen factor, edge flag, times,
    and the failed runs of the cell (``n_failed``, ``errors``, ``all_failed``: no run finished)."""
    keys = [k for k in selection]
    rank = _scenario_ranks([k[0] for k in keys])
    keys.sort(key=lambda k: (rank[k[0]], list(METHODS).index(k[1])))
    out = []
    for sc, me in keys:
        rs = [r for r in chosen if r["scenario"] == sc and r["method"] == me]
        acc = _mean_std([r["avg_accuracy"] for r in rs])
        fgt = _mean_std([r["avg_forgetting"] for r in rs])
        bwt = _mean_std([r["bwt"] for r in rs])
        sel = selection[(sc, me)]
        out.append({
            "scenario": sc, "method": me, "label": METHODS[me].label, "n_seeds": len(rs),
            "acc_mean": acc[0], "acc_std": acc[1], "forgetting_mean": fgt[0], "forgetting_std": fgt[1],
            "bwt_mean": bwt[0], "bwt_std": bwt[1], "chosen_factor": sel["factor"],
            "valid_accuracy": sel["valid_accuracy"], "at_edge": sel["at_edge"], "ties": sel.get("ties", 0),
            "grid_min": sel["grid"][0] if sel["grid"] else None,
            "grid_max": sel["grid"][-1] if sel["grid"] else None,
            "mean_step_time_ms": 1e3 * _mean_std([r["mean_step_time_s"] for r in rs])[0],
            "importance_time_s": _mean_std([r["importance_time_s"] for r in rs])[0],
            "n_failed": sel.get("n_failed", 0), "errors": list(sel.get("errors", [])),
            "all_failed": bool(sel.get("all_failed", False)),
        })
    return out


def _fmt_factor(f) -> str:
    return "-" if f is None else f"{f:.3g}"


def format_summary(summary: Sequence[Mapping[str, Any]], markdown: bool = False) -> str:
    """The summary as a text (or Markdown) table: scenario, method, test accuracy mean +- std
    (the mean alone from one seed), forgetting, BWT, chosen factor (``*``: a unique best at a grid
    edge; ``~``: several factors tie on validation accuracy, the smallest is taken), step time.
    A cell where every run failed reads ``failed``; ``!`` after a method: some of its runs failed
    (:func:`format_notes` says which and why)."""
    head = ["scenario", "method", "test acc", "forgetting", "BWT", "factor", "step ms"]
    lines = []
    for s in summary:
        def pm(a, b, n=s["n_seeds"]):
            return "n/a" if math.isnan(a) else f"{a:.3f} ± {b:.3f}" if n > 1 else f"{a:.3f}"
        if s.get("all_failed"):
            lines.append([s["scenario"], s["method"] + "!", "failed", "-", "-", "-", "-"])
            continue
        lines.append([
            s["scenario"], s["method"] + ("!" if s.get("n_failed") else ""), pm(s["acc_mean"], s["acc_std"]),
            pm(s["forgetting_mean"], s["forgetting_std"]),
            "n/a" if math.isnan(s["bwt_mean"]) else f"{s['bwt_mean']:+.3f}",
            _fmt_factor(s["chosen_factor"]) + ("*" if s["at_edge"] else "") + ("~" if s.get("ties", 0) > 1 else ""),
            f"{s['mean_step_time_ms']:.2f}",
        ])
    if markdown:
        out = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
        out += ["| " + " | ".join(l) + " |" for l in lines]
        return "\n".join(out)
    widths = [max(len(h), *(len(l[i]) for l in lines)) if lines else len(h) for i, h in enumerate(head)]
    def row(cells):
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    out = [row(head), row(["-" * w for w in widths])]
    prev = None
    for l in lines:
        if prev is not None and l[0] != prev:
            out.append("")
        out.append(row(l))
        prev = l[0]
    return "\n".join(out)


def format_notes(summary: Sequence[Mapping[str, Any]], left: Sequence[Mapping[str, str]] = ()) -> List[str]:
    """One line per cell with failed runs (how many, and each distinct error) and per cell left out
    of the sweep (with the reason); empty when there are neither."""
    out = []
    for s in summary:
        if s.get("n_failed"):
            what = "every run failed" if s.get("all_failed") else f"{s['n_failed']} run(s) failed"
            out.append(f"! {s['scenario']}/{s['method']}: {what}: " + "; ".join(s.get("errors", [])))
    for c in left:
        out.append(f"left out: {c['scenario']}/{c['method']}: {c['reason']}")
    return out


COST_METHODS = ("avl-ewc", "pc-ewc", "avl-ewc-online", "pc-ewc-online")


def format_costs(chosen: Sequence[Mapping[str, Any]], markdown: bool = False) -> str:
    """Step time and stored state against the number of experiences, ours against Avalanche's EWC,
    from the runs of this sweep at their chosen factors (means over seeds): the mean training step
    during the first and the last experience, and the regularizer's bytes after the last. Empty
    when the sweep has none of :data:`COST_METHODS`."""
    head = ["scenario", "method", "step ms, exp 1", "step ms, last exp", "state kB after last"]
    lines = []
    for sc in _scenario_ranks([r["scenario"] for r in chosen]):
        for me in COST_METHODS:
            rs = [r for r in chosen if r["scenario"] == sc and r["method"] == me]
            if not rs:
                continue
            steps = np.nanmean(np.asarray([r["step_time_per_exp_s"] for r in rs], dtype=float), axis=0) * 1e3
            mem = float(np.mean([r["reg_bytes_per_exp"][-1] for r in rs])) / 1e3
            lines.append([sc, me, f"{steps[0]:.2f}", f"{steps[-1]:.2f} (exp {len(steps)})", f"{mem:.1f}"])
    if not lines:
        return ""
    if markdown:
        return "\n".join(["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
                         + ["| " + " | ".join(l) + " |" for l in lines])
    widths = [max(len(h), *(len(l[i]) for l in lines)) for i, h in enumerate(head)]
    return "\n".join("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
                     for cells in [head, ["-" * w for w in widths], *lines])


# --------------------------------------------------------------------------- outputs

RESULT_COLUMNS = [
    "scenario", "dataset", "method", "seed", "chosen_factor", "avg_accuracy", "avg_forgetting", "bwt",
    "valid_accuracy", "wall_time_s", "mean_step_time_s", "importance_time_s", "train_iterations",
]
SWEEP_COLUMNS = [c if c != "chosen_factor" else "factor" for c in RESULT_COLUMNS]


def _clean(v):
    """JSON-safe: NaN -> None, numpy scalars -> Python, recursively."""
    if isinstance(v, dict):
        return {str(k): _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    if isinstance(v, (np.floating, float)):
        return None if math.isnan(float(v)) else float(v)
    if isinstance(v, np.integer):
        return int(v)
    return v


def _csv_value(v):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return v


def _write_csv(path: Path, rows, columns) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(columns)
        for r in rows:
            w.writerow([_csv_value(r.get(c)) for c in columns])


@dataclass
class Comparison:
    """What :func:`run_comparison` returns."""

    rows: List[Dict[str, Any]]          # every run of the sweep
    selection: Dict[Tuple[str, str], Dict[str, Any]]
    chosen: List[Dict[str, Any]]        # the runs at each method's chosen factor
    summary: List[Dict[str, Any]]
    config: Dict[str, Any]
    files: List[str] = field(default_factory=list)
    wall_time_s: float = float("nan")


def write_outputs(result: Comparison, out: str | os.PathLike) -> List[str]:
    """``results.csv`` / ``results.json`` (one row per scenario x method x seed, at the chosen
    factor), ``sweep.csv`` (every run of the factor sweep) and ``summary.md``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = []
    _write_csv(out / "results.csv", result.chosen, RESULT_COLUMNS)
    _write_csv(out / "sweep.csv", result.rows, SWEEP_COLUMNS)
    sel = [{"scenario": k[0], "method": k[1], **v} for k, v in result.selection.items()]
    doc = {
        "config": result.config,
        "columns": RESULT_COLUMNS,
        "results": result.chosen,
        "summary": result.summary,
        "selection": sel,
        "sweep": result.rows,
        "wall_time_s": result.wall_time_s,
    }
    with open(out / "results.json", "w") as f:
        json.dump(_clean(doc), f, indent=1)
    with open(out / "summary.md", "w") as f:
        f.write(format_summary(result.summary, markdown=True) + "\n")
        notes = format_notes(result.summary, result.config.get("left_out", []))
        if notes:
            f.write("\n" + "\n".join(f"* {n}" for n in notes) + "\n")
        costs = format_costs(result.chosen, markdown=True)
        if costs:
            f.write("\nCost against the number of experiences (this sweep, one torch thread a run):\n\n"
                    + costs + "\n")
    files += [str(out / n) for n in ("results.csv", "results.json", "sweep.csv", "summary.md")]
    return files


from .figures import make_plots  # noqa: E402  (the figures live in their own module)


# --------------------------------------------------------------------------- all in one

def run_comparison(
    scenarios: Sequence[Scenario] = SCENARIOS,
    methods: Sequence[str] = DEFAULT_METHODS,
    seeds: Sequence[int] = (0, 1, 2),
    settings: Optional[Settings] = None,
    *,
    points_per_decade: int = 1,
    grids: Optional[Mapping[str, Sequence[float]]] = None,
    workers: Optional[int] = None,
    progress: bool = True,
    out: Optional[str | os.PathLike] = None,
    plots: bool = True,
    resume: bool = True,
    study: str = "compare",
    log=None,
    restart_hint: str = "resume=False",
) -> Comparison:
    """Sweep, select, summarize and (with ``out``) write results and plots.

    See the module docstring for the protocol. ``scenarios``: built-in scenario names and/or
    :class:`UserStream` objects (your own Avalanche benchmark and model factory; the settings'
    dataset, size and model options then do not apply to it). With ``out``, every finished run is appended to
    ``out/runs.jsonl`` as it completes; with ``resume`` (the default) runs already in that file
    (same :func:`run_key`) are not trained again, so rerunning an interrupted command finishes
    the sweep and gives the same tables as an uninterrupted one. ``resume=False`` starts the
    file afresh. ``study``: ``"compare"`` (the comparison's tables and figures), ``"long-stream"``
    or ``"fisher-variants"`` (their own tables and figures as well, see
    :mod:`avalanche_pcreg.experiments.studies`). ``log``: a callable for one-line messages
    (default ``print``); ``restart_hint``: how the resume message says to train everything again.
    A run that raises is recorded as failed and the sweep goes on (:func:`run_guarded`); methods
    known to fail in a scenario are left out of it (:func:`left_out`). Both are in the tables.
    """
    from .catalog import STUDIES

    log = print if log is None else log
    if study not in STUDIES:
        raise ValueError(f"unknown study {study!r}; valid studies: {', '.join(STUDIES)}")
    settings = (settings or Settings()).check()
    check_names(scenarios, methods)
    seeds = [int(s) for s in seeds]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct, got {seeds}")
    t0 = time.perf_counter()
    plan = plan_runs(scenarios, methods, seeds, settings, grids=grids, points_per_decade=points_per_decade)
    keys = [run_key(p) for p in plan]
    done: Dict[str, Dict[str, Any]] = {}
    store = None
    if out is not None:
        out = check_out_dir(out)
        store = ResultStore(out / "runs.jsonl")
        if not resume:
            store.clear()
        # failed runs are trained again: the cause may be gone
        done = {k: r for k, r in store.load().items() if not failed(r)}
        have = sum(k in done for k in keys)
        if have:
            log(f"{store.path}: {have} of {len(plan)} runs already done, skipping them "
                f"({restart_hint} trains them again)")
    todo = [i for i, k in enumerate(keys) if k not in done]
    new_rows = execute([plan[i] for i in todo], workers=workers, progress=progress,
                       on_row=(lambda spec, row: store.append(run_key(spec), row)) if store else None)
    rows = [done[k] if k in done else None for k in keys]
    for i, row in zip(todo, new_rows):
        rows[i] = row
    selection = select_factors(rows)
    chosen = chosen_rows(rows, selection)
    summary = summarize(chosen, selection)
    res = settings.resolved()
    config = {
        "study": study, "scenarios": [scenario_name(sc) for sc in scenarios],
        "user_streams": [sc.name for sc in scenarios if isinstance(sc, UserStream)], "methods": list(methods), "seeds": seeds,
        "settings": asdict(res), "points_per_decade": points_per_decade,
        "grids": {m: list(grids[m]) if grids and m in grids else method_grid(m, points_per_decade) for m in methods},
        "optimizer": f"Adam(lr={res.lr})", "online_decay": ONLINE_DECAY, "n_runs": len(plan),
        "n_runs_resumed": len(plan) - len(todo), "n_runs_failed": sum(failed(r) for r in rows),
        "left_out": left_out(scenarios, methods),
        "workers": workers, "selection": "argmax of mean validation accuracy after the last experience",
        "methods_description": {m: METHODS[m].description for m in methods},
        "methods_label": {m: METHODS[m].label for m in methods},
        "methods_options": {m: dict(METHODS[m].options) for m in methods},
    }
    result = Comparison(rows=rows, selection=selection, chosen=chosen, summary=summary, config=config)
    result.wall_time_s = time.perf_counter() - t0
    if out is not None:
        result.files = write_outputs(result, out)
        if plots:
            result.files += make_plots(result, out)
        if STUDIES[study].report != "comparison":
            from . import studies

            result.files += studies.write_study(result, out, STUDIES[study].report, plots=plots)
    return result
