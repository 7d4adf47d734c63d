"""The running sums of a pass, the sinks a batch's sums go through, and the float64 reductions.

Sums are accumulated in float32 for half-precision parameters (float64 for float64 ones). A batch's
sums reach the running totals through a sink: :class:`AddInto` adds each module's sums as soon as
they are final (so no per-batch copy of the parameters is held), except names it must keep until
the batch is done; :class:`Discard` drops everything (the self-check's column with power 1).

The float64 reductions of the self-check run piece by piece (``Policy.reduction_piece`` elements):
a float64 reduction of a float32 tensor would otherwise first make a float64 copy of it.
"""

from __future__ import annotations

import math
from typing import Dict, Iterator, Optional, Tuple

import torch
from torch import Tensor

__all__ = ["acc_dtype", "Totals", "AddInto", "Discard", "sum64", "all_finite", "diff_norm", "abs_sums64",
           "sum_first", "chunks", "even_size"]


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype of a parameter dtype: float64 stays, anything else -> float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def chunks(n: int, size: int) -> Iterator[Tuple[int, int]]:
    """``(start, end)`` of consecutive chunks of ``size`` (the last one shorter) covering ``n``."""
    size = max(1, int(size))
    for s in range(0, n, size):
        yield s, min(n, s + size)


def even_size(n: int, most: int) -> int:
    """The size of the equal pieces that split ``n`` into as few pieces of at most ``most`` as
    possible (ceil(n / number of pieces))."""
    most = max(1, int(most))
    return -(-n // -(-n // most))


class Totals:
    """The running sums ``{name: Tensor}`` of a pass, zeros of each parameter's shape (or of the
    shape in ``shapes``: a quantity's own, see ``Quantity.value_shape``).

    ``touched``: names whose sums have had anything added; ``provisional``: names added by the
    self-check's batch before their check (their sums were zero, so a failed check zeroes them)."""

    def __init__(self, params: Dict[str, Tensor], shapes: Optional[Dict[str, tuple]] = None):
        self.params = params
        self.shapes = {n: tuple(p.shape) for n, p in params.items()}
        self.shapes.update(shapes or {})
        self.reset()

    def reset(self) -> None:
        self.sums: Dict[str, Tensor] = {n: torch.zeros(self.shapes[n], dtype=acc_dtype(p.dtype), device=p.device)
                                        for n, p in self.params.items()}
        self.touched: set = set()
        self.provisional: set = set()

    def add(self, name: str, value: Tensor, alpha: float = 1.0) -> None:
        if alpha == 1.0:
            self.sums[name].add_(value.to(self.sums[name].dtype))
        else:
            self.sums[name].add_(value.to(self.sums[name].dtype), alpha=alpha)
        self.touched.add(name)


class AddInto(dict):
    """A sink for one batch's sums: adds each into ``totals`` at once, multiplied by ``weight``,
    except the names in ``keep``, which it holds like a dict until the batch is done."""

    def __init__(self, totals: Totals, keep: set, weight: float = 1.0):
        super().__init__()
        self.totals = totals
        self.keep = keep
        self.weight = weight

    def __setitem__(self, name, value):
        if name in self.keep:
            super().__setitem__(name, value if self.weight == 1.0 else value * self.weight)
        else:
            self.totals.sums[name].add_(value.to(self.totals.sums[name].dtype), alpha=self.weight)
            self.totals.touched.add(name)

    def update(self, other=(), **kw):
        for name, value in dict(other, **kw).items():
            self[name] = value


class Discard(dict):
    """A sink that keeps nothing."""

    def __setitem__(self, name, value):
        pass

    def update(self, other=(), **kw):
        pass


# ----------------------------------------------------------------------------- float64 reductions
def _pieces(x: Tensor, piece: int):
    x = x.reshape(-1)
    for s in range(0, x.numel(), piece):
        yield x[s:s + piece]


def sum64(x: Tensor, piece: int) -> Tensor:
    """Σ x in float64, piece by piece (a 0-dim tensor on x's device)."""
    acc = torch.zeros((), dtype=torch.float64, device=x.device)
    for p in _pieces(x, piece):
        acc += p.sum(dtype=torch.float64)
    return acc


def all_finite(x: Tensor, piece: int) -> Tensor:
    """Whether every element of x is finite (a 0-dim bool tensor on x's device)."""
    ok = torch.ones((), dtype=torch.bool, device=x.device)
    for p in _pieces(x, piece):
        ok &= p.isfinite().all()
    return ok


def diff_norm(a: Tensor, b: Tensor, piece: int) -> Tensor:
    """||a - b|| in float64, piece by piece (a 0-dim tensor on a's device)."""
    sq = torch.zeros((), dtype=torch.float64, device=a.device)
    for pa, pb in zip(_pieces(a, piece), _pieces(b, piece)):
        sq += (pa - pb.to(pa.dtype)).pow_(2).sum(dtype=torch.float64)
    return sq.sqrt()


def abs_sums64(g: Tensor, axis: int, piece: int) -> Tensor:
    """Σ |g| over every dimension but ``axis``, in float64, in pieces along another dimension."""
    other = [d for d in range(g.dim()) if d != axis]
    if not other:
        return g.abs().to(torch.float64)
    split = other[0]
    step = max(1, piece * g.shape[split] // max(g.numel(), 1))
    acc = torch.zeros(g.shape[axis], dtype=torch.float64, device=g.device)
    for s in range(0, g.shape[split], step):
        acc += g.narrow(split, s, min(step, g.shape[split] - s)).abs().sum(other, dtype=torch.float64)
    return acc


def sum_first(cot: Tensor) -> Tensor:
    """K cotangent columns [K, N, ...] turned by one orthogonal map of the column index (the
    reflection that swaps e_1 and 𝟙/√K): column 1 becomes Σ_k c_k / √K. Returns the other K - 1
    columns, c_j + (c_1 - Σ_k c_k / √K) / (√K - 1). Power-2 sums over the columns are invariant
    under any such map (Σ_k c_k c_kᵀ is), so the columns returned here and Σ_k c_k (counted 1/K)
    carry the same sums as the K given."""
    k = cot.shape[0]
    c = cot.to(torch.float64)
    rk = math.sqrt(k)
    shift = (c[0] - c.sum(0) / rk) / (rk - 1)
    return (c[1:] + shift).to(cot.dtype)
