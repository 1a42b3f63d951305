"""TeCo: each corruption does what its ImageNet-C formula says (brightness against colorsys, contrast against the
direct formula, the noises' spread, pixelate's block means, motion blur's weighted shifts, blurs keep a constant
image), the transition severity of a model whose label flips at a known contrast severity, the deviation against
torch.std, the planted backdoor's triggered inputs scoring above every clean one, the threshold at the stated
clean FPR, determinism under the seed, and parameter validation."""
import colorsys
import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from backdoor._checks import ParameterError
from backdoor.detectors import create_detector
from backdoor.defenses.base import DefenseInputs
from backdoor.detectors.teco import (CONTRAST, CORRUPTIONS, DEFAULT_CORRUPTIONS, FOG, GAUSSIAN_NOISE, IMPULSE_NOISE,
                                     MOTION_BLUR, NEVER, SHOT_NOISE, _clipped_zoom, _motion_blur, corrupt, deviation,
                                     transition_severities)
from backdoor.training import TrainConfig

sys.path.insert(0, str(Path(__file__).parent))
from planted import add_trigger, colour_data, planted_model  # noqa: E402

CPU = torch.device("cpu")


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_images(n=4, side=16, seed=0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, side, side), generator=gen(seed), dtype=torch.uint8)


def floor_uint8(x: torch.Tensor) -> torch.Tensor:
    return torch.floor(x.clamp(0, 1) * 255 + 1e-3)


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_every_corruption_changes_the_image_more_at_higher_severity_and_is_seeded(name):
    x = random_images()
    changes = []
    for severity in range(1, 6):
        y = corrupt(x, name, severity, gen(1))
        assert y.dtype == torch.uint8 and y.shape == x.shape
        assert torch.equal(y, corrupt(x, name, severity, gen(1)))  # the generator decides every draw
        changes.append(float((y.float() - x.float()).abs().mean()))
    assert min(changes) > 2, changes  # every severity corrupts
    assert changes[4] > changes[0], changes  # severity 5 corrupts more than severity 1


def test_brightness_raises_the_hsv_value_against_colorsys():
    x = random_images(2, 8, seed=3)
    x[0, :, 0, 0] = 0  # a black pixel turns grey
    for severity, c in enumerate((0.1, 0.2, 0.3, 0.4, 0.5), start=1):
        y = corrupt(x, "brightness", severity, gen())
        expected = torch.empty_like(y, dtype=torch.float64)
        for n in range(2):
            for i in range(8):
                for j in range(8):
                    h, s, v = colorsys.rgb_to_hsv(*(x[n, :, i, j].double() / 255).tolist())
                    rgb = colorsys.hsv_to_rgb(h, s, min(v + c, 1.0))
                    expected[n, :, i, j] = torch.tensor(rgb, dtype=torch.float64)
        assert (y.double() - floor_uint8(expected)).abs().max() <= 1
        assert y[0, :, 0, 0].tolist() == [int(c * 255 + 1e-3)] * 3


def test_contrast_scales_each_channel_about_its_mean():
    x = random_images(3, 8, seed=4)
    xf = x.double() / 255
    means = xf.mean((2, 3), keepdim=True)
    for severity, c in enumerate(CONTRAST, start=1):
        expected = floor_uint8((xf - means) * c + means)
        assert (corrupt(x, "contrast", severity, gen()).double() - expected).abs().max() <= 1


@pytest.mark.parametrize("severity", [1, 5])
def test_gaussian_noise_has_the_stated_std(severity):
    x = torch.full((32, 3, 16, 16), 128, dtype=torch.uint8)
    diff = corrupt(x, "gaussian_noise", severity, gen(2)).double() - 128
    target = GAUSSIAN_NOISE[severity - 1] * 255
    if severity == 1:  # no clipping at 128 +- 3.5 std
        assert abs(diff.std().item() / target - 1) < 0.03
        assert abs(diff.mean().item() + 0.5) < 0.3  # truncation to uint8 lowers by half a level on average
    else:  # clipped at 0 and 255: the spread is at most the stated std
        assert 0.8 * target < diff.std().item() < target


def test_shot_noise_is_poisson_with_the_stated_rate():
    x = torch.full((32, 3, 16, 16), 128, dtype=torch.uint8)
    for severity in (1, 3):
        c = SHOT_NOISE[severity - 1]
        y = corrupt(x, "shot_noise", severity, gen(3)).double() / 255
        assert abs(y.std().item() / math.sqrt(128 / 255 / c) - 1) < 0.05
        assert torch.allclose(torch.round(y * c * 255) / 255, y * c, atol=c / 255 + 1e-6)  # multiples of 1/c


