"""``PluginOptions``: the less often changed settings of ``ParameterChangePlugin``, checked once.

The plugin's constructor takes them as keyword arguments, as always; it holds them in one frozen
:class:`PluginOptions` (``plugin.options``) and reads each as a read-only attribute
(``plugin.seed``, ...). Every check lives in :meth:`PluginOptions.__post_init__`: a TypeError or a
ValueError names the argument and what it takes.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable, Optional

from ._checks import check_choice, check_nonneg_finite, check_positive_int, check_seed
from ._data import IMPORTANCE_DATA
from .importance._common import check_criterion, check_output_transform
from .importance.persample import Policy
from .kron_state import KRON_MERGES
from .penalty import IMPLS

__all__ = ["PluginOptions", "ON_NONFINITE"]

ON_NONFINITE = ("raise", "warn")


@dataclass(frozen=True)
class PluginOptions:
    """The plugin's less often changed settings, each documented in
    :class:`~avalanche_pcreg.ParameterChangePlugin` (the defaults are its constructor's), checked and
    normalised (numpy integers to int, ...) here. ``xi`` and ``estimator_options`` are further
    checked by the trajectory estimator they configure, when the plugin builds it."""

    batch_size: Optional[int] = None
    num_samples: Optional[int] = None
    criterion: Optional[Callable] = None
    importance_data: str = "experience"
    xi: float = 0.1
    seed: int = 0
    impl: Optional[str] = None
    chunk_size: Optional[int] = None
    estimator_options: Optional[dict] = None
    importance_scale: float = 1.0
    running_average: bool = False
    stability_guard: bool = False
    warn_ratio: Optional[float] = 1e4
    strict: bool = True
    on_nonfinite: str = "raise"
    output_transform: Optional[Callable] = None
    keep_importance_data: bool = False
    warn_frozen: bool = True
    policy: Optional[Policy] = None
    kfac_merge: Optional[str] = None

    def __post_init__(self):
        for name in ("running_average", "stability_guard", "strict", "keep_importance_data", "warn_frozen"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
        if self.estimator_options is not None and not isinstance(self.estimator_options, dict):
            raise TypeError(f"estimator_options must be a dict, got {type(self.estimator_options).__name__}")
        if self.impl is not None:
            check_choice("impl", self.impl, IMPLS)
        if self.policy is not None and not isinstance(self.policy, Policy):
            raise TypeError("policy must be an avalanche_pcreg.importance.persample.Policy (e.g. "
                            "Policy.for_device('cpu').replace(chunk_size=64)) or None, got "
                            f"{type(self.policy).__name__} {self.policy!r}")
        checked = {
            "importance_scale": check_nonneg_finite("importance_scale", self.importance_scale),
            "warn_ratio": None if self.warn_ratio is None else check_nonneg_finite("warn_ratio", self.warn_ratio),
            "batch_size": check_positive_int("batch_size", self.batch_size, allow_none=True),
            "num_samples": check_positive_int("num_samples", self.num_samples, allow_none=True),
            "chunk_size": check_positive_int("chunk_size", self.chunk_size, allow_none=True),
            "seed": check_seed("seed", self.seed),
            "criterion": check_criterion(self.criterion),
            "output_transform": check_output_transform(self.output_transform),
            "importance_data": check_choice("importance_data", self.importance_data, IMPORTANCE_DATA),
            "on_nonfinite": check_choice("on_nonfinite", self.on_nonfinite, ON_NONFINITE),
            "kfac_merge": None if self.kfac_merge is None else check_choice("kfac_merge", self.kfac_merge, KRON_MERGES),
        }
        if checked["importance_scale"] == 0:
            raise ValueError("importance_scale must be > 0, got 0")
        for name, value in checked.items():
            object.__setattr__(self, name, value)


class OptionAttribute:
    """A read-only attribute of the plugin: the field of its ``options`` of the name it is bound to."""

    def __set_name__(self, owner, name):
        if name not in OPTION_NAMES:
            raise TypeError(f"{owner.__name__}.{name}: PluginOptions has no field {name!r}")
        self.name = name

    def __get__(self, plugin, owner=None):
        return self if plugin is None else getattr(plugin.options, self.name)

    def __set__(self, plugin, value):
        raise AttributeError(f"{self.name} is fixed at construction (plugin.options is a frozen PluginOptions)")


OPTION_NAMES = tuple(f.name for f in fields(PluginOptions))
