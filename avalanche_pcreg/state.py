"""Anchor/importance state, consolidated: two tensors per parameter and one scalar.

Separate mode: a sum of T quadratics is one quadratic,

    sum_t F_t (theta - theta*_t)**2 = A (theta - mu)**2 + c
    A = sum_t F_t,   mu = sum_t F_t theta*_t / A  (latest theta* where A == 0),
    c = sum_t F_t theta*_t**2 - A mu**2  (>= 0, a scalar once summed)

merged one experience at a time in float64, with the constant's increment in the
cancellation-free form ``A F / (A + F) * (mu - theta*)**2``; A and mu are stored in the parameter's dtype,
or in float32 for a parameter of lower precision (bf16, fp16: rounding A and mu to 8 bits of mantissa
would cost percents of the penalty's gradient).
Online mode: A <- decay * A + F, mu <- theta_now, c = 0; the decay applies to every stored
entry, also to one that got no importance this time (a parameter frozen or left out), as in
Avalanche's ``EWCPlugin``.

A and mu are always copies, never views of the parameters (whatever the dtype), and a
consolidation refuses non-finite parameters or importances, so NaN/inf never enter the state.
The constant c stays float64; the penalty adds it in float64 when it would overflow the
parameters' dtype.

Grown parameters: A is padded with zeros and mu with the new anchor before the merge, so new
entries start free. Parameters that first appear later have A = 0 until they get importance.

Kronecker-factored layers (``importance="kfac"``) keep their blocks in a :class:`~.kron_state.KronState`
(``state.kron``) beside the diagonal entries; the penalty is the sum of both.

Names are canonical (:func:`avalanche_pcreg.selection.canonical_name`): no ``torch.compile``
prefix. Every update returns a **new** state; the old one is never modified, so a failed merge loses
nothing (the plugin swaps the new state in only once everything has been computed).
Framework-free: torch only.
"""

from __future__ import annotations

import weakref
from typing import Dict, Mapping, Optional, Union

import torch
from torch import Tensor, nn

from ._checks import check_choice, check_finite_parameter, check_importance_tensor, check_nonneg_finite, leading_slice
from .importance.kfac import KroneckerImportance
from .kron_state import KronState
from .penalty import IMPLS, apply_penalty, check_impl, compiled_kernel, default_impl
from .selection import canonical_name, named_parameters

__all__ = ["ConsolidatedState", "BoundPenalty", "MODES", "STATE_VERSION"]

