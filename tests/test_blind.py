"""Blind: the pattern's exact pixels, the backdoored copy, the step's loss (fixed scales and MGDA) against values
computed here independently, the warm-up, the fixed poisoned set, parameters, all-to-all's refusal."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from backdoor._checks import ParameterError
from backdoor.attacks import create_attack
from backdoor.attacks.blind import gradient_normaliser, min_norm_two
from backdoor.data import Split, load_dataset
from backdoor.training import TrainConfig, TrainHooks, fit

pytestmark = pytest.mark.usefixtures("one_thread")

# (row, col, value) of every pixel the pattern paints at its default place (3, 23), written out by hand.
PAINTED = [(3, 23, 255), (3, 24, 0), (3, 25, 255), (4, 24, 255), (5, 25, 0), (6, 24, 255),
           (7, 23, 255), (7, 24, 0), (7, 25, 255)]


def by_hand(x: torch.Tensor, scale: float = 255.0) -> torch.Tensor:
    """The pattern painted pixel by pixel (values divided by 255 / scale for float images)."""
    out = x.clone()
    for r, c, v in PAINTED:
        out[..., r, c] = v if x.dtype == torch.uint8 else v / scale
    return out


def test_trigger_paints_exactly_the_reference_pattern():
    x = torch.full((2, 3, 32, 32), 100, dtype=torch.uint8)
    out = create_attack("blind").apply_trigger(x)
    for r, c, v in PAINTED:
        assert (out[:, :, r, c] == v).all(), (r, c)
    for r, c, _ in PAINTED:
        out[:, :, r, c] = 100
    assert torch.equal(out, x), "a pixel outside the pattern's nine (including its six holes) changed"
    moved = create_attack("blind", row=0, col=0).apply_trigger(x)
    assert (moved[:, :, 0, 0] == 255).all() and (moved[:, :, 0, 1] == 0).all() and (moved[:, :, 1, 0] == 100).all()


def test_backdoored_copy_stamps_and_relabels_its_first_share():
    attack = create_attack("blind", target=2, poisoning_proportion=0.5)
    x = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 3, 4, 5, 6])
    xb, yb = attack.backdoor_copy(x, y)
    assert yb.tolist() == [2, 2, 2, 4, 5, 6]
    assert torch.equal(xb[:3], by_hand(x[:3])) and torch.equal(xb[3:], x[3:])
    assert torch.equal(y, torch.tensor([0, 1, 3, 4, 5, 6])), "the clean batch is not changed"
    xa, ya = create_attack("blind", target=2).backdoor_copy(x, y)  # default: the whole copy
    assert (ya == 2).all() and torch.equal(xa, by_hand(x))


def tiny_setup(n=8, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 4))
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)
    y = torch.randint(1, 4, (n,), generator=g)
    return model, x, y


def test_one_training_step_loss_is_clean_plus_0_9_backdoor():
    """Known answer: fit's loss for one full batch = 1.0 * CE(clean) + 0.9 * CE(stamped copy, target 0),
    both computed here on a copy of the model, with the pattern painted by hand."""
    model, x, y = tiny_setup()
    ref = copy.deepcopy(model)
    xf = x.float() / 255
    with torch.no_grad():
        clean = F.cross_entropy(ref(xf), y).item()
        backdoor = F.cross_entropy(ref(by_hand(xf)), torch.zeros_like(y)).item()
    assert abs(backdoor - clean) > 0.05  # the answer tells the scales apart
    data = load_dataset("synthetic", num_classes=4, train_size=8, test_size=4, image_size=32)
    hooks = create_attack("blind", target=0, history_len=0).train_hooks(data, 0.1, seed=0)
    config = TrainConfig(epochs=1, batch_size=8, lr=0.1, crop_padding=0, hflip=False, amp=False, schedule="constant")
    history = fit(model, Split(x, y), config, device=torch.device("cpu"), seed=0, hooks=hooks)
    assert history["epochs"][0]["loss"] == pytest.approx(1.0 * clean + 0.9 * backdoor, rel=1e-5)
    assert hooks.scales == {"normal": 1.0, "backdoor": 0.9} and hooks.counts == {"batches": 1, "attacked": 1}


def test_mgda_scales_are_the_min_norm_point_of_the_normalised_gradients():
    """Known answer for a linear model: its CE gradients written in closed form, (softmax - onehot)^T x / N,
    normalised by min(loss * |g|, 10) (loss+), gamma = (g_n.g_n - g_b.g_n) / |g_b - g_n|^2; the loss is
    gamma * CE(copy) + (1 - gamma) * CE(clean)."""
    model, x, y = tiny_setup(seed=1)
    xf = x.float() / 255
    w, b = model[1].weight, model[1].bias
    target = torch.zeros_like(y)

    def loss_and_grad(inputs, labels):
        with torch.no_grad():
            flat = inputs.flatten(1)
            p = torch.softmax(flat @ w.T + b, 1)
            loss = F.cross_entropy(flat @ w.T + b, labels).item()
            err = (p - F.one_hot(labels, 4).float()) / len(labels)
            g = torch.cat([(err.T @ flat).flatten(), err.sum(0)])
        return loss, g / (min(loss * g.norm().item(), 10.0) + 1e-5)

    ln, gn = loss_and_grad(xf, y)
    lb, gb = loss_and_grad(by_hand(xf), target)
    gamma = ((gn @ gn - gb @ gn) / (gb - gn).pow(2).sum()).item()
    assert 0.05 < gamma < 0.95 and abs(gamma - 0.5) > 0.02, gamma  # interior, and not symmetric
    hooks = create_attack("blind", loss_balance="mgda", history_len=0).train_hooks(
        load_dataset("synthetic", num_classes=4, train_size=8, test_size=4, image_size=32), 0.1, seed=0)
    loss = hooks.loss(model, xf, y, lambda m, a, c: F.cross_entropy(m(a), c))
    assert hooks.scales["backdoor"] == pytest.approx(gamma, rel=1e-4)
    assert hooks.scales["normal"] == pytest.approx(1 - gamma, rel=1e-4)
    assert loss.item() == pytest.approx(gamma * lb + (1 - gamma) * ln, rel=1e-4)


def test_min_norm_two_and_the_normalisers():
    # orthogonal v1 (|v1|^2 = 1), v2 (|v2|^2 = 3): g^2 + 3 (1 - g)^2 is least at g = 0.75
    assert min_norm_two(1.0, 0.0, 3.0) == pytest.approx(0.75)
    assert min_norm_two(1.0, 2.0, 3.0) == 0.999  # v1's projection on v2 is past v1: all weight on v1
    assert min_norm_two(3.0, 2.0, 1.0) == 0.001
    g, loss = torch.tensor([3.0, 4.0]), torch.tensor(0.5)
    assert gradient_normaliser(g, loss, "l2") == pytest.approx(5.0)
    assert gradient_normaliser(g, loss, "loss") == pytest.approx(0.5)
    assert gradient_normaliser(g, loss, "loss+") == pytest.approx(2.5)
    assert gradient_normaliser(g * 10, loss, "loss+") == pytest.approx(10.0)  # capped at 10
    assert gradient_normaliser(g, loss, "none") == 1.0


def test_backdoor_loss_starts_once_the_mean_clean_loss_of_the_window_is_below_the_threshold():
    """history_len 3, threshold 1.0, clean losses 5, 5, 0.5, 0.5, 0.5, 0.5: steps 1-5 are the clean loss alone
    (too few losses, then window means 3.5 and 2.0); step 6 (window 0.5) adds 0.9 x the copy's loss (2.5)."""
    clean = iter([5.0, 5.0, 0.5, 0.5, 0.5, 0.5])
    calls = []

    def loss_fn(model, x, y):
        calls.append(bool((y == 0).all()))
        return torch.tensor(2.5) if (y == 0).all() else torch.tensor(next(clean))

    data = load_dataset("synthetic", num_classes=4, train_size=8, test_size=4, image_size=32)
    hooks = create_attack("blind", target=0, history_len=3, loss_threshold=1.0).train_hooks(data, 0.1, seed=0)
    x, y = torch.rand(4, 3, 32, 32), torch.ones(4, dtype=torch.long)
    losses = [hooks.loss(None, x, y, loss_fn).item() for _ in range(6)]
    assert losses[:5] == [5.0, 5.0, 0.5, 0.5, 0.5]
    assert losses[5] == pytest.approx(0.5 + 0.9 * 2.5)
    assert calls == [False] * 6 + [True], "the copy's loss is computed only once training is stable"
    never = create_attack("blind", history_len=2, loss_threshold=0.4).train_hooks(data, 0.1, seed=0)
    assert [never.loss(None, x, y, lambda m, a, c: torch.tensor(0.5)).item() for _ in range(5)] == [0.5] * 5
    assert never.counts == {"batches": 5, "attacked": 0}


