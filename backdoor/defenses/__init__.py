"""Defense registry: one module per defense; each registers a ``Defense`` subclass under its name."""
from backdoor._registry import Registry
from backdoor.defenses.base import Defense, DefenseInputs, DefenseOutcome, NotApplicable

DEFENSES: Registry[Defense] = Registry("defense", package="backdoor.defenses")
register_defense = DEFENSES.register


def create_defense(name: str, **params) -> Defense:
    return DEFENSES.create(name, **params)


__all__ = ["DEFENSES", "Defense", "DefenseInputs", "DefenseOutcome", "NotApplicable", "create_defense",
           "register_defense"]