MODES = ("separate", "online")
STATE_VERSION = 1


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype A and mu are stored in for a parameter of ``dtype``: at least float32."""
    return torch.promote_types(dtype, torch.float32)


def _pad_to(old: Tensor, shape, fill: Tensor, name: str) -> Tensor:
    """``old`` in the leading block of a tensor of ``shape``; the rest taken from ``fill``."""
    index = leading_slice(name, shape, old.shape, what="stored state")
    if index is None:
        return old
    out = fill.detach().to(dtype=old.dtype, device=old.device).clone()
    out[index] = old
    return out


class ConsolidatedState:
    """Immutable-by-convention (A, mu, c) per parameter name. See the module docstring."""

    def __init__(self, mode: str = "separate", decay: Optional[float] = None, kfac_merge: str = "exact"):
        self.mode = check_choice("mode", mode, MODES)
        if mode == "separate" and decay is not None:
            raise ValueError("decay is only used with mode='online'; got decay=%r with mode='separate'" % (decay,))
        if mode == "online":
            decay = 1.0 if decay is None else check_nonneg_finite("decay", decay)
        self.decay = decay
        self.kron = KronState(mode, decay, kfac_merge)  # the Kronecker-factored layers
        self.importances: Dict[str, Tensor] = {}
        self.anchors: Dict[str, Tensor] = {}
        self.const = torch.zeros((), dtype=torch.float64)
        self.num_consolidations = 0
        self._const_cache: Dict[tuple, Tensor] = {}
        self._bound: Optional["BoundPenalty"] = None

    # ------------------------------------------------------------------ queries
    def __len__(self) -> int:
        return len(self.importances) + len(self.kron.names)

    @property
    def empty(self) -> bool:
        return not self.importances and not self.kron.layers

    def nbytes(self) -> int:
        return (sum(t.numel() * t.element_size() for d in (self.importances, self.anchors) for t in d.values())
                + self.kron.nbytes())

    def _copy(self) -> "ConsolidatedState":
        new = ConsolidatedState.__new__(ConsolidatedState)
        new.mode, new.decay = self.mode, self.decay
        new.kron = self.kron
        new.importances = dict(self.importances)
        new.anchors = dict(self.anchors)
        new.const = self.const
        new.num_consolidations = self.num_consolidations
        new._const_cache = {}
        new._bound = None
        return new

    def __getstate__(self):
        d = self.__dict__.copy()
        d["_const_cache"], d["_bound"] = {}, None  # caches: device tensors, weak references
        return d

    def __setstate__(self, d):
        d.setdefault("_const_cache", {})
        d.setdefault("_bound", None)
        d.setdefault("kron", KronState(d["mode"], d["decay"]))
        self.__dict__.update(d)

    # ------------------------------------------------------------------ updates
    def consolidated(self, importances: Mapping[str, Tensor], params: Mapping[str, Tensor],
                     estimator: str = "importance") -> "ConsolidatedState":
        """A new state with one more experience merged: importances F and anchors theta*.

        ``importances`` maps name -> F (finite, >= 0, the shape of ``params[name]``);
        ``params`` maps name -> the current parameter (the anchor), and may hold more names than
        ``importances``. Names in the state but not in ``importances`` keep their entries in
        separate mode (F = 0); in online mode their A is decayed and their anchor moves to
        ``params[name]`` when given. Non-finite parameters raise ValueError; ``self`` is never
        modified.

        ``importances`` may be a :class:`~.importance.kfac.KroneckerImportance`: its blocks merge
        into :attr:`kron`, its diagonal part as above.
        """
        new = self._copy()
        if isinstance(importances, KroneckerImportance):
            for blk in importances.blocks.values():
                for nm in blk.names:
                    if nm not in params:
                        raise ValueError(f"Kronecker factors given for parameter {nm!r}, which is not among the "
                                         "model's parameters")
                    check_finite_parameter(nm, params[nm].detach())
                for what, t in (("A", blk.A), ("G", blk.G)):
                    check_importance_tensor(f"{blk.weight} (Kronecker factor {what})", t.diagonal(), estimator)
            new.kron = self.kron.merged(importances, params)
            importances = importances.diagonal
        delta_c = torch.zeros((), dtype=torch.float64)
        todo = dict(importances)
        if self.mode == "online":
            for name in self.importances:
                todo.setdefault(name, None)  # decayed, with F = 0
        for name, F in todo.items():
            theta = params.get(name)
            if F is None:
                if theta is None:  # not in the model any more: decayed in place
                    A = self.importances[name]
                    new.importances[name] = (self.decay * A.to(torch.float64)).to(A.dtype)
                    continue
                F = torch.zeros_like(theta, dtype=torch.float64)
            elif theta is None:
                raise ValueError(f"importance given for parameter {name!r}, which is not among the model's parameters")
            theta = theta.detach()
            check_importance_tensor(name, F, estimator)
            check_finite_parameter(name, theta)
            if tuple(F.shape) != tuple(theta.shape):
                raise ValueError(
                    f"shape mismatch for parameter {name!r}: importance has {tuple(F.shape)}, "
                    f"parameter has {tuple(theta.shape)}"
                )
            dtype, device = state_dtype(theta.dtype), theta.device
            F64, t64 = F.detach().to(device=device, dtype=torch.float64), theta.to(torch.float64)
            if name in self.importances:
                A64 = _pad_to(self.importances[name], theta.shape, torch.zeros_like(theta), name)
                mu64 = _pad_to(self.anchors[name], theta.shape, theta, name)
                A64, mu64 = A64.to(device=device, dtype=torch.float64), mu64.to(device=device, dtype=torch.float64)
            else:
                A64, mu64 = torch.zeros_like(t64), t64
            if self.mode == "online":
                A_new = self.decay * A64 + F64
                mu_new = t64
            else:
                A_new = A64 + F64
                safe = A_new.clamp_min(torch.finfo(torch.float64).tiny)
                gap = t64 - mu64
                # mu' = (A mu + F t) / A', written as a step from mu: exactly mu where F = 0,
                # exactly t where A = 0 (a new or grown entry, or a first experience).
                mu_new = torch.where(A64 > 0, mu64 + F64 / safe * gap, t64)
                # A mu^2 + F t^2 - A' mu'^2, written without cancellation: A F / A' (mu - t)^2 >= 0.
                delta_c = delta_c + torch.where(A_new > 0, A64 * F64 / safe * gap * gap, 0.0).sum().cpu()
            # copy=True: for a float64 parameter, .to() would return the very tensor (mu_new is the
            # parameter itself in online mode), and the anchor would follow the parameter.
            new.importances[name] = A_new.to(dtype, copy=True)
            new.anchors[name] = mu_new.to(dtype, copy=True)
        if self.mode == "separate":
            new.const = self.const + delta_c
        new.num_consolidations = self.num_consolidations + 1
        return new

    def aligned(self, params: Mapping[str, Tensor]) -> "ConsolidatedState":
        """A state whose entries have the shapes of ``params`` (grown parameters padded:
        A with zeros, mu with the current value), on the parameters' devices.

        Returns ``self`` when nothing changes, so calling it every experience is free.
        """
        changed = False
        new = self._copy()
        for name, A in self.importances.items():
            if name not in params:
                continue
            theta = params[name].detach()
            mu = self.anchors[name]
            if A.shape != theta.shape:
                A = _pad_to(A, theta.shape, torch.zeros_like(theta), name)
                mu = _pad_to(mu, theta.shape, theta, name)
                changed = True
            if A.device != theta.device:
                A, mu = A.to(theta.device), mu.to(theta.device)
                changed = True
            new.importances[name], new.anchors[name] = A, mu
        kron = self.kron.aligned(params)
        if kron is not self.kron:
            new.kron, changed = kron, True
        return new if changed else self

    # ------------------------------------------------------------------ penalty
    def _const_on(self, device, dtype, factor: float) -> Tensor:
        """``factor * c`` on ``device``: in ``dtype``, or in float64 where it would not fit ``dtype``."""
        key = (device, dtype, factor)
        c = self._const_cache.get(key)
        if c is None:
            value = float(self.const) * factor  # a CPU tensor: no device synchronisation
            fits = value <= torch.finfo(dtype).max / 4  # headroom for the quadratic part
            c = torch.tensor(value, dtype=dtype if fits else torch.float64, device=device)
            self._const_cache[key] = c
        return c

    def bind(self, model: nn.Module) -> "BoundPenalty":
        """The penalty of this state for ``model``, with the parameters matched to the stored names
        once and kept until the model's parameters change (see :class:`BoundPenalty`)."""
        bound = self._bound
        if bound is None or not bound.valid(model):
            bound = self._bound = BoundPenalty(self, model)
        return bound

    def penalty(self, params: Union[Mapping[str, Tensor], nn.Module], factor: float,
                impl: Optional[str] = None) -> Tensor:
        """``factor * (sum A (theta - mu)**2 + c)`` over the stored names present in ``params``.

        ``params`` maps canonical names to parameters, or is the model itself (then the matching is
        done once and cached: :meth:`bind`). Parameters absent from ``params`` are skipped; grown
        ones are compared on their leading block (call :meth:`aligned` once per experience to avoid
        the slicing). The value has the parameters' dtype, or float64 when c does not fit that
        dtype. ``impl``: see :func:`~avalanche_pcreg.penalty.quadratic_penalty`.
        """
        if isinstance(params, nn.Module):
            return self.bind(params)(factor, impl)
        check_impl(impl)
        thetas, weights, anchors = self._matched(params)
        factor = float(factor)
        kron = self.kron.penalty(params, factor) if self.kron.layers else None
        if not thetas:
            return torch.zeros(()) if kron is None else kron
        value = apply_penalty(thetas, tuple(weights), tuple(anchors), factor, self._const_for(thetas, weights, factor),
                              impl or default_impl(thetas))
        return value if kron is None else value + kron

    def _matched(self, params: Mapping[str, Tensor]):
        """(thetas, weights, anchors) of the stored names present in ``params``; grown parameters
        sliced to their stored leading block."""
        thetas, weights, anchors = [], [], []
        for name, A in self.importances.items():
            theta = params.get(name)
            if theta is None:
                continue
            if theta.shape != A.shape:
                index = leading_slice(name, theta.shape, A.shape, what="stored state")
                theta = theta[index]
            thetas.append(theta)
            weights.append(A)
            anchors.append(self.anchors[name])
        return thetas, weights, anchors

    def _const_for(self, thetas, weights, factor: float) -> Optional[Tensor]:
        if self.mode != "separate":
            return None
        return self._const_on(thetas[0].device, torch.promote_types(thetas[0].dtype, weights[0].dtype), factor)

    # ------------------------------------------------------------------ (de)serialisation
    def to(self, device) -> "ConsolidatedState":
        new = self._copy()
        new.kron = self.kron.to(device)
        new.importances = {k: v.to(device) for k, v in self.importances.items()}
        new.anchors = {k: v.to(device) for k, v in self.anchors.items()}
        return new

    def state_dict(self) -> dict:
        return {
            "version": STATE_VERSION,
            "mode": self.mode,
            "decay": self.decay,
            "num_consolidations": self.num_consolidations,
            "const": self.const.clone(),
            "importances": {k: v.detach().clone() for k, v in self.importances.items()},
            "anchors": {k: v.detach().clone() for k, v in self.anchors.items()},
            **({"kron": self.kron.state_dict()} if self.kron.layers else {}),
        }

    @classmethod
    def from_state_dict(cls, sd: Mapping, map_location=None) -> "ConsolidatedState":
        if not isinstance(sd, Mapping):
            raise TypeError(f"state_dict must be a mapping, got {type(sd).__name__}")
        required = ("version", "mode", "decay", "num_consolidations", "const", "importances", "anchors")
        missing = [k for k in required if k not in sd]
        if missing:
            raise ValueError(f"state_dict is missing keys {missing}; expected {list(required)}")
        if sd["version"] != STATE_VERSION:
            raise ValueError(f"state_dict has version {sd['version']!r}; this library reads version {STATE_VERSION}")
        imps, anchors = sd["importances"], sd["anchors"]
        if set(imps) != set(anchors):
            raise ValueError(
                "state_dict importances and anchors name different parameters: "
                f"only in importances {sorted(set(imps) - set(anchors))}, only in anchors {sorted(set(anchors) - set(imps))}"
            )
        new = cls(sd["mode"], sd["decay"] if sd["mode"] == "online" else None)
        seen: Dict[str, str] = {}
        for stored in imps:
            A, mu = imps[stored], anchors[stored]
            # states written from a torch.compile'd model by earlier versions carry '_orig_mod.'
            name = canonical_name(stored)
            if name in seen:
                raise ValueError(f"state_dict names {seen[name]!r} and {stored!r} are the same parameter {name!r}")
            seen[name] = stored
            if tuple(A.shape) != tuple(mu.shape):
                raise ValueError(
                    f"state_dict shape mismatch for parameter {name!r}: importance {tuple(A.shape)}, anchor {tuple(mu.shape)}"
                )
            check_importance_tensor(name, A, "state_dict")
            check_finite_parameter(name, mu, what="anchor in state_dict")
            # copies: the state never shares memory with the caller's tensors (and at least float32)
            for store, t in ((new.importances, A), (new.anchors, mu)):
                t = t.to(map_location) if map_location is not None else t
                store[name] = t.detach().to(state_dtype(t.dtype), copy=True)
        new.const = torch.as_tensor(sd["const"], dtype=torch.float64).cpu()
        new.num_consolidations = int(sd["num_consolidations"])
        if "kron" in sd:
            new.kron = KronState.from_state_dict(sd["kron"], map_location)
        return new


