"""Penalty kernels: ``factor * (sum_i A_i * (theta_i - mu_i)**2 + c)``.

Framework-free (torch only). Three implementations of one kernel, as in ``torch/optim``:

* ``compiled``: the per-parameter loop below compiled by Inductor (the compiler behind
  ``torch.compile``), once per signature of its inputs. Each parameter is one fused loop that
  reads theta, mu and A once and produces both the value and the gradient
  ``2 * factor * A * (theta - mu)``: 4 memory passes per entry instead of 8. Where no compiler works
  (no C compiler, an unsupported platform) it falls back to ``forloop`` on the first call, with one
  warning, for the rest of the process;
* ``forloop``: the same arithmetic in eager mode, one short kernel chain per parameter
  (``sub``, ``addcmul``, ``dot``);
* ``foreach``: multi-tensor ``torch._foreach_*`` kernels, a handful of launches whatever the
  number of parameters (on CUDA, kernel launches are what costs).

Which one runs when ``impl`` is None is decided in :func:`default_impl`, the one place for this
choice (the measurements behind it: ``benchmarks/RESULTS.md``, section 1e).

All of them run inside one ``torch.autograd.Function``, so the penalty is an ordinary node of the
loss graph (other plugins see it in ``strategy.loss``; ``torch.autograd.grad`` works through it, and
so do second derivatives). The forward computes the gradient along with the value, and the backward
hands that tensor out as it is when the upstream gradient is 1 (the penalty added to a loss), or
scales it in place otherwise: no further pass over the parameters, and autograd adds it to the
loss's own gradient. Every gradient handed out is a fresh tensor of that forward; a second backward
through a retained graph recomputes it. Nothing here synchronises host and device.

``A`` must be non-negative (the foreach path reduces ``A * d**2`` with an L1 norm). Callers
(:class:`~avalanche_pcreg.state.ConsolidatedState`, :class:`~avalanche_pcreg.regularizer.ParameterChangeReg`)
validate this once, not every step.
"""

from __future__ import annotations

import warnings
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

__all__ = ["quadratic_penalty", "default_impl", "IMPLS"]

IMPLS = ("compiled", "forloop", "foreach")

# Tuning, in one place (benchmarks/RESULTS.md, section 1e, measured on a 2-core CPU, 1 thread):
# * CPU: ``compiled`` from COMPILE_MIN_NUMEL regularized entries on (MLP 784-400-400-10: 0.45-0.56 ms
#   a step against 0.65-0.69 ms for ``forloop``, within 0.02 of a step of the memory-traffic floor),
#   ``forloop`` below it: there a step's penalty costs tens of microseconds either way, and
#   compiling (about 5 s, once per process and model) would not pay back;
# * CUDA: ``foreach`` (section 5a: launches, not bytes, are what a GPU step pays for; ``compiled``
#   has not been measured on a GPU).
COMPILE_MIN_NUMEL = 1 << 16


def default_impl(tensors: Sequence[Tensor]) -> str:
    """The kernel used when ``impl`` is None: ``"foreach"`` on CUDA; on the CPU ``"compiled"`` for
    at least :data:`COMPILE_MIN_NUMEL` entries (unless compiling failed before), else ``"forloop"``."""
    if not tensors:
        return "forloop"
    if tensors[0].is_cuda:
        return "foreach"
    if _COMPILE_ERROR is None and sum(t.numel() for t in tensors) >= COMPILE_MIN_NUMEL:
        return "compiled"
    return "forloop"


def check_impl(impl: Optional[str]) -> Optional[str]:
    if impl is not None and impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS} or None, got {impl!r}")
    return impl


# ---------------------------------------------------------------------------------------- kernels
# Each kernel takes (params, weights, anchors, factor, const) and returns (v, grads, rest_scale):
# v = const + factor * sum A (theta - mu)**2 as a 0-dim tensor (const = factor * c, or None), the
# gradients (in the promoted dtype of theta and A), and a Python float the gradients still have to
# be multiplied by (1.0 when they already are 2 * factor * A * (theta - mu)).


