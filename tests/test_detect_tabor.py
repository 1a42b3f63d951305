"""TABOR: each regulariser against a hand computation on a small mask and pattern, and the whole objective
(R3 and R4 on) against a class-by-class, image-by-image computation; the anomaly score of the
smallest mask on known numbers; on tests/planted.py's corner model the reversed trigger of class 0 is a small
mask on the white 2x2 corner and the model is flagged with class 0 suspected, while the same model without its
corner detector is not flagged; parameter validation and determinism under the seed."""
import pytest
import torch

from backdoor._checks import ParameterError
from backdoor.defenses import DefenseInputs
from backdoor.detectors import create_detector
from backdoor.detectors.tabor import regularisers, smallest_trigger_score, smoothness
from backdoor.training import TrainConfig
from tests.planted import CPU, colour_data, planted_model

# The reference's 10 epochs assume thousands of images; the planted set has 48 (3 steps per epoch at batch 16),
# so the tests give the reversal 100 epochs (300 Adam steps), under a second on one core.
PARAMS = {"epochs": 100, "batch_size": 16}


def planted_inputs(backdoor: float = 3.0, seed: int = 0) -> DefenseInputs:
    model = planted_model()
    with torch.no_grad():
        model.net.backdoor.fill_(backdoor)
    training = TrainConfig(epochs=1, batch_size=16, lr=0.01, crop_padding=0, hflip=False)
    return DefenseInputs(model=model, clean=colour_data(48, seed=1), num_classes=3, device=CPU, seed=seed,
                         training=training, retraining=training, new_model=planted_model, fit=None)


def test_regularisers_on_a_known_mask_and_pattern():
    """Mask: a 2x2 block of ones in the bottom-right of a 3x3 image and 0.5 at the centre's left neighbour
    (row 1, col 0); pattern 0.5 on 3 channels, except 1 under the block (so that inside and outside differ).
    mask_r1 = |m|_1 + |m|_2^2 = 4.5 + 4.25. Outside the mask, u = (1 - m) p is 0.5 at the 4 zero pixels and 0.25
    at the half pixel, per channel: |u|_1 = 3 * 2.25, |u|_2^2 = 3 * (4 * 0.25 + 0.0625).
    s(m): vertical pairs (0,0)-(1,0) 0.25, (1,0)-(2,0) 0.25, (0,1)-(1,1) 1, (0,2)-(1,2) 1; horizontal
    (1,0)-(1,1) 0.25, (2,0)-(2,1) 1: 3.75. s(u) per channel: vertical (0,0)-(1,0) (0.25)^2, (1,0)-(2,0)
    (0.25)^2, (0,1)-(1,1) 0.25, (0,2)-(1,2) 0.25; horizontal (1,0)-(1,1) (0.25)^2, (2,0)-(2,1) 0.25: 0.9375."""
    mask = torch.zeros(1, 1, 3, 3)
    mask[0, 0, 1:, 1:] = 1.0
    mask[0, 0, 1, 0] = 0.5
    pattern = torch.full((1, 3, 3, 3), 0.5)
    pattern[..., 1:, 1:] = 1.0
    reg = regularisers(mask, pattern)
    assert reg["mask_r1"].item() == pytest.approx(4.5 + 4.25)
    assert reg["pattern_r1"].item() == pytest.approx(3 * 2.25 + 3 * 1.0625)
    assert reg["mask_r2"].item() == pytest.approx(3.75)
    assert reg["pattern_r2"].item() == pytest.approx(3 * 0.9375)


def test_smoothness_against_a_loop_over_neighbours():
    t = torch.rand(4, 2, 5, 6, generator=torch.Generator().manual_seed(0))
    expected = torch.zeros(4)
    for k in range(4):
        for c in range(2):
            for i in range(5):
                for j in range(6):
                    if i + 1 < 5:
                        expected[k] += (t[k, c, i + 1, j] - t[k, c, i, j]) ** 2
                    if j + 1 < 6:
                        expected[k] += (t[k, c, i, j + 1] - t[k, c, i, j]) ** 2
    assert torch.allclose(smoothness(t), expected, rtol=1e-5)


def test_objective_against_a_direct_computation_per_class_and_image():
    """Every term weighted (R3 and R4 on), on a small linear model: the batched loss of each class equals the
    one computed class by class and image by image from the formulas."""
    g = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(2 * 4 * 4, 3))
    with torch.no_grad():
        model[1].weight.copy_(torch.randn(3, 32, generator=g))
    xb, yb = torch.rand(5, 2, 4, 4, generator=g), torch.tensor([0, 1, 2, 1, 0])
    mask, pattern = torch.rand(3, 1, 4, 4, generator=g), torch.rand(3, 2, 4, 4, generator=g)
    w = {"cost": 0.3, "l_mask_r1": 0.05, "l_pattern_r1": 0.07, "l_mask_r2": 0.11, "l_pattern_r2": 0.13,
         "l_r3": 0.4, "l_r4": 0.6}
    loss, logits = create_detector("tabor", **w).objective(model, xb, yb, torch.arange(3), mask, pattern)
    assert logits.shape == (15, 3)
    ce = torch.nn.functional.cross_entropy
    for k in range(3):
        m, p = mask[k], pattern[k]
        u = (1 - m) * p
        stamped = torch.stack([(1 - m) * x + m * p for x in xb])
        misclass = sum(ce(model(s[None]), torch.tensor([k])) for s in stamped) / 5
        r3 = sum(ce(model(((1 - m) * x)[None]), yb[i:i + 1]) for i, x in enumerate(xb)) / 5
        r4 = ce(model((m * p)[None]), torch.tensor([k]))
        tv2 = lambda t: torch.diff(t, dim=-1).square().sum() + torch.diff(t, dim=-2).square().sum()  # noqa: E731
        expected = (misclass + w["cost"] * m.sum() + w["l_mask_r1"] * (m.sum() + m.square().sum())
                    + w["l_pattern_r1"] * (u.sum() + u.square().sum()) + w["l_mask_r2"] * tv2(m)
                    + w["l_pattern_r2"] * tv2(u) + w["l_r3"] * r3 + w["l_r4"] * r4)
        assert loss[k].item() == pytest.approx(expected.item(), rel=1e-5)