def test_default_train_hooks_loss_is_the_trainers_loss_fn():
    """Backwards compatibility of the trainer's hook: a TrainHooks that does not override loss() returns loss_fn."""
    out = TrainHooks().loss("m", "x", "y", lambda m, x, y: (m, x, y))
    assert out == ("m", "x", "y")


def test_fixed_poisoned_set_marks_exactly_the_stamped_relabelled_samples():
    train = load_dataset("synthetic", num_classes=4, train_size=40, test_size=4, image_size=32).train
    attack = create_attack("blind", target=3)
    p = attack.poison_train(train, 0.25, seed=5)
    assert int(p.mask.sum()) == 10 and p.effective_ratio == 0.25
    assert torch.equal(p.x[p.mask], by_hand(train.x[p.mask])) and (p.y[p.mask] == 3).all()
    assert torch.equal(p.x[~p.mask], train.x[~p.mask]) and torch.equal(p.y[~p.mask], train.y[~p.mask])
    again = attack.poison_train(train, 0.25, seed=5)
    assert torch.equal(again.mask, p.mask) and torch.equal(again.x, p.x)
    assert not torch.equal(attack.poison_train(train, 0.25, seed=6).mask, p.mask)
    test = attack.poison_test(train)
    assert (test.y != 3).all() and len(test) == int((train.y != 3).sum())
    assert torch.equal(test.x, by_hand(train.x[train.y != 3]))


