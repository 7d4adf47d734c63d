"""Names of the experiment harness: scenarios, datasets, methods, presets and studies.

Plain data, importable without torch or Avalanche (the CLI parses its arguments from these before
the heavy imports). To add a method, append a :class:`Method` to ``_METHOD_LIST``; to add a study,
add an entry to :data:`STUDIES`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Dict, List, Mapping, Optional, Tuple

__all__ = [
    "SCENARIOS", "DATASETS", "IDX_DATASETS", "CIFAR_DATASETS", "N_CLASSES", "MODELS", "DEVICES",
    "Method", "METHODS", "DEFAULT_METHODS", "QUICK_METHODS", "ONLINE_DECAY", "FV_DECAY",
    "method_grid", "quick_grid", "supported", "PRESETS", "Study", "STUDIES",
]

SCENARIOS = ("split-task", "split-class", "permuted")
IDX_DATASETS = ("mnist", "fashion-mnist")
CIFAR_DATASETS = ("cifar10", "cifar100")
DATASETS = ("digits",) + IDX_DATASETS + CIFAR_DATASETS
N_CLASSES = {"digits": 10, "mnist": 10, "fashion-mnist": 10, "cifar10": 10, "cifar100": 100}
MODELS = ("mlp", "cnn")
DEVICES = ("auto", "cpu", "cuda")
DATASET_TITLES = {"digits": "8x8 digits", "mnist": "MNIST", "fashion-mnist": "Fashion-MNIST",
                  "cifar10": "CIFAR-10", "cifar100": "CIFAR-100"}
SCENARIO_TITLES = {"split-task": "Split, task-incremental", "split-class": "Split, class-incremental",
                   "permuted": "Permuted (domain-incremental)"}


@dataclass(frozen=True)
class Method:
    """One compared method.

    ``kind``: ``"naive"`` (fine-tuning), ``"joint"`` (Avalanche ``JointTraining``),
    ``"avalanche"`` (an Avalanche plugin: ``plugin`` names its class in
    ``avalanche.training.plugins``, the factor is its ``ewc_lambda``) or ``"pcreg"`` (our plugin).
    ``decades``: the log10 range ``(lo, hi)`` of its factor grid, None for no factor.
    ``options``: keyword arguments of the plugin. ``label``: the name shown in tables and figures.
    ``unsupported``: scenarios the method is known to fail in, each with the reason; a sweep leaves
    the method out of those scenarios and says so in its tables and figures. ``compare_to``: the
    Avalanche method one of ours is set against in the figures (its pair); None for the rest.
    """

    name: str
    label: str
    kind: str
    decades: Optional[Tuple[int, int]]
    options: Mapping[str, Any] = field(default_factory=dict)
    description: str = ""
    plugin: str = "EWCPlugin"
    unsupported: Mapping[str, str] = field(default_factory=dict)
    compare_to: Optional[str] = None

    @property
    def tuned(self) -> bool:
        return self.decades is not None


# online decay used by both online EWCs of the comparison (Avalanche's and ours), like for like
ONLINE_DECAY = 0.9
# decay of the Fisher-variants study (van de Ven 2025 use online EWC; gamma = 1 sums the Fishers)
FV_DECAY = 1.0

_METHOD_LIST = [
    Method("naive", "naive", "naive", None, {}, "fine-tuning, no regularization (lower bound)"),
    Method("avl-ewc", "Avalanche EWC", "avalanche", (1, 7), {"mode": "separate"},
           "Avalanche EWCPlugin, separate: one (F_t, theta*_t) per experience, minibatch Fisher"),
    Method("avl-ewc-online", "Avalanche online", "avalanche", (1, 7),
           {"mode": "online", "decay_factor": ONLINE_DECAY},
           f"Avalanche EWCPlugin, online, decay_factor={ONLINE_DECAY}, minibatch Fisher"),
    Method("pc-l2", "ours L2", "pcreg", (-4, 2), {"importance": "uniform"},
           "ours, importance='uniform' (L2 towards the consolidated anchor)"),
    Method("pc-ewc", "ours EWC (empirical)", "pcreg", (-1, 5), {"importance": "empirical_fisher"},
           "ours, importance='empirical_fisher' (per-sample, true labels), separate (consolidated)"),
    Method("pc-ewc-fisher", "ours EWC (sampled)", "pcreg", (-1, 5), {"importance": "fisher"},
           "ours, importance='fisher' (per-sample, labels sampled from the model)"),
    Method("pc-ewc-expected", "ours EWC (expected)", "pcreg", (-1, 5),
           {"importance": "expected_fisher"},
           "ours, importance='expected_fisher' (exact expectation over classes)"),
    Method("pc-ewc-online", "ours online", "pcreg", (-1, 5),
           {"importance": "empirical_fisher", "mode": "online", "decay": ONLINE_DECAY},
           f"ours, importance='empirical_fisher', mode='online', decay={ONLINE_DECAY}"),
    Method("pc-ewc-online-expected", "ours online (expected)", "pcreg", (-1, 5),
           {"importance": "expected_fisher", "mode": "online", "decay": ONLINE_DECAY},
           f"ours, importance='expected_fisher' (diagonal), mode='online', decay={ONLINE_DECAY}"),
    Method("pc-kfac-online", "ours KFAC online", "pcreg", (-1, 5),
           {"importance": "kfac", "mode": "online", "decay": ONLINE_DECAY},
           f"ours, importance='kfac' (a Kronecker-factored block per layer, expected Fisher), mode='online', "
           f"decay={ONLINE_DECAY}, one nearest pair per layer (Ritter et al. 2018)"),
    Method("pc-mas", "ours MAS", "pcreg", (-4, 2), {"importance": "mas"}, "ours, importance='mas'"),
    Method("pc-si", "ours SI", "pcreg", (-1, 5), {"importance": "si", "mode": "online", "decay": 1.0},
           "ours, importance='si', mode='online', decay=1.0 (Zenke et al. 2017), xi=0.1"),
    Method("avl-rwalk", "Avalanche RWalk", "avalanche", (-1, 3), {"ewc_alpha": 0.9, "delta_t": 10},
           "Avalanche RWalkPlugin (Chaudhry et al. 2018), ewc_alpha=0.9, delta_t=10", plugin="RWalkPlugin",
           unsupported={"split-task": "Avalanche 0.6's RWalkPlugin raises KeyError on the parameters of the "
                                      "heads a multi-head model adds"}),
    Method("pc-rwalk", "ours RWalk (parity)", "pcreg", (-1, 3),
           {"importance": "rwalk", "mode": "online", "decay": 0.0,
            "estimator_options": {"ewc_alpha": 0.9, "delta_t": 10}},
           "ours, importance='rwalk': RWalkPlugin's definition, the same run as Avalanche RWalk"),
    Method("pc-rwalk-fisher", "ours RWalk (per-sample)", "pcreg", (-1, 3),
           {"importance": "rwalk_fisher", "estimator_options": {"delta_t": 10}},
           "ours, importance='rwalk_fisher': RWalk's path score + per-sample Fisher, separate (consolidated)"),
    Method("joint", "joint", "joint", None, {},
           "Avalanche JointTraining on all experiences at once (upper bound)"),
    # factor="auto": chosen per experience on the new experience's own data (docs/factor-search.md)
    Method("pc-l2-auto", "ours L2 (auto factor)", "pcreg", None, {"importance": "uniform", "factor": "auto"},
           "ours, importance='uniform', factor='auto' (continual factor search, no validation sweep)"),
    Method("pc-ewc-auto", "ours EWC (auto factor)", "pcreg", None,
           {"importance": "empirical_fisher", "factor": "auto"},
           "ours, importance='empirical_fisher', factor='auto' (continual factor search, no validation sweep)"),
    Method("pc-mas-auto", "ours MAS (auto factor)", "pcreg", None, {"importance": "mas", "factor": "auto"},
           "ours, importance='mas', factor='auto' (continual factor search, no validation sweep)"),
    # the same with phases as long as the real training (FactorSearch(epochs=None))
    Method("pc-l2-auto-long", "ours L2 (auto, long phases)", "pcreg", None,
           {"importance": "uniform", "factor": "auto", "factor_search": {"epochs": None}},
           "ours, importance='uniform', factor='auto', search phases as long as the real training"),
    Method("pc-ewc-auto-long", "ours EWC (auto, long phases)", "pcreg", None,
           {"importance": "empirical_fisher", "factor": "auto", "factor_search": {"epochs": None}},
           "ours, importance='empirical_fisher', factor='auto', search phases as long as the real training"),
    Method("pc-mas-auto-long", "ours MAS (auto, long phases)", "pcreg", None,
           {"importance": "mas", "factor": "auto", "factor_search": {"epochs": None}},
           "ours, importance='mas', factor='auto', search phases as long as the real training"),
    # the five Fisher computations of van de Ven (2025), online EWC, decay FV_DECAY
    Method("fv-exact", "exact Fisher", "pcreg", (0, 6),
           {"importance": "expected_fisher", "mode": "online", "decay": FV_DECAY},
           "online EWC, exact expected Fisher over all training samples of the experience"),
    Method("fv-exact-500", "exact Fisher (500 samples)", "pcreg", (0, 6),
           {"importance": "expected_fisher", "num_samples": 500, "mode": "online", "decay": FV_DECAY},
           "online EWC, exact expected Fisher on a seeded subset of 500 samples"),
    Method("fv-sampled", "sampled Fisher", "pcreg", (0, 6),
           {"importance": "fisher", "mode": "online", "decay": FV_DECAY},
           "online EWC, Fisher with one label per sample drawn from the model's prediction"),
    Method("fv-empirical", "empirical Fisher", "pcreg", (0, 6),
           {"importance": "empirical_fisher", "mode": "online", "decay": FV_DECAY},
           "online EWC, empirical Fisher (per-sample gradients at the true labels)"),
    Method("fv-batched", "batched Fisher (ours)", "pcreg", (1, 7),
           {"importance": "minibatch_fisher", "mode": "online", "decay": FV_DECAY},
           "online EWC, batched Fisher (squared minibatch-mean gradients, Avalanche's estimate) in our plugin"),
    Method("fv-batched-avl", "batched Fisher (Avalanche)", "avalanche", (1, 7),
           {"mode": "online", "decay_factor": FV_DECAY},
           f"Avalanche EWCPlugin, online, decay_factor={FV_DECAY} (batched Fisher)"),
]


def _pair(m: Method) -> Method:
    """Our method's Avalanche counterpart in the figures, by family, unless the row names one."""
    if m.kind != "pcreg" or m.compare_to is not None:
        return m
    if m.name.startswith("fv-"):
        ref = "fv-batched-avl"
    elif "rwalk" in m.name:
        ref = "avl-rwalk"
    elif m.options.get("mode") == "online" and m.name != "pc-si":
        ref = "avl-ewc-online"
    else:
        ref = "avl-ewc"
    return replace(m, compare_to=ref)


