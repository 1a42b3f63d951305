"""What the studies share: their cases, the poisoned training set from the cache, training through ``fit`` with
hooks that measure the model after every epoch, and their common command-line options.

A study trains exactly as the grid trains a backdoored model (same specs, poisoned set, seed and training
config: the harness hands a study its cases as ``StudyCases``), through the one trainer, with ``TrainHooks``
that only observe: the state after epoch ``t`` is measured in ``on_epoch_start(t + 1)`` and, for the last
epoch, in ``on_train_end``, in eval mode without augmentation, and the model is put back in train mode; nothing
random is drawn, so training is unchanged.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn


from backdoor.attacks import Attack, PoisonedSet
from backdoor.data import Dataset
from backdoor.training import TrainHooks


def add_training_arguments(parser: argparse.ArgumentParser, attacks: list[str] | None = None,
                           ratios: list[float] | None = None) -> None:
    """The case a study trains: dataset, model, attacks, ratios, target, and the smoke grid's budget."""
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--dataset-params", type=json.loads, default={}, help='JSON, e.g. {"train_size": 500}')
    parser.add_argument("--model", default="cnn_small")
    if attacks is not None:
        parser.add_argument("--attacks", nargs="+", default=attacks,
                            help=f"data-poisoning attacks (default {' '.join(attacks)})")
    if ratios is not None:
        parser.add_argument("--ratios", nargs="+", type=float, default=ratios,
                            help=f"poison ratios (default {' '.join(map(str, ratios))})")
    parser.add_argument("--target", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=15, help="training epochs (default 15, the smoke grid's)")
    parser.add_argument("--lr", type=float, default=0.05, help="learning rate (default 0.05, the smoke grid's)")
    parser.add_argument("--batch-size", type=int, default=128)


class StudyCases(Protocol):
    """What a study asks of the harness (``backdoor.harness.study_cases`` gives it, as ``run``'s argument): the
    cases it trains, built and trained exactly as the grid builds and trains them, through the cache."""

    def case(self, attack: str, ratio: float, attack_params: dict | None = None) -> Any:
        """A no-defense case of the study's dataset and model (its ``case_id``, ``target``, ``attack``)."""

    def poisoned_data(self, case: Any) -> tuple[Dataset, Attack, PoisonedSet]:
        """The dataset, the prepared attack and the poisoned training set."""

    def backdoored_model(self, case: Any) -> tuple[nn.Module, Attack, Dataset]:
        """The grid's backdoored model of ``case`` (from the cache, or trained), its attack and data."""

    def train_observed(self, case: Any, data: Dataset, poisoned: PoisonedSet, hooks: TrainHooks) -> nn.Module:
        """Train the case's backdoored model as the grid does (same init, config and seed) with ``hooks``."""


class EpochEndHooks(TrainHooks):
    """Calls ``measure(epoch)`` on the model as it is after each epoch, in eval mode (then back to train)."""

    def __init__(self):
        self.model: nn.Module | None = None
        self.device = torch.device("cpu")
        self._done = -1

    def on_train_start(self, model, device, generator) -> None:
        self.model, self.device = model, device

    def on_epoch_start(self, epoch: int) -> None:
        if epoch > 0:
            self._measure(epoch - 1)

    def on_train_end(self) -> None:
        self._measure(self._done + 1)

    def _measure(self, epoch: int) -> None:
        was_training = self.model.training
        self.model.eval()
        try:
            self.measure(epoch)
        finally:
            self.model.train(was_training)
        self._done = epoch

    def measure(self, epoch: int) -> None:
        """Record the model's state after ``epoch`` (each study's hooks define what; the base only schedules)."""
        raise NotImplementedError


def write_json(path: Path, payload: dict) -> Path:
    path.write_text(json.dumps(payload, indent=1, sort_keys=True) + "\n")
    return path


def save_figure(fig, folder: Path, name: str) -> list[Path]:
    """PNG (150 dpi) and SVG of a study's figure."""
    import matplotlib.pyplot as plt

    paths = [folder / f"{name}.png", folder / f"{name}.svg"]
    for path in paths:
        fig.savefig(path, dpi=150, bbox_inches="tight")
    plt.close(fig)
    return paths
