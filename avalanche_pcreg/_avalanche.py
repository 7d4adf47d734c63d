"""Imported by our modules before their first ``import avalanche...``, for its effect.

``avalanche.training`` imports ``qpsolvers`` (for GEM), which warns at import time, "no QP solver
found on your system", when no QP solver (``quadprog``, ...) is installed. The plugin never solves a
QP, so that warning is silenced here, during this one import, and no other: nothing else about the
warning filters changes, and a user who imports ``qpsolvers`` before us still sees it.
"""

from __future__ import annotations

import warnings

QP_SOLVER_WARNING = r"no QP solver found"

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=QP_SOLVER_WARNING, category=UserWarning)
    import avalanche.training  # noqa: F401  (imports qpsolvers)