_METHOD_LIST = [_pair(m) for m in _METHOD_LIST]
METHODS: Dict[str, Method] = {m.name: m for m in _METHOD_LIST}
# The comparison of `make demo`, named one by one: 585 runs on digits (3 scenarios x 3 seeds x
# 65 factor/method cells), about 4 min on 2 idle cores. RWalk has its own study (--study rwalk: an
# extra forward and backward every iteration) and the Fisher variants theirs (--study fisher-variants).
DEFAULT_METHODS: Tuple[str, ...] = (
    "naive", "avl-ewc", "avl-ewc-online", "pc-l2", "pc-ewc", "pc-ewc-fisher", "pc-ewc-expected",
    "pc-ewc-online", "pc-mas", "pc-si", "joint",
)
QUICK_METHODS: Tuple[str, ...] = ("naive", "avl-ewc", "pc-ewc")


def method_grid(method, points_per_decade: int = 1, decades: Optional[Tuple[float, float]] = None) -> List[Optional[float]]:
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
    step = (hi - lo) / (n - 1) if n > 1 else 0.0
    return [float(f"{10 ** (lo + k * step):.6g}") for k in range(n)]


def supported(scenario: str, method) -> Optional[str]:
    """None when ``method`` runs in ``scenario``, else the reason it is left out."""
    m = METHODS[method] if isinstance(method, str) else method
    return m.unsupported.get(scenario)


