"""RNP: unlearning stops at the first epoch whose clean accuracy is <= the threshold (the trajectory of an
unstopped run says which); one recovering step moves each mask to clip(1 - lr * alpha * dCE/dgamma * gamma)
and touches no weight or buffer; the ORIGINAL model's channels below the pruning threshold (and only they) get
a zero batch-norm weight; models without batch norm are n/a; bad parameters are refused."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from backdoor.data import Split
from backdoor.defenses import DefenseInputs, NotApplicable, create_defense
from backdoor.defenses import rnp
from backdoor.defenses.rnp import recover_masks, unlearn
from backdoor.models import Classifier, LayerRoles
from backdoor.training import TrainConfig, fit

CPU = torch.device("cpu")
PLAIN = dict(device=CPU, seed=0, batch_size=64, crop_padding=0, hflip=False)  # one full batch, no augmentation
LR = 0.3  # unlearning lr of these tests: the tiny model's clean accuracy falls within a few epochs


def tiny_model(seed: int = 0) -> Classifier:
    """conv(3->4) -> BN(4) -> ReLU -> global average -> linear(4->2)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                            nn.Flatten(), nn.Linear(4, 2))
    return Classifier(net, (0.0,) * 3, (1.0,) * 3, LayerRoles(("0", "1", "2"), "0", "5"), arch="tiny")


def colour_split(n: int = 32) -> Split:
    """Class 0: red 6x6 images, class 1: green ones (with noise): separable."""
    g = torch.Generator().manual_seed(0)
    y = torch.arange(n) % 2
    x = torch.randint(0, 60, (n, 3, 6, 6), generator=g)
    x[y == 0, 0] += 180
    x[y == 1, 1] += 180
    return Split(x.to(torch.uint8), y)


