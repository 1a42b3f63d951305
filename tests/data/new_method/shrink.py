"""Shrink (an example defense: tests/test_new_method.py adds it to a copy of the checkout as one file).

Multiplies every weight of the backdoored model by ``factor``; trains nothing.
"""
from __future__ import annotations

import torch

from backdoor._checks import check_number
from backdoor._registry import NONE, Param
from backdoor.defenses import register_defense
from backdoor.defenses.base import Defense, DefenseInputs, DefenseOutcome, Stage
from backdoor.mutants import Mutant


@register_defense("shrink")
class Shrink(Defense):
    """Shrink: multiply every weight of the backdoored model by a factor."""

    kind = "model_repair"
    title = "Shrink"
    order = 5  # after No defense (0), before FT (10)
    parameters = {
        "factor": Param(NONE, NONE, "what every weight is multiplied by"),
    }
    budgets = (
        Stage("scale the weights", "own parameters", "`factor` (no training)"),
    )
    mutants = (
        Mutant("biases-only", "scales the biases instead of the weights",
               '\n                if name.endswith("weight"):', '\n                if name.endswith("bias"):'),
        Mutant("squared", "multiplies by the factor squared",
               "\n                    parameter.mul_(self.factor)", "\n                    parameter.mul_(self.factor ** 2)"),
    )
    mutation_tests = ("tests/test_shrink.py",)

    def __init__(self, factor: float = 0.5):
        check_number("shrink", "factor", factor, low=0.0)
        self.factor = factor

    def run(self, inputs: DefenseInputs) -> DefenseOutcome:
        with torch.no_grad():
            for name, parameter in inputs.model.named_parameters():
                if name.endswith("weight"):
                    parameter.mul_(self.factor)
        return DefenseOutcome(model=inputs.model)