def _fused_body(params, weights, anchors, two_f, const):
    """The arithmetic ``compiled`` compiles. Per parameter, one loop: g = 2f A (theta - mu) in the
    parameter's shape, and sum g (theta - mu) = 2f sum A (theta - mu)**2 over flat views of the same
    tensors (Inductor fuses a pointwise loop with a full reduction over the same range; a reduction
    over the original shape would be a separate loop)."""
    grads, parts = [], []
    for p, w, a in zip(params, weights, anchors):
        dtype = torch.promote_types(p.dtype, w.dtype)
        d = p.to(dtype) - a.to(dtype)
        g = w.to(dtype) * d * two_f
        grads.append(g)
        parts.append((g.reshape(-1) * d.reshape(-1)).sum())
    return const + torch.stack(parts).sum() * 0.5, grads


def _forloop(params, weights, anchors, factor: float, const=None) -> Tuple[Tensor, List[Tensor], float]:
    two_f = 2.0 * factor
    grads, dots = [], []
    for p, w, a in zip(params, weights, anchors):
        d = torch.sub(p, a)
        g = torch.addcmul(_zero(d), w, d, value=two_f)  # 2f A d, one pass (the 0-dim term broadcasts)
        grads.append(g)
        dots.append(torch.dot(g.reshape(-1), d.reshape(-1)))
    total = dots[0] if len(dots) == 1 else torch.stack(dots).sum()
    return (total * 0.5 if const is None else torch.add(const, total, alpha=0.5)), grads, 1.0


def _foreach(params, weights, anchors, factor: float, const=None) -> Tuple[Tensor, List[Tensor], float]:
    diffs = torch._foreach_sub(params, anchors)
    wdiffs = torch._foreach_mul(diffs, weights)
    torch._foreach_mul_(diffs, wdiffs)  # A * d**2 >= 0, so its L1 norm is its sum
    # accumulated in float64: a float32 L1 norm over millions of entries drifts by ~1e-4
    total = torch.stack(torch._foreach_norm(diffs, 1, dtype=torch.float64)).sum()
    # 2 * factor is applied in the backward, together with the upstream gradient (one pass)
    v = (total * factor).to(wdiffs[0].dtype)
    return (v if const is None else const + v), wdiffs, 2.0 * factor


_ZEROS: dict = {}


def _zero(like: Tensor) -> Tensor:
    key = (like.dtype, like.device)
    z = _ZEROS.get(key)
    if z is None:
        z = _ZEROS[key] = torch.zeros((), dtype=like.dtype, device=like.device)
    return z


# ---------------------------------------------------------------------------------------- compiled
# The fused body is traced once per signature of its inputs (shapes, strides, dtypes, device) and
# compiled by Inductor, the compiler behind ``torch.compile``, and called directly: the signature is
# checked here (by the caller that caches the kernel: once), not by Dynamo guards on every call,
# which cost more than the kernel's own launch overhead. Where the compiler does not work, the first
# failure is reported once and ``forloop`` computes the same penalty from then on.
_COMPILE_ERROR: Optional[str] = None
_KERNEL_CACHE: dict = {}
_SCALARS: dict = {}


class CompiledKernel:
    """The Inductor kernel of one input signature. ``broken`` once a call failed (inputs that no
    longer match the signature, e.g. other strides): its owner then asks :func:`compiled_kernel`
    for a new one."""

    __slots__ = ("fn", "key", "const_dtype", "broken")

    def __init__(self, fn, key, const_dtype):
        self.fn, self.key, self.const_dtype, self.broken = fn, key, const_dtype, False

    def run(self, params, weights, anchors, factor: float, const):
        """(value, gradients) for these inputs, or None when the call failed (then ``broken``)."""
        if const.dtype != self.const_dtype:  # the compiled code would read it as its own dtype
            return None
        two_f = _scalar(2.0 * factor, torch.float64, params[0].device)  # rounded to the kernel's dtype in it
        try:
            out = self.fn(*params, *weights, *anchors, two_f, const)
        except Exception:  # noqa: BLE001 - the eager kernel runs instead (and raises real errors)
            self.broken = True
            _KERNEL_CACHE.pop(self.key, None)
            return None
        return out[0], list(out[1:])


def _signature(params, weights, anchors, const):
    # the compiled code checks sizes and strides of its inputs, not their dtypes: those are in the key
    return tuple((t.shape, t.stride(), t.dtype) for ts in (params, weights, anchors) for t in ts) + (
        params[0].device, const.dtype, const.device)


