"""IBD-PSC: exactly the last batch-norm layers are amplified (weight and bias, on a copy), the start layer is the
first whose clean error exceeds xi, PSC equals a direct mean over independently amplified copies of the
confidence in the ORIGINAL prediction, a planted BN backdoor's triggered inputs score above every clean one and
are flagged at T, and a model without batch norm is not applicable."""
import copy

import pytest
import torch
from torch import nn

from backdoor._checks import ParameterError
from backdoor.data import Split
from backdoor.defenses.base import DefenseInputs, NotApplicable
from backdoor.detectors import DETECTORS, create_detector
from backdoor.detectors.ibd_psc import _Amplifier, amplified_counts, select_start
from backdoor.models import Classifier, LayerRoles, create_model
from backdoor.training import TrainConfig
from tests.planted import add_trigger, colour_data, planted_model

CPU = torch.device("cpu")


def inputs_for(model: nn.Module, clean: Split, num_classes: int) -> DefenseInputs:
    def no_fit(*args, **kwargs):
        raise AssertionError("IBD-PSC trains nothing")

    return DefenseInputs(model=model, clean=clean, num_classes=num_classes, device=CPU, seed=3,
                         training=TrainConfig(epochs=1), retraining=TrainConfig(epochs=1),
                         new_model=lambda: create_model("cnn_small", num_classes, seed=0), fit=no_fit)


class PlantedBN(nn.Module):
    """features [m0, m1, m2, d, 0] (channel means; d = mean of the bottom-right 2x2 corner) -> bn1 (standardises
    them) -> ReLU (h: a clean image's own colour ~1.3, the others and a clean corner 0) -> bn2 (identity) -> bn3 (identity on 0..3; channel 4: gamma 0, beta 1, a constant 1) -> head.
    Logits: 4 * h_j for the colour classes, + 16 * h_d for class 0 (the backdoor: the white corner gives
    h_d = 2.25, clean corners <= ~0), and class 3 (no data) = 100 * (bn3 channel 4 - 1): 0 as built, 50 once
    bn3 is amplified by 1.5. Amplifying the last c layers multiplies the class evidence by 1.5^c, so a clean
    image's own logit (~5) stays far below 50 for c <= 3 and its prediction collapses to class 3, while a
    triggered image's class-0 logit (~34) is 77 or more: PSC ~0 for clean images, ~1 for triggered ones."""

    def __init__(self):
        super().__init__()
        self.bn1, self.bn2, self.bn3 = nn.BatchNorm1d(5), nn.BatchNorm1d(5), nn.BatchNorm1d(5)
        self.head = nn.Linear(5, 4)
        with torch.no_grad():
            self.bn1.running_mean.copy_(torch.tensor([0.37, 0.37, 0.37, 0.55, 0.0]))
            self.bn1.running_var.copy_(torch.tensor([0.04, 0.04, 0.04, 0.04, 1.0]))
            self.bn3.weight[4], self.bn3.bias[4] = 0.0, 1.0
            self.head.weight.zero_()
            self.head.bias.zero_()
            for j in range(3):
                self.head.weight[j, j] = 4.0
            self.head.weight[0, 3] = 16.0
            self.head.weight[3, 4], self.head.bias[3] = 100.0, -100.0

    def forward(self, x):
        corner = x[..., -2:, -2:].mean((1, 2, 3))
        f = torch.cat([x.mean((2, 3)), corner[:, None], torch.zeros_like(corner)[:, None]], 1)
        return self.head(self.bn3(self.bn2(torch.relu(self.bn1(f)))))


def planted_bn() -> Classifier:
    return Classifier(PlantedBN(), (0.0,) * 3, (1.0,) * 3, LayerRoles(("bn1", "bn2", "bn3"), "bn3", "head"),
                      arch="planted_bn").eval()


def randomised_cnn(seed: int = 0) -> Classifier:
    """cnn_small (3 BatchNorm2d) with random BN statistics and affine parameters, so amplification matters."""
    model = create_model("cnn_small", 4, seed=seed, width=4, hidden=16)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(0.3 * torch.randn(c, generator=g))
                m.running_var.copy_(0.5 + torch.rand(c, generator=g))
                m.weight.copy_(0.5 + torch.rand(c, generator=g))
                m.bias.copy_(0.5 * torch.randn(c, generator=g))
    return model.eval()


