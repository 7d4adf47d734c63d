"""avalanche-pcreg: parameter-change regularization for Avalanche continual learning.

``R(theta) = factor * sum_i w_i * (theta_i - theta*_i)**2`` with importances w from L2
(``uniform``), per-sample Fisher (EWC), MAS, SI or a user function.

Names are imported lazily: ``import avalanche_pcreg.penalty`` (or ``.state``, ``.regularizer``,
``.importance``, ``.selection``) needs torch only; Avalanche is imported when the plugin is first used
(without the "no QP solver found" warning that qpsolvers, imported by Avalanche for GEM, gives at import
when no QP solver is installed: the plugin solves no QP).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "ParameterChangeReg": ".regularizer",
    "ParameterChangePlugin": ".plugin",
    "compute_importance": ".importance",
    "register_importance": ".importance",
    "importance_ratio": ".importance",
    "IMPORTANCE_ESTIMATORS": ".importance",
    "ConsolidatedState": ".state",
    "quadratic_penalty": ".penalty",
    "norm_layers": ".selection",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'avalanche_pcreg' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + __all__)


if TYPE_CHECKING:  # pragma: no cover
    from .importance import IMPORTANCE_ESTIMATORS, compute_importance, importance_ratio, register_importance
    from .penalty import quadratic_penalty
    from .plugin import ParameterChangePlugin
    from .regularizer import ParameterChangeReg
    from .selection import norm_layers
    from .state import ConsolidatedState
