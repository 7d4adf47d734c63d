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
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from .data import DATASETS, SCENARIOS, make_benchmark, make_model

__all__ = [
    "METHODS",
    "DEFAULT_METHODS",
    "QUICK_METHODS",
    "SCENARIOS",
    "Method",
    "Settings",
    "RunSpec",
    "Comparison",
    "PRESETS",
    "method_grid",
    "make_plugins",
    "run_one",
    "plan_runs",
    "execute",
    "select_factor",
    "select_factors",
    "chosen_rows",
    "summarize",
    "format_summary",
    "write_outputs",
    "make_plots",
    "run_comparison",
    "RESULT_COLUMNS",
]


# --------------------------------------------------------------------------- methods


@dataclass(frozen=True)
class Method:
    """One compared method.

    ``kind``: ``"naive"`` (fine-tuning), ``"joint"`` (Avalanche ``JointTraining``),
    ``"avalanche-ewc"`` (Avalanche ``EWCPlugin``) or ``"pcreg"`` (our plugin).
    ``decades``: the log10 range ``(lo, hi)`` of its factor grid, None for no factor.
    ``options``: keyword arguments of the plugin.
    """

    name: str
    label: str
    kind: str
    decades: Optional[Tuple[int, int]]
    options: Mapping[str, Any] = field(default_factory=dict)
    description: str = ""

    @property
    def tuned(self) -> bool:
        return self.decades is not None


# online decay used by both online EWCs (Avalanche's and ours), so they compare like for like
ONLINE_DECAY = 0.9

_METHOD_LIST = [
    Method("naive", "Naive", "naive", None, {}, "fine-tuning, no regularization (lower bound)"),
    Method("avl-ewc", "Avalanche EWC", "avalanche-ewc", (1, 7), {"mode": "separate"},
           "Avalanche EWCPlugin, separate: one (F_t, theta*_t) per experience, minibatch Fisher"),
    Method("avl-ewc-online", "Avalanche online EWC", "avalanche-ewc", (1, 7),
           {"mode": "online", "decay_factor": ONLINE_DECAY},
           f"Avalanche EWCPlugin, online, decay_factor={ONLINE_DECAY}, minibatch Fisher"),
    Method("pc-l2", "ours L2", "pcreg", (-4, 2), {"importance": "uniform"},
           "ours, importance='uniform' (L2 towards the consolidated anchor)"),
    Method("pc-ewc", "ours EWC (emp. Fisher)", "pcreg", (-1, 5), {"importance": "empirical_fisher"},
           "ours, importance='empirical_fisher' (per-sample, true labels), separate (consolidated)"),
    Method("pc-ewc-fisher", "ours EWC (Fisher)", "pcreg", (-1, 5), {"importance": "fisher"},
           "ours, importance='fisher' (per-sample, labels sampled from the model)"),
    Method("pc-ewc-expected", "ours EWC (expected Fisher)", "pcreg", (-1, 5),
           {"importance": "expected_fisher"},
           "ours, importance='expected_fisher' (exact expectation over classes)"),
    Method("pc-ewc-online", "ours online EWC", "pcreg", (-1, 5),
           {"importance": "empirical_fisher", "mode": "online", "decay": ONLINE_DECAY},
           f"ours, importance='empirical_fisher', mode='online', decay={ONLINE_DECAY}"),
    Method("pc-mas", "ours MAS", "pcreg", (-4, 2), {"importance": "mas"}, "ours, importance='mas'"),
    Method("pc-si", "ours SI", "pcreg", (-1, 5), {"importance": "si", "mode": "online", "decay": 1.0},
           "ours, importance='si', mode='online', decay=1.0 (Zenke et al. 2017), xi=0.1"),
    Method("joint", "Joint (upper bound)", "joint", None, {},
           "Avalanche JointTraining on all experiences at once (upper bound)"),
]
METHODS: Dict[str, Method] = {m.name: m for m in _METHOD_LIST}
DEFAULT_METHODS: Tuple[str, ...] = tuple(METHODS)
QUICK_METHODS: Tuple[str, ...] = ("naive", "avl-ewc", "pc-ewc")


