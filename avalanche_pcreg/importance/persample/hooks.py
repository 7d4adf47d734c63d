"""The forward hooks of a pass: what each hooked module was called with, and which layers couple
the samples of the batch.

:class:`Recorder` installs the hooks and keeps, for the latest forward, one :class:`Call` per call
of each hooked module (its detached inputs and the gradient edges of its outputs: where the
backward delivers δ). Layers that mix the samples of a batch (``_BatchNorm`` with batch statistics,
``nn.EmbeddingBag(scale_grad_by_freq=True)``) are evaluated on each sample alone where that is
possible (a forward hook that replaces their output) and recorded in ``coupled`` otherwise.
"""

from __future__ import annotations

from typing import Dict, List, Optional

import torch
from torch import Tensor, nn
from torch.autograd.graph import get_gradient_edge
from torch.utils._pytree import tree_flatten, tree_unflatten

from .rules import rule_for
from .rules.embedding import per_bag_embedding_bag
from .rules.norm import batch_norm_coupling, per_sample_batch_norm, uses_batch_stats

__all__ = ["Call", "Recorder"]


class Call:
    """One forward call of a hooked module: detached inputs and gradient edges of the outputs."""

    __slots__ = ("args", "kwargs", "edges", "out_shapes", "out_pos", "out_spec", "n_out")

    def __init__(self, args, kwargs, outs, out_pos, out_spec, n_out):
        self.args = args
        self.kwargs = kwargs
        self.edges = [get_gradient_edge(o) for o in outs]
        self.out_shapes = [tuple(o.shape) for o in outs]
        self.out_pos = out_pos
        self.out_spec = out_spec
        self.n_out = n_out

    @property
    def first(self) -> Optional[Tensor]:
        return self.args[0] if self.args and isinstance(self.args[0], Tensor) else None


def _detach(obj):
    leaves, spec = tree_flatten(obj)
    return tree_unflatten([x.detach() if isinstance(x, Tensor) else x for x in leaves], spec)


