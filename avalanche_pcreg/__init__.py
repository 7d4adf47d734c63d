"""avalanche-pcreg: parameter-change regularization for Avalanche continual learning.

``R(theta) = factor * sum_i w_i * (theta_i - theta*_i)**2`` with importances w from L2
(``uniform``), per-sample Fisher (EWC), MAS, SI or a user function.
"""

from .importance import IMPORTANCE_ESTIMATORS, compute_importance, register_importance
from .penalty import quadratic_penalty
from .plugin import ParameterChangePlugin
from .regularizer import ParameterChangeReg
from .state import ConsolidatedState

__version__ = "0.1.0"

__all__ = [
    "ParameterChangeReg",
    "ParameterChangePlugin",
    "compute_importance",
    "register_importance",
    "IMPORTANCE_ESTIMATORS",
    "ConsolidatedState",
    "quadratic_penalty",
]
