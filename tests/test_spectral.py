"""Spectral: the squared projection on the top singular vector singles out a shifted minority of a label,
1.5*eps of every label is removed, scores are ranks within the label, flags follow the samples when the set is
shuffled, and the whole defense removes the triggered samples of a model whose features see the trigger."""
import dataclasses

import pytest
import torch
from torch import nn

from backdoor.attacks import create_attack
from backdoor.data import load_dataset
from backdoor.defenses import DefenseInputs, NotApplicable, create_defense
from backdoor.defenses.spectral import spectral_signatures
from backdoor.metrics import detection_metrics
from backdoor.models import Classifier, LayerRoles, create_model
from backdoor.training import TrainConfig, fit

CPU = torch.device("cpu")


def shifted_minority(poison: int, clean_per_class: int = 200, classes: int = 4, dim: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    centres = 5 * torch.randn(classes, dim, generator=g)
    labels = torch.arange(classes).repeat_interleave(clean_per_class)
    feats = centres[labels] + torch.randn(len(labels), dim, generator=g)
    direction = torch.nn.functional.normalize(torch.randn(dim, generator=g), dim=0)
    poisoned = centres[0] + 6 * direction + torch.randn(poison, dim, generator=g)
    feats, labels = torch.cat([feats, poisoned]), torch.cat([labels, torch.zeros(poison, dtype=torch.long)])
    mask = torch.arange(len(labels)) >= len(labels) - poison
    order = torch.randperm(len(labels), generator=g)
    return feats[order], labels[order], mask[order], direction


def test_known_signature_rank_one():
    """Exact answer: clean rows at +-1 along e0 (equal counts), poison rows at +5 along e1: the top singular
    vector is e1 and exactly the poison rows have the largest squared projections."""
    clean = torch.zeros(20, 3)
    clean[:, 0] = torch.tensor([1.0, -1.0]).repeat(10)
    poison = torch.zeros(2, 3)
    poison[:, 1] = 5.0
    feats = torch.cat([clean, poison])
    labels = torch.zeros(22, dtype=torch.long)
    result = spectral_signatures(feats, labels, eps=2 / 33)  # round(1.5 * eps * 22) = 2
    assert result.flagged.tolist() == [False] * 20 + [True] * 2
    centred_poison = 5.0 - 10.0 / 22  # the mean moves by 2 * 5 / 22 along e1
    assert result.raw_scores[-1].item() == pytest.approx(centred_poison ** 2, rel=1e-5)
    assert result.scores[-2:].tolist() == [1.0, 1.0]  # highest rank (tied)


def test_flags_the_shifted_minority_and_removes_1p5_eps_per_label():
    feats, labels, mask, _ = shifted_minority(poison=15)  # 15 of label 0's 215 (7%)
    result = spectral_signatures(feats, labels, eps=0.05)  # removes 7.5% of every label
    d = detection_metrics(result.flagged, mask, result.scores)
    assert d["tpr"] >= 0.9 and d["fpr"] <= 0.1, d
    assert d["auroc"] >= 0.95
    for entry in result.per_class:
        assert entry["removed"] == round(1.5 * 0.05 * entry["size"])
        assert int(result.flagged[labels == entry["label"]].sum()) == entry["removed"]
    # scores are within-label ranks in [0, 1], each label's top sample at 1
    for label in range(4):
        s = result.scores[labels == label]
        assert s.min() >= 0 and s.max() == 1


def test_shuffling_the_samples_shuffles_the_flags():
    feats, labels, _, _ = shifted_minority(poison=15, seed=2)
    base = spectral_signatures(feats, labels, eps=0.1)
    for s in range(3):
        perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(s))
        shuffled = spectral_signatures(feats[perm], labels[perm], eps=0.1)
        assert torch.equal(shuffled.flagged, base.flagged[perm])
        torch.testing.assert_close(shuffled.scores, base.scores[perm])


def test_bad_parameters():
    with pytest.raises(ValueError, match="eps"):
        create_defense("spectral", eps=0.9)
    with pytest.raises(ValueError, match="epochs"):
        create_defense("spectral", epochs=0)


class CornerNet(nn.Module):
    """Penultimate features = mean colour of the bottom-right 2x2 corner (where BadNets writes)."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.pool = nn.Identity()
        self.linear = nn.Linear(3, num_classes)

    def forward(self, x):
        return self.linear(self.pool(x[..., -2:, -2:].mean((2, 3))))


def corner_model(num_classes: int) -> Classifier:
    roles = LayerRoles(feature_maps=("pool", "pool", "pool"), last_conv="pool", head="linear")
    return Classifier(CornerNet(num_classes), (0.5,) * 3, (0.5,) * 3, roles, arch="corner")


def defense_inputs(model, poisoned, num_classes):
    return DefenseInputs(
        model=model, clean=poisoned.subset(torch.arange(8)), num_classes=num_classes, device=CPU, seed=5,
        training=TrainConfig(epochs=1, batch_size=64), retraining=TrainConfig(epochs=1, batch_size=64, lr=0.05),
        new_model=lambda: create_model("cnn_small", num_classes, seed=0),
        fit=lambda m, split, config, **kw: fit(m, split, config, device=CPU, **kw), poisoned_train=poisoned)


def test_defense_removes_triggered_samples_in_place_and_retrains_on_the_rest():
    data = load_dataset("synthetic", num_classes=4, train_size=400, test_size=8, image_size=16)
    poisoned = create_attack("badnets", target=0, size=2).poison_train(data.train, 0.02, seed=0)
    defense = create_defense("spectral", eps=0.05)
    outcome = defense.run(defense_inputs(corner_model(4), poisoned.split, 4))
    d = detection_metrics(outcome.flagged, poisoned.mask, outcome.scores)
    assert d["tpr"] >= 0.9 and d["fpr"] <= 0.1, d
    assert outcome.info["retrained_on"] == len(poisoned.y) - int(outcome.flagged.sum())
    perm = torch.randperm(len(poisoned.y), generator=torch.Generator().manual_seed(0))
    again = defense.run(defense_inputs(corner_model(4), poisoned.split.subset(perm), 4))
    assert torch.equal(again.flagged, outcome.flagged[perm])
    with pytest.raises(NotApplicable):
        defense.run(dataclasses.replace(defense_inputs(corner_model(4), poisoned.split, 4), poisoned_train=None))