def test_impulse_noise_sets_the_stated_share_of_values_to_0_or_255():
    x = torch.full((32, 3, 16, 16), 128, dtype=torch.uint8)
    for severity in (1, 5):
        y = corrupt(x, "impulse_noise", severity, gen(4))
        assert set(y.unique().tolist()) <= {0, 128, 255}
        hit = (y != 128).double().mean().item()
        assert abs(hit / IMPULSE_NOISE[severity - 1] - 1) < 0.1
        assert abs((y == 255).double().sum().item() / (y != 128).double().sum().item() - 0.5) < 0.05


def test_pixelate_replaces_each_block_by_its_mean():
    x = random_images(2, 10, seed=5)  # severity 2: factor 0.5 -> 5 x 5 blocks of 2 x 2
    y = corrupt(x, "pixelate", 2, gen())
    blocks = x.double().unfold(2, 2, 2).unfold(3, 2, 2).mean((-1, -2))
    expected = floor_uint8(blocks.repeat_interleave(2, 2).repeat_interleave(2, 3) / 255)
    assert (y.double() - expected).abs().max() <= 1


def test_motion_blur_sums_gaussian_weighted_shifts_and_stops_at_the_border():
    """Angle 0: shift i moves the image i pixels left (edge replicated); on 8 pixels shifts 0..7 count, the
    weights exp(-i^2 / 2 sigma^2) normalised over all 2 radius + 1 shifts (not renormalised after the stop)."""
    radius, sigma = MOTION_BLUR[0]
    x = torch.rand((1, 1, 3, 8), generator=gen(6), dtype=torch.float64)
    out = _motion_blur(x, radius, sigma, torch.zeros(1, dtype=torch.float64))
    w = [math.exp(-i ** 2 / (2 * sigma ** 2)) for i in range(2 * radius + 1)]
    w = [v / sum(w) for v in w]
    expected = torch.zeros_like(x)
    for i in range(8):
        for j in range(8):
            expected[..., j] += w[i] * x[..., min(j + i, 7)]
    assert torch.allclose(out, expected)


def test_fog_adds_a_min_max_normalised_plasma_and_rescales_by_the_image_maximum():
    """On a constant image v (16 px: the 16 x 16 plasma map is shown whole, so its minimum 0 and maximum 1 are
    in it): pixel = (v + c p) v / (v + c), from v^2 / (v + c) where the plasma is 0 up to v where it is 1."""
    v = 200 / 255
    x = torch.full((3, 3, 16, 16), 200, dtype=torch.uint8)
    for severity, (c, _) in enumerate(FOG, start=1):
        y = corrupt(x, "fog", severity, gen(severity))
        assert torch.equal(y[:, 0], y[:, 2])  # one plasma map for every channel
        assert y.amax((1, 2, 3)).tolist() == [200] * 3
        assert y.amin((1, 2, 3)).tolist() == [int(255 * v * v / (v + c) + 1e-3)] * 3
        assert len(y[0].unique()) > 20  # a fractal, not a constant

@pytest.mark.parametrize("name", ["defocus_blur", "glass_blur", "zoom_blur", "elastic_transform",  # motion: below
                                  "pixelate", "contrast"])
def test_filters_keep_a_constant_image(name):
    x = torch.full((2, 3, 12, 12), 100, dtype=torch.uint8)
    for severity in range(1, 6):
        assert (corrupt(x, name, severity, gen()).int() - 100).abs().max() <= 1


class HalvesDiff(nn.Module):
    """Class 0 while the right half is brighter than the left by more than ``cut`` (in [0, 1] units), else 1."""

    def __init__(self, cut: float):
        super().__init__()
        self.cut = cut

    def forward(self, x):
        w = x.shape[-1] // 2
        diff = x[..., w:].mean((1, 2, 3)) - x[..., :w].mean((1, 2, 3))
        return torch.stack([diff - self.cut, self.cut - diff], 1)


def halves(pairs) -> torch.Tensor:
    x = torch.zeros((len(pairs), 3, 8, 8), dtype=torch.uint8)
    for n, (left, right) in enumerate(pairs):
        x[n, ..., :4], x[n, ..., 4:] = left, right
    return x


