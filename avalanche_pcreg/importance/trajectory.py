"""Trajectory (path-based) estimators: importances accumulated during training.

A trajectory estimator is an object the plugin calls back during training; it never reads data
at the boundary unless it names a ``data_estimator``. Every callback receives the selected
parameters by name (``{name: Parameter}``, read from the model at each call); everything stays on
the parameters' device as multi-tensor (``torch._foreach_*``) ops, so no callback makes a host
round trip (but ``rwalk``'s task gradient under ``torch.distributed``: which gradients exist on
some rank is read on the host, once per iteration).

==================== ======================================================================
``begin(params)``    a task starts (the model has adapted; heads have grown)
``task_gradient``    ``(params, grads)``: the gradient of the task loss alone at the start of
                     the iteration; only called when ``needs_task_gradient`` is True (the
                     plugin then runs one extra forward/backward of the strategy's criterion)
``after_backward``   ``(params)``: ``.grad`` holds the training gradient (penalty included)
``before_update``    ``(params)``: right before the optimizer step
``after_update``     ``(params)``: right after it
``importance``       ``(params, data_importance=None) -> {name: Tensor}`` at the task boundary;
                     ``data_importance`` is the result of ``data_estimator`` when one is named
==================== ======================================================================

Framework-free: torch only.
"""

from __future__ import annotations

import copy
from typing import Dict, List, Mapping, Optional

import torch
from torch import Tensor

__all__ = ["TrajectoryEstimator", "grow"]


def grow(old: Optional[Tensor], like: Tensor, fill: Optional[Tensor] = None) -> Tensor:
    """``old`` padded to ``like``'s shape: new entries from ``fill`` (or zeros), as Avalanche's
    ``ParamData.expand`` pads grown heads."""
    if old is not None and old.shape == like.shape:
        return old
    out = fill.detach().clone() if fill is not None else torch.zeros_like(like)
    if old is not None:
        if old.dim() != like.dim() or any(o > n for o, n in zip(old.shape, like.shape)):
            raise ValueError(f"a tracked parameter shrank or changed rank: {tuple(old.shape)} -> {tuple(like.shape)}")
        out[tuple(slice(0, s) for s in old.shape)] = old.to(out.device)
    return out


class TrajectoryEstimator:
    """Base class: every callback is a no-op; subclasses override what they need."""

    #: ask the plugin for the task-loss gradient at the start of every iteration
    needs_task_gradient: bool = False
    #: a registered data-pass estimator whose result ``importance`` receives, or None
    data_estimator: Optional[str] = None

    def begin(self, params: Mapping[str, Tensor]) -> None:
        pass

    def task_gradient(self, params: Mapping[str, Tensor], grads: Mapping[str, Optional[Tensor]]) -> None:
        pass

    def after_backward(self, params: Mapping[str, Tensor]) -> None:
        pass

    def before_update(self, params: Mapping[str, Tensor]) -> None:
        pass

    def after_update(self, params: Mapping[str, Tensor]) -> None:
        pass

    def importance(self, params: Mapping[str, Tensor], data_importance: Optional[Dict[str, Tensor]] = None
                   ) -> Dict[str, Tensor]:
        raise NotImplementedError

    # checkpointing: every data attribute (tensors, dicts of them, numbers), deep-copied
    def state_dict(self) -> dict:
        return copy.deepcopy({k: v for k, v in self.__dict__.items() if not callable(v)})

    def load_state_dict(self, sd: dict) -> None:
        if not isinstance(sd, dict):
            raise TypeError(f"tracker state_dict must be a dict, got {type(sd).__name__}")
        self.__dict__.update(copy.deepcopy(sd))

    @staticmethod
    def _live(names: List[str], params: Mapping[str, Tensor]):
        """The (name, param) pairs among ``names`` that hold a gradient now."""
        return [(n, params[n]) for n in names if n in params and params[n].grad is not None]
