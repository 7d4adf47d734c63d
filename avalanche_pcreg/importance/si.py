"""Synaptic Intelligence (Zenke et al. 2017): a path integral accumulated during training.

For every optimizer step, ``omega += -g * (theta_after - theta_before)``, where ``g`` is the
gradient the optimizer used (the **total** loss, penalty included, as in van de Ven's and
Avalanche's implementations). At the task boundary the importance is
``omega / ((theta_end - theta_start)**2 + xi)``, clamped at 0 (omega can be negative where the
loss went up), and omega restarts.

Everything stays on the parameters' device as multi-tensor ops: no host round trip per step.
Framework-free: torch only; the plugin calls :meth:`begin`, :meth:`before_update`,
:meth:`after_update` and :meth:`importance`.
"""

from __future__ import annotations

from typing import Dict, List, Mapping, Optional

import torch
from torch import Tensor

from .._checks import check_nonneg_finite

__all__ = ["SITracker"]


class SITracker:
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
                omega = torch.zeros_like(p)
                start = p.detach().clone()
                if old is not None:
                    idx = tuple(slice(0, s) for s in old.shape)
                    omega[idx] = old
                    start[idx] = self.start[n]
                self.omega[n], self.start[n] = omega, start
        self.names = list(params)

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
        # befores <- theta_before - theta_after = -delta; omega += g * (-delta)
        torch._foreach_sub_(list(befores), [p.detach() for p in ps])
        torch._foreach_addcmul_([self.omega[n] for n in names], [p.grad.detach() for p in ps], list(befores))

    def importance(self, params: Mapping[str, Tensor]) -> Dict[str, Tensor]:
        """omega / (delta**2 + xi), clamped at 0, for the parameters tracked since :meth:`begin`."""
        self._sync(params)
        out = {}
        for n in self.names:
            delta = params[n].detach() - self.start[n]
            out[n] = (self.omega[n] / (delta * delta + self.xi)).clamp_min(0.0)
        return out
