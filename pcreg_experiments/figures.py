"""The comparison's figures (PNG), drawn from a :class:`~pcreg_experiments.runner.Comparison`.

Each figure answers one question, with the pairs being compared side by side:

* ``final_accuracy.png``: final test accuracy per method, one panel per scenario, each Avalanche
  method followed by ours that it is compared with (``Method.compare_to``);
* ``difference.png``: ours minus Avalanche's test accuracy, paired by seed (mean and the seeds'
  spread), one panel per scenario;
* ``cost_vs_experience.png``: a training step's wall time and the regularizer's stored bytes after
  each experience, ours against Avalanche's EWC, measured in the same sweep;
* ``acc_matrix_<scenario>.png``: accuracy matrices, one colour scale and one colour bar;
* ``acc_over_experiences.png``: accuracy on the seen experiences after each one;
* ``lambda_sweep.png``: mean validation accuracy against the factor, Avalanche's curves on top.

Cells with failed runs and cells left out of the sweep are named under every figure.
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path
from typing import Any, Dict, List, Sequence

import numpy as np

from .catalog import DATASET_TITLES, METHODS, SCENARIO_TITLES

__all__ = ["make_plots", "paired_differences", "comparison_order"]

_AVALANCHE_GREYS = ("0.2", "0.5", "0.65")  # Avalanche's methods: greys, told apart by shade and dash
_AVALANCHE_DASHES = (":", "-.", "--")


def comparison_order(methods: Sequence[str]) -> List[str]:
    """``methods`` in reading order: naive first, then each Avalanche method followed by ours that
    are compared with it, then anything else, joint last."""
    methods = list(methods)
    out = [m for m in ("naive",) if m in methods]
    for ref in (m for m in METHODS if m in methods and METHODS[m].kind == "avalanche"):
        out.append(ref)
        out += [m for m in METHODS if m in methods and METHODS[m].compare_to == ref and m not in out]
    out += [m for m in METHODS if m in methods and m not in out and m != "joint"]
    return out + [m for m in ("joint",) if m in methods]


def paired_differences(chosen: Sequence[Dict[str, Any]], scenario: str) -> Dict[str, Dict[str, Any]]:
    """Per method of ours with an Avalanche counterpart in ``scenario``: its test accuracy minus the
    counterpart's, seed by seed (both at their chosen factors): ``{"ref", "diffs", "mean", "std"}``."""
    acc: Dict[str, Dict[int, float]] = {}
    for r in chosen:
        if r["scenario"] == scenario:
            acc.setdefault(r["method"], {})[int(r["seed"])] = float(r["avg_accuracy"])
    out = {}
    for m in METHODS:
        ref = METHODS[m].compare_to
        if m not in acc or ref not in acc:
            continue
        seeds = sorted(set(acc[m]) & set(acc[ref]))
        if not seeds:
            continue
        d = np.array([acc[m][s] - acc[ref][s] for s in seeds])
        out[m] = {"ref": ref, "diffs": d.tolist(), "mean": float(d.mean()),
                  "std": float(d.std(ddof=1)) if d.size > 1 else 0.0}
    return out


def _colors(methods: Sequence[str]) -> Dict[str, Any]:
    import matplotlib.pyplot as plt

    ours = [m for m in METHODS if m in methods and METHODS[m].kind == "pcreg"]
    cmap = plt.get_cmap("tab10" if len(ours) <= 10 else "tab20")
    colors = {m: cmap(i % cmap.N) for i, m in enumerate(ours)}
    refs = [m for m in METHODS if m in methods and METHODS[m].kind == "avalanche"]
    for m in methods:
        kind = METHODS[m].kind
        if kind == "avalanche":
            colors[m] = _AVALANCHE_GREYS[refs.index(m) % len(_AVALANCHE_GREYS)]
        elif kind in ("naive", "joint"):
            colors[m] = "0.8" if kind == "naive" else "0.2"
    return colors