def _build(params, weights, anchors, const, key) -> CompiledKernel:
    from torch._inductor import compile as inductor_compile
    from torch.fx.experimental.proxy_tensor import make_fx

    n = len(params)

    def flat(*args):
        v, grads = _fused_body(args[:n], args[n:2 * n], args[2 * n:3 * n], args[3 * n], args[3 * n + 1])
        return [v, *grads]

    two_f = _scalar(2.0, torch.float64, params[0].device)
    example = [t.detach() for t in (*params, *weights, *anchors)] + [two_f, const]
    with torch.no_grad():
        gm = make_fx(flat)(*example)
        fn = inductor_compile(gm, example)
    return CompiledKernel(fn, key, const.dtype)


def compiled_kernel(params, weights, anchors, const: Optional[Tensor] = None) -> Optional[CompiledKernel]:
    """The compiled kernel for these inputs (compiled on the first request for their signature, a few
    seconds), or None where no compiler works in this process (see :func:`compile_error`).
    ``const``: the 0-dim constant the value starts from (its dtype is part of the signature)."""
    global _COMPILE_ERROR
    if _COMPILE_ERROR is not None or torch.compiler.is_compiling():
        return None
    if const is None:
        const = _zero_const(params, weights)
    key = _signature(params, weights, anchors, const)
    kernel = _KERNEL_CACHE.get(key)
    if kernel is None:
        try:
            kernel = _build(params, weights, anchors, const, key)
        except Exception as exc:  # noqa: BLE001 - no C compiler, an unsupported platform or dtype...
            _COMPILE_ERROR = f"{type(exc).__name__}: {exc}".strip()[:500]
            warnings.warn(
                "the compiled penalty kernel is not available here (compiling it failed: "
                f"{_COMPILE_ERROR.splitlines()[0]}); impl='compiled' uses impl='forloop' from now on, which "
                "computes the same penalty with a few more passes over memory", RuntimeWarning, stacklevel=3)
            return None
        if len(_KERNEL_CACHE) >= 64:
            _KERNEL_CACHE.clear()
        _KERNEL_CACHE[key] = kernel
    return kernel


def _scalar(value: float, dtype, device) -> Tensor:
    """``value`` as a cached 0-dim tensor: an input of the compiled kernel, so a new factor does
    not compile a new kernel."""
    key = (value, dtype, device)
    t = _SCALARS.get(key)
    if t is None:
        if len(_SCALARS) >= 64:
            _SCALARS.clear()
        t = _SCALARS[key] = torch.tensor(value, dtype=dtype, device=device)
    return t


def _zero_const(params, weights) -> Tensor:
    return _scalar(0.0, torch.promote_types(params[0].dtype, weights[0].dtype), params[0].device)


def _compiled(params, weights, anchors, factor: float, const=None, kernel=None) -> Tuple[Tensor, List[Tensor], float]:
    if const is None:
        const = _zero_const(params, weights)
    if kernel is None or kernel.broken or kernel.const_dtype != const.dtype:
        kernel = compiled_kernel(params, weights, anchors, const)
    if kernel is not None:
        out = kernel.run(params, weights, anchors, factor, const)
        if out is not None:
            return out[0], out[1], 1.0
    return _forloop(params, weights, anchors, factor, const)


def compile_error() -> Optional[str]:
    """Why ``impl="compiled"`` computes with ``"forloop"`` in this process (None: it does not)."""
    return _COMPILE_ERROR


_KERNELS = {"forloop": _forloop, "foreach": _foreach}


# ---------------------------------------------------------------------------------------- autograd
class _Spec:
    """The non-tensor arguments of one penalty evaluation."""

    __slots__ = ("factor", "const", "impl", "weights", "anchors", "kernel")

    def __init__(self, factor, const, impl, weights, anchors, kernel=None):
        self.factor, self.const, self.impl, self.weights, self.anchors = factor, const, impl, weights, anchors
        self.kernel = kernel

    def run(self, params):
        if self.impl == "compiled":
            return _compiled(params, self.weights, self.anchors, self.factor, self.const, self.kernel)
        return _KERNELS[self.impl](params, self.weights, self.anchors, self.factor, self.const)


