"""One module's sums from its captured input ``a`` and the δ of its outputs: through its rule, or
through the per-layer fallback; and the column accumulators of a K-column run.

The rule sees the sample axis first in both ``a`` and δ (moved there from the axis the self-check
found) and a :class:`~.quantity.Request`; with K cotangent columns, δ has a column axis in front.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional

import torch

from .layer_fallback import layer_sums, masked_layer_sums
from .plan import Axes, ModulePlan, Targets
from .policy import Policy
from .quantity import KronBlock, Quantity, Request
from .rules import rule_for
from .sums import acc_dtype

__all__ = ["ModuleSums", "Columns"]


class Columns:
    """The column accumulators of one K-column run: granted in the order the backward reaches
    the modules, while their state fits ``budget`` bytes; their sums come at the run's end."""

    def __init__(self, k: int, budget: int):
        self.k = k
        self.left = budget
        self.acc: Dict = {}  # module -> accumulator or None


class ModuleSums:
    """``(values, totals)`` of a module's rule and per-layer names, keyed by parameter name, or
    None when the per-layer fallback cannot run. ``warn({name: why})`` reports such a failure."""

    def __init__(self, targets: Targets, quantities: Dict[str, Quantity], policy: Policy, warn: Callable):
        self.targets = targets
        self.quantities = quantities  # each parameter's quantity (:meth:`.quantity.Quantity.for_param`)
        self.policy = policy
        self.warn = warn
        self.columns: Optional[Columns] = None
        # how many times the current piece of cotangents counts the layers' inputs (KronBlock)
        self.input_scale = 1.0

    def __call__(self, m, plan: ModulePlan, call, axes: Axes, deltas: list, batched: bool, total: bool):
        params, attr = self.targets.params, self.targets.attr
        values: Dict = {}
        totals: Dict = {}
        dt = acc_dtype(params[plan.used[0]].dtype)
        if plan.rule:
            rule = rule_for(m)
            quantity = self.quantities[plan.rule[0]]
            ax = axes.inputs[0]
            off = 1 if batched else 0
            d = deltas[0]
            if d is None:  # the output does not reach the loss
                for nm in plan.rule:
                    shape = self.quantities[nm].value_shape(attr[nm], params[nm])
                    values[nm] = torch.zeros(shape, dtype=dt, device=params[nm].device)
                    totals[nm] = torch.zeros(params[nm].shape, dtype=dt, device=params[nm].device)
            else:
                a = call.first.movedim(ax, 0)
                if a.is_floating_point():
                    a = a.to(dt)
                d = d.movedim(ax + off, off).to(dt)
                want = {attr[nm]: nm for nm in plan.rule}
                if isinstance(quantity, KronBlock):  # a layer's Kronecker block: its rows, not its rule
                    res = quantity.sums(m, a, d, set(want), total, batched, self.input_scale)
                    values.update({nm: res.values[a_] for a_, nm in want.items()})
                    if total:
                        totals.update({nm: res.totals[a_] for a_, nm in want.items()})
                    want = {}
                acc = None if total or not want else self._accumulator(m, rule, quantity, a, d, set(want), batched)
                if acc is not None:
                    acc.add(d if batched else d.unsqueeze(0))  # its names come at the run's end
                    want = {a_: nm for a_, nm in want.items() if a_ not in acc.covers}
                if want:
                    req = Request(quantity, frozenset(want), total, self.policy)
                    res = rule.column_sums(m, a, d, req) if batched else rule.sums(m, a, d, req)
                    for a_, nm in want.items():
                        if a_ in res.values:
                            values[nm] = res.values[a_]
                        if total and a_ in res.totals:
                            totals[nm] = res.totals[a_]
        if plan.layer:
            attrs = [attr[nm] for nm in plan.layer]
            ps = [params[nm] for nm in plan.layer]
            args = (m, attrs, ps, call, axes, deltas, batched, dt, self.quantities[plan.layer[0]])
            try:
                try:
                    v, t = layer_sums(*args, self.policy.chunk_size)
                except Exception:  # noqa: BLE001 - e.g. no vmap rule for the per-sample call
                    v, t = masked_layer_sums(*args)
            except Exception as exc:  # noqa: BLE001 - any failure: the exact whole-model path
                self.warn({nm: f"the per-layer fallback failed ({type(exc).__name__}: {exc})" for nm in plan.layer})
                return None
            values.update({nm: v[a_] for a_, nm in zip(attrs, plan.layer)})
            totals.update({nm: t[a_] for a_, nm in zip(attrs, plan.layer)})
        return values, (totals if total else None)

    def _accumulator(self, m, rule, quantity, a, d, want, batched):
        """The rule's accumulator for module m in this K-column run (created at its first piece
        within what is left of the budget), or None."""
        cols = self.columns
        if cols is None or not self.policy.column_accumulators:
            return None
        if m not in cols.acc:
            shape = tuple(d.shape[1:] if batched else d.shape)
            req = Request(quantity, frozenset(want), False, self.policy, columns=cols.k)
            acc = rule.column_accumulator(m, a, shape, req)
            if acc is not None and acc.nbytes > cols.left:
                acc = None
            if acc is not None:
                cols.left -= acc.nbytes
            cols.acc[m] = acc
        return cols.acc[m]
