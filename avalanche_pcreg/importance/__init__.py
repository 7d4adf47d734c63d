"""Importance estimators, chosen by name from a registry of estimator records.

===================== ==========================================================================
``uniform``           ones: plain L2 regularization towards the anchor
``empirical_fisher``  mean over samples of the squared per-sample gradient of the criterion at the true target
``fisher``            the same at one outcome per sample drawn from the model's likelihood (seeded)
``expected_fisher``   exact expectation over outcomes: mean over samples of E_y[g_y**2] (softmax: sum_c p(c|x) g_c**2)
``minibatch_fisher``  squared minibatch-mean gradients: what Avalanche 0.6's ``EWCPlugin`` uses
``mas``               Aljundi et al. 2018: mean over samples of |d ||f(x)||^2 / d theta|
``avalanche_mas``     |minibatch-mean gradient of ||f(x)||^2|: what Avalanche 0.6's ``MASPlugin`` uses
``si``                Synaptic Intelligence: path integral during training (trajectory, plugin only)
``avalanche_si``      Avalanche 0.6 ``SynapticIntelligencePlugin``'s path integral (trajectory)
``rwalk``             Avalanche 0.6 ``RWalkPlugin``: EWC++ Fisher + path score (trajectory)
``rwalk_fisher``      RWalk's path score + the per-sample empirical Fisher, per experience (trajectory)
===================== ==========================================================================

A data-pass estimator is ``fn(model, data, *, names, criterion, device, seed, limit, chunk_size)``
(and ``output_transform``, ``policy`` when it takes them) returning ``{name: Tensor}``; ``data`` is
an iterable of batches ``(x, y[, ..., task_label])``.
A trajectory estimator is an object with the callbacks of :class:`.trajectory.TrajectoryEstimator`,
which the plugin forwards during training (see :mod:`.trajectory`).
Register more with :func:`register_importance`, or pass any callable ``(model, data, **kw)``.

Modules: :mod:`.api` (``compute_importance``, ``importance_ratio``), :mod:`.registry` (the
estimator records), :mod:`.loading` (the pass's DataLoader and shards), :mod:`.fisher`,
:mod:`.mas`, :mod:`.minibatch` (the estimators), :mod:`.persample` (the per-sample engine, its
rules and its :class:`Policy`), :mod:`.si`, :mod:`.rwalk`, :mod:`.trajectory` (path-based
estimators). docs/architecture.md has the map.
"""

from __future__ import annotations

from .api import compute_importance, importance_ratio
# the estimator functions and the loader, importable from here as before
from .fisher import empirical_fisher, expected_fisher, fisher  # noqa: F401
from .loading import make_loader  # noqa: F401
from .mas import mas  # noqa: F401
from .minibatch import avalanche_mas, minibatch_fisher  # noqa: F401
from .persample import GradientSum, PerSampleGradNorms, Policy, PowerSum, using_policy
from .persample.rules import register_rule
from .registry import (ESTIMATORS, IMPORTANCE_ESTIMATORS, TRAJECTORY_ESTIMATORS, Estimator, register_importance,  # noqa: F401
                       resolve_estimator, uniform, valid_methods)
from .rwalk import RWalkFisherTracker, RWalkTracker
from .si import AvalancheSITracker, SITracker
from .trajectory import TrajectoryEstimator

__all__ = [
    "compute_importance",
    "register_importance",
    "importance_ratio",
    "Estimator",
    "ESTIMATORS",
    "IMPORTANCE_ESTIMATORS",
    "TRAJECTORY_ESTIMATORS",
    "TrajectoryEstimator",
    "SITracker",
    "AvalancheSITracker",
    "RWalkTracker",
    "RWalkFisherTracker",
    "register_rule",
    "uniform",
    "Policy",
    "using_policy",
    "PerSampleGradNorms",
    "PowerSum",
    "GradientSum",
]
