"""The results file ``runs.jsonl`` (:class:`ResultStore`): one line per finished run, keyed by
:func:`run_key`, so that an interrupted sweep resumes; and the output directory's check
(:func:`check_out_dir`).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Mapping

import numpy as np

if TYPE_CHECKING:
    from .runner import RunSpec

__all__ = ["ResultStore", "run_key", "check_out_dir"]


def run_key(spec: RunSpec) -> str:
    """The identity of a run in a results file: scenario, method, seed, factor and every setting
    that changes its numbers (not the data directory, the device or the evaluation batch size)."""
    s = asdict(spec.settings.resolved())
    for k in ("data_root", "device", "eval_batch_size"):
        s.pop(k, None)
    key = {"scenario": spec.scenario, "method": spec.method, "seed": int(spec.seed), "factor": spec.factor,
           "settings": s}
    if spec.stream is not None:  # the data and model are the user's: the dataset settings do not apply
        for k in ("dataset", "n_experiences", "max_train_per_class", "max_test_per_class", "hidden", "layers",
                  "model", "validation"):
            s.pop(k, None)
        key["stream"] = {"name": spec.stream.name, "validation": float(spec.stream.validation)}
    return json.dumps(key, sort_keys=True)


def check_out_dir(out: str | os.PathLike) -> Path:
    """Make sure ``out`` is (or can be made) a writable directory, before any training.

    Raises ValueError naming the path: a file in the way, or no permission to create or write."""
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise ValueError(f"out: {str(out)!r} exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"out: cannot write to {str(out)!r}: {e.strerror or e}") from None
    return out


class ResultStore:
    """``runs.jsonl``: one JSON line per finished run (its :func:`run_key` and row), appended and
    flushed to disk as each run finishes. A line cut short by a kill is dropped on load."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def load(self) -> Dict[str, Dict[str, Any]]:
        out: Dict[str, Dict[str, Any]] = {}
        if not self.path.is_file():
            return out
        good = []
        with open(self.path, "r") as f:
            for line in f:
                if not line.endswith("\n"):
                    break  # a write cut short (the process was killed): rerun that run
                try:
                    rec = json.loads(line)
                    out[rec["key"]] = _unclean(rec["row"])
                except (ValueError, KeyError, TypeError):
                    raise ValueError(f"{self.path}: unreadable line {len(good) + 1}; "
                                     "remove it (or the file) to rerun those runs") from None
                good.append(line)
        if sum(len(l) for l in good) != self.path.stat().st_size:
            with open(self.path, "w") as f:  # drop the partial last line
                f.writelines(good)
        return out

    def append(self, key: str, row: Mapping[str, Any]) -> None:
        line = json.dumps({"key": key, "row": _clean(dict(row))}) + "\n"
        with open(self.path, "a") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    def clear(self) -> None:
        if self.path.exists():
            self.path.unlink()


def _unclean(v):
    """Inverse of :func:`_clean` for rows: None -> NaN in the float columns."""
    if isinstance(v, dict):
        out = {k: _unclean(x) for k, x in v.items()}
        for k in ("avg_accuracy", "avg_forgetting", "bwt", "valid_accuracy", "wall_time_s",
                  "mean_step_time_s", "importance_time_s"):
            if k in out and out[k] is None:
                out[k] = float("nan")
        return out
    if isinstance(v, list):
        return [float("nan") if x is None else _unclean(x) for x in v]
    return v


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