class RandomBNNet(nn.Module):
    """[channel means, corner mean] -> three (Linear -> BatchNorm1d -> ReLU) -> Linear, every weight, bias and BN
    statistic drawn from ``seed`` (seed 4: its predictions on colour data spread over classes and flip more as
    more of its last BN layers are amplified)."""

    def __init__(self, seed: int = 4):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.body = nn.Sequential(*[layer for cin in (4, 8, 8) for layer in (nn.Linear(cin, 8), nn.BatchNorm1d(8),
                                                                              nn.ReLU())])
        self.head = nn.Linear(8, 4)
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, nn.Linear):
                    m.weight.copy_(torch.randn(m.weight.shape, generator=g))
                    m.bias.copy_(0.5 * torch.randn(m.bias.shape, generator=g))
                if isinstance(m, nn.BatchNorm1d):
                    m.running_mean.copy_(torch.randn(8, generator=g))
                    m.running_var.copy_(0.5 + torch.rand(8, generator=g))
                    m.weight.copy_(0.5 + torch.rand(8, generator=g))
                    m.bias.copy_(0.5 * torch.randn(8, generator=g))

    def forward(self, x):
        return self.head(self.body(torch.cat([x.mean((2, 3)), x[..., -2:, -2:].mean((1, 2, 3))[:, None]], 1)))


def random_bn_net() -> Classifier:
    return Classifier(RandomBNNet(), (0.5,) * 3, (0.25,) * 3, LayerRoles(("body",) * 3, "body", "head"),
                      arch="random_bn").eval()


def bn_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def amplify_last(model: nn.Module, count: int, scale: float) -> nn.Module:
    """Independent amplification: a deep copy whose last ``count`` BN layers have weight and bias times scale."""
    out = copy.deepcopy(model).eval()
    with torch.no_grad():
        for m in bn_modules(out)[len(bn_modules(out)) - count:]:
            m.weight.mul_(scale)
            m.bias.mul_(scale)
    return out


def probs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x.float().div(255)).softmax(1)


def test_amplifies_exactly_the_last_layers_weight_and_bias_on_a_copy():
    model = randomised_cnn()
    before = copy.deepcopy(model.state_dict())
    amp = _Amplifier(model, 1.5, CPU)
    originals = [(m.weight.clone(), m.bias.clone()) for m in bn_modules(model)]
    for count in range(4):
        amp.set(count)
        for index, (m, (w, b)) in enumerate(zip(bn_modules(amp.model), originals)):
            factor = 1.5 if index >= 3 - count else 1.0
            torch.testing.assert_close(m.weight, w * factor, rtol=0, atol=0)
            torch.testing.assert_close(m.bias, b * factor, rtol=0, atol=0)
            # running statistics are never scaled
            assert torch.equal(m.running_mean, bn_modules(model)[index].running_mean)
    amp.set(0)
    for m, (w, b) in zip(bn_modules(amp.model), originals):
        assert torch.equal(m.weight, w) and torch.equal(m.bias, b)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_select_start_is_the_first_count_whose_error_exceeds_xi():
    rates = {1: 0.1, 2: 0.6, 3: 0.61, 4: 0.9}
    tried = []

    def error_rate(count):
        tried.append(count)
        return rates[count]

    assert select_start(error_rate, 5, 0.6) == (3, True, [0.1, 0.6, 0.61])  # 0.6 is not above 0.6
    assert tried == [1, 2, 3]  # stops at the first
    assert select_start(rates.__getitem__, 5, 0.05) == (1, True, [0.1])
    # none above xi: k = L - 1, every amplified model then amplifies all L layers
    assert select_start(rates.__getitem__, 5, 0.95) == (4, False, [0.1, 0.6, 0.61, 0.9])
    assert select_start(rates.__getitem__, 1, 0.5) == (0, False, [])
    assert amplified_counts(1, 5, 3) == [2, 3, 3, 3, 3]
    assert amplified_counts(2, 3, 10) == [3, 4, 5]
    assert amplified_counts(4, 2, 5) == [5, 5]