@pytest.mark.parametrize("kwargs,key", [
    ({"loss_balance": "MGDA+"}, "loss_balance"), ({"mgda_normalize": "l1"}, "mgda_normalize"),
    ({"normal_scale": -1}, "normal_scale"), ({"backdoor_scale": 0}, "backdoor_scale"),
    ({"loss_threshold": 0}, "loss_threshold"), ({"history_len": -1}, "history_len"),
    ({"poisoning_proportion": 0}, "poisoning_proportion"), ({"poisoning_proportion": 1.1}, "poisoning_proportion"),
    ({"row": -1}, "row"), ({"col": 2.5}, "col"), ({"target": "all-to-all"}, "target"),
])
def test_bad_parameters_are_refused_by_name(kwargs, key):
    with pytest.raises(ParameterError, match=key):
        create_attack("blind", **kwargs)


def test_pattern_must_fit_the_image():
    attack = create_attack("blind")
    attack.check_image_shape((3, 8, 26))  # ends exactly at the last row and column
    with pytest.raises(ParameterError, match="row"):
        attack.check_image_shape((3, 7, 32))
    with pytest.raises(ParameterError, match="col"):
        attack.check_image_shape((3, 32, 25))
    with pytest.raises(ParameterError, match="col"):
        attack.apply_trigger(torch.zeros(1, 3, 16, 16, dtype=torch.uint8))
