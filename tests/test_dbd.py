"""DBD: the defense trains one fresh model in three stages (SimCLR on its backbone, the head alone, MixMatch on
the lowest-SCE half as labelled data); NT-Xent, SCE and sharpening on known answers; the batched SimCLR views are seeded, in range and reduce to
the identity / a flip when switched off; the frozen warm-up changes only the head; after a few epochs of
SimCLR the warm-up puts most BadNets samples in the high-loss (unlabelled) half, while the same warm-up on an
untrained backbone learns the trigger and keeps them labelled; the whole defense runs end to end."""
import copy
import dataclasses
import math

import pytest
import torch

from backdoor.attacks import create_attack
from backdoor.data import load_dataset
from backdoor.defenses._data_side import per_sample_loss
from backdoor.defenses import DefenseInputs, NotApplicable, create_defense
from backdoor.defenses.dbd import _MixMatchHooks, nt_xent, sharpen, simclr_view, symmetric_cross_entropy
from backdoor.metrics import detection_metrics
from backdoor.models import Classifier, create_model, roles
from backdoor.training import TrainConfig, fit

CPU = torch.device("cpu")


def test_run_pretrains_the_backbone_warms_up_the_head_and_keeps_the_lowest_loss_half_labelled():
    """Recorded: 1. SimCLR trains a network around the fresh model's backbone (every parameter but the head's);
    2. the warm-up trains the head alone; 3. MixMatch trains the model with the lowest-SCE half (under the
    warmed-up model) as its labelled data. The model is what comes back; scores are the SCE losses."""
    data = load_dataset("synthetic", num_classes=4, train_size=64, test_size=8, image_size=16)
    calls = []

    def recording_fit(m, split, config, **kw):
        calls.append({"model": m, "split": split, "config": config, "snapshot": copy.deepcopy(m), **kw})
        return fit(m, split, config, device=CPU, **kw)

    inputs = dataclasses.replace(_inputs(data, data.train), fit=recording_fit)
    dbd = create_defense("dbd", simclr_epochs=1, simclr_batch_size=32, warmup_epochs=1, mixmatch_epochs=1,
                         mixmatch_batch_size=16)
    outcome = dbd.run(inputs)
    simclr, warmup, mixmatch = calls
    model = outcome.model
    head = {id(p) for p in roles.head(model).parameters()}
    backbone = {id(p) for p in model.parameters()} - head
    assert simclr["model"].classifier is model and simclr["config"].epochs == 1
    trained = {id(p) for p in simclr["params"]}
    assert backbone <= trained and not head & trained  # the backbone (and the projector), never the head
    assert warmup["model"] is model and {id(p) for p in warmup["params"]} == head
    assert mixmatch["model"] is model and mixmatch.get("params") is None
    losses = per_sample_loss(mixmatch["snapshot"], data.train, device=CPU,
                             loss=lambda logits, y: symmetric_cross_entropy(logits, y, 0.1, 1.0))
    torch.testing.assert_close(outcome.scores, losses)
    labelled = ~outcome.flagged
    assert int(labelled.sum()) == 32 and losses[labelled].max() <= losses[~labelled].min()
    assert torch.equal(mixmatch["split"].x, data.train.x[labelled])


def test_nt_xent_known_value():
    n, t = 4, 0.5
    z = torch.cat([torch.eye(n, 8), torch.eye(n, 8)])  # views agree, different images orthogonal
    expected = math.log(1 + (2 * n - 2) * math.exp(-1 / t))
    assert nt_xent(3 * z, t).item() == pytest.approx(expected, rel=1e-6)  # scale-free (normalised)
    swapped = torch.cat([torch.eye(n, 8), torch.eye(n, 8).roll(1, 0)])  # each view's partner is another image
    assert nt_xent(swapped, t).item() > expected + 1
    with pytest.raises(ValueError, match="even"):
        nt_xent(torch.ones(3, 2), t)


def test_symmetric_cross_entropy_and_sharpen_known_values():
    k = 10
    sce = symmetric_cross_entropy(torch.zeros(2, k), torch.tensor([0, 3]), alpha=0.1, beta=1.0)
    expected = 0.1 * math.log(k) + (-math.log(1e-4)) * (1 - 1 / k)
    torch.testing.assert_close(sce, torch.full((2,), expected))
    confident = symmetric_cross_entropy(torch.tensor([[20.0, 0.0]]), torch.tensor([0]), alpha=0.1, beta=1.0)
    assert confident.item() < 1e-6
    torch.testing.assert_close(sharpen(torch.tensor([[0.5, 0.25, 0.25]]), 0.5), torch.tensor([[2 / 3, 1 / 6, 1 / 6]]))


