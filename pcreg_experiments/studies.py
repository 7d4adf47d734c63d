"""Tables and figures of the two research studies (``./pcreg-compare --study ...``).

* ``long-stream``: a long permuted stream (20 or 50 experiences). Per method, at its factor chosen
  on validation: test accuracy over the seen experiences after each experience, the mean wall time
  of a training step (forward, loss + penalty, backward, update) during each experience, and the
  bytes the regularizer stores after each experience. Claim tested: ours (consolidated) matches
  Avalanche's separate EWC in accuracy at a step cost and memory flat in the number of experiences.
  The ``kfac`` study reads the same way: online KFAC against the online diagonal Fisher.
* ``fisher-variants``: online EWC with the Fisher computed the five ways of van de Ven (2025), plus
  no regularization, on a task-incremental Split stream, each at its own factor.

Both read the rows :func:`~pcreg_experiments.runner.run_comparison` produced; nothing is
trained here.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any, Dict, List, Mapping, Sequence

import numpy as np

from .catalog import DATASET_TITLES, METHODS, SCENARIO_TITLES
from .tables import _mean_std, _pm

__all__ = ["long_stream_table", "fisher_variants_table", "write_study", "style", "FIG_DPI"]

FIG_DPI = 120


def style():
    """Matplotlib with the Agg backend (no display needed) and >= 10 pt text."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 10, "axes.titlesize": 11, "axes.labelsize": 10,
                         "legend.fontsize": 10, "xtick.labelsize": 10, "ytick.labelsize": 10})
    return plt


def _title(config: Mapping[str, Any], scenario: str) -> str:
    s = config["settings"]
    ds = DATASET_TITLES.get(s["dataset"], s["dataset"])
    sc = SCENARIO_TITLES.get(scenario, scenario)
    return f"{ds}, {sc}, {s['n_experiences']} experiences"


def _experience_ticks(ax, n: int) -> None:
    """Experiences numbered 1..n (as in every figure of the harness), at most ~10 ticks."""
    if n <= 10:
        ticks = list(range(1, n + 1))
    else:
        step = next(s for s in (5, 10, 20, 25, 50, 100, 200, 500, 1000, 10 ** 9) if n / s <= 10)
        ticks = [1] + list(range(step, n + 1, step))
    ax.set_xticks(ticks)
    ax.set_xlim(0.5, n + 0.5)


def _by_method(chosen: Sequence[Mapping], scenario: str) -> Dict[str, List[Mapping]]:
    out: Dict[str, List[Mapping]] = {}
    for r in chosen:
        if r["scenario"] == scenario:
            out.setdefault(r["method"], []).append(r)
    return {m: out[m] for m in METHODS if m in out}


def _steps(rows, k):
    """Mean step time (s) during experience k (0-based) over the rows (seeds)."""
    return _mean_std([r["step_time_per_exp_s"][k] for r in rows if len(r["step_time_per_exp_s"]) > k])


# --------------------------------------------------------------------------- long stream


def long_stream_table(result, scenario: str = "permuted") -> List[Dict[str, Any]]:
    """One dict per method: chosen factor, final accuracy, average forgetting, step time during experience 1, 2 and T
    (ms, mean over seeds), the growth from experience 2 to T, the time relative to naive at T, the
    regularizer's bytes after experience T and the total importance time."""
    groups = _by_method(result.chosen, scenario)
    naive_T = None
    if "naive" in groups:
        n = len(groups["naive"][0]["step_time_per_exp_s"])
        naive_T = _steps(groups["naive"], n - 1)[0]
    out = []
    for me, rs in groups.items():
        T = len(rs[0]["step_time_per_exp_s"])
        acc = _mean_std([r["avg_accuracy"] for r in rs])
        forg = _mean_std([r["avg_forgetting"] for r in rs])
        s1, s2, sT = _steps(rs, 0), _steps(rs, min(1, T - 1)), _steps(rs, T - 1)
        mem = [r["reg_bytes_per_exp"][-1] for r in rs if r.get("reg_bytes_per_exp")]
        imp = [r["importance_time_s"] for r in rs]
        sel = result.selection[(scenario, me)]
        out.append({
            "method": me, "label": METHODS[me].label, "n_seeds": len(rs), "factor": sel["factor"],
            "at_edge": sel["at_edge"], "acc_mean": acc[0], "acc_std": acc[1], "forg_mean": forg[0],
            "forg_std": forg[1], "n_experiences": T,
            "step_ms_1": 1e3 * s1[0], "step_ms_2": 1e3 * s2[0], "step_ms_T": 1e3 * sT[0],
            "step_ms_T_std": 1e3 * sT[1],
            "growth_2_to_T": sT[0] / s2[0] if s2[0] > 0 else float("nan"),
            "vs_naive_T": sT[0] / naive_T if naive_T else float("nan"),
            "reg_mb_T": float(np.mean(mem)) / 2 ** 20 if mem else 0.0,
            "importance_s": _mean_std(imp)[0],
        })
    return out


