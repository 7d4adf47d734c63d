"""``python -m pcreg_experiments`` (or ``./pcreg-compare`` in the repository): our plugin vs Avalanche's EWC.

Argument parsing and printing only; the experiment lives in :mod:`pcreg_experiments.runner` (and the
modules it runs a sweep with) and :mod:`pcreg_experiments.studies`. Arguments are parsed and every
output path is checked before torch and Avalanche are imported, so ``--help`` and a mistyped option
answer at once, and a bad ``--out`` fails before any training.

Examples::

    python -m pcreg_experiments                      # the `make demo` default (digits)
    python -m pcreg_experiments --quick              # smoke run, < 1 minute
    python -m pcreg_experiments --full --out results/full
    python -m pcreg_experiments --scenarios permuted --methods naive,avl-ewc,pc-ewc --seeds 5
    python -m pcreg_experiments --dataset mnist --data-root ~/data --max-train-per-class 1000
    python -m pcreg_experiments --study long-stream --n-experiences 50
    python -m pcreg_experiments --study fisher-variants --dataset cifar10 --data-root ~/data --download
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path
from typing import List, Optional, Sequence

from .catalog import (
    DATASETS, DEVICES, METHODS, MODELS, PRESETS, QUICK_SUBSAMPLE, SCENARIOS, STUDIES,
    method_grid, quick_grid, supported,
)


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


def _device(text: str) -> str:
    d = text.strip().lower()
    if d in DEVICES or (d.startswith("cuda:") and d[5:].isdigit()):
        return d
    raise argparse.ArgumentTypeError(f"expected one of {', '.join(DEVICES)} (or cuda:N), got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pcreg-compare",
        description=(
            "Compare avalanche-pcreg's ParameterChangePlugin (L2, EWC with per-sample Fisher, online EWC, "
            "MAS, SI) with Avalanche's EWCPlugin, naive fine-tuning and joint training. Each method's factor "
            "is chosen on a validation split held out from the training data (mean validation accuracy "
            "after the last experience over a log-spaced grid); test accuracy at that factor is reported "
            "as mean ± std over seeds. Every finished run is appended to --out/runs.jsonl at once; rerunning "
            "the same command skips the runs already there (Ctrl-C keeps what is done). Writes results.csv, "
            "results.json, sweep.csv, summary.md and PNG plots to --out."
        ),
        epilog="studies: " + "; ".join(f"{s.name}: {s.description}" for s in STUDIES.values())
        + ". methods: " + "; ".join(f"{m.name} ({m.label}): {m.description}" for m in METHODS.values()),
    )
    p.add_argument("--study", default="compare", choices=list(STUDIES),
                   help="compare (default): every method on every scenario; long-stream: permuted stream of "
                        "--n-experiences (default 20), step time and memory vs experiences; fisher-variants: "
                        "online EWC with five Fisher computations, task-incremental Split")
    preset = p.add_mutually_exclusive_group()
    preset.add_argument("--quick", action="store_true",
                        help="smoke run (< 1 min on digits): 1 seed, 2 factors a method, 1 epoch, methods "
                             + ",".join(PRESETS["quick"]["methods"]) + f" (the study's methods with --study); "
                             f"other datasets subsampled to {QUICK_SUBSAMPLE} train and test images a class")
    preset.add_argument("--full", action="store_true",
                        help="5 seeds, 2 grid points a decade, 10 epochs, all methods")
    p.add_argument("--scenarios", type=_names(SCENARIOS, "scenario"), action="append", metavar="LIST",
                   help=f"comma-separated scenarios (default: all, or the study's): {', '.join(SCENARIOS)}")
    p.add_argument("--methods", type=_names(list(METHODS), "method"), action="append", metavar="LIST",
                   help=f"comma-separated methods (default: the study's): {', '.join(METHODS)}")
    p.add_argument("--seeds", type=_seeds, metavar="N|LIST",
                   help="number of seeds (0..N-1) or a comma-separated list (default 3; --quick 1, --full 5)")
    p.add_argument("--epochs", type=_positive_int, help="epochs per experience (default 5; --quick 1, --full 10)")
    p.add_argument("--points-per-decade", type=_positive_int,
                   help="factor grid density (default 1; --full 2)")
    p.add_argument("--decades", metavar="LO,HI",
                   help="log10 range of every tuned method's factor grid, shifted per method: LO,HI are added "
                        "to the method's own range's ends (e.g. 1,-1 drops a decade at each end)")
    p.add_argument("--n-experiences", type=_positive_int, metavar="N",
                   help="experiences of the stream (default 5; long-stream 20). permuted: any N; "
                        "split: a divisor of the class count")
    p.add_argument("--dataset", default="digits", choices=DATASETS,
                   help="digits (scikit-learn, bundled; default), mnist / fashion-mnist (IDX files) or "
                        "cifar10 / cifar100 (python-pickle batches) under --data-root")
    p.add_argument("--data-root", metavar="DIR",
                   help="directory with the dataset's files (train-images-idx3-ubyte[.gz], ...; "
                        "cifar-10-batches-py/; cifar-100-python/)")
    p.add_argument("--download", action="store_true",
                   help="download the dataset into --data-root first (torchvision's downloaders; needs a network). "
                        "Without it nothing is downloaded")
    p.add_argument("--max-train-per-class", type=_positive_int, metavar="N",
                   help="subsample the training set to N images a class (seeded)")
    p.add_argument("--max-test-per-class", type=_positive_int, metavar="N",
                   help="subsample the test set to N images a class (seeded)")
    p.add_argument("--batch-size", type=_positive_int, help="minibatch size (default: 32 digits, 128 otherwise)")
    p.add_argument("--model", choices=MODELS,
                   help="mlp (Flatten + 2 hidden layers) or cnn (4 conv layers + 1 hidden layer); "
                        "default: cnn for CIFAR, mlp otherwise")
    p.add_argument("--hidden", type=_positive_int,
                   help="hidden units (default: MLP 100 digits, 400 MNIST; CNN 256)")
    p.add_argument("--lr", type=_positive_float, default=1e-3, help="Adam learning rate (default 1e-3)")
    p.add_argument("--device", type=_device, default="cpu",
                   help="cpu (default), cuda, cuda:N or auto (cuda when available). On a GPU the runs go "
                        "one after the other in this process; --workers is ignored")
    p.add_argument("--workers", type=_positive_int,
                   help="worker processes on the CPU (default: one per CPU core; one torch thread each)")
    p.add_argument("--out", metavar="DIR",
                   help="output directory (default results/, or results/<study>); checked before training")
    p.add_argument("--fresh", action="store_true",
                   help="train every run again (start --out/runs.jsonl afresh) instead of skipping "
                        "the runs already in it")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
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
    """Parse and check the arguments, the data and the output directory; imports no torch."""
    p = build_parser()
    a = p.parse_args(argv)
    study = STUDIES[a.study]
    preset = PRESETS["quick" if a.quick else "full" if a.full else "default"]
    a.preset = "quick" if a.quick else "full" if a.full else "default"
    a.scenarios_given = bool(a.scenarios)
    a.scenarios = _flatten(a.scenarios) or list(study.scenarios if a.study != "compare" else preset["scenarios"])
    default_methods = study.methods if a.study != "compare" else preset["methods"]
    a.methods = _flatten(a.methods) or list(default_methods)
    a.seeds = a.seeds or list(preset["seeds"])
    a.epochs = a.epochs or preset["epochs"]
    a.points_per_decade = a.points_per_decade or preset["points_per_decade"]
    a.n_experiences = a.n_experiences or study.n_experiences or 5
    a.out = a.out or ("results" if a.study == "compare" else f"results/{a.study}")
    shift = None
    if a.decades is not None:
        try:
            lo, hi = (float(v) for v in a.decades.split(","))
        except ValueError:
            p.error(f"--decades takes two numbers LO,HI, got {a.decades!r}")
        shift = (lo, hi)
    if preset["quick_grid"]:
        if shift is not None:
            p.error("--decades is not used with --quick (which trains 2 factors a method, a decade either side "
                    "of the middle of its grid); drop one of them")
        a.grids = {m: quick_grid(m) for m in a.methods}
    elif shift is not None:
        a.grids = {}
        for m in a.methods:
            if METHODS[m].tuned:
                d = METHODS[m].decades
                lo, hi = d[0] + shift[0], d[1] + shift[1]
                if hi < lo:
                    p.error(f"--decades {a.decades}: empty grid for {m} ({lo} > {hi})")
                a.grids[m] = method_grid(m, a.points_per_decade, (lo, hi))
    else:
        a.grids = None

    n_classes = {"cifar100": 100}.get(a.dataset, 10)
    for sc in a.scenarios:
        if sc != "permuted" and n_classes % a.n_experiences:
            p.error(f"--n-experiences {a.n_experiences}: the {sc} scenario needs a divisor of the "
                    f"{n_classes} classes of {a.dataset} (permuted takes any N)")
    if a.quick and a.dataset != "digits":
        a.max_train_per_class = a.max_train_per_class or QUICK_SUBSAMPLE
        a.max_test_per_class = a.max_test_per_class or QUICK_SUBSAMPLE

    # the output directory: checked (and created) before any data is read or any model trained
    out = Path(a.out).expanduser()
    if out.exists() and not out.is_dir():
        p.error(f"--out: {str(out)!r} exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".pcreg-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        p.error(f"--out: cannot write to {str(out)!r}: {e.strerror or e}")
    a.out = str(out)

    if a.dataset == "digits":
        if a.data_root is not None:
            p.error("--data-root is only used with --dataset mnist, fashion-mnist, cifar10 or cifar100")
        if a.download:
            p.error("--download: the digits are bundled with scikit-learn, nothing to download")
    else:
        if a.data_root is None:
            p.error(f"--dataset {a.dataset} needs --data-root DIR (a directory with its files); "
                    "nothing is downloaded unless --download is given")
        root = Path(a.data_root).expanduser()
        a.data_root = str(root)
        if a.download:
            from .data import download_dataset

            try:
                download_dataset(a.dataset, root)
            except Exception as e:  # network errors take many forms
                p.error(f"--download {a.dataset} into {root} failed: {type(e).__name__}: {e}")
        if not root.is_dir():
            p.error(f"--data-root: directory not found: {root}")
        # the files by name first (numpy only: answers before torch and Avalanche are imported)
        from .files import check_dataset_files

        try:
            check_dataset_files(a.dataset, root)
        except (FileNotFoundError, ValueError) as e:
            p.error(f"--data-root: {e}")
        # then load once here so that a corrupt file (or Fashion-MNIST files given as MNIST, or the
        # reverse) is a clear error, not a worker traceback
        from .data import load_arrays

        try:
            load_arrays(a.dataset, a.data_root)
        except (FileNotFoundError, ValueError) as e:
            p.error(f"--data-root: {e}")
    # the device: before any training
    if a.device != "cpu":
        from .runner import resolve_device

        try:
            a.device = resolve_device(a.device)
        except ValueError as e:
            p.error(f"--device: {e}")
        if a.device != "cpu" and a.workers not in (None, 1):
            print(f"note: --workers {a.workers} is ignored on {a.device}: the runs go one after the other "
                  "in this process on one GPU", file=sys.stderr)
    return a


def main(argv: Optional[Sequence[str]] = None, streams: Sequence = ()) -> int:
    """The CLI. From Python, ``streams`` (:class:`~pcreg_experiments.runner.UserStream`
    objects: your own Avalanche benchmark and model factory) are compared with the same tables and
    figures, instead of the built-in scenarios (or next to those given with ``--scenarios``)::

        from pcreg_experiments import compare
        from pcreg_experiments.runner import UserStream
        compare.main(["--methods", "naive,avl-ewc,pc-ewc", "--out", "results/mine"],
                     streams=[UserStream("my-stream", benchmark, make_model)])
    """
    a = parse_args(argv)
    if streams:
        a.scenarios = [*(a.scenarios if a.scenarios_given else []), *streams]
    warnings.filterwarnings("ignore")  # Avalanche's import-time notices
    from .runner import Settings, run_comparison
    from .tables import format_costs, format_notes, format_summary

    settings = Settings(
        dataset=a.dataset, data_root=a.data_root, epochs=a.epochs, batch_size=a.batch_size, lr=a.lr,
        hidden=a.hidden, max_train_per_class=a.max_train_per_class, max_test_per_class=a.max_test_per_class,
        n_experiences=a.n_experiences, model=a.model, device=a.device,
    )
    s = settings.resolved()
    grids = {m: (a.grids or {}).get(m) or method_grid(m, a.points_per_decade) for m in a.methods}
    names = [getattr(sc, "name", sc) for sc in a.scenarios]
    n_runs = len(a.seeds) * sum(len(grids[m]) for sc in names for m in a.methods if supported(sc, m) is None)
    net = f"MLP 2x{s.hidden}" if s.model == "mlp" else f"CNN 4 conv + {s.hidden}"
    sub = ""
    if s.max_train_per_class or s.max_test_per_class:
        sub = (f", subsampled to {s.max_train_per_class or 'all'} train / {s.max_test_per_class or 'all'} "
               "test images a class")
    print(f"pcreg-compare ({a.study}, {a.preset}): dataset={s.dataset}{sub}, scenarios={','.join(names)}, "
          f"{s.n_experiences} experiences, seeds={a.seeds}, epochs={s.epochs}, {net}, Adam lr={s.lr}, "
          f"batch={s.batch_size}, device={s.device}, validation=20% of train; {n_runs} runs -> {a.out}/",
          flush=True)
    for m in a.methods:
        if METHODS[m].tuned:
            g = grids[m]
            print(f"  {m:16s} factor grid {g[0]:.3g} .. {g[-1]:.3g} ({len(g)} points)")
    for sc in names:
        for m in a.methods:
            if supported(sc, m) is not None:
                print(f"  left out: {sc}/{m}: {supported(sc, m)}")
    t0 = time.perf_counter()
    import signal

    from . import pool

    def on_sigint(signum, frame):
        pool.STOP.set()  # also stops the sweep at the next run if this exception gets lost
        raise KeyboardInterrupt

    pool.STOP.clear()
    try:
        previous = signal.signal(signal.SIGINT, on_sigint)
    except ValueError:  # not the main thread: leave signals alone
        previous = None
    try:
        res = run_comparison(
            a.scenarios, a.methods, a.seeds, settings, points_per_decade=a.points_per_decade, grids=a.grids,
            workers=a.workers, progress=not a.no_progress, out=a.out, plots=not a.no_plots,
            resume=not a.fresh, study=a.study, log=lambda msg: print(msg, flush=True), restart_hint="--fresh",
        )
    except KeyboardInterrupt:
        interrupted = True
    else:
        interrupted = pool.STOP.is_set()  # interrupted during the last run, exception lost
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    if interrupted:
        runs = Path(a.out) / "runs.jsonl"
        if runs.is_file() and runs.stat().st_size:
            print(f"\ninterrupted: the finished runs are kept in {runs}; rerun the same command "
                  "to train only the rest", file=sys.stderr)
        else:
            print("\ninterrupted before any run finished: nothing was kept", file=sys.stderr)
        return 130
    wall = time.perf_counter() - t0
    print()
    print("test accuracy (Avalanche Top1_Acc_Stream after the last experience), average forgetting "
          "(StreamForgetting) and BWT (StreamBWT), mean ± std over seeds at each method's factor chosen "
          "on validation accuracy:")
    print(format_summary(res.summary))
    notes = format_notes(res.summary, res.config["left_out"])
    if notes:
        print("\n" + "\n".join(notes))
    costs = format_costs(res.chosen)
    if costs:
        print("\ncost against the number of experiences (ours vs Avalanche's EWC, this sweep):")
        print(costs)
    from .catalog import STUDIES as _S

    if _S[a.study].report != "comparison":
        from .studies import format_study

        print(f"\n{a.study}:")
        print(format_study(res, _S[a.study].report))
    edges = [s for s in res.summary if s["at_edge"]]
    ties = [s for s in res.summary if s.get("ties", 0) > 1]
    if edges:
        print("\n* best validation accuracy at an edge of the factor grid (widen the grid for): "
              + ", ".join(f"{s['scenario']}/{s['method']}" for s in edges))
    if ties:
        print("~ validation accuracy ties at several factors, the smallest is taken: "
              + ", ".join(f"{s['scenario']}/{s['method']} ({s['ties']})" for s in ties))
    failed = res.config["n_runs_failed"]
    print(f"\n{len(res.rows)} runs ({res.config['n_runs_resumed']} from {a.out}/runs.jsonl"
          + (f"; {failed} failed, see above" if failed else "") + f") in {wall:.1f} s; wrote "
          + ", ".join(Path(f).name for f in res.files))
    return 0


if __name__ == "__main__":
    sys.exit(main())
