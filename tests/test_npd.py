"""NPD: the polarizer starts as the identity and its folded form computes what it computes; only the polarizer
trains (every original weight and buffer bit-identical); the PGD step is the hand-computed targeted sign step,
projected per sample on the L2 ball; the outer loss equals a hand computation of the four terms; a planted
backdoor is removed with clean accuracy kept (and the clean loss alone keeps it); the defended model reloads
into a fresh model of its architecture as the harness does; every registered model has an insertion point;
NotApplicable without a feature map; parameters are validated."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from backdoor._storage import module_to_tensors, tensors_with_prefix
from backdoor.data import Split
from backdoor.defenses import DefenseInputs, NotApplicable, create_defense
from backdoor.defenses.npd import Polarizer, estimated_target, insertion_point, npd_loss, project_l2, targeted_pgd
from backdoor.models import MODELS, ChannelMap, Classifier, LayerRoles, create_model
from backdoor.training import TrainConfig

from planted import accuracy_and_asr, colour_data

CPU = torch.device("cpu")
BUDGET = TrainConfig(epochs=1, batch_size=30, lr=0.01)


def inputs_for(model, clean, num_classes=3, seed=0, new_model=None):
    return DefenseInputs(model=model, clean=clean, num_classes=num_classes, device=CPU, seed=seed, training=BUDGET,
                         retraining=BUDGET, new_model=new_model, fit=None)


# -- the polarizer --------------------------------------------------------------------------------------------

def test_the_polarizer_starts_as_the_identity():
    x = torch.randn(4, 6, 5, 5)
    polarizer = Polarizer(6).eval()
    with torch.no_grad():
        assert torch.allclose(polarizer(x), x, rtol=0, atol=1e-6)
        assert torch.allclose(polarizer.folded()(x), x, rtol=0, atol=1e-6)


def test_inserting_the_initial_polarizer_leaves_the_models_outputs_unchanged():
    model = create_model("cnn_small", 3, seed=0).eval()
    x = torch.rand(4, 3, 16, 16)
    with torch.no_grad():
        before = model(x)
        polarizer = Polarizer(64).eval()
        handle = model.net.block3.register_forward_hook(lambda _m, _i, out: polarizer(out))
        during = model(x)
        handle.remove()
        model.insert_after("block3", polarizer.folded())
        after = model(x)
    assert torch.allclose(during, before, rtol=0, atol=1e-6)
    assert torch.allclose(after, before, rtol=0, atol=1e-6)


def test_the_folded_polarizer_computes_the_eval_mode_polarizer():
    g = torch.Generator().manual_seed(0)
    polarizer = Polarizer(5)
    with torch.no_grad():
        polarizer.conv.weight.copy_(torch.randn(5, 5, 1, 1, generator=g))
        polarizer.bn.weight.copy_(torch.rand(5, generator=g) + 0.5)
        polarizer.bn.bias.copy_(torch.randn(5, generator=g))
        polarizer.bn.running_mean.copy_(torch.randn(5, generator=g))
        polarizer.bn.running_var.copy_(torch.rand(5, generator=g) + 0.1)
    polarizer.eval()
    x = torch.randn(3, 5, 4, 4, generator=g)
    with torch.no_grad():
        w = polarizer.conv.weight[:, :, 0, 0]
        bn = polarizer.bn
        by_hand = ((torch.einsum("oc,nchw->nohw", w, x) - bn.running_mean[:, None, None])
                   / torch.sqrt(bn.running_var + bn.eps)[:, None, None] * bn.weight[:, None, None]
                   + bn.bias[:, None, None])
        assert torch.allclose(polarizer(x), by_hand, atol=1e-5)
        assert torch.allclose(polarizer.folded()(x), by_hand, atol=1e-5)


# -- the inner step ---------------------------------------------------------------------------------------------

def linear_model(weight: torch.Tensor) -> Classifier:
    """A linear classifier on raw [0, 1] pixels (normalisation mean 0, std 1), no bias."""
    net = nn.Sequential(nn.Flatten(), nn.Linear(weight.shape[1], weight.shape[0], bias=False))
    with torch.no_grad():
        net[1].weight.copy_(weight)
    return Classifier(net, (0.0,) * 2, (1.0,) * 2, LayerRoles(("0", "0", "0"), "0", "1"), arch="linear")


def pgd_setup():
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(3, 2 * 4 * 4, generator=g)
    x = 0.3 + 0.4 * torch.rand(6, 2, 4, 4, generator=g)  # interior: the clip is inactive for steps below 0.3
    return linear_model(weight), weight, x


def sign_step(weight, x, target, step):
    """-step * sign(d/d delta mean_i CE(W x_i, t_i)) at delta = 0, by hand: the gradient of sample i is
    W^T (p_i - e_{t_i}) / B."""
    p = F.softmax(x.flatten(1) @ weight.T, dim=1)
    grad = (p - F.one_hot(target, 3).float()) @ weight / len(x)
    return (-step * grad.sign()).view_as(x)


def test_one_pgd_step_is_the_targeted_sign_step():
    model, weight, x = pgd_setup()
    target = torch.tensor([0, 1, 2, 0, 1, 2])
    delta = targeted_pgd(model, x, target, steps=1, step=0.05, radius=100.0)
    assert torch.allclose(delta, sign_step(weight, x, target, 0.05), atol=1e-7)
    with torch.no_grad():  # it moves towards the target
        assert (F.cross_entropy(model(x + delta), target, reduction="none")
                < F.cross_entropy(model(x), target, reduction="none")).all()


def test_the_pgd_step_is_projected_per_sample_on_the_l2_ball():
    model, weight, x = pgd_setup()
    target = torch.tensor([2, 2, 1, 1, 0, 0])
    step = sign_step(weight, x, target, 0.05)  # each sample's norm: 0.05 * sqrt(32) ~ 0.28
    delta = targeted_pgd(model, x, target, steps=1, step=0.05, radius=0.1)
    assert torch.allclose(delta.flatten(1).norm(dim=1), torch.full((6,), 0.1), atol=1e-6)
    assert torch.allclose(delta, step * 0.1 / step.flatten(1).norm(dim=1).view(-1, 1, 1, 1), atol=1e-6)
    inside = project_l2(torch.full((2, 1, 2, 2), 0.01), 1.0)  # inside the ball: unchanged
    assert torch.equal(inside, torch.full((2, 1, 2, 2), 0.01))


def test_pgd_stops_once_most_of_the_batch_reaches_the_target():
    """Two steps asked; after the first more than 60% of the batch is at its target (the target is the
    model's own prediction here), so the second is not taken."""
    model, weight, x = pgd_setup()
    with torch.no_grad():
        target = model(x).argmax(1)
    delta = targeted_pgd(model, x, target, steps=2, step=0.05, radius=100.0)
    assert torch.allclose(delta, sign_step(weight, x, target, 0.05), atol=1e-7)


def test_the_estimated_target_is_the_most_likely_other_class():
    logits = torch.tensor([[5.0, 4.0, -1.0], [0.0, -20.0, -30.0], [1.0, 2.0, 3.0]])
    assert estimated_target(logits, torch.tensor([0, 0, 1])).tolist() == [1, 1, 2]


# -- the outer loss ---------------------------------------------------------------------------------------------

def test_the_loss_equals_a_hand_computation_of_the_four_terms():
    clean = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    adv = torch.tensor([[0.0, 3.0, 1.0], [0.0, 2.0, 1.0]])
    labels, predicted, target = torch.tensor([0, 1]), torch.tensor([0, 2]), torch.tensor([1, 0])

    def softmax(row):
        e = [math.exp(v) for v in row]
        return [v / sum(e) for v in e]

    pc = [softmax(r) for r in clean.tolist()]
    pa = [softmax(r) for r in adv.tolist()]
    ce_clean = -(math.log(pc[0][0]) + math.log(pc[1][1])) / 2
    ce_adv = -(math.log(pa[0][0]) + math.log(pa[1][2])) / 2
    # the adversarial's most likely class other than the label: sample 0's top class 1 (label 0);
    # sample 1's top class is its label 1, so its second, 2
    wrong = -(math.log(1.0001 - pa[0][1] + 1e-12) + math.log(1.0001 - pa[1][2] + 1e-12)) / 2
    tgt = -(math.log(1.0001 - pa[0][1] + 1e-12) + math.log(1.0001 - pa[1][0] + 1e-12)) / 2
    total, terms = npd_loss(clean, adv, labels, predicted, target, (1.0, 0.4, 0.3, 0.2))
    assert terms == pytest.approx([ce_clean, ce_adv, wrong, tgt], rel=1e-5)
    assert float(total) == pytest.approx(ce_clean + 0.4 * ce_adv + 0.3 * wrong + 0.2 * tgt, rel=1e-5)


# -- the defense on a planted backdoor --------------------------------------------------------------------------

class Features(nn.Module):
    """4 feature channels: the 3 colour channels and a detector, softplus(20 * (mean over colours - 0.75)),
    which only white pixels (the trigger) drive (clean pixels' colour means stay below 0.61)."""

    def forward(self, x):
        detector = F.softplus(20.0 * (x.mean(1, keepdim=True) - 0.75))
        return torch.cat([x, detector], 1)


def planted_model() -> Classifier:
    """Features, global average pool, head: 10 x the colour channel's mean per class, and 60 x the detector's
    on class 0 (the 2x2 white corner adds about 4 * 5 / 64 * 60 ~ 19 to class 0)."""
    head = nn.Linear(4, 3)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[10.0, 0, 0, 60], [0, 10, 0, 0], [0, 0, 10, 0]]))
        head.bias.zero_()
    net = nn.Sequential(Features(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), head)
    return Classifier(net, (0.0,) * 3, (1.0,) * 3, LayerRoles(("0",) * 3, "0", "3"), arch="planted")