def test_score_is_the_anomaly_index_of_the_smallest_mask_below_the_median():
    # median 10.5, deviations 9.5, 0.5, 0.5, 1.5, 0: MAD 0.5; class 0's index 9.5 / (1.4826 * 0.5)
    suspect, score, index = smallest_trigger_score(torch.tensor([1.0, 10.0, 11.0, 12.0, 10.5]))
    assert suspect == 0 and score == pytest.approx(9.5 / (1.4826 * 0.5))
    assert index[3] == pytest.approx(1.5 / (1.4826 * 0.5))  # the largest mask is anomalous too, but never scores
    # a very large mask does not make the model suspicious: median 10.2, deviations 39.8, 0.2, 0, 0.2, 0.1, MAD
    # 0.2; the smallest mask (class 1) is 0.2 from the median
    suspect, score, _ = smallest_trigger_score(torch.tensor([50.0, 10.0, 10.2, 10.4, 10.1]))
    assert suspect == 1 and score == pytest.approx(0.2 / (1.4826 * 0.2))
    # all equal: nothing below the median, score 0
    assert smallest_trigger_score(torch.tensor([5.0, 5.0, 5.0]))[1] == 0.0


def test_reversed_trigger_of_the_planted_class_is_the_corner_and_the_model_is_flagged():
    """Class 0's logit fires on a white 2x2 bottom-right corner: its reversed mask covers about those 4 pixels
    (L1 ~ 4), with a white pattern there, and sends every clean image to class 0. Classes 1 and 2 need a
    colour change over most of the image (L1 ~ 40), so class 0's index is far above 2."""
    inputs = planted_inputs()
    detector = create_detector("tabor", **PARAMS)
    rev = detector.reverse(inputs.model, inputs.clean.x, inputs.clean.y, 3, CPU, seed=0)
    mask0 = rev["masks"][0, 0]
    assert rev["norms"][0] < 6 and rev["norms"][1:].min() > 25
    assert mask0[-2:, -2:].sum() > 0.9 * mask0.sum() and mask0[-2:, -2:].min() > 0.8
    assert rev["patterns"][0, :, -2:, -2:].min() > 0.8  # white
    assert rev["success"][0] == 1.0
    # every kept trigger succeeds (classes 1 and 2 by a large colour overlay): none is a leftover initialisation
    assert rev["reached"].all() and rev["success"].min() >= 0.99

    verdict = detector.inspect(planted_inputs())
    assert verdict.flagged is True and verdict.info["suspected_class"] == 0
    assert verdict.score > 10 and verdict.score == pytest.approx(verdict.info["anomaly_index"][0])
    assert verdict.info["attack_success"][0] == 1.0


def test_the_model_without_its_corner_detector_is_not_flagged():
    """Without the backdoor every class needs a colour change of most of the image. Class 0, with its lower
    bias, needs the largest mask, so the smallest mask is one of the symmetric classes 1 and 2, as far from
    the median (the other one) as the MAD: its index is 1 / 1.4826."""
    verdict = create_detector("tabor", **PARAMS).inspect(planted_inputs(backdoor=0.0))
    assert verdict.flagged is False
    assert verdict.info["suspected_class"] in (1, 2)
    assert min(verdict.info["mask_l1"]) > 25
    assert verdict.score == pytest.approx(1 / 1.4826)


def test_seeded():
    a = create_detector("tabor", epochs=5, batch_size=16).inspect(planted_inputs(seed=3))
    b = create_detector("tabor", epochs=5, batch_size=16).inspect(planted_inputs(seed=3))
    c = create_detector("tabor", epochs=5, batch_size=16).inspect(planted_inputs(seed=4))
    assert a.info == b.info and a.score == b.score
    assert a.info["mask_l1"] != c.info["mask_l1"]


@pytest.mark.parametrize("key, value", [("epochs", 0), ("epochs", 2.5), ("lr", 0.0), ("lr", float("nan")),
                                        ("cost", -1e-3), ("l_mask_r1", -1.0), ("l_pattern_r2", float("inf")),
                                        ("l_r3", -0.1), ("l_r4", "big"), ("batch_size", 0), ("threshold", 0.0),
                                        ("success_threshold", 1.5), ("max_batch", 0), ("epochs", True)])
def test_parameter_validation(key, value):
    with pytest.raises(ParameterError) as err:
        create_detector("tabor", **{key: value})
    assert err.value.owner == "tabor" and err.value.param == key
