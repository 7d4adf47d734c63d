"""Running: one training run, and a whole sweep (:func:`run_comparison`).

Compares the parameter-change plugin (L2, EWC with three per-sample Fisher variants, online EWC,
MAS, SI) against Avalanche 0.6's own ``EWCPlugin`` (separate and online), a naive fine-tuning
lower bound and a joint-training upper bound, on the benchmarks of :mod:`pcreg_experiments.data`.

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
  last experience** (:func:`~pcreg_experiments.selection.select_factor`), and the test figures of
  the runs at that factor are reported (mean +- std over seeds). The test stream plays no part in
  the choice.
* a seed fixes the benchmark (validation split, permutations), the model initialisation and the
  data order; every method sees the same seeds.

Every finished run is appended to ``<out>/runs.jsonl`` as it ends
(:class:`~pcreg_experiments.store.ResultStore`); a rerun skips the runs already there (matched by
:func:`~pcreg_experiments.store.run_key`), so an interrupted sweep resumes and ends with the same
tables. ``Settings.device`` runs on a GPU (``"cuda"``) or picks one (``"auto"``).

A run that raises is recorded as failed, with its error (:func:`run_guarded`), and the sweep goes
on; the tables and figures name the failed cells. Methods known to fail in a scenario
(:attr:`Method.unsupported`) are left out of it with a note (:func:`left_out`).

Here: :class:`Settings`, :class:`RunSpec`, :class:`UserStream`, :func:`run_one` (one training run
-> one row), :func:`run_guarded`, :func:`plan_runs` and the all-in-one :func:`run_comparison`. The
sweep's other parts each have a module: :mod:`~pcreg_experiments.pool` (``execute``: the runs, over a
process pool), :mod:`~pcreg_experiments.store` (the ``runs.jsonl`` file),
:mod:`~pcreg_experiments.selection` (the factor choice), :mod:`~pcreg_experiments.tables`
(``summarize``, the text tables and the output files) and :mod:`~pcreg_experiments.figures`.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from .catalog import DATASETS, DEFAULT_METHODS, METHODS, MODELS, ONLINE_DECAY, SCENARIOS, method_grid, supported

__all__ = [
    "Settings",
    "RunSpec",
    "UserStream",
    "Comparison",
    "make_plugins",
    "run_one",
    "run_guarded",
    "failed",
    "plan_runs",
    "left_out",
    "run_comparison",
    "resolve_device",
]


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class Settings:
    """Everything a run needs besides (scenario, method, seed, factor).

    ``hidden=None`` / ``batch_size=None`` / ``model=None`` pick per dataset: an MLP 2 x 100 and
    batch 32 for the 8x8 digits; the literature setup, an MLP 2 x 400 and batch 128, for MNIST /
    Fashion-MNIST; the conv net (:func:`~pcreg_experiments.data.make_model` ``kind="cnn"``,
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
        from avalanche_pcreg.plugin import ParameterChangePlugin

        return [ParameterChangePlugin(seed=seed, **m.options)]  # the factor is chosen per experience
    if factor is None:
        raise ValueError(f"method {method!r} needs a factor")
    if m.kind == "avalanche":
        from avalanche.training import plugins

        return [getattr(plugins, m.plugin)(ewc_lambda=float(factor), **m.options)]
    from avalanche_pcreg.plugin import ParameterChangePlugin

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

    Row keys: see :data:`~pcreg_experiments.tables.RESULT_COLUMNS`, plus ``acc_matrix`` (rows: after training experience
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


# --------------------------------------------------------------------------- all in one

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
    (same :func:`~pcreg_experiments.store.run_key`) are not trained again, so rerunning an interrupted command finishes
    the sweep and gives the same tables as an uninterrupted one. ``resume=False`` starts the
    file afresh. ``study``: ``"compare"`` (the comparison's tables and figures), ``"long-stream"``
    or ``"fisher-variants"`` (their own tables and figures as well, see
    :mod:`pcreg_experiments.studies`). ``log``: a callable for one-line messages
    (default ``print``); ``restart_hint``: how the resume message says to train everything again.
    A run that raises is recorded as failed and the sweep goes on (:func:`run_guarded`); methods
    known to fail in a scenario are left out of it (:func:`left_out`). Both are in the tables.
    """
    from .catalog import STUDIES
    from .pool import execute
    from .selection import chosen_rows, select_factors
    from .store import ResultStore, check_out_dir, run_key
    from .tables import summarize, write_outputs

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
            from .figures import make_plots

            result.files += make_plots(result, out)
        if STUDIES[study].report != "comparison":
            from . import studies

            result.files += studies.write_study(result, out, STUDIES[study].report, plots=plots)
    return result

