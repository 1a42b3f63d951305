"""SCALE-UP: known answers on a hand-built model whose prediction on every amplified image is computable by hand.

The model: the image's mean brightness b picks the nearest of four centres (0.1, 0.5, 0.9, 3.0), so class 0 for
b < 0.3, 1 for 0.3 < b < 0.7, 2 for 0.7 < b < 1.95 and 3 beyond (only an unclipped image gets there); a planted
backdoor adds 100 to class 0 when the bottom-right pixel is white and its left neighbour black (a trigger that
amplification keeps: 0 stays 0 and 1 stays 1; amplifying a clean image, whose pixels are all >= 8/255, never
makes it). On a constant image of value v, the factor n gives b = min(n v, 1): its SPC is a count by hand
(``expected_spc``, written without the model)."""
import math
import statistics

import pytest
import torch
from torch import nn

from backdoor._checks import ParameterError
from backdoor.data import Split
from backdoor.defenses import DefenseInputs
from backdoor.detectors import DETECTORS, create_detector
from backdoor.detectors.scaleup import ScaleUp, class_statistics, scaled_prediction_consistency
from backdoor.models import Classifier, LayerRoles
from backdoor.training import TrainConfig

CPU = torch.device("cpu")
CENTRES = (0.1, 0.5, 0.9, 3.0)
SCALES = (3, 5, 7, 9, 11)
TARGET = 0


class BandNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.centres = nn.Parameter(torch.tensor(CENTRES))
        self.head = nn.Identity()

    def forward(self, x):
        b = x.mean((1, 2, 3))
        logits = -(b[:, None] - self.centres).abs()
        trigger = (x[:, :, -1, -1].amin(1) >= 0.99) & (x[:, :, -1, -2].amax(1) <= 0.01)
        return logits + 100.0 * trigger.float()[:, None] * torch.nn.functional.one_hot(
            torch.tensor(TARGET), len(CENTRES)).float()


def band_model() -> Classifier:
    return Classifier(BandNet(), (0.0,) * 3, (1.0,) * 3, LayerRoles(("head",) * 3, "head", "head"), arch="band")


def band(b: float) -> int:
    """The class of brightness b, by hand."""
    return min(range(len(CENTRES)), key=lambda k: abs(b - CENTRES[k]))


def expected_spc(k: int, scales=SCALES, clip: bool = True) -> tuple[float, int]:
    """(SPC, prediction) of the constant image of value k/255, counted by hand."""
    v = k / 255
    original = band(v)
    same = sum(band(min(n * v, 1.0) if clip else n * v) == original for n in scales)
    return same / len(scales), original


def constant_images(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.uint8).view(-1, 1, 1, 1).expand(-1, 3, 4, 4).contiguous()


def stamp(x: torch.Tensor) -> torch.Tensor:
    x = x.clone()
    x[:, :, -1, -1] = 255
    x[:, :, -1, -2] = 0
    return x


def away_from_boundaries(k: int) -> bool:
    """True when no amplified brightness of k/255 lies within 1e-3 of a class boundary (float rounding can
    then not change the hand count)."""
    return all(min(abs(min(n * k / 255, 1.0) - edge) for edge in (0.3, 0.7)) > 1e-3 for n in (1, *SCALES))


CLEAN_VALUES = [k for k in range(8, 251, 3) if away_from_boundaries(k)]
TEST_VALUES = [k for k in range(9, 252, 7) if away_from_boundaries(k)]


def inputs_for(clean_values, num_classes: int = 4) -> DefenseInputs:
    x = constant_images(clean_values)
    # labels that are NOT the model's predictions: the screen's statistics are per predicted class and must
    # not read them
    clean = Split(x, torch.tensor([(band(k / 255) + 1) % 4 for k in clean_values], dtype=torch.long))
    return DefenseInputs(model=band_model(), clean=clean, num_classes=num_classes, device=CPU, seed=3,
                         training=TrainConfig(epochs=1), retraining=TrainConfig(epochs=1),
                         new_model=band_model, fit=lambda *a, **k: {})


def test_registered_as_an_input_detector():
    assert DETECTORS.get("scaleup") is ScaleUp
    assert ScaleUp.task == "input" and ScaleUp.title == "SCALE-UP" and ScaleUp.order == 20