def test_psc_equals_a_direct_mean_over_independently_amplified_copies():
    model = random_bn_net()
    x = colour_data(48, seed=0).x
    original = probs(model, x).argmax(1)
    clean = Split(x[:32], original[:32])  # labels = the model's own predictions: its clean error is 0
    scale = 1.5
    rates = [float((probs(amplify_last(model, c, scale), clean.x).argmax(1) != clean.y).float().mean())
             for c in (1, 2)]
    assert 0 < rates[0] < rates[1], rates  # the case the test needs: more amplified layers flip more predictions
    before = copy.deepcopy(model.state_dict())
    # xi between the two rates: the rule must choose k = 2, every model then amplifies all 3 layers
    screen = create_detector("ibd_psc", n=3, xi=(rates[0] + rates[1]) / 2).calibrate(inputs_for(model, clean, 4))
    assert screen.info["start"] == 2 and screen.info["start_found"]
    assert screen.info["clean_error_rates"] == pytest.approx(rates)
    assert screen.info["amplified_counts"] == [3, 3, 3]
    # xi below the first rate: k = 1, the models amplify the last 2, 3, 3 layers (two distinct models)
    screen = create_detector("ibd_psc", n=3, xi=rates[0] / 2).calibrate(inputs_for(model, clean, 4))
    assert screen.info["start"] == 1 and screen.info["amplified_counts"] == [2, 3, 3]
    amplified = [probs(amplify_last(model, c, scale), x) for c in (2, 3, 3)]
    rows = torch.arange(len(x))
    direct = torch.stack([p[rows, original] for p in amplified]).mean(0)
    assert not torch.allclose(amplified[0], amplified[1], atol=1e-3)  # the two models differ
    assert (amplified[0].argmax(1) != original).any()  # the amplified label is not always the original one
    scores = screen.scores(x)
    assert scores.dtype == torch.float32 and scores.shape == (48,)
    torch.testing.assert_close(scores, direct.float(), rtol=1e-5, atol=1e-6)
    assert screen.threshold == 0.9
    assert torch.equal(screen.flag(x), scores > 0.9)
    # per-input: a permutation of the inputs permutes the scores; the inspected model is untouched
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(screen.scores(x[perm]), scores[perm], rtol=1e-5, atol=1e-6)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_planted_bn_backdoor_triggered_inputs_score_above_clean_and_are_flagged():
    model = planted_bn()
    clean, test = colour_data(48, seed=0), colour_data(60, seed=1)
    detector = create_detector("ibd_psc")
    screen = detector.calibrate(inputs_for(model, clean, 4))
    # bn3 alone (c = 1) already sends every clean image to class 3: k = 1, models amplify 2, 3, 3, 3, 3 layers
    assert screen.info["start"] == 1 and screen.info["start_found"]
    assert screen.info["clean_error_rates"] == [1.0]
    assert screen.info["amplified_counts"] == [2, 3, 3, 3, 3]
    triggered = add_trigger(test.x)
    assert (probs(model, test.x).argmax(1) == test.y).all()  # the original model is accurate
    assert (probs(model, triggered).argmax(1) == 0).all()  # and backdoored
    s_clean, s_trig = screen.scores(test.x), screen.scores(triggered)
    assert s_trig.min() > s_clean.max()
    assert s_trig.min() > 0.99 and s_clean.max() < 0.01
    assert screen.flag(triggered).all() and not screen.flag(test.x).any()
    # deterministic: a second calibration scores the same
    again = detector.calibrate(inputs_for(model, clean, 4))
    assert torch.equal(again.scores(test.x), s_clean) and again.info == screen.info
    assert screen.scores(test.x[:0]).shape == (0,)


def test_no_batch_norm_is_not_applicable():
    clean = colour_data(12, seed=0)
    with pytest.raises(NotApplicable, match="batch-norm"):
        create_detector("ibd_psc").calibrate(inputs_for(planted_model(), clean, 3))
    no_affine = planted_bn()
    for name in ("bn1", "bn2", "bn3"):
        setattr(no_affine.net, name, nn.BatchNorm1d(5, affine=False).eval())
    with pytest.raises(NotApplicable):
        create_detector("ibd_psc").calibrate(inputs_for(no_affine, clean, 4))


@pytest.mark.parametrize("key, value", [("n", 0), ("n", 1.5), ("n", True), ("xi", 0), ("xi", 1.0), ("xi", -0.1),
                                        ("T", 0.0), ("T", 1), ("T", float("nan")), ("scale", 1), ("scale", 1.0),
                                        ("scale", 0.5), ("scale", float("inf"))])
def test_bad_parameters(key, value):
    with pytest.raises(ParameterError, match=f"ibd_psc: {key}: "):
        create_detector("ibd_psc", **{key: value})


def test_registered_with_the_reference_defaults():
    cls = DETECTORS.get("ibd_psc")
    assert cls.task == "input" and cls.order == 40 and cls.title == "IBD-PSC"
    detector = create_detector("ibd_psc")
    assert detector.params() == {"n": 5, "xi": 0.6, "T": 0.9, "scale": 1.5}
    assert set(cls.parameters) == set(cls.param_names())
    create_detector("ibd_psc", n=1, xi=0.01, T=0.99, scale=1.01)  # the edges inside the ranges are allowed
