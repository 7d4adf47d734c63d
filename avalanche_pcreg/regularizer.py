"""``ParameterChangeReg``: ``factor * sum_name sum(w * (theta - theta_ref)**2)``, matched by name."""

from __future__ import annotations

import warnings
from typing import Mapping, Union

import torch
from torch import Tensor, nn

from ._checks import check_importance_tensor, check_nonneg_finite, leading_slice
from .penalty import quadratic_penalty
from .selection import named_parameters

__all__ = ["ParameterChangeReg"]

RefLike = Union[nn.Module, Mapping[str, Tensor]]


def _named_tensors(obj: RefLike, arg: str) -> Mapping[str, Tensor]:
    if isinstance(obj, nn.Module):
        # The plain model's names (what the plugin and an unwrapped model give), and the module's
        # own names as well: DDP / DataParallel / torch.compile wrappers are looked through.
        named = dict(obj.named_parameters())
        named.update(named_parameters(obj))
        return named
    if isinstance(obj, Mapping):
        return obj
    raise TypeError(f"{arg} must be an nn.Module or a mapping from name to Tensor, got {type(obj).__name__}")


def _shares_storage(a: Tensor, b: Tensor) -> bool:
    """Whether ``a`` and ``b`` are views of one storage (``b`` then moves whenever ``a`` does)."""
    if a.device != b.device or a.is_sparse or b.is_sparse:
        return False
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


class ParameterChangeReg(nn.Module):
    """Weighted L2 distance to reference parameters: ``factor * sum_i w_i (theta_i - theta*_i)**2``.

    ``factor`` is lambda/2 of the EWC paper and equals Avalanche's ``ewc_lambda``.

    ``forward(target_model, ref_model, weights)`` regularizes exactly the parameters named in
    ``weights`` (a dict name -> Tensor), looked up **by name** in both models, never by
    position; a wrapped model (DDP, DataParallel, ``torch.compile``) answers to the plain
    model's names as well as to its own. ``ref_model`` may be an ``nn.Module`` or a mapping name -> Tensor. A target
    parameter that grew (a dynamic head) is compared on the leading block that the reference
    and the weight cover; its new entries are free. Gradient flows to the target only.

    ``check_weights=True`` verifies on every call that weights are finite and >= 0 (one
    host-device synchronisation); pass False on a hot path once the weights are known good.
    """

    def __init__(self, factor: float, *, check_weights: bool = True):
        super().__init__()
        self.factor = check_nonneg_finite("factor", factor)
        self.check_weights = bool(check_weights)

    def extra_repr(self) -> str:
        return f"factor={self.factor}"

    def forward(self, target_model: RefLike, ref_model: RefLike, weights: Mapping[str, Tensor]) -> Tensor:
        if not isinstance(weights, Mapping):
            raise TypeError(f"weights must be a mapping from parameter name to Tensor, got {type(weights).__name__}")
        target = _named_tensors(target_model, "target_model")
        ref = _named_tensors(ref_model, "ref_model")
        params, ws, anchors = [], [], []
        for name, w in weights.items():
            if name not in target:
                raise ValueError(f"parameter {name!r} named in weights is missing from target_model")
            if name not in ref:
                raise ValueError(f"parameter {name!r} named in weights is missing from ref_model")
            theta, theta_ref = target[name], ref[name]
            if not isinstance(w, Tensor):
                raise TypeError(f"weights[{name!r}] must be a Tensor, got {type(w).__name__}")
            if tuple(w.shape) != tuple(theta_ref.shape):
                raise ValueError(
                    f"shape mismatch for parameter {name!r}: weight has {tuple(w.shape)}, "
                    f"ref_model has {tuple(theta_ref.shape)}"
                )
            if self.check_weights:
                check_importance_tensor(name, w, "weights")
            if _shares_storage(theta, theta_ref):
                warnings.warn(
                    f"ref_model[{name!r}] shares storage with the target's parameter {name!r} (a reference "
                    "taken as model.state_dict(), p.detach() or p.data moves with the model), so its penalty "
                    "is 0 whatever the model does; take the reference as a copy: "
                    "{n: p.detach().clone() for n, p in model.named_parameters()} or copy.deepcopy(model)",
                    RuntimeWarning, stacklevel=4)  # the caller of model(...), past nn.Module.__call__
            index = leading_slice(name, theta.shape, theta_ref.shape, what="ref_model")
            params.append(theta if index is None else theta[index])
            ws.append(w.to(device=theta.device, dtype=theta.dtype))
            anchors.append(theta_ref.detach().to(device=theta.device, dtype=theta.dtype))
        if not params:
            return torch.zeros(())
        return quadratic_penalty(params, ws, anchors, self.factor)