def test_spc_by_hand():
    """Each constant image's SPC is the share of factors that keep its brightness class. By hand: 20/255 = 0.078
    is class 0, x3 = 0.235 stays, x5 = 0.39 and x7 = 0.55 are class 1, x9 and x11 class 2: SPC 1/5; 5/255 x11 =
    0.216 stays class 0: SPC 1; 120/255 = 0.47 is class 1, x3 clips to 1 (class 2): SPC 0; 200/255 = 0.78 is class
    2 and every clipped amplification too: SPC 1. Then a whole range against the hand count."""
    spc, pred = scaled_prediction_consistency(band_model(), constant_images([20, 5, 120, 200]), list(SCALES), CPU)
    assert spc.tolist() == pytest.approx([0.2, 1.0, 0.0, 1.0])
    assert pred.tolist() == [0, 0, 1, 2]
    x = constant_images(TEST_VALUES)
    spc, pred = scaled_prediction_consistency(band_model(), x, list(SCALES), CPU)
    want = [expected_spc(k) for k in TEST_VALUES]
    assert spc.tolist() == pytest.approx([s for s, _ in want])
    assert pred.tolist() == [p for _, p in want]
    assert len(set(spc.tolist())) >= 3  # the set covers several SPC values, not only 0 and 1
    # another scale set, with non-integer factors
    spc, _ = scaled_prediction_consistency(band_model(), x, [1.5, 2.5], CPU)
    assert spc.tolist() == pytest.approx([expected_spc(k, (1.5, 2.5))[0] for k in TEST_VALUES])


def test_triggered_images_keep_their_prediction():
    x = stamp(constant_images(TEST_VALUES))
    spc, pred = scaled_prediction_consistency(band_model(), x, list(SCALES), CPU)
    assert spc.tolist() == [1.0] * len(TEST_VALUES) and pred.tolist() == [TARGET] * len(TEST_VALUES)


def test_clipping_keeps_bright_images_consistent():
    """200/255 = 0.78 is class 2 and stays so once clipped; unclipped, x3 = 2.35 is nearer class 3's centre."""
    assert expected_spc(200) == (1.0, 2) and expected_spc(200, clip=False) == (0.0, 2)
    spc, _ = scaled_prediction_consistency(band_model(), constant_images([200]), list(SCALES), CPU)
    assert spc.tolist() == [1.0]


def hand_statistics(clean_values):
    """Per class (by the hand prediction): mean and statistics.stdev of the hand SPCs, with the pooled figures
    where the class has no sample or no spread; pooled spread 0 -> 1."""
    pairs = [expected_spc(k) for k in clean_values]
    pooled = [s for s, _ in pairs]
    pooled_mean = statistics.fmean(pooled)
    pooled_std = statistics.stdev(pooled) if len(pooled) >= 2 else 0.0
    pooled_std = pooled_std if pooled_std > 1e-9 else 1.0
    means, stds = [], []
    for c in range(len(CENTRES)):
        group = [s for s, p in pairs if p == c]
        means.append(statistics.fmean(group) if group else pooled_mean)
        spread = statistics.stdev(group) if len(group) >= 2 else 0.0
        stds.append(spread if spread > 1e-9 else pooled_std)
    return means, stds, pooled_mean, pooled_std


def test_class_statistics_match_a_direct_computation():
    spc = torch.tensor([0.2, 0.4, 0.4, 1.0, 0.0, 0.6], dtype=torch.float64)
    pred = torch.tensor([0, 0, 0, 2, 1, 1])
    stats = class_statistics(spc, pred, 4)
    assert stats["mean"].tolist() == pytest.approx([1 / 3, 0.3, 1.0, statistics.fmean(spc.tolist())])
    pooled_std = statistics.stdev(spc.tolist())
    assert stats["std"].tolist() == pytest.approx([statistics.stdev([0.2, 0.4, 0.4]), statistics.stdev([0.0, 0.6]),
                                                  pooled_std, pooled_std])  # class 2: one sample; class 3: none
    assert stats["counts"].tolist() == [3, 2, 1, 0]
    same = class_statistics(torch.full((4,), 0.6, dtype=torch.float64), torch.zeros(4, dtype=torch.long), 2)
    assert same["std"].tolist() == [1.0, 1.0] and same["mean"].tolist() == pytest.approx([0.6, 0.6])


