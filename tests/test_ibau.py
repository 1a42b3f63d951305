"""I-BAU: the fixed-point hypergradient equals the implicit-function gradient of a quadratic inner problem (and the
K-step truncation of it for small K); the inner maximisation takes the hand-computed ascent step and respects
its L2 bound; the outer loss adds the perturbation to the chosen samples only; each model step of the defense is
minus the K-step hypergradient computed independently with dense Jacobians; a planted backdoor is unlearned
(fine-tuning with the same optimiser is not enough); parameters are validated."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from backdoor.data import Split
from backdoor.defenses import DefenseInputs, create_defense
from backdoor.defenses.ibau import (find_perturbation, fixed_point_hypergradient, fixed_point_map, outer_objective,
                                   perturbed_count)
from backdoor.models import Classifier, LayerRoles, create_model, roles
from backdoor.training import TrainConfig

from planted import accuracy_and_asr, colour_data, planted_model

CPU = torch.device("cpu")


# -- the hypergradient: a quadratic inner problem whose solution is linear in the outer variable ---------------

def quadratic_problem():
    """Inner: L_in(d, w) = 0.5 d^T H d - d^T B w, minimised at d*(w) = H^-1 B w; fixed-point map one gradient
    step of size eta. Outer: L(d, w) = 0.5 ||d - c||^2 + 0.5 ||w||^2. Float64."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4, 4, generator=g, dtype=torch.float64)
    h = a @ a.T + 4 * torch.eye(4, dtype=torch.float64)  # symmetric positive definite
    b = torch.randn(4, 3, generator=g, dtype=torch.float64)
    c = torch.randn(4, generator=g, dtype=torch.float64)
    w = torch.randn(3, generator=g, dtype=torch.float64, requires_grad=True)
    eta = 0.9 / float(torch.linalg.eigvalsh(h).max())  # I - eta H is a contraction
    return h, b, c, w, eta


def hypergradient(h, b, c, w, eta, steps):
    d_star = torch.linalg.solve(h, b @ w.detach())

    def fp_map(d):
        return d - eta * (h @ d - b @ w)

    def outer(d):
        return 0.5 * (d - c).pow(2).sum() + 0.5 * w.pow(2).sum()

    (grad,), loss = fixed_point_hypergradient(d_star, [w], steps, fp_map, outer)
    return grad, d_star


def test_hypergradient_converges_to_the_implicit_function_gradient():
    h, b, c, w, eta = quadratic_problem()
    grad, d_star = hypergradient(h, b, c, w, eta, steps=2000)
    # d d*/dw = H^-1 B, so dL/dw = w + B^T H^-1 (d* - c)
    exact = w.detach() + b.T @ torch.linalg.solve(h, d_star - c)
    plain = w.detach()  # the gradient with delta held fixed: no implicit term
    assert torch.allclose(grad, exact, rtol=1e-8, atol=1e-10)
    assert (plain - exact).norm() > 0.1 * exact.norm(), "the problem does not tell the implicit term apart"


@pytest.mark.parametrize("steps", [1, 2, 3, 5])
def test_k_fixed_point_steps_give_the_truncated_neumann_series(steps):
    """v_K = sum_{j<K} (I - eta H)^j (d* - c), and the hypergradient w + eta B^T v_K."""
    h, b, c, w, eta = quadratic_problem()
    grad, d_star = hypergradient(h, b, c, w, eta, steps)
    jacobian = torch.eye(4, dtype=torch.float64) - eta * h
    g_delta = d_star - c
    v, power = torch.zeros(4, dtype=torch.float64), torch.eye(4, dtype=torch.float64)
    for _ in range(steps):
        v, power = v + power @ g_delta, power @ jacobian
    assert torch.allclose(grad, w.detach() + eta * b.T @ v, rtol=1e-10, atol=1e-12)


def test_fixed_point_map_is_one_gradient_step_on_the_inner_objective_with_true_labels():
    model = linear_model(torch.randn(3, 2 * 2 * 2, generator=torch.Generator().manual_seed(1)))
    x = torch.full((4, 2, 2, 2), 0.5)
    y = torch.tensor([0, 1, 2, 0])
    delta = torch.full((1, 2, 2, 2), 0.1, requires_grad=True)
    mapped = fixed_point_map(model, x, y, delta, reg=0.01, step=0.1)
    w = model.net[1].weight.detach()
    p = F.softmax((x + delta.detach()).flatten(1) @ w.T, dim=1)
    grad_ce = ((p - F.one_hot(y, 3).float()) @ w).mean(0).view(1, 2, 2, 2)  # d CE / d delta
    expected = delta.detach() - 0.1 * (-grad_ce + 2 * 0.01 * delta.detach())
    assert torch.allclose(mapped.detach(), expected, atol=1e-6)
    assert mapped.requires_grad  # differentiable: the hypergradient goes through it


# -- the inner maximisation and the outer loss --------------------------------------------------------------

