"""Per-layer rules, one module per layer family, and their registry (:mod:`.base`).

Built in: ``nn.Linear`` (:mod:`.linear`), ``nn.Conv1d``/``nn.Conv2d`` (:mod:`.conv`),
``nn.LayerNorm``/``nn.GroupNorm``/``nn.BatchNorm1d/2d/3d`` (:mod:`.norm`) and ``nn.Embedding``
(:mod:`.embedding`). Add a layer with :func:`register_rule`. :mod:`.kron` holds the Kronecker
rows of ``nn.Linear`` and the convolutions (the second quantity's layer functions).
"""

from .base import RULES, FunctionRule, Rule, register_rule, rule_for
from . import conv, embedding, kron, linear, norm  # noqa: F401  (register the built-in rules)

__all__ = ["Rule", "FunctionRule", "register_rule", "rule_for", "RULES"]