def method_grid(method: str | Method, points_per_decade: int = 1, decades: Optional[Tuple[float, float]] = None) -> List[Optional[float]]:
    """The factor grid of ``method``: ``points_per_decade`` log-spaced points a decade over
    its ``decades`` (or the given ``(lo, hi)`` log10 range), ends included. ``[None]`` for
    methods without a factor (naive, joint)."""
    m = METHODS[method] if isinstance(method, str) else method
    if not m.tuned:
        return [None]
    if isinstance(points_per_decade, bool) or not isinstance(points_per_decade, int) or points_per_decade < 1:
        raise ValueError(f"points_per_decade must be a positive int, got {points_per_decade!r}")
    lo, hi = decades if decades is not None else m.decades
    n = int(round((hi - lo) * points_per_decade)) + 1
    return [float(f"{v:.6g}") for v in np.logspace(lo, hi, n)]


def quick_grid(method: str | Method) -> List[Optional[float]]:
    """Two factors for smoke runs: one decade either side of the middle of the grid."""
    m = METHODS[method] if isinstance(method, str) else method
    if not m.tuned:
        return [None]
    mid = 0.5 * (m.decades[0] + m.decades[1])
    return [float(f"{10 ** (mid - 1):.6g}"), float(f"{10 ** (mid + 1):.6g}")]


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class Settings:
    """Everything a run needs besides (scenario, method, seed, factor).

    ``hidden=None`` / ``batch_size=None`` pick per dataset: 2 x 100 and batch 32 for the 8x8
    digits; the literature setup 2 x 400 and batch 128 for MNIST / Fashion-MNIST.
    The optimizer is Adam (lr 1e-3) for every method.
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

    def resolved(self) -> "Settings":
        digits = self.dataset == "digits"
        return replace(
            self,
            hidden=self.hidden if self.hidden is not None else (100 if digits else 400),
            batch_size=self.batch_size if self.batch_size is not None else (32 if digits else 128),
        )

    def check(self) -> "Settings":
        if self.dataset not in DATASETS:
            raise ValueError(f"unknown dataset {self.dataset!r}; valid datasets: {', '.join(DATASETS)}")
        if self.dataset != "digits":
            if self.data_root is None:
                raise ValueError(f"dataset {self.dataset!r} needs data_root (a directory with the IDX files)")
            if not Path(self.data_root).is_dir():
                raise FileNotFoundError(f"data_root {self.data_root!r} is not a directory")
        for name in ("epochs", "layers", "n_experiences", "eval_batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        for name in ("batch_size", "hidden", "max_train_per_class"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"{name} must be a positive int or None, got {v!r}")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        if not (0.0 < float(self.validation) < 1.0):
            raise ValueError(f"validation must be a fraction in (0, 1): the factors are chosen on it; got {self.validation!r}")
        return self


@dataclass(frozen=True)
class RunSpec:
    scenario: str
    method: str
    seed: int
    factor: Optional[float]
    settings: Settings


# --------------------------------------------------------------------------- one run


@lru_cache(maxsize=12)
def _benchmark(scenario, dataset, data_root, seed, validation, n_experiences, max_train_per_class):
    return make_benchmark(
        scenario, dataset, n_experiences=n_experiences, seed=seed, validation=validation,
        data_root=data_root, max_train_per_class=max_train_per_class,
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
    if factor is None:
        raise ValueError(f"method {method!r} needs a factor")
    if m.kind == "avalanche-ewc":
        from avalanche.training.plugins import EWCPlugin

        return [EWCPlugin(ewc_lambda=float(factor), **m.options)]
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


def run_one(spec: RunSpec) -> Dict[str, Any]:
    """Train one (scenario, method, seed, factor) with Avalanche and return its row.

    Row keys: see :data:`RESULT_COLUMNS`, plus ``acc_matrix`` (rows: after training experience
    i; columns: test experience j <= i; from Avalanche's ``Top1_Acc_Exp``), ``acc_curve``
    (Avalanche's ``Top1_Acc_Stream`` over the seen test experiences after each experience),
    ``step_time_per_exp_s`` and ``importance_time_per_exp_s``.
    """
    import torch
    from avalanche.evaluation.metrics import accuracy_metrics, bwt_metrics, forgetting_metrics
    from avalanche.training.plugins import EvaluationPlugin
    from avalanche.training.supervised import JointTraining, Naive

    s = spec.settings.resolved()
    m = METHODS[spec.method]
    if m.tuned and spec.factor is None:
        raise ValueError(f"method {spec.method!r} needs a factor")
    t_start = time.perf_counter()
    bspec = _benchmark(spec.scenario, s.dataset, s.data_root, int(spec.seed), float(s.validation),
                       s.n_experiences, s.max_train_per_class)
    bm = bspec.benchmark
    torch.manual_seed(int(spec.seed))
    np.random.seed(int(spec.seed) % (2 ** 32))
    model = make_model(bspec, hidden=s.hidden, layers=s.layers)
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
    if m.kind == "avalanche-ewc":
        _timed_after_training_exp(plugins[0], imp_times)
    timer = _step_timer_cls()()
    common = dict(
        model=model, optimizer=torch.optim.Adam(model.parameters(), lr=s.lr),
        criterion=torch.nn.CrossEntropyLoss(), train_mb_size=s.batch_size, train_epochs=s.epochs,
        eval_mb_size=s.eval_batch_size, device="cpu", plugins=[*plugins, timer], evaluator=evaluator,
    )
    rows_x: List[int] = []
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
        "dataset": s.dataset,
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
        "importance_time_s": float(np.sum(imp_times)) if m.kind in ("pcreg", "avalanche-ewc") else float("nan"),
        "train_iterations": int(x_last),
        "acc_matrix": matrix,
        "acc_curve": curve,
        "step_time_per_exp_s": step_per_exp,
        "importance_time_per_exp_s": [float(t) for t in imp_times],
    }


# --------------------------------------------------------------------------- many runs


def plan_runs(
    scenarios: Sequence[str],
    methods: Sequence[str],
    seeds: Sequence[int],
    settings: Settings,
    grids: Optional[Mapping[str, Sequence[Optional[float]]]] = None,
    points_per_decade: int = 1,
) -> List[RunSpec]:
    """Every (scenario, method, factor, seed) to train, the longest (permuted) first.

    ``grids`` overrides the factor grid of some methods (``{name: [factors]}``).
    """
    check_names(scenarios, methods)
    if not seeds:
        raise ValueError("seeds must not be empty")
    grids = dict(grids or {})
    for name in grids:
        if name not in METHODS:
            raise ValueError(f"grids: unknown method {name!r}; valid methods: {', '.join(METHODS)}")
    plan = []
    order = sorted(scenarios, key=lambda sc: (sc != "permuted", list(SCENARIOS).index(sc)))
    for sc in order:
        for seed in seeds:
            for meth in methods:
                grid = grids.get(meth) if meth in grids else method_grid(meth, points_per_decade)
                if METHODS[meth].tuned and (not grid or any(f is None for f in grid)):
                    raise ValueError(f"grids[{meth!r}] must be a non-empty list of factors")
                for f in grid:
                    plan.append(RunSpec(sc, meth, int(seed), None if f is None else float(f), settings))
    return plan


def check_names(scenarios: Sequence[str], methods: Sequence[str]) -> None:
    if not scenarios:
        raise ValueError("scenarios must not be empty")
    if not methods:
        raise ValueError("methods must not be empty")
    for sc in scenarios:
        if sc not in SCENARIOS:
            raise ValueError(f"unknown scenario {sc!r}; valid scenarios: {', '.join(SCENARIOS)}")
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"unknown method {m!r}; valid methods: {', '.join(METHODS)}")


def _worker_init():
    import torch

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")


def _run_indexed(item):
    i, spec = item
    return i, run_one(spec)


def execute(plan: Sequence[RunSpec], workers: Optional[int] = None, progress: bool = True,
            desc: str = "runs") -> List[Dict[str, Any]]:
    """Run every spec of ``plan`` and return the rows in plan order.

    ``workers``: processes (None: one per CPU core, at most len(plan)); 1 runs in this process.
    Each worker process uses one torch thread. ``progress`` shows a tqdm bar.
    """
    from tqdm.auto import tqdm

    plan = list(plan)
    if workers is None:
        workers = os.cpu_count() or 1
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive int or None, got {workers!r}")
    workers = max(1, min(workers, len(plan)))
    rows: List[Optional[dict]] = [None] * len(plan)
    bar = tqdm(total=len(plan), desc=desc, disable=not progress, unit="run", dynamic_ncols=True)
    try:
        if workers == 1:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                for i, spec in enumerate(plan):
                    rows[i] = run_one(spec)
                    bar.update(1)
        else:
            import multiprocessing as mp

            ctx = mp.get_context("spawn")  # no fork after torch initialised its thread pools
            with ctx.Pool(workers, initializer=_worker_init) as pool:
                for i, row in pool.imap_unordered(_run_indexed, list(enumerate(plan)), chunksize=1):
                    rows[i] = row
                    bar.update(1)
    finally:
        bar.close()
    return rows  # type: ignore[return-value]


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
    """
    groups: Dict[Tuple[str, str], Dict[Optional[float], List[Mapping]]] = {}
    for r in rows:
        groups.setdefault((r["scenario"], r["method"]), {}).setdefault(r["factor"], []).append(r)
    out = {}
    for key, by_f in groups.items():
        if None in by_f:
            rs = by_f[None]
            out[key] = {"factor": None, "valid_accuracy": float(np.mean([r["valid_accuracy"] for r in rs])),
                        "grid": [], "valid_by_factor": [], "test_by_factor": [], "at_edge": False, "ties": 0}
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
        }
    return out


def chosen_rows(rows: Sequence[Mapping[str, Any]], selection: Mapping) -> List[Dict[str, Any]]:
    """The rows at each (scenario, method)'s chosen factor, with ``chosen_factor`` filled in."""
    out = []
    for r in rows:
        sel = selection[(r["scenario"], r["method"])]
        if r["factor"] == sel["factor"]:
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
    forgetting and BWT mean and std (sample std over seeds), chosen factor, edge flag, times."""
    keys = []
    for r in chosen:
        k = (r["scenario"], r["method"])
        if k not in keys:
            keys.append(k)
    keys.sort(key=lambda k: (list(SCENARIOS).index(k[0]), list(METHODS).index(k[1])))
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
            "mean_step_time_ms": 1e3 * float(np.nanmean([r["mean_step_time_s"] for r in rs])),
            "importance_time_s": float(np.nanmean([r["importance_time_s"] for r in rs]))
            if any(not math.isnan(r["importance_time_s"]) for r in rs) else float("nan"),
        })
    return out


def _fmt_factor(f) -> str:
    return "-" if f is None else f"{f:.3g}"


def format_summary(summary: Sequence[Mapping[str, Any]], markdown: bool = False) -> str:
    """The summary as a text (or Markdown) table: scenario, method, test accuracy mean +- std,
    forgetting, BWT, chosen factor (``*``: a unique best at a grid edge; ``~``: several factors
    tie on validation accuracy, the smallest is taken), step time."""
    head = ["scenario", "method", "test acc", "forgetting", "BWT", "factor", "step ms"]
    lines = []
    for s in summary:
        def pm(a, b):
            return "n/a" if math.isnan(a) else f"{a:.3f} ± {b:.3f}"
        lines.append([
            s["scenario"], s["method"], pm(s["acc_mean"], s["acc_std"]),
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
    files += [str(out / n) for n in ("results.csv", "results.json", "sweep.csv", "summary.md")]
    return files


def _method_colors(methods: Sequence[str]) -> Dict[str, Any]:
    import matplotlib.pyplot as plt

    cmap = plt.get_cmap("tab20")
    return {m: cmap(i % 20) for i, m in enumerate(METHODS) if m in methods}


def make_plots(result: Comparison, out: str | os.PathLike, dpi: int = 90) -> List[str]:
    """PNG plots under ``out``:

    * ``acc_matrix_<scenario>.png``: accuracy-matrix heatmaps (mean over seeds) per method;
    * ``acc_over_experiences.png``: stream accuracy over the seen experiences after each one;
    * ``lambda_sweep.png``: mean validation accuracy vs factor, chosen factor marked;
    * ``final_accuracy.png``: final test accuracy, mean +- std over seeds.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = []
    chosen = result.chosen
    scenarios = [s for s in SCENARIOS if any(r["scenario"] == s for r in chosen)]
    methods = [m for m in METHODS if any(r["method"] == m for r in chosen)]
    colors = _method_colors(methods)

    def mean_matrix(sc, me):
        ms = [np.asarray(r["acc_matrix"], dtype=float) for r in chosen if r["scenario"] == sc and r["method"] == me]
        with warnings.catch_warnings():  # unseen experiences are NaN in every seed
            warnings.simplefilter("ignore", RuntimeWarning)
            return np.nanmean(np.stack(ms), axis=0) if ms else None

    # accuracy matrices
    for sc in scenarios:
        ms = [m for m in methods if m != "joint"]
        if not ms:
            continue
        ncol = min(4, len(ms))
        nrow = int(math.ceil(len(ms) / ncol))
        fig, axes = plt.subplots(nrow, ncol, figsize=(2.6 * ncol, 2.5 * nrow + 0.4), squeeze=False)
        for ax, me in zip(axes.flat, ms):
            mat = mean_matrix(sc, me)
            ax.imshow(np.ma.masked_invalid(mat), vmin=0, vmax=1, cmap="viridis")
            for (i, j), v in np.ndenumerate(mat):
                if not np.isnan(v):
                    ax.text(j, i, f"{100 * v:.0f}", ha="center", va="center", fontsize=7,
                            color="white" if v < 0.6 else "black")
            ax.set_title(me, fontsize=9)
            ax.set_xlabel("test exp", fontsize=8)
            ax.set_ylabel("after training exp", fontsize=8)
            ax.tick_params(labelsize=7)
        for ax in list(axes.flat)[len(ms):]:
            ax.axis("off")
        fig.suptitle(f"{sc}: accuracy matrix (%), mean over seeds, at the chosen factor", fontsize=10)
        fig.tight_layout()
        p = out / f"acc_matrix_{sc}.png"
        fig.savefig(p, dpi=dpi)
        plt.close(fig)
        files.append(str(p))

    # accuracy over experiences
    fig, axes = plt.subplots(1, len(scenarios), figsize=(4.2 * len(scenarios), 3.6), squeeze=False)
    for ax, sc in zip(axes[0], scenarios):
        for me in methods:
            curves = [r["acc_curve"] for r in chosen if r["scenario"] == sc and r["method"] == me]
            if not curves:
                continue
            c = np.mean(np.asarray(curves, dtype=float), axis=0)
            if me == "joint":
                ax.axhline(c[-1], color="k", ls="--", lw=1, label=me)
            else:
                ax.plot(np.arange(1, len(c) + 1), c, marker="o", ms=3, color=colors[me], label=me,
                        ls="-" if METHODS[me].kind != "avalanche-ewc" else ":")
        ax.set_title(sc, fontsize=10)
        ax.set_xlabel("experiences trained")
        ax.set_ylabel("test accuracy on seen experiences")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    p = out / "acc_over_experiences.png"
    fig.savefig(p, dpi=dpi)
    plt.close(fig)
    files.append(str(p))

    # lambda sweep
    tuned = [m for m in methods if METHODS[m].tuned]
    if tuned:
        fig, axes = plt.subplots(1, len(scenarios), figsize=(4.2 * len(scenarios), 3.6), squeeze=False)
        for ax, sc in zip(axes[0], scenarios):
            for me in tuned:
                sel = result.selection.get((sc, me))
                if not sel or not sel["grid"]:
                    continue
                ax.plot(sel["grid"], sel["valid_by_factor"], marker="o", ms=3, color=colors[me], label=me,
                        ls="-" if METHODS[me].kind != "avalanche-ewc" else ":")
                ax.plot([sel["factor"]], [sel["valid_accuracy"]], marker="*", ms=11, color=colors[me],
                        markeredgecolor="k")
            if ("naive" in methods) and (sc, "naive") in result.selection:
                ax.axhline(result.selection[(sc, "naive")]["valid_accuracy"], color="gray", ls="--", lw=1,
                           label="naive")
            ax.set_xscale("log")
            ax.set_title(sc, fontsize=10)
            ax.set_xlabel("factor (= ewc_lambda = λ/2)")
            ax.set_ylabel("mean validation accuracy")
            ax.grid(alpha=0.3)
        axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
        fig.suptitle("factor sweep (★ = chosen)", fontsize=10)
        fig.tight_layout()
        p = out / "lambda_sweep.png"
        fig.savefig(p, dpi=dpi)
        plt.close(fig)
        files.append(str(p))

    # final accuracy bars
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 + 0.35 * len(methods) * len(scenarios)), 3.8))
    width = 0.8 / len(methods)
    for k, me in enumerate(methods):
        ys, es = [], []
        for sc in scenarios:
            s = next((s for s in result.summary if s["scenario"] == sc and s["method"] == me), None)
            ys.append(s["acc_mean"] if s else np.nan)
            es.append(s["acc_std"] if s else 0.0)
        xs = np.arange(len(scenarios)) + (k - (len(methods) - 1) / 2) * width
        ax.bar(xs, ys, width, yerr=es, capsize=2, color=colors[me], label=me,
               hatch="//" if METHODS[me].kind == "avalanche-ewc" else None, edgecolor="k", lw=0.3)
    ax.set_xticks(np.arange(len(scenarios)))
    ax.set_xticklabels(scenarios)
    ax.set_ylabel("final test accuracy (mean ± std)")
    ax.set_ylim(0, 1.0)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    p = out / "final_accuracy.png"
    fig.savefig(p, dpi=dpi)
    plt.close(fig)
    files.append(str(p))
    return files


