"""CLP: on a conv-BN model with hand-set weights, exactly the planted channel of each layer (one planted in the
kernel, one in the batch norm's scale) is pruned at u = 3 and none at a large u; pruned channels output 0 and
the rest of the model is untouched; UCLCs equal hand-computed values and an independent per-channel SVD; the
clean subset (two different ones, an empty one, garbage) never changes what is pruned; models without a
conv + batch-norm pair are n/a; u must be a positive number."""
import copy

import numpy as np
import pytest
import torch
from torch import nn

from backdoor._checks import ParameterError
from backdoor.data import Split
from backdoor.defenses import DefenseInputs, NotApplicable, create_defense
from backdoor.defenses.clp import ChannelLipschitzPruning, channel_lipschitz_bounds, clp_prune, conv_bn_pairs
from backdoor.models import Classifier, LayerRoles, create_model
from backdoor.training import TrainConfig

CPU = torch.device("cpu")
C = 16  # channels per layer: with one outlier among n channels its z-score is at most (n - 1) / sqrt(n) = 3.75
PLANTED_KERNEL, PLANTED_SCALE = 5, 11


def classifier(net: nn.Module) -> Classifier:
    return Classifier(net, (0.5,) * 3, (0.5,) * 3, LayerRoles(("0", "0", "0"), "0", str(len(net) - 1)), arch="tiny")


def planted_model() -> Classifier:
    """conv 3x3 (3 -> 16) + BN + ReLU, conv 1x1 (16 -> 16) + BN + ReLU, pool, linear.

    Layer 1: channel k's kernel is c_k times a one-hot entry (spectral norm c_k), BN scale 1: UCLC_k = c_k =
    1 + 0.01 k, except channel 5 (planted in the kernel): 10. Layer 2: channel k's kernel is 0.01 (1 + 0.01 k)
    times a unit vector, BN gamma 1, except channel 11 (planted in the batch norm): gamma 10, UCLC 0.1. Every
    batch norm has a non-zero bias and running mean, so a pruned channel outputs 0 only if its bias is zeroed."""
    net = nn.Sequential(nn.Conv2d(3, C, 3, padding=1, bias=False), nn.BatchNorm2d(C), nn.ReLU(),
                        nn.Conv2d(C, C, 1, bias=False), nn.BatchNorm2d(C), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(C, 2))
    spread = 1 + 0.01 * torch.arange(C, dtype=torch.float32)
    with torch.no_grad():
        conv1, bn1, conv2, bn2 = net[0], net[1], net[3], net[4]
        conv1.weight.zero_()
        for k in range(C):
            conv1.weight[k, k % 3, (k // 3) % 3, k % 3] = spread[k]
        conv1.weight[PLANTED_KERNEL] *= 10 / spread[PLANTED_KERNEL]
        conv2.weight.zero_()
        for k in range(C):
            conv2.weight[k, k, 0, 0] = 0.01 * spread[k]
        for bn in (bn1, bn2):
            bn.weight.fill_(1.0)
            bn.running_var.fill_(1.0 - bn.eps)  # sqrt(var + eps) = 1
            bn.bias.copy_(0.1 + 0.01 * torch.arange(C))
            bn.running_mean.fill_(0.3)
        bn2.weight[PLANTED_SCALE] = 10.0
        net[8].weight.copy_(torch.linspace(-1, 1, 2 * C).view(2, C))
        net[8].bias.zero_()
    return classifier(net).eval()


def inputs_for(model, clean) -> DefenseInputs:
    budget = TrainConfig(epochs=1, batch_size=8, lr=0.01)

    def no_training(*_a, **_k):
        raise AssertionError("CLP trains nothing")

    return DefenseInputs(model=model, clean=clean, num_classes=2, device=CPU, seed=0, training=budget,
                         retraining=budget, new_model=lambda: planted_model(), fit=no_training)


def random_clean(seed: int, n: int = 8, size: int = 8) -> Split:
    g = torch.Generator().manual_seed(seed)
    return Split(torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8), torch.arange(n) % 2)


def test_exactly_the_planted_channels_are_pruned_at_u_3_and_none_at_a_large_u():
    model = planted_model()
    original = copy.deepcopy(model)
    outcome = create_defense("clp").run(inputs_for(model, random_clean(0)))
    assert outcome.model is model
    assert outcome.info["pruned_indices"] == {"1": [PLANTED_KERNEL], "4": [PLANTED_SCALE]}
    assert outcome.info["pruned_per_layer"] == {"1": 1, "4": 1}
    assert outcome.info["pruned_channels"] == 2 and outcome.info["total_channels"] == 2 * C
    assert outcome.info["layers"] == 2 and outcome.info["u"] == 3.0
    for index, planted in ((1, PLANTED_KERNEL), (4, PLANTED_SCALE)):
        bn, before = model.net[index], original.net[index]
        keep = torch.arange(C) != planted
        assert bn.weight[planted] == 0 and bn.bias[planted] == 0
        assert torch.equal(bn.weight[keep], before.weight[keep]) and torch.equal(bn.bias[keep], before.bias[keep])
    # Nothing else changes: convs, running statistics, the head.
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, original.state_dict()[k])]
    assert sorted(changed) == ["net.1.bias", "net.1.weight", "net.4.bias", "net.4.weight"]

    untouched = planted_model()
    outcome = create_defense("clp", u=10).run(inputs_for(untouched, random_clean(0)))
    assert outcome.info["pruned_channels"] == 0 and outcome.info["pruned_per_layer"] == {}
    assert all(torch.equal(v, planted_model().state_dict()[k]) for k, v in untouched.state_dict().items())