def make_plots(result, out: str | os.PathLike, dpi: int = 120) -> List[str]:
    """Write the figures of the module docstring under ``out``; returns their paths."""
    from .runner import _scenario_ranks
    from .studies import _experience_ticks, style
    from .tables import format_notes

    plt = style()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files: List[str] = []
    chosen = result.chosen
    present = {r["scenario"] for r in chosen}
    scenarios = [s for s in _scenario_ranks(list(present)) if s in present]  # the tables' order
    methods = comparison_order({r["method"] for r in chosen})
    colors = _colors(methods)
    cfg = result.config.get("settings", {})
    user = set(result.config.get("user_streams", ()))
    ds = DATASET_TITLES.get(cfg.get("dataset"), cfg.get("dataset", ""))
    if set(scenarios) <= user:
        ds = ", ".join(scenarios)
    n_seeds = len(result.config.get("seeds", [])) or len({r["seed"] for r in chosen})
    seeds_txt = f"{n_seeds} seed" + ("s" if n_seeds != 1 else "")
    label = {m: METHODS[m].label for m in methods}
    notes = format_notes(result.summary, result.config.get("left_out", []))

    def title(sc):  # a user's stream is named by itself, a built-in scenario with its dataset
        return sc if sc in user else f"{ds}, {SCENARIO_TITLES.get(sc, sc)}"

    def save(fig, name):
        if notes:
            fig.text(0.0, 0.0, "\n".join(notes), ha="left", va="top", fontsize=8, color="firebrick", wrap=True)
        p = out / name
        fig.savefig(p, dpi=dpi, bbox_inches="tight")
        plt.close(fig)
        files.append(str(p))

    def rows_of(sc, me):
        return [r for r in chosen if r["scenario"] == sc and r["method"] == me]

    def summary_of(sc, me):
        return next((s for s in result.summary if s["scenario"] == sc and s["method"] == me), None)

    refs = [m for m in methods if METHODS[m].kind == "avalanche"]

    def style_of(me):
        return {"ls": _AVALANCHE_DASHES[refs.index(me) % len(_AVALANCHE_DASHES)] if me in refs else "-",
                "lw": 2.2 if METHODS[me].kind == "avalanche" else 1.4,
                "zorder": 5 if METHODS[me].kind == "avalanche" else 3}

    # final accuracy: one panel per scenario, pairs side by side
    n_sc = len(scenarios)
    fig, axes = plt.subplots(1, n_sc, figsize=(4.2 * n_sc, 0.34 * len(methods) + 1.6), squeeze=False, sharey=True)
    for ax, sc in zip(axes[0], scenarios):
        ys = np.arange(len(methods))[::-1]
        for y, me in zip(ys, methods):
            s = summary_of(sc, me)
            if s is None or math.isnan(s["acc_mean"]):
                ax.text(0.01, y, "failed" if s is not None else "—", va="center", fontsize=8, color="firebrick")
                continue
            ax.barh(y, s["acc_mean"], xerr=s["acc_std"] if n_seeds > 1 else None, color=colors[me],
                    hatch="//" if METHODS[me].kind == "avalanche" else None, edgecolor="k", lw=0.3, capsize=2)
            ax.text(1.02, y, f"{s['acc_mean']:.3f}", va="center", fontsize=8)  # a column of its own
        starts = [y for y, me in zip(ys, methods) if METHODS[me].kind == "avalanche"]
        for y in starts:  # a thin rule above each Avalanche method: its group starts there
            ax.axhline(y + 0.5, color="0.85", lw=0.8)
        ax.set_yticks(ys)
        ax.set_yticklabels([label[m] for m in methods])
        ax.set_xlim(0, 1.14)
        ax.set_xticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
        ax.set_xlabel("final test accuracy" + (" (mean ± std)" if n_seeds > 1 else ""))
        ax.set_title(title(sc), fontsize=10)
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(f"final test accuracy, {seeds_txt}, each method at its chosen factor; "
                 "hatched: Avalanche, each followed by ours compared with it", fontsize=10)
    fig.tight_layout()
    save(fig, "final_accuracy.png")

    # ours minus Avalanche, paired by seed
    diffs = {sc: paired_differences(chosen, sc) for sc in scenarios}
    if any(diffs.values()):
        ours = [m for m in methods if any(m in d for d in diffs.values())]
        fig, axes = plt.subplots(1, n_sc, figsize=(4.2 * n_sc, 0.4 * len(ours) + 1.6), squeeze=False, sharey=True)
        ys = np.arange(len(ours))[::-1]
        for ax, sc in zip(axes[0], scenarios):
            for y, me in zip(ys, ours):
                d = diffs[sc].get(me)
                if d is None:
                    continue
                ax.plot(d["diffs"], [y] * len(d["diffs"]), "o", ms=3, color=colors[me], alpha=0.5)
                ax.errorbar(d["mean"], y, xerr=d["std"] if len(d["diffs"]) > 1 else None, fmt="D", ms=6,
                            color=colors[me], capsize=3, markeredgecolor="k")
            ax.axvline(0, color="k", lw=1)
            ax.set_yticks(ys)
            ax.set_yticklabels([f"{label[m]} − {label[METHODS[m].compare_to]}" for m in ours], fontsize=9)
            ax.set_xlabel("test accuracy difference (ours − Avalanche)")
            ax.set_title(title(sc), fontsize=10)
            ax.grid(axis="x", alpha=0.3)
        fig.suptitle(f"ours minus Avalanche, paired by seed (dots: {seeds_txt}; diamond: mean ± std)", fontsize=10)
        fig.tight_layout()
        save(fig, "difference.png")

    # cost: step time and stored bytes after each experience, the EWC pairs
    cost_methods = [m for m in methods if METHODS[m].kind == "avalanche" or METHODS[m].compare_to is not None]
    cost_methods = [m for m in cost_methods if m in ("avl-ewc", "avl-ewc-online", "pc-ewc", "pc-ewc-online")] \
        or cost_methods
    if cost_methods:
        fig, axes = plt.subplots(2, n_sc, figsize=(4.2 * n_sc, 6.4), squeeze=False)
        for k, sc in enumerate(scenarios):
            n = 1
            for me in cost_methods:
                rs = rows_of(sc, me)
                if not rs:
                    continue
                steps = np.nanmean(np.asarray([r["step_time_per_exp_s"] for r in rs], dtype=float), axis=0) * 1e3
                mem = np.mean(np.asarray([r["reg_bytes_per_exp"] for r in rs], dtype=float), axis=0) / 1e3
                x = np.arange(1, len(steps) + 1)
                n = max(n, len(x))
                axes[0][k].plot(x, steps, marker="o", ms=3, color=colors[me], label=label[me], **style_of(me))
                axes[1][k].plot(x, mem, marker="o", ms=3, color=colors[me], label=label[me], **style_of(me))
            for ax in axes[:, k]:
                _experience_ticks(ax, n)
                ax.grid(alpha=0.3)
                ax.set_xlabel("training experience")
            axes[0][k].set_title(title(sc), fontsize=10)
            axes[0][k].set_ylabel("training step (ms, mean)")
            axes[1][k].set_ylabel("regularizer state after it (kB)")
            axes[0][k].set_ylim(bottom=0)
            axes[1][k].set_ylim(bottom=0)
        axes[0][-1].legend(loc="center left", bbox_to_anchor=(1.0, 0.5))
        fig.suptitle("cost against the number of experiences, measured in this sweep (one torch thread a run; "
                     "--study long-stream for long streams)", fontsize=10)
        fig.tight_layout()
        save(fig, "cost_vs_experience.png")

    # accuracy matrices: one colour scale, one colour bar
    for sc in scenarios:
        ms = [m for m in methods if m != "joint" and rows_of(sc, m)]
        if not ms:
            continue
        ncol = min(4, len(ms))
        nrow = int(math.ceil(len(ms) / ncol))
        n_exp = max(len(r["acc_matrix"][0]) for r in chosen if r["scenario"] == sc)
        cell = max(3.2, 0.5 * n_exp + 1.0)
        fig, axes = plt.subplots(nrow, ncol, figsize=(cell * ncol + 1.0, cell * nrow + 0.6), squeeze=False,
                                 layout="constrained")
        image = None
        for ax, me in zip(axes.flat, ms):
            with warnings.catch_warnings():  # unseen experiences are NaN in every seed
                warnings.simplefilter("ignore", RuntimeWarning)
                mat = np.nanmean(np.stack([np.asarray(r["acc_matrix"], dtype=float) for r in rows_of(sc, me)]), axis=0)
            n = mat.shape[1]
            image = ax.imshow(np.ma.masked_invalid(mat), vmin=0, vmax=1, cmap="viridis",
                              extent=(0.5, n + 0.5, mat.shape[0] + 0.5, 0.5))
            if n <= 12:
                for (i, j), v in np.ndenumerate(mat):
                    if not np.isnan(v):
                        ax.text(j + 1, i + 1, f"{100 * v:.0f}", ha="center", va="center", fontsize=9,
                                color="white" if v < 0.6 else "black")
            ax.set_title(label[me], fontsize=10)
            ax.set_xlabel("test experience")
            ax.set_ylabel("after training experience")
            _experience_ticks(ax, n)
            ax.set_yticks(ax.get_xticks())
            ax.set_ylim(mat.shape[0] + 0.5, 0.5)
        for ax in list(axes.flat)[len(ms):]:
            ax.axis("off")
        fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8, label="test accuracy (0 to 1, every panel)")
        fig.suptitle(f"{title(sc)}: accuracy matrix (%), mean over {seeds_txt}, at the chosen factors", fontsize=11)
        save(fig, f"acc_matrix_{sc}.png")

    # accuracy over experiences
    fig, axes = plt.subplots(1, n_sc, figsize=(5.0 * n_sc, 4.2), squeeze=False)
    for ax, sc in zip(axes[0], scenarios):
        n = 1
        for me in methods:
            curves = [r["acc_curve"] for r in rows_of(sc, me)]
            if not curves:
                continue
            c = np.mean(np.asarray(curves, dtype=float), axis=0)
            if me == "joint":
                ax.axhline(c[-1], color="k", ls="--", lw=1, label=label[me])
            else:
                n = max(n, len(c))
                ax.plot(np.arange(1, len(c) + 1), c, marker="o", ms=3, color=colors[me], label=label[me], **style_of(me))
        _experience_ticks(ax, n)
        ax.set_title(title(sc), fontsize=10)
        ax.set_xlabel("experiences trained")
        ax.set_ylabel("test accuracy on seen experiences")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.suptitle(f"mean over {seeds_txt}, each method at its chosen factor", fontsize=11)
    fig.tight_layout()
    save(fig, "acc_over_experiences.png")

    # factor sweep: Avalanche's curves drawn last, on top
    tuned = [m for m in methods if METHODS[m].tuned]
    tuned = [m for m in tuned if METHODS[m].kind != "avalanche"] + [m for m in tuned if METHODS[m].kind == "avalanche"]
    if tuned:
        fig, axes = plt.subplots(1, n_sc, figsize=(5.0 * n_sc, 4.2), squeeze=False)
        for ax, sc in zip(axes[0], scenarios):
            for me in tuned:
                sel = result.selection.get((sc, me))
                if not sel or not sel["grid"]:
                    continue
                ax.plot(sel["grid"], sel["valid_by_factor"], marker="o", ms=3, color=colors[me], label=label[me],
                        **style_of(me))
                ax.plot([sel["factor"]], [sel["valid_accuracy"]], marker="*", ms=11, color=colors[me],
                        markeredgecolor="k", zorder=6)
            naive = result.selection.get((sc, "naive"))
            if naive is not None and not naive.get("all_failed"):
                ax.axhline(naive["valid_accuracy"], color="0.6", ls="--", lw=1, label=label.get("naive", "naive"))
            ax.set_xscale("log")
            ax.set_title(title(sc), fontsize=10)
            ax.set_xlabel("factor (= ewc_lambda = λ/2)")
            ax.set_ylabel("mean validation accuracy")
            ax.grid(alpha=0.3)
        axes[0][-1].legend(loc="center left", bbox_to_anchor=(1.0, 0.5))
        fig.suptitle(f"factor sweep, mean over {seeds_txt} (★ = chosen; grey, thick, broken lines: Avalanche)", fontsize=11)
        fig.tight_layout()
        save(fig, "lambda_sweep.png")
    return files
