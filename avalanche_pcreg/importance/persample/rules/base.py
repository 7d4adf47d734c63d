"""The rule interface and the registry of per-layer rules.

A rule turns what one backward pass of the *summed* per-sample losses leaves at a layer -- its
input ``a`` (captured by a forward hook) and the gradient ``d`` at its output -- into sums over
samples of the layer's per-sample parameter gradients (the "grad sampler" idea of Opacus and
BackPACK). The engine hands every rule tensors whose axis 0 is the sample axis (it finds that axis
and moves it first), and a :class:`~..quantity.Request` saying what to sum.

The least a rule gives is :meth:`Rule.per_sample` (``{attr: [n, *param.shape]}``); every quantity
then follows from it. :func:`register_rule` makes a rule of a plain function::

    @register_rule(MyScale)
    def my_scale(module, a, d):
        return {"scale": (a * d).flatten(2).sum(-1) if a.dim() > 2 else a * d}
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence, Tuple, Type, Union

from torch import Tensor, nn

from ..quantity import Request, Sums
from ..sums import chunks

__all__ = ["Rule", "FunctionRule", "register_rule", "rule_for", "RULES"]


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

    def sums(self, module: nn.Module, a: Tensor, d: Tensor, req: Request) -> Sums:
        """Σ_i of ``req.quantity`` (and Σ_i g_i if ``req.totals``) for ``req.attrs``, one cotangent
        per sample (``d``: ``[n, ...]``), per chunk of ``req.chunk`` samples through :meth:`per_sample`."""
        values: Dict[str, Tensor] = {}
        totals: Dict[str, Tensor] = {}
        for s, e in chunks(a.shape[0], req.chunk):
            g = self.per_sample(module, a[s:e], d[s:e])
            for attr in req.attrs:
                if attr not in g:
                    continue
                gi = g[attr]
                vs = req.quantity.of(gi).sum(0)
                values[attr] = vs if attr not in values else values[attr] + vs
                if req.totals:
                    ts = gi.sum(0)
                    totals[attr] = ts if attr not in totals else totals[attr] + ts
        return Sums(values, totals if req.totals else None)

    def column_sums(self, module: nn.Module, a: Tensor, d: Tensor, req: Request) -> Sums:
        """:meth:`sums` with ``d`` of shape ``[K, n, ...]``: K cotangents per sample, each
        (k, i) pair counted as one sample with input ``a[i]``."""
        k = d.shape[0]
        values: Dict[str, Tensor] = {}
        totals: Dict[str, Tensor] = {}
        for s, e in chunks(a.shape[0], max(1, req.chunk // max(k, 1))):
            ac = a[s:e].unsqueeze(0).expand(k, *a[s:e].shape).reshape(k * (e - s), *a.shape[1:])
            dc = d[:, s:e].reshape(k * (e - s), *d.shape[2:])
            part = self.sums(module, ac, dc, req)
            for attr, v in part.values.items():
                values[attr] = v if attr not in values else values[attr] + v
            if req.totals:
                for attr, v in part.totals.items():
                    totals[attr] = v if attr not in totals else totals[attr] + v
        return Sums(values, totals if req.totals else None)

    def column_accumulator(self, module: nn.Module, a: Tensor, out_shape: Tuple[int, ...], req: Request):
        """An accumulator over the ``req.columns`` cotangent columns of a run, which arrive in
        pieces, or None (the default: each piece goes through :meth:`column_sums`). It has
        ``covers`` (the attributes it sums), ``nbytes`` (the state it will hold: the engine grants
        it or not), ``add(d)`` with ``d`` of shape ``[k_piece, n, *out_shape[1:]]`` and
        ``result() -> {attr: Σ_{k,i} value}``. ``out_shape``: the layer output's shape, sample
        axis first."""
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


#: the registered rules, by layer class
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


def pow_(x: Tensor, power: int) -> Tensor:
    """|x|^power for power 1 or 2 (the built-in rules' closed forms)."""
    return x.abs() if power == 1 else x * x

