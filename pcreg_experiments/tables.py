"""Formatting a sweep's results: the summary per (scenario, method) (:func:`summarize`), the text and
Markdown tables (:func:`format_summary`, :func:`format_notes`, :func:`format_costs`) and the output
files (:func:`write_outputs`: ``results.csv``, ``results.json``, ``sweep.csv``, ``summary.md``).
"""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Sequence, Tuple

import numpy as np

from .catalog import METHODS
from .runner import _scenario_ranks
from .store import _clean

if TYPE_CHECKING:
    from .runner import Comparison

__all__ = ["summarize", "format_summary", "format_notes", "format_costs", "write_outputs", "RESULT_COLUMNS",
           "SWEEP_COLUMNS", "COST_METHODS"]


def _mean_std(vals: Sequence[float]) -> Tuple[float, float]:
    a = np.asarray(vals, dtype=float)
    if a.size == 0 or np.all(np.isnan(a)):
        return float("nan"), float("nan")
    a = a[~np.isnan(a)]
    return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else 0.0


def _pm(a, b, n: int, scale: float = 1.0, fmt: str = "{:.3f}") -> str:
    """A table cell: ``a ± b`` scaled, ``a`` alone from one seed (``n``), where no spread was
    measured; ``n/a`` for a missing mean."""
    if a is None or (isinstance(a, float) and math.isnan(a)):
        return "n/a"
    return (fmt + " ± " + fmt).format(a * scale, b * scale) if n > 1 else fmt.format(a * scale)


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
        if s.get("all_failed"):
            lines.append([s["scenario"], s["method"] + "!", "failed", "-", "-", "-", "-"])
            continue
        lines.append([
            s["scenario"], s["method"] + ("!" if s.get("n_failed") else ""), _pm(s["acc_mean"], s["acc_std"], s["n_seeds"]),
            _pm(s["forgetting_mean"], s["forgetting_std"], s["n_seeds"]),
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
