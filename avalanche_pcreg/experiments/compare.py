"""``pcreg-compare`` / ``python -m avalanche_pcreg.experiments``: our plugin vs Avalanche's EWC.

Argument parsing and printing only; the experiment lives in :mod:`avalanche_pcreg.experiments.runner`.

Examples::

    python -m avalanche_pcreg.experiments                      # the `make demo` default (digits)
    python -m avalanche_pcreg.experiments --quick              # smoke run, < 1 minute
    python -m avalanche_pcreg.experiments --full --out results/full
    python -m avalanche_pcreg.experiments --scenarios permuted --methods naive,avl-ewc,pc-ewc --seeds 5
    python -m avalanche_pcreg.experiments --dataset mnist --data-root ~/data --max-train-per-class 1000
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path
from typing import List, Optional, Sequence

from .data import DATASETS, SCENARIOS
from .runner import METHODS, PRESETS, Settings, format_summary, method_grid, quick_grid, run_comparison


def _names(valid: Sequence[str], what: str):
    """argparse type: a comma-separated list of names from ``valid`` (or ``all``)."""

    def parse(text: str) -> List[str]:
        out = []
        for name in (t.strip() for t in text.split(",")):
            if not name:
                continue
            if name == "all":
                out.extend(valid)
                continue
            if name not in valid:
                raise argparse.ArgumentTypeError(f"unknown {what} {name!r}; valid {what}s: {', '.join(valid)}")
            out.append(name)
        if not out:
            raise argparse.ArgumentTypeError(f"no {what} given; valid {what}s: {', '.join(valid)}")
        return out

    return parse


def _seeds(text: str) -> List[int]:
    """``N`` (seeds 0..N-1) or a comma-separated list (``3,4`` or ``7,``)."""
    try:
        if "," in text:
            seeds = [int(t) for t in text.split(",") if t.strip()]
        else:
            n = int(text)
            if n < 1:
                raise argparse.ArgumentTypeError(f"--seeds N needs N >= 1, got {n}")
            seeds = list(range(n))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds takes a count N or a comma-separated list of ints, got {text!r}")
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise argparse.ArgumentTypeError(f"--seeds must list distinct non-negative ints, got {text!r}")
    return seeds


def _positive(cast, what: str):
    """An argparse type: ``cast(text)`` that must be > 0."""

    def parse(text: str):
        try:
            v = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a positive {what}, got {text!r}")
        if not v > 0:
            raise argparse.ArgumentTypeError(f"expected a positive {what}, got {v}")
        return v

    return parse


_positive_int = _positive(int, "int")
_positive_float = _positive(float, "number")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pcreg-compare",
        description=(
            "Compare avalanche-pcreg's ParameterChangePlugin (L2, EWC with per-sample Fisher, online EWC, "
            "MAS, SI) with Avalanche's EWCPlugin, naive fine-tuning and joint training. Each method's factor "
            "is chosen on a validation split held out from the training data (mean validation accuracy "
            "after the last experience over a log-spaced grid); test accuracy at that factor is reported "
            "as mean ± std over seeds. Writes results.csv, results.json, sweep.csv, summary.md and PNG "
            "plots to --out."
        ),
        epilog="methods: " + "; ".join(f"{m.name}: {m.description}" for m in METHODS.values()),
    )
    preset = p.add_mutually_exclusive_group()
    preset.add_argument("--quick", action="store_true",
                        help="smoke run (< 1 min): 1 seed, 2 factors a method, 1 epoch, methods "
                             + ",".join(PRESETS["quick"]["methods"]))
    preset.add_argument("--full", action="store_true",
                        help="5 seeds, 2 grid points a decade, 10 epochs, all methods")
    p.add_argument("--scenarios", type=_names(SCENARIOS, "scenario"), action="append", metavar="LIST",
                   help=f"comma-separated scenarios (default: all): {', '.join(SCENARIOS)}")
    p.add_argument("--methods", type=_names(list(METHODS), "method"), action="append", metavar="LIST",
                   help=f"comma-separated methods (default: all): {', '.join(METHODS)}")
    p.add_argument("--seeds", type=_seeds, metavar="N|LIST",
                   help="number of seeds (0..N-1) or a comma-separated list (default 3; --quick 1, --full 5)")
    p.add_argument("--epochs", type=_positive_int, help="epochs per experience (default 5; --quick 1, --full 10)")
    p.add_argument("--points-per-decade", type=_positive_int,
                   help="factor grid density (default 1; --full 2)")
    p.add_argument("--dataset", default="digits", choices=DATASETS,
                   help="digits (scikit-learn, bundled; default) or mnist / fashion-mnist from local IDX files")
    p.add_argument("--data-root", metavar="DIR",
                   help="directory with the IDX files (train-images-idx3-ubyte[.gz], ...), for mnist/fashion-mnist")
    p.add_argument("--max-train-per-class", type=_positive_int, metavar="N",
                   help="subsample the training set to N images a class (seeded)")
    p.add_argument("--batch-size", type=_positive_int, help="minibatch size (default: 32 digits, 128 MNIST)")
    p.add_argument("--hidden", type=_positive_int, help="hidden units of the 2-layer MLP (default: 100 digits, 400 MNIST)")
    p.add_argument("--lr", type=_positive_float, default=1e-3, help="Adam learning rate (default 1e-3)")
    p.add_argument("--workers", type=_positive_int, help="worker processes (default: one per CPU core)")
    p.add_argument("--out", default="results", metavar="DIR", help="output directory (default results/)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _flatten(lists) -> Optional[List[str]]:
    if not lists:
        return None
    out = []
    for l in lists:
        for x in l:
            if x not in out:
                out.append(x)
    return out


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = build_parser()
    a = p.parse_args(argv)
    preset = PRESETS["quick" if a.quick else "full" if a.full else "default"]
    a.preset = "quick" if a.quick else "full" if a.full else "default"
    a.scenarios = _flatten(a.scenarios) or list(preset["scenarios"])
    a.methods = _flatten(a.methods) or list(preset["methods"])
    a.seeds = a.seeds or list(preset["seeds"])
    a.epochs = a.epochs or preset["epochs"]
    a.points_per_decade = a.points_per_decade or preset["points_per_decade"]
    a.grids = {m: quick_grid(m) for m in a.methods} if preset["quick_grid"] else None

    if a.dataset == "digits":
        if a.data_root is not None:
            p.error("--data-root is only used with --dataset mnist or fashion-mnist")
    else:
        if a.data_root is None:
            p.error(f"--dataset {a.dataset} needs --data-root DIR (a directory with its IDX files); "
                    "nothing is downloaded")
        root = Path(a.data_root).expanduser()
        if not root.is_dir():
            p.error(f"--data-root: directory not found: {root}")
        a.data_root = str(root)
        # load once here so that a missing or corrupt file is a clear error, not a worker traceback
        from .data import load_idx_dataset

        try:
            load_idx_dataset(a.data_root, a.dataset)
        except (FileNotFoundError, ValueError) as e:
            p.error(f"--data-root: {e}")
    return a


def main(argv: Optional[Sequence[str]] = None) -> int:
    warnings.filterwarnings("ignore")  # Avalanche's import-time notices
    a = parse_args(argv)
    settings = Settings(
        dataset=a.dataset, data_root=a.data_root, epochs=a.epochs, batch_size=a.batch_size, lr=a.lr,
        hidden=a.hidden, max_train_per_class=a.max_train_per_class,
    )
    s = settings.resolved()
    grids = a.grids or {m: method_grid(m, a.points_per_decade) for m in a.methods}
    n_runs = len(a.scenarios) * len(a.seeds) * sum(len(grids[m]) for m in a.methods)
    print(f"pcreg-compare ({a.preset}): dataset={s.dataset}, scenarios={','.join(a.scenarios)}, "
          f"seeds={a.seeds}, epochs={s.epochs}, MLP 2x{s.hidden}, Adam lr={s.lr}, batch={s.batch_size}, "
          f"validation=20% of train; {n_runs} runs -> {a.out}/", flush=True)
    for m in a.methods:
        if METHODS[m].tuned:
            g = grids[m]
            print(f"  {m:16s} factor grid {g[0]:.3g} .. {g[-1]:.3g} ({len(g)} points)")
    t0 = time.perf_counter()
    res = run_comparison(
        a.scenarios, a.methods, a.seeds, settings, points_per_decade=a.points_per_decade, grids=a.grids,
        workers=a.workers, progress=not a.no_progress, out=a.out, plots=not a.no_plots,
    )
    wall = time.perf_counter() - t0
    print()
    print("test accuracy (Avalanche Top1_Acc_Stream after the last experience), average forgetting "
          "(StreamForgetting) and BWT (StreamBWT), mean ± std over seeds at each method's factor chosen "
          "on validation accuracy:")
    print(format_summary(res.summary))
    edges = [s for s in res.summary if s["at_edge"]]
    ties = [s for s in res.summary if s.get("ties", 0) > 1]
    if edges:
        print("\n* best validation accuracy at an edge of the factor grid (widen the grid for): "
              + ", ".join(f"{s['scenario']}/{s['method']}" for s in edges))
    if ties:
        print("~ validation accuracy ties at several factors, the smallest is taken: "
              + ", ".join(f"{s['scenario']}/{s['method']} ({s['ties']})" for s in ties))
    print(f"\n{len(res.rows)} runs in {wall:.1f} s; wrote " + ", ".join(Path(f).name for f in res.files))
    return 0


if __name__ == "__main__":
    sys.exit(main())
