"""The studies' cases, built and trained by the grid's ``Runner`` through the cache: what ``backdoor study``
hands a study's ``run`` (``backdoor.studies._setup.StudyCases``), so that the studies never import the runner."""
from __future__ import annotations

import argparse

from torch import nn

from backdoor.attacks import ATTACKS, Attack, PoisonedSet
from backdoor.data import Dataset
from backdoor.harness.cache import ArtifactCache
from backdoor.harness.case import Case
from backdoor.harness.case_record import StageLog
from backdoor.harness import specs
from backdoor.harness.runner import Runner, backdoor_model_seed
from backdoor.training import TrainConfig, TrainHooks, fit


class StudyCases:
    """The cases of one study's command line (dataset, model, target, seed, training budget, cache, device)."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.runner = Runner(ArtifactCache(args.cache_dir), args.device)

    def case(self, attack: str, ratio: float, attack_params: dict | None = None) -> Case:
        """A no-defense case of the study's dataset/model with the given attack and ratio."""
        if ATTACKS.get(attack).kind == "training_controllable":
            raise ValueError(f"{attack} poisons inside the trainer with its own hooks; studies take data-poisoning "
                             "attacks")
        args = self.args
        return Case(matrix="study", dataset=args.dataset, dataset_params=args.dataset_params, model=args.model,
                    attack=attack, defense="none", ratio=ratio, seed=args.seed, target=args.target,
                    attack_params={"cap_ratio": True, **(attack_params or {})},
                    training=TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr))

    def poisoned_data(self, case: Case) -> tuple[Dataset, Attack, PoisonedSet]:
        """The dataset, the prepared attack and the poisoned training set, as the grid builds them."""
        log_ = StageLog()
        data = self.runner.dataset(case, log_)
        attack = self.runner.attack(case, data, log_)
        return data, attack, self.runner.poisoned(case, attack, data, log_, specs.attack_spec(case, attack))

    def backdoored_model(self, case: Case) -> tuple[nn.Module, Attack, Dataset]:
        """The grid's backdoored model of ``case`` (from the cache, or trained), its attack and data."""
        log_ = StageLog()
        data = self.runner.dataset(case, log_)
        attack = self.runner.attack(case, data, log_)
        model, _ = self.runner.backdoored_model(case, attack, data, log_)
        return model, attack, data

    def train_observed(self, case: Case, data: Dataset, poisoned: PoisonedSet, hooks: TrainHooks) -> nn.Module:
        """Train the case's backdoored model as the grid does (same init, config and seed) with observing hooks."""
        model = self.runner.new_model(case, data)
        fit(model, poisoned.split, self.runner.train_config(case, data), device=self.runner.device,
            seed=backdoor_model_seed(case), hooks=hooks, desc=f"{case.attack} study")
        return model
