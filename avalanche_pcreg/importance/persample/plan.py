"""Which path computes each requested parameter: once per pass (:class:`Targets`, from the model's
structure) and once per batch and module (:class:`ModulePlan`, from what the forward recorded).

The three paths: ``rule`` (the module's registered rule), ``layer`` (the per-layer fallback:
``torch.func`` on the module's own call) and ``model`` (the whole-model fallback). Parameters of a
hooked module that was not called this forward get zero (``zero``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

from torch import nn

from .rules import rule_for

__all__ = ["Targets", "ModulePlan", "Axes", "plan_module"]

# Modules that use their children's parameters without calling the children
# (MultiheadAttention and its out_proj): the container owns them all.
_OPAQUE: tuple = (nn.MultiheadAttention,)


def _get_param(module: nn.Module, attr: str):
    mod_path, _, leaf = attr.rpartition(".")
    try:
        mod = module.get_submodule(mod_path) if mod_path else module
    except AttributeError:
        return None
    return mod._parameters.get(leaf)


class Targets:
    """The requested parameters and the modules that own them, found once from the model.

    ``owner[name]`` / ``attr[name]``: the module that owns a parameter and its attribute there;
    ``modules``: {module: [names]} (the modules to hook); ``static_fallback``: names that always
    take the whole-model fallback (shared between modules, owned by the root module without a
    rule, or not found where their name says); ``freq_holder`` / ``sparse_holder``: names held by
    an embedding with ``scale_grad_by_freq`` / ``sparse=True`` (told about in the fallback)."""

    def __init__(self, model: nn.Module, names, params: Dict[str, nn.Parameter]):
        self.model = model
        self.names = list(names)
        self.params = params
        holders: Dict[int, set] = {}
        holder_mods: Dict[int, list] = {}
        for mod in model.modules():
            for p in mod._parameters.values():
                if p is not None:
                    holders.setdefault(id(p), set()).add(id(mod))
                    holder_mods.setdefault(id(p), []).append(mod)
        self.mod_names = {m: q for q, m in model.named_modules()}
        self.freq_holder = {n: m for n in self.names for m in holder_mods.get(id(params[n]), ())
                            if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.scale_grad_by_freq}
        self.sparse_holder = {n: m for n in self.names for m in holder_mods.get(id(params[n]), ())
                              if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.sparse}
        self.owner: Dict[str, nn.Module] = {}
        self.attr: Dict[str, str] = {}
        self.static_fallback: set = set()
        opaque = [q for q, mod in model.named_modules() if q and isinstance(mod, _OPAQUE)]
        for n in self.names:
            prefix, _, attr = n.rpartition(".")
            outer = next((q for q in opaque if prefix == q or prefix.startswith(q + ".")), None)
            if outer is not None:
                prefix, attr = outer, n[len(outer) + 1:]
            owner = model.get_submodule(prefix) if prefix else model
            p = params[n]
            if (owner is model and rule_for(model) is None) or _get_param(owner, attr) is not p or len(holders.get(id(p), ())) > 1:
                self.static_fallback.add(n)
            else:
                self.owner[n] = owner
                self.attr[n] = attr
        self.modules: Dict[nn.Module, list] = {}
        for n, m in self.owner.items():
            self.modules.setdefault(m, []).append(n)

    def describe(self, m: nn.Module) -> str:
        name = self.mod_names.get(m, "?")
        return f"the model ({type(m).__name__})" if name == "" else f"module {name!r} ({type(m).__name__})"


@dataclass(frozen=True)
class ModulePlan:
    """How one batch computes one module's requested parameters.

    :param rule: names its rule computes; ``candidates``: the input dimensions that may carry the
        sample axis (the self-check tells which one does).
    :param layer: names the per-layer fallback computes.
    :param model: names that need the whole-model fallback, and ``why``.
    :param zero: names of a module that was not called: their sums are 0.
    """

    rule: Tuple[str, ...] = ()
    layer: Tuple[str, ...] = ()
    model: Tuple[str, ...] = ()
    zero: Tuple[str, ...] = ()
    candidates: Tuple[int, ...] = ()
    why: str = ""

    @property
    def used(self) -> Tuple[str, ...]:
        """Names computed from this module's δ (by its rule or the per-layer fallback)."""
        return self.rule + self.layer


@dataclass(frozen=True)
class Axes:
    """The sample axis of each input leaf of a module's call (None: shared by all samples) and of
    each output (None: it does not reach the loss), as the self-check found them."""

    inputs: Tuple[Optional[int], ...]
    outputs: Tuple[Optional[int], ...]


def plan_module(targets: Targets, m: nn.Module, calls: list, coupled: dict, failed, n: int) -> ModulePlan:
    """The plan of module ``m`` for a batch of ``n`` samples whose forward recorded ``calls`` of
    it and the layers in ``coupled``; names in ``failed`` (moved for the pass) are left out."""
    names = tuple(x for x in targets.modules[m] if x not in failed)
    if not names:
        return ModulePlan()
    if not calls:
        return ModulePlan(zero=names)
    if len(calls) > 1:
        return ModulePlan(model=names, why="its module is called more than once")
    mixing = [c for c, (kind, _) in coupled.items() if kind == "forward"]
    if mixing:
        return ModulePlan(model=names, why=f"{targets.describe(mixing[0])} mixes the samples of the batch")
    if m in coupled:
        return ModulePlan(model=names, why=coupled[m][1])
    call = calls[0]
    rule = rule_for(m)
    x = call.first
    if rule is not None and x is not None and len(call.edges) == 1 and rule.supports(m, x):
        cover = rule.params
        by_rule = tuple(nm for nm in names if cover is None or targets.attr[nm] in cover)
        dims = tuple(d for d in rule.sample_dims(m, x) if 0 <= d < x.dim() and x.shape[d] == n)
        return ModulePlan(rule=by_rule, layer=tuple(nm for nm in names if nm not in by_rule), candidates=dims)
    return ModulePlan(layer=names)