def test_simclr_views_are_seeded_batched_and_reduce_to_identity_or_flip():
    x = torch.rand(16, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    a = simclr_view(x, torch.Generator().manual_seed(1))
    b = simclr_view(x, torch.Generator().manual_seed(1))
    c = simclr_view(x, torch.Generator().manual_seed(2))
    assert a.shape == x.shape and torch.equal(a, b) and not torch.allclose(a, c)
    assert a.min() >= 0 and a.max() <= 1
    off = dict(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), jitter_p=0.0, gray_p=0.0)
    torch.testing.assert_close(simclr_view(x, torch.Generator().manual_seed(3), flip=False, **off), x,
                               atol=1e-5, rtol=0)
    flipped = simclr_view(x, torch.Generator().manual_seed(3), flip=True, **off)
    is_same = (flipped - x).abs().amax((1, 2, 3)) < 1e-5
    is_flip = (flipped - x.flip(3)).abs().amax((1, 2, 3)) < 1e-5
    assert bool((is_same | is_flip).all()) and is_flip.any() and is_same.any()
    gray = simclr_view(x, torch.Generator().manual_seed(4), gray_p=1.0)
    torch.testing.assert_close(gray[:, 0], gray[:, 1])


def test_mixmatch_ramp():
    hooks = _MixMatchHooks(torch.zeros(4, 3, 2, 2, dtype=torch.uint8), steps_per_epoch=4, rampup_epochs=10,
                           seed=0, padding=0, flip=False)
    hooks.on_epoch_start(0)
    assert hooks.ramp() == 0.0
    hooks.on_epoch_start(5)
    hooks.after_step(), hooks.after_step()
    assert hooks.ramp() == pytest.approx(0.55)
    hooks.on_epoch_start(12)
    assert hooks.ramp() == 1.0


def _inputs(data, poisoned, seed=0):
    return DefenseInputs(
        model=create_model("cnn_small", data.num_classes, data.mean, data.std, seed=99),
        clean=data.train.subset(torch.arange(8)), num_classes=data.num_classes, device=CPU, seed=seed,
        training=TrainConfig(epochs=1, batch_size=256, hflip=False),
        retraining=TrainConfig(epochs=1, batch_size=128, lr=0.05, hflip=False),
        new_model=lambda: create_model("cnn_small", data.num_classes, data.mean, data.std, seed=seed + 10),
        fit=lambda m, split, config, **kw: fit(m, split, config, device=CPU, **kw), poisoned_train=poisoned)


def test_selfsupervised_backbone_sends_poisoned_samples_to_the_unlabelled_half():
    data = load_dataset("digits")
    poisoned = create_attack("badnets", target=0).poison_train(data.train, 0.1, seed=0)
    inputs = _inputs(data, poisoned.split)
    dbd = create_defense("dbd", simclr_epochs=4, simclr_batch_size=256, warmup_epochs=5, warmup_lr=0.05)

    model = inputs.new_model()
    info = dbd.pretrain(inputs, model)
    assert info["simclr_final_loss"] < info["simclr_first_loss"]
    before = copy.deepcopy(model.state_dict())
    dbd.warmup(inputs, model)
    head = {f"net.{model.roles.head}.{n}" for n, _ in roles.head(model).named_parameters()}
    for k, v in model.state_dict().items():  # frozen backbone: weights and batch-norm statistics
        assert torch.equal(v, before[k]) != (k in head), k
    flagged, losses = dbd.split(inputs, model)
    assert int((~flagged).sum()) == round(0.5 * len(flagged))
    d = detection_metrics(flagged, poisoned.mask, losses)
    # ~10% of the poisoned samples were class 0 already (their label is right): 0.9 is near the ceiling
    assert d["tpr"] >= 0.75 and d["auroc"] >= 0.8, d

    control = inputs.new_model()  # no self-supervision: the head reads the trigger and fits the poison
    create_defense("dbd", warmup_epochs=5, warmup_lr=0.05).warmup(inputs, control)
    flagged_c, losses_c = dbd.split(inputs, control)
    assert detection_metrics(flagged_c, poisoned.mask, losses_c)["tpr"] < d["tpr"] - 0.4


def test_whole_defense_runs_end_to_end():
    data = load_dataset("synthetic", num_classes=4, train_size=160, test_size=8, image_size=16)
    poisoned = create_attack("badnets", target=0, size=2).poison_train(data.train, 0.1, seed=0)
    inputs = _inputs(data, poisoned.split, seed=3)
    dbd = create_defense("dbd", simclr_epochs=1, simclr_batch_size=64, warmup_epochs=1, mixmatch_epochs=1,
                         mixmatch_batch_size=32)
    outcome = dbd.run(inputs)
    assert isinstance(outcome.model, Classifier)
    assert outcome.flagged.dtype == torch.bool and outcome.flagged.shape == (160,)
    assert int(outcome.flagged.sum()) == 80 and outcome.scores.shape == (160,)
    assert math.isfinite(outcome.info["mixmatch_final_loss"])
    again = dbd.run(_inputs(data, poisoned.split, seed=3))  # seeded: the same inputs give the same output
    assert torch.equal(again.flagged, outcome.flagged)
    for k, v in outcome.model.state_dict().items():
        assert torch.equal(v, again.model.state_dict()[k]), k
    with pytest.raises(NotApplicable):
        dbd.run(dataclasses.replace(inputs, poisoned_train=None))


def test_bad_parameters():
    with pytest.raises(ValueError, match="epsilon"):
        create_defense("dbd", epsilon=1.0)
    with pytest.raises(ValueError, match="augmentations"):
        create_defense("dbd", augmentations=0)
    with pytest.raises(ValueError, match="temperature"):
        create_defense("dbd", temperature=0)
