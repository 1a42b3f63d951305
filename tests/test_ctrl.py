"""CTRL: the DCT coefficients it raises (checked with scipy's DCT and kornia's YUV formula, independently of the
implementation), the uint8 trigger computed from the formula, clean-label poisoning of the target class only,
the separate test magnitude, the refusal of all-to-all, parameters."""
import numpy as np
import pytest
import scipy.fft
import torch

from backdoor._checks import ParameterError
from backdoor.attacks import ATTACKS, InfeasibleRatioError, create_attack
from backdoor.data import Split

POSITIONS = ((15, 15), (31, 31))
KORNIA_YUV = np.array([[0.299, 0.587, 0.114], [-0.147, -0.289, 0.436], [0.615, -0.515, -0.100]])


def yuv(x: np.ndarray) -> np.ndarray:
    """kornia's rgb_to_yuv, on float [N, 3, H, W]."""
    return np.einsum("ij,njhw->nihw", KORNIA_YUV, x)


def window_dct(x: np.ndarray, window: int) -> np.ndarray:
    """scipy's orthonormal 2-D DCT of every window, one window at a time."""
    out = np.zeros_like(x)
    for a in range(0, x.shape[-2], window):
        for b in range(0, x.shape[-1], window):
            out[..., a:a + window, b:b + window] = scipy.fft.dctn(x[..., a:a + window, b:b + window],
                                                                  axes=(-2, -1), norm="ortho")
    return out


