"""The whole-model fallback: per-sample gradients of the whole model's losses with ``torch.func``.

For parameters no rule or per-layer fallback can take (shared between modules, owned by a module
called more than once or by the root module, used outside their module's call, failed by the
self-check, or behind a layer that couples the samples): the caller's ``fallback(params) ->
per-sample losses`` (or outputs, with K cotangents) is differentiated by one ``torch.func.vjp`` and
``vmap`` over chunks of one-hot cotangents (one sample at a time where ``vmap`` cannot batch it).

Where ``torch.func`` cannot run the model, :func:`explain_func_failure` says why and what to do
(a ``PackedSequence``, a custom ``autograd.Function`` without ``setup_context``, activation
checkpointing, sparse gradients).
"""

from __future__ import annotations

import linecache
import re
from typing import Callable, Dict, Optional

import torch
from torch import Tensor, nn

from .quantity import Quantity
from .sums import acc_dtype

__all__ = ["model_sums", "explain_func_failure", "has_packed", "FUNC_ADVICE"]

FUNC_ADVICE = ("leave these parameters out of the estimate (names= of compute_importance, exclude= of "
               "the plugin), or use importance='minibatch_fisher' or 'avalanche_mas' (Avalanche's "
               "estimators, which need no per-sample gradients)")


def model_sums(model: nn.Module, fallback: Callable[[dict], Tensor], params: Dict[str, Tensor], n: int,
               cot: Optional[Tensor], quantity: Quantity, chunk: int, on_failure: Callable) -> Dict[str, Tensor]:
    """``{name: Σ_n term(g_n)}`` for ``params`` ({name: parameter}) from ``fallback``, ``chunk``
    (column, sample) pairs per vmapped backward. ``on_failure(exc, where)`` is called (and must
    raise) when ``torch.func`` fails; ``where`` is ``(module, called with a PackedSequence)`` of the
    module being run, or None."""
    from torch.func import vjp

    primals = {nm: p.detach() for nm, p in params.items()}
    stack: list = []  # (module, called with a PackedSequence) of the calls in progress

    def push(m, args, kwargs):
        stack.append((m, has_packed(args) or has_packed(kwargs)))

    def pop(m, args, kwargs, out):
        if stack and stack[-1][0] is m:
            stack.pop()

    hooks = []
    try:
        for m in model.modules():
            hooks.append(m.register_forward_pre_hook(push, with_kwargs=True))
            hooks.append(m.register_forward_hook(pop, with_kwargs=True))
        with torch.enable_grad():
            vals, vjp_fn = vjp(fallback, primals)
    except (RuntimeError, NotImplementedError) as exc:  # torch.func's: re-raised with the module and advice
        on_failure(exc, stack[-1] if stack else None)
    finally:
        for h in hooks:
            h.remove()
    try:
        return _backward(vals, vjp_fn, list(params), primals, n, cot, quantity, chunk)
    except (RuntimeError, NotImplementedError) as exc:  # a backward torch.func cannot take
        on_failure(exc, None)


def _backward(vals, vjp_fn, names, primals, n, cot, quantity, chunk) -> dict:
    if cot is None:
        if vals.shape != (n,):
            raise ValueError(f"fallback returned shape {tuple(vals.shape)}, expected ({n},)")
    elif vals.shape != cot.shape[1:]:
        raise ValueError(f"fallback returned shape {tuple(vals.shape)}, expected {tuple(cot.shape[1:])}")
    acc = {nm: torch.zeros(t.shape, dtype=acc_dtype(t.dtype), device=t.device) for nm, t in primals.items()}
    # one cotangent per (column, sample): rows of the one-hot basis, scaled by the column
    pairs = [(None, i) for i in range(n)] if cot is None else [(c, i) for c in range(cot.shape[0]) for i in range(n)]
    use_vmap = True
    for s in range(0, len(pairs), chunk):
        part = pairs[s:s + chunk]
        basis = torch.zeros(len(part), *vals.shape, dtype=vals.dtype, device=vals.device)
        for j, (c, i) in enumerate(part):
            basis[j, i] = 1 if c is None else cot[c, i]
        g = None
        if use_vmap:
            try:
                (g,) = torch.func.vmap(vjp_fn)(basis)
            except Exception:  # an op without a batching rule: one sample at a time
                use_vmap = False
        if use_vmap:
            for nm in names:
                acc[nm] += quantity.of(g[nm].to(acc[nm].dtype)).sum(0)
        else:
            for row in basis:
                (gi,) = vjp_fn(row)
                for nm in names:
                    acc[nm] += quantity.of(gi[nm].to(acc[nm].dtype))
    return acc


