"""The registry of per-layer per-sample gradient rules.

A rule turns what one backward pass of the *summed* per-sample losses leaves at a layer -- its
input ``a`` (captured by a forward hook) and the gradient ``d`` at its output -- into per-sample
gradients of the layer's own parameters (the "grad sampler" idea of Opacus and BackPACK).
The engine (:class:`~avalanche_pcreg.importance._persample.PerSampleGradNorms`) hands every
rule tensors whose axis 0 is the sample axis (it finds that axis and moves it first).
"""

from __future__ import annotations

from typing import Callable, Dict, Iterable, Optional, Sequence, Tuple, Type, Union

import torch
from torch import Tensor, nn

__all__ = ["Rule", "register_rule", "rule_for", "RULES"]


def _pow(x: Tensor, p: int) -> Tensor:
    return x.abs() if p == 1 else x * x


def _even_size(n: int, most: int) -> int:
    """The size of the equal pieces that split ``n`` into as few pieces of at most ``most`` as
    possible (ceil(n / number of pieces))."""
    most = max(1, int(most))
    return -(-n // -(-n // most))


# Bytes of per-sample gradients (and patches) formed at once by the rules that form them: on the
# CPU a chunk that stays in cache; on a GPU, launches large enough to keep it busy.
CHUNK_BYTES = 16 * 2 ** 20
GPU_CHUNK_BYTES = 256 * 2 ** 20


def chunk_bytes(device) -> int:
    """The byte budget of one chunk on ``device`` (a ``torch.device``)."""
    return CHUNK_BYTES if device.type == "cpu" else GPU_CHUNK_BYTES


def _chunks(n: int, size: int):
    size = max(1, int(size))
    for s in range(0, n, size):
        yield s, min(n, s + size)


class Rule:
    """Per-sample gradients of one layer kind.

    Subclasses implement :meth:`per_sample`; the built-in rules also override :meth:`sums` with
    closed forms that avoid forming per-sample gradients (``nn.Linear`` on 2-D input: one matmul).

    * ``params``: the parameter attributes the rule covers (None: every parameter the module
      owns directly). Others owned by the module go to the per-layer fallback.
    * :meth:`sample_dims`: the dimensions of the input that may be the sample axis. The engine
      keeps those whose size is the number of samples and checks which one carries the sample
      index; the rule then sees that axis first, in both ``a`` and ``d``.
    * :meth:`supports`: False sends the module's parameters to the per-layer fallback for
      this call (an unsupported configuration).
    * :meth:`couples_samples`: True when the call's output mixes the samples (BatchNorm with
      batch statistics on an ``[N, C]`` input) and the layer cannot be evaluated on one sample
      at a time. Per-sample gradients of *every* requested parameter then depend on the other
      samples of the batch: they all go to the whole-model fallback, which takes them within
      the batch, and a warning names the module and says that the importances depend on the
      batch.
    """

    params: Optional[Tuple[str, ...]] = ("weight", "bias")

    def sample_dims(self, module: nn.Module, x: Tensor) -> Sequence[int]:
        return (0,) if x.dim() >= 1 else ()

    def supports(self, module: nn.Module, x: Tensor) -> bool:
        return x.is_floating_point()

    def couples_samples(self, module: nn.Module, x: Tensor) -> bool:
        return False

    def per_sample(self, module: nn.Module, a: Tensor, d: Tensor) -> Dict[str, Tensor]:
        """``{attr: [n, *param.shape]}``: sample i's gradient of each parameter."""
        raise NotImplementedError

    def sums(self, module: nn.Module, a: Tensor, d: Tensor, want: Iterable[str], power: int,
             chunk: int, total: bool) -> Tuple[Dict[str, Tensor], Optional[Dict[str, Tensor]]]:
        """``(Σ_i |g_i|^power, Σ_i g_i or None)`` for the attributes in ``want``, per chunk of
        ``chunk`` samples through :meth:`per_sample`."""
        want = set(want)
        pows: Dict[str, Tensor] = {}
        tots: Dict[str, Tensor] = {}
        for s, e in _chunks(a.shape[0], chunk):
            g = self.per_sample(module, a[s:e], d[s:e])
            for attr in want:
                if attr not in g:
                    continue
                gi = g[attr]
                ps = _pow(gi, power).sum(0)
                pows[attr] = ps if attr not in pows else pows[attr] + ps
                if total:
                    ts = gi.sum(0)
                    tots[attr] = ts if attr not in tots else tots[attr] + ts
        return pows, (tots if total else None)

    def sums_multi(self, module: nn.Module, a: Tensor, d: Tensor, want: Iterable[str], power: int,
                   chunk: int, total: bool):
        """:meth:`sums` with ``d`` of shape ``[K, n, ...]``: K cotangents per sample, each
        (k, i) pair counted as one sample with input ``a[i]``."""
        k = d.shape[0]
        pows: Dict[str, Tensor] = {}
        tots: Dict[str, Tensor] = {}
        for s, e in _chunks(a.shape[0], max(1, chunk // max(k, 1))):
            ac = a[s:e].unsqueeze(0).expand(k, *a[s:e].shape).reshape(k * (e - s), *a.shape[1:])
            dc = d[:, s:e].reshape(k * (e - s), *d.shape[2:])
            p, t = self.sums(module, ac, dc, want, power, chunk, total)
            for attr, v in p.items():
                pows[attr] = v if attr not in pows else pows[attr] + v
            if total:
                for attr, v in t.items():
                    tots[attr] = v if attr not in tots else tots[attr] + v
        return pows, (tots if total else None)

    def column_accumulator(self, module: nn.Module, a: Tensor, out_shape: Tuple[int, ...], want: Iterable[str],
                           power: int, chunk: int, k: int, max_bytes: int):
        """An accumulator over K cotangent columns that arrive in pieces, or None (the default:
        each piece goes through :meth:`sums_multi`). It has ``covers`` (the attributes it
        sums), ``nbytes`` (the state it holds), ``add(d)`` with ``d`` of shape
        ``[k_piece, n, *out_shape[1:]]`` and ``result() -> {attr: Σ_{k,i} |g_{k,i}|^power}``.
        ``out_shape``: the layer output's shape, sample axis first. Return None when its state
        would exceed ``max_bytes``."""
        return None


class FunctionRule(Rule):
    """A rule from a function ``fn(module, a, d) -> {attr: per-sample gradients}``."""

    def __init__(self, fn: Callable, params: Optional[Sequence[str]] = None,
                 sample_dims: Optional[Callable] = None):
        self.fn = fn
        self.params = tuple(params) if params is not None else None
        self._sample_dims = sample_dims

    def sample_dims(self, module, x):
        if self._sample_dims is not None:
            return tuple(self._sample_dims(module, x))
        return super().sample_dims(module, x)

    def per_sample(self, module, a, d):
        out = self.fn(module, a, d)
        if not isinstance(out, dict):
            raise TypeError(f"rule {getattr(self.fn, '__name__', self.fn)!r} must return a dict "
                            f"attr -> per-sample gradients, got {type(out).__name__}")
        return out

    def __repr__(self):
        return f"FunctionRule({getattr(self.fn, '__qualname__', self.fn)!r})"


RULES: Dict[type, Rule] = {}


def register_rule(layer_type: Type[nn.Module], rule: Union[Rule, Type[Rule], Callable, None] = None, *,
                  params: Optional[Sequence[str]] = None, sample_dims: Optional[Callable] = None,
                  replace: bool = False):
    """Register the per-sample gradient rule of ``layer_type`` (usable as a decorator).

    ``rule`` is a :class:`Rule` (instance or subclass) or a function
    ``fn(module, a, d) -> {attr: Tensor[n, *param.shape]}``: given the layer's first input ``a``
    and the gradient ``d`` at its output, both with the sample axis first, the per-sample
    gradient of each parameter attribute. ``params`` (functions only) names the attributes it
    covers (default: all the module's own parameters); ``sample_dims(module, x)`` the input
    dimensions that may be the sample axis (default: 0). Subclasses of ``layer_type`` that
    do not override ``forward`` use the rule too. Every rule's result is checked against the
    true minibatch gradient (see ``docs/persample-rules.md``)::

        @register_rule(MyScale)
        def my_scale(module, a, d):
            return {"scale": (a * d).flatten(2).sum(-1) if a.dim() > 2 else a * d}
    """
    if not (isinstance(layer_type, type) and issubclass(layer_type, nn.Module)):
        raise TypeError(f"register_rule: layer_type must be an nn.Module subclass, got {layer_type!r}")

    def deco(r):
        if isinstance(r, type) and issubclass(r, Rule):
            obj = r()
        elif isinstance(r, Rule):
            obj = r
        elif callable(r):
            obj = FunctionRule(r, params=params, sample_dims=sample_dims)
        else:
            raise TypeError(f"register_rule: rule must be a Rule or a function, got {type(r).__name__}")
        if layer_type in RULES and not replace:
            raise ValueError(f"a rule for {layer_type.__name__} is already registered "
                             f"({RULES[layer_type]!r}); pass replace=True to override it")
        RULES[layer_type] = obj
        return r

    return deco(rule) if rule is not None else deco


def rule_for(module: nn.Module) -> Optional[Rule]:
    """The rule of ``module``: its class's, else the nearest registered base class's if the
    module does not override that class's ``forward``."""
    cls = type(module)
    for base in cls.__mro__:
        if base in RULES:
            if base is cls or cls.forward is base.forward:
                return RULES[base]
            return None
    return None
