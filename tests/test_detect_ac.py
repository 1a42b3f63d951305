"""AC as a data-side detector: the defense's flags (exclusionary reclassification) on a planted corner model,
scored against the mask, with no final retraining."""
import torch

from backdoor.attacks import create_attack
from backdoor.data import load_dataset
from backdoor.defenses import create_defense
from backdoor.detectors import create_detector
from backdoor.metrics import detection_metrics
from test_ac import corner_model, defense_inputs


def test_flags_the_triggered_samples_as_the_defense_does():
    data = load_dataset("synthetic", num_classes=4, train_size=400, test_size=8, image_size=16)
    poisoned = create_attack("badnets", target=0, size=2).poison_train(data.train, 0.05, seed=0)
    inputs = defense_inputs(corner_model(4), poisoned.split, 4)
    found = create_detector("ac", rule="relative_size").detect(inputs)
    d = detection_metrics(found.flagged, poisoned.mask, found.scores)
    assert d["tpr"] >= 0.9 and d["fpr"] <= 0.1 and d["auroc"] >= 0.9, d
    flagged, scores, info = create_defense("ac", rule="relative_size").detect_poison(inputs)
    assert torch.equal(found.flagged, flagged) and torch.equal(found.scores, scores)
    assert found.info["flagged"] == int(flagged.sum()) and "retrained_on" not in found.info  # no retraining
