"""NC as a model-level detector: Neural Cleanse's anomaly index, with no repair.

Wang, Yao, Shan, Li, Viswanath, Zheng, Zhao, "Neural Cleanse: Identifying and Mitigating Backdoor Attacks in
Neural Networks", IEEE S&P 2019. Per class, the smallest mask and pattern sending the defender's clean images
to that class are reverse-engineered; the anomaly index of a class is |L1 - median| / (1.4826 MAD) over the
classes' mask norms, and a model is flagged when a class with a mask below the median has an index above 2.

This is the reversal and the rule of the NC defense (``backdoor/defenses/nc.py``: its docstring states the
departures, e.g. the early stop per class); the defense then unlearns the flagged triggers, the detector stops at
the decision. Score: the largest anomaly index among the classes whose mask is below the median (0 where no
class is below it), the statistic the rule thresholds; a class whose reversed trigger never reached the success
threshold cannot flag the model but still scores, as in the defense's record (``most_anomalous_index``).
"""
from __future__ import annotations

import torch

from backdoor._registry import NONE, Param
from backdoor.defenses.base import DefenseInputs
from backdoor.defenses.nc import NeuralCleanse
from backdoor.detectors import register_detector
from backdoor.detectors.base import ModelDetector, ModelVerdict
from backdoor.mutants import Mutant

_SHARED = ("epochs", "init_cost", "cost_up", "cost_down", "patience", "threshold", "lr", "batch_size",
           "anomaly_threshold", "max_batch", "early_stop", "early_stop_patience", "reset_cost_to_zero")


@register_detector("nc")
class NeuralCleanseIndex(ModelDetector):
    """NC's anomaly index: reverse a trigger per class; flag the model when a small trigger's MAD index > 2."""

    title = "NC"
    description = ("per-class mask/pattern reversal (as the NC defense), MAD anomaly index of the mask norms; flags "
                   "the model when a below-median mask's index exceeds 2")
    order = 210
    parameters = {name: NeuralCleanse.parameters[name] for name in _SHARED}
    parameters["anomaly_threshold"] = Param(NONE, "2 (TrojanZoo's NC)", "NC paper: anomaly index > 2")
    mutants = (
        Mutant("largest-mask", "scores the classes whose mask is above the median (the large triggers)",
               "\n        below = found[\"l1\"] < found[\"l1\"].median()",
               "\n        below = found[\"l1\"] > found[\"l1\"].median()"),
        Mutant("flags-clean", "the decision is inverted",
               "\n        flagged = len(found[\"flagged\"]) > 0", "\n        flagged = len(found[\"flagged\"]) == 0"),
    )

    def __init__(self, epochs: int = 80, init_cost: float = 1e-3, cost_up: float = 2.0, cost_down: float = 2 ** 1.5,
                 patience: int = 5, threshold: float = 0.98, lr: float = 0.1, batch_size: int = 256,
                 anomaly_threshold: float = 2.0, max_batch: int = 2048, early_stop: bool = True,
                 early_stop_patience: int = 25, reset_cost_to_zero: bool = True):
        self._nc = NeuralCleanse(**{name: value for name, value in locals().items() if name in _SHARED})
        for name in _SHARED:
            setattr(self, name, getattr(self._nc, name))

    def inspect(self, inputs: DefenseInputs) -> ModelVerdict:
        found = self._nc.detect(inputs.model, inputs.clean, inputs.num_classes, inputs.device, inputs.seed)
        below = found["l1"] < found["l1"].median()
        index = torch.where(below, found["anomaly_index"], torch.zeros_like(found["anomaly_index"]))
        flagged = len(found["flagged"]) > 0
        info = {"suspected_class": int(index.argmax()), "flagged_classes": [int(k) for k in found["flagged"]],
                "mask_l1": [round(float(v), 4) for v in found["l1"]],
                "anomaly_index": [round(float(v), 4) for v in found["anomaly_index"]]}
        return ModelVerdict(score=float(index.max()), flagged=flagged, info=info)
