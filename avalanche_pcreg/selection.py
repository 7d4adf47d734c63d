"""Which parameters are regularized, and the names they are stored under. Framework-free (torch only).

**Names are the keys everywhere** (the state, importances, checkpoints), and they are the names of
the plain model: the wrappers that rename parameters are looked through.

* ``torch.nn.parallel.DistributedDataParallel`` and ``torch.nn.DataParallel`` add ``module.``;
* ``torch.compile`` adds ``_orig_mod.`` (also in the middle of a name, for a compiled submodule).

:func:`canonical_name` and :func:`named_parameters` are the one place where this happens: a name
that is compared with a stored or selected name comes from them (:func:`module_parameter_names`
for parameters picked by the kind of module that holds them), never from a raw
``named_modules()`` / ``named_parameters()`` of a possibly wrapped model.

:class:`ParameterSelection` selects by name (``include`` / ``exclude`` patterns), by a
``(name, param)`` predicate (``parameters``) and by the module that holds a parameter
(``include_modules`` / ``exclude_modules``: module types or a ``(module) -> bool`` predicate such as
:func:`norm_layers`, which catches a normalization layer whatever its name, e.g. torchvision
ResNet's ``layer2.0.downsample.1``).
"""

from __future__ import annotations

import fnmatch
from typing import Callable, Dict, Iterable, Mapping, Optional, Tuple

from torch import Tensor, nn

__all__ = ["canonical_name", "unwrap", "named_parameters", "raw_names", "module_parameter_names", "name_patterns",
           "NORM_LAYERS", "norm_layers", "ModuleTypes", "module_selector", "ParameterSelection"]

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


#: the normalization layers :func:`norm_layers` recognises: BatchNorm*, SyncBatchNorm and InstanceNorm*
#: (``_NormBase``), GroupNorm, LayerNorm and RMSNorm
NORM_LAYERS: Tuple[type, ...] = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm) + (
    (nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())


def norm_layers(module: nn.Module) -> bool:
    """True for a normalization layer (one of :data:`NORM_LAYERS`): the predicate for
    ``ParameterChangePlugin(exclude_modules=norm_layers)``, which leaves out every normalization
    parameter (``bn1.weight``, ``layer1.0.downsample.1.weight``, ``ln.bias`` ...) whatever its name."""
    return isinstance(module, NORM_LAYERS)


class ModuleTypes:
    """A picklable predicate ``(module) -> bool``: ``isinstance(module, types)``."""

    def __init__(self, types: Tuple[type, ...]):
        self.types = tuple(types)

    def __call__(self, module: nn.Module) -> bool:
        return isinstance(module, self.types)

    def __eq__(self, other) -> bool:
        return isinstance(other, ModuleTypes) and other.types == self.types

    def __hash__(self) -> int:
        return hash(self.types)

    def __repr__(self) -> str:
        return f"ModuleTypes({', '.join(t.__name__ for t in self.types)})"


def module_selector(arg: str, value) -> Optional[Callable[[nn.Module], bool]]:
    """``include_modules`` / ``exclude_modules``: None, an ``nn.Module`` subclass, a non-empty tuple
    or list of them (a :class:`ModuleTypes` predicate), or a predicate ``(module) -> bool``."""
    if value is None:
        return None
    if isinstance(value, type):
        value = (value,)
    if isinstance(value, (tuple, list)):
        if not value or not all(isinstance(t, type) and issubclass(t, nn.Module) for t in value):
            raise TypeError(f"{arg} must be an nn.Module subclass or a non-empty tuple of them, got {value!r}")
        return ModuleTypes(tuple(value))
    if callable(value):
        return value
    raise TypeError(f"{arg} must be an nn.Module subclass, a tuple of them or a predicate (module) -> bool, "
                    f"got {type(value).__name__} {value!r}")


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
    predicate ``parameters(name, param)`` (if given), held by a module that ``include_modules``
    selects (if given) and not by one that ``exclude_modules`` selects (see :func:`module_selector`;
    the parameters a module holds directly, found by :func:`module_parameter_names`). Patterns are
    checked against the model's names the first time a model is seen: a pattern that matches nothing
    is an error, and so is an ``include_modules`` that holds no parameter (an ``exclude_modules``
    that matches nothing excludes nothing: ``exclude_modules=norm_layers`` fits models without
    normalization layers too)."""

    def __init__(self, include=None, exclude=None, parameters: Optional[Callable[[str, Tensor], bool]] = None,
                 include_modules=None, exclude_modules=None):
        self.include = name_patterns("include", include)
        self.exclude = name_patterns("exclude", exclude)
        if parameters is not None and not callable(parameters):
            raise TypeError(f"parameters must be a callable (name, param) -> bool, got {type(parameters).__name__}")
        self.parameters = parameters
        self.include_modules = module_selector("include_modules", include_modules)
        self.exclude_modules = module_selector("exclude_modules", exclude_modules)
        self._checked = False

    @property
    def by_module(self) -> bool:
        """Whether the selection needs the model's modules (``include_modules`` / ``exclude_modules``)."""
        return self.include_modules is not None or self.exclude_modules is not None

    def check_patterns(self, names: Iterable[str], model: Optional[nn.Module] = None) -> None:
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
        if self.include_modules is not None and model is not None:
            if not module_parameter_names(model, self.include_modules):
                kinds = sorted({type(m).__name__ for m in unwrap(model).modules()
                               if next(m.parameters(recurse=False), None) is not None})
                raise ValueError(
                    f"include_modules {self.include_modules!r} selects no module that holds a parameter; the "
                    f"model's modules with parameters are {kinds[:8]}{' ...' if len(kinds) > 8 else ''}"
                )
        self._checked = True

    def selects(self, name: str, param: Tensor) -> bool:
        """Whether ``name`` / ``param`` pass the name and ``parameters`` filters (not the module ones)."""
        if not param.requires_grad:
            return False
        if self.include is not None and not any(fnmatch.fnmatchcase(name, pat) for pat in self.include):
            return False
        if self.exclude is not None and any(fnmatch.fnmatchcase(name, pat) for pat in self.exclude):
            return False
        return self.parameters is None or bool(self.parameters(name, param))

    def select(self, params: Mapping[str, Tensor], model: Optional[nn.Module] = None) -> Dict[str, Tensor]:
        """The selected subset of ``params`` (canonical name -> parameter, ``named_parameters(model)``);
        ``model`` is needed with ``include_modules`` / ``exclude_modules``."""
        inside: Optional[set] = None
        outside: set = set()
        if self.by_module:
            if model is None:
                raise TypeError("include_modules / exclude_modules select parameters by module: pass the model")
            if self.include_modules is not None:
                inside = set(module_parameter_names(model, self.include_modules))
            if self.exclude_modules is not None:
                outside = set(module_parameter_names(model, self.exclude_modules))
        return {n: p for n, p in params.items()
                if (inside is None or n in inside) and n not in outside and self.selects(n, p)}
