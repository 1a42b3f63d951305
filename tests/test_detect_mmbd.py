"""MM-BD (backdoor/detectors/mmbd.py): known answers for the maximum margin statistic, the gamma order-statistic
test against scipy directly, the planted corner backdoor, and that the detector never reads the clean set."""
import json
import math

import numpy as np
import pytest
import torch
from scipy import stats as scipy_stats
from torch import nn

from backdoor._checks import ParameterError
from backdoor.defenses.base import DefenseInputs
from backdoor.detectors import DETECTORS, create_detector
from backdoor.detectors.base import ModelDetector, ModelVerdict
from backdoor.detectors.mmbd import gamma_test, margins, max_margin_statistics
from backdoor.training import TrainConfig
from tests.planted import planted_model

CPU = torch.device("cpu")


class BlockLinear(nn.Module):
    """logit_k = w_k . x[block k] + b_k on 1x4x4 images: class k reads only its own four pixels (row k)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor):
        super().__init__()
        self.weight, self.bias = nn.Parameter(weight.clone()), nn.Parameter(bias.clone())  # [4, 4], [4]

    def forward(self, x):
        return (x[:, 0] * self.weight).sum(2) + self.bias  # row k of the image times row k of the weights


def analytic_max_margin(weight: torch.Tensor, bias: torch.Tensor) -> list[float]:
    """The margin is separable over the classes' disjoint blocks: class k's own pixels go to 1 where its weight
    is positive, every other class's pixels to 1 where its weight is negative (its smallest logit), so
    r_k = b_k + sum relu(w_k) - max_{j != k} (b_j + sum min(w_j, 0)): the maximum over the box, at a corner."""
    best = (bias + weight.clamp(min=0).sum(1)).double()
    worst = (bias + weight.clamp(max=0).sum(1)).double()
    return [float(best[k] - torch.cat([worst[:k], worst[k + 1:]]).max()) for k in range(len(bias))]


def block_weights(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(4, 4, generator=g), 0.1 * torch.randn(4, generator=g)


def inputs_for(model, num_classes, image_shape, seed=0, clean=None):
    clean = clean if clean is not None else _empty_split(image_shape)
    training = TrainConfig(epochs=1)
    return DefenseInputs(model=model, clean=clean, num_classes=num_classes, device=CPU, seed=seed, training=training,
                         retraining=training, new_model=lambda: None, fit=lambda *a, **k: {})


def _empty_split(image_shape):
    from backdoor.data import Split
    return Split(torch.zeros(0, *image_shape, dtype=torch.uint8), torch.zeros(0, dtype=torch.long))


class ShapeOnly:
    """Stands for the images of the empty clean set: only ``shape`` may be read."""

    def __init__(self, shape):
        self.shape = torch.Size(shape)

    def __getattr__(self, name):
        raise AssertionError(f"the detector read clean.x.{name}")

    def __getitem__(self, item):
        raise AssertionError("the detector indexed clean.x")

    def __len__(self):
        raise AssertionError("the detector took len(clean.x)")

    def __iter__(self):
        raise AssertionError("the detector iterated over clean.x")


class UnreadableClean:
    """A clean set whose images expose their shape only, and whose labels and length cannot be read."""

    def __init__(self, image_shape):
        self.x = ShapeOnly((0, *image_shape))

    @property
    def y(self):
        raise AssertionError("the detector read clean.y")

    def __len__(self):
        raise AssertionError("the detector took len(clean)")

    def __getattr__(self, name):
        raise AssertionError(f"the detector read clean.{name}")


def test_margin_is_own_logit_minus_the_runner_up():
    logits = torch.tensor([[3.0, 1.0, 2.5], [0.0, 4.0, -1.0], [5.0, 5.0, 1.0]])
    assert margins(logits, torch.tensor([0, 2, 1])).tolist() == [0.5, -5.0, 0.0]


@pytest.mark.parametrize("seed", [0, 1])
def test_statistic_of_a_linear_model_is_its_analytic_maximum_over_the_box(seed):
    """Gradient ascent from random starts with clamping reaches the corner that maximises the margin exactly."""
    weight, bias = block_weights(seed)
    found = max_margin_statistics(BlockLinear(weight, bias), 4, (1, 4, 4), device=CPU, seed=seed, num_starts=5,
                                  steps=200, lr=0.5)
    assert found["statistics"].tolist() == pytest.approx(analytic_max_margin(weight, bias), abs=1e-5)
    assert found["images"].min() >= 0 and found["images"].max() <= 1
    assert max(found["steps_run"].tolist()) < 200  # every class stopped early, at its corner


def test_planted_statistics_are_their_analytic_maxima():
    """Planted model (tests/planted.py): classes 1 and 2 reach 10 (own channel white, runner-up class 2 or 1 at
    0); class 0 whitens its channel and the 2x2 corner in every channel: 10 - 0.28 + 3 softplus(10 (1 - 0.6))
    minus the other channels' logit, 10 * 4/64."""
    found = max_margin_statistics(planted_model(), 3, (3, 8, 8), device=CPU, seed=0, num_starts=4, steps=300,
                                  lr=0.1)
    class0 = 10 - 0.28 + 3 * math.log1p(math.exp(4.0)) - 10 * 4 / 64
    assert found["statistics"].tolist() == pytest.approx([class0, 10.0, 10.0], abs=1e-3)


