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
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, NamedTuple, Optional

from torch import Tensor

from .policy import Policy

__all__ = ["Quantity", "PowerSum", "GradientSum", "Request", "Sums"]


class Quantity:
    """Σ_n of a term of each per-sample gradient g_n, with the shape and dtype of its parameter."""

    #: its sums over K cotangent columns do not change under an orthogonal change of the columns
    #: (the self-check's column then counts 1/K of the sums; see ``sums.sum_first``)
    column_invariant: bool = False

    def of(self, g: Tensor) -> Tensor:
        """The term of per-sample gradients ``g`` (elementwise; summed over samples by the caller)."""
        raise NotImplementedError

    def check_scale(self, total: float, count: int) -> float:
        """A bound on Σ_n ||g_n|| from ``total``, the sum of a parameter's values: the self-check's
        tolerance grows with it (the rounding of the true minibatch gradient does)."""
        return 0.0


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
