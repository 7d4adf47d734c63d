"""The self-check: on the first batch and whenever the batch's shape signature changes, each
module's sample axis is found and every rule's Σ_n g_n is compared with the true minibatch gradient.

**Sample axis.** Candidates are the input dimensions the rule allows whose size is the number of
samples N. A second backward with the losses weighted by random r_n > 0 tells which one carries the
sample index: |δ| summed over the other dimensions scales by r_n along it, and along no other.
Only those per-axis sums (N numbers an axis) are kept from that backward.

**Totals.** The backward of the summed losses gives Σ_n g_n, the ordinary gradient, as well. Each
parameter's true gradient is compared with its rule's Σ_n g_n as soon as autograd produces it (a
tensor hook on the parameter) and then dropped, so the check holds one module's sums and one
parameter's gradient at a time. A parameter that disagrees beyond float tolerance -- a tied
weight also used outside its module, a hook that changes the layer's output, a wrong rule -- moves
to the whole-model fallback for the rest of the pass.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten

from .plan import Axes, ModulePlan
from .quantity import Quantity
from .stream import stream
from .sums import AddInto, Totals, abs_sums64, all_finite, diff_norm, sum64

__all__ = ["SelfCheck", "NO_AXIS"]

#: why a module's names move when no axis carries the sample index (structural, not an error)
NO_AXIS = "no input/output axis carries the sample index unambiguously"


def _tolerance(dtype: torch.dtype) -> tuple:
    """(relative tolerance on the totals, multiple of Σ_n ||g_n||) for the comparison."""
    if dtype == torch.float64:
        return 1e-7, 1e-12
    if dtype == torch.float32:
        return 1e-3, 1e-5
    return 5e-2, 1e-2


def split_streamed(mods, calls):
    """(modules with one output edge: streamed, the others, the others' edges: requested)."""
    single = [m for m in mods if len(calls[m][0].edges) == 1]
    multi = [m for m in mods if len(calls[m][0].edges) != 1]
    return single, multi, [e for m in multi for e in calls[m][0].edges]


class SelfCheck:
    """The check of a pass over ``params`` ({name: parameter}) summing ``quantity``;
    ``piece``: elements per piece of its float64 reductions."""

    def __init__(self, params: Dict[str, Tensor], quantity: Quantity, piece: int,
                 quantities: Optional[Dict[str, Quantity]] = None, shapes: Optional[Dict[str, tuple]] = None):
        self.params = params
        self.quantity = quantity
        self.quantities = quantities or {}  # a parameter's own quantity, where not ``quantity``
        self.shapes = shapes or {}  # the shape of a parameter's sums, where not the parameter's
        self.piece = piece
        self.gen = torch.Generator().manual_seed(1234)

    def run(self, root: Tensor, cot: Tensor, plans: Dict, calls: Dict, sink, totals: Totals,
            module_sums: Callable) -> tuple:
        """One backward of ``<root, cot>`` (one cotangent per sample) that also finds each
        module's sample axis and checks its sums against the true gradient; agreeing sums go to
        ``sink``. ``module_sums(m, plan, axes, deltas)`` gives a module's ``(values, totals)``, or
        None. Returns ``(moved names, {name: why}, {module: Axes})``."""
        mods = [m for m, p in plans.items() if p.used]
        names = [nm for m in mods for nm in plans[m].used]
        names += [nm for p in plans.values() for nm in p.zero]
        params = [self.params[nm] for nm in names]
        n = root.shape[0]
        # 1. which axis carries the sample index: with the losses weighted by random r_n > 0,
        #    |δ| scales by r_n along it. Only per-axis sums of |δ_r| are kept (O(N) per axis).
        r = torch.rand(n, generator=self.gen, dtype=torch.float64).add_(0.5).to(root.dtype).to(root.device)
        rcot = cot * r.view(n, *([1] * (cot.dim() - 1)))
        # 2. δ and the true gradient of the requested parameters: each module's axis is found and
        #    its sums formed as its δ arrives; each parameter's true gradient is compared with its
        #    rule's Σ_n g_n as soon as autograd has it (a tensor hook on the parameter), then
        #    dropped: one module's sums and one parameter's truth are held at a time.
        moved: list = []
        why: Dict[str, str] = {}
        found: dict = {}  # module -> (values, totals)
        axes: dict = {}

        def take(m, d, rd):
            plan = plans[m]
            ax = self.find_axes(plan, calls[m][0], d, rd, r, n)
            if ax is None:
                for nm in plan.used:
                    moved.append(nm)
                    why[nm] = NO_AXIS
                return
            axes[m] = ax
            res = module_sums(m, plan, ax, d)
            if res is None:
                for nm in plan.used:
                    moved.append(nm)
                    why[nm] = "the per-layer fallback could not run on this module"
                return
            if isinstance(sink, AddInto):
                # Sums still zero (the first checked batch): add now, before the check, so the
                # module's sums are not held while its true gradient is computed. A failed check
                # zeroes them again, exactly.
                for nm in plan.used:
                    if (nm in res[0] and nm not in sink.keep and nm not in totals.touched
                            and res[0][nm].shape == totals.sums[nm].shape):
                        sink[nm] = res[0].pop(nm)
                        totals.provisional.add(nm)
            found[m] = res

        def axis_sums(gs):
            return [None if g is None else self.axis_sums(g, n) for g in gs]

        single, multi, edges = split_streamed(mods, calls)
        streamed = {m: calls[m][0].edges[0] for m in single}
        rsum: dict = {}

        def keep_rsum(m, d):
            rsum[m] = axis_sums([d])

        rmulti = stream(root, rcot, streamed, edges, keep_rsum, True)
        owner = {nm: m for m in mods for nm in plans[m].used}
        late: dict = {}
        compared: set = set()

        def on_truth(nm, g):
            sparse = g.is_sparse  # nn.Embedding(sparse=True): compared densely
            if sparse:
                g = g.to_dense()
            m = owner.get(nm)
            if m is None:  # hooked but not called: any gradient means direct use
                if bool((g != 0).any()):
                    moved.append(nm)
                    why[nm] = "it receives gradient outside its module's call"
            elif m in found:
                compared.add(nm)
                self.compare({m: found[m]}, plans, {nm: g}, n, sink, totals, moved, why, only=(nm,))
            else:
                late[nm] = g if sparse else g.clone()
            return None if sparse else g.new_zeros(()).expand(g.shape)  # nothing kept by autograd.grad

        handles = [self.params[nm].register_hook(lambda g, nm=nm: on_truth(nm, g)) for nm in names]
        try:
            both = stream(root, cot, streamed, params + edges, lambda m, d: take(m, [d], rsum.pop(m)), True)
        finally:
            for h in handles:
                h.remove()
        dmulti = both[len(params):]
        i = 0
        for m in multi:
            ne = len(calls[m][0].edges)
            take(m, dmulti[i:i + ne], axis_sums(rmulti[i:i + ne]))
            i += ne
        del both, dmulti, rmulti
        rest = {nm: late.get(nm) for nm in owner if nm not in compared}
        self.compare(found, plans, rest, n, sink, totals, moved, why, only=tuple(rest))
        return moved, why, axes

    # ------------------------------------------------------------------ totals against the truth
    def compare(self, found, plans, truth, count, sink, totals: Totals, moved, why, only=None) -> None:
        """Sums of ``found`` modules against the true gradients: agreeing names go to ``sink``,
        the others to ``moved`` (with the reason in ``why``). ``only``: these names."""
        for m, (values, tots) in found.items():
            for nm in plans[m].used:
                if only is not None and nm not in only:
                    continue
                early = nm in totals.provisional
                totals.provisional.discard(nm)
                ok, reason = self.agrees(nm, totals.sums[nm] if early else values.get(nm), tots.pop(nm, None),
                                         truth.get(nm), count)
                if ok:
                    if not early:
                        sink[nm] = values.pop(nm)
                else:
                    if early:
                        totals.sums[nm].zero_()
                        totals.touched.discard(nm)
                    values.pop(nm, None)
                    moved.append(nm)
                    why[nm] = reason

    def agrees(self, name, values, total, truth, count) -> tuple:
        p = self.params[name]
        if values is None or total is None:
            return False, "its rule returned no gradient for it"
        q = self.quantities.get(name, self.quantity)
        if tuple(total.shape) != tuple(p.shape) or tuple(values.shape) != self.shapes.get(name, tuple(p.shape)):
            return False, f"its rule returned shape {tuple(total.shape)}, the parameter has {tuple(p.shape)}"
        # norms in the sums' dtype (no float64 copies of large parameters); scalars in float64,
        # read back to the host together (one synchronisation a parameter on a GPU)
        s, piece = total, self.piece
        s_norm = s.norm().to(torch.float64)
        stats = [all_finite(s, piece).to(torch.float64), s_norm,
                 s_norm if truth is None else diff_norm(s, truth, piece),
                 torch.zeros_like(s_norm) if truth is None else truth.norm().to(torch.float64),
                 sum64(values, piece)]
        finite, s_norm, diff, t_norm, vsum = torch.stack(stats).tolist()
        if not finite:
            return False, "its rule gave non-finite values"
        rel, abs_mult = _tolerance(p.dtype)
        bound = q.check_bound(values, vsum, count)  # Σ_n ||g_n||: the true sum's rounding scales with it
        tol = rel * (t_norm + s_norm) + abs_mult * bound + 1e-30
        if diff <= tol:
            return True, ""
        return False, (f"Σ_n g_n from its rule differs from the true minibatch gradient "
                       f"(relative error {diff / max(t_norm, 1e-30):.3g}): e.g. the parameter "
                       "is also used outside its module's call, a hook changes the module's output, "
                       "or the rule is wrong")

    # ------------------------------------------------------------------ sample axes
    def axis_sums(self, g: Tensor, n: int) -> dict:
        """{axis: Σ |g| over every other dimension} for each axis of size n."""
        return {ax: abs_sums64(g, ax, self.piece) for ax in range(g.dim()) if g.shape[ax] == n}

    def carries(self, dl, rsum, r, axis) -> bool:
        """|δ_r| summed over all but ``axis`` equals r ⊙ (|δ| summed the same way)?"""
        if rsum is None or axis not in rsum:
            return False
        want = abs_sums64(dl, axis, self.piece) * r.to(torch.float64)
        tol = {torch.float64: 1e-9, torch.float32: 1e-4}.get(dl.dtype, 3e-2)
        return bool((rsum[axis] - want).norm() <= tol * want.norm() + 1e-300)

    def find_axes(self, plan: ModulePlan, call, d, rd, r, n) -> Optional[Axes]:
        """The module's :class:`Axes` from δ (``d``) and the weighted δ's axis sums (``rd``), or None."""
        if plan.rule and not plan.layer:
            cands = plan.candidates
            dl, rdl = d[0], rd[0]
            if dl is None:  # output does not reach the loss: any candidate does
                return Axes((cands[0],), (cands[0],)) if cands else None
            good = [a for a in cands if a < dl.dim() and dl.shape[a] == n and self.carries(dl, rdl, r, a)]
            if len(good) != 1:
                return None
            return Axes((good[0],), (good[0],))
        # per-layer fallback: each input leaf's axis by size (unique) and each output's by δ
        in_axes = []
        leaves, _ = tree_flatten((call.args, call.kwargs))
        for x in leaves:
            if not isinstance(x, Tensor) or x.dim() == 0:
                in_axes.append(None)
                continue
            dims = [j for j in range(x.dim()) if x.shape[j] == n]
            if len(dims) > 1:
                return None
            in_axes.append(dims[0] if dims else None)
        if all(a is None for a in in_axes):
            return None
        out_axes = []
        for dl, rdl, shape in zip(d, rd, call.out_shapes):
            if dl is None:  # this output does not reach the loss
                out_axes.append(None)
                continue
            dims = [j for j in range(len(shape)) if shape[j] == n]
            good = [j for j in dims if self.carries(dl, rdl, r, j)]
            if len(good) != 1:
                return None
            out_axes.append(good[0])
        return Axes(tuple(in_axes), tuple(out_axes))
