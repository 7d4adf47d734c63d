"""Sums of per-sample gradient powers, Σ_n |g_n|^p, from one backward pass.

For a minibatch of independent samples (model in eval mode) the gradient of the *sum* of
per-sample losses with respect to a layer's output, δ, holds along the sample axis exactly
sample n's gradient at that output. Together with the layer's input ``a`` (captured by a
forward hook), the per-sample gradient of a layer's parameters is a small closed-form
expression of (a_n, δ_n): a *rule* (:mod:`.rules`, one per layer kind, extensible with
:func:`~.rules.register_rule`). p = 2 gives the empirical/expected Fisher diagonal, p = 1 MAS.

Every requested parameter is handled by one of three paths:

1. **rule**: its module has a registered rule that covers it, is called once per forward in a
   supported configuration, and the parameter is not shared with another module;
2. **per-layer fallback**: its module has no rule (or the rule does not cover it / the call is
   unsupported): per-sample gradients of the module's own parameters with ``torch.func``
   (``vmap(grad(...))`` of the module call on each sample's captured input, dotted with δ);
3. **whole-model fallback**: parameters shared between modules, owned by a module called more
   than once, owned by the root module, used outside their module's call, or whose rule failed
   the self-check: the caller's ``fallback`` (parameters -> per-sample losses), differentiated
   with ``torch.func.vjp`` + ``vmap`` over chunks of one-hot cotangents. Where ``torch.func``
   cannot run the model (a ``PackedSequence``, a custom ``autograd.Function`` without
   ``setup_context``, activation checkpointing, sparse gradients) a ``RuntimeError`` names the
   module and what to do.

**Samples coupled by a layer.** Sample n's per-sample gradient is that of its loss with the model
evaluated on sample n alone (what a training step on a batch of one would take). Layers that mix
the samples of a batch are detected at each forward and evaluated that way:

* ``_BatchNorm`` with batch statistics (train mode, or no running statistics) on an input with
  positions besides the sample and channel axes: each sample normalised with its own statistics
  (BatchNorm on a batch of one); its rule's x̂ is that normalisation;
* ``nn.EmbeddingBag(scale_grad_by_freq=True)`` whose bags are the samples: the gradient of each
  bag divided by the occurrences within that bag (the values are unchanged);
* ``nn.Embedding(scale_grad_by_freq=True)``: its rule divides by the occurrences within each
  sample (the values and the batch gradient are unchanged).

Where that is impossible (BatchNorm with batch statistics on ``[N, C]``: one sample has no
statistics; bags that are not the samples; an ``nn.Embedding(scale_grad_by_freq=True)`` weight
in the whole-model fallback), the per-sample gradients are taken within the batch and a
``RuntimeWarning`` names the module and says that the importances depend on the batch.
``nn.LayerNorm``, ``nn.GroupNorm`` and ``nn.InstanceNorm*`` never mix samples.

**Self-check.** The backward of the summed losses also gives the true minibatch gradient Σ_n g_n.
On the first batch and whenever the batch's shape signature changes, the engine takes it
(``torch.autograd.grad``, never ``param.grad``) and compares it with Σ_n g_n formed from the
same (a_n, δ_n) by the rule (or per-layer fallback). A parameter that disagrees beyond float
tolerance -- a tied weight also used outside its module, a forward hook that changes the
layer's output, a wrong custom rule -- goes to the whole-model fallback for the rest of the
pass, with a one-time warning. Other batches of a known signature skip the check, so they take
gradients with respect to layer outputs only (no weight-gradient kernels). Each parameter's true
gradient is compared as autograd produces it (a tensor hook) and dropped. With K cotangents per
sample the check runs once, on their sum.

**Streaming.** The backward is not asked for every layer's δ at once: a pre-hook on each hooked
layer's output node receives δ as the backward reaches it, the rule consumes it there, and it is
freed while the backward goes on (see :meth:`PerSampleGradNorms._stream`). Sums go into the
running totals as soon as they are final, so a pass holds about one training step's memory plus
the totals. K cotangents per sample go through vmapped backward passes in pieces whose δ (all
returned at the end) fit the size of the running sums and ``max_bytes``, or, where one column's δ
is larger, one column at a time, streamed. Rules may sum the columns together (a column
accumulator: ``Rule.column_accumulator``).

**Sample axis.** The sample axis of a layer's input need not be 0 (``[T, N, D]`` sequences into
``nn.Linear``, ``nn.TransformerEncoderLayer(batch_first=False)``). Candidates are the input
dimensions the rule allows whose size is the number of samples N; on checked batches a second
backward with the losses weighted by random r_n > 0 tells which one carries the sample index
(|δ| summed over the other dimensions scales by r_n along it, and not along any other; only
those sums are kept). No candidate, or more than one left -> the whole-model fallback.

Sums are accumulated in float32 for half-precision parameters (float64 for float64 ones).
"""

from __future__ import annotations

import linecache
import math
import operator
import re
import warnings
from typing import Callable, Iterable, Optional

import torch
from torch import Tensor, nn
from torch.autograd.graph import get_gradient_edge
from torch.utils._pytree import tree_flatten, tree_unflatten

from .rules import rule_for
from .rules._registry import _even_size, _pow, chunk_bytes
from .rules.embedding import per_bag_embedding_bag
from .rules.norm import batch_norm_coupling, per_sample_batch_norm, uses_batch_stats

__all__ = ["PerSampleGradNorms", "DEFAULT_CHUNK", "acc_dtype"]

# Samples per chunk (``chunk_size=None``) for the rules that materialise per-sample gradients (conv,
# sequences) and for the fallbacks: 16 on the CPU, measured best for ResNet-18 there
# (benchmarks/RESULTS.md); 256 on a GPU, where small chunks leave it idle between launches. The
# rules also cap a chunk by bytes (``rules._registry.chunk_bytes``: 16 MiB on the CPU, 256 MiB on a GPU).
DEFAULT_CHUNK = 16
GPU_DEFAULT_CHUNK = 256


def default_chunk(device) -> int:
    """Samples per chunk when ``chunk_size`` is None, on ``device`` (a ``torch.device``)."""
    return DEFAULT_CHUNK if device.type == "cpu" else GPU_DEFAULT_CHUNK


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype of a parameter dtype: float64 stays, anything else -> float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_tol(dtype: torch.dtype) -> tuple[float, float]:
    """(relative tolerance on the totals, multiple of Σ_n ||g_n||) for the self-check."""
    if dtype == torch.float64:
        return 1e-7, 1e-12
    if dtype == torch.float32:
        return 1e-3, 1e-5
    return 5e-2, 1e-2


_OPAQUE: tuple = (nn.MultiheadAttention,)

# State the K-column accumulators may hold even where one column's δ is smaller (small models).
_ACC_MIN_BYTES = 16 * 2 ** 20


# Elements per piece of the float64 reductions below: a float64 reduction of a float32 tensor
# would otherwise convert the whole tensor first (a temporary twice the size of a large parameter).
# 64 Ki elements (512 KiB of float64) on the CPU; on a GPU a piece is the device's chunk budget
# (``chunk_bytes``), since each piece is a kernel launch there, and a self-checked ResNet-18 batch
# took ~9k of them with CPU-sized pieces. Each helper reads its result back to the host once.
_PIECE = 2 ** 16