def expected_trigger(x: torch.Tensor, magnitude=100.0, positions=POSITIONS, window=32) -> torch.Tensor:
    """The trigger from the formula: the chroma pattern p = IDCT(magnitude at each position) of every window,
    added to U and V with Y unchanged; the RGB change solves YUV(d) = (0, p, p)."""
    delta = np.zeros((window, window))
    for u, v in positions:
        delta[u, v] = magnitude
    p = np.tile(scipy.fft.idctn(delta, norm="ortho"), (x.shape[-2] // window, x.shape[-1] // window))
    d = np.linalg.solve(KORNIA_YUV, np.stack([np.zeros_like(p), p, p]).reshape(3, -1)).reshape(3, *p.shape)
    out = x.double().numpy() + d[None]
    return torch.from_numpy(np.clip(out, 0, 255).round()).to(torch.uint8)


def images(n=6, size=32, seed=0, low=0, high=256):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(low, high, (n, 3, size, size), generator=g, dtype=torch.uint8)


@pytest.mark.parametrize("size", [32, 64])
def test_raises_exactly_the_chosen_chroma_coefficients_by_the_magnitude(size):
    """Known answer: on a constant image the trigger (before rounding) changes the scipy DCT of U and V by
    exactly +100 at (15, 15) and (31, 31) of every 32x32 window, and nothing else (Y's spectrum included)."""
    x = torch.full((2, 3, size, size), 120.0, dtype=torch.float64)
    x[1] = torch.tensor([60.0, 140.0, 90.0]).view(3, 1, 1)
    after = create_attack("ctrl").perturb(x.clone(), 100.0).numpy()
    change = window_dct(yuv(after), 32) - window_dct(yuv(x.numpy()), 32)
    expected = np.zeros_like(change)
    for a in range(0, size, 32):
        for b in range(0, size, 32):
            for u, v in POSITIONS:
                expected[:, 1:, a + u, b + v] = 100.0
    assert np.abs(change - expected).max() < 1e-9


def test_other_positions_and_channels_move_their_coefficients():
    x = torch.full((1, 3, 32, 32), 128.0, dtype=torch.float64)
    attack = create_attack("ctrl", positions=[[4, 9]], channels=[1])
    change = window_dct(yuv(attack.perturb(x.clone(), 40.0).numpy()), 32) - window_dct(yuv(x.numpy()), 32)
    expected = np.zeros_like(change)
    expected[0, 1, 4, 9] = 40.0
    assert np.abs(change - expected).max() < 1e-9


@pytest.mark.parametrize("size", [32, 64])
def test_uint8_trigger_equals_the_formula(size):
    x = images(size=size)
    assert torch.equal(create_attack("ctrl").apply_trigger(x), expected_trigger(x))
    extremes = torch.stack([torch.zeros(3, size, size), torch.full((3, size, size), 255.0)]).to(torch.uint8)
    assert torch.equal(create_attack("ctrl").apply_trigger(extremes), expected_trigger(extremes)), "clipped"


def test_registered_as_clean_label_with_reference_defaults():
    attack = create_attack("ctrl")
    assert "ctrl" in ATTACKS.names() and attack.kind == "clean_label"
    assert attack.params() == {"target": 0, "cap_ratio": False, "magnitude": 100.0, "test_magnitude": None,
                               "window_size": 32, "positions": [[15, 15], [31, 31]], "channels": [1, 2]}


def test_poisons_only_the_target_class_and_keeps_every_label():
    y = torch.arange(200) % 10
    train = Split(images(200), y)
    attack = create_attack("ctrl", target=4)
    p = attack.poison_train(train, 0.05, seed=1)
    assert int(p.mask.sum()) == 10 and p.effective_ratio == 0.05
    assert (y[p.mask] == 4).all() and torch.equal(p.y, y), "clean label: target class only, labels kept"
    assert torch.equal(p.x[p.mask], expected_trigger(train.x[p.mask]))
    assert torch.equal(p.x[~p.mask], train.x[~p.mask])
    again, other = attack.poison_train(train, 0.05, seed=1), attack.poison_train(train, 0.05, seed=2)
    assert torch.equal(again.mask, p.mask) and torch.equal(again.x, p.x) and not torch.equal(other.mask, p.mask)
    with pytest.raises(InfeasibleRatioError, match="largest feasible ratio is 0.1000"):
        attack.poison_train(train, 0.15, seed=0)
    capped = create_attack("ctrl", target=4, cap_ratio=True).poison_train(train, 0.15, seed=0)
    assert torch.equal(capped.mask, y == 4) and torch.equal(capped.y, y)


def test_test_magnitude_changes_only_the_test_trigger():
    train = Split(images(100), torch.arange(100) % 10)
    attack = create_attack("ctrl", magnitude=50, test_magnitude=100)
    p = attack.poison_train(train, 0.1, seed=0)
    assert torch.equal(p.x[p.mask], expected_trigger(train.x[p.mask], magnitude=50)), "training: magnitude"
    test = attack.poison_test(train)
    assert torch.equal(test.y, train.y[train.y != 0])
    assert torch.equal(test.x, expected_trigger(train.x[train.y != 0], magnitude=100)), "test: test_magnitude"


def test_all_to_all_is_refused():
    with pytest.raises(ParameterError, match="^ctrl: target:.*clean-label"):
        create_attack("ctrl", target="all-to-all")


@pytest.mark.parametrize("bad, key", [({"magnitude": 0}, "magnitude"), ({"test_magnitude": -1}, "test_magnitude"),
                                      ({"window_size": 0}, "window_size"), ({"positions": [[0, 32]]}, "positions"),
                                      ({"positions": [15, 31]}, "positions"), ({"channels": [1, 1]}, "channels"),
                                      ({"channels": [-1]}, "channels"), ({"window_size": 16}, "positions")])
def test_bad_parameters_raise(bad, key):
    with pytest.raises(ParameterError, match=f"^ctrl: {key}:"):
        create_attack("ctrl", **bad)


def test_window_must_tile_rgb_images():
    attack = create_attack("ctrl")
    attack.check_image_shape((3, 64, 32))
    with pytest.raises(ParameterError, match="window_size"):
        attack.check_image_shape((3, 28, 28))
    with pytest.raises(ParameterError, match="RGB"):
        attack.apply_trigger(torch.zeros(1, 1, 32, 32, dtype=torch.uint8))