class _QuadraticPenalty(torch.autograd.Function):
    @staticmethod
    def forward(ctx, spec, *params):
        # the value starts from const = factor * c (a float64 one, too large for the parameters'
        # dtype, makes the value float64)
        if torch.is_autocast_enabled(params[0].device.type):
            with torch.autocast(device_type=params[0].device.type, enabled=False):
                v, grads, rest_scale = spec.run(params)
        else:
            v, grads, rest_scale = spec.run(params)
        ctx.spec = spec
        ctx.grads, ctx.rest_scale = grads, rest_scale
        # the dtypes to hand the gradients out in, where they differ (float32 state of bf16 parameters)
        ctx.cast = None
        for g, p in zip(grads, params):
            if g.dtype != p.dtype:
                ctx.cast = [p.dtype for p in params]
                break
        ctx.save_for_backward(*params)  # read back only to recompute (second backward, create_graph)
        return v

    @staticmethod
    def backward(ctx, grad_out):
        spec = ctx.spec
        grads, ctx.grads = ctx.grads, None  # handed out once
        if torch.is_grad_enabled():
            # create_graph=True: a differentiable backward, so second derivatives
            # (2 * factor * A on the diagonal) are right. Not the hot path.
            scale = grad_out * (2.0 * spec.factor)
            out = [(scale * w * (p - a)).to(p.dtype)
                   for p, w, a in zip(ctx.saved_tensors, spec.weights, spec.anchors)]
            return (None, *out)
        if grads is None:  # a second backward through a retained graph: recompute
            params = ctx.saved_tensors
            with torch.autocast(device_type=params[0].device.type, enabled=False):
                _, grads, rest_scale = spec.run(tuple(p.detach() for p in params))
        else:
            rest_scale = ctx.rest_scale
        if grad_out.device.type == "cpu":
            scale = grad_out.item() * rest_scale  # free on the CPU; 1.0 when the penalty is added to a loss
            if scale != 1.0:
                torch._foreach_mul_(grads, scale)
        else:  # no host synchronisation: always one in-place multiply
            torch._foreach_mul_(grads, grad_out.to(grads[0].dtype) * rest_scale)
        if ctx.cast is not None:
            grads = [g.to(dtype) for g, dtype in zip(grads, ctx.cast)]
        return (None, *grads)


def apply_penalty(params: Sequence[Tensor], weights: Sequence[Tensor], anchors: Sequence[Tensor],
                  factor: float, const: Optional[Tensor], impl: str,
                  kernel: Optional[CompiledKernel] = None) -> Tensor:
    """:func:`quadratic_penalty` without argument checks, for callers that prepared everything once:
    ``const`` is already ``factor * c`` (or None), ``impl`` a name from :data:`IMPLS`, ``kernel``
    the :func:`compiled_kernel` of these inputs when the caller keeps it (``impl="compiled"``)."""
    return _QuadraticPenalty.apply(_Spec(factor, const, impl, weights, anchors, kernel), *params)


def quadratic_penalty(
    params: Sequence[Tensor],
    weights: Sequence[Tensor],
    anchors: Sequence[Tensor],
    factor: float,
    const: Optional[Tensor] = None,
    impl: Optional[str] = None,
) -> Tensor:
    """``factor * (sum_i sum(weights_i * (params_i - anchors_i)**2) + const)``.

    ``params``, ``weights`` and ``anchors`` are equally long sequences of same-shaped tensors
    (``weights`` >= 0). The gradient flows to ``params`` only. ``const`` is an optional 0-dim
    tensor that changes the value, not the gradient. ``impl`` is ``"compiled"``, ``"forloop"``,
    ``"foreach"`` or None (automatic: :func:`default_impl`). Computed in the promoted dtype of the
    parameters and the weights (float32 state of bf16 parameters: float32) with autocast disabled;
    a float64 ``const`` makes the value float64. The gradient has the parameters' dtype.
    """
    check_impl(impl)
    factor = float(factor)
    if not params:
        z = torch.zeros(())
        return z if const is None else (const * factor)
    if impl is None:
        impl = default_impl(params)
    if const is not None:
        const = (const * factor).to(params[0].device)
    return apply_penalty(params, tuple(weights), tuple(anchors), factor, const, impl)
