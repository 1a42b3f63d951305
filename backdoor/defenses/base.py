"""What every defense is given and what it returns.

Model-repair defenses get the backdoored model and the defender's clean subset; data-side defenses also get
the poisoned training set (images and labels, without its mask). Both can build fresh models of the same
architecture (``new_model``) and train them (``fit``).

How the threat model is enforced. ``DefenseInputs`` has no field for the test sets, the poison mask or the
attack's target, and ``Runner.defense_inputs`` (the one place the pipeline builds it) fills its two callables
with small frozen objects that hold plain values, not closures: ``ModelRecipe`` the architecture's name,
parameters, class count, normalisation and init seed; ``FitOnDevice`` the device. So no object a defense is
given refers to the case, its data, the attack or the runner: tests/test_threat_model.py runs a spy defense
through the pipeline that walks everything reachable from its inputs (attributes, closure cells, ``__self__``,
globals, containers) and finds none of them. Python cannot stop code from importing: through any function's
globals, as through an import, a defense reaches the library's modules and could load a dataset itself; that
the same file's AST test forbids to the defense modules (no data loader, pipeline, cache or attack imports).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from backdoor._registry import NONE, Method
from backdoor.data import Split
from backdoor.models import Classifier, create_model
from backdoor.training import TrainConfig, fit

KINDS = ("none", "model_repair", "data_side")
# What a defense stage trains with: the matrix's ``defense_training`` (``inputs.training``), the attack's budget
# (``inputs.retraining``, the matrix's ``training``) for training from scratch on the poisoned set, a loop of
# the defense's own parameters (no TrainConfig at all), or nothing.
BUDGETS = ("defense_training", "retraining", "own parameters", NONE)
BY_DEFENSE_TRAINING = "the matrix's `defense_training`"  # for a why: "None: {BY_DEFENSE_TRAINING}"
BY_RETRAINING = "the attack's budget (`retraining`)"


class NotApplicable(Exception):
    """Raised by a defense that does not apply to the given model (e.g. ANP without batch norm)."""


@dataclass(frozen=True)
class ModelRecipe:
    """A fresh, untrained model of one architecture: calling it builds the registered model ``arch`` with
    ``params`` for ``num_classes`` classes, normalising with ``mean``/``std``, its initial weights drawn from
    ``seed`` (the same weights at every call). It holds only these values (``params`` a private copy)."""

    arch: str
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    seed: int
    params: dict = field(default_factory=dict)

    def __post_init__(self):
        object.__setattr__(self, "mean", tuple(self.mean))
        object.__setattr__(self, "std", tuple(self.std))
        # A copy: changing it must not change the case's parameters (part of its cache keys).
        object.__setattr__(self, "params", copy.deepcopy(dict(self.params)))

    def __call__(self) -> Classifier:
        return create_model(self.arch, self.num_classes, self.mean, self.std, seed=self.seed, **self.params)


@dataclass(frozen=True)
class FitOnDevice:
    """``backdoor.training.fit`` bound to ``device``, the one value it holds: ``fit(model, split, config,
    seed=..., ...)`` takes every other argument of ``fit``."""

    device: torch.device

    def __call__(self, model: nn.Module, data: Split, config: TrainConfig, **kwargs) -> dict:
        return fit(model, data, config, device=self.device, **kwargs)


@dataclass(frozen=True)
class DefenseInputs:
    model: nn.Module  # the backdoored model (a private copy: the defense may change it)
    clean: Split  # the defender's clean subset of the training set
    num_classes: int
    device: torch.device
    seed: int
    training: TrainConfig  # the defense budget (paper: batch 256, lr 0.01, cosine, 100 epochs)
    retraining: TrainConfig  # the attack's training budget, for defenses that retrain from scratch
    new_model: Callable[[], nn.Module]  # a fresh, untrained model of the same architecture (a ModelRecipe)
    fit: Callable[..., dict]  # training.fit bound to device (a FitOnDevice): fit(model, split, config, seed=..., ...)
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


@dataclass(frozen=True)
class Stage:
    """One training stage of a defense, for the parameter table: what it does, the budget it trains with (one
    of ``BUDGETS``) and which of the defense's parameters override that budget."""

    what: str
    budget: str
    set_by: str


class Defense(Method):
    """Base class. Subclasses set ``name`` and ``kind``, take their parameters (paper defaults) as keyword
    arguments, and implement ``run``; beside ``Method``'s metadata they declare ``budgets``, their stages."""

    name: ClassVar[str]
    kind: ClassVar[str]
    budgets: ClassVar[tuple[Stage, ...] | None] = None

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
