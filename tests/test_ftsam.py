"""FT-SAM: one fine-tuning step equals the sharpness-aware update computed by hand (gradient of the smoothed loss,
perturbation rho * T^2 g / ||T g|| or rho * g / ||g||, gradient at the perturbed weights, SGD step from the
original weights); rho = 0 is plain fine-tuning; the model is repaired in place."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from backdoor._checks import ParameterError
from backdoor.data import Split
from backdoor.defenses import DefenseInputs, create_defense
from backdoor.defenses.ftsam import SharpnessAwareStep, SmoothedCrossEntropy
from backdoor.models import Classifier, LayerRoles
from backdoor.training import TrainConfig, fit

CPU = torch.device("cpu")
K = 3  # three classes: smoothing over the K - 1 other classes differs from PyTorch's over all K


def linear_model(seed: int = 0) -> Classifier:
    """A linear classifier on 3x2x2 images with seeded, non-zero weights (no normalisation: mean 0, std 1)."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 2 * 2, K))
    with torch.no_grad():
        net[1].weight.normal_(0, 1)
        net[1].bias.normal_(0, 1)
    return Classifier(net, (0.0,) * 3, (1.0,) * 3, LayerRoles(("0", "0", "0"), "0", "1"), arch="linear")


def split(n: int = 6) -> Split:
    g = torch.Generator().manual_seed(1)
    return Split(torch.randint(0, 256, (n, 3, 2, 2), generator=g, dtype=torch.uint8), torch.arange(n) % K)


def budget(**changes) -> TrainConfig:
    """One epoch of one full batch: one step. No augmentation, fp32."""
    config = TrainConfig(epochs=1, batch_size=6, lr=0.1, momentum=0.9, weight_decay=5e-4, schedule="constant",
                         crop_padding=0, hflip=False, amp=False)
    return config.with_(**changes)


def inputs_for(model, clean, config, calls=None):
    def recording_fit(m, data, cfg, **kw):
        if calls is not None:
            calls.append({"model": m, "split": data, "config": cfg, **kw})
        return fit(m, data, cfg, device=CPU, **kw)

    return DefenseInputs(model=model, clean=clean, num_classes=K, device=CPU, seed=3, training=config,
                         retraining=config, new_model=linear_model, fit=recording_fit)


# --- the computation by hand, independent of the module -------------------------------------------------------

def smoothed_targets(y: torch.Tensor, smoothing: float) -> torch.Tensor:
    q = torch.full((len(y), K), smoothing / (K - 1), dtype=torch.float64)
    q[torch.arange(len(y)), y] = 1 - smoothing
    return q


def hand_loss(weight, bias, x, y, smoothing):
    logits = x @ weight.T + bias
    return -(smoothed_targets(y, smoothing) * torch.log_softmax(logits, 1)).sum(1).mean()


def hand_grad(weight, bias, x, y, smoothing):
    weight, bias = weight.clone().requires_grad_(), bias.clone().requires_grad_()
    return torch.autograd.grad(hand_loss(weight, bias, x, y, smoothing), (weight, bias))


def hand_step(model, clean, *, rho, adaptive, smoothing, lr=0.1, wd=5e-4):
    """(new weight, new bias, perturbation) after one SAM step of SGD (first step: momentum buffer = gradient)."""
    w = model.net[1].weight.detach().double()
    b = model.net[1].bias.detach().double()
    x = clean.x.double().div(255).flatten(1)
    gw, gb = hand_grad(w, b, x, clean.y, smoothing)
    if adaptive:
        norm = math.sqrt(float((w.abs() * gw).pow(2).sum() + (b.abs() * gb).pow(2).sum()))
        ew, eb = rho * w * w * gw / norm, rho * b * b * gb / norm
    else:
        norm = math.sqrt(float(gw.pow(2).sum() + gb.pow(2).sum()))
        ew, eb = rho * gw / norm, rho * gb / norm
    gw2, gb2 = hand_grad(w + ew, b + eb, x, clean.y, smoothing)
    return w - lr * (gw2 + wd * w), b - lr * (gb2 + wd * b), (ew, eb)