def test_gamma_test_matches_scipy_on_given_statistics():
    """p = 1 - F(max) ** K, F the gamma fitted (shape, loc, scale) to the statistics without the maximum."""
    inflated = [1.1, 0.9, 1.3, 1.0, 1.2, 0.95, 1.05, 1.15, 0.85, 5.0]
    iid = np.random.default_rng(5).gamma(4.0, 1.0, size=10).tolist()
    for stats in (inflated, iid, [2.0, 2.5, 1.5, 2.2, 1.9, 3.1]):
        r = np.array(stats)
        k = int(np.argmax(r))
        shape, loc, scale = scipy_stats.gamma.fit(np.delete(r, k))
        expected = 1 - scipy_stats.gamma.cdf(r[k], shape, loc=loc, scale=scale) ** len(r)
        test = gamma_test(stats)
        assert test["suspected"] == k
        assert test["p"] == pytest.approx(expected, rel=1e-6, abs=1e-12)
        assert test["gamma"] == pytest.approx([shape, loc, scale])
    assert gamma_test(inflated)["p"] < 0.05 and gamma_test(inflated)["suspected"] == 9
    assert gamma_test(iid)["p"] > 0.05


def test_iid_statistics_are_flagged_by_a_minority():
    """Under the null (ten iid gamma statistics) most draws are not flagged. The reference's test is
    anti-conservative, not at level alpha: the three-parameter fit to the nine smallest, the maximum left out,
    flags 10 of these 40 draws (20-40% at K = 10 over 200 draws; see the module docstring)."""
    rng = np.random.default_rng(0)
    ps = [gamma_test(rng.gamma(5.0, 1.0, size=10).tolist())["p"] for _ in range(40)]
    assert sum(p <= 0.05 for p in ps) == 10
    assert np.median(ps) > 0.1


def test_p_underflow_keeps_a_finite_ranking_score():
    stats = [1.0, 1.1, 0.9, 1.05, 0.95, 1.02, 0.98, 1.01, 0.99, 1e4]
    test = gamma_test(stats)
    assert test["p"] == 0.0 and math.isfinite(test["log10_p"]) and test["log10_p"] < -300
    assert gamma_test([1.0, 1.0, 1.0, 2.0])["null_fit"] == "degenerate"
    assert gamma_test([1.0, 1.0, 1.0, 2.0])["p"] == 0.0
    assert gamma_test([1.0, 1.0, 1.0, 1.0])["p"] == 1.0


def test_planted_corner_model_is_flagged_with_class_0_suspected():
    detector = create_detector("mmbd", num_starts=4, steps=300, lr=0.1)
    verdict = detector.inspect(inputs_for(planted_model(), 3, (3, 8, 8)))
    assert isinstance(verdict, ModelVerdict)
    assert verdict.flagged and verdict.info["suspected_class"] == 0
    assert verdict.info["p"] <= 0.05 and verdict.score >= -math.log10(0.05)
    json.dumps(verdict.info, allow_nan=False)


def test_linear_model_with_an_inflated_class_is_flagged_and_a_plain_one_is_not():
    """Ten block-linear classes (1x10x4 images) with iid weights: no class stands out, not flagged; the same
    model with class 6's weights tripled: class 6's margin is an outlier, flagged and suspected."""
    g = torch.Generator().manual_seed(5)
    weight, bias = torch.rand(10, 4, generator=g) + 0.5, torch.zeros(10)
    detector = create_detector("mmbd", num_starts=3, steps=200, lr=0.5)
    plain = detector.inspect(inputs_for(BlockLinear(weight, bias), 10, (1, 10, 4)))
    weight[6] *= 3
    inflated = detector.inspect(inputs_for(BlockLinear(weight, bias), 10, (1, 10, 4)))
    assert not plain.flagged and plain.info["p"] > 0.05
    assert inflated.flagged and inflated.info["suspected_class"] == 6
    assert inflated.score > plain.score


def test_never_reads_the_clean_set():
    """Data-free: only the image shape of the (empty) clean set is read, never its images, labels or length."""
    detector = create_detector("mmbd", num_starts=4, steps=300, lr=0.1)
    assert detector.data_free and isinstance(detector, ModelDetector)
    verdict = detector.inspect(inputs_for(planted_model(), 3, (3, 8, 8), clean=UnreadableClean((3, 8, 8))))
    assert verdict.flagged and verdict.info["suspected_class"] == 0


def test_deterministic_under_the_seed():
    weight, bias = block_weights(0)
    detector = create_detector("mmbd", num_starts=3, steps=5, lr=0.01)
    runs = [detector.inspect(inputs_for(BlockLinear(weight, bias), 4, (1, 4, 4), seed=s)).info["statistics"]
            for s in (7, 7, 8)]
    assert runs[0] == runs[1] and runs[0] != runs[2]


def test_registered_metadata():
    cls = DETECTORS.get("mmbd")
    assert cls.task == "model" and cls.data_free and cls.order == 230 and cls.title == "MM-BD"
    assert set(cls.parameters) == set(cls.param_names())
    assert create_detector("mmbd").params() == {"num_starts": 30, "steps": 300, "lr": 1e-2, "tolerance": 1e-5,
                                                 "alpha": 0.05, "max_batch": 2048}


@pytest.mark.parametrize("key, value", [("num_starts", 0), ("steps", 0), ("steps", 2.5), ("lr", 0.0),
                                        ("lr", -1.0), ("tolerance", -1e-3), ("alpha", 0.0), ("alpha", 1.0),
                                        ("alpha", float("nan")), ("max_batch", 0), ("num_starts", True)])
def test_bad_parameters_are_refused(key, value):
    with pytest.raises(ParameterError) as error:
        create_detector("mmbd", **{key: value})
    assert error.value.owner == "mmbd" and error.value.param == key


def test_needs_three_classes():
    weight, bias = block_weights(0)
    with pytest.raises(ValueError, match="at least 3 classes"):
        create_detector("mmbd", steps=1).inspect(inputs_for(BlockLinear(weight[:2], bias[:2]), 2, (1, 4, 4)))
