"""Choosing each method's factor: per (scenario, method), the grid point with the best mean validation
accuracy after the last experience (:func:`select_factors`), and the runs at that factor
(:func:`chosen_rows`). The test stream plays no part in the choice.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from .runner import failed

__all__ = ["select_factor", "select_factors", "chosen_rows", "TIE_TOL"]


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
    Failed runs (:func:`~pcreg_experiments.runner.run_guarded`) take no part in the choice: ``n_failed``
    counts them and ``errors`` lists their distinct errors; ``all_failed`` marks a cell with no finished run.
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
