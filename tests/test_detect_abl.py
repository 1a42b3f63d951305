"""ABL's isolation as a data-side detector: it flags exactly the lowest-loss share of its isolation model, whose
losses it returns negated as scores, and runs neither the fine-tuning nor the unlearning."""
import torch

from backdoor.attacks import create_attack
from backdoor.data import load_dataset
from backdoor.defenses import create_defense
from backdoor.detectors import create_detector
from test_spectral import defense_inputs
from backdoor.models import create_model


def test_isolates_the_lowest_losses_as_abl_does():
    data = load_dataset("synthetic", num_classes=4, train_size=400, test_size=8, image_size=16)
    poisoned = create_attack("badnets", target=0, size=3).poison_train(data.train, 0.1, seed=0)
    inputs = defense_inputs(create_model("cnn_small", 4, seed=0), poisoned.split, 4)
    found = create_detector("abl", isolation_epochs=3, isolation_ratio=0.05, lr=0.05).detect(inputs)
    _, flagged, losses, _ = create_defense("abl", isolation_epochs=3, isolation_ratio=0.05, lr=0.05).isolate(inputs)
    assert torch.equal(found.flagged, flagged) and torch.equal(found.scores, -losses)
    assert int(found.flagged.sum()) == 20  # 5% of 400
    assert bool((losses[found.flagged].max() <= losses[~found.flagged].min()))
    assert "finetune_final_loss" not in found.info and "unlearn_final_ce" not in found.info  # isolation only
