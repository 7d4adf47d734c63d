"""What a per-sample pass sums, and what a rule is asked for.

A :class:`Quantity` is a sum over samples n of a term of the per-sample gradient g_n of each
parameter: :class:`PowerSum` (Σ_n |g_n|^p, p = 2 the Fisher diagonal, p = 1 MAS) is what the
estimators use; :class:`GradientSum` (Σ_n g_n, the minibatch gradient) is a second quantity that
every rule and fallback computes through the same engine. A rule is handed ``(module, a, δ)`` and
a :class:`Request` (the quantity, the attributes wanted, whether the check's Σ_n g_n is wanted too,
and the pass's :class:`~.policy.Policy`) and returns :class:`Sums`.

A rule that knows a closed form for a quantity uses it (``nn.Linear``: Σ_n (δ_n a_nᵀ)² =
(δ²)ᵀ a², one matmul); any other quantity it gets through its per-sample gradients
(``Rule.per_sample`` and :meth:`Quantity.of`), so a new quantity needs no change to the rules.

:class:`KroneckerFactors` is a quantity of layers rather than of parameters: for each layer with
Kronecker rows (:mod:`.rules.kron`) the sums Σ ā āᵀ and Σ δ δᵀ of its block, from the same ``a``
and δ; every other parameter gets ``rest`` (Σ_n g_n² by default) in the same pass. The engine asks
a quantity for each parameter's own quantity (:meth:`Quantity.for_param`); a layer's block is a
:class:`KronBlock`, whose sums are packed into one vector under the weight's name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, NamedTuple, Optional, Tuple

import torch
from torch import Tensor, nn

from .policy import Policy

__all__ = ["Quantity", "PowerSum", "GradientSum", "KroneckerFactors", "KronBlock", "Request", "Sums"]


class Quantity:
    """Σ_n of a term of each per-sample gradient g_n, with the shape and dtype of its parameter."""

    #: its sums over K cotangent columns do not change under an orthogonal change of the columns
    #: (the self-check's column then counts 1/K of the sums; see ``sums.sum_first``)
    column_invariant: bool = False
    #: a sum over samples of a term of each sample's gradient (:meth:`of`): the fallbacks can form it
    per_sample: bool = True

    def of(self, g: Tensor) -> Tensor:
        """The term of per-sample gradients ``g`` (elementwise; summed over samples by the caller)."""
        raise NotImplementedError

    def check_scale(self, total: float, count: int) -> float:
        """A bound on Σ_n ||g_n|| from ``total``, the sum of a parameter's values: the self-check's
        tolerance grows with it (the rounding of the true minibatch gradient does)."""
        return 0.0

    def check_bound(self, values: Tensor, total: float, count: int) -> float:
        """The bound of :meth:`check_scale` for a parameter's ``values`` (their sum: ``total``)."""
        return self.check_scale(total, count)

    def for_param(self, module: nn.Module, attr: str, attrs) -> "Quantity":
        """The quantity of parameter ``attr`` of ``module`` (``attrs``: the module's requested
        attributes): this one, unless the quantity is one of layers."""
        return self

    def value_shape(self, attr: str, param: Tensor) -> Tuple[int, ...]:
        """The shape of a parameter's sums: the parameter's."""
        return tuple(param.shape)


@dataclass(frozen=True)
class PowerSum(Quantity):
    """Σ_n |g_n|^power, power 1 or 2."""

    power: int = 2

    def __post_init__(self):
        if isinstance(self.power, bool) or self.power not in (1, 2):
            raise ValueError(f"power must be 1 or 2, got {self.power!r}")

    @property
    def column_invariant(self) -> bool:  # Σ_k c_k c_kᵀ is invariant, Σ_k |c_k| is not
        return self.power == 2

    def of(self, g: Tensor) -> Tensor:
        return g.abs() if self.power == 1 else g * g

    def check_scale(self, total: float, count: int) -> float:
        return (count * total) ** 0.5 if self.power == 2 else total


@dataclass(frozen=True)
class GradientSum(Quantity):
    """Σ_n g_n: the minibatch gradient of the summed losses, formed from per-sample terms."""

    def of(self, g: Tensor) -> Tensor:
        return g