PLANTED = dict(epochs=10, batch_size=30)  # lr, PGD, weights: the defaults


@pytest.mark.parametrize("seed", [0, 1])
def test_a_planted_backdoor_is_removed_and_clean_accuracy_kept(seed):
    clean, test = colour_data(120, 2, corner_evidence=False), colour_data(300, 1, corner_evidence=False)
    model = planted_model()
    assert accuracy_and_asr(model, test) == (1.0, 1.0)
    outcome = create_defense("npd", **PLANTED).run(inputs_for(model, clean, seed=seed))
    assert outcome.model is model and set(model.inserted) == {"0"}
    acc, asr = accuracy_and_asr(model, test)
    assert acc >= 0.99 and asr <= 0.05
    info = outcome.info
    assert info["insertion_point"] == "0" and info["channels"] == 4 and info["epochs"] == 10
    assert set(info["last_epoch_losses"]) == {"total", "clean_ce", "adversarial_ce", "wrong_class", "target_class"}
    assert all(math.isfinite(v) for v in info["last_epoch_losses"].values())


def test_the_clean_loss_alone_keeps_the_backdoor():
    """The control: the same training with the three adversarial weights 0 keeps the backdoor, so what removes
    it above is the adversarial part of the objective."""
    clean, test = colour_data(120, 2, corner_evidence=False), colour_data(300, 1, corner_evidence=False)
    model = planted_model()
    create_defense("npd", **PLANTED, lmd2=0.0, lmd3=0.0, lmd4=0.0).run(inputs_for(model, clean))
    assert accuracy_and_asr(model, test) == (1.0, 1.0)