def linear_model(weight: torch.Tensor) -> Classifier:
    """A linear classifier on raw [0, 1] pixels (normalisation mean 0, std 1), no bias."""
    net = nn.Sequential(nn.Flatten(), nn.Linear(weight.shape[1], weight.shape[0], bias=False))
    with torch.no_grad():
        net[1].weight.copy_(weight)
    return Classifier(net, (0.0,) * 2, (1.0,) * 2, LayerRoles(("0", "0", "0"), "0", "1"), arch="linear")


def inner_setup():
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(3, 2 * 4 * 4, generator=g)
    x = 0.3 + 0.4 * torch.rand(16, 2, 4, 4, generator=g)  # interior: the clip is inactive at delta = 0
    return linear_model(weight), weight, x


def first_ascent_step(weight, x, lr):
    """lr * d/d delta mean CE(W(x + delta), argmax W x) at delta = 0, by hand: lr * mean_i W^T (p_i - e_i)."""
    logits = x.flatten(1) @ weight.T
    p = F.softmax(logits, dim=1)
    e = F.one_hot(logits.argmax(1), 3).float()
    return (lr * ((p - e) @ weight).mean(0)).view(1, *x.shape[1:])


def test_one_batch_takes_the_ascent_step_on_the_models_own_predictions():
    model, weight, x = inner_setup()
    delta = find_perturbation(model, [x], lr=10.0, reg=0.001, norm_bound=None)
    assert torch.allclose(delta, first_ascent_step(weight, x, 10.0), atol=1e-5)


def test_the_perturbation_is_projected_on_the_l2_ball():
    model, weight, x = inner_setup()
    step = first_ascent_step(weight, x, 10.0)
    bound = 0.5 * float(step.norm())
    delta = find_perturbation(model, [x], lr=10.0, reg=0.001, norm_bound=bound)
    assert float(delta.norm()) == pytest.approx(bound, rel=1e-5)
    assert torch.allclose(delta, step * bound / step.norm(), atol=1e-5)
    inside = find_perturbation(model, [x], lr=10.0, reg=0.001, norm_bound=10 * float(step.norm()))
    assert torch.allclose(inside, step, atol=1e-5)  # inside the ball: unchanged


def test_the_inner_maximisation_raises_the_loss_over_several_batches():
    model, _, x = inner_setup()
    with torch.no_grad():
        predicted = model(x).argmax(1)
    delta = find_perturbation(model, [x[:8], x[8:], x[:8]], lr=10.0, reg=0.001, norm_bound=1.0)
    assert float(delta.norm()) <= 1.0 + 1e-5
    with torch.no_grad():
        before = F.cross_entropy(model(x), predicted)
        after = F.cross_entropy(model((x + delta).clamp(0, 1)), predicted)
    assert float(after) > float(before) + 0.1


def test_the_outer_loss_perturbs_the_chosen_samples_only():
    model, _, x = inner_setup()
    y = torch.arange(16) % 3
    mask = torch.zeros(16, 1, 1, 1)
    mask[[2, 5]] = 1.0
    delta = torch.full((1, 2, 4, 4), 0.2)
    expected_x = x.clone()
    expected_x[[2, 5]] = (expected_x[[2, 5]] + 0.2).clamp(0, 1)
    assert torch.allclose(outer_objective(model, x, y, mask, delta), F.cross_entropy(model(expected_x), y))
    assert not torch.allclose(outer_objective(model, x, y, mask, delta), F.cross_entropy(model(x), y))


def test_perturbed_count_is_the_references_share_and_at_least_one():
    assert perturbed_count(256, 0.01) == 2 and perturbed_count(100, 0.01) == 1
    assert perturbed_count(30, 0.01) == 1 and perturbed_count(30, 0.5) == 15 and perturbed_count(30, 1.0) == 30


# -- a planted backdoor -----------------------------------------------------------------------------------------

def run_ibau(model, clean, seed=0, **params):
    budget = TrainConfig(epochs=1, batch_size=30, lr=0.01)
    inputs = DefenseInputs(model=model, clean=clean, num_classes=3, device=CPU, seed=seed, training=budget,
                           retraining=budget, new_model=planted_model, fit=None)
    return create_defense("ibau", **params).run(inputs)


UNLEARN = dict(lr=0.1, batch_size=30, norm_bound=2.0, perturbed_fraction=0.5)  # rounds and K: the defaults


@pytest.mark.parametrize("seed", [0, 1])
def test_a_planted_backdoor_is_unlearned_and_clean_accuracy_kept(seed):
    clean, test = colour_data(150, 2), colour_data(300, 1)
    model = planted_model()
    assert accuracy_and_asr(model, test) == (1.0, 1.0)
    outcome = run_ibau(model, clean, seed=seed, **UNLEARN)
    assert outcome.model is model
    acc, asr = accuracy_and_asr(model, test)
    assert acc == 1.0 and asr <= 0.05
    assert float(model.net.offset.detach()) > 1.0  # the detector no longer fires even on a white corner (mean 1)
    info = outcome.info
    assert info["rounds"] == 5 and len(info["unlearning_loss_per_round"]) == 5
    assert len(info["perturbation_norm_per_round"]) == 5 and 0 < info["perturbation_norm"] <= 2.0 + 1e-5


