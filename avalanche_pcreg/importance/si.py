"""Synaptic Intelligence (Zenke et al. 2017): a path integral accumulated during training.

Two trajectory estimators (see :mod:`.trajectory`):

* :class:`SITracker` (``importance="si"``, ours). For every optimizer step,
  ``omega += -g * (theta_after - theta_before)``, where ``g`` is the gradient the optimizer used
  (the **total** loss, penalty included, as in van de Ven's and Avalanche's implementations). At
  the task boundary the importance of that task is ``omega / ((theta_end - theta_start)**2 + xi)``,
  clamped at 0 (omega can be negative where the loss went up), and omega restarts. The plugin
  consolidates it like any other importance (``mode="online", decay=1`` is Zenke et al.'s running
  sum with one anchor; ``"separate"`` keeps one quadratic per task, consolidated).
* :class:`AvalancheSITracker` (``importance="avalanche_si"``): what Avalanche 0.6's
  ``SynapticIntelligencePlugin`` computes when its parameter copies really are copies (on CUDA):
  ``W = clamp(-sum_tasks c * trajectory / (delta**2 + eps), max=clip_to)`` with ``c=1``,
  ``clip_to=0.001``, ``eps=1e-7``, the path integral restarted at every experience and the sum
  kept over all of them; used with ``mode="online", decay=0`` (the plugin's state holds ``W`` and
  the last anchor) and ``factor = si_lambda / 2``. Entries Avalanche leaves negative (the loss went
  up along the path: with momentum or Adam) are clamped at 0 here; see docs/migration.md.

Everything stays on the parameters' device as multi-tensor ops: no host round trip per step.
"""

from __future__ import annotations

from typing import Dict, List, Mapping, Optional

import torch
from torch import Tensor

from .._checks import check_nonneg_finite
from .trajectory import TrajectoryEstimator, grow

__all__ = ["SITracker", "AvalancheSITracker"]



class _StepPathIntegral(TrajectoryEstimator):
    """Adds ``sign * g * (theta_after - theta_before)`` to :meth:`_path_sums` at every optimizer
    step, ``g`` being the gradient the optimizer used (multi-tensor ops, on the device).
    Subclasses keep ``names``, ``_sync`` and the sums."""

    _sign = 1.0
    names: List[str]
    _before: Optional[List[Tensor]] = None

    def _path_sums(self) -> Dict[str, Tensor]:
        raise NotImplementedError

    def before_update(self, params: Mapping[str, Tensor]) -> None:
        self._sync(params)
        self._before = torch._foreach_mul([params[n].detach() for n in self.names], 1.0)

    def after_update(self, params: Mapping[str, Tensor]) -> None:
        if self._before is None:
            return
        live = [(n, params[n], b) for n, b in zip(self.names, self._before) if params[n].grad is not None]
        self._before = None
        if not live:
            return
        names, ps, befores = zip(*live)
        deltas = torch._foreach_sub([p.detach() for p in ps], list(befores))
        sums = self._path_sums()
        torch._foreach_addcmul_([sums[n] for n in names], [p.grad.detach() for p in ps], deltas, value=self._sign)


class SITracker(_StepPathIntegral):
    """Zenke et al.'s path integral; ``xi`` damps ``omega / (delta**2 + xi)`` (must be > 0)."""

    _sign = -1.0  # omega += -g * delta

    def __init__(self, xi: float = 0.1):
        self.xi = check_nonneg_finite("xi", xi)
        if self.xi == 0:
            raise ValueError("xi must be > 0 (it keeps omega / (delta**2 + xi) finite), got 0")
        self.names: List[str] = []
        self.start: Dict[str, Tensor] = {}
        self.omega: Dict[str, Tensor] = {}
        self._before: Optional[List[Tensor]] = None

    def begin(self, params: Mapping[str, Tensor]) -> None:
        """Start a task: remember theta_start, zero omega (for the given parameters)."""
        self.names = list(params)
        self.start = {n: p.detach().clone() for n, p in params.items()}
        self.omega = {n: torch.zeros_like(p) for n, p in params.items()}
        self._before = None

    def _sync(self, params: Mapping[str, Tensor]) -> None:
        """Follow parameters that grew or appeared since :meth:`begin` (dynamic heads)."""
        for n, p in params.items():
            old = self.omega.get(n)
            if old is None or old.shape != p.shape:
                self.omega[n] = grow(old, p)
                self.start[n] = grow(self.start.get(n), p, fill=p)
        self.names = list(params)

    def _path_sums(self) -> Dict[str, Tensor]:
        return self.omega

    def importance(self, params: Mapping[str, Tensor], data_importance=None) -> Dict[str, Tensor]:
        """omega / (delta**2 + xi), clamped at 0, for the parameters tracked since :meth:`begin`."""
        self._sync(params)
        out = {}
        for n in self.names:
            delta = params[n].detach() - self.start[n]
            out[n] = (self.omega[n] / (delta * delta + self.xi)).clamp_min(0.0)
        return out


class AvalancheSITracker(_StepPathIntegral):
    """Avalanche 0.6 ``SynapticIntelligencePlugin``'s importance (see the module docstring).

    :param eps: Avalanche's damping ``eps`` (default 1e-7, Avalanche's default).
    :param c: scale of each experience's term (Avalanche passes 1).
    :param clip_to: upper clamp of the summed importance (Avalanche passes 0.001).
    """

    def __init__(self, eps: float = 1e-7, c: float = 1.0, clip_to: float = 0.001):
        self.eps = check_nonneg_finite("eps", eps)
        self.c = check_nonneg_finite("c", c)
        self.clip_to = check_nonneg_finite("clip_to", clip_to)
        self.names: List[str] = []
        self.start: Dict[str, Tensor] = {}
        self.trajectory: Dict[str, Tensor] = {}
        self.cum: Dict[str, Tensor] = {}  # sum over experiences of c * trajectory / (delta**2 + eps)
        self._before: Optional[List[Tensor]] = None

    def _sync(self, params: Mapping[str, Tensor]) -> None:
        for n, p in params.items():
            for buf in (self.trajectory, self.cum):
                buf[n] = grow(buf.get(n), p)
            self.start[n] = grow(self.start.get(n), p)  # Avalanche pads its copies with zeros
        self.names = list(params)

    def begin(self, params: Mapping[str, Tensor]) -> None:
        """Avalanche's ``init_batch``: theta_start <- theta, trajectory <- 0 (the sum is kept)."""
        self._sync(params)
        for n, p in params.items():
            self.start[n] = p.detach().clone()
            self.trajectory[n].zero_()
        self._before = None

    def _path_sums(self) -> Dict[str, Tensor]:
        return self.trajectory

    def importance(self, params: Mapping[str, Tensor], data_importance=None) -> Dict[str, Tensor]:
        """Avalanche's ``update_ewc_data``: the summed, clipped importance (negatives set to 0)."""
        self._sync(params)
        out = {}
        for n in self.names:
            delta = params[n].detach() - self.start[n]
            self.cum[n] += self.c * self.trajectory[n] / (delta * delta + self.eps)
            out[n] = (-self.cum[n]).clamp(min=0.0, max=self.clip_to)
        return out