class Recorder:
    """The hooks of one pass over ``model``, capturing the calls of ``modules``.

    After a forward (with gradients enabled): ``calls`` ({module: [Call]}), ``coupled`` ({module:
    (kind, why)}: "forward" when the layer's output mixes the samples, "weight" when only its own
    weight's gradient does), ``nograd`` (modules called with gradients disabled inside the
    forward: activation checkpointing), ``n_hint`` (the root input's batch size) and
    ``forward_grad`` (how the latest forward had gradients disabled, if it had). ``busy`` turns the
    hooks off while the engine replays modules; ``mark_stale`` makes the next forward start afresh.
    """

    def __init__(self, model: nn.Module, modules):
        self.model = model
        self.modules = list(modules)
        self.calls: Dict[nn.Module, List[Call]] = {}
        self.pending: Dict[nn.Module, list] = {}
        self.coupled: dict = {}
        self.nograd: list = []
        self.handles: list = []
        self.stale = False
        self.busy = False
        self.in_root = False
        self.n_hint: Optional[int] = None
        self.forward_grad: Optional[str] = None

    # ------------------------------------------------------------------ install / remove
    def install(self) -> None:
        try:
            self.handles.append(self.model.register_forward_pre_hook(self._root_pre_hook))
            self.handles.append(self.model.register_forward_hook(self._root_hook))
            for mod in self.model.modules():
                if mod is not self.model:
                    self.handles.append(mod.register_forward_pre_hook(self._nograd_hook))
                if isinstance(mod, nn.modules.batchnorm._BatchNorm) or (
                        isinstance(mod, nn.EmbeddingBag) and mod.scale_grad_by_freq):
                    # first among the forward hooks: later hooks (the capture below, the user's)
                    # see the output of the layer evaluated on each sample alone
                    self.handles.append(mod.register_forward_hook(self._isolate_hook, with_kwargs=True,
                                                                  prepend=True))
            for mod in self.modules:
                self.handles.append(mod.register_forward_pre_hook(self._pre_hook, with_kwargs=True))
                self.handles.append(mod.register_forward_hook(self._forward_hook, with_kwargs=True))
        except BaseException:
            self.remove()
            raise

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        self.clear()

    def clear(self) -> None:
        self.calls.clear()
        self.pending.clear()
        self.coupled = {}
        self.nograd = []
        self.stale = False

    def mark_stale(self) -> None:
        """The captures belong to a forward whose backward is done: the next forward clears them."""
        self.stale = True

    @property
    def current(self) -> bool:
        """Whether calls of a forward not yet backpropagated are held."""
        return bool(self.calls) and not self.stale

    # ------------------------------------------------------------------ hooks
    def _root_pre_hook(self, module: nn.Module, args) -> None:
        if self.busy:
            return
        if not torch.is_grad_enabled():
            self.forward_grad = ("torch.inference_mode()" if torch.is_inference_mode_enabled()
                                 else "torch.no_grad()")
            return
        self.forward_grad = None
        if self.stale:
            self.clear()
        self.in_root = True
        self.n_hint = int(args[0].shape[0]) if args and isinstance(args[0], Tensor) and args[0].dim() > 0 else None

    def _root_hook(self, module: nn.Module, args, output) -> None:
        if not self.busy:
            self.in_root = False

    def _nograd_hook(self, module: nn.Module, args) -> None:
        if self.in_root and not self.busy and not torch.is_grad_enabled():
            self.nograd.append(module)

    def _isolate_hook(self, module: nn.Module, args, kwargs, output):
        """Evaluate a layer that mixes the samples of its batch on each sample alone, or record
        why it cannot be."""
        n = self.n_hint
        record = not self.busy and torch.is_grad_enabled()
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            x = args[0] if args else kwargs.get("input")
            if not isinstance(x, Tensor) or not uses_batch_stats(module) or x.dim() < 2:
                return None
            why = batch_norm_coupling(module, x)
            if why is None and n is not None and x.shape[0] != n:
                why = (f"it normalises with the statistics of the whole batch and its input's first axis has "
                       f"{x.shape[0]} entries for {n} samples, so which entries form one sample is unknown")
            if why is None:
                return per_sample_batch_norm(module, x)
            if record:
                self.coupled.setdefault(module, ("forward", why))
            return None
        # nn.EmbeddingBag(scale_grad_by_freq=True): bag by bag when the bags are the samples
        if not isinstance(output, Tensor) or output.dim() != 2:
            return None
        if n is None or output.shape[0] == n:
            return per_bag_embedding_bag(module, args, kwargs, output)
        if record:
            self.coupled.setdefault(module, (
                "weight", f"scale_grad_by_freq=True divides its gradient by frequencies counted over the call, "
                          f"and its {output.shape[0]} bags are not the {n} samples, so they cannot be counted "
                          "per sample"))
        return None

    def _pre_hook(self, module: nn.Module, args, kwargs) -> None:
        # Inputs are copied (structure, not data) before the call: a forward that mutates a list
        # it was given (Avalanche's PNN adapters) does not change what the fallback replays.
        if self.busy or not torch.is_grad_enabled():
            return
        self.pending.setdefault(module, []).append((_detach(tuple(args)), _detach(dict(kwargs))))

    def _forward_hook(self, module: nn.Module, args, kwargs, output) -> None:
        if self.busy or not torch.is_grad_enabled():
            return
        pending = self.pending.get(module)
        if not pending:
            return
        args, kwargs = pending.pop()
        if self.stale:
            self.clear()
        leaves, spec = tree_flatten(output)
        pos = [i for i, o in enumerate(leaves) if isinstance(o, Tensor) and o.requires_grad]
        if not pos:
            return
        call = Call(args, kwargs, [leaves[i] for i in pos], pos, spec, len(leaves))
        self.calls.setdefault(module, []).append(call)
        rule = rule_for(module)
        if rule is not None and call.first is not None and rule.couples_samples(module, call.first):
            self.coupled.setdefault(module, ("forward", "its rule says that the call mixes the samples"))
