"""What every defense is given and what it returns.

The threat model is enforced by construction: ``DefenseInputs`` has no field for the test sets, the poison
mask or the attack's target, so a defense cannot reach them. Model-repair defenses get the backdoored model
and the defender's clean subset; data-side defenses also get the poisoned training set (images and labels,
without its mask) and can build and train fresh models of the same architecture.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from backdoor._registry import Method
from backdoor.data import Split
from backdoor.training import TrainConfig

KINDS = ("none", "model_repair", "data_side")


class NotApplicable(Exception):
    """Raised by a defense that does not apply to the given model (e.g. ANP without batch norm)."""


@dataclass(frozen=True)
class DefenseInputs:
    model: nn.Module  # the backdoored model (a private copy: the defense may change it)
    clean: Split  # the defender's clean subset of the training set
    num_classes: int
    device: torch.device
    seed: int
    training: TrainConfig  # the defense budget (paper: batch 256, lr 0.01, cosine, 100 epochs)
    retraining: TrainConfig  # the attack's training budget, for defenses that retrain from scratch
    new_model: Callable[[], nn.Module]  # a fresh, untrained model of the same architecture
    fit: Callable[..., dict]  # backdoor.training.fit bound to device: fit(model, split, config, seed=..., ...)
    poisoned_train: Split | None = None  # data-side defenses only: images and labels, no mask


@dataclass
class DefenseOutcome:
    """The defended model and, where the defense detects, what it flagged.

    flagged: bool [N] over ``poisoned_train`` (True = judged poisoned); scores: float [N], higher = more
    suspicious; info: JSON-serialisable figures (pruned channels, anomaly index, ...).
    """

    model: nn.Module
    flagged: torch.Tensor | None = None
    scores: torch.Tensor | None = None
    info: dict[str, Any] = field(default_factory=dict)


class Defense(Method):
    """Base class. Subclasses set ``name`` and ``kind``, take their parameters (paper defaults) as keyword
    arguments, and implement ``run``."""

    name: ClassVar[str]
    kind: ClassVar[str]

    def run(self, inputs: DefenseInputs) -> DefenseOutcome:
        raise NotImplementedError


def split_validation(clean: Split, fraction: float, seed: int) -> tuple[Split, Split]:
    """Seeded split of the defender's data into (train, validation), for model selection inside a defense."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(clean), generator=g)
    n_val = max(1, int(round(fraction * len(clean))))
    return clean.subset(order[n_val:]), clean.subset(order[:n_val])


def private_copy(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)
