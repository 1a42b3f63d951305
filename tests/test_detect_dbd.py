"""DBD's split as a data-side detector: stages 1-3 of the defense (no MixMatch); the high-SCE (1 - epsilon) share
is flagged and the losses are the scores."""
import torch

from backdoor.attacks import create_attack
from backdoor.data import load_dataset
from backdoor.defenses import create_defense
from backdoor.detectors import create_detector
from test_spectral import defense_inputs
from backdoor.models import create_model

PARAMS = dict(simclr_epochs=1, simclr_batch_size=64, warmup_epochs=1, epsilon=0.6)


def test_flags_the_high_loss_share_as_dbd_does():
    data = load_dataset("synthetic", num_classes=4, train_size=120, test_size=8, image_size=16)
    poisoned = create_attack("badnets", target=0, size=3).poison_train(data.train, 0.1, seed=0)
    inputs = defense_inputs(create_model("cnn_small", 4, seed=0), poisoned.split, 4)
    found = create_detector("dbd", **PARAMS).detect(inputs)
    _, flagged, losses, info = create_defense("dbd", **PARAMS).detect_poison(inputs)
    assert torch.equal(found.flagged, flagged) and torch.equal(found.scores, losses)
    assert int(found.flagged.sum()) == 120 - 72  # the lowest-loss 60% keep their labels
    assert bool(losses[found.flagged].min() >= losses[~found.flagged].max())
    assert "mixmatch_epochs" not in found.info
