"""SIG: the sinusoidal trigger formula, clean-label poisoning of the target class only, infeasible ratios."""
import math

import pytest
import torch

from backdoor.attacks import ATTACKS, InfeasibleRatioError, create_attack
from backdoor.data import Split


def images(n=6, size=32, seed=0, low=0, high=256):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(low, high, (n, 3, size, size), generator=g, dtype=torch.uint8)


def expected_sig(x, delta, f):
    width = x.shape[-1]
    out = torch.empty(x.shape, dtype=torch.uint8)
    for j in range(width):  # the formula column by column, independently of the implementation
        out[..., j] = (x[..., j].double() + delta * math.sin(2 * math.pi * j * f / width)).round().clamp(0, 255)
    return out


def test_registered_as_clean_label():
    assert "sig" in ATTACKS.names() and create_attack("sig").kind == "clean_label"
    assert create_attack("sig").params() == {"target": 0, "cap_ratio": False, "delta": 40.0, "frequency": 6.0,
                                             "test_delta": None}


@pytest.mark.parametrize("size", [32, 28])
def test_pattern_equals_the_formula_exactly(size):
    x = images(size=size)
    assert torch.equal(create_attack("sig").apply_trigger(x), expected_sig(x, 40, 6))
    assert torch.equal(create_attack("sig", delta=25, frequency=3).apply_trigger(x), expected_sig(x, 25, 3))


def test_same_signal_on_every_row_and_channel_and_clipped():
    flat = torch.full((1, 3, 32, 32), 100, dtype=torch.uint8)
    diff = create_attack("sig").apply_trigger(flat).int() - 100
    assert (diff == diff[:, :1, :1, :]).all(), "one row signal, broadcast over rows and channels"
    assert int(diff.max()) == 40 and int(diff.min()) == -40 and int(diff[0, 0, 0, 0]) == 0
    extremes = torch.stack([torch.zeros(3, 32, 32), torch.full((3, 32, 32), 255.0)]).to(torch.uint8)
    out = create_attack("sig").apply_trigger(extremes)
    assert out[0].min() == 0 and out[0].max() == 40 and out[1].min() == 215 and out[1].max() == 255


def test_poisons_only_target_class_and_keeps_labels():
    y = torch.arange(200) % 10
    train = Split(images(200), y)
    attack = create_attack("sig", target=3)
    p = attack.poison_train(train, 0.05, seed=1)
    assert int(p.mask.sum()) == 10 and p.effective_ratio == 0.05
    assert (y[p.mask] == 3).all() and torch.equal(p.y, y), "clean label: target class only, labels kept"
    assert torch.equal(p.x[~p.mask], train.x[~p.mask])
    assert torch.equal(p.x[p.mask], expected_sig(train.x[p.mask], 40, 6))


def test_infeasible_ratio_names_the_largest_and_cap_caps():
    train = Split(images(200), torch.arange(200) % 10)  # 20 target-class samples = ratio 0.1
    with pytest.raises(InfeasibleRatioError, match="largest feasible ratio is 0.1000"):
        create_attack("sig").poison_train(train, 0.15, seed=0)
    capped = create_attack("sig", cap_ratio=True).poison_train(train, 0.15, seed=0)
    assert capped.effective_ratio == 0.1 and torch.equal(capped.mask, train.y == 0)
    assert torch.equal(capped.y, train.y)


def test_test_delta_changes_only_the_test_trigger():
    train = Split(images(100), torch.arange(100) % 10)
    attack = create_attack("sig", test_delta=60)
    p = attack.poison_train(train, 0.1, seed=0)
    assert torch.equal(p.x[p.mask], expected_sig(train.x[p.mask], 40, 6)), "training amplitude is delta"
    test = attack.poison_test(train)
    assert torch.equal(test.x, expected_sig(train.x[train.y != 0], 60, 6)), "test amplitude is test_delta"


@pytest.mark.parametrize("bad", [{"delta": 0}, {"delta": 300}, {"frequency": 0}, {"test_delta": -1}])
def test_bad_parameters_raise(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        create_attack("sig", **bad)
