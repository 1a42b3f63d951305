"""ABL: the flooding loss descends above gamma and ascends below it; the lowest-loss 1% is isolated (ties by
index); on BadNets digits at ratio 0.1 the isolated set is (almost) all poisoned after a short isolation."""
import dataclasses

import pytest
import torch
from torch import nn

from backdoor.attacks import create_attack
from backdoor.data import load_dataset
from backdoor.defenses import DefenseInputs, NotApplicable, create_defense
from backdoor.defenses.abl import ascent_loss, flooding_loss, isolate_lowest
from backdoor.metrics import detection_metrics
from backdoor.models import create_model
from backdoor.training import TrainConfig, fit

CPU = torch.device("cpu")


@pytest.mark.parametrize("logit_gap, ascends", [(0.0, False), (6.0, True)])
def test_flooding_descends_above_gamma_and_ascends_below(logit_gap, ascends):
    """Two classes, logits (gap, 0) for label 0: CE = log(1 + e^-gap) is log 2 > 0.5 for gap 0, 0.0025 for 6."""
    model = nn.Linear(1, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[logit_gap], [0.0]]))
    x, y = torch.ones(1, 1), torch.zeros(1, dtype=torch.long)
    ce = torch.nn.functional.cross_entropy(model(x), y)
    flood = flooding_loss(0.5)(model, x, y)
    assert flood.item() == pytest.approx(abs(ce.item() - 0.5) + 0.5)
    (g_flood,) = torch.autograd.grad(flood, model.weight)
    (g_ce,) = torch.autograd.grad(torch.nn.functional.cross_entropy(model(x), y), model.weight)
    torch.testing.assert_close(g_flood, -g_ce if ascends else g_ce)
    (g_ascent,) = torch.autograd.grad(ascent_loss(model, x, y), model.weight)
    torch.testing.assert_close(g_ascent, -g_ce)


def test_isolate_lowest_counts_and_breaks_ties_by_index():
    losses = torch.tensor([0.3, 0.1, 0.1, 0.9, 0.1, 0.5])
    assert isolate_lowest(losses, 0.5).tolist() == [False, True, True, False, True, False]
    assert isolate_lowest(losses, 0.3).tolist() == [False, True, True, False, False, False]  # round(1.8) = 2
    assert isolate_lowest(losses, 0.01).sum() == 1  # at least one sample


def test_bad_parameters():
    with pytest.raises(ValueError, match="isolation_ratio"):
        create_defense("abl", isolation_ratio=1.5)
    with pytest.raises(ValueError, match="isolation_epochs"):
        create_defense("abl", isolation_epochs=0)
    with pytest.raises(ValueError, match="unlearn_lr"):
        create_defense("abl", unlearn_lr=0)


def test_isolated_set_is_mostly_poisoned_for_badnets():
    data = load_dataset("digits")
    poisoned = create_attack("badnets", target=0).poison_train(data.train, 0.1, seed=0)
    inputs = DefenseInputs(
        model=create_model("cnn_small", 10, data.mean, data.std, seed=1), clean=data.train.subset(torch.arange(72)),
        num_classes=10, device=CPU, seed=0, training=TrainConfig(epochs=1, batch_size=256, hflip=False),
        retraining=TrainConfig(epochs=15, batch_size=128, lr=0.05, hflip=False),
        new_model=lambda: create_model("cnn_small", 10, data.mean, data.std, seed=2),
        fit=lambda m, split, config, **kw: fit(m, split, config, device=CPU, **kw), poisoned_train=poisoned.split)
    # lr 0.01 (the paper's): at 0.05 the clean task can reach the flooding level before the trigger is learned
    defense = create_defense("abl", isolation_epochs=5, finetune_epochs=1, unlearn_epochs=2, lr=0.01)
    outcome = defense.run(inputs)
    assert int(outcome.flagged.sum()) == round(0.01 * len(poisoned.y))
    d = detection_metrics(outcome.flagged, poisoned.mask, outcome.scores)
    assert d["precision"] >= 0.8, d
    assert d["auroc"] >= 0.8, d  # low loss <=> poisoned, beyond the isolated 1%
    # the isolated samples are exactly the highest scores (= lowest isolation losses)
    assert outcome.scores[outcome.flagged].min() >= outcome.scores[~outcome.flagged].max()
    with pytest.raises(NotApplicable):
        defense.run(dataclasses.replace(inputs, poisoned_train=None))
