"""The engine: sums over samples of per-sample gradient terms (Σ_n |g_n|^p) from one backward.

For a minibatch of independent samples (model in eval mode), the gradient of the *sum* of the
per-sample losses with respect to a layer's output, δ, holds along the sample axis exactly sample
n's gradient at that output. With the layer's input ``a`` (captured by a forward hook) a *rule*
(:mod:`.rules`) turns (a, δ) into the layer's sums without forming per-sample gradients where an
identity allows (``nn.Linear``: Σ_n (δ_n a_nᵀ)² = (δ²)ᵀ a²).

One batch, the fast path (:meth:`PerSampleGradNorms._run`):

1. the forward records each hooked module's call (:mod:`.hooks`);
2. each module gets a plan (:mod:`.plan`): its rule, the per-layer fallback, or the whole-model
   fallback;
3. one backward of the summed losses, streamed (:mod:`.stream`): each module's δ goes to its rule
   as the backward reaches it (:mod:`.module_sums`) and its sums into the running totals
   (:mod:`.sums`);
4. parameters no rule can take go to the whole-model fallback (:mod:`.model_fallback`).

The first batch, and each batch whose shape signature is new, runs the self-check (:mod:`.check`)
instead of step 3: it finds each module's sample axis and compares every rule's Σ_n g_n with the
true minibatch gradient. K cotangents per sample (the exact expected Fisher) are backpropagated in
vmapped pieces, or one streamed column at a time. How big the chunks, pieces and budgets are is
the pass's :class:`~.policy.Policy`.
"""

from __future__ import annotations

import math
import operator
from typing import Callable, Dict, Iterable, Optional

import torch
from torch import Tensor, nn

from .check import NO_AXIS, SelfCheck, split_streamed
from .diagnostics import check_graph, check_packed, list_names, warn_coupled, warn_fallback
from .hooks import Recorder
from .model_fallback import FUNC_ADVICE, explain_func_failure, model_sums
from .module_sums import Columns, ModuleSums
from .plan import ModulePlan, Targets, plan_module
from .policy import Policy, default_policy
from .quantity import PowerSum, Quantity
from .stream import grads, stream
from .sums import AddInto, Discard, Totals, even_size, sum_first

__all__ = ["PerSampleGradNorms"]


