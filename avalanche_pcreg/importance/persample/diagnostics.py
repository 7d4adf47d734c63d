"""What the engine tells its user: errors for what a per-sample backward cannot run, and the
warnings of parameters that leave the rules (the whole-model fallback, batch-dependent values)."""

from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import Tensor, nn

from .model_fallback import explain_func_failure, has_packed
from .plan import Targets

__all__ = ["check_graph", "check_packed", "warn_fallback", "warn_coupled", "list_names"]


def list_names(names) -> str:
    names = list(names)
    return repr(names) if len(names) <= 6 else repr(names[:6])[:-1] + ", ...]"


def _graph_has(root: Tensor, node_name: str) -> bool:
    """Whether ``root``'s backward graph holds a node of the type named ``node_name``."""
    start = root.grad_fn
    seen, stack = set(), [start] if start is not None else []
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if type(node).__name__ == node_name:
            return True
        stack.extend(nxt for nxt, _ in node.next_functions if nxt is not None and nxt not in seen)
    return False


def check_graph(root: Tensor, check: bool, forward_grad: Optional[str], nograd: list, targets: Targets) -> None:
    """Clear errors for what the backward cannot run: losses without a graph (a forward with
    gradients disabled, ``forward_grad`` saying how), reentrant activation checkpointing."""
    if not root.requires_grad:
        if forward_grad is not None or torch.is_inference_mode_enabled() or root.is_inference():
            how = forward_grad or "torch.inference_mode()"
            raise RuntimeError(
                f"per-sample importances need gradients, but the model's forward ran under {how}: the "
                "per-sample losses have no graph. Run the forward with gradients enabled (compute_importance "
                "enables them itself under torch.no_grad(); under torch.inference_mode() it cannot)")
        raise ValueError("the per-sample losses (or outputs) do not require grad: nothing connects them to "
                         "the requested parameters")
    if check and _graph_has(root, "CheckpointFunctionBackward"):
        names = targets.mod_names
        outer = [m for m in dict.fromkeys(nograd)
                 if not any(names.get(m, "").startswith(names.get(o, "?") + ".") for o in nograd if o is not m)]
        where = (f" around {', '.join(targets.describe(m) for m in outer)}" if outer else "")
        raise RuntimeError(
            f"per-sample importances cannot backpropagate through reentrant activation checkpointing{where} "
            "(torch.utils.checkpoint with use_reentrant=True), which supports only loss.backward(), not the "
            "gradients with respect to layer outputs that per-sample estimators take. Pass use_reentrant=False "
            "to torch.utils.checkpoint (or turn checkpointing off for the importance pass); "
            "importance='minibatch_fisher' and 'avalanche_mas' (Avalanche's estimators) work with either")


def check_packed(plans: dict, calls: dict, targets: Targets) -> None:
    """A clear error for parameters whose module is called with a ``PackedSequence`` and that
    need ``torch.func`` (the per-layer or whole-model fallback), which cannot run it."""
    for m, plan in plans.items():
        names = plan.layer + plan.model
        if names and any(has_packed(c.args) or has_packed(c.kwargs) for c in calls.get(m, [])):
            desc = targets.describe(m)
            raise RuntimeError(
                f"per-sample importances: parameters {list_names(names)} of {desc} need per-sample gradients "
                "by torch.func (it has no per-layer rule), and " + explain_func_failure(None, desc, True))


def warn_fallback(why: dict, warned: set) -> None:
    """One warning for the names in ``why`` ({name: reason}) not warned about yet."""
    new = {nm: w for nm, w in why.items() if nm not in warned}
    if not new:
        return
    warned.update(new)
    lines = "; ".join(f"{nm}: {w}" for nm, w in new.items())
    warnings.warn("per-sample importances: these parameters go to the whole-model fallback (per-sample "
                  f"gradients of the whole model by torch.func, slower than the per-layer rules): {lines}",
                  RuntimeWarning, stacklevel=5)


def warn_coupled(model_list: list, coupled: dict, targets: Targets, n, warned: set, model_why: dict) -> None:
    """One warning per module whose coupling of the samples makes importances depend on the
    batch (the per-sample gradients of ``model_list`` are taken within it)."""
    if not model_list:
        return
    for m, (kind, why) in coupled.items():
        key = ("coupled", m)
        hit = model_list if kind == "forward" else [nm for nm in model_list if nm in targets.modules.get(m, ())]
        if key in warned or not hit:
            continue
        warned.add(key)
        fix = ("give it running statistics (track_running_stats=True, eval mode) or use nn.LayerNorm / "
               "nn.GroupNorm" if isinstance(m, nn.modules.batchnorm._BatchNorm) else
               "use one bag per sample, or scale_grad_by_freq=False")
        warnings.warn(
            f"per-sample importances: {targets.describe(m)} couples the samples of a batch: {why}. The "
            f"per-sample gradients of {list_names(hit)} are therefore taken within the batch (the whole-model "
            f"fallback), so their importances depend on the batch size ({n}) and on which samples share a "
            f"batch; they are not per-sample values. For per-sample importances, {fix}",
            RuntimeWarning, stacklevel=6)
    for nm in model_list:
        m = targets.freq_holder.get(nm)
        if m is None or m in coupled or ("freq", nm) in warned:
            continue
        if isinstance(m, nn.EmbeddingBag):
            continue  # evaluated bag by bag (or in coupled): the fallback is per sample too
        warned.add(("freq", nm))
        warnings.warn(
            f"per-sample importances: parameter {nm!r} of {targets.describe(m)} goes to the whole-model fallback "
            f"({model_why.get(nm, 'see the other warnings')}), where its gradient is divided by the "
            "frequencies of its rows over the whole batch (scale_grad_by_freq=True), not within each sample: "
            f"its importances depend on the batch size ({n}) and on which samples share a batch. For "
            "per-sample importances, use the embedding through its own call only (no tied weights), or "
            "scale_grad_by_freq=False",
            RuntimeWarning, stacklevel=6)