def test_one_training_step_is_sgd_on_the_objective_computed_independently():
    """No warm-up, one epoch of one batch: the polarizer after the defense's step is the identity polarizer
    moved by SGD (lr 0.5, weight decay 5e-4; momentum's first step is the gradient) along the gradient of the
    objective built here: labels y, the model's clean predictions, the most likely other class as target, the
    PGD perturbation towards it. The model's head favours class 1 so that some predictions are wrong."""
    clean = colour_data(30, 2, corner_evidence=False)
    model = planted_model()
    with torch.no_grad():
        model.net[3].bias.copy_(torch.tensor([0.0, 4.0, 0.0]))
    x, y = clean.x.float() / 255, clean.y
    polarizer = Polarizer(4).eval()
    handle = model.net[0].register_forward_hook(lambda _m, _i, out: polarizer(out))
    with torch.no_grad():
        logits = model(x)
    assert 0 < int((logits.argmax(1) != y).sum()) < 30
    masked = logits.clone()
    masked[torch.arange(30), y] = float("-inf")
    target = masked.argmax(1)
    delta = targeted_pgd(model, x, target, steps=2, step=0.1, radius=3.0)
    loss, _ = npd_loss(model(x), model((x + delta).clamp(0, 1)), y, logits.argmax(1), target, (1.0, 0.4, 0.4, 0.4))
    grads = torch.autograd.grad(loss, list(polarizer.parameters()))
    handle.remove()
    with torch.no_grad():
        for p, g in zip(polarizer.parameters(), grads):
            p -= 0.5 * (g + 5e-4 * p)
    expected = polarizer.folded()
    create_defense("npd", epochs=1, warm_epochs=0, batch_size=30, lr=0.5).run(inputs_for(model, clean))
    inserted = model.inserted["0"]
    assert torch.allclose(inserted.weight, expected.weight, atol=1e-6)
    assert torch.allclose(inserted.bias, expected.bias, atol=1e-6)
    assert not torch.allclose(inserted.weight, torch.eye(4), atol=1e-3)