def test_a_pruned_channel_outputs_zero_and_the_others_what_they_did():
    model, original = planted_model(), planted_model()
    create_defense("clp").run(inputs_for(model, random_clean(0)))
    x = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        after, before = model.net[:2]((x - 0.5) / 0.5), original.net[:2]((x - 0.5) / 0.5)  # first batch norm
        keep = torch.arange(C) != PLANTED_KERNEL
        assert torch.equal(after[:, PLANTED_KERNEL], torch.zeros_like(after[:, PLANTED_KERNEL]))
        assert torch.equal(after[:, keep], before[:, keep])
        second = model.net[:5]((x - 0.5) / 0.5)
        assert torch.equal(second[:, PLANTED_SCALE], torch.zeros_like(second[:, PLANTED_SCALE]))


def test_the_bounds_of_the_planted_model_are_the_hand_set_values():
    model = planted_model()
    spread = 1 + 0.01 * torch.arange(C, dtype=torch.float32)
    first = spread.clone()
    first[PLANTED_KERNEL] = 10
    second = 0.01 * spread
    second[PLANTED_SCALE] *= 10
    torch.testing.assert_close(channel_lipschitz_bounds(model.net[0], model.net[1]), first)
    torch.testing.assert_close(channel_lipschitz_bounds(model.net[3], model.net[4]), second)


def test_uclc_of_hand_computed_channels():
    """1x1 conv: the spectral norm of a [in, 1] matrix is the vector norm: |(3, 4)| = 5, times |gamma| /
    sqrt(var + eps) = |-2| / 2. 3x3 conv: a channel whose [in, 9] matrix has rows 3 e_0 and 4 e_1 has singular
    values 3 and 4 (spectral norm 4; its Frobenius norm is 5)."""
    conv, bn = nn.Conv2d(2, 2, 1, bias=False), nn.BatchNorm2d(2)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([[3.0, 4.0], [1.0, 0.0]]).view(2, 2, 1, 1))
        bn.weight.copy_(torch.tensor([-2.0, 0.5]))
        bn.running_var.copy_(torch.tensor([4.0, 0.25]) - bn.eps)
    torch.testing.assert_close(channel_lipschitz_bounds(conv, bn), torch.tensor([5.0, 1.0]))

    conv, bn = nn.Conv2d(2, 1, 3, bias=False), nn.BatchNorm2d(1)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[0, 0, 0, 0], conv.weight[0, 1, 2, 1] = 3.0, 4.0
        bn.running_var.fill_(1.0 - bn.eps)
    torch.testing.assert_close(channel_lipschitz_bounds(conv, bn), torch.tensor([4.0]))


