"""Sums of per-sample gradient powers, Σ_n |g_n|^p, from one backward pass.

For a minibatch of independent samples (model in eval mode) the gradient of the
*sum* of per-sample losses with respect to a layer's output, δ, holds in row
``n`` exactly sample ``n``'s gradient at that output.  Together with the layer's
input ``a`` (captured by a forward hook), the per-sample parameter gradient of
the common layers is a small closed-form expression of (a_n, δ_n) (the idea of
Opacus' / BackPACK's per-layer "grad samplers").  This module uses those
identities to accumulate Σ_n |g_n|^p elementwise (p = 2: empirical/expected
Fisher diagonal, p = 1: MAS) without materialising the [N, *param.shape] tensor
of per-sample gradients where an identity avoids it (``nn.Linear`` on 2-D
input, ``nn.Embedding``), and otherwise materialising it only one chunk of
``chunk_size`` samples at a time.

Layers with a rule (exact types or subclasses that do not override ``forward``):

* ``nn.Linear`` (input [N, in] or [N, ..., in]),
* ``nn.Conv1d`` / ``nn.Conv2d`` (any stride, padding incl. 'same'/'valid',
  dilation, groups; ``padding_mode='zeros'`` only),
* ``nn.LayerNorm``, ``nn.GroupNorm``, ``nn.BatchNorm1d/2d/3d`` (BatchNorm only
  when it normalises with its running statistics),
* ``nn.Embedding`` (no ``max_norm``, no ``scale_grad_by_freq``; ``padding_idx``
  honoured).

Every other requested parameter -- owned by another kind of module, shared
between modules, owned by a module called more than once in the forward, used
directly (e.g. ``F.linear(x, self.fc.weight)`` or ``nn.MultiheadAttention``'s
``out_proj``), or owned by a layer called in an unsupported configuration --
goes to the caller's ``fallback``: a function mapping ``{name: tensor}`` to the
per-sample losses, differentiated with ``torch.func.vjp`` + ``vmap`` over
chunks of one-hot cotangents (a chunked ``jacrev``).

Limitation: a parameter that is used both through its module's call *and*
directly elsewhere in the same forward cannot be detected; its rule result then
only covers the module call.  Row 0 of a layer input must be the sample axis.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["PerSampleGradNorms"]

# (base class, rule kind); a subclass keeps the rule only if it does not override forward.
_RULE_BASES: tuple[tuple[type, str], ...] = (
    (nn.Linear, "linear"),
    (nn.Conv1d, "conv"),
    (nn.Conv2d, "conv"),
    (nn.LayerNorm, "layer_norm"),
    (nn.GroupNorm, "group_norm"),
    (nn.BatchNorm1d, "batch_norm"),
    (nn.BatchNorm2d, "batch_norm"),
    (nn.BatchNorm3d, "batch_norm"),
    (nn.Embedding, "embedding"),
)
_RULE_ATTRS = {
    "linear": ("weight", "bias"),
    "conv": ("weight", "bias"),
    "layer_norm": ("weight", "bias"),
    "group_norm": ("weight", "bias"),
    "batch_norm": ("weight", "bias"),
    "embedding": ("weight",),
}


def _rule_kind(module: nn.Module) -> str | None:
    for base, kind in _RULE_BASES:
        if isinstance(module, base) and type(module).forward is base.forward:
            return kind
    return None


def _pow(x: Tensor, p: int) -> Tensor:
    return x.abs() if p == 1 else x * x


class _Call:
    """One forward call of a hooked module."""

    __slots__ = ("inp", "delta", "ok", "handle")

    def __init__(self, inp: Tensor | None, ok: bool):
        self.inp = inp
        self.ok = ok
        self.delta: Tensor | None = None
        self.handle = None

    def release(self) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None
        self.inp = None
        self.delta = None


# Samples per chunk for the rules that materialise per-sample gradients (conv, sequences) and for
# the vmap fallback. 16 measured best for ResNet-18 on the CPU: 0.50x Avalanche's minibatch pass at
# 2.5x a step's memory, against 0.38x / 4.0x at 64 and 0.40x / 2.2x at 4 (benchmarks/RESULTS.md).
DEFAULT_CHUNK = 16

class PerSampleGradNorms:
    """Context manager. Installs forward hooks (capture layer inputs) and tensor hooks on layer
    outputs (capture grad at output) on the modules that own the requested parameters.

    Usage::

        with PerSampleGradNorms(model, names, power=2) as acc:
            for x, y in loader:
                losses = F.cross_entropy(model(x), y, reduction="none")
                acc.backward(losses, fallback=...)   # fallback needed iff acc.fallback_names
        fisher_sum = acc.sums

    ``backward`` never touches ``param.grad``.  Captures of a forward are discarded at the
    next forward after a ``backward`` call (so several ``backward(retain_graph=True)`` calls
    can share one forward), and on exit.
    """

    def __init__(self, model: nn.Module, names: Iterable[str], power: int = 2, chunk_size: int = DEFAULT_CHUNK):
        if power not in (1, 2) or isinstance(power, bool):
            raise ValueError(f"power must be 1 or 2, got {power!r}")
        if int(chunk_size) < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size!r}")
        self.model = model
        self.power = int(power)
        self.chunk_size = int(chunk_size)

        all_params = dict(model.named_parameters())
        self.names: list[str] = list(dict.fromkeys(names))
        unknown = [n for n in self.names if n not in all_params]
        if unknown:
            raise ValueError(f"not parameters of the model: {unknown}")
        frozen = [n for n in self.names if not all_params[n].requires_grad]
        if frozen:
            raise ValueError(f"parameters with requires_grad=False requested: {frozen}")
        self._params: dict[str, nn.Parameter] = {n: all_params[n] for n in self.names}

        # Which distinct modules hold each parameter object (weight tying -> fallback).
        holders: dict[int, set[int]] = {}
        for mod in model.modules():
            for p in mod._parameters.values():
                if p is not None:
                    holders.setdefault(id(p), set()).add(id(mod))

        self._owner: dict[str, nn.Module] = {}
        self._attr: dict[str, str] = {}
        self._static_fallback: set[str] = set()
        for n in self.names:
            prefix, _, attr = n.rpartition(".")
            owner = model.get_submodule(prefix) if prefix else model
            p = self._params[n]
            kind = _rule_kind(owner)
            if (
                kind is None
                or owner._parameters.get(attr) is not p
                or attr not in _RULE_ATTRS[kind]
                or len(holders.get(id(p), ())) > 1
            ):
                self._static_fallback.add(n)
            else:
                self._owner[n] = owner
                self._attr[n] = attr

        self.sums: dict[str, Tensor] = {}
        self.reset()

        self._calls: dict[nn.Module, list[_Call]] = {}
        self._handles: list = []
        self._stale = False  # a backward() ran since the captures were taken
        self._busy = False  # inside our own autograd / fallback computation: ignore forwards
        self._entered = False
        self._n_hint: int | None = None
        self._direct_use: set[str] = set()  # rule params found used without their module call

    # ------------------------------------------------------------------ context management
    def __enter__(self) -> "PerSampleGradNorms":
        if self._entered:
            raise RuntimeError("PerSampleGradNorms is already active")
        self._entered = True
        try:
            self._handles.append(self.model.register_forward_pre_hook(self._root_pre_hook))
            for mod in dict.fromkeys(self._owner.values()):
                self._handles.append(mod.register_forward_hook(self._forward_hook))
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
        for calls in self._calls.values():
            for c in calls:
                c.release()
        self._calls.clear()
        self._stale = False

    def reset(self) -> None:
        """Zero the accumulated sums."""
        self.sums = {n: torch.zeros_like(p, memory_format=torch.contiguous_format).detach()
                     for n, p in self._params.items()}

    # ------------------------------------------------------------------ hooks
    def _root_pre_hook(self, module: nn.Module, args) -> None:
        if self._busy or not torch.is_grad_enabled():
            return
        if self._stale:
            self._clear_calls()
        if args and isinstance(args[0], Tensor) and args[0].dim() > 0:
            self._n_hint = int(args[0].shape[0])

    def _forward_hook(self, module: nn.Module, args, output) -> None:
        if self._busy:
            return
        if not isinstance(output, Tensor) or not output.requires_grad:
            return
        if self._stale:
            self._clear_calls()
        x = args[0] if args and isinstance(args[0], Tensor) else None
        ok = x is not None and self._supported(module, x)
        call = _Call(x.detach() if ok else None, ok)
        if ok:
            def grad_hook(grad: Tensor, call: _Call = call) -> None:
                call.delta = grad
            call.handle = output.register_hook(grad_hook)
        self._calls.setdefault(module, []).append(call)

    @staticmethod
    def _supported(m: nn.Module, x: Tensor) -> bool:
        kind = _rule_kind(m)
        if kind == "embedding":
            return (x.dim() >= 1 and not x.is_floating_point() and m.max_norm is None
                    and not m.scale_grad_by_freq)
        if not x.is_floating_point():
            return False
        if kind == "linear":
            return x.dim() >= 2
        if kind == "conv":
            want = 3 if isinstance(m, nn.Conv1d) else 4
            return x.dim() == want and m.padding_mode == "zeros"
        if kind == "layer_norm":
            return x.dim() > len(m.normalized_shape)
        if kind == "group_norm":
            return x.dim() >= 2
        if kind == "batch_norm":
            return (not m.training and m.running_mean is not None and m.running_var is not None
                    and x.dim() >= 2)
        return False

    # ------------------------------------------------------------------ classification
    def _classify(self, n: int | None) -> tuple[list[str], list[str], list[str]]:
        """-> (rule names, fallback names, not-called names)."""
        rule, fb, zero = [], [], []
        for name in self.names:
            if name in self._static_fallback or name in self._direct_use:
                fb.append(name)
                continue
            calls = self._calls.get(self._owner[name], [])
            if not calls:
                zero.append(name)
            elif len(calls) > 1 or not calls[0].ok or (
                n is not None and calls[0].inp is not None and calls[0].inp.shape[0] != n
            ):
                fb.append(name)
            else:
                rule.append(name)
        return rule, fb, zero

    @property
    def fallback_names(self) -> list[str]:
        """Parameters that need the ``fallback`` (complete once a forward has run)."""
        return self._classify(self._n_hint)[1]

    # ------------------------------------------------------------------ main entry
    def backward(self, per_sample_losses: Tensor, *, retain_graph: bool = False,
                 fallback: Callable[[dict[str, Tensor]], Tensor] | None = None) -> None:
        """Add Σ_n |∂ per_sample_losses[n] / ∂θ|^power to ``self.sums`` for every requested θ."""
        if not self._entered:
            raise RuntimeError("PerSampleGradNorms.backward() must be called inside the `with` block")
        losses = per_sample_losses
        if losses.dim() != 1:
            raise ValueError(f"per_sample_losses must have shape [N], got {tuple(losses.shape)}")
        n = int(losses.shape[0])
        self._n_hint = n
        rule, fb, zero = self._classify(n)
        if fb and fallback is None:
            raise ValueError(f"these parameters need a fallback (pass fallback=...): {fb}")

        out: dict[str, Tensor] = {}
        try:
            self._busy = True
            for c in (c for calls in self._calls.values() for c in calls):
                c.delta = None
            tracked = rule + zero
            if tracked:
                if not losses.requires_grad:
                    raise ValueError("per_sample_losses does not require grad")
                grads = torch.autograd.grad(
                    losses.sum(), [self._params[t] for t in tracked],
                    retain_graph=retain_graph, allow_unused=True,
                )
                got = dict(zip(tracked, grads))
                # A parameter that received gradient without a captured δ was used outside
                # its module call (or its module was called in an uncaptured way).
                direct = [t for t in tracked if got[t] is not None and (
                    t in zero or self._calls[self._owner[t]][0].delta is None)]
                if direct:
                    self._direct_use.update(direct)
                    if fallback is None:
                        raise ValueError(
                            "these parameters were used outside their module's forward and need "
                            f"a fallback (pass fallback=...): {direct}")
                    rule = [t for t in rule if t not in direct]
                    fb = fb + direct
                    fb = [x for x in self.names if x in set(fb)]
                del grads, got
                out.update(self._rule_sums(rule))
            if fb:
                out.update(self._fallback_sums(fallback, fb, n))
        finally:
            self._busy = False
            for c in (c for calls in self._calls.values() for c in calls):
                c.delta = None
                if not retain_graph:
                    c.release()
            self._stale = True

        for name, s in out.items():
            self.sums[name].add_(s.to(self.sums[name].dtype))

    # ------------------------------------------------------------------ rules
    def _rule_sums(self, rule: list[str]) -> dict[str, Tensor]:
        by_module: dict[nn.Module, list[str]] = {}
        for name in rule:
            by_module.setdefault(self._owner[name], []).append(name)
        out: dict[str, Tensor] = {}
        for m, names in by_module.items():
            call = self._calls[m][0]
            if call.delta is None:  # output did not reach the loss: zero gradient
                continue
            attrs = {self._attr[nm]: nm for nm in names}
            dtype = self._params[names[0]].dtype
            a = call.inp if not call.inp.is_floating_point() else call.inp.to(dtype)
            d = call.delta.to(dtype)
            kind = _rule_kind(m)
            fn = {
                "linear": self._linear,
                "conv": self._conv,
                "layer_norm": self._norm,
                "group_norm": self._norm,
                "batch_norm": self._norm,
                "embedding": self._embedding,
            }[kind]
            for attr, s in fn(m, a, d, set(attrs)).items():
                out[attrs[attr]] = s
        return out

    def _chunks(self, n: int):
        for s in range(0, n, self.chunk_size):
            yield s, min(n, s + self.chunk_size)

    def _linear(self, m: nn.Linear, a: Tensor, d: Tensor, want: set[str]) -> dict[str, Tensor]:
        p, out = self.power, {}
        if a.dim() == 2:
            dp = _pow(d, p)
            if "weight" in want:
                out["weight"] = dp.t() @ _pow(a, p)
            if "bias" in want:
                out["bias"] = dp.sum(0)
            return out
        n = a.shape[0]
        a3 = a.reshape(n, -1, a.shape[-1])
        d3 = d.reshape(n, -1, d.shape[-1])
        if "weight" in want:
            acc = torch.zeros(d3.shape[-1], a3.shape[-1], dtype=d.dtype, device=d.device)
            for s, e in self._chunks(n):
                g = torch.bmm(d3[s:e].transpose(1, 2), a3[s:e])  # [c, out, in]
                acc += _pow(g, p).sum(0)
            out["weight"] = acc
        if "bias" in want:
            out["bias"] = _pow(d3.sum(1), p).sum(0)
        return out

    def _conv(self, m: nn.Module, a: Tensor, d: Tensor, want: set[str]) -> dict[str, Tensor]:
        p, out = self.power, {}
        n = a.shape[0]
        if "weight" in want:
            k, stride, dil = tuple(m.kernel_size), tuple(m.stride), tuple(m.dilation)
            pad = m.padding
            pre_pad = None
            if isinstance(pad, str):
                if pad == "valid":
                    pad = (0,) * len(k)
                else:  # 'same': left = total // 2, right = total - left (as ATen does)
                    tot = [di * (ki - 1) for di, ki in zip(dil, k)]
                    pre_pad = []
                    for t in reversed(tot):
                        pre_pad += [t // 2, t - t // 2]
                    pad = (0,) * len(k)
            pad = tuple(pad)
            if isinstance(m, nn.Conv1d):
                k, stride, dil, pad = (1,) + k, (1,) + stride, (1,) + dil, (0,) + pad
            groups, cout = m.groups, m.out_channels
            dg = d.reshape(n, groups, cout // groups, -1)  # [N, G, o, L]
            acc = None
            for s, e in self._chunks(n):
                x = a[s:e]
                if pre_pad is not None:
                    x = F.pad(x, pre_pad)
                if isinstance(m, nn.Conv1d):
                    x = x.unsqueeze(2)
                u = F.unfold(x, k, dilation=dil, padding=pad, stride=stride)  # [c, Cin*K, L]
                u = u.reshape(e - s, groups, -1, u.shape[-1])
                g = torch.einsum("ngol,ngkl->ngok", dg[s:e], u)
                g = _pow(g, p).sum(0)
                acc = g if acc is None else acc + g
            out["weight"] = acc.reshape(m.weight.shape)
        if "bias" in want:
            out["bias"] = _pow(d.reshape(n, d.shape[1], -1).sum(-1), p).sum(0)
        return out

    def _norm(self, m: nn.Module, a: Tensor, d: Tensor, want: set[str]) -> dict[str, Tensor]:
        p, out = self.power, {}
        n = a.shape[0]
        kind = _rule_kind(m)
        if kind == "layer_norm":
            ns = tuple(m.normalized_shape)
            red = tuple(range(1, a.dim() - len(ns)))
        else:
            red = tuple(range(2, a.dim()))
        if "weight" in want:
            acc = None
            for s, e in self._chunks(n):
                x = a[s:e]
                if kind == "layer_norm":
                    xh = F.layer_norm(x, ns, None, None, m.eps)
                elif kind == "group_norm":
                    xh = F.group_norm(x, m.num_groups, None, None, m.eps)
                else:
                    xh = F.batch_norm(x, m.running_mean.to(x.dtype), m.running_var.to(x.dtype),
                                      None, None, False, 0.0, m.eps)
                g = d[s:e] * xh
                if red:
                    g = g.sum(red)
                g = _pow(g, p).sum(0)
                acc = g if acc is None else acc + g
            out["weight"] = acc
        if "bias" in want:
            g = d.sum(red) if red else d
            out["bias"] = _pow(g, p).sum(0)
        return out

    def _embedding(self, m: nn.Embedding, idx: Tensor, d: Tensor, want: set[str]) -> dict[str, Tensor]:
        p = self.power
        n = idx.shape[0]
        v, dim = m.weight.shape
        flat = idx.reshape(-1).long()
        df = d.reshape(-1, dim)
        sample = torch.arange(n, device=idx.device).repeat_interleave(flat.numel() // max(n, 1))
        if m.padding_idx is not None:
            keep = flat != m.padding_idx
            flat, df, sample = flat[keep], df[keep], sample[keep]
        key = sample * v + flat
        uniq, inv = torch.unique(key, return_inverse=True)
        agg = torch.zeros(uniq.numel(), dim, dtype=d.dtype, device=d.device).index_add_(0, inv, df)
        res = torch.zeros(v, dim, dtype=d.dtype, device=d.device).index_add_(0, uniq % v, _pow(agg, p))
        return {"weight": res}

    # ------------------------------------------------------------------ fallback
    def _fallback_sums(self, fallback: Callable[[dict[str, Tensor]], Tensor], names: list[str],
                       n: int) -> dict[str, Tensor]:
        from torch.func import vjp, vmap

        p = self.power
        primals = {nm: self._params[nm].detach() for nm in names}
        with torch.enable_grad():
            vals, vjp_fn = vjp(fallback, primals)
        if vals.shape != (n,):
            raise ValueError(f"fallback returned shape {tuple(vals.shape)}, expected ({n},)")
        acc = {nm: torch.zeros_like(t) for nm, t in primals.items()}
        use_vmap = True
        for s, e in self._chunks(n):
            basis = torch.zeros(e - s, n, dtype=vals.dtype, device=vals.device)
            basis[torch.arange(e - s), torch.arange(s, e)] = 1
            g = None
            if use_vmap:
                try:
                    (g,) = vmap(vjp_fn)(basis)
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