# -- the harness: only the polarizer trains, the model reloads ----------------------------------------------------

def small_cnn_case():
    model = create_model("cnn_small", 3, seed=0).eval()
    g = torch.Generator().manual_seed(0)
    clean = Split(torch.randint(0, 256, (24, 3, 16, 16), generator=g, dtype=torch.uint8), torch.arange(24) % 3)
    return model, clean


def test_only_the_polarizer_trains_and_the_model_reloads_as_the_harness_does():
    model, clean = small_cnn_case()
    before = copy.deepcopy(model.state_dict())
    x = clean.x.float() / 255
    with torch.no_grad():
        logits_before = model(x)
    outcome = create_defense("npd", epochs=2, warm_epochs=1, batch_size=12, lr=0.05).run(inputs_for(model, clean))
    after = model.state_dict()
    assert set(after) == set(before) | {"inserted.block3.weight", "inserted.block3.bias"}
    for key, value in before.items():
        assert torch.equal(after[key], value), key  # weights and buffers bit-identical
    assert all(p.requires_grad for p in model.net.parameters())  # unfrozen again
    inserted = model.inserted["block3"]
    assert not torch.allclose(inserted.weight, torch.eye(64), atol=1e-4)  # the polarizer trained
    with torch.no_grad():
        logits_after = model(x)
    assert not torch.allclose(logits_after, logits_before, atol=1e-4)  # and is in the forward pass
    assert outcome.info["insertion_point"] == "block3" and outcome.info["channels"] == 64

    # the runner's round trip: the state dict into a fresh model of the architecture (_load_model)
    fresh = create_model("cnn_small", 3, seed=5)
    fresh.load_state_dict(tensors_with_prefix(module_to_tensors(model), "model."))
    copied = copy.deepcopy(model)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), logits_after)
        copied.inserted["block3"].weight.zero_()  # a copy's polarizer is its own
        assert torch.equal(model(x), logits_after)
        assert not torch.equal(copied(x), logits_after)


@pytest.mark.parametrize("name", MODELS.names())
def test_every_registered_model_has_an_insertion_point(name):
    model = create_model(name, 10, seed=0).eval()
    site, channels = insertion_point(model, torch.rand(2, 3, 32, 32))
    assert site == model.roles.last_conv and channels > 0


def test_not_applicable_without_a_feature_map():
    model = linear_model(torch.randn(3, 2 * 4 * 4))  # its last_conv role is the Flatten: [N, 32]
    clean = Split(torch.zeros(6, 2, 4, 4, dtype=torch.uint8), torch.arange(6) % 3)
    with pytest.raises(NotApplicable, match="npd"):
        create_defense("npd").run(inputs_for(model, clean))


def test_a_state_dict_without_inserted_maps_loads_as_before():
    model = create_model("cnn_small", 3, seed=0)
    fresh = create_model("cnn_small", 3, seed=1)
    fresh.load_state_dict(model.state_dict())
    assert len(fresh.inserted) == 0
    assert ChannelMap(3)(torch.ones(1, 3, 2, 2)).equal(torch.ones(1, 3, 2, 2))


def test_parameters_are_reported_by_name():
    assert create_defense("npd", lmd3=0.2).params() == {
        "epochs": 50, "warm_epochs": 5, "lr": 0.01, "batch_size": 128, "pgd_steps": 2, "pgd_step": 0.1,
        "trigger_norm": 3.0, "lmd1": 1.0, "lmd2": 0.4, "lmd3": 0.2, "lmd4": 0.4}


@pytest.mark.parametrize("params", [{"epochs": 0}, {"warm_epochs": -1}, {"lr": 0}, {"batch_size": 0},
                                    {"pgd_steps": 0}, {"pgd_step": 0}, {"trigger_norm": -1.0}, {"lmd1": -0.1},
                                    {"lmd4": -1}, {"epochs": 2.5}])
def test_bad_parameters_are_refused(params):
    with pytest.raises(ValueError, match="npd"):
        create_defense("npd", **params)
