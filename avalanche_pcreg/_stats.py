"""Summary figures of one consolidation's importances (torch only). Deterministic: a resumed run
reproduces them, so the plugin may publish them as metrics."""

from __future__ import annotations

from typing import Dict, Mapping

from torch import Tensor

__all__ = ["importance_stats"]


def importance_stats(importances: Mapping[str, Tensor]) -> Dict[str, float]:
    """Mean (accumulated in float64), max and fraction of exact zeros over every entry."""
    total = sum(t.numel() for t in importances.values())
    if not total:
        return {"importance_mean": 0.0, "importance_max": 0.0, "importance_zero_frac": 0.0}
    flat_sum = sum(t.double().sum() for t in importances.values())
    flat_max = max(t.max() for t in importances.values() if t.numel())
    zeros = sum((t == 0).sum() for t in importances.values())
    return {
        "importance_mean": float(flat_sum) / total,
        "importance_max": float(flat_max),
        "importance_zero_frac": float(zeros) / total,
    }
