"""Activation clustering as a pure data-side detector: the flags of the AC defense, with no final retraining.

Chen, Carvalho, Baracaldo, Ludwig, Edwards, Lee, Molloy, Srivastava, "Detecting Backdoor Attacks on Deep Neural
Networks by Activation Clustering", SafeAI@AAAI 2019. Per label, the penultimate activations of the model trained
on the poisoned set are reduced (ICA to 10 dimensions) and split by 2-means; a cluster is judged poisoned by
exclusionary reclassification (a model trained without it sends most of it to another class) or, with
``rule: relative_size``, by its relative size.

The detection step of ``backdoor/defenses/ac.py`` (``ActivationClustering.detect_poison``; its docstring states
the departures). The exclusionary rule's reclassification models are part of detection and train with
``epochs`` (the attack's budget by default); the defense's retraining on the unflagged samples is not run.
"""
from __future__ import annotations

from backdoor.defenses.ac import ActivationClustering
from backdoor.defenses.base import DefenseInputs
from backdoor.detectors import register_detector
from backdoor.detectors.base import DataDetection, DataDetector
from backdoor.mutants import Mutant

_SHARED = ("rule", "reduction", "n_components", "size_threshold", "exclusion_threshold", "max_tested_share",
           "epochs")


@register_detector("ac")
class ActivationClusteringDetector(DataDetector):
    """AC: per-label ICA + 2-means on penultimate activations; flag the cluster exclusionary reclassification judges."""

    title = "AC"
    description = ("per-label ICA to 10 dims + 2-means on penultimate activations; flag the cluster a model trained "
                   "without it sends to other classes (exclusionary reclassification); no final retraining")
    order = 130
    parameters = {name: ActivationClustering.parameters[name] for name in _SHARED}
    mutants = (
        Mutant("reversed-scores", "scores the kept samples highest",
               "\n        return DataDetection(flagged, scores, info)",
               "\n        return DataDetection(flagged, -scores, info)"),
        Mutant("flags-the-rest", "flags the samples the defense keeps",
               "\n        flagged, scores, info = self._defense.detect_poison(inputs)",
               "\n        flagged, scores, info = self._defense.detect_poison(inputs)\n        flagged = ~flagged"),
    )

    def __init__(self, rule: str = "exclusionary", reduction: str = "ica", n_components: int = 10,
                 size_threshold: float = 0.35, exclusion_threshold: float = 1.0, max_tested_share: float = 2 / 3,
                 epochs: int | None = None):
        self._defense = ActivationClustering(**{n: v for n, v in locals().items() if n in _SHARED})
        for name in _SHARED:
            setattr(self, name, getattr(self._defense, name))

    def detect(self, inputs: DefenseInputs) -> DataDetection:
        flagged, scores, info = self._defense.detect_poison(inputs)
        return DataDetection(flagged, scores, info)
