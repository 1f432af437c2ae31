"""How each torch function moves channel labels from its inputs to its outputs: one rule per op, in a table.

:mod:`base` holds the table (``OP_RULES``) and the shared machinery; each other module registers the rules
of one family of ops when it is imported, which this package does.
"""

from lightning_prune.graph.rules import contractions, elementwise, layers, movement, reductions  # noqa: F401  (they register)
from lightning_prune.graph.rules.base import OP_RULES, Call, Rule, apply_rule, rule

__all__ = ["OP_RULES", "Call", "Rule", "apply_rule", "rule"]