def test_transition_severity_is_the_first_contrast_severity_that_changes_the_label():
    """Contrast scales the halves' difference d by 0.4, 0.3, 0.2, 0.1, 0.05; the label flips once below 0.25:
    d = 1 at severity 3 (0.2), d ~ 0.5 at 1 (0.2), d ~ 0.71 at 2 (0.21); an even image is class 1 from the start
    and never changes (6)."""
    x = halves([(0, 255), (64, 191), (0, 180), (90, 90)])
    sev = transition_severities(HalvesDiff(0.25), x, ("contrast",), gen(), CPU)
    assert sev[:, 0].tolist() == [3, 1, 2, NEVER]
    both = transition_severities(HalvesDiff(0.25), x, ("contrast", "pixelate", "contrast"), gen(), CPU)
    assert both[:, 0].tolist() == both[:, 2].tolist() == [3, 1, 2, NEVER]


def test_deviation_is_the_population_std_of_the_severities():
    sev = torch.tensor([[1, 6, 6, 6], [3, 3, 3, 3], [1, 2, 3, 4], [6, 6, 6, 6]])
    assert torch.allclose(deviation(sev), sev.double().std(1, correction=0).float())
    assert torch.allclose(deviation(sev), torch.tensor([math.sqrt(75 / 16), 0.0, math.sqrt(1.25), 0.0]))


def planted_inputs(seed=0, clean_n=60):
    budget = TrainConfig(epochs=1, batch_size=16, lr=0.01, crop_padding=0, hflip=False)
    return DefenseInputs(model=planted_model().eval(), clean=colour_data(clean_n, 1), num_classes=3, device=CPU,
                         seed=seed, training=budget, retraining=budget, new_model=planted_model, fit=None)


def test_planted_triggers_score_above_every_clean_input_and_the_threshold_has_the_stated_fpr():
    """The planted model's white corner survives noise, brightness and snow but not blurs, contrast or pixelate:
    a triggered non-target image keeps class 0 under some corruptions and loses it at severity 1-3 under others,
    a clean image (classified by channel means) changes under few; every triggered one scores above every clean
    one."""
    inputs = planted_inputs()
    screen = create_detector("teco").calibrate(inputs)
    clean = screen.scores(inputs.clean.x)
    assert clean.dtype == torch.float32 and clean.shape == (60,)
    assert screen.threshold == pytest.approx(float(torch.quantile(clean.double(), 0.95)))
    assert (clean > screen.threshold).double().mean() <= 0.05
    test = colour_data(60, 2)
    triggered = screen.scores(add_trigger(test.x[test.y != 0]))
    assert triggered.min() > clean.max()
    assert bool(screen.flag(add_trigger(test.x[test.y != 0])).all())


def test_the_same_seed_gives_the_same_screen():
    a = create_detector("teco").calibrate(planted_inputs(seed=3, clean_n=24))
    b = create_detector("teco").calibrate(planted_inputs(seed=3, clean_n=24))
    x = add_trigger(colour_data(12, 7).x)
    assert a.threshold == b.threshold and torch.equal(a.scores(x), b.scores(x))


@pytest.mark.parametrize("key, value", [("corruptions", ["frost"]), ("corruptions", ["glass"]),
                                        ("corruptions", ["gaussian_noise", "nope"]), ("corruptions", []),
                                        ("corruptions", ["contrast", "contrast"]), ("corruptions", "contrast"),
                                        ("fpr", 1.0), ("fpr", -0.1), ("fpr", True), ("fpr", float("nan"))])
def test_bad_parameters_are_refused(key, value):
    with pytest.raises(ParameterError, match=f"teco: {key}"):
        create_detector("teco", **{key: value})


def test_defaults_and_recorded_parameters():
    teco = create_detector("teco")
    assert teco.corruptions == DEFAULT_CORRUPTIONS and len(DEFAULT_CORRUPTIONS) == 14 and "frost" not in DEFAULT_CORRUPTIONS and teco.fpr == 0.05
    assert teco.params() == {"corruptions": list(DEFAULT_CORRUPTIONS), "fpr": 0.05}
    assert create_detector("teco", corruptions=["contrast", "pixelate"]).corruptions == ("contrast", "pixelate")


def test_clipped_zoom_stretches_the_centre_corners_to_corners():
    """scipy's linear zoom of the centre ceil(8 / 2) = 4 columns (2..5) of a ramp back to 8: 2 + 3 j / 7."""
    ramp = torch.arange(8, dtype=torch.float64).expand(1, 1, 8, 8)
    out = _clipped_zoom(ramp, 2.0)
    assert torch.allclose(out[0, 0, 0], 2 + 3 * torch.arange(8, dtype=torch.float64) / 7)
    assert _clipped_zoom(ramp, 1.3, crop=False).shape[-1] == round(math.ceil(8 / 1.3) * 1.3)  # 9: kept whole