# ----------------------------------------------------------------------------- why torch.func failed
def has_packed(obj) -> bool:
    """Whether a module call's arguments hold a ``PackedSequence``."""
    if isinstance(obj, nn.utils.rnn.PackedSequence):
        return True
    if isinstance(obj, (tuple, list)):
        return any(has_packed(o) for o in obj)
    if isinstance(obj, dict):
        return any(has_packed(o) for o in obj.values())
    return False


def _function_in_traceback(exc: BaseException) -> tuple:
    """``(name, sure)``: the ``torch.autograd.Function`` whose ``apply`` raised ``exc``, from an
    ``apply`` frame of the class (sure), else from ``Name.apply(`` on the innermost Python line."""
    tb, last, name = exc.__traceback__, None, None
    while tb is not None:
        cls = tb.tb_frame.f_locals.get("cls") if tb.tb_frame.f_code.co_name == "apply" else None
        if isinstance(cls, type) and issubclass(cls, torch.autograd.Function):
            name = cls.__qualname__
        last, tb = tb, tb.tb_next
    if name is not None:
        return name, True
    if last is not None:
        line = linecache.getline(last.tb_frame.f_code.co_filename, last.tb_lineno)
        found = re.search(r"([A-Za-z_][\w.]*)\.apply\s*\(", line)
        name = found.group(1).rpartition(".")[2] if found else None
    return name, False


def explain_func_failure(exc: Optional[BaseException], where: str, packed: bool) -> str:
    """Why ``torch.func`` failed (or would fail) on a model, and what to do, from the exception
    and the innermost module being run when it was raised (``where``: its description, or "")."""
    text = "" if exc is None else str(exc)
    fn, sure = (None, False) if exc is None else _function_in_traceback(exc)
    if not (sure or "autograd.Function" in text or "setup_context" in text):
        fn = None  # a `.apply(` on the line that raised, but not a Function's
    if packed:
        cause = (f"{where} is called with a PackedSequence (nn.utils.rnn.pack_padded_sequence), which "
                 "torch.func cannot run")
        todo = ("give it a padded tensor instead of a PackedSequence for the importance pass (e.g. pack only "
                "when the lengths in a batch differ), or " + FUNC_ADVICE)
    elif "saved tensor hooks" in text:
        cause = (f"{where or 'the model'} uses saved-tensor hooks -- activation checkpointing "
                 "(torch.utils.checkpoint) or torch.autograd.graph.save_on_cpu -- which torch.func does not "
                 "support")
        todo = "turn activation checkpointing off for the importance pass, or " + FUNC_ADVICE
    elif "setup_context" in text or fn is not None:
        what = f"the custom torch.autograd.Function {fn!r}" if fn else "a custom torch.autograd.Function"
        if fn == "CheckpointFunction":
            what = "reentrant activation checkpointing (torch.utils.checkpoint with use_reentrant=True)"
        cause = (f"{where or 'the model'} calls {what}, which torch.func cannot transform (it needs a "
                 "separate setup_context staticmethod and a vmap rule, e.g. generate_vmap_rule=True)")
        todo = ("give the Function setup_context and generate_vmap_rule=True (PyTorch's 'Extending torch.func "
                "with autograd.Function'), or " + FUNC_ADVICE)
        if fn == "CheckpointFunction":
            todo = "pass use_reentrant=False to torch.utils.checkpoint, or " + FUNC_ADVICE
    elif "sparse" in text.lower():
        cause = f"{where or 'the model'} produces sparse gradients (sparse=True), which torch.func does not support"
        todo = "construct the layer with sparse=False, or " + FUNC_ADVICE
    else:
        cause = f"torch.func could not differentiate {where or 'the model'} per sample"
        todo = FUNC_ADVICE
    if exc is None:
        return f"{cause}; {todo}"
    return f"{cause}; {todo}. ({type(exc).__name__}: {text.splitlines()[0] if text else ''})"