def format_long_stream(table: Sequence[Mapping[str, Any]]) -> str:
    T = table[0]["n_experiences"] if table else 0
    head = ["method", "factor", "final test acc", "forgetting", "step ms (exp 1)", "step ms (exp 2)", f"step ms (exp {T})",
            f"exp {T} / exp 2", f"vs naive at exp {T}", f"regularizer MB after exp {T}"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
    for r in table:
        f = "-" if r["factor"] is None else f"{r['factor']:.3g}" + ("*" if r["at_edge"] else "")
        lines.append("| " + " | ".join([
            r["label"], f, _pm(r["acc_mean"], r["acc_std"], r["n_seeds"]), _pm(r["forg_mean"], r["forg_std"], r["n_seeds"]),
            f"{r['step_ms_1']:.2f}", f"{r['step_ms_2']:.2f}",
            f"{r['step_ms_T']:.2f}", f"{r['growth_2_to_T']:.2f}×", f"{r['vs_naive_T']:.2f}×",
            f"{r['reg_mb_T']:.2f}",
        ]) + " |")
    return "\n".join(lines)


def _method_style(me: str, k: int):
    import matplotlib.pyplot as plt

    color = plt.get_cmap("tab10")(k % 10)
    kind = METHODS[me].kind
    ls = ":" if kind == "avalanche" else "--" if kind == "naive" else "-"
    return {"color": color, "ls": ls, "label": METHODS[me].label}


def long_stream_plots(result, out: Path, scenario: str = "permuted") -> List[str]:
    plt = style()
    groups = _by_method(result.chosen, scenario)
    title = _title(result.config, scenario)
    files = []
    specs = [
        ("long_stream_accuracy.png", "test accuracy on the experiences seen so far", "acc_curve", 1.0),
        ("long_stream_step_time.png", "wall time of a training step (ms)", "step_time_per_exp_s", 1e3),
        ("long_stream_memory.png", "regularizer's stored tensors (MB)", "reg_bytes_per_exp", 1.0 / 2 ** 20),
    ]
    for fname, ylabel, key, scale in specs:
        fig, ax = plt.subplots(figsize=(7.0, 4.2))
        n = 1
        for k, (me, rs) in enumerate(groups.items()):
            ys = np.asarray([r[key] for r in rs if r.get(key)], dtype=float) * scale
            if ys.size == 0:
                continue
            n = max(n, ys.shape[1])
            xs = np.arange(1, ys.shape[1] + 1)
            m = ys.mean(0)
            st = _method_style(me, k)
            ax.plot(xs, m, marker="o", ms=3, **st)
            if ys.shape[0] > 1:
                ax.fill_between(xs, m - ys.std(0, ddof=1), m + ys.std(0, ddof=1), color=st["color"], alpha=0.15)
        _experience_ticks(ax, n)
        ax.set_xlabel({"acc_curve": "experiences trained", "reg_bytes_per_exp": "after training experience"}.get(
            key, "experience (training on it)"))
        ax.set_ylabel(ylabel)
        if key == "acc_curve":
            ax.set_ylim(0, 1.0)
        else:
            ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        n_seeds = len(next(iter(groups.values())))
        tuned = any(len(result.selection[(scenario, me)]["grid"]) > 1 for me in groups)
        ax.set_title(f"{title}\n" + (f"mean ± std over {n_seeds} seeds" if n_seeds > 1 else "1 seed")
                     + (", each method at its factor chosen on validation" if tuned else ", fixed factors"),
                     fontsize=10)
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5))
        p = out / fname
        fig.savefig(p, dpi=FIG_DPI, bbox_inches="tight")
        plt.close(fig)
        files.append(str(p))
    return files


# --------------------------------------------------------------------------- Fisher variants


def fisher_variants_table(result, scenario: str = "split-task") -> List[Dict[str, Any]]:
    """One dict per variant: chosen factor, mean validation accuracy there, test accuracy
    mean ± std over seeds, total importance time (s, mean over seeds)."""
    groups = _by_method(result.chosen, scenario)
    out = []
    for me, rs in groups.items():
        sel = result.selection[(scenario, me)]
        acc = _mean_std([r["avg_accuracy"] for r in rs])
        forg = _mean_std([r["avg_forgetting"] for r in rs])
        out.append({
            "method": me, "label": "none" if me == "naive" else METHODS[me].label, "n_seeds": len(rs),
            "factor": sel["factor"], "at_edge": sel["at_edge"], "valid_accuracy": sel["valid_accuracy"],
            "acc_mean": acc[0], "acc_std": acc[1], "importance_s": _mean_std([r["importance_time_s"] for r in rs])[0],
            "options": dict(METHODS[me].options),
        })
    return out


