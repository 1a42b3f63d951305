"""What every detector is given and what it returns: the three detection tasks.

A detector answers one question, its ``task``:

- ``input`` (at inference: is this input triggered?). ``calibrate(inputs)`` sees the model under inspection and
  the defender's clean subset and returns an ``InputScreen``: a ``threshold`` fixed from that clean data alone and
  ``scores(x)``, a suspicion score per image (higher = more likely triggered) for images it is shown without
  labels. The harness shows it the clean test set (negatives) and the triggered test set (positives); the screen
  never learns which is which.
- ``data`` (before training: which training samples are poisoned?). ``detect(inputs)`` gets the poisoned
  training set (images and labels, no mask) beside the model trained on it and returns a ``DataDetection``: a
  flag and a score per sample, in the set's order.
- ``model`` (is this model backdoored?). ``inspect(inputs)`` returns a ``ModelVerdict``: a score (higher = more
  likely backdoored) and the detector's own decision. A ``data_free`` detector (MM-BD) is given an empty clean
  set, so it cannot use one.

The threat model is the defenses' (``backdoor.defenses.base``): detectors are given ``DefenseInputs``, which
hold no test set, no poison mask and no attack target (tests/test_threat_model.py walks what they are given), and
every threshold and calibration comes from ``inputs.clean`` alone.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from backdoor._registry import Method
from backdoor.defenses.base import DefenseInputs

TASKS = ("input", "data", "model")
TASK_TITLES = {"input": "input-level", "data": "data-side", "model": "model-level"}


class InputScreen:
    """A calibrated input-level detector: ``threshold`` (from the defender's clean data) and ``scores``.

    ``flag(x)`` is ``scores(x) > threshold``. Subclasses implement ``scores`` on uint8 images [N, C, H, W] and
    return float scores [N] on the CPU, in order."""

    threshold: float

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def flag(self, x: torch.Tensor) -> torch.Tensor:
        return self.scores(x) > self.threshold


@dataclass
class DataDetection:
    """flagged: bool [N] over ``inputs.poisoned_train`` (True = judged poisoned); scores: float [N], higher = more
    suspicious; info: JSON-serialisable figures."""

    flagged: torch.Tensor
    scores: torch.Tensor
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class ModelVerdict:
    """score: higher = more likely backdoored; flagged: the detector's own decision; info: JSON-serialisable
    figures (e.g. the suspected target class)."""

    score: float
    flagged: bool
    info: dict[str, Any] = field(default_factory=dict)


class Detector(Method):
    """Base class. Subclasses set ``name``, ``task`` (one of ``TASKS``) and ``Method``'s metadata, take their
    parameters (paper defaults) as keyword arguments, and implement the task's method (below)."""

    name: ClassVar[str]
    task: ClassVar[str]
    data_free: ClassVar[bool] = False  # given an empty clean set (model-level detectors that use no data)


class InputDetector(Detector):
    task = "input"

    def calibrate(self, inputs: DefenseInputs) -> InputScreen:
        raise NotImplementedError


class DataDetector(Detector):
    task = "data"

    def detect(self, inputs: DefenseInputs) -> DataDetection:
        raise NotImplementedError


class ModelDetector(Detector):
    task = "model"

    def inspect(self, inputs: DefenseInputs) -> ModelVerdict:
        raise NotImplementedError


def quantile_threshold(clean_scores: torch.Tensor, fpr: float) -> float:
    """The threshold that flags a share ``fpr`` of the clean scores: their (1 - fpr) quantile (linear
    interpolation), so ``scores > threshold`` flags at most that share of them."""
    if not 0 <= fpr < 1:
        raise ValueError(f"fpr must be in [0, 1), got {fpr!r}")
    if len(clean_scores) == 0:
        raise ValueError("no clean scores to calibrate a threshold on")
    return float(torch.quantile(clean_scores.double().flatten(), 1 - fpr))
