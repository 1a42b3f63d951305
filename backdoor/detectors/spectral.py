"""Spectral signatures as a pure data-side detector: the flags of the Spectral defense, with no retraining.

Tran, Li, Madry, "Spectral Signatures in Backdoor Attacks", NeurIPS 2018. Per label, the penultimate
representations of the model trained on the poisoned set are centred and projected on their top singular
vector; the 1.5 eps samples with the largest squared projection are flagged (eps 0.1 removes 15% per label).

The detection step of ``backdoor/defenses/spectral.py`` (``SpectralSignatures.detect_poison``; its docstring
states the departures): here the harness scores its flags and scores against the poison mask and the defense's
retraining is not run. Scores: the squared projection ranked within its label (1 = the label's most aligned
sample), the defense's scores, so that an AUROC over all labels compares samples by their place in their label.
"""
from __future__ import annotations

from backdoor.defenses.base import DefenseInputs
from backdoor.defenses.spectral import SpectralSignatures
from backdoor.detectors import register_detector
from backdoor.detectors.base import DataDetection, DataDetector
from backdoor.mutants import Mutant


@register_detector("spectral")
class SpectralDetector(DataDetector):
    """Spectral: per label, flag the 1.5 eps samples most aligned with the top singular vector."""

    title = "Spectral"
    description = "per label, flag the 1.5 eps highest projections on the top singular vector (eps 0.1); no retraining"
    order = 140
    parameters = {"eps": SpectralSignatures.parameters["eps"]}
    mutants = (
        Mutant("reversed-scores", "scores the least aligned samples highest",
               "\n        return DataDetection(flagged, scores, info)",
               "\n        return DataDetection(flagged, 1 - scores, info)"),
        Mutant("flags-the-rest", "flags the samples the defense keeps",
               "\n        flagged, scores, info = self._defense.detect_poison(inputs)",
               "\n        flagged, scores, info = self._defense.detect_poison(inputs)\n        flagged = ~flagged"),
    )

    def __init__(self, eps: float = 0.1):
        self._defense = SpectralSignatures(eps=eps)
        self.eps = eps

    def detect(self, inputs: DefenseInputs) -> DataDetection:
        flagged, scores, info = self._defense.detect_poison(inputs)
        return DataDetection(flagged, scores, info)