def _piece(x: Tensor) -> int:
    """Elements per piece of a float64 reduction of ``x``, on its device."""
    return _PIECE if x.device.type == "cpu" else max(_PIECE, chunk_bytes(x.device) // 8)


def _flat_pieces(x: Tensor):
    x = x.reshape(-1)
    step = _piece(x)
    for s in range(0, x.numel(), step):
        yield x[s:s + step]


def _sum64(x: Tensor) -> Tensor:
    """Σ x in float64, piece by piece (a 0-dim tensor on x's device)."""
    acc = torch.zeros((), dtype=torch.float64, device=x.device)
    for p in _flat_pieces(x):
        acc += p.sum(dtype=torch.float64)
    return acc


def _all_finite(x: Tensor) -> Tensor:
    """Whether every element of x is finite (a 0-dim bool tensor on x's device)."""
    ok = torch.ones((), dtype=torch.bool, device=x.device)
    for p in _flat_pieces(x):
        ok &= p.isfinite().all()
    return ok


def _diff_norm(a: Tensor, b: Tensor) -> Tensor:
    """||a - b|| in float64, piece by piece (a 0-dim tensor on a's device)."""
    sq = torch.zeros((), dtype=torch.float64, device=a.device)
    for pa, pb in zip(_flat_pieces(a), _flat_pieces(b)):
        sq += (pa - pb.to(pa.dtype)).pow_(2).sum(dtype=torch.float64)
    return sq.sqrt()


def _abs_sums64(g: Tensor, axis: int) -> Tensor:
    """Σ |g| over every dimension but ``axis``, in float64, in pieces along another dimension."""
    other = [d for d in range(g.dim()) if d != axis]
    if not other:
        return g.abs().to(torch.float64)
    split = other[0]
    step = max(1, _piece(g) * g.shape[split] // max(g.numel(), 1))
    acc = torch.zeros(g.shape[axis], dtype=torch.float64, device=g.device)
    for s in range(0, g.shape[split], step):
        acc += g.narrow(split, s, min(step, g.shape[split] - s)).abs().sum(other, dtype=torch.float64)
    return acc


def _get_param(module: nn.Module, attr: str):
    mod_path, _, leaf = attr.rpartition(".")
    try:
        mod = module.get_submodule(mod_path) if mod_path else module
    except AttributeError:
        return None
    return mod._parameters.get(leaf)


class _Call:
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


class _AddInto(dict):
    """A sink for per-batch sums: adds each into ``sums`` at once, except the names in ``keep``,
    which it holds like a dict."""

    def __init__(self, sums: dict, keep: set, touched: set, scale: float = 1.0):
        super().__init__()
        self._sums = sums
        self._keep = keep
        self._touched = touched
        self._scale = scale  # every value enters multiplied by this

    def __setitem__(self, name, value):
        if name in self._keep:
            super().__setitem__(name, value if self._scale == 1.0 else value * self._scale)
        else:
            self._sums[name].add_(value.to(self._sums[name].dtype), alpha=self._scale)
            self._touched.add(name)

    def update(self, other=(), **kw):
        for name, value in dict(other, **kw).items():
            self[name] = value


class _Discard(dict):
    """A sink that keeps nothing (the check of a K-cotangent batch with power 1)."""

    def __setitem__(self, name, value):
        pass

    def update(self, other=(), **kw):
        pass


def _sum_first(cot: Tensor) -> Tensor:
    """K cotangent columns [K, N, ...] turned by one orthogonal map of the column index (the
    reflection that swaps e_1 and 𝟙/√K): column 1 becomes Σ_k c_k / √K. Returns the other K - 1
    columns, c_j + (c_1 - Σ_k c_k / √K) / (√K - 1). Power-2 sums over the columns are invariant
    under any such map (Σ_k c_k c_kᵀ is), so the columns returned here and Σ_k c_k (counted 1/K)
    carry the same sums as the K given."""
    k = cot.shape[0]
    c = cot.to(torch.float64)
    rk = math.sqrt(k)
    shift = (c[0] - c.sum(0) / rk) / (rk - 1)
    return (c[1:] + shift).to(cot.dtype)


def _detach(obj):
    leaves, spec = tree_flatten(obj)
    return tree_unflatten([x.detach() if isinstance(x, Tensor) else x for x in leaves], spec)


def _has_packed(obj) -> bool:
    """Whether a module call's arguments hold a ``PackedSequence``."""
    if isinstance(obj, nn.utils.rnn.PackedSequence):
        return True
    if isinstance(obj, (tuple, list)):
        return any(_has_packed(o) for o in obj)
    if isinstance(obj, dict):
        return any(_has_packed(o) for o in obj.values())
    return False


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


_FUNC_ADVICE = ("leave these parameters out of the estimate (names= of compute_importance, exclude= of "
                "the plugin), or use importance='minibatch_fisher' or 'avalanche_mas' (Avalanche's "
                "estimators, which need no per-sample gradients)")


def _explain_func_failure(exc: Optional[BaseException], where: str, packed: bool) -> str:
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
                "when the lengths in a batch differ), or " + _FUNC_ADVICE)
    elif "saved tensor hooks" in text:
        cause = (f"{where or 'the model'} uses saved-tensor hooks -- activation checkpointing "
                 "(torch.utils.checkpoint) or torch.autograd.graph.save_on_cpu -- which torch.func does not "
                 "support")
        todo = "turn activation checkpointing off for the importance pass, or " + _FUNC_ADVICE
    elif "setup_context" in text or fn is not None:
        what = f"the custom torch.autograd.Function {fn!r}" if fn else "a custom torch.autograd.Function"
        if fn == "CheckpointFunction":
            what = "reentrant activation checkpointing (torch.utils.checkpoint with use_reentrant=True)"
        cause = (f"{where or 'the model'} calls {what}, which torch.func cannot transform (it needs a "
                 "separate setup_context staticmethod and a vmap rule, e.g. generate_vmap_rule=True)")
        todo = ("give the Function setup_context and generate_vmap_rule=True (PyTorch's 'Extending torch.func "
                "with autograd.Function'), or " + _FUNC_ADVICE)
        if fn == "CheckpointFunction":
            todo = "pass use_reentrant=False to torch.utils.checkpoint, or " + _FUNC_ADVICE
    elif "sparse" in text.lower():
        cause = f"{where or 'the model'} produces sparse gradients (sparse=True), which torch.func does not support"
        todo = "construct the layer with sparse=False, or " + _FUNC_ADVICE
    else:
        cause = f"torch.func could not differentiate {where or 'the model'} per sample"
        todo = _FUNC_ADVICE
    if exc is None:
        return f"{cause}; {todo}"
    return f"{cause}; {todo}. ({type(exc).__name__}: {text.splitlines()[0] if text else ''})"


def _list_names(names) -> str:
    names = list(names)
    return repr(names) if len(names) <= 6 else repr(names[:6])[:-1] + ", ...]"


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
    """

    def __init__(self, model: nn.Module, names: Iterable[str], power: int = 2, chunk_size: Optional[int] = None,
                 check: str = "signature", max_bytes: int = 64 * 2 ** 20):
        if isinstance(power, bool) or power not in (1, 2):
            raise ValueError(f"power must be 1 or 2, got {power!r}")
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
        self.model = model
        self.power = int(power)
        self.chunk_size = chunk_size  # None: default_chunk of the tensors' device
        self.check_mode = check
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1:
            raise ValueError(f"max_bytes must be a positive int, got {max_bytes!r}")
        self.max_bytes = max_bytes

        all_params = dict(model.named_parameters())
        self.names: list[str] = list(dict.fromkeys(names))
        unknown = [n for n in self.names if n not in all_params]
        if unknown:
            raise ValueError(f"not parameters of the model: {unknown}")
        frozen = [n for n in self.names if not all_params[n].requires_grad]
        if frozen:
            raise ValueError(f"parameters with requires_grad=False requested: {frozen}")
        self._params: dict[str, nn.Parameter] = {n: all_params[n] for n in self.names}

        holders: dict[int, set[int]] = {}
        holder_mods: dict[int, list] = {}
        for mod in model.modules():
            for p in mod._parameters.values():
                if p is not None:
                    holders.setdefault(id(p), set()).add(id(mod))
                    holder_mods.setdefault(id(p), []).append(mod)
        self._mod_names = {m: q for q, m in model.named_modules()}
        # requested parameters held by an embedding whose gradient divides by frequencies counted
        # over its whole call (they couple the samples in the whole-model fallback), or whose
        # gradient is sparse (torch.func cannot take it): name -> the module
        self._freq_holder = {n: m for n in self.names for m in holder_mods.get(id(self._params[n]), ())
                             if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.scale_grad_by_freq}
        self._sparse_holder = {n: m for n in self.names for m in holder_mods.get(id(self._params[n]), ())
                               if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.sparse}

        self._owner: dict[str, nn.Module] = {}
        self._attr: dict[str, str] = {}
        self._static_fallback: set[str] = set()
        # Modules that use their children's parameters without calling the children
        # (MultiheadAttention and its out_proj): the container owns them all.
        opaque = [q for q, mod in model.named_modules() if q and isinstance(mod, _OPAQUE)]
        for n in self.names:
            prefix, _, attr = n.rpartition(".")
            outer = next((q for q in opaque if prefix == q or prefix.startswith(q + ".")), None)
            if outer is not None:
                prefix, attr = outer, n[len(outer) + 1:]
            owner = model.get_submodule(prefix) if prefix else model
            p = self._params[n]
            if (owner is model and rule_for(model) is None) or _get_param(owner, attr) is not p or len(holders.get(id(p), ())) > 1:
                self._static_fallback.add(n)
            else:
                self._owner[n] = owner
                self._attr[n] = attr
        self._modules: dict[nn.Module, list[str]] = {}
        for n, m in self._owner.items():
            self._modules.setdefault(m, []).append(n)

        self.sums: dict[str, Tensor] = {}
        self.reset()

        self._calls: dict[nn.Module, list[_Call]] = {}
        self._pending: dict[nn.Module, list] = {}
        self._handles: list = []
        self._stale = False
        self._busy = False
        self._entered = False
        self._n_hint: Optional[int] = None
        self._failed: dict[str, str] = {}  # name -> why it went to the whole-model fallback
        self._warned: set[str] = set()
        self._plans: dict = {}  # shape signature -> {module: plan}
        self._gen = torch.Generator().manual_seed(1234)
        self.checked_batches = 0
        self._last_nonrule: set[str] = set()
        self._last_model: set[str] = set()
        self._cols: Optional[dict] = None  # K-column run: {"k", "left": bytes, "acc": {module: accumulator}}
        # Samples coupled by a layer in the current forward: module -> (kind, why). "forward":
        # its output mixes the samples (every parameter's per-sample gradient depends on the
        # batch); "weight": only its own weight's gradient does.
        self._coupled: dict = {}
        self._nograd: list = []  # modules called with gradients disabled inside a forward with them
        self._in_root = False
        self._forward_grad: Optional[str] = None  # how the latest forward had gradients disabled

    # ------------------------------------------------------------------ context management
    def __enter__(self) -> "PerSampleGradNorms":
        if self._entered:
            raise RuntimeError("PerSampleGradNorms is already active")
        self._entered = True
        try:
            self._handles.append(self.model.register_forward_pre_hook(self._root_pre_hook))
            self._handles.append(self.model.register_forward_hook(self._root_hook))
            for mod in self.model.modules():
                if mod is not self.model:
                    self._handles.append(mod.register_forward_pre_hook(self._nograd_hook))
                if isinstance(mod, nn.modules.batchnorm._BatchNorm) or (
                        isinstance(mod, nn.EmbeddingBag) and mod.scale_grad_by_freq):
                    # first among the forward hooks: later hooks (the capture below, the user's)
                    # see the output of the layer evaluated on each sample alone
                    self._handles.append(mod.register_forward_hook(self._isolate_hook, with_kwargs=True,
                                                                   prepend=True))
            for mod in self._modules:
                self._handles.append(mod.register_forward_pre_hook(self._pre_hook, with_kwargs=True))
                self._handles.append(mod.register_forward_hook(self._forward_hook, with_kwargs=True))
        except BaseException:
            self._remove_hooks()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._remove_hooks()

    def _remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._clear_calls()
        self._entered = False

    def _clear_calls(self) -> None:
        self._calls.clear()
        self._pending.clear()
        self._coupled = {}
        self._nograd = []
        self._stale = False

    def reset(self) -> None:
        """Zero the accumulated sums (float32 for half-precision parameters, else their dtype)."""
        self.sums = {n: torch.zeros(p.shape, dtype=acc_dtype(p.dtype), device=p.device)
                     for n, p in self._params.items()}
        self._touched: set[str] = set()  # names whose sums have had anything added
        self._provisional: set[str] = set()  # added before their check (sums were zero)

    # ------------------------------------------------------------------ hooks
    def _root_pre_hook(self, module: nn.Module, args) -> None:
        if self._busy:
            return
        if not torch.is_grad_enabled():
            self._forward_grad = ("torch.inference_mode()" if torch.is_inference_mode_enabled()
                                  else "torch.no_grad()")
            return
        self._forward_grad = None
        if self._stale:
            self._clear_calls()
        self._in_root = True
        self._n_hint = int(args[0].shape[0]) if args and isinstance(args[0], Tensor) and args[0].dim() > 0 else None

    def _root_hook(self, module: nn.Module, args, output) -> None:
        if not self._busy:
            self._in_root = False

    def _nograd_hook(self, module: nn.Module, args) -> None:
        if self._in_root and not self._busy and not torch.is_grad_enabled():
            self._nograd.append(module)

    def _describe(self, m: nn.Module) -> str:
        name = self._mod_names.get(m, "?")
        return f"the model ({type(m).__name__})" if name == "" else f"module {name!r} ({type(m).__name__})"

    def _isolate_hook(self, module: nn.Module, args, kwargs, output):
        """Evaluate a layer that mixes the samples of its batch on each sample alone (see the
        module docstring), or record why it cannot be."""
        n = self._n_hint
        record = not self._busy and torch.is_grad_enabled()
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
                self._coupled.setdefault(module, ("forward", why))
            return None
        # nn.EmbeddingBag(scale_grad_by_freq=True): bag by bag when the bags are the samples
        if not isinstance(output, Tensor) or output.dim() != 2:
            return None
        if n is None or output.shape[0] == n:
            return per_bag_embedding_bag(module, args, kwargs, output)
        if record:
            self._coupled.setdefault(module, (
                "weight", f"scale_grad_by_freq=True divides its gradient by frequencies counted over the call, "
                          f"and its {output.shape[0]} bags are not the {n} samples, so they cannot be counted "
                          "per sample"))
        return None

    def _pre_hook(self, module: nn.Module, args, kwargs) -> None:
        # Inputs are copied (structure, not data) before the call: a forward that mutates a list
        # it was given (Avalanche's PNN adapters) does not change what the fallback replays.
        if self._busy or not torch.is_grad_enabled():
            return
        self._pending.setdefault(module, []).append((_detach(tuple(args)), _detach(dict(kwargs))))

    def _forward_hook(self, module: nn.Module, args, kwargs, output) -> None:
        if self._busy or not torch.is_grad_enabled():
            return
        pending = self._pending.get(module)
        if not pending:
            return
        args, kwargs = pending.pop()
        if self._stale:
            self._clear_calls()
        leaves, spec = tree_flatten(output)
        pos = [i for i, o in enumerate(leaves) if isinstance(o, Tensor) and o.requires_grad]
        if not pos:
            return
        call = _Call(args, kwargs, [leaves[i] for i in pos], pos, spec, len(leaves))
        self._calls.setdefault(module, []).append(call)
        rule = rule_for(module)
        if rule is not None and call.first is not None and rule.couples_samples(module, call.first):
            self._coupled.setdefault(module, ("forward", "its rule says that the call mixes the samples"))

    # ------------------------------------------------------------------ planning
    def _signature(self, n: int, k: int):
        return (n, k, tuple(
            (id(m), len(cs), tuple((tuple(c.first.shape) if c.first is not None else None,
                                    tuple(c.out_shapes)) for c in cs))
            for m, cs in self._calls.items()))

    def _plan_module(self, m: nn.Module, n: int) -> dict:
        """How this batch handles module m's names: {'rule'|'layer'|'model'|'zero': [...], ...}."""
        names = [x for x in self._modules[m] if x not in self._failed]
        calls = self._calls.get(m, [])
        plan = {"rule": [], "layer": [], "model": [], "zero": [], "axes": None, "why": ""}
        if not names:
            return plan
        if not calls:
            plan["zero"] = names
            return plan
        if len(calls) > 1:
            plan["model"], plan["why"] = names, "its module is called more than once"
            return plan
        mixing = [c for c, (kind, _) in self._coupled.items() if kind == "forward"]
        if mixing:
            plan["model"] = names
            plan["why"] = f"{self._describe(mixing[0])} mixes the samples of the batch"
            return plan
        if m in self._coupled:
            plan["model"], plan["why"] = names, self._coupled[m][1]
            return plan
        call = calls[0]
        rule = rule_for(m)
        x = call.first
        if rule is not None and x is not None and len(call.edges) == 1 and rule.supports(m, x):
            cover = rule.params
            plan["rule"] = [nm for nm in names if cover is None or self._attr[nm] in cover]
            plan["layer"] = [nm for nm in names if nm not in plan["rule"]]
            dims = [d for d in rule.sample_dims(m, x) if 0 <= d < x.dim() and x.shape[d] == n]
            plan["in_axes"] = dims  # candidates; the same axis in the output
        else:
            plan["layer"] = names
        return plan

    # ------------------------------------------------------------------ properties
    @property
    def fallback_names(self) -> list[str]:
        """Parameters not computed by a closed-form rule (per-layer or whole-model fallback), as
        planned for the current forward, else as done in the latest backward."""
        bad = set(self._static_fallback) | set(self._failed) | self._last_nonrule
        if self._calls and not self._stale:
            n = self._n_hint if self._n_hint is not None else -1
            for m in self._modules:
                if m in self._calls:
                    plan = self._plan_module(m, n)
                    bad.update(plan["layer"] + plan["model"])
        return [x for x in self.names if x in bad]

    @property
    def model_fallback_names(self) -> list[str]:
        """Parameters that need the caller's whole-model ``fallback`` (known so far)."""
        bad = set(self._static_fallback) | set(self._failed) | self._last_model
        if self._calls and not self._stale:
            n = self._n_hint if self._n_hint is not None else -1
            for m in self._modules:
                if m in self._calls:
                    bad.update(self._plan_module(m, n)["model"])
        return [x for x in self.names if x in bad]

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
        vmapped pieces (``is_grads_batched``) that fit the size of the running sums and
        ``max_bytes``, else (or where that is not supported) one column at a time over the one
        forward. ``fallback(params) -> outputs``."""
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

    # ------------------------------------------------------------------ autograd helpers
    @staticmethod
    def _grads(root, cot, inputs, batched, retain):
        if not inputs:
            return []
        if not root.requires_grad:
            raise ValueError("the per-sample losses (or outputs) do not require grad")  # (see _run)
        if not batched:
            return list(torch.autograd.grad(root, inputs, grad_outputs=cot, retain_graph=retain,
                                            allow_unused=True))
        try:
            return list(torch.autograd.grad(root, inputs, grad_outputs=cot, retain_graph=True,
                                            allow_unused=True, is_grads_batched=True))
        except RuntimeError:  # an op without a batching rule: one backward per cotangent
            cols = []
            for k in range(cot.shape[0]):
                cols.append(torch.autograd.grad(root, inputs, grad_outputs=cot[k], allow_unused=True,
                                                retain_graph=retain or k < cot.shape[0] - 1))
            out = []
            for j in range(len(inputs)):
                gj = [c[j] for c in cols]
                out.append(None if all(g is None for g in gj) else torch.stack(
                    [g if g is not None else torch.zeros_like(next(x for x in gj if x is not None)) for g in gj]))
            return out

    # ------------------------------------------------------------------ one backward
    def _col_bytes(self, elem: int) -> int:
        """Bytes of one cotangent column's gradients at every captured layer output."""
        return sum(math.prod(sh) for cs in self._calls.values() for c in cs for sh in c.out_shapes) * elem

    def _col_step(self, k: int, elem: int) -> int:
        """Cotangent columns per batched backward: their gradients at the captured layer outputs,
        all held at the end of that backward, stay within the size of the running sums (one
        copy of the parameters) and ``max_bytes``, at least one column; pieces of equal size."""
        budget = min(self.max_bytes, sum(t.numel() * t.element_size() for t in self.sums.values()))
        return _even_size(k, budget // max(self._col_bytes(elem), 1))

    def _check_graph(self, root: Tensor, check: bool) -> None:
        """Clear errors for what the backward below cannot run: losses without a graph (a
        forward with gradients disabled), reentrant activation checkpointing."""
        if not root.requires_grad:
            if self._forward_grad is not None or torch.is_inference_mode_enabled() or root.is_inference():
                how = self._forward_grad or "torch.inference_mode()"
                raise RuntimeError(
                    f"per-sample importances need gradients, but the model's forward ran under {how}: the "
                    "per-sample losses have no graph. Run the forward with gradients enabled (compute_importance "
                    "enables them itself under torch.no_grad(); under torch.inference_mode() it cannot)")
            raise ValueError("the per-sample losses (or outputs) do not require grad: nothing connects them to "
                             "the requested parameters")
        if check and _graph_has(root, "CheckpointFunctionBackward"):
            outer = [m for m in dict.fromkeys(self._nograd)
                     if not any(self._mod_names.get(m, "").startswith(self._mod_names.get(o, "?") + ".")
                                for o in self._nograd if o is not m)]
            where = (f" around {', '.join(self._describe(m) for m in outer)}" if outer else "")
            raise RuntimeError(
                f"per-sample importances cannot backpropagate through reentrant activation checkpointing{where} "
                "(torch.utils.checkpoint with use_reentrant=True), which supports only loss.backward(), not the "
                "gradients with respect to layer outputs that per-sample estimators take. Pass use_reentrant=False "
                "to torch.utils.checkpoint (or turn checkpointing off for the importance pass); "
                "importance='minibatch_fisher' and 'avalanche_mas' (Avalanche's estimators) work with either")

    def _check_packed(self, plans: dict) -> None:
        """A clear error for parameters whose module is called with a ``PackedSequence`` and that
        need ``torch.func`` (the per-layer or whole-model fallback), which cannot run it."""
        for m, plan in plans.items():
            names = plan["layer"] + plan["model"]
            calls = self._calls.get(m, [])
            if names and any(_has_packed(c.args) or _has_packed(c.kwargs) for c in calls):
                desc = self._describe(m)
                raise RuntimeError(
                    f"per-sample importances: parameters {_list_names(names)} of {desc} need per-sample gradients "
                    "by torch.func (it has no per-layer rule), and "
                    + _explain_func_failure(None, desc, True))

    def _warn_coupled(self, model_list: list) -> None:
        """One warning per module whose coupling of the samples makes importances depend on the
        batch (the per-sample gradients of ``model_list`` are taken within it)."""
        if not model_list:
            return
        n = self._n_hint
        for m, (kind, why) in self._coupled.items():
            key = ("coupled", m)
            hit = model_list if kind == "forward" else [nm for nm in model_list if nm in self._modules.get(m, ())]
            if key in self._warned or not hit:
                continue
            self._warned.add(key)
            fix = ("give it running statistics (track_running_stats=True, eval mode) or use nn.LayerNorm / "
                   "nn.GroupNorm" if isinstance(m, nn.modules.batchnorm._BatchNorm) else
                   "use one bag per sample, or scale_grad_by_freq=False")
            warnings.warn(
                f"per-sample importances: {self._describe(m)} couples the samples of a batch: {why}. The "
                f"per-sample gradients of {_list_names(hit)} are therefore taken within the batch (the whole-model "
                f"fallback), so their importances depend on the batch size ({n}) and on which samples share a "
                f"batch; they are not per-sample values. For per-sample importances, {fix}",
                RuntimeWarning, stacklevel=5)
        for nm in model_list:
            m = self._freq_holder.get(nm)
            if m is None or m in self._coupled or ("freq", nm) in self._warned:
                continue
            if isinstance(m, nn.EmbeddingBag):
                continue  # evaluated bag by bag (or in self._coupled): the fallback is per sample too
            self._warned.add(("freq", nm))
            warnings.warn(
                f"per-sample importances: parameter {nm!r} of {self._describe(m)} goes to the whole-model fallback "
                f"({self._model_why.get(nm, 'see the other warnings')}), where its gradient is divided by the "
                "frequencies of its rows over the whole batch (scale_grad_by_freq=True), not within each sample: "
                f"its importances depend on the batch size ({n}) and on which samples share a batch. For "
                "per-sample importances, use the embedding through its own call only (no tied weights), or "
                "scale_grad_by_freq=False",
                RuntimeWarning, stacklevel=5)

    def _run(self, root: Tensor, cot: Tensor, batched: bool, retain_graph: bool, fallback) -> None:
        n = int(root.shape[0])
        k = int(cot.shape[0]) if batched else 0
        self._n_hint = n
        sig = self._signature(n, k)
        check = self.check_mode == "always" or sig not in self._plans
        self._check_graph(root, check)
        all_cot = cot
        # pieces: (cotangent, whether it holds several columns, the weight of its sums)
        pieces: list = []
        if check and batched:
            # K cotangents: the check runs once, streamed, on their sum <root, Σ_k cot_k> (a
            # per-sample loss too): it finds the sample axes and compares every rule's Σ_n g_n
            # with the true gradient. With power 2, Σ_k cot_k is a column of an orthogonal change
            # of the columns (times √K): its sums count 1/K and K - 1 columns are left
            # (_sum_first). With power 1 its sums are not the wanted ones: weight 0, dropped.
            weight = 1.0 / k if self.power == 2 and k > 1 else 0.0
            pieces.append((cot.sum(0), False, weight))
            if weight:
                cot, k = _sum_first(cot), k - 1
        if batched:
            step = self._col_step(k, root.element_size())
            if step > 1:
                pieces += [(cot[s:s + step], True, 1.0) for s in range(0, k, step)]
            else:  # one column's δ at every layer fills the budget: one column at a time, streamed
                pieces += [(c, False, 1.0) for c in cot.unbind(0)]
        else:
            pieces.append((cot, False, 1.0))
        model_names: set[str] = set(self._static_fallback) | set(self._failed)
        layer_names: set[str] = set()
        self._model_why = {nm: "it is shared with another module or owned by the root module"
                           for nm in self._static_fallback}
        self._model_why.update(self._failed)
        out: dict[str, Tensor] = {}
        try:
            self._busy = True
            # Column accumulators (rules that sum K columns better together than piece by piece)
            # share as much state as one column's δ at every layer, or _ACC_MIN_BYTES if that is
            # more, and at most max_bytes; granted in the order the backward reaches the layers.
            # (The check's piece forms totals too, which the accumulators do not: it uses none.)
            left = min(self.max_bytes, max(self._col_bytes(root.element_size()), _ACC_MIN_BYTES))
            self._cols = {"k": k, "left": left, "acc": {}} if batched else None
            for i, (piece, piece_batched, weight) in enumerate(pieces):
                plans = {m: self._plan_module(m, n) for m in self._modules}
                if i == 0:
                    self._check_packed(plans)
                for plan in plans.values():
                    model_names.update(plan["model"])
                    layer_names.update(plan["layer"])
                    for nm in plan["model"]:
                        self._model_why.setdefault(nm, plan["why"])
                # With a fallback for what may move, each module's sums go into the running sums
                # as soon as they are final, so no per-batch copy of the parameters' size is held.
                # Kept per batch: modules with per-layer-fallback names (that fallback may fail
                # on a later column piece and move the module), and everything without a
                # fallback (a failing call must leave the sums untouched).
                if weight:
                    keep = set(self.names) if fallback is None else {
                        nm for p in plans.values() if p["layer"] for nm in p["rule"] + p["layer"]}
                    part: dict[str, Tensor] = _AddInto(self.sums, keep, self._touched, weight)
                else:
                    part = _Discard()
                if check and i == 0:
                    self.checked_batches += 1
                    moved = self._checked_pass(root, piece, plans, part)
                    self._plans[sig] = {m: p["axes"] for m, p in plans.items() if p["axes"] is not None}
                else:
                    cached = self._plans[sig]
                    for m, plan in plans.items():
                        if m in cached:
                            plan["axes"] = cached[m]
                    last = i == len(pieces) - 1
                    moved = self._fast_pass(root, piece, piece_batched, retain_graph or not last, plans, part)
                model_names.update(moved)
                for nm, v in part.items():
                    out[nm] = v if nm not in out else out[nm] + v
            for m, acc in (self._cols or {}).get("acc", {}).items():
                if acc is not None:
                    names = {self._attr[nm]: nm for nm in self._modules[m]}
                    for attr, v in acc.result().items():
                        nm = names[attr]
                        out[nm] = v if nm not in out else out[nm] + v
            for nm in model_names:
                out.pop(nm, None)  # partial sums from columns done before it moved
            model_list = [x for x in self.names if x in model_names]
            self._last_model = set(model_list)
            self._last_nonrule = set(model_list) | layer_names
            if model_list:
                for nm in model_list:
                    self._model_why.setdefault(nm, "its rule or the per-layer fallback could not be used on this "
                                                   "batch")
                self._warn_coupled(model_list)
                if fallback is None:
                    raise ValueError(f"these parameters need a fallback (pass fallback=...): {model_list}")
                sparse = [nm for nm in model_list if nm in self._sparse_holder]
                if sparse:
                    nm = sparse[0]
                    raise RuntimeError(
                        f"per-sample importances: parameter {nm!r} of {self._describe(self._sparse_holder[nm])} "
                        f"needs per-sample gradients of the whole model by torch.func ({self._model_why[nm]}), and "
                        "torch.func does not support the sparse gradients of sparse=True; construct the layer with "
                        "sparse=False, or " + _FUNC_ADVICE)
                out.update(self._fallback_sums(fallback, model_list, n, all_cot if batched else None))
        finally:
            self._busy = False
            self._cols = None
            if not retain_graph:
                self._calls.clear()
            self._stale = True
        for name, v in out.items():
            self.sums[name].add_(v.to(self.sums[name].dtype))
            self._touched.add(name)

    def _used(self, plans):
        """Modules whose δ is needed this batch (rule or per-layer names)."""
        return [m for m, p in plans.items() if p["rule"] or p["layer"]]

    # ------------------------------------------------------------------ streamed backward
    @staticmethod
    def _reaches(root: Tensor, hooked: set) -> dict:
        """{node: whether a hooked gradient edge lies below it} for every node of ``root``'s
        backward graph (iterative post-order walk; the graph is a DAG)."""
        reach: dict = {}
        start = root.grad_fn
        if start is None:
            return reach
        stack = [(start, False)]
        while stack:
            node, done = stack.pop()
            if done:
                reach[node] = any(nxt is not None and ((nxt, nr) in hooked or reach.get(nxt, False))
                                  for nxt, nr in node.next_functions)
                continue
            if node in reach:
                continue
            reach[node] = False  # visited; final value set when its children are done
            stack.append((node, True))
            stack.extend((nxt, False) for nxt, _ in node.next_functions if nxt is not None and nxt not in reach)
        return reach

    def _stream(self, root, cot, mods, inputs, on_delta, retain) -> list:
        """One backward of ``<root, cot>`` that hands δ at each module in ``mods`` (one output
        edge each) to ``on_delta(m, δ)`` as soon as the backward reaches it, so that it is used
        and freed while the backward goes on, instead of holding every layer's δ to the end.

        Node pre-hooks on the modules' output nodes see the fully accumulated gradient just
        before the node runs. Only the modules below which no other module lies are requested
        from ``autograd.grad`` (that makes the engine run every other hooked node); their δ
        comes back at the end, unless their node runs anyway (to reach ``inputs``) and its hook
        delivers it first. A module whose output does not reach ``root`` gets δ = None.
        Returns the gradients of ``inputs``."""
        edges = {m: self._calls[m][0].edges[0] for m in mods}
        by_node: dict = {}
        for m, e in edges.items():
            by_node.setdefault(e.node, []).append((m, e.output_nr))
        reach = self._reaches(root, {(e.node, e.output_nr) for e in edges.values()})
        targets = [m for m, e in edges.items() if e.node in reach and not reach[e.node]]
        delivered: set = set()

        def make_hook(node):
            def hook(grad_outputs):
                for m, nr in by_node[node]:
                    if m not in delivered:
                        delivered.add(m)
                        on_delta(m, grad_outputs[nr])
            return hook

        handles = []
        try:
            for node in by_node:
                if node in reach:  # a target's hook fires too when its node runs (for `inputs`)
                    handles.append(node.register_prehook(make_hook(node)))
            wanted = list(inputs) + [edges[m] for m in targets]
            grads = self._grads(root, cot, wanted, False, retain) if wanted else []
        finally:
            for h in handles:
                h.remove()
        for m, g in zip(targets, grads[len(inputs):]):
            if m not in delivered:
                delivered.add(m)
                on_delta(m, g)
        for m in mods:
            if m not in delivered:
                on_delta(m, None)
        return grads[:len(inputs)]

    def _split_streamed(self, mods):
        """(modules with one output edge: streamed, the others: their edges requested)."""
        single = [m for m in mods if len(self._calls[m][0].edges) == 1]
        multi = [m for m in mods if len(self._calls[m][0].edges) != 1]
        return single, multi, [e for m in multi for e in self._calls[m][0].edges]

    def _fast_pass(self, root, cot, batched, retain, plans, out) -> list[str]:
        mods = [m for m in self._used(plans) if plans[m]["axes"] is not None]
        moved = [nm for m in self._used(plans) if plans[m]["axes"] is None for nm in plans[m]["rule"] + plans[m]["layer"]]

        def take(m, deltas):
            res = self._module_sums(m, plans[m], deltas, batched, total=False)
            if res is None:
                moved.extend(plans[m]["rule"] + plans[m]["layer"])
            else:
                out.update(res[0])

        if batched:  # K columns in one vmapped backward: every δ comes back at the end
            edges = [e for m in mods for e in self._calls[m][0].edges]
            grads = self._grads(root, cot, edges, True, retain)
            multi = mods
        else:
            single, multi, edges = self._split_streamed(mods)
            grads = self._stream(root, cot, single, edges, lambda m, d: take(m, [d]), retain)
        i = 0
        for m in multi:
            ne = len(self._calls[m][0].edges)
            take(m, grads[i:i + ne])
            i += ne
        return moved

    def _checked_pass(self, root, cot, plans, out) -> list[str]:
        """One backward of ``<root, cot>`` (one cotangent per sample) that also finds each
        module's sample axis and checks its rule against the true gradient; agreeing sums go to
        ``out``. Returns the names that move to the whole-model fallback."""
        mods = self._used(plans)
        names = [nm for m in mods for nm in plans[m]["rule"] + plans[m]["layer"]]
        names += [nm for p in plans.values() for nm in p["zero"]]
        params = [self._params[nm] for nm in names]
        n = root.shape[0]
        # 1. which axis carries the sample index: with the losses weighted by random r_n > 0,
        #    |δ| scales by r_n along it. Only per-axis sums of |δ_r| are kept (O(N) per axis).
        r = torch.rand(n, generator=self._gen, dtype=torch.float64).add_(0.5).to(root.dtype).to(root.device)
        rcot = cot * r.view(n, *([1] * (cot.dim() - 1)))
        # 2. δ and the true gradient of the requested parameters: each module's axis is found and
        #    its sums formed as its δ arrives; each parameter's true gradient is compared with its
        #    rule's Σ_n g_n as soon as autograd has it (a tensor hook on the parameter), then
        #    dropped: one module's sums and one parameter's truth are held at a time.
        moved: list[str] = []
        why: dict[str, str] = {}
        found: dict = {}  # module -> (pows, tots)

        def no_axis(m):
            for nm in plans[m]["rule"] + plans[m]["layer"]:
                moved.append(nm)
                why[nm] = "no input/output axis carries the sample index unambiguously"

        def take(m, d, rd):
            plan = plans[m]
            axes = self._find_axes(m, plan, self._calls[m][0], d, rd, r, n)
            if axes is None:
                return no_axis(m)
            plan["axes"] = axes
            res = self._module_sums(m, plan, d, False, total=True)
            if res is None:
                for nm in plan["rule"] + plan["layer"]:
                    moved.append(nm)
                    why[nm] = "the per-layer fallback could not run on this module"
                return
            if isinstance(out, _AddInto):
                # Sums still zero (the first checked batch): add now, before the check, so the
                # module's power sums are not held while its true gradient is computed. A
                # failed check zeroes them again, exactly.
                for nm in plan["rule"] + plan["layer"]:
                    if (nm in res[0] and nm not in out._keep and nm not in self._touched
                            and res[0][nm].shape == self.sums[nm].shape):
                        out[nm] = res[0].pop(nm)
                        self._provisional.add(nm)
            found[m] = res

        def axis_sums(gs):
            return [None if g is None else self._axis_sums(g, n) for g in gs]

        single, multi, edges = self._split_streamed(mods)
        rsum: dict = {}

        def keep_rsum(m, d):
            rsum[m] = axis_sums([d])

        rmulti = self._stream(root, rcot, single, edges, keep_rsum, True)
        owner = {nm: m for m in mods for nm in plans[m]["rule"] + plans[m]["layer"]}
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
                self._compare({m: found[m]}, plans, {nm: g}, n, out, moved, why, only=(nm,))
            else:
                late[nm] = g if sparse else g.clone()
            return None if sparse else g.new_zeros(()).expand(g.shape)  # nothing kept by autograd.grad

        handles = [self._params[nm].register_hook(lambda g, nm=nm: on_truth(nm, g)) for nm in names]
        try:
            both = self._stream(root, cot, single, params + edges, lambda m, d: take(m, [d], rsum.pop(m)), True)
        finally:
            for h in handles:
                h.remove()
        dmulti = both[len(params):]
        i = 0
        for m in multi:
            ne = len(self._calls[m][0].edges)
            take(m, dmulti[i:i + ne], axis_sums(rmulti[i:i + ne]))
            i += ne
        del both, dmulti, rmulti
        rest = {nm: late.get(nm) for nm in owner if nm not in compared}
        self._compare(found, plans, rest, n, out, moved, why, only=tuple(rest))
        for nm in moved:
            if nm in why and not why[nm].startswith("no input/output"):
                self._failed[nm] = why[nm]
        for nm, w in why.items():
            self._model_why.setdefault(nm, w)
        # a missing sample axis (e.g. a head that sees a subset of the batch) is structural, not an error
        self._warn({nm: w for nm, w in why.items() if not w.startswith("no input/output")})
        return moved

    def _compare(self, found, plans, truth, count, out, moved, why, only=None) -> None:
        """Rule sums of ``found`` modules against the true gradients: agreeing names go to
        ``out``, the others to ``moved`` (with the reason in ``why``). ``only``: these names."""
        for m, (pows, tots) in found.items():
            for nm in plans[m]["rule"] + plans[m]["layer"]:
                if only is not None and nm not in only:
                    continue
                early = nm in self._provisional
                self._provisional.discard(nm)
                ok, reason = self._agrees(nm, self.sums[nm] if early else pows.get(nm), tots.pop(nm, None),
                                          truth.get(nm), count)
                if ok:
                    if not early:
                        out[nm] = pows.pop(nm)
                else:
                    if early:
                        self.sums[nm].zero_()
                        self._touched.discard(nm)
                    pows.pop(nm, None)
                    moved.append(nm)
                    why[nm] = reason

    def _warn(self, why: dict):
        new = {nm: w for nm, w in why.items() if nm not in self._warned}
        if not new:
            return
        self._warned.update(new)
        lines = "; ".join(f"{nm}: {w}" for nm, w in new.items())
        warnings.warn("per-sample importances: these parameters go to the whole-model fallback (per-sample "
                      f"gradients of the whole model by torch.func, slower than the per-layer rules): {lines}",
                      RuntimeWarning, stacklevel=4)

    def _agrees(self, name, pows, total, truth, count) -> tuple[bool, str]:
        p = self._params[name]
        if pows is None or total is None:
            return False, "its rule returned no gradient for it"
        if tuple(total.shape) != tuple(p.shape) or tuple(pows.shape) != tuple(p.shape):
            return False, f"its rule returned shape {tuple(total.shape)}, the parameter has {tuple(p.shape)}"
        # norms in the sums' dtype (no float64 copies of large parameters); scalars in float64,
        # read back to the host together (one synchronisation a parameter on a GPU)
        s = total
        s_norm = s.norm().to(torch.float64)
        stats = [_all_finite(s).to(torch.float64), s_norm,
                 s_norm if truth is None else _diff_norm(s, truth),
                 torch.zeros_like(s_norm) if truth is None else truth.norm().to(torch.float64),
                 _sum64(pows)]
        finite, s_norm, diff, t_norm, psum = torch.stack(stats).tolist()
        if not finite:
            return False, "its rule gave non-finite values"
        rel, abs_mult = _check_tol(p.dtype)
        # Σ_n ||g_n|| bound from the power sums (rounding of the true sum scales with it)
        bound = (count * psum) ** 0.5 if self.power == 2 else psum
        tol = rel * (t_norm + s_norm) + abs_mult * bound + 1e-30
        if diff <= tol:
            return True, ""
        return False, (f"Σ_n g_n from its rule differs from the true minibatch gradient "
                       f"(relative error {diff / max(t_norm, 1e-30):.3g}): e.g. the parameter "
                       "is also used outside its module's call, a hook changes the module's output, "
                       "or the rule is wrong")

    # ------------------------------------------------------------------ sample axes
    # (on the checked single-cotangent backward: δ has no leading column axis)
    @staticmethod
    def _axis_sums(g: Tensor, n: int) -> dict:
        """{axis: Σ |g| over every other dimension} for each per-sample-tensor axis of size n."""
        return {ax: _abs_sums64(g, ax) for ax in range(g.dim()) if g.shape[ax] == n}

    def _carries(self, dl, rsum, r, axis) -> bool:
        """|δ_r| summed over all but ``axis`` equals r ⊙ (|δ| summed the same way)?"""
        if rsum is None or axis not in rsum:
            return False
        want = _abs_sums64(dl, axis) * r.to(torch.float64)
        tol = {torch.float64: 1e-9, torch.float32: 1e-4}.get(dl.dtype, 3e-2)
        return bool((rsum[axis] - want).norm() <= tol * want.norm() + 1e-300)

    def _find_axes(self, m, plan, call, d, rd, r, n):
        """{'in': [axis per input leaf or None], 'out': [axis per output]} or None."""
        if plan["rule"] and not plan["layer"]:
            cands = plan.get("in_axes", [])
            dl, rdl = d[0], rd[0]
            if dl is None:  # output does not reach the loss: any candidate does
                return {"in": [cands[0]], "out": [cands[0]]} if cands else None
            good = [a for a in cands if a < dl.dim() and dl.shape[a] == n and self._carries(dl, rdl, r, a)]
            if len(good) != 1:
                return None
            return {"in": [good[0]], "out": [good[0]]}
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
            good = [j for j in dims if self._carries(dl, rdl, r, j)]
            if len(good) != 1:
                return None
            out_axes.append(good[0])
        return {"in": in_axes, "out": out_axes}

    # ------------------------------------------------------------------ per-module sums
    def _module_sums(self, m, plan, deltas, batched, total):
        """({name: Σ|g|^p}, {name: Σ g} or None) for the module's rule and per-layer names, or
        None when the per-layer fallback cannot run."""
        call = self._calls[m][0]
        axes = plan["axes"]
        pows: dict[str, Tensor] = {}
        tots: dict[str, Tensor] = {}
        dt = acc_dtype(self._params[(plan["rule"] + plan["layer"])[0]].dtype)
        if plan["rule"]:
            rule = rule_for(m)
            ax = axes["in"][0]
            off = 1 if batched else 0
            d = deltas[0]
            if d is None:
                for nm in plan["rule"]:
                    pows[nm] = torch.zeros(self._params[nm].shape, dtype=dt, device=self._params[nm].device)
                    tots[nm] = pows[nm].clone()
            else:
                a = call.first
                a = a.movedim(ax, 0)
                if a.is_floating_point():
                    a = a.to(dt)
                d = d.movedim(ax + off, off).to(dt)
                want = {self._attr[nm]: nm for nm in plan["rule"]}
                acc = None if total else self._column_acc(m, rule, a, d, set(want), batched)
                if acc is not None:
                    acc.add(d if batched else d.unsqueeze(0))  # its names come at the run's end
                    want = {attr: nm for attr, nm in want.items() if attr not in acc.covers}
                fn = rule.sums_multi if batched else rule.sums
                p, t = fn(m, a, d, set(want), self.power, self._chunk(d), total) if want else ({}, {})
                for attr, nm in want.items():
                    if attr in p:
                        pows[nm] = p[attr]
                    if total and attr in t:
                        tots[nm] = t[attr]
        if plan["layer"]:
            try:
                try:
                    p, t = self._layer_fallback(m, plan["layer"], call, axes, deltas, batched, dt)
                except Exception:  # noqa: BLE001 - e.g. no vmap rule for the per-sample call
                    p, t = self._layer_fallback_masked(m, plan["layer"], call, axes, deltas, batched, dt)
            except Exception as exc:  # noqa: BLE001 - any failure: the exact whole-model path
                self._warn({nm: f"the per-layer fallback failed ({type(exc).__name__}: {exc})"
                            for nm in plan["layer"]})
                return None
            pows.update(p)
            tots.update(t)
        return pows, (tots if total else None)

    def _chunk(self, t: Tensor) -> int:
        """Samples per chunk for tensors like ``t``: ``chunk_size``, or the default of its device."""
        return self.chunk_size or default_chunk(t.device)

    def _column_acc(self, m, rule, a, d, want, batched):
        """The rule's accumulator for module m in this K-column run (created at its first piece
        within what is left of the state budget), or None."""
        cols = self._cols
        if cols is None:
            return None
        if m not in cols["acc"]:
            shape = tuple(d.shape[1:] if batched else d.shape)
            acc = rule.column_accumulator(m, a, shape, want, self.power, self._chunk(d), cols["k"], cols["left"])
            if acc is not None:
                cols["left"] -= acc.nbytes
            cols["acc"][m] = acc
        return cols["acc"][m]

    def _layer_fallback(self, m, names, call, axes, deltas, batched, dt):
        """Per-sample gradients of m's own parameters: vmap over samples of grad of
        <m(x_n), δ_n> (functional_call on the captured inputs)."""
        from torch.func import functional_call, grad, vmap

        attrs = [self._attr[nm] for nm in names]
        primals = {a: self._params[nm].detach() for a, nm in zip(attrs, names)}
        leaves, spec = tree_flatten((call.args, call.kwargs))
        in_axes = axes["in"]
        out_axes = axes["out"]
        n = next(x.shape[a] for x, a in zip(leaves, in_axes) if a is not None)
        off = 1 if batched else 0
        dl = [None if d is None else d for d in deltas]
        live = [j for j, d in enumerate(dl) if d is not None]
        pos = call.out_pos

        def f(params, xs, ds):
            full = [x if a is None else x.unsqueeze(a) for x, a in zip(xs, in_axes)]
            args, kwargs = tree_unflatten(full, spec)
            out = functional_call(m, params, tuple(args), dict(kwargs))
            outs, _ = tree_flatten(out)
            total = 0
            for j, d in zip(live, ds):
                total = total + (outs[pos[j]] * d.unsqueeze(out_axes[j])).sum()
            return total

        g_fn = grad(f)
        if batched:  # K cotangents per sample: inner vmap over them
            g_fn = vmap(g_fn, in_dims=(None, None, 0))
        vm = vmap(g_fn, in_dims=(None, [a for a in in_axes], [out_axes[j] + off for j in live]))
        pows = {nm: torch.zeros(self._params[nm].shape, dtype=dt, device=self._params[nm].device) for nm in names}
        tots = {nm: torch.zeros_like(pows[nm]) for nm in names}
        if not live:
            return pows, tots
        step = max(1, self._chunk(deltas[live[0]]) // (deltas[live[0]].shape[0] if batched else 1))
        for s in range(0, n, step):
            e = min(n, s + step)
            xs = [x if a is None else x.narrow(a, s, e - s) for x, a in zip(leaves, in_axes)]
            ds = [dl[j].narrow(out_axes[j] + off, s, e - s) for j in live]
            g = vm(primals, xs, ds)
            for a, nm in zip(attrs, names):
                ga = g[a].to(dt)
                red = (0, 1) if batched else (0,)
                pows[nm] += _pow(ga, self.power).sum(red)
                tots[nm] += ga.sum(red)
        return pows, tots

    def _layer_fallback_masked(self, m, names, call, axes, deltas, batched, dt):
        """Per-layer fallback without per-sample calls: one vjp of the module call on the whole
        batch, then vmap (or a loop) over δ masked to one sample (and one column) at a time."""
        from torch.func import functional_call, vjp

        attrs = [self._attr[nm] for nm in names]
        primals = {a: self._params[nm].detach() for a, nm in zip(attrs, names)}
        pos = call.out_pos
        live = [j for j, d in enumerate(deltas) if d is not None]

        def f(params):
            out = functional_call(m, params, tuple(call.args), dict(call.kwargs))
            outs, _ = tree_flatten(out)
            return tuple(outs[pos[j]] for j in live)

        with torch.enable_grad():
            vals, vjp_fn = vjp(f, primals)
        pows = {nm: torch.zeros(self._params[nm].shape, dtype=dt, device=self._params[nm].device) for nm in names}
        tots = {nm: torch.zeros_like(pows[nm]) for nm in names}
        if not live:
            return pows, tots
        out_axes = axes["out"]
        n = vals[0].shape[out_axes[live[0]]]
        cols = deltas[live[0]].shape[0] if batched else 1
        for c in range(cols):
            for i in range(n):
                cot = []
                for j, v in zip(live, vals):
                    d = deltas[j][c] if batched else deltas[j]
                    z = torch.zeros_like(v)
                    z.narrow(out_axes[j], i, 1).copy_(d.narrow(out_axes[j], i, 1))
                    cot.append(z)
                (g,) = vjp_fn(tuple(cot))
                for a, nm in zip(attrs, names):
                    ga = g[a].to(dt)
                    pows[nm] += _pow(ga, self.power)
                    tots[nm] += ga
        return pows, tots

    # ------------------------------------------------------------------ whole-model fallback
    def _fallback_sums(self, fallback: Callable[[dict], Tensor], names: list[str], n: int,
                       cot: Optional[Tensor]) -> dict[str, Tensor]:
        from torch.func import vjp, vmap

        p = self.power
        primals = {nm: self._params[nm].detach() for nm in names}
        stack: list = []  # (module, called with a PackedSequence) of the calls in progress

        def push(m, args, kwargs):
            stack.append((m, _has_packed(args) or _has_packed(kwargs)))

        def pop(m, args, kwargs, out):
            if stack and stack[-1][0] is m:
                stack.pop()

        hooks = []
        try:
            for m in self.model.modules():
                hooks.append(m.register_forward_pre_hook(push, with_kwargs=True))
                hooks.append(m.register_forward_hook(pop, with_kwargs=True))
            with torch.enable_grad():
                vals, vjp_fn = vjp(fallback, primals)
        except (RuntimeError, NotImplementedError) as exc:  # torch.func's: re-raised with the module and advice
            self._func_failed(exc, names, stack[-1] if stack else None)
        finally:
            for h in hooks:
                h.remove()
        try:
            return self._fallback_backward(vals, vjp_fn, names, primals, n, cot, p)
        except (RuntimeError, NotImplementedError) as exc:  # a backward torch.func cannot take
            self._func_failed(exc, names, None)

    def _func_failed(self, exc: BaseException, names: list, where) -> None:
        """Re-raise a failure of the whole-model fallback's torch.func with the parameters, the
        module being run (``where``: (module, called with a PackedSequence) or None) and advice."""
        m, packed = where if where is not None else (None, False)
        desc = self._describe(m) if m is not None else ""
        reasons = "; ".join(dict.fromkeys(self._model_why[nm] for nm in names if nm in self._model_why))
        raise RuntimeError(
            f"per-sample importances: parameters {_list_names(names)} need per-sample gradients of the whole "
            f"model by torch.func{f' ({reasons})' if reasons else ''}, and torch.func failed"
            f"{f' in {desc}' if desc else ''}: " + _explain_func_failure(exc, desc, packed)) from exc

    def _fallback_backward(self, vals, vjp_fn, names, primals, n, cot, p) -> dict:
        if cot is None:
            if vals.shape != (n,):
                raise ValueError(f"fallback returned shape {tuple(vals.shape)}, expected ({n},)")
        elif vals.shape != cot.shape[1:]:
            raise ValueError(f"fallback returned shape {tuple(vals.shape)}, expected {tuple(cot.shape[1:])}")
        acc = {nm: torch.zeros(t.shape, dtype=acc_dtype(t.dtype), device=t.device) for nm, t in primals.items()}
        # one cotangent per (column, sample): rows of the one-hot basis, scaled by the column
        pairs = [(None, i) for i in range(n)] if cot is None else [(c, i) for c in range(cot.shape[0]) for i in range(n)]
        use_vmap = True
        size = self._chunk(vals)
        for s in range(0, len(pairs), size):
            chunk = pairs[s:s + size]
            basis = torch.zeros(len(chunk), *vals.shape, dtype=vals.dtype, device=vals.device)
            for j, (c, i) in enumerate(chunk):
                basis[j, i] = 1 if c is None else cot[c, i]
            g = None
            if use_vmap:
                try:
                    (g,) = torch.func.vmap(vjp_fn)(basis)
                except Exception:  # an op without a batching rule: one sample at a time
                    use_vmap = False
            if use_vmap:
                for nm in names:
                    acc[nm] += _pow(g[nm].to(acc[nm].dtype), p).sum(0)
            else:
                for row in basis:
                    (gi,) = vjp_fn(row)
                    for nm in names:
                        acc[nm] += _pow(gi[nm].to(acc[nm].dtype), p)
        return acc
