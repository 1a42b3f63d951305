"""FT: fine-tuning on the defender's clean data (the baseline defense of BackdoorBench, Table 2).

Defaults from the paper's defense protocol: the defender's 5% clean subset, SGD lr 0.01 (momentum 0.9,
wd 5e-4), batch 256, cosine schedule, 100 epochs, with the usual crop/flip augmentation. ``epochs`` and
``lr`` override the matrix's defense budget when given.
"""
from __future__ import annotations

from backdoor._checks import check_int, check_number
from backdoor._registry import NONE, NOT_STATED, Param
from backdoor.defenses import register_defense
from backdoor.defenses.base import BY_DEFENSE_TRAINING, Defense, DefenseInputs, DefenseOutcome, Stage
from backdoor.mutants import Mutant


@register_defense("ft")
class FineTuning(Defense):
    """FT: fine-tune the backdoored model on the defender's clean subset."""

    kind = "model_repair"
    title = "FT"
    description = "fine-tune on the defender's 5% clean subset"
    order = 10
    parameters = {
        "epochs": Param("100", NOT_STATED, f"None: {BY_DEFENSE_TRAINING}"),
        "lr": Param(NONE, NOT_STATED, f"None: {BY_DEFENSE_TRAINING}"),
    }
    budgets = (
        Stage("fine-tune on the clean subset", "defense_training", "`epochs`, `lr`"),
    )
    # Each find starts with a newline and the line's indentation: it then matches the code line and not its
    # own text here, where the newline is an escape.
    mutants = (
        Mutant("zero-lr", "fine-tunes at learning rate 0: the steps do not move the model",
               "\n        config = inputs.training.with_(epochs=self.epochs, lr=self.lr)",
               "\n        config = inputs.training.with_(epochs=self.epochs, lr=self.lr).with_(lr=0.0)"),
        Mutant("trains-a-copy", "fine-tunes a copy and returns the backdoored model untouched",
               "\n        inputs.fit(inputs.model, inputs.clean,",
               "\n        inputs.fit(__import__('copy').deepcopy(inputs.model), inputs.clean,"),
        Mutant("ignores-overrides", "its epochs and lr do not override the defense budget",
               "\n        config = inputs.training.with_(epochs=self.epochs, lr=self.lr)",
               "\n        config = inputs.training"),
    )

    def __init__(self, epochs: int | None = None, lr: float | None = None):
        check_int("ft", "epochs", epochs, minimum=1, optional=True)
        check_number("ft", "lr", lr, low=0, low_open=True, optional=True)
        self.epochs, self.lr = epochs, lr

    def run(self, inputs: DefenseInputs) -> DefenseOutcome:
        config = inputs.training.with_(epochs=self.epochs, lr=self.lr)
        inputs.fit(inputs.model, inputs.clean, config, seed=inputs.seed, desc="ft")
        return DefenseOutcome(model=inputs.model, info={"epochs": config.epochs})
