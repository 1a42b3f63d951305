"""FTrojan: the DCT coefficients it raises (checked with scipy's DCT and OpenCV's YCrCb formula, independently of
the implementation), the uint8 trigger computed from the formula, dirty-label poisoning, all-to-all, parameters."""
import numpy as np
import pytest
import scipy.fft
import torch

from backdoor._checks import ParameterError
from backdoor.attacks import ATTACKS, create_attack
from backdoor.data import Split

POSITIONS = ((15, 15), (31, 31))


def ycrcb(x: np.ndarray) -> np.ndarray:
    """OpenCV's 8-bit RGB -> YCrCb formula, on float [N, 3, H, W]."""
    r, g, b = x[:, 0], x[:, 1], x[:, 2]
    y = 0.299 * r + 0.587 * g + 0.114 * b
    return np.stack([y, 0.713 * (r - y) + 128, 0.564 * (b - y) + 128], axis=1)


def window_dct(x: np.ndarray, window: int) -> np.ndarray:
    """scipy's orthonormal 2-D DCT of every window, one window at a time."""
    out = np.zeros_like(x)
    for a in range(0, x.shape[-2], window):
        for b in range(0, x.shape[-1], window):
            out[..., a:a + window, b:b + window] = scipy.fft.dctn(x[..., a:a + window, b:b + window],
                                                                  axes=(-2, -1), norm="ortho")
    return out