def test_the_same_optimiser_without_the_perturbation_keeps_the_backdoor():
    """The control: a norm bound of ~0 leaves only the clean loss (fine-tuning with Adam): the backdoor stays,
    so what removes it above is the adversarial perturbation."""
    clean, test = colour_data(150, 2), colour_data(300, 1)
    model = planted_model()
    run_ibau(model, clean, **{**UNLEARN, "norm_bound": 1e-9})
    assert accuracy_and_asr(model, test) == (1.0, 1.0)
    assert float(model.net.offset.detach()) < 0.7


def test_each_model_step_follows_the_k_step_hypergradient(monkeypatch):
    """One round, one batch, every sample perturbed, the optimiser swapped for plain SGD (lr 1): the parameter
    change is minus the hypergradient computed independently here with dense Jacobians (torch.func) at the
    round's perturbation: d L/d theta + (d Phi/d theta)^T sum_{j<K} (d Phi/d delta^T)^j d L/d delta, Phi one
    gradient step (0.1) on the inner objective at the batch with its true labels. The plain gradient (no
    implicit term) is measurably different."""
    from torch.func import functional_call, grad, jacrev

    monkeypatch.setattr(torch.optim, "Adam", lambda params, lr: torch.optim.SGD(params, lr=lr))
    clean = colour_data(30, 2)
    model = planted_model()
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    x, y = clean.x.float() / 255, clean.y
    delta = find_perturbation(copy.deepcopy(model).eval(), [x], lr=10.0, reg=0.001, norm_bound=2.0)

    def logits(p, inputs):
        return functional_call(model, p, (inputs,))

    def inner(d, p):
        return -F.cross_entropy(logits(p, (x + d).clamp(0, 1)), y) + 0.001 * d.pow(2).sum()

    def phi(d, p):
        return d - 0.1 * grad(inner, argnums=0)(d, p)

    def outer(d, p):
        return F.cross_entropy(logits(p, (x + d).clamp(0, 1)), y)

    g_delta, g_theta = grad(outer, argnums=(0, 1))(delta, before)
    n = delta.numel()
    jacobian = jacrev(phi, argnums=0)(delta, before).reshape(n, n)
    mixed = jacrev(phi, argnums=1)(delta, before)
    v, term = torch.zeros(n), g_delta.flatten()
    for _ in range(5):
        v, term = v + term, jacobian.T @ term
    hyper = {k: g_theta[k] + (mixed[k].reshape(n, -1).T @ v).view_as(g_theta[k]) for k in before}

    run_ibau(model, clean, rounds=1, batch_size=30, lr=1.0, norm_bound=2.0, perturbed_fraction=1.0)
    step = torch.cat([(before[k] - p.detach()).flatten() for k, p in model.named_parameters()])
    expected = torch.cat([hyper[k].flatten() for k in before])
    plain = torch.cat([g_theta[k].flatten() for k in before])
    assert torch.allclose(step, expected, rtol=1e-3, atol=2e-6)
    assert (plain - expected).abs().max() > 1e-5  # about 1e-4 here, against an error of about 4e-7


def test_runs_on_a_batch_norm_cnn_in_eval_mode():
    """cnn_small: the double backward goes through conv, batch norm and ReLU; batch-norm statistics stay."""
    model = create_model("cnn_small", 3, seed=0)
    g = torch.Generator().manual_seed(0)
    clean = Split(torch.randint(0, 256, (24, 3, 16, 16), generator=g, dtype=torch.uint8), torch.arange(24) % 3)
    before = copy.deepcopy(model.state_dict())
    outcome = run_ibau(model, clean, rounds=1, batch_size=12, lr=1e-3)
    after = model.state_dict()
    for name, bn in roles.batchnorm_layers(model):
        assert torch.equal(after[f"net.{name}.running_mean"], before[f"net.{name}.running_mean"])
    assert not torch.equal(after["net.linear.weight"], before["net.linear.weight"])
    assert outcome.info["rounds"] == 1 and 0 < outcome.info["perturbation_norm"] <= 10.0 + 1e-4
    assert all(torch.isfinite(torch.tensor(outcome.info["unlearning_loss_per_round"])))


@pytest.mark.parametrize("params", [{"rounds": 0}, {"fixed_point_steps": 0}, {"lr": 0}, {"batch_size": 0},
                                    {"inner_lr": -1.0}, {"reg": -0.1}, {"fixed_point_lr": 0},
                                    {"norm_bound": 0}, {"perturbed_fraction": 0}, {"perturbed_fraction": 1.5},
                                    {"rounds": 2.5}])
def test_bad_parameters_are_refused(params):
    with pytest.raises(ValueError, match="ibau"):
        create_defense("ibau", **params)