def test_standardised_scores_match_the_hand_statistics():
    screen = create_detector("scaleup").calibrate(inputs_for(CLEAN_VALUES))
    means, stds, _, _ = hand_statistics(CLEAN_VALUES)
    assert screen.mean.tolist() == pytest.approx(means) and screen.std.tolist() == pytest.approx(stds)
    assert any(0.05 < s < 0.95 for s in stds)  # a spread that is neither 0 nor 1: std, variance and 1 differ
    x = torch.cat([constant_images(TEST_VALUES), stamp(constant_images(TEST_VALUES))])
    want = []
    for k in TEST_VALUES:
        s, p = expected_spc(k)
        want.append((s - means[p]) / stds[p])
    want += [(1.0 - means[TARGET]) / stds[TARGET]] * len(TEST_VALUES)
    scores = screen.scores(x)
    assert scores.dtype == torch.float32 and scores.device.type == "cpu"
    assert scores.tolist() == pytest.approx(want, abs=1e-5)
    assert screen.threshold == 0.5  # BackdoorBox's T
    assert torch.equal(screen.flag(x), scores > 0.5)
    assert screen.info["class_counts"] == [sum(expected_spc(k)[1] == c for k in CLEAN_VALUES) for c in range(4)]


def test_a_class_missing_from_the_clean_data_uses_the_pooled_statistics():
    clean = [k for k in CLEAN_VALUES if expected_spc(k)[1] != 2]
    screen = create_detector("scaleup").calibrate(inputs_for(clean))
    _, _, pooled_mean, pooled_std = hand_statistics(clean)
    assert screen.scores(constant_images([200])).tolist() == pytest.approx([(1.0 - pooled_mean) / pooled_std])


def test_raw_spc_without_standardisation():
    screen = create_detector("scaleup", standardise=False).calibrate(inputs_for(CLEAN_VALUES))
    assert screen.mean is None and screen.threshold == 0.5
    x = constant_images(TEST_VALUES)
    assert screen.scores(x).tolist() == pytest.approx([expected_spc(k)[0] for k in TEST_VALUES])
    assert screen.flag(x).tolist() == [expected_spc(k)[0] > 0.5 for k in TEST_VALUES]


def test_standardisation_puts_triggered_inputs_above_every_clean_one():
    """Raw SPC ties the triggered images (1) with the bright clean class, which amplification cannot change
    (also 1); per-class standardisation removes that benign consistency: bright clean images score 0 (their
    class's mean), the triggered ones (1 - mu_0) / sigma_0 > every clean class-0 image's."""
    clean_x, triggered = constant_images(TEST_VALUES), stamp(constant_images(TEST_VALUES))
    raw = create_detector("scaleup", standardise=False).calibrate(inputs_for(CLEAN_VALUES))
    assert raw.scores(triggered).min() <= raw.scores(clean_x).max()  # ties: bright clean images are at 1 too
    screen = create_detector("scaleup").calibrate(inputs_for(CLEAN_VALUES))
    assert screen.scores(triggered).min() > screen.scores(clean_x).max()
    assert screen.flag(triggered).all()  # T = 0.5 also flags the darkest clean images (z > 0.5), by design


@pytest.mark.parametrize("fpr", [0.05, 0.3])
def test_threshold_calibrated_at_fpr_on_clean_scores(fpr):
    detector = create_detector("scaleup", fpr=fpr)
    screen = detector.calibrate(inputs_for(CLEAN_VALUES))
    clean_scores = screen.scores(constant_images(CLEAN_VALUES))
    # linear-interpolation (1 - fpr) quantile, computed directly
    ordered = sorted(clean_scores.double().tolist())
    position = (1 - fpr) * (len(ordered) - 1)
    low = math.floor(position)
    want = ordered[low] + (position - low) * (ordered[min(low + 1, len(ordered) - 1)] - ordered[low])
    assert screen.threshold == pytest.approx(want)
    assert screen.threshold != 0.5
    flagged = float((clean_scores > screen.threshold).float().mean())
    assert flagged <= fpr and screen.info["clean_flagged_share"] == pytest.approx(flagged)