# Parameter and submodule registrations anywhere in the process, counted: a model whose parameters
# were replaced (a head grown by model adaptation, a layer swapped) registered them, so a
# BoundPenalty made before that is stale. Counted by two global nn.Module hooks, installed on first use.
_REGISTRATIONS = [0]
_REGISTRATION_HOOKS: list = []


def _count_registration(*args):
    _REGISTRATIONS[0] += 1


def _registrations() -> int:
    if not _REGISTRATION_HOOKS:
        from torch.nn.modules import module as _module

        _REGISTRATION_HOOKS.append(_module.register_module_parameter_registration_hook(_count_registration))
        _REGISTRATION_HOOKS.append(_module.register_module_module_registration_hook(_count_registration))
    return _REGISTRATIONS[0]


class BoundPenalty:
    """A state's penalty for one model: the stored names matched to the model's parameters once.

    Per step this costs a few attribute reads instead of walking the model and matching names.
    It is rebuilt (:meth:`ConsolidatedState.bind` checks :meth:`valid` on every call) when another
    model is passed, when any module registered a parameter or a submodule since (model adaptation
    replaces parameter objects that way: a grown head, a new layer), when one of the parameters is
    gone or changed its shape or dtype, or when the first one changed its device (``model.to``
    keeps the parameter objects). Parameters are held through weak references, so a bound penalty
    keeps no model alive. ``moved`` is True when a parameter is not on its stored tensors' device
    (the caller moves the state: :meth:`ConsolidatedState.aligned`).
    """

    __slots__ = ("_model", "_count", "_refs", "_shapes", "_first", "_index", "weights", "anchors", "moved",
                 "_state", "_dtype", "_impl", "_const", "_kernel", "_kron")

    def __init__(self, state: ConsolidatedState, model: nn.Module):
        self._count = _registrations()
        self._model = weakref.ref(model)
        self._state = state
        named = named_parameters(model)
        refs, shapes, index, weights, anchors = [], [], [], [], []
        for name, A in state.importances.items():
            p = named.get(name)
            if p is None:
                continue
            refs.append(weakref.ref(p))
            shapes.append((p.shape, p.dtype))
            index.append(None if p.shape == A.shape else leading_slice(name, p.shape, A.shape, what="stored state"))
            weights.append(A)
            anchors.append(state.anchors[name])
        self._refs, self._shapes = tuple(refs), tuple(shapes)
        self._index = tuple(index) if any(i is not None for i in index) else None
        self.weights, self.anchors = tuple(weights), tuple(anchors)
        first = refs[0]() if refs else None
        self._first = None if first is None else first.device
        self.moved = any(r().device != A.device for r, A in zip(refs, weights))
        self._dtype = None if first is None else torch.promote_types(first.dtype, weights[0].dtype)
        self._impl = default_impl([r() for r in refs]) if refs else None
        self._const = None  # (factor, factor * c)
        self._kernel = None  # impl="compiled": the kernel of these inputs, once asked for
        # the Kronecker-factored layers' parameters: {name: (weak reference, shape)}
        self._kron = {n: (weakref.ref(named[n]), named[n].shape) for n in state.kron.names if n in named}

    def valid(self, model: nn.Module) -> bool:
        if self._model() is not model or self._count != _REGISTRATIONS[0]:
            return False
        for r, (shape, dtype) in zip(self._refs, self._shapes):
            p = r()
            if p is None or p.shape != shape or p.dtype != dtype:
                return False
        if self._refs and self._refs[0]().device != self._first:
            return False
        for r, shape in self._kron.values():
            p = r()
            if p is None or p.shape != shape:
                return False
        return True

    def parameters(self):
        """The matched parameters (sliced to the stored block where they grew)."""
        params = [r() for r in self._refs]
        if self._index is not None:
            params = [p if i is None else p[i] for p, i in zip(params, self._index)]
        return params

    def __call__(self, factor: float, impl: Optional[str] = None) -> Tensor:
        kron = None
        if self._kron:
            kron = self._state.kron.penalty({n: r() for n, (r, _) in self._kron.items()}, factor)
        if not self._refs:
            return torch.zeros(()) if kron is None else kron
        value = self._diagonal(factor, impl)
        return value if kron is None else value + kron

    def _diagonal(self, factor: float, impl: Optional[str]) -> Tensor:
        if impl is None:
            impl = self._impl
        elif impl not in IMPLS:
            check_impl(impl)
        factor = float(factor)
        const = None
        if self._state.mode == "separate":
            cached = self._const
            if cached is None or cached[0] != factor:
                p = self._refs[0]()
                cached = self._const = (factor, self._state._const_on(p.device, self._dtype, factor))
            const = cached[1]
        params = self.parameters()
        kernel = None
        if impl == "compiled":
            kernel = self._kernel
            if kernel is None or kernel.broken or (const is not None and kernel.const_dtype != const.dtype):
                kernel = self._kernel = compiled_kernel(params, self.weights, self.anchors, const)
        return apply_penalty(params, self.weights, self.anchors, factor, const, impl, kernel)