def numpy_uclc(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> np.ndarray:
    """An independent computation: one SVD per channel of weight[k] reshaped to [in, kh * kw], in float64."""
    w = conv.weight.detach().double().numpy()
    gamma, var = bn.weight.detach().double().numpy(), bn.running_var.detach().double().numpy()
    return np.array([np.linalg.svd(w[k].reshape(w.shape[1], -1), compute_uv=False)[0]
                     * abs(gamma[k]) / np.sqrt(var[k] + bn.eps) for k in range(w.shape[0])])


def test_bounds_and_pruning_match_an_independent_computation_on_random_weights():
    """cnn_small with random weights and batch norms: every layer's UCLCs match numpy's SVDs, and the pruned
    channels are those above numpy's mean + u * std (ddof=1), per layer, at u values chosen between the top
    channel's z-scores with and without Bessel's correction (so a population std prunes differently)."""
    model = create_model("cnn_small", 10, seed=0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, conv, bn in conv_bn_pairs(model.net):
            bn.weight.copy_(torch.randn(bn.num_features, generator=g))
            bn.running_var.copy_(torch.rand(bn.num_features, generator=g) * 2 + 0.05)
            conv.weight[1] *= 6  # an outlier channel per layer
    pairs = conv_bn_pairs(model.net)
    assert [name for name, _, _ in pairs] == ["block1.0.1", "block2.0.1", "block3.1"]
    expected = {name: numpy_uclc(conv, bn) for name, conv, bn in pairs}
    for name, conv, bn in pairs:
        np.testing.assert_allclose(channel_lipschitz_bounds(conv, bn).numpy(), expected[name], rtol=1e-5)

    first = expected["block1.0.1"]
    top = first.max()
    z_unbiased = (top - first.mean()) / first.std(ddof=1)
    z_population = (top - first.mean()) / first.std(ddof=0)
    for u in (0.5, 1.5, (z_unbiased + z_population) / 2, z_unbiased - 1e-3):
        pruned, scores = clp_prune(copy.deepcopy(model).net, float(u))
        for name, values in expected.items():
            want = np.flatnonzero(values > values.mean() + u * values.std(ddof=1)).tolist()
            assert pruned[name] == want, (u, name)
        np.testing.assert_allclose(scores["block1.0.1"].numpy(), first, rtol=1e-5)
    assert clp_prune(copy.deepcopy(model).net, float((z_unbiased + z_population) / 2))[0]["block1.0.1"] == []
    assert clp_prune(copy.deepcopy(model).net, float(z_unbiased - 1e-3))[0]["block1.0.1"] == [int(first.argmax())]


def test_the_clean_subset_never_changes_what_is_pruned():
    """Two different clean subsets, an empty one and garbage (other size, out-of-range labels) give the same
    model, the one pruned with no inputs at all; the subset is never even indexed."""
    class Untouchable(Split):
        armed = False

        def __getattribute__(self, item):
            if type(self).armed and item in ("x", "y", "subset"):
                raise AssertionError(f"CLP read the clean subset ({item})")
            return object.__getattribute__(self, item)

        def __len__(self):
            raise AssertionError("CLP read the clean subset (len)")

    reference = planted_model()
    clp_prune(reference.net, 3.0)
    garbage = Split(torch.full((5, 3, 31, 7), 255, dtype=torch.uint8), torch.full((5,), 999))
    empty = Split(torch.zeros(0, 3, 8, 8, dtype=torch.uint8), torch.zeros(0, dtype=torch.long))
    untouchable = Untouchable(torch.zeros(1, 3, 8, 8, dtype=torch.uint8), torch.zeros(1, dtype=torch.long))
    Untouchable.armed = True
    for clean in (random_clean(1), random_clean(2, n=32, size=16), empty, garbage, untouchable):
        model = planted_model()
        outcome = create_defense("clp").run(inputs_for(model, clean))
        assert outcome.info["pruned_indices"] == {"1": [PLANTED_KERNEL], "4": [PLANTED_SCALE]}
        for key, value in reference.state_dict().items():
            assert torch.equal(outcome.model.state_dict()[key], value), key


def test_pairs_follow_registration_order_as_the_reference():
    """A batch norm pairs with the conv registered last before it, when their channel counts agree and the
    batch norm has weights and running statistics. In PreAct-ResNet18 a block's bn1 (pre-activation) pairs
    with the previous block's last conv (its conv2, or its 1x1 shortcut, registered after it)."""
    model = create_model("preact_resnet18", 10, width=2, seed=0)
    pairs = {name: conv for name, conv, _ in conv_bn_pairs(model.net)}
    modules = dict(model.net.named_modules())
    assert len(pairs) == 16
    assert pairs["layer1.0.bn1"] is modules["conv1"] and pairs["layer1.0.bn2"] is modules["layer1.0.conv1"]
    assert pairs["layer2.0.bn1"] is modules["layer1.1.conv2"]
    assert pairs["layer2.1.bn1"] is modules["layer2.0.shortcut"]

    net = nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.BatchNorm2d(4, affine=False),
                        nn.BatchNorm2d(4, track_running_stats=False), nn.BatchNorm2d(6), nn.BatchNorm2d(4))
    assert [name for name, _, _ in conv_bn_pairs(net)] == ["2", "6"]  # no conv yet; no weights; no stats; 6 != 4


@pytest.mark.parametrize("net", [
    nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16, 2)),  # no batch norm (VGG-19)
    nn.Sequential(nn.Flatten(), nn.Linear(12, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)),  # BN after no conv
    nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, affine=False), nn.Flatten(), nn.Linear(16, 2)),
], ids=["no-batch-norm", "batch-norm-1d-only", "batch-norm-without-weights"])
def test_a_model_without_a_conv_batch_norm_pair_is_not_applicable(net):
    model = classifier(net)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(NotApplicable, match="no convolution followed by batch norm"):
        create_defense("clp").run(inputs_for(model, random_clean(0, size=2)))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("u", [0, 0.0, -1, float("nan"), float("inf"), "3", True, None])
def test_u_must_be_a_positive_number(u):
    with pytest.raises(ParameterError) as error:
        ChannelLipschitzPruning(u=u)
    assert error.value.owner == "clp" and error.value.param == "u" and "number" in error.value.allowed
    if u in (0, -1):
        assert "> 0" in error.value.allowed



def test_a_positive_u_is_accepted():
    assert ChannelLipschitzPruning(u=0.25).u == 0.25 and create_defense("clp", u=7).u == 7