# --- tests ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("adaptive, rho", [(True, 2.0), (False, 0.5)])
def test_one_step_is_the_hand_computed_sharpness_aware_update(adaptive, rho):
    clean, model = split(), linear_model()
    want_w, want_b, _ = hand_step(model, clean, rho=rho, adaptive=adaptive, smoothing=0.1)
    plain_w, _, _ = hand_step(model, clean, rho=0.0, adaptive=adaptive, smoothing=0.1)
    assert (want_w - plain_w).abs().max() > 1e-3, "the test would not tell SAM from plain fine-tuning"
    create_defense("ftsam", rho=rho, adaptive=adaptive).run(inputs_for(model, clean, budget()))
    torch.testing.assert_close(model.net[1].weight.detach().double(), want_w, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(model.net[1].bias.detach().double(), want_b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("adaptive", [True, False])
def test_the_second_gradient_is_taken_at_w_plus_e_and_the_step_starts_from_w(adaptive):
    """Calls the step directly: the weights seen by the second pass are w + e with e uphill, of norm rho
    (adaptive: ||e / |w| || = rho); the optimizer then steps from w with the second gradient (lr 1, no momentum)."""
    clean, model = split(), linear_model()
    layer, rho = model.net[1], 0.3
    x = clean.x.float().div(255)
    seen = []
    loss_fn = SmoothedCrossEntropy(0.1)

    def closure():
        seen.append((layer.weight.detach().clone(), layer.bias.detach().clone()))
        return loss_fn(model, x, clean.y)

    w0, b0 = layer.weight.detach().clone(), layer.bias.detach().clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    loss = SharpnessAwareStep(rho, adaptive)(model, optimizer, closure)
    (first, second) = seen
    assert torch.equal(first[0], w0) and torch.equal(first[1], b0)
    ew, eb = second[0].double() - w0.double(), second[1].double() - b0.double()
    gw, gb = hand_grad(w0.double(), b0.double(), x.double().flatten(1), clean.y, 0.1)
    tw, tb = (w0.double().abs(), b0.double().abs()) if adaptive else (1.0, 1.0)
    norm = math.sqrt(float((tw * gw).pow(2).sum() + (tb * gb).pow(2).sum()))
    torch.testing.assert_close(ew, rho * tw * tw * gw / norm, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(eb, rho * tb * tb * gb / norm, atol=1e-6, rtol=1e-4)
    if adaptive:
        assert math.isclose(math.sqrt(float((ew / tw).pow(2).sum() + (eb / tb).pow(2).sum())), rho, rel_tol=1e-4)
    else:
        assert math.isclose(math.sqrt(float(ew.pow(2).sum() + eb.pow(2).sum())), rho, rel_tol=1e-4)
    assert float((ew * gw).sum() + (eb * gb).sum()) > 0, "the perturbation must go uphill"
    gw2, gb2 = hand_grad(second[0].double(), second[1].double(), x.double().flatten(1), clean.y, 0.1)
    torch.testing.assert_close(layer.weight.detach().double(), w0.double() - gw2, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(layer.bias.detach().double(), b0.double() - gb2, atol=1e-6, rtol=1e-5)
    at_w = hand_loss(w0.double(), b0.double(), x.double().flatten(1), clean.y, 0.1)
    assert math.isclose(float(loss.detach()), float(at_w), rel_tol=1e-5), "the step returns the loss at w"


def test_label_smoothing_keeps_1_minus_eps_on_the_label_and_spreads_eps_over_the_others():
    model, clean = linear_model(), split()
    model.requires_grad_(False)
    x = clean.x.float().div(255)
    w, b = model.net[1].weight.detach().double(), model.net[1].bias.detach().double()
    for eps in (0.0, 0.1, 0.5):
        got = float(SmoothedCrossEntropy(eps)(model, x, clean.y))
        assert math.isclose(got, float(hand_loss(w, b, x.double().flatten(1), clean.y, eps)), rel_tol=1e-5)
    logits = model(x)
    # PyTorch spreads its label_smoothing over all K classes: the same targets at eps * K / (K - 1).
    assert math.isclose(float(SmoothedCrossEntropy(0.1)(model, x, clean.y)),
                        float(F.cross_entropy(logits, clean.y, label_smoothing=0.1 * K / (K - 1))), rel_tol=1e-6)
    assert not math.isclose(float(SmoothedCrossEntropy(0.1)(model, x, clean.y)),
                            float(F.cross_entropy(logits, clean.y)), rel_tol=1e-3)


def test_rho_zero_is_plain_fine_tuning_on_the_smoothed_loss():
    """Three epochs of batch 2 (momentum, weight decay, cosine): rho = 0 gives the weights of ``fit``'s plain
    step on the smoothed loss."""
    clean = split()
    config = budget(epochs=3, batch_size=2, schedule="cosine")
    sam_model, plain_model = linear_model(), linear_model()
    create_defense("ftsam", rho=0.0).run(inputs_for(sam_model, clean, config))

    def smoothed(model, x, y):
        q = smoothed_targets(y, 0.1).float()
        return -(q * torch.log_softmax(model(x), 1)).sum(1).mean()

    fit(plain_model, clean, config, device=CPU, seed=3, loss_fn=smoothed)
    assert not torch.equal(plain_model.net[1].weight, linear_model().net[1].weight)
    for got, want in zip(sam_model.parameters(), plain_model.parameters()):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_batch_norm_statistics_come_from_the_first_pass_only():
    """Batch norm on the input: its batch mean does not depend on the weights, so one step (momentum 0.1)
    leaves running_mean = 0.1 * the batch's mean; a second update would give 0.19 * it."""
    clean = split()
    net = nn.Sequential(nn.BatchNorm2d(3), nn.Flatten(), nn.Linear(12, K))
    model = Classifier(net, (0.0,) * 3, (1.0,) * 3, LayerRoles(("0", "0", "0"), "0", "2"), arch="bn")
    create_defense("ftsam").run(inputs_for(model, clean, budget()))
    batch_mean = clean.x.float().div(255).mean((0, 2, 3))
    torch.testing.assert_close(net[0].running_mean, 0.1 * batch_mean)
    assert int(net[0].num_batches_tracked) == 1


def test_fine_tunes_the_model_in_place_with_its_overrides():
    clean, calls = split(), []
    model = linear_model()
    before = [p.detach().clone() for p in model.parameters()]
    inputs = inputs_for(model, clean, budget(epochs=4), calls)
    outcome = create_defense("ftsam", epochs=2, lr=0.05).run(inputs)
    assert outcome.model is model
    assert all(not torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert outcome.info["epochs"] == 2 and math.isfinite(outcome.info["final_loss"])
    create_defense("ftsam").run(inputs_for(linear_model(), clean, budget(epochs=4), calls))
    (first, second) = calls
    assert first["config"] == inputs.training.with_(epochs=2, lr=0.05)
    assert second["config"] == inputs.training
    assert first["model"] is model and first["split"] is clean and first["seed"] == 3
    assert first["step"] == SharpnessAwareStep(2.0, True) and first["loss_fn"] == SmoothedCrossEntropy(0.1)


def test_defaults_are_the_reference_cifar10_config():
    defense = create_defense("ftsam")
    assert defense.params() == {"rho": 2.0, "adaptive": True, "label_smoothing": 0.1, "epochs": None, "lr": None}


@pytest.mark.parametrize("params", [{"rho": -0.1}, {"rho": float("nan")}, {"rho": True},
                                    {"label_smoothing": -0.1}, {"label_smoothing": 0.6}, {"adaptive": 1},
                                    {"epochs": 0}, {"epochs": 1.5}, {"lr": 0}, {"lr": -0.1}])
def test_bad_parameters_are_refused(params):
    with pytest.raises(ParameterError, match="ftsam"):
        create_defense("ftsam", **params)
