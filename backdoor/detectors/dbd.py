"""DBD's split as a pure data-side detector: the samples DBD strips of their labels, with no MixMatch stage.

Huang, Li, Wu, Qin, Ren, "Backdoor Defense via Decoupling the Training Process", ICLR 2022. A backbone is
trained by SimCLR without labels, a head is warmed up on it with the symmetric cross entropy, and the
high-loss (1 - epsilon) share of the poisoned set is judged poisoned: with epsilon 0.5, half the training set is
flagged, by design (DBD then trains on it without labels), so its FPR is about 0.5 - ratio and its precision low;
the AUROC of the loss is the figure to compare.

Stages 1-3 of ``backdoor/defenses/dbd.py`` (``DecouplingBackdoorDefense.detect_poison``; its docstring states the
departures). Scores: the symmetric cross entropy (the defense's scores).
"""
from __future__ import annotations

from backdoor.defenses.base import DefenseInputs
from backdoor.defenses.dbd import DecouplingBackdoorDefense
from backdoor.detectors import register_detector
from backdoor.detectors.base import DataDetection, DataDetector
from backdoor.mutants import Mutant

_SHARED = ("simclr_epochs", "simclr_batch_size", "simclr_lr", "temperature", "projection_dim", "warmup_epochs",
           "warmup_batch_size", "warmup_lr", "sce_alpha", "sce_beta", "epsilon")


@register_detector("dbd")
class DecouplingSplit(DataDetector):
    """DBD split: SimCLR backbone, SCE head warm-up, flag the high-loss half."""

    title = "DBD"
    description = ("SimCLR backbone (100 epochs), SCE head warm-up 10 epochs; flag the high-loss 50% (DBD's split); "
                   "no MixMatch")
    order = 160
    parameters = {name: DecouplingBackdoorDefense.parameters[name] for name in _SHARED}
    mutants = (
        Mutant("reversed-scores", "scores the low-loss samples highest",
               "\n        return DataDetection(flagged, losses, info)",
               "\n        return DataDetection(flagged, -losses, info)"),
        Mutant("flags-the-rest", "flags the half DBD keeps labelled",
               "\n        _, flagged, losses, info = self._defense.detect_poison(inputs)",
               "\n        _, flagged, losses, info = self._defense.detect_poison(inputs)\n        flagged = ~flagged"),
    )

    def __init__(self, simclr_epochs: int = 100, simclr_batch_size: int = 512, simclr_lr: float = 0.4,
                 temperature: float = 0.5, projection_dim: int = 128, warmup_epochs: int = 10,
                 warmup_batch_size: int = 128, warmup_lr: float | None = None, sce_alpha: float = 0.1,
                 sce_beta: float = 1.0, epsilon: float = 0.5):
        self._defense = DecouplingBackdoorDefense(**{n: v for n, v in locals().items() if n in _SHARED})
        for name in _SHARED:
            setattr(self, name, getattr(self._defense, name))

    def detect(self, inputs: DefenseInputs) -> DataDetection:
        _, flagged, losses, info = self._defense.detect_poison(inputs)
        return DataDetection(flagged, losses, info)
