"""Argument checks shared by every public entry point: clear errors that name the argument."""

from __future__ import annotations

import math
import numbers
from typing import Any, Iterable, Mapping

import torch
from torch import Tensor


def check_nonneg_finite(name: str, value: Any) -> float:
    """A real number >= 0 and finite (``factor``, ``decay``, ``xi``), returned as float."""
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, Tensor)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise TypeError(f"{name} must be a scalar, got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be finite and >= 0, got {value!r}")
    return value


def check_positive_int(name: str, value: Any, *, allow_none: bool = False):
    """A positive int (``batch_size``, ``num_samples``, ``chunk_size``), or None when allowed.

    Any integral number is accepted (``numpy.int64`` too) and returned as a Python int."""
    if value is None and allow_none:
        return None
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value <= 0:
        expected = "a positive int or None" if allow_none else "a positive int"
        raise ValueError(f"{name} must be {expected}, got {type(value).__name__} {value!r}")
    return int(value)


def check_seed(name: str, value: Any) -> int:
    """An integral seed (``numpy`` integers too), returned as a Python int."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int (the importance pass is always seeded), got {type(value).__name__} {value!r}")
    return int(value)


def check_choice(name: str, value: Any, choices: Iterable[str]) -> str:
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; expected one of {', '.join(map(repr, choices))}")
    return value


def check_importance_tensor(name: str, tensor: Tensor, estimator: str) -> None:
    """Importances must be finite and >= 0; never silently fixed."""
    check_importance_tensors({name: tensor}, estimator)


def check_importance_tensors(tensors: Mapping[str, Tensor], estimator: str) -> None:
    """:func:`check_importance_tensor` of every item, with one read back to the host per device
    (on a GPU, not two synchronisations a parameter)."""
    flags: dict = {}
    for name, tensor in tensors.items():
        if not isinstance(tensor, Tensor):
            raise TypeError(
                f"importance of parameter {name!r} from estimator {estimator!r} must be a Tensor, "
                f"got {type(tensor).__name__}"
            )
        bad = torch.stack([(~torch.isfinite(tensor)).any(), (tensor < 0).any()])
        flags.setdefault(tensor.device, []).append((name, bad))
    for items in flags.values():
        for (name, _), (non_finite, negative) in zip(items, torch.stack([b for _, b in items]).tolist()):
            tensor = tensors[name]
            if non_finite:
                raise ValueError(
                    f"importance of parameter {name!r} from estimator {estimator!r} has "
                    f"{int((~torch.isfinite(tensor)).sum())} NaN/inf entries"
                )
            if negative:
                raise ValueError(
                    f"importance of parameter {name!r} from estimator {estimator!r} has "
                    f"{int((tensor < 0).sum())} negative entries (min {tensor.min().item():.3g}); "
                    "importances must be >= 0"
                )


def check_finite_parameter(name: str, tensor: Tensor, what: str = "parameter") -> None:
    """Anchors must be finite: a consolidation of a diverged model (or a state dict with NaN/inf
    anchors) is refused, since its penalty would be NaN whatever the model does afterwards."""
    bad = ~torch.isfinite(tensor)
    if bool(bad.any()):
        head = f"{what} {name!r} has {int(bad.sum())} NaN/inf entries of {tensor.numel()}"
        if what == "parameter":
            raise ValueError(
                head + ": the model diverged, and a consolidation would store NaN/inf anchors (the state is left "
                "unchanged; lower the learning rate or the factor, or restore the model)"
            )
        raise ValueError(head + "; anchors must be finite (the penalty would be NaN)")


def leading_slice(name: str, target_shape, ref_shape, what: str = "reference"):
    """Index selecting the leading block of a target that grew from ``ref_shape``.

    Returns None when the shapes are equal. Raises ValueError when the target is smaller
    than the reference in some dimension or has another number of dimensions.
    """
    target_shape, ref_shape = tuple(target_shape), tuple(ref_shape)
    if target_shape == ref_shape:
        return None
    if len(target_shape) != len(ref_shape) or any(t < r for t, r in zip(target_shape, ref_shape)):
        raise ValueError(
            f"shape mismatch for parameter {name!r}: model has {target_shape}, {what} has "
            f"{ref_shape}; a parameter may only grow (same number of dimensions, each >= {what}'s)"
        )
    return tuple(slice(0, r) for r in ref_shape)
