"""No defense: the backdoored model as it is (the first column group of every leaderboard)."""
from __future__ import annotations

from backdoor._registry import NONE
from backdoor.defenses import register_defense
from backdoor.defenses.base import Defense, DefenseInputs, DefenseOutcome, Stage


@register_defense("none")
class NoDefense(Defense):
    """No defense: evaluate the backdoored model unchanged."""

    kind = "none"
    title = "No defense"
    description = "the backdoored model as it is"
    order = 0
    budgets = (
        Stage("(nothing trains)", NONE, NONE),
    )

    def run(self, inputs: DefenseInputs) -> DefenseOutcome:
        return DefenseOutcome(model=inputs.model)