class PerSampleGradNorms:
    """Context manager. Installs forward hooks on the modules that own the requested parameters
    (capturing their inputs and the gradient edges of their outputs).

    Usage::

        with PerSampleGradNorms(model, names, power=2) as acc:
            for x, y in loader:
                losses = F.cross_entropy(model(x), y, reduction="none")
                acc.backward(losses, fallback=...)   # fallback needed iff acc.model_fallback_names
        fisher_sum = acc.sums

    ``backward_batched(outputs, cotangents, fallback=...)`` does K cotangents per sample in
    vmapped pieces or one streamed column at a time (the exact expected Fisher). Neither touches
    ``param.grad``. Captures of a forward are discarded at the next forward after a backward (so
    several ``backward(retain_graph=True)`` calls can share one forward), and on exit.

    :param power: the quantity Σ_n |g_n|^power (1 or 2) unless ``quantity`` is given.
    :param chunk_size: overrides the policy's ``chunk_size``.
    :param check: ``"signature"`` (the self-check on the first batch and on new shape signatures)
        or ``"always"``.
    :param max_bytes: overrides the policy's ``column_bytes``.
    :param policy: the :class:`~.policy.Policy`; default that of the parameters' device.
    :param quantity: what to sum (:mod:`.quantity`), e.g. ``GradientSum()``.
    """

    def __init__(self, model: nn.Module, names: Iterable[str], power: int = 2, chunk_size: Optional[int] = None,
                 check: str = "signature", max_bytes: Optional[int] = None, *, policy: Optional[Policy] = None,
                 quantity: Optional[Quantity] = None):
        self.quantity = PowerSum(power) if quantity is None else quantity
        if chunk_size is not None:
            try:
                ok = not isinstance(chunk_size, bool) and operator.index(chunk_size) >= 1
            except TypeError:
                ok = False
            if not ok:
                raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
            chunk_size = int(operator.index(chunk_size))
        if check not in ("signature", "always"):
            raise ValueError(f"check must be 'signature' or 'always', got {check!r}")
        if max_bytes is not None and (isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1):
            raise ValueError(f"max_bytes must be a positive int, got {max_bytes!r}")
        if policy is not None and not isinstance(policy, Policy):
            raise TypeError(f"policy must be a Policy, got {type(policy).__name__}")
        self.model = model
        self.check_mode = check

        all_params = dict(model.named_parameters())
        self.names: list = list(dict.fromkeys(names))
        unknown = [n for n in self.names if n not in all_params]
        if unknown:
            raise ValueError(f"not parameters of the model: {unknown}")
        frozen = [n for n in self.names if not all_params[n].requires_grad]
        if frozen:
            raise ValueError(f"parameters with requires_grad=False requested: {frozen}")
        self._params: Dict[str, nn.Parameter] = {n: all_params[n] for n in self.names}

        if policy is None:
            device = next(iter(self._params.values())).device if self._params else torch.device("cpu")
            policy = default_policy(device)
        if chunk_size is not None:
            policy = policy.replace(chunk_size=chunk_size)
        if max_bytes is not None:
            policy = policy.replace(column_bytes=max_bytes)
        self.policy = policy

        self.targets = Targets(model, self.names, self._params)
        # each parameter's own quantity: the pass's, or a layer's block of a quantity of layers
        self.quantities: Dict[str, Quantity] = {}
        for m, nms in self.targets.modules.items():
            attrs = {self.targets.attr[nm] for nm in nms}
            for nm in nms:
                self.quantities[nm] = self.quantity.for_param(m, self.targets.attr[nm], attrs)
        self.totals = Totals(self._params, {nm: q.value_shape(self.targets.attr[nm], self._params[nm])
                                            for nm, q in self.quantities.items()})
        self.recorder = Recorder(model, self.targets.modules)
        self.selfcheck = SelfCheck(self._params, self.quantity, policy.reduction_piece, self.quantities,
                                   self.totals.shapes)
        self._warned: set = set()
        self.module_sums = ModuleSums(self.targets, self.quantities, policy,
                                      lambda why: warn_fallback(why, self._warned))
        self._entered = False
        self._failed: Dict[str, str] = {}  # name -> why it went to the whole-model fallback
        self._axes: dict = {}  # shape signature -> {module: Axes} (found by the self-check)
        self._model_why: Dict[str, str] = {}
        self.checked_batches = 0
        self._last_nonrule: set = set()
        self._last_model: set = set()

    # ------------------------------------------------------------------ context management
    def __enter__(self) -> "PerSampleGradNorms":
        if self._entered:
            raise RuntimeError("PerSampleGradNorms is already active")
        self._entered = True
        try:
            self.recorder.install()
        except BaseException:
            self._entered = False
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.recorder.remove()
        self._entered = False

    @property
    def sums(self) -> Dict[str, Tensor]:
        """The running sums ``{name: Tensor}`` (float32 for half-precision parameters)."""
        return self.totals.sums

    @property
    def power(self) -> Optional[int]:
        return getattr(self.quantity, "power", None)

    def reset(self) -> None:
        """Zero the accumulated sums."""
        self.totals.reset()

    # ------------------------------------------------------------------ which path
    def _plan(self, m: nn.Module, n: int) -> ModulePlan:
        rec = self.recorder
        return plan_module(self.targets, m, rec.calls.get(m, []), rec.coupled, self._failed, n)

    def _names_off_the_rules(self, model_only: bool) -> list:
        bad = set(self.targets.static_fallback) | set(self._failed)
        bad |= self._last_model if model_only else self._last_nonrule
        rec = self.recorder
        if rec.current:
            n = rec.n_hint if rec.n_hint is not None else -1
            for m in self.targets.modules:
                if m in rec.calls:
                    plan = self._plan(m, n)
                    bad.update(plan.model if model_only else plan.layer + plan.model)
        return [x for x in self.names if x in bad]

    @property
    def fallback_names(self) -> list:
        """Parameters not computed by a closed-form rule (per-layer or whole-model fallback), as
        planned for the current forward, else as done in the latest backward."""
        return self._names_off_the_rules(model_only=False)

    @property
    def model_fallback_names(self) -> list:
        """Parameters that need the caller's whole-model ``fallback`` (known so far)."""
        return self._names_off_the_rules(model_only=True)

    # ------------------------------------------------------------------ main entries
    def backward(self, per_sample_losses: Tensor, *, retain_graph: bool = False,
                 fallback: Optional[Callable[[dict], Tensor]] = None) -> None:
        """Add Σ_n |∂ per_sample_losses[n] / ∂θ|^power to ``self.sums`` for every requested θ.

        ``fallback(params) -> per-sample losses`` recomputes the losses with some parameters
        substituted (``torch.func.functional_call``); needed for the whole-model fallback."""
        self._require_entered()
        losses = per_sample_losses
        if not isinstance(losses, Tensor) or losses.dim() != 1:
            shape = tuple(losses.shape) if isinstance(losses, Tensor) else type(losses).__name__
            raise ValueError(f"per_sample_losses must have shape [N], got {shape}")
        self._run(losses, torch.ones_like(losses), False, retain_graph, fallback)

    def backward_batched(self, outputs: Tensor, cotangents: Tensor, *, retain_graph: bool = False,
                         fallback: Optional[Callable[[dict], Tensor]] = None) -> None:
        """Add Σ_{k,n} |∂ <outputs[n], cotangents[k, n]> / ∂θ|^power for every requested θ.

        ``outputs`` is ``[N, ...]`` and ``cotangents`` ``[K, N, ...]`` (no gradient): K
        per-sample "losses" ``<outputs[n], cotangents[k, n]>`` backpropagated together in
        vmapped pieces (``is_grads_batched``) that fit the size of the running sums and the
        policy's ``column_bytes``, else (or where that is not supported) one column at a time over
        the one forward. ``fallback(params) -> outputs``."""
        self._require_entered()
        if not isinstance(outputs, Tensor) or outputs.dim() < 1:
            raise ValueError("outputs must be a tensor [N, ...]")
        if not isinstance(cotangents, Tensor) or cotangents.shape[1:] != outputs.shape:
            got = tuple(cotangents.shape) if isinstance(cotangents, Tensor) else type(cotangents).__name__
            raise ValueError(f"cotangents must have shape [K, *outputs.shape] = [K, {', '.join(map(str, outputs.shape))}], "
                             f"got {got}")
        self._run(outputs, cotangents.detach().to(outputs.dtype), True, retain_graph, fallback)

    def _require_entered(self):
        if not self._entered:
            raise RuntimeError("PerSampleGradNorms.backward() must be called inside the `with` block")

    # ------------------------------------------------------------------ one batch
    def _signature(self, n: int, k: int):
        return (n, k, tuple(
            (id(m), len(cs), tuple((tuple(c.first.shape) if c.first is not None else None,
                                    tuple(c.out_shapes)) for c in cs))
            for m, cs in self.recorder.calls.items()))

    def _col_bytes(self, elem: int) -> int:
        """Bytes of one cotangent column's gradients at every captured layer output."""
        calls = self.recorder.calls
        return sum(math.prod(sh) for cs in calls.values() for c in cs for sh in c.out_shapes) * elem

    def _col_step(self, k: int, elem: int) -> int:
        """Cotangent columns per batched backward: the policy's ``columns_per_backward``, else as
        many as keep their gradients at the captured layer outputs (all held at the end of that
        backward) within the size of the running sums and ``column_bytes``; pieces of equal size."""
        if self.policy.columns_per_backward is not None:
            return self.policy.columns_per_backward
        budget = min(self.policy.column_bytes, sum(t.numel() * t.element_size() for t in self.sums.values()))
        return even_size(k, budget // max(self._col_bytes(elem), 1))

    def _run(self, root: Tensor, cot: Tensor, batched: bool, retain_graph: bool, fallback) -> None:
        rec, targets, policy = self.recorder, self.targets, self.policy
        n = int(root.shape[0])
        k = int(cot.shape[0]) if batched else 0
        rec.n_hint = n
        sig = self._signature(n, k)
        check = self.check_mode == "always" or sig not in self._axes
        check_graph(root, check, rec.forward_grad, rec.nograd, targets)
        all_cot = cot
        # pieces: (cotangent, whether it holds several columns, the weight of its sums)
        pieces: list = []
        if check and batched:
            # K cotangents: the check runs once, streamed, on their sum <root, Σ_k cot_k> (a
            # per-sample loss too). With a column-invariant quantity (power 2), Σ_k cot_k is a
            # column of an orthogonal change of the columns (times √K): its sums count 1/K and
            # K - 1 columns are left (sum_first). Otherwise its sums are not the wanted ones:
            # weight 0, dropped.
            weight = 1.0 / k if self.quantity.column_invariant and k > 1 else 0.0
            pieces.append((cot.sum(0), False, weight))
            if weight:
                cot, k = sum_first(cot), k - 1
        if batched:
            step = self._col_step(k, root.element_size())
            if step > 1:
                pieces += [(cot[s:s + step], True, 1.0) for s in range(0, k, step)]
            else:  # one column's δ at every layer fills the budget: one column at a time, streamed
                pieces += [(c, False, 1.0) for c in cot.unbind(0)]
        else:
            pieces.append((cot, False, 1.0))
        model_names: set = set(targets.static_fallback) | set(self._failed)
        layer_names: set = set()
        self._model_why = {nm: "it is shared with another module or owned by the root module"
                           for nm in targets.static_fallback}
        self._model_why.update(self._failed)
        out: Dict[str, Tensor] = {}
        try:
            rec.busy = True
            # Column accumulators (rules that sum K columns better together than piece by piece)
            # share as much state as one column's δ at every layer, or one chunk's bytes if that is
            # more, and at most column_bytes; granted in the order the backward reaches the layers.
            # (The check's piece forms totals too, which the accumulators do not: it uses none.)
            budget = min(policy.column_bytes, max(self._col_bytes(root.element_size()), policy.chunk_bytes))
            self.module_sums.columns = Columns(k, budget) if batched else None
            inputs_counted = False
            for i, (piece, piece_batched, weight) in enumerate(pieces):
                plans = {m: self._plan(m, n) for m in targets.modules}
                if i == 0:
                    check_packed(plans, rec.calls, targets)
                for plan in plans.values():
                    model_names.update(plan.model)
                    layer_names.update(plan.layer)
                    for nm in plan.model:
                        self._model_why.setdefault(nm, plan.why)
                # With a fallback for what may move, each module's sums go into the running sums
                # as soon as they are final, so no per-batch copy of the parameters' size is held.
                # Kept per batch: modules with per-layer-fallback names (that fallback may fail
                # on a later column piece and move the module), and everything without a
                # fallback (a failing call must leave the sums untouched).
                if weight:
                    keep = set(self.names) if fallback is None else {
                        nm for p in plans.values() if p.layer for nm in p.used}
                    part = AddInto(self.totals, keep, weight)
                else:
                    part = Discard()
                # a batch's inputs count once: in its first piece that counts, whatever its weight
                self.module_sums.input_scale = 1.0 / weight if weight and not inputs_counted else 0.0
                inputs_counted = inputs_counted or bool(weight)
                if check and i == 0:
                    self.checked_batches += 1
                    moved = self._checked_pass(root, piece, plans, part, sig)
                else:
                    last = i == len(pieces) - 1
                    moved = self._fast_pass(root, piece, piece_batched, retain_graph or not last, plans,
                                            self._axes[sig], part)
                model_names.update(moved)
                for nm, v in part.items():
                    out[nm] = v if nm not in out else out[nm] + v
            columns = self.module_sums.columns
            for m, acc in (columns.acc.items() if columns is not None else ()):
                if acc is not None:
                    by_attr = {targets.attr[nm]: nm for nm in targets.modules[m]}
                    for attr, v in acc.result().items():
                        nm = by_attr[attr]
                        out[nm] = v if nm not in out else out[nm] + v
            for nm in model_names:
                out.pop(nm, None)  # partial sums from columns done before it moved
            model_list = [x for x in self.names if x in model_names]
            self._refuse_blocks(model_list, layer_names)
            self._last_model = set(model_list)
            self._last_nonrule = set(model_list) | layer_names
            if model_list:
                out.update(self._whole_model(fallback, model_list, n, all_cot if batched else None))
        finally:
            rec.busy = False
            self.module_sums.columns = None
            if not retain_graph:
                rec.calls.clear()
            rec.mark_stale()
        for name, v in out.items():
            self.totals.add(name, v)

    def _fast_pass(self, root, cot, batched, retain, plans, axes, sink) -> list:
        """One backward of ``<root, cot>`` (``batched``: K columns in front) whose δ go to the
        modules' rules as it reaches them; their sums go to ``sink``. Returns the names that move
        to the whole-model fallback."""
        calls = self.recorder.calls
        used = [m for m, p in plans.items() if p.used]
        mods = [m for m in used if m in axes]
        moved = [nm for m in used if m not in axes for nm in plans[m].used]

        def take(m, deltas):
            res = self.module_sums(m, plans[m], calls[m][0], axes[m], deltas, batched, False)
            if res is None:
                moved.extend(plans[m].used)
            else:
                sink.update(res[0])

        if batched:  # K columns in one vmapped backward: every δ comes back at the end
            multi = mods
            deltas = grads(root, cot, [e for m in mods for e in calls[m][0].edges], True, retain)
        else:
            single, multi, edges = split_streamed(mods, calls)
            deltas = stream(root, cot, {m: calls[m][0].edges[0] for m in single}, edges,
                            lambda m, d: take(m, [d]), retain)
        i = 0
        for m in multi:
            ne = len(calls[m][0].edges)
            take(m, deltas[i:i + ne])
            i += ne
        return moved

    def _checked_pass(self, root, cot, plans, sink, sig) -> list:
        """The self-check's backward (:mod:`.check`): finds the sample axes (kept for this shape
        signature) and moves the names whose sums disagree with the true gradient."""
        calls = self.recorder.calls

        def module_sums(m, plan, axes, deltas):
            return self.module_sums(m, plan, calls[m][0], axes, deltas, False, True)

        moved, why, axes = self.selfcheck.run(root, cot, plans, calls, sink, self.totals, module_sums)
        for nm in moved:
            if nm in why and why[nm] != NO_AXIS:
                self._failed[nm] = why[nm]
        for nm, w in why.items():
            self._model_why.setdefault(nm, w)
        # a missing sample axis (e.g. a head that sees a subset of the batch) is structural, not an error
        warn_fallback({nm: w for nm, w in why.items() if w != NO_AXIS}, self._warned)
        self._axes[sig] = axes
        return moved

    def _refuse_blocks(self, model_list, layer_names) -> None:
        """A layer's Kronecker block has no per-sample term: no fallback can compute it."""
        bad = [nm for nm in model_list + sorted(layer_names)
               if nm in self.quantities and not self.quantities[nm].per_sample]
        if bad:
            m = self.targets.owner[bad[0]]
            why = self._model_why.get(bad[0], "its rule does not support this call")
            raise RuntimeError(
                f"Kronecker factors: {self.targets.describe(m)} cannot be computed from its input and output "
                f"gradient ({why}), and a Kronecker block has no per-sample fallback; leave its parameters out "
                f"of the selection or use a diagonal importance (e.g. 'expected_fisher') for this model")

    # ------------------------------------------------------------------ whole-model fallback
    def _whole_model(self, fallback, model_list: list, n: int, cot: Optional[Tensor]) -> Dict[str, Tensor]:
        targets = self.targets
        for nm in model_list:
            self._model_why.setdefault(nm, "its rule or the per-layer fallback could not be used on this batch")
        warn_coupled(model_list, self.recorder.coupled, targets, self.recorder.n_hint, self._warned, self._model_why)
        if fallback is None:
            raise ValueError(f"these parameters need a fallback (pass fallback=...): {model_list}")
        sparse = [nm for nm in model_list if nm in targets.sparse_holder]
        if sparse:
            nm = sparse[0]
            raise RuntimeError(
                f"per-sample importances: parameter {nm!r} of {targets.describe(targets.sparse_holder[nm])} "
                f"needs per-sample gradients of the whole model by torch.func ({self._model_why[nm]}), and "
                "torch.func does not support the sparse gradients of sparse=True; construct the layer with "
                "sparse=False, or " + FUNC_ADVICE)

        def failed(exc: BaseException, where) -> None:
            m, packed = where if where is not None else (None, False)
            desc = targets.describe(m) if m is not None else ""
            reasons = "; ".join(dict.fromkeys(self._model_why[nm] for nm in model_list if nm in self._model_why))
            raise RuntimeError(
                f"per-sample importances: parameters {list_names(model_list)} need per-sample gradients of the "
                f"whole model by torch.func{f' ({reasons})' if reasons else ''}, and torch.func failed"
                f"{f' in {desc}' if desc else ''}: " + explain_func_failure(exc, desc, packed)) from exc

        params = {nm: self._params[nm] for nm in model_list}
        return model_sums(self.model, fallback, params, n, cot, self.quantity, self.policy.chunk_size, failed)