@pytest.fixture(scope="module")
def trained():
    """The tiny model fitted (8 Adam steps, full batch) to 100% accuracy on the colour split."""
    model, clean = tiny_model(), colour_split()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    model.train()
    for _ in range(8):
        loss = F.cross_entropy(model(clean.x.float() / 255), clean.y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    assert torch.equal(model(clean.x.float() / 255).argmax(1), clean.y)
    return model, clean


def _trajectory(model, clean, epochs=12):
    """Clean accuracy per epoch of an unlearning run that never stops (threshold below any accuracy)."""
    return unlearn(copy.deepcopy(model), clean, epochs=epochs, lr=LR, clean_threshold=-1.0, **PLAIN)


def test_unlearning_stops_at_the_first_epoch_at_or_below_the_clean_threshold(trained):
    model, clean = trained
    full = _trajectory(model, clean)
    assert len(full) == 12 and full[0] == 1.0
    assert min(full) <= 0.2, f"gradient ascent never brought the clean accuracy down: {full}"
    for threshold in (1.0, 0.5, 0.2):
        first = next(i for i, acc in enumerate(full) if acc <= threshold)
        history = unlearn(copy.deepcopy(model), clean, epochs=12, lr=LR, clean_threshold=threshold, **PLAIN)
        assert history == full[:first + 1], threshold
    assert len(unlearn(copy.deepcopy(model), clean, epochs=12, lr=LR, clean_threshold=0.5, **PLAIN)) >= 3
    # A maximum: with a threshold no accuracy reaches, exactly `epochs` epochs run.
    assert len(unlearn(copy.deepcopy(model), clean, epochs=3, lr=LR, clean_threshold=-1.0, **PLAIN)) == 3


def test_an_epochs_accuracy_is_that_of_the_model_before_its_step(trained):
    """With one full batch and no augmentation, epoch k's accuracy is the train-mode accuracy of the model
    after k - 1 epochs; gradient ascent raises the clean loss."""
    model, clean = trained
    full = _trajectory(model, clean)
    x = clean.x.float() / 255
    losses = []
    for k in range(1, len(full) + 1):
        copied = copy.deepcopy(model)
        if k > 1:
            unlearn(copied, clean, epochs=k - 1, lr=LR, clean_threshold=-1.0, **PLAIN)
        copied.train()
        with torch.no_grad():
            out = copied(x)
        assert float((out.argmax(1) == clean.y).float().mean()) == full[k - 1], k
        losses.append(float(F.cross_entropy(out, clean.y)))
    assert losses[-1] > losses[0] + 1.0


def test_one_recovering_step_moves_only_the_masks_to_the_known_values(trained):
    """First SGD step (momentum buffer = gradient): m = clip(1 - lr * d(alpha CE)/dm, 0, 1), and at m = 1,
    d/dm = gamma * d/dgamma of the plain model in train mode (batch statistics)."""
    model, clean = trained
    unlearned = copy.deepcopy(model)
    unlearn(unlearned, clean, epochs=12, lr=LR, clean_threshold=0.2, **PLAIN)
    lr, alpha = 10.0, 0.2
    reference = copy.deepcopy(unlearned).train()
    loss = alpha * F.cross_entropy(reference(clean.x.float() / 255), clean.y)
    gamma = reference.net[1].weight
    (grad,) = torch.autograd.grad(loss, gamma)
    raw = 1 - lr * grad * gamma.detach()
    inside = (raw > 0) & (raw < 1)
    assert (raw < 0).any() and inside.any(), f"the step must leave [0, 1] for some masks, not all: {raw}"

    before = copy.deepcopy(unlearned.state_dict())
    flags = [p.requires_grad for p in unlearned.parameters()]
    masks = recover_masks(unlearned, clean, epochs=1, mask_lr=lr, alpha=alpha, **PLAIN)
    assert list(masks) == ["1"]
    torch.testing.assert_close(masks["1"], raw.clamp(0, 1))
    after = unlearned.state_dict()
    for key, value in before.items():  # weights, running statistics and their counter
        assert torch.equal(after[key], value), key
    assert [p.requires_grad for p in unlearned.parameters()] == flags


def test_recovered_masks_stay_in_the_unit_interval_over_many_steps(trained):
    model, clean = trained
    unlearned = copy.deepcopy(model)
    unlearn(unlearned, clean, epochs=12, lr=LR, clean_threshold=0.2, **PLAIN)
    masks = recover_masks(unlearned, clean, epochs=20, mask_lr=5.0, alpha=0.2,
                          **{**PLAIN, "batch_size": 8})
    m = masks["1"]
    assert float(m.min()) >= 0.0 and float(m.max()) <= 1.0
    assert not torch.equal(m, torch.ones(4))


def _inputs(model, clean, seed=0):
    budget = TrainConfig(epochs=1, batch_size=64, lr=0.01, crop_padding=0, hflip=False)
    return DefenseInputs(model=model, clean=clean, num_classes=2, device=CPU, seed=seed, training=budget,
                         retraining=budget, new_model=tiny_model,
                         fit=lambda m, split, config, **kw: fit(m, split, config, device=CPU, **kw))


def test_the_original_model_is_pruned_below_the_threshold_with_hand_set_masks(trained, monkeypatch):
    """Recovered masks set by hand: channels 0 (0.1) and 2 (0.19) are below 0.2, 1 (0.5) and 3 (0.2, not
    below) are not. The returned model is the original one, unchanged but for those two batch-norm weights;
    the masks were recovered on another model, the unlearned copy."""
    model, clean = trained
    original = copy.deepcopy(model)
    seen = []

    def hand_set(m, split, **kwargs):
        seen.append(copy.deepcopy(m.state_dict()))
        return {"1": torch.tensor([0.1, 0.5, 0.19, 0.2])}

    monkeypatch.setattr(rnp, "recover_masks", hand_set)
    inputs = _inputs(model, clean)
    outcome = create_defense("rnp", unlearning_lr=LR, threshold=0.2).run(inputs)
    assert outcome.model is model
    expected = copy.deepcopy(original.state_dict())
    expected["net.1.weight"][[0, 2]] = 0.0
    assert original.net[1].weight[[0, 2]].abs().min() > 0  # so zeroing them is a change
    state = outcome.model.state_dict()
    for key, value in expected.items():
        assert torch.equal(state[key], value), key
    (unlearned,) = seen
    assert not torch.equal(unlearned["net.0.weight"], original.state_dict()["net.0.weight"])
    info = outcome.info
    assert info["pruned_channels"] == 2 and info["total_channels"] == 4 and info["pruned_per_layer"] == {"1": 2}


def test_run_reports_the_unlearning_and_prunes_what_its_masks_say(trained):
    model, clean = trained
    full = _trajectory(model, clean)
    first = next(i for i, acc in enumerate(full) if acc <= 0.2)
    outcome = create_defense("rnp", unlearning_lr=LR, unlearning_epochs=12, recovering_epochs=5).run(
        _inputs(copy.deepcopy(model), clean))
    info = outcome.info
    assert info["unlearning_epochs"] == first + 1 and info["unlearned_clean_acc"] == full[first]
    assert info["unlearning_reached_threshold"] is True
    unlearned = copy.deepcopy(model)
    unlearn(unlearned, clean, epochs=12, lr=LR, clean_threshold=0.2, **PLAIN)
    masks = recover_masks(unlearned, clean, epochs=5, mask_lr=0.2, alpha=0.2, **PLAIN)
    below = masks["1"] < 0.2
    assert info["pruned_channels"] == int(below.sum())
    expected = torch.where(below, 0.0, model.net[1].weight.detach())
    assert torch.equal(outcome.model.net[1].weight.detach(), expected)


def test_model_without_batch_norm_is_not_applicable():
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 6 * 6, 2))
    model = Classifier(net, (0.0,) * 3, (1.0,) * 3, LayerRoles(("0", "0", "0"), "0", "1"), arch="linear")
    with pytest.raises(NotApplicable, match="no batch-norm"):
        create_defense("rnp").run(_inputs(model, colour_split()))


@pytest.mark.parametrize("params", [{"unlearning_epochs": 0}, {"unlearning_lr": 0}, {"clean_threshold": 1.5},
                                    {"clean_threshold": -0.1}, {"recovering_epochs": 0}, {"recovering_lr": -1},
                                    {"alpha": 0}, {"threshold": 2}, {"batch_size": 0}, {"unlearning_epochs": 2.5}])
def test_bad_parameters_are_refused(params):
    with pytest.raises(ValueError, match="rnp"):
        create_defense("rnp", **params)
