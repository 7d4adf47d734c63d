"""Per-sample gradient sums at minibatch cost: the engine behind the per-sample estimators.

Read in this order: :mod:`.engine` (one batch, the fast path), :mod:`.rules` (one file per layer
family), :mod:`.quantity` (what is summed, what a rule is asked for), :mod:`.policy` (chunk sizes,
budgets, paths), :mod:`.sums` (the running sums). The rest are the parts a reader of the fast
path can skip: :mod:`.hooks` and :mod:`.plan` (what the forward recorded, which path takes each
parameter), :mod:`.stream` (the streamed backward), :mod:`.check` (the self-check and the
sample-axis test), :mod:`.module_sums` (a module's rule or per-layer fallback),
:mod:`.layer_fallback` and :mod:`.model_fallback` (``torch.func``), :mod:`.diagnostics` (errors
and warnings). docs/architecture.md has the map.
"""

from .engine import PerSampleGradNorms
from .policy import Policy, default_policy, using_policy
from .quantity import GradientSum, PowerSum, Quantity, Request, Sums
from .rules import RULES, FunctionRule, Rule, register_rule, rule_for
from .sums import acc_dtype

__all__ = ["PerSampleGradNorms", "Policy", "default_policy", "using_policy", "Quantity", "PowerSum", "GradientSum",
           "Request", "Sums", "Rule", "FunctionRule", "register_rule", "rule_for", "RULES", "acc_dtype"]