# --------------------------------------------------------------------------- all in one

PRESETS: Dict[str, Dict[str, Any]] = {
    # the `make demo` default: fits in < 10 min on 2 cores
    "default": {"seeds": [0, 1, 2], "epochs": 5, "points_per_decade": 1, "methods": DEFAULT_METHODS,
                "scenarios": SCENARIOS, "quick_grid": False},
    # smoke test (< 1 min)
    "quick": {"seeds": [0], "epochs": 1, "points_per_decade": 1, "methods": QUICK_METHODS,
              "scenarios": SCENARIOS, "quick_grid": True},
    # more seeds, a finer grid, longer training
    "full": {"seeds": [0, 1, 2, 3, 4], "epochs": 10, "points_per_decade": 2, "methods": DEFAULT_METHODS,
             "scenarios": SCENARIOS, "quick_grid": False},
}


def run_comparison(
    scenarios: Sequence[str] = SCENARIOS,
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
) -> Comparison:
    """Sweep, select, summarize and (with ``out``) write results and plots.

    See the module docstring for the protocol.
    """
    settings = (settings or Settings()).check()
    check_names(scenarios, methods)
    seeds = [int(s) for s in seeds]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct, got {seeds}")
    t0 = time.perf_counter()
    plan = plan_runs(scenarios, methods, seeds, settings, grids=grids, points_per_decade=points_per_decade)
    rows = execute(plan, workers=workers, progress=progress)
    selection = select_factors(rows)
    chosen = chosen_rows(rows, selection)
    summary = summarize(chosen, selection)
    res = settings.resolved()
    config = {
        "scenarios": list(scenarios), "methods": list(methods), "seeds": seeds,
        "settings": asdict(res), "points_per_decade": points_per_decade,
        "grids": {m: list(grids[m]) if grids and m in grids else method_grid(m, points_per_decade) for m in methods},
        "optimizer": f"Adam(lr={res.lr})", "online_decay": ONLINE_DECAY, "n_runs": len(plan),
        "workers": workers, "selection": "argmax of mean validation accuracy after the last experience",
        "methods_description": {m: METHODS[m].description for m in methods},
    }
    result = Comparison(rows=rows, selection=selection, chosen=chosen, summary=summary, config=config)
    result.wall_time_s = time.perf_counter() - t0
    if out is not None:
        result.files = write_outputs(result, out)
        if plots:
            result.files += make_plots(result, out)
    return result
