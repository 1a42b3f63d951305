"""ABL's isolation as a pure data-side detector: the samples ABL isolates, with no fine-tuning or unlearning.

Li, Lyu, Koren, Lyu, Li, Ma, "Anti-Backdoor Learning: Training Clean Models on Poisoned Data", NeurIPS 2021. A
model is trained from scratch on the poisoned set under the flooding loss (gradient ascent below gamma) for a few
epochs; poisoned samples are learnt fastest, so the lowest-loss share (1%) is isolated.

The isolation stage of ``backdoor/defenses/abl.py`` (``AntiBackdoorLearning.isolate``; its docstring states the
departures). Scores: the negated per-sample loss (lowest loss = most suspicious), the defense's scores.
"""
from __future__ import annotations

from backdoor.defenses.abl import AntiBackdoorLearning
from backdoor.defenses.base import DefenseInputs
from backdoor.detectors import register_detector
from backdoor.detectors.base import DataDetection, DataDetector
from backdoor.mutants import Mutant

_SHARED = ("isolation_epochs", "isolation_ratio", "gamma", "lr")


@register_detector("abl")
class AntiBackdoorIsolation(DataDetector):
    """ABL isolation: train under the flooding loss, flag the lowest-loss 1%."""

    title = "ABL"
    description = "20 epochs under a flooding loss (gamma 0.5) from scratch; flag the lowest-loss 1% (ABL's isolation)"
    order = 150
    parameters = {name: AntiBackdoorLearning.parameters[name] for name in _SHARED}
    mutants = (
        Mutant("reversed-scores", "scores the highest-loss samples highest",
               "\n        return DataDetection(flagged, -losses, info)",
               "\n        return DataDetection(flagged, losses, info)"),
        Mutant("flags-the-rest", "flags the samples ABL keeps",
               "\n        _, flagged, losses, info = self._defense.isolate(inputs)",
               "\n        _, flagged, losses, info = self._defense.isolate(inputs)\n        flagged = ~flagged"),
    )

    def __init__(self, isolation_epochs: int = 20, isolation_ratio: float = 0.01, gamma: float = 0.5,
                 lr: float | None = None):
        self._defense = AntiBackdoorLearning(**{n: v for n, v in locals().items() if n in _SHARED})
        for name in _SHARED:
            setattr(self, name, getattr(self._defense, name))

    def detect(self, inputs: DefenseInputs) -> DataDetection:
        _, flagged, losses, info = self._defense.isolate(inputs)
        return DataDetection(flagged, -losses, info)
