"""SAU: one PGD step on linear models equals the signed-gradient step computed by hand (cross-entropy and JS
gradients written out for softmax), projected on the L-inf bound and on [0, 1]; the PGD objective and the
shared unlearning loss equal hand computations on given logits (same wrong class, different classes, unmoved
predictions); one defense step moves the model by minus the gradient of the paper's total loss computed
independently; a planted corner backdoor is unlearned with clean accuracy kept (the same Adam on the clean loss
alone keeps it); parameters are validated."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from backdoor.data import Split
from backdoor.defenses import DefenseInputs, create_defense
from backdoor.defenses.sau import pgd_objective, shared_pgd, shared_unlearning_loss
from backdoor.models import Classifier, LayerRoles, create_model, roles
from backdoor.training import TrainConfig

from planted import accuracy_and_asr, colour_data, planted_model

CPU = torch.device("cpu")


def linear_model(weight: torch.Tensor) -> Classifier:
    """A linear classifier on raw [0, 1] pixels (normalisation mean 0, std 1), no bias."""
    net = nn.Sequential(nn.Flatten(), nn.Linear(weight.shape[1], weight.shape[0], bias=False))
    with torch.no_grad():
        net[1].weight.copy_(weight)
    return Classifier(net, (0.0,) * 2, (1.0,) * 2, LayerRoles(("0", "0", "0"), "0", "1"), arch="linear")


def two_linear_models(seed=0):
    g = torch.Generator().manual_seed(seed)
    w, w_ref = 3 * torch.randn(3, 2 * 2 * 2, generator=g), 3 * torch.randn(3, 2 * 2 * 2, generator=g)
    x = 0.3 + 0.4 * torch.rand(12, 2, 2, 2, generator=g)
    y = torch.arange(12) % 3
    return w, w_ref, x, y


# -- the PGD ------------------------------------------------------------------------------------------------------

def softmax_backward(p, grad_p):
    """d/dz of a function of p = softmax(z), given its gradient in p: p * (g - <p, g>)."""
    return p * (grad_p - (p * grad_p).sum(1, keepdim=True))


def hand_pgd_gradient(w, w_ref, x, y, delta, beta_1, beta_2):
    """d/d delta of beta_1 * L_adv + beta_2 * L_share for linear models, written out: d CE/dz = p - e_y, d JS/dp =
    0.5 log(p / m), through the softmax, back to pixels through W^T."""
    b = len(y)
    flat = x.flatten(1)
    z, z_ref = (flat + delta.flatten(1)) @ w.T, (flat + delta.flatten(1)) @ w_ref.T
    p, q = F.softmax(z, 1), F.softmax(z_ref, 1)
    pred, pred_ref = z.argmax(1), z_ref.argmax(1)
    fooled, fooled_ref = pred != (flat @ w.T).argmax(1), pred_ref != (flat @ w_ref.T).argmax(1)
    shared = fooled & fooled_ref & (pred == pred_ref)
    e = F.one_hot(y, 3).float()
    g_adv = -(((p - e) * ~fooled[:, None]) @ w + ((q - e) * ~fooled_ref[:, None]) @ w_ref) / (2 * b)
    m = 0.5 * (p + q)
    g_js = (softmax_backward(p, 0.5 * (p / m).log()) @ w + softmax_backward(q, 0.5 * (q / m).log()) @ w_ref)
    g_js = g_js * ~shared[:, None] / b
    return (beta_1 * g_adv + beta_2 * g_js).view_as(x), fooled, fooled_ref, shared


@pytest.mark.parametrize("step_size", [0.05, 0.3])
def test_one_pgd_step_is_the_hand_computed_signed_descent_step_within_the_bound(step_size):
    w, w_ref, x, y = two_linear_models()
    bound = 0.2
    start = torch.full_like(x, bound)  # the reference's "max" start; x + 0.2 stays inside [0, 1]
    grad, fooled, fooled_ref, shared = hand_pgd_gradient(w, w_ref, x, y, start, 0.01, 1.0)
    assert (~fooled).any() and (~shared).any() and (grad != 0).all()
    expected = (start - step_size * grad.sign()).clamp(-bound, bound)
    delta = shared_pgd(linear_model(w), linear_model(w_ref), x, y, bound=bound, step_size=step_size, steps=1,
                       beta_1=0.01, beta_2=1.0)
    assert torch.allclose(delta, expected, atol=1e-6)
    assert float(delta.abs().max()) <= bound + 1e-6
    # the step goes both ways: coordinates at 0.2 - step and at the bound
    assert (delta < bound - 1e-6).any() and (delta > bound - 1e-6).any()


def test_the_shared_term_decides_the_step():
    """With beta_2 = 0 the step follows the adversarial term alone, a different step here."""
    w, w_ref, x, y = two_linear_models()
    start = torch.full_like(x, 0.2)
    grad_adv, *_ = hand_pgd_gradient(w, w_ref, x, y, start, 0.01, 0.0)
    grad_both, *_ = hand_pgd_gradient(w, w_ref, x, y, start, 0.01, 1.0)
    assert not torch.equal(grad_adv.sign(), grad_both.sign())
    delta = shared_pgd(linear_model(w), linear_model(w_ref), x, y, bound=0.2, step_size=0.05, steps=1,
                       beta_1=0.01, beta_2=0.0)
    assert torch.allclose(delta, (start - 0.05 * grad_adv.sign()).clamp(-0.2, 0.2), atol=1e-6)


def test_perturbed_images_stay_in_range_and_within_the_bound():
    w, w_ref, x, y = two_linear_models(1)
    x = x.clone()
    x[:, 0] = 0.95  # x + 0.2 would leave [0, 1]
    x[:, 1, 0] = 0.02  # x - 0.2 would too
    delta = shared_pgd(linear_model(w), linear_model(w_ref), x, y, bound=0.2, step_size=0.3, steps=5)
    assert float(delta.abs().max()) <= 0.2 + 1e-6
    assert float((x + delta).min()) >= -1e-6 and float((x + delta).max()) <= 1 + 1e-6
    assert float(delta[:, 0].max()) <= 0.05 + 1e-6  # the start (+0.2) is clipped to the pixel range


def test_the_pgd_finds_shared_examples_of_two_equal_models():
    """f = f_ref: every example that fools one fools both alike; several steps raise the loss and move
    predictions."""
    w, _, x, y = two_linear_models(2)
    model = linear_model(w)
    delta = shared_pgd(model, copy.deepcopy(model), x, y, bound=0.5, step_size=0.1, steps=10)
    with torch.no_grad():
        moved = (model(x + delta).argmax(1) != model(x).argmax(1)).float().mean()
        assert float(F.cross_entropy(model(x + delta), y)) > float(F.cross_entropy(model(x), y)) + 0.5
    assert float(moved) > 0


# -- the losses on given logits -----------------------------------------------------------------------------------

def js(p, q):
    """JS divergence as H(m) - (H(p) + H(q)) / 2."""
    def entropy(r):
        return -sum(v * math.log(v) for v in r)
    m = [(a + b) / 2 for a, b in zip(p, q)]
    return entropy(m) - (entropy(p) + entropy(q)) / 2


def softmax(row):
    e = [math.exp(v) for v in row]
    return [v / sum(e) for v in e]


def cross_entropy(row, label):
    return -math.log(softmax(row)[label])


def test_pgd_objective_counts_only_unfooled_and_unshared_samples():
    """Label 0 everywhere, both models predicted 0 at x. Sample 0: both moved to class 2 (shared: no JS term, no
    CE term); sample 1: f to 1, f_ref to 2 (fooled, not shared: JS only); sample 2: neither moved (CE of both and
    JS); sample 3: f_ref moved to 1, f not (f's CE and JS)."""
    logits = [[0.0, 1.0, 3.0], [0.0, 2.5, 1.0], [2.0, 1.0, 0.5], [1.5, 1.0, 0.0]]
    logits_ref = [[0.5, 0.0, 2.0], [0.0, 0.5, 1.5], [1.0, 0.2, 0.8], [0.0, 2.0, 1.0]]
    y = torch.zeros(4, dtype=torch.long)
    clean = torch.zeros(4, dtype=torch.long)
    value = pgd_objective(torch.tensor(logits), torch.tensor(logits_ref), y, clean, clean, beta_1=0.3, beta_2=2.0)
    adv = -(cross_entropy(logits[2], 0) + cross_entropy(logits_ref[2], 0) + cross_entropy(logits[3], 0)) / (2 * 4)
    share = sum(js(softmax(logits[i]), softmax(logits_ref[i])) for i in (1, 2, 3)) / 4
    assert float(value) == pytest.approx(0.3 * adv + 2.0 * share, rel=1e-4)
    # the masks compare with each model's own clean prediction: f_ref predicted 1 at x for sample 3 -> unmoved
    value = pgd_objective(torch.tensor(logits), torch.tensor(logits_ref), y, clean, torch.tensor([0, 0, 0, 1]),
                          beta_1=0.3, beta_2=2.0)
    adv += -cross_entropy(logits_ref[3], 0) / (2 * 4)
    assert float(value) == pytest.approx(0.3 * adv + 2.0 * share, rel=1e-4)


def test_shared_unlearning_loss_on_given_logits():
    """Label 0. Sample 0: f_ref moved from 0 to 2 and f agrees (shared); sample 1: f_ref moved to 2, f to 1
    (different classes, still a potential backdoor example: f's probability of class 2 counts); sample 2: f_ref
    still right; sample 3: f_ref predicts 1 at x' but already did at x (not moved: not counted)."""
    adv = torch.tensor([[0.0, 1.0, 2.0], [0.0, 2.0, 1.0], [0.0, 0.0, 3.0], [0.0, 3.0, 0.0]])
    adv_ref = torch.tensor([[0.0, 0.0, 2.0], [0.0, 1.0, 2.0], [2.0, 0.0, 1.0], [0.0, 2.0, 0.0]])
    clean_ref = torch.tensor([[2.0, 0.0, 0.0], [2.0, 0.0, 0.0], [2.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    y = torch.zeros(4, dtype=torch.long)
    loss, potential = shared_unlearning_loss(adv, adv_ref, clean_ref, y)
    assert potential.tolist() == [True, True, False, False]
    expected = (-math.log(1 - softmax([0.0, 1.0, 2.0])[2]) - math.log(1 - softmax([0.0, 2.0, 1.0])[2])) / 4
    assert float(loss) == pytest.approx(expected, rel=1e-4)


FLOAT32_EPS_SUM = float(torch.tensor(1 + 1e-6) - 1)  # 1 + 1e-6 - 1 in float32, as the reference computes it


@pytest.mark.parametrize("logit, expected", [(100.0, -(math.log(1e-6) + math.log(FLOAT32_EPS_SUM)) / 2),
                                             (-100.0, -math.log(0.999 + 1e-6))])
def test_shared_unlearning_loss_is_clamped_as_the_reference(logit, expected):
    """p = 1: -log(1 - p) is floored at -log(1e-6) (in float32: the mean of its two forms), finite; p < 0.001
    (here about e^-100): the loss is the constant -log(0.999 + 1e-6) and gives no gradient (the reference
    discards such samples)."""
    adv = torch.tensor([[0.0, 0.0, logit]], requires_grad=True)
    loss, _ = shared_unlearning_loss(adv, torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([[1.0, 0.0, 0.0]]),
                                     torch.tensor([0]))
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-4)
    (grad,) = torch.autograd.grad(loss, adv)
    assert torch.isfinite(grad).all() and (logit > 0 or float(grad.abs().max()) == 0)


# -- one step of the defense --------------------------------------------------------------------------------------

def run_sau(model, clean, seed=0, epochs_budget=1, batch_size=30, new_model=None, **params):
    budget = TrainConfig(epochs=epochs_budget, batch_size=batch_size, lr=0.01)
    inputs = DefenseInputs(model=model, clean=clean, num_classes=3, device=CPU, seed=seed, training=budget,
                           retraining=budget, new_model=new_model, fit=None)
    return create_defense("sau", **params).run(inputs)


def test_one_step_follows_the_gradient_of_the_total_loss(monkeypatch):
    """One batch, one epoch (the budget says 3, ``epochs`` overrides it), Adam swapped for SGD (lr 1): the change
    of the weights is minus the gradient of lambda_1 CE(f(x)) + lambda_2 CE(f(x')) + lambda_3 * sum_P -log(1 -
    p_f(yhat_ref | x')) / B, written here from the definitions at the PGD's x'."""
    monkeypatch.setattr(torch.optim, "Adam", lambda params, lr: torch.optim.SGD(params, lr=lr))
    g = torch.Generator().manual_seed(3)
    w = torch.randn(3, 2 * 4 * 4, generator=g)
    clean = Split((60 + 120 * torch.rand(24, 2, 4, 4, generator=g)).to(torch.uint8), torch.arange(24) % 3)
    model = linear_model(w)
    x, y = clean.x.float() / 255, clean.y
    lambdas = (0.7, 0.3, 2.0)
    order = torch.randperm(24, generator=torch.Generator().manual_seed(5))
    x, y = x[order], y[order]  # the defense's shuffle for seed 5; the loss is a mean, so order only matters to PGD
    delta = shared_pgd(copy.deepcopy(model), copy.deepcopy(model), x, y)
    xp = x + delta
    with torch.no_grad():
        pred_ref, clean_ref = (xp.flatten(1) @ w.T).argmax(1), (x.flatten(1) @ w.T).argmax(1)
    potential = (pred_ref != y) & (pred_ref != clean_ref)
    assert 0 < int(potential.sum()) < 24
    x, xp, weight = x.double().flatten(1), xp.double().flatten(1), w.double().requires_grad_(True)
    p = F.softmax(xp[potential] @ weight.T, 1)[torch.arange(int(potential.sum())), pred_ref[potential]]
    assert float(p.detach().max()) < 0.999 and float(p.detach().min()) > 0.001  # the reference's clamps are inactive
    total = (lambdas[0] * F.cross_entropy(x @ weight.T, y) + lambdas[1] * F.cross_entropy(xp @ weight.T, y)
             + lambdas[2] * -torch.log1p(-p).sum() / 24)
    (grad,) = torch.autograd.grad(total, weight)
    grad, x, xp = grad.float(), x.float(), xp.float()
    outcome = run_sau(model, clean, seed=5, epochs_budget=3, batch_size=24, epochs=1, lr=1.0,
                      lambda_1=0.7, lambda_2=0.3, lambda_3=2.0)
    step = w - model.net[1].weight.detach()
    assert torch.allclose(step, grad, rtol=1e-3, atol=1e-5)
    info = outcome.info
    assert info["epochs"] == 1
    assert 0 < info["potential_fraction"] <= 1 and 0 <= info["shared_fraction"] <= info["potential_fraction"]
    assert info["clean_loss"] == pytest.approx(float(F.cross_entropy(x @ w.T, y)), rel=1e-5)
    assert info["adversarial_loss"] == pytest.approx(float(F.cross_entropy(xp @ w.T, y)), rel=1e-5)


def test_the_budget_gives_epochs_and_batch_size():
    g = torch.Generator().manual_seed(0)
    clean = Split(torch.randint(0, 256, (20, 2, 4, 4), generator=g, dtype=torch.uint8), torch.arange(20) % 3)
    outcome = run_sau(linear_model(torch.randn(3, 32, generator=g)), clean, epochs_budget=2, batch_size=8)
    assert outcome.info["epochs"] == 2


# -- a planted backdoor -------------------------------------------------------------------------------------------

UNLEARN = dict(epochs=5, lr=0.1)  # the PGD's and the losses' settings: the defaults


@pytest.mark.parametrize("seed", [0, 1])
def test_a_planted_backdoor_is_unlearned_and_clean_accuracy_kept(seed):
    clean, test = colour_data(150, 2), colour_data(300, 1)
    model = planted_model()
    assert accuracy_and_asr(model, test) == (1.0, 1.0)
    outcome = run_sau(model, clean, seed=seed, **UNLEARN)
    assert outcome.model is model
    acc, asr = accuracy_and_asr(model, test)
    assert acc == 1.0 and asr <= 0.05, (acc, asr)
    assert float(model.net.offset.detach()) > 1.0  # the detector no longer fires even on a white corner (mean 1)
    info = outcome.info
    assert info["epochs"] == 5 and 0 < info["shared_fraction"] <= info["potential_fraction"] < 0.5


def test_the_same_optimiser_on_the_clean_loss_alone_keeps_the_backdoor():
    """The control: lambda_3 = 0 leaves the clean loss (Adam fine-tuning): the backdoor stays, so what removes
    it above is the shared adversarial loss."""
    clean, test = colour_data(150, 2), colour_data(300, 1)
    model = planted_model()
    run_sau(model, clean, **UNLEARN, lambda_3=0.0)
    assert accuracy_and_asr(model, test) == (1.0, 1.0)
    assert float(model.net.offset.detach()) < 0.7


def test_runs_on_a_batch_norm_cnn_in_eval_mode():
    """cnn_small: batch-norm running statistics stay (eval mode), the weights move."""
    model = create_model("cnn_small", 3, seed=0)
    g = torch.Generator().manual_seed(0)
    clean = Split(torch.randint(0, 256, (24, 3, 16, 16), generator=g, dtype=torch.uint8), torch.arange(24) % 3)
    before = copy.deepcopy(model.state_dict())
    outcome = run_sau(model, clean, batch_size=12, epochs=1, lr=1e-3)
    after = model.state_dict()
    for name, bn in roles.batchnorm_layers(model):
        assert torch.equal(after[f"net.{name}.running_mean"], before[f"net.{name}.running_mean"])
    assert not torch.equal(after["net.linear.weight"], before["net.linear.weight"])
    assert all(math.isfinite(outcome.info[k]) for k in ("clean_loss", "adversarial_loss", "shared_loss"))


@pytest.mark.parametrize("params", [{"epochs": 0}, {"epochs": 2.5}, {"lr": 0}, {"bound": 0}, {"bound": 1.5},
                                    {"step_size": 0}, {"pgd_steps": 0}, {"beta_1": -1.0}, {"beta_2": -0.1},
                                    {"lambda_1": -1.0}, {"lambda_2": -1.0}, {"lambda_3": -1.0}])
def test_bad_parameters_are_refused(params):
    with pytest.raises(ValueError, match="sau"):
        create_defense("sau", **params)