def expected_trigger(x: torch.Tensor, magnitude=30.0, positions=POSITIONS, window=32) -> torch.Tensor:
    """The trigger from the formula: the chroma pattern p = IDCT(magnitude at each position) of every window,
    added to Cr and Cb; back in RGB, Y is unchanged, R - Y grows by p / 0.713 and B - Y by p / 0.564."""
    delta = np.zeros((window, window))
    for u, v in positions:
        delta[u, v] = magnitude
    p = np.tile(scipy.fft.idctn(delta, norm="ortho"), (x.shape[-2] // window, x.shape[-1] // window))
    d_r, d_b = p / 0.713, p / 0.564
    d_g = -(0.299 * d_r + 0.114 * d_b) / 0.587
    out = x.double().numpy() + np.stack([d_r, d_g, d_b])[None]
    return torch.from_numpy(np.clip(out, 0, 255).round()).to(torch.uint8)


def images(n=6, size=32, seed=0, low=0, high=256):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(low, high, (n, 3, size, size), generator=g, dtype=torch.uint8)


@pytest.mark.parametrize("size", [32, 64])
def test_raises_exactly_the_chosen_chroma_coefficients_by_the_magnitude(size):
    """Known answer: on a constant image the trigger (before rounding) changes the scipy DCT of Cr and Cb by
    exactly +30 at (15, 15) and (31, 31) of every 32x32 window, and nothing else (Y's spectrum included)."""
    x = torch.full((2, 3, size, size), 100.0, dtype=torch.float64)
    x[1] = torch.tensor([60.0, 140.0, 90.0]).view(3, 1, 1)  # a coloured constant image too
    after = create_attack("ftrojan").perturb(x.clone()).numpy()
    change = window_dct(ycrcb(after), 32) - window_dct(ycrcb(x.numpy()), 32)
    expected = np.zeros_like(change)
    for a in range(0, size, 32):
        for b in range(0, size, 32):
            for u, v in POSITIONS:
                expected[:, 1:, a + u, b + v] = 30.0
    assert np.abs(change - expected).max() < 1e-9


def test_other_magnitude_positions_and_channels_move_their_coefficients():
    x = torch.full((1, 3, 32, 32), 128.0, dtype=torch.float64)
    attack = create_attack("ftrojan", magnitude=12.5, positions=[[3, 7]], channels=[2])
    change = window_dct(ycrcb(attack.perturb(x.clone()).numpy()), 32) - window_dct(ycrcb(x.numpy()), 32)
    expected = np.zeros_like(change)
    expected[0, 2, 3, 7] = 12.5
    assert np.abs(change - expected).max() < 1e-9


@pytest.mark.parametrize("size", [32, 64])
def test_uint8_trigger_equals_the_formula(size):
    x = images(size=size)
    assert torch.equal(create_attack("ftrojan").apply_trigger(x), expected_trigger(x))
    extremes = torch.stack([torch.zeros(3, size, size), torch.full((3, size, size), 255.0)]).to(torch.uint8)
    out = create_attack("ftrojan").apply_trigger(extremes)
    assert torch.equal(out, expected_trigger(extremes)), "clipped to 0..255"
    assert out[0].max() > 0 and out[1].min() < 255, "the trigger shows through where it can"


def test_trigger_is_small_and_the_same_for_every_image():
    x = images(20, low=40, high=216)  # far from the clipping limits
    diff = create_attack("ftrojan").apply_trigger(x).int() - x.int()
    assert 3 <= int(diff.abs().max()) <= 6, "a few grey levels: invisible"
    assert (diff - diff[:1]).abs().max() <= 1, "one fixed pattern (up to rounding)"


def test_registered_as_dirty_label_with_reference_defaults():
    attack = create_attack("ftrojan")
    assert "ftrojan" in ATTACKS.names() and attack.kind == "dirty_label"
    assert attack.params() == {"target": 0, "cap_ratio": False, "magnitude": 30.0, "window_size": 32,
                               "positions": [[15, 15], [31, 31]], "channels": [1, 2]}


def test_dirty_label_poisoning_relabels_exactly_the_mask_and_is_seeded():
    train = Split(images(100), torch.arange(100) % 10)
    attack = create_attack("ftrojan", target=3)
    p = attack.poison_train(train, 0.1, seed=1)
    assert int(p.mask.sum()) == 10 and p.effective_ratio == 0.1
    assert (p.y[p.mask] == 3).all() and torch.equal(p.y[~p.mask], train.y[~p.mask])
    assert torch.equal(p.x[p.mask], expected_trigger(train.x[p.mask]))
    assert torch.equal(p.x[~p.mask], train.x[~p.mask])
    again, other = attack.poison_train(train, 0.1, seed=1), attack.poison_train(train, 0.1, seed=2)
    assert torch.equal(again.mask, p.mask) and torch.equal(again.x, p.x) and not torch.equal(other.mask, p.mask)
    test = attack.poison_test(train)
    assert torch.equal(test.y, train.y[train.y != 3]) and torch.equal(test.x, expected_trigger(train.x[train.y != 3]))


def test_all_to_all_relabels_to_the_next_class():
    train = Split(images(50), torch.arange(50) % 10)
    attack = create_attack("ftrojan", target="all-to-all")
    attack.num_classes = 10
    p = attack.poison_train(train, 0.2, seed=0)
    assert int(p.mask.sum()) == 10
    assert torch.equal(p.y[p.mask], (train.y[p.mask] + 1) % 10) and torch.equal(p.y[~p.mask], train.y[~p.mask])
    assert torch.equal(p.x[p.mask], expected_trigger(train.x[p.mask]))


@pytest.mark.parametrize("bad, key", [({"magnitude": 0}, "magnitude"), ({"magnitude": -30}, "magnitude"),
                                      ({"window_size": 0}, "window_size"), ({"positions": [[32, 0]]}, "positions"),
                                      ({"positions": [[15, 15], [15, 15]]}, "positions"), ({"positions": []}, "positions"),
                                      ({"channels": [3]}, "channels"), ({"channels": []}, "channels"),
                                      ({"window_size": 8}, "positions")])  # (15, 15) lies outside an 8x8 window
def test_bad_parameters_raise(bad, key):
    with pytest.raises(ParameterError, match=f"^ftrojan: {key}:"):
        create_attack("ftrojan", **bad)


def test_window_must_tile_rgb_images():
    attack = create_attack("ftrojan")
    attack.check_image_shape((3, 64, 64))
    with pytest.raises(ParameterError, match="window_size"):
        attack.check_image_shape((3, 28, 28))
    with pytest.raises(ParameterError, match="RGB"):
        attack.check_image_shape((1, 32, 32))
    with pytest.raises(ParameterError, match="window_size"):
        attack.apply_trigger(images(size=28))
    small = create_attack("ftrojan", window_size=4, positions=[[1, 2]])
    x = images(size=28)
    assert torch.equal(small.apply_trigger(x), expected_trigger(x, positions=[(1, 2)], window=4))