@dataclass(frozen=True)
class KronBlock(Quantity):
    """The Kronecker block of one layer (weight matrix ``out`` × ``inp``; ``bias``: the bias is
    its last input column). Its sums go under the weight's name as one vector, :meth:`pack` of
    (Σ δ δᵀ [out, out], Σ ā āᵀ [inp', inp'], the number of input rows), inp' = inp + bias; the
    bias's own sums are Σ |δ| over the rows (they bound its self-check; its curvature is in the
    block). It has no per-sample term: a fallback cannot compute it."""

    out: int
    inp: int
    bias: bool
    column_invariant = True  # Σ_k δ_k δ_kᵀ is invariant under an orthogonal change of the columns
    per_sample = False

    @property
    def width(self) -> int:
        return self.inp + int(self.bias)

    def value_shape(self, attr, param):
        return (self.out * self.out + self.width * self.width + 1,) if attr == "weight" else (self.out,)

    def of(self, g):
        raise RuntimeError("a Kronecker block has no per-sample term")

    def pack(self, gsum: Tensor, asum: Tensor, rows) -> Tensor:
        rows = torch.as_tensor(rows, dtype=gsum.dtype, device=gsum.device).reshape(1)
        return torch.cat([gsum.reshape(-1), asum.reshape(-1), rows])

    def unpack(self, v: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """(Σ δ δᵀ, Σ ā āᵀ, rows) of a packed vector."""
        o, w = self.out * self.out, self.width * self.width
        return v[:o].reshape(self.out, self.out), v[o:o + w].reshape(self.width, self.width), v[-1]

    def check_bound(self, values, total, count):
        """Σ_n ||g_n|| ≤ Σ_rows ||δ|| ||ā|| ≤ sqrt(tr Σ δδᵀ · tr Σ āāᵀ) (Cauchy-Schwarz) for the
        weight; Σ_rows |δ| (its values) for the bias."""
        if values.numel() == self.out:
            return total
        g, a, _ = self.unpack(values)
        return float((g.diagonal().sum().double() * a.diagonal().sum().double()).clamp_min(0).sqrt())

    def sums(self, module, a: Tensor, d: Tensor, attrs, totals: bool, columns: bool, inputs: float) -> "Sums":
        """The packed sums of one call (``d``: ``[K, n, ...]`` when ``columns``), and Σ g of weight
        and bias if ``totals``. The input side Σ ā āᵀ and its row count are counted ``inputs``
        times: a batch's cotangent columns come in pieces of different weights, and its inputs must
        count once (the engine gives 1 / the piece's weight for its first piece that counts, 0 for
        the others)."""
        from .rules.kron import kron_rows_for  # the rules import this module

        arows, drows = kron_rows_for(module)(module, a, d, self.bias, columns)
        asum = torch.mm(arows.t(), arows) if inputs else arows.new_zeros(arows.shape[1], arows.shape[1])
        values = {"weight": self.pack(torch.mm(drows.t(), drows), asum * inputs, arows.shape[0] * inputs)}
        if self.bias and "bias" in attrs:
            values["bias"] = drows.abs().sum(0)
        tot = None
        if totals:
            if columns:
                raise ValueError("the self-check's totals come from one column")
            g = torch.mm(drows.t(), arows)
            tot = {"weight": g[:, :self.inp].reshape(module.weight.shape)}
            if self.bias:
                tot["bias"] = g[:, self.inp]
            tot = {k_: v for k_, v in tot.items() if k_ in attrs}
        return Sums({k_: v for k_, v in values.items() if k_ in attrs}, tot)


@dataclass(frozen=True)
class KroneckerFactors(Quantity):
    """Kronecker blocks for the layers that have rows (:mod:`.rules.kron`): each layer's weight
    and, if requested, its bias; ``rest`` for every other parameter."""

    rest: Quantity = PowerSum(2)

    def __post_init__(self):
        if not self.rest.column_invariant:  # its columns' pieces must all count (see the engine)
            raise ValueError(f"KroneckerFactors needs a column-invariant rest quantity, got {self.rest!r}")

    column_invariant = True  # Σ_k δ_k δ_kᵀ, and the rest

    def of(self, g):
        return self.rest.of(g)

    def check_scale(self, total, count):
        return self.rest.check_scale(total, count)

    def for_param(self, module, attr, attrs):
        from .rules.kron import kron_rows_for, weight_matrix_shape  # the rules import this module

        if attr not in ("weight", "bias") or "weight" not in attrs or kron_rows_for(module) is None:
            return self.rest
        out, inp = weight_matrix_shape(module)
        return KronBlock(out, inp, "bias" in attrs and getattr(module, "bias", None) is not None)


@dataclass(frozen=True)
class Request:
    """What one call of a rule asks for.

    :param quantity: what to sum over samples.
    :param attrs: the parameter attributes wanted (``{"weight", "bias"}``).
    :param totals: also Σ_n g_n of each (what the self-check compares with autograd's gradient).
    :param policy: chunk sizes and paths; ``chunk`` is its ``chunk_size``.
    :param columns: the number K of cotangent columns of the run (``Rule.column_accumulator``), or None.
    """

    quantity: Quantity
    attrs: frozenset
    totals: bool = False
    policy: Policy = field(default_factory=Policy)
    columns: Optional[int] = None

    @property
    def chunk(self) -> int:
        """Samples per chunk."""
        return self.policy.chunk_size

    @property
    def power(self) -> Optional[int]:
        """The power of a :class:`PowerSum`, else None (the rules' closed forms are for powers)."""
        return self.quantity.power if isinstance(self.quantity, PowerSum) else None


class Sums(NamedTuple):
    """A rule's answer: ``{attr: Σ_n term(g_n)}`` and, when the request asks, ``{attr: Σ_n g_n}``."""

    values: Dict[str, Tensor]
    totals: Optional[Dict[str, Tensor]] = None
