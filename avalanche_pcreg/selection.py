"""Which parameters are regularized, and the names they are stored under. Framework-free (torch only).

**Names are the keys everywhere** (the state, importances, checkpoints), and they are the names of
the plain model: the wrappers that rename parameters are looked through.

* ``torch.nn.parallel.DistributedDataParallel`` and ``torch.nn.DataParallel`` add ``module.``;
* ``torch.compile`` adds ``_orig_mod.`` (also in the middle of a name, for a compiled submodule).

:func:`canonical_name` and :func:`named_parameters` are the one place where this happens: a name
that is compared with a stored or selected name comes from them (:func:`module_parameter_names`
for parameters picked by the kind of module that holds them), never from a raw
``named_modules()`` / ``named_parameters()`` of a possibly wrapped model.
"""

from __future__ import annotations

import fnmatch
from typing import Callable, Dict, Iterable, Mapping, Optional, Tuple

from torch import Tensor, nn

__all__ = ["canonical_name", "unwrap", "named_parameters", "raw_names", "module_parameter_names", "name_patterns",
           "ParameterSelection"]

_COMPILE_COMPONENT = "_orig_mod"


def _is_compiled(model: nn.Module) -> bool:
    # torch._dynamo.eval_frame.OptimizedModule, recognised without importing torch._dynamo
    return type(model).__name__ == "OptimizedModule" and isinstance(getattr(model, _COMPILE_COMPONENT, None), nn.Module)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel / DataParallel / ``torch.compile`` wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif _is_compiled(model):
            model = getattr(model, _COMPILE_COMPONENT)
        else:
            return model


def canonical_name(name: str) -> str:
    """``name`` without ``torch.compile``'s ``_orig_mod.`` components (anywhere in the name).

    ``_orig_mod`` is the attribute under which ``torch.compile`` keeps the compiled module, so no
    plain model uses it. DDP's / DataParallel's ``module.`` is removed by :func:`unwrap` instead
    (``module`` is an ordinary attribute name in user models).
    """
    if _COMPILE_COMPONENT not in name:
        return name
    return ".".join(part for part in name.split(".") if part != _COMPILE_COMPONENT)


def raw_names(model: nn.Module) -> Dict[str, str]:
    """canonical name -> the name of the parameter in ``unwrap(model)``."""
    return {canonical_name(raw): raw for raw, _ in unwrap(model).named_parameters()}


def named_parameters(model: nn.Module) -> Dict[str, Tensor]:
    """``{canonical name: parameter}`` of ``model`` (every parameter, trainable or not)."""
    inner = unwrap(model)
    params = dict(inner.named_parameters())
    return {name: params[raw] for name, raw in raw_names(inner).items()}


def module_parameter_names(model: nn.Module, predicate: Callable[[nn.Module], bool]) -> Tuple[str, ...]:
    """Canonical names of the parameters held (directly) by the modules of ``model`` for which
    ``predicate(module)`` is true, e.g. ``lambda m: isinstance(m, nn.BatchNorm2d)``.

    The parameters are found by identity and named by :func:`named_parameters`, so the names are
    the plain model's whatever wraps it (DDP, DataParallel, ``torch.compile``, also around a
    submodule) and a parameter shared between modules has its one name.
    """
    inner = unwrap(model)
    held = {id(p) for m in inner.modules() if predicate(m) for p in m.parameters(recurse=False)}
    return tuple(n for n, p in named_parameters(inner).items() if id(p) in held)


def name_patterns(arg: str, value) -> Optional[Tuple[str, ...]]:
    """``include`` / ``exclude``: None, one ``fnmatch`` pattern, or a non-empty list of them."""
    if value is None:
        return None
    if isinstance(value, str):
        value = (value,)
    if not isinstance(value, Iterable):
        raise TypeError(f"{arg} must be a name pattern (str) or a list of them, got {type(value).__name__} {value!r}")
    value = tuple(value)
    if not value or not all(isinstance(v, str) for v in value):
        raise TypeError(f"{arg} must be a name pattern (str) or a non-empty list of them, got {value!r}")
    return value


class ParameterSelection:
    """Trainable parameters whose name matches ``include`` (if given), not ``exclude``, and the
    predicate ``parameters(name, param)`` (if given). Patterns are checked against the model's
    names the first time a model is seen: a pattern that matches nothing is an error."""

    def __init__(self, include=None, exclude=None, parameters: Optional[Callable[[str, Tensor], bool]] = None):
        self.include = name_patterns("include", include)
        self.exclude = name_patterns("exclude", exclude)
        if parameters is not None and not callable(parameters):
            raise TypeError(f"parameters must be a callable (name, param) -> bool, got {type(parameters).__name__}")
        self.parameters = parameters
        self._checked = False

    def check_patterns(self, names: Iterable[str]) -> None:
        if self._checked:
            return
        names = list(names)
        for arg, pats in (("include", self.include), ("exclude", self.exclude)):
            for pat in pats or ():
                if not any(fnmatch.fnmatchcase(n, pat) for n in names):
                    raise ValueError(
                        f"{arg} pattern {pat!r} matches no parameter of the model; parameter names are "
                        f"{names[:8]}{' ...' if len(names) > 8 else ''}"
                    )
        self._checked = True

    def selects(self, name: str, param: Tensor) -> bool:
        if not param.requires_grad:
            return False
        if self.include is not None and not any(fnmatch.fnmatchcase(name, pat) for pat in self.include):
            return False
        if self.exclude is not None and any(fnmatch.fnmatchcase(name, pat) for pat in self.exclude):
            return False
        return self.parameters is None or bool(self.parameters(name, param))

    def select(self, params: Mapping[str, Tensor]) -> Dict[str, Tensor]:
        """The selected subset of ``params`` (canonical name -> parameter)."""
        return {n: p for n, p in params.items() if self.selects(n, p)}
