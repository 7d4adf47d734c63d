"""The per-layer rules, kept importable from here: they live in
:mod:`avalanche_pcreg.importance.persample.rules` (one module per layer family)."""

import sys

from .persample.rules import RULES, FunctionRule, Rule, register_rule, rule_for
from .persample.rules import conv, embedding, linear, norm

# the layer families' modules under their former names (avalanche_pcreg.importance.rules.conv, ...)
for _name, _module in {"conv": conv, "embedding": embedding, "linear": linear, "norm": norm}.items():
    sys.modules[f"{__name__}.{_name}"] = _module

__all__ = ["Rule", "FunctionRule", "register_rule", "rule_for", "RULES"]
