"""Attack registry: one module per attack; each registers an ``Attack`` subclass under its name."""
from backdoor._registry import Registry
from backdoor.attacks.base import Attack, AttackContext, InfeasibleRatioError, PoisonedSet

ATTACKS: Registry[Attack] = Registry("attack", package="backdoor.attacks")
register_attack = ATTACKS.register


def create_attack(name: str, **params) -> Attack:
    return ATTACKS.create(name, **params)


__all__ = ["ATTACKS", "Attack", "AttackContext", "InfeasibleRatioError", "PoisonedSet", "create_attack",
           "register_attack"]