def format_fisher_variants(table: Sequence[Mapping[str, Any]]) -> str:
    head = ["Fisher", "factor", "validation acc", "test acc (mean ± std)", "importance s / run"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
    for r in table:
        f = "-" if r["factor"] is None else f"{r['factor']:.3g}" + ("*" if r["at_edge"] else "")
        imp = "-" if r["importance_s"] is None or math.isnan(r["importance_s"]) else f"{r['importance_s']:.2f}"
        lines.append("| " + " | ".join([
            r["label"], f, f"{r['valid_accuracy']:.4f}", _pm(r["acc_mean"], r["acc_std"], r["n_seeds"], 100, "{:.2f}") + " %", imp,
        ]) + " |")
    return "\n".join(lines)


def fisher_variants_plot(result, out: Path, scenario: str = "split-task") -> List[str]:
    plt = style()
    table = fisher_variants_table(result, scenario)
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12.0, 4.4), gridspec_kw={"width_ratios": [1.1, 1]})
    xs = np.arange(len(table))
    colors = [plt.get_cmap("tab10")(k % 10) for k in range(len(table))]
    ax.bar(xs, [100 * r["acc_mean"] for r in table], yerr=[100 * r["acc_std"] for r in table], capsize=3,
           color=colors, edgecolor="k", lw=0.4)
    ax.set_xticks(xs)
    ax.set_xticklabels([r["label"] for r in table], rotation=30, ha="right")
    lo = min(100 * (r["acc_mean"] - r["acc_std"]) for r in table)
    ax.set_ylim(max(0.0, math.floor(lo - 2)), 100)
    ax.set_ylabel("final test accuracy (%)")
    ax.grid(axis="y", alpha=0.3)
    ax.set_title("each at its factor chosen on validation")
    for k, r in enumerate(table):
        sel = result.selection[(scenario, r["method"])]
        if not sel["grid"]:
            ax2.axhline(100 * sel["valid_accuracy"], color=colors[k], ls="--", label=r["label"])
            continue
        ax2.plot(sel["grid"], [100 * v for v in sel["valid_by_factor"]], marker="o", ms=3, color=colors[k],
                 label=r["label"], ls=":" if METHODS[r["method"]].kind == "avalanche" else "-")
        ax2.plot([sel["factor"]], [100 * sel["valid_accuracy"]], marker="*", ms=12, color=colors[k],
                 markeredgecolor="k")
    ax2.set_xscale("log")
    ax2.set_xlabel("factor (= ewc_lambda = λ/2); ★ chosen")
    ax2.set_ylabel("mean validation accuracy (%)")
    ax2.grid(alpha=0.3)
    ax2.set_title("factor sweep")
    ax2.legend(loc="center left", bbox_to_anchor=(1.01, 0.5))
    n_seeds = table[0]["n_seeds"] if table else 0
    fig.suptitle(f"{_title(result.config, scenario)}: online EWC with five Fisher computations "
                 f"(mean ± std, {n_seeds} seeds)", fontsize=11)
    fig.tight_layout()
    p = out / "fisher_variants.png"
    fig.savefig(p, dpi=FIG_DPI, bbox_inches="tight")
    plt.close(fig)
    return [str(p)]


# --------------------------------------------------------------------------- entry


def write_study(result, out, report: str, plots: bool = True) -> List[str]:
    """Write the study's Markdown table (``<report>.md``) and, with ``plots``, its figures."""
    out = Path(out)
    files = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        if report == "long-stream":
            sc = result.config["scenarios"][0]
            text = format_long_stream(long_stream_table(result, sc))
            if plots:
                files += long_stream_plots(result, out, sc)
        elif report == "fisher-variants":
            sc = result.config["scenarios"][0]
            text = format_fisher_variants(fisher_variants_table(result, sc))
            if plots:
                files += fisher_variants_plot(result, out, sc)
        else:
            raise ValueError(f"unknown study report {report!r}; valid: long-stream, fisher-variants")
    p = out / f"{report}.md"
    p.write_text(f"{_title(result.config, sc)}\n\n{text}\n")
    return [str(p)] + files


def format_study(result, report: str) -> str:
    sc = result.config["scenarios"][0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        if report == "long-stream":
            return format_long_stream(long_stream_table(result, sc))
        if report == "fisher-variants":
            return format_fisher_variants(fisher_variants_table(result, sc))
    raise ValueError(f"unknown study report {report!r}")