def quick_grid(method) -> List[Optional[float]]:
    """Two factors for smoke runs: one decade either side of the middle of the grid."""
    m = METHODS[method] if isinstance(method, str) else method
    if not m.tuned:
        return [None]
    mid = 0.5 * (m.decades[0] + m.decades[1])
    return [float(f"{10 ** (mid - 1):.6g}"), float(f"{10 ** (mid + 1):.6g}")]


PRESETS: Dict[str, Dict[str, Any]] = {
    # the `make demo` default: fits in < 10 min on 2 cores
    "default": {"seeds": [0, 1, 2], "epochs": 5, "points_per_decade": 1, "methods": DEFAULT_METHODS,
                "scenarios": SCENARIOS, "quick_grid": False},
    # smoke test (< 1 min on digits; other datasets are subsampled, see QUICK_SUBSAMPLE)
    "quick": {"seeds": [0], "epochs": 1, "points_per_decade": 1, "methods": QUICK_METHODS,
              "scenarios": SCENARIOS, "quick_grid": True},
    # more seeds, a finer grid, longer training
    "full": {"seeds": [0, 1, 2, 3, 4], "epochs": 10, "points_per_decade": 2, "methods": DEFAULT_METHODS,
             "scenarios": SCENARIOS, "quick_grid": False},
}
# --quick on a dataset other than digits: this many training and test images a class
QUICK_SUBSAMPLE = 100


