"""Float32 matrix products on the CPU through oneDNN's matmul, where it applies.

PyTorch's ``torch.mm`` on the CPU calls the BLAS it was built with (MKL for PyPI's wheels). On
some CPUs that BLAS runs a narrower instruction set than the convolution library (oneDNN) that
the same wheel ships: on an AVX-512 AMD EPYC, one thread, MKL's float32 GEMM ran at 51-58 G
multiply-adds/s on the rules' shapes and oneDNN's at 104-135 G/s, to the same float32 rounding
(relative error 1e-7 to 6e-7 against float64 for both). The per-sample rules' largest products go
through :func:`mm`, which takes oneDNN's matmul (``torch.ops.mkldnn._linear_pointwise``, an
operator of torch's oneDNN integration, not a public API) when every condition holds:

- both operands are float32 CPU tensors that do not require grad;
- the product has at least :data:`MIN_MACS` multiply-adds (below that a call's fixed cost wins);
- oneDNN is available and enabled (``torch.backends.mkldnn``), and float32 matmuls are at full
  precision (``torch.get_float32_matmul_precision() == "highest"``, oneDNN's own float32
  precision setting not lowered);
- the operator exists in this torch build and passed a one-time check against a float64 product.

Otherwise, ``torch.mm``. The choice never changes a result beyond float32 rounding.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = ["mm", "addmm_", "onednn_applies", "MIN_MACS"]

# Multiply-adds from which a product goes to oneDNN.
MIN_MACS = 1 << 20

_checked: dict = {}  # "op": the operator or None; "ok": whether it is present and agrees with float64


def _linear():
    if "op" not in _checked:
        try:
            _checked["op"] = torch.ops.mkldnn._linear_pointwise
        except (AttributeError, RuntimeError):
            _checked["op"] = None
    return _checked["op"]


def _full_precision() -> bool:
    if torch.get_float32_matmul_precision() != "highest":
        return False
    mat = getattr(torch.backends.mkldnn, "matmul", None)
    return getattr(mat, "fp32_precision", "none") in ("none", "ieee")


def _self_check() -> bool:
    op = _linear()
    if op is None:
        return False
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(48, 72, generator=gen)
    b = torch.randn(72, 40, generator=gen)
    try:
        with torch.no_grad():
            got = op(a, b.t(), None, "none", [], "")
    except Exception:  # an operator with another signature or no CPU kernel: not ours to use
        return False
    want = a.double() @ b.double()
    return (tuple(got.shape) == (48, 40) and got.dtype == torch.float32
            and float((got.double() - want).norm() / want.norm()) < 1e-5)


def onednn_applies(a: Tensor, b: Tensor) -> bool:
    """Whether :func:`mm` of these operands goes to oneDNN's matmul."""
    if not (a.dtype == b.dtype == torch.float32 and a.device.type == "cpu" and b.device.type == "cpu"):
        return False
    if a.requires_grad or b.requires_grad or a.shape[0] * a.shape[1] * b.shape[1] < MIN_MACS:
        return False
    if not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled and _full_precision()):
        return False
    if "ok" not in _checked:
        _checked["ok"] = _self_check()
    return _checked["ok"]


def mm(a: Tensor, b: Tensor, out: Optional[Tensor] = None) -> Tensor:
    """``a @ b`` for 2-D ``a`` [M, K] and ``b`` [K, N]; ``out``: the result's buffer where the
    product stays with ``torch.mm`` (oneDNN's returns a tensor of its own)."""
    if onednn_applies(a, b):
        with torch.no_grad():
            return _linear()(a, b.t(), None, "none", [], "")
    return torch.mm(a, b) if out is None else torch.mm(a, b, out=out)


def addmm_(c: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """``c += a @ b`` in place: oneDNN's product added where it applies, else ``c.addmm_``."""
    if onednn_applies(a, b):
        return c.add_(mm(a, b))
    return c.addmm_(a, b)
