"""ABL: the defense runs its three stages on one fresh model (flooding isolation on everything, fine-tuning on
the rest, ascent on the isolated lowest-loss samples); the flooding loss descends above gamma and ascends below it; the lowest-loss 1% is isolated (ties by
index); on BadNets digits at ratio 0.1 the isolated set is (almost) all poisoned after a short isolation."""
import copy
import dataclasses

import pytest
import torch
from torch import nn

from backdoor.attacks import create_attack
from backdoor.data import Split, load_dataset
from backdoor.defenses import DefenseInputs, NotApplicable, create_defense
from backdoor.defenses._data_side import per_sample_loss
from backdoor.defenses.abl import ascent_loss, flooding_loss, isolate_lowest
from backdoor.metrics import detection_metrics
from backdoor.models import create_model
from backdoor.training import TrainConfig, fit

CPU = torch.device("cpu")


def test_run_isolates_the_lowest_losses_fine_tunes_on_the_rest_and_unlearns_them():
    """Recorded: three trainings of one fresh model. 1: every sample, the flooding loss, the retraining budget
    without crop or flip. 2: the samples not isolated, plain CE. 3: the isolated ones, gradient ascent at
    unlearn_lr, constant. The isolated samples are the ratio's lowest CE losses after stage 1; scores = -loss."""
    g = torch.Generator().manual_seed(0)
    data = Split(torch.randint(0, 256, (40, 3, 16, 16), generator=g, dtype=torch.uint8), torch.arange(40) % 4)
    calls = []

    def recording_fit(m, split, config, **kw):
        calls.append({"model": m, "split": split, "config": config, "snapshot": copy.deepcopy(m), **kw})
        return fit(m, split, config, device=CPU, **kw)

    budget = TrainConfig(epochs=9, batch_size=16, lr=0.05)
    inputs = DefenseInputs(model=create_model("cnn_small", 4, seed=1), clean=data.subset(torch.arange(8)),
                           num_classes=4, device=CPU, seed=0, training=TrainConfig(epochs=1, lr=0.5),
                           retraining=budget, new_model=lambda: create_model("cnn_small", 4), fit=recording_fit,
                           poisoned_train=data)
    defense = create_defense("abl", isolation_epochs=2, isolation_ratio=0.1, finetune_epochs=1, unlearn_epochs=1,
                             unlearn_lr=0.003)
    outcome = defense.run(inputs)
    isolation, finetune, unlearn = calls
    model = isolation["model"]
    assert model is not inputs.model and finetune["model"] is model and unlearn["model"] is model is outcome.model
    assert isolation["split"] is data and isolation["config"] == budget.with_(epochs=2, crop_padding=0, hflip=False)
    x, y = data.x[:5].float() / 255, data.y[:5]
    torch.testing.assert_close(isolation["loss_fn"](model, x, y), flooding_loss(0.5)(model, x, y))
    losses = per_sample_loss(finetune["snapshot"], data, device=CPU)  # the model after isolation
    flagged = isolate_lowest(losses, 0.1)
    assert int(flagged.sum()) == 4 and torch.equal(outcome.flagged, flagged)
    torch.testing.assert_close(outcome.scores, -losses)
    assert torch.equal(finetune["split"].x, data.x[~flagged]) and finetune["config"] == budget.with_(epochs=1)
    assert finetune.get("loss_fn") is None
    assert torch.equal(unlearn["split"].x, data.x[flagged]) and unlearn["loss_fn"] is ascent_loss
    assert unlearn["config"] == budget.with_(epochs=1, lr=0.003, schedule="constant")


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