@dataclass(frozen=True)
class Study:
    """A named experiment: which scenarios and methods, and its defaults (the CLI can override them)."""

    name: str
    scenarios: Tuple[str, ...]
    methods: Tuple[str, ...]
    n_experiences: Optional[int]
    description: str
    # the figure/table set written after the sweep: "comparison", "long-stream" or "fisher-variants"
    report: str


STUDIES: Dict[str, Study] = {
    "compare": Study("compare", SCENARIOS, DEFAULT_METHODS, None,
                     "every method on every scenario (the `make demo` default)", "comparison"),
    "long-stream": Study(
        "long-stream", ("permuted",), ("naive", "avl-ewc", "avl-ewc-online", "pc-ewc", "pc-ewc-online"), 20,
        "a long permuted stream: accuracy after each experience, wall time of a training step and "
        "regularizer memory against the number of experiences", "long-stream"),
    "kfac": Study(
        "kfac", ("permuted",), ("naive", "avl-ewc-online", "pc-ewc-online-expected", "pc-kfac-online"), 20,
        "online KFAC (a Kronecker-factored block per layer) against the online diagonal expected Fisher and "
        "Avalanche's online EWC on a long permuted stream: accuracy, forgetting, step time and memory",
        "long-stream"),
    "rwalk": Study(
        "rwalk", ("split-class", "permuted"), ("naive", "avl-rwalk", "pc-rwalk", "pc-rwalk-fisher", "joint"),
        None, "Avalanche's RWalkPlugin against ours in parity mode (the same run) and ours with the "
        "per-sample Fisher, consolidated (single-head scenarios: Avalanche's RWalkPlugin fails on the "
        "heads a multi-head model adds)", "comparison"),
    "fisher-variants": Study(
        "fisher-variants", ("split-task",),
        ("naive", "fv-exact", "fv-exact-500", "fv-sampled", "fv-empirical", "fv-batched", "fv-batched-avl"), 5,
        "online EWC with the Fisher computed five ways (van de Ven 2025), task-incremental Split",
        "fisher-variants"),
    "auto-factor": Study(
        "auto-factor", SCENARIOS,
        ("naive", "pc-l2", "pc-l2-auto", "pc-l2-auto-long", "pc-ewc", "pc-ewc-auto", "pc-ewc-auto-long", "pc-mas",
         "pc-mas-auto", "pc-mas-auto-long"), None,
        "factor='auto' (a continual search on each new experience's own data, De Lange et al. 2021) against "
        "the factor chosen on the validation stream over a grid, for L2, EWC and MAS", "comparison"),
}