def test_ties_at_the_calibrated_threshold_are_not_flagged():
    """Raw SPC on this clean set: more than 5% of the clean images sit at SPC 1, so the 0.95 quantile is 1 and
    `scores > threshold` flags nothing, not even the triggered inputs (SPC 1): the FPR bound holds, at 0."""
    screen = create_detector("scaleup", standardise=False, fpr=0.05).calibrate(inputs_for(CLEAN_VALUES))
    assert screen.threshold == 1.0
    assert not screen.flag(constant_images(CLEAN_VALUES)).any()
    assert not screen.flag(stamp(constant_images(TEST_VALUES))).any()


def test_deterministic_and_per_input():
    """Two calibrations agree; an input's score depends on that input alone (order and batch do not matter)."""
    a = create_detector("scaleup").calibrate(inputs_for(CLEAN_VALUES))
    b = create_detector("scaleup").calibrate(inputs_for(list(reversed(CLEAN_VALUES))))
    x = torch.cat([constant_images(TEST_VALUES), stamp(constant_images(TEST_VALUES))])
    scores = a.scores(x)
    assert torch.equal(scores, b.scores(x)) and a.threshold == b.threshold
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    assert torch.equal(a.scores(x[perm]), scores[perm])
    assert torch.equal(torch.cat([a.scores(x[i:i + 1]) for i in range(5)]), scores[:5])
    big = x.repeat(30, 1, 1, 1)  # more inputs than one forward pass takes
    assert torch.equal(a.scores(big), scores.repeat(30))
    assert a.scores(x[:0]).shape == (0,)


def test_info_is_plain():
    import json
    screen = create_detector("scaleup", fpr=0.1).calibrate(inputs_for(CLEAN_VALUES))
    json.dumps(screen.info)
    assert screen.info["forward_passes_per_input"] == 6


@pytest.mark.parametrize("key, value", [
    ("scales", ()), ("scales", []), ("scales", (1, 3)), ("scales", (0.5,)), ("scales", (3, "5")),
    ("scales", (True, 3)), ("scales", (3, float("nan"))), ("scales", (3, float("inf"))), ("scales", 3),
    ("fpr", 1.0), ("fpr", -0.1), ("fpr", float("nan")), ("threshold", float("nan")), ("threshold", "0.5"),
    ("standardise", 1),
])
def test_bad_parameters(key, value):
    with pytest.raises(ParameterError) as error:
        create_detector("scaleup", **{key: value})
    assert error.value.owner == "scaleup" and error.value.param == key


def test_fpr_and_a_fixed_threshold_exclude_each_other():
    with pytest.raises(ParameterError, match="threshold"):
        create_detector("scaleup", threshold=0.8, fpr=0.05)
    assert create_detector("scaleup", fpr=0.0).fpr == 0.0
    assert create_detector("scaleup", scales=[1.5, 2]).scales == [1.5, 2]


def test_empty_clean_set():
    empty = inputs_for([])
    with pytest.raises(ValueError, match="clean"):
        create_detector("scaleup").calibrate(empty)
    screen = create_detector("scaleup", standardise=False).calibrate(empty)
    assert screen.scores(constant_images([200])).tolist() == [1.0]


def test_runs_on_a_registered_architecture():
    """A real network (cnn_small, 16x16): SPCs are shares of 5 factors, the clean statistics are per class."""
    from backdoor.models import create_model
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (24, 3, 16, 16), generator=g, dtype=torch.uint8)
    inputs = DefenseInputs(model=create_model("cnn_small", 3, seed=0), clean=Split(x, torch.arange(24) % 3),
                           num_classes=3, device=CPU, seed=0, training=TrainConfig(epochs=1),
                           retraining=TrainConfig(epochs=1), new_model=lambda: None, fit=lambda *a, **k: {})
    screen = create_detector("scaleup", standardise=False).calibrate(inputs)
    spc = screen.scores(x[:8])
    assert spc.shape == (8,) and all(round(5 * s) == pytest.approx(5 * s, abs=1e-6) for s in spc.tolist())
    standardised = create_detector("scaleup", fpr=0.1).calibrate(inputs)
    assert len(standardised.info["class_mean"]) == 3 and torch.isfinite(standardised.scores(x)).all()
