"""Kronecker-factor rows, one function per layer family: the second quantity of the rules.

A layer y = W a with a Kronecker-factored curvature block A ⊗ G needs, from the same captured input
``a`` and output cotangent ``d`` the per-sample rules see, two matrices of rows:

* the input rows ā: one row per sample and position (the unfolded patches of a convolution),
  with a 1 appended when the bias shares the block (W and b as one matrix [W | b]);
* the cotangent rows δ: one row per sample, position and cotangent column.

Then Σ ā āᵀ and Σ δ δᵀ over the rows are the sums of the factors. Sharing over positions is
"expand" (Eschenhagen et al. 2023): every position is a row of both. A row function is
``rows(module, a, d, bias, columns) -> (ā, δ)`` with ``a`` of shape ``[n, ...]`` (sample axis
first) and ``d`` of shape ``[n, ...]`` or, with ``columns``, ``[K, n, ...]``.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple, Type

import torch
from torch import Tensor, nn

from .conv import _patches

__all__ = ["KRON_ROWS", "register_kron_rows", "kron_rows_for", "weight_matrix_shape"]

#: row functions by layer class
KRON_ROWS: Dict[type, Callable] = {}


def register_kron_rows(layer_type: Type[nn.Module], supports: Optional[Callable[[nn.Module], bool]] = None):
    """Register ``rows(module, a, d, bias, columns) -> (ā, δ)`` for ``layer_type`` (a decorator);
    ``supports(module)``: whether a configuration of the layer has a Kronecker block (default: all)."""

    def deco(fn):
        KRON_ROWS[layer_type] = (fn, supports or (lambda m: True))
        return fn

    return deco


def kron_rows_for(module: nn.Module) -> Optional[Callable]:
    """The row function of ``module`` (its class's; a subclass that keeps the forward uses its
    base's), or None when it has none or this configuration is not supported."""
    cls = type(module)
    for base in cls.__mro__:
        if base in KRON_ROWS:
            fn, supports = KRON_ROWS[base]
            if (base is cls or cls.forward is base.forward) and supports(module):
                return fn
            return None
    return None


def weight_matrix_shape(module: nn.Module) -> Tuple[int, int]:
    """(rows, columns) of the weight as the matrix W of y = W a: [out, in·kernel]."""
    w = module.weight
    return w.shape[0], w[0].numel()


def _with_ones(rows: Tensor, bias: bool) -> Tensor:
    return torch.cat([rows, rows.new_ones(rows.shape[0], 1)], 1) if bias else rows


@register_kron_rows(nn.Linear)
def linear_rows(module, a, d, bias, columns):
    # every leading dimension (sample, sequence) is a row
    return _with_ones(a.reshape(-1, a.shape[-1]), bias), d.reshape(-1, d.shape[-1])


def _conv_supported(m) -> bool:
    return m.groups == 1 and m.padding_mode == "zeros"


@register_kron_rows(nn.Conv2d, supports=_conv_supported)
@register_kron_rows(nn.Conv1d, supports=_conv_supported)
def conv_rows(module, a, d, bias, columns):
    u = _patches(module, a)  # [n, Cin·kernel, L]
    rows = u.transpose(1, 2).reshape(-1, u.shape[1])
    channel = 2 if columns else 1
    return _with_ones(rows, bias), d.movedim(channel, -1).reshape(-1, d.shape[channel])
