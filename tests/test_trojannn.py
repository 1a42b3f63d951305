"""TrojanNN: neuron selection by connection weight, the trigger optimised towards the target activation on a
hand-made linear model whose answer is known, the stamp, dirty-label and all-to-all poisoning, caching by spec."""
import pytest
import torch
from torch import nn

from backdoor._checks import ParameterError
from backdoor.attacks import ATTACKS, AttackContext, create_attack
from backdoor.attacks.trojannn import mask_side, select_neurons
from backdoor.data import Dataset, Split
from backdoor.harness.cache import ArtifactCache
from backdoor.models import Classifier, LayerRoles, create_model
from backdoor.targets import ALL_TO_ALL
from backdoor.training import TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")

# 1x4x4 images; share 0.25 gives the 2x2 bottom-right mask: pixels (2, 2), (2, 3), (3, 2), (3, 3).
MASK_PIXELS = [(2, 2), (2, 3), (3, 2), (3, 3)]


def linear_model(feature_rows: dict[int, dict[tuple[int, int], float]], head_weight: torch.Tensor) -> Classifier:
    """Flatten -> Linear(16, F) -> head Linear(F, K), no normalisation (mean 0, std 1), zero biases.
    ``feature_rows[j][(r, c)]`` is neuron j's weight on pixel (r, c); every other weight is 0."""
    features, classes = head_weight.shape[1], head_weight.shape[0]
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, features), nn.Linear(features, classes))
    with torch.no_grad():
        net[1].weight.zero_()
        net[1].bias.zero_()
        for j, row in feature_rows.items():
            for (r, c), w in row.items():
                net[1].weight[j, 4 * r + c] = w
        net[2].weight.copy_(head_weight)
        net[2].bias.zero_()
    return Classifier(net, (0.0,), (1.0,), LayerRoles(("1", "1", "1"), "1", "2"), arch="linear")


def dataset(n=20, classes=3, shape=(1, 4, 4), seed=0) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    train = Split(torch.randint(0, 256, (n, *shape), generator=g, dtype=torch.uint8), torch.arange(n) % classes)
    return Dataset(name="t", train=train, test=train, num_classes=classes, mean=(0.5,) * shape[0],
                   std=(0.5,) * shape[0], hflip=False)


def context(data, model, cache, seed=0, spec=None, calls=None):
    def clean_model():
        if calls is not None:
            calls.append(1)
        return model

    def cached(kind, s, build):  # no cache: build every time
        return build() if cache is None else cache.get_or_build(kind, s, build)[0]

    return AttackContext(dataset=data, device=torch.device("cpu"), seed=seed, training=TrainConfig(epochs=1),
                         model_name="linear", cached=cached,
                         clean_model=clean_model, spec=spec or {"dataset": "t", "model": "linear"})


# Head [3 classes, 4 neurons]: neurons 0 and 2 carry the largest total |weight| (2.4 and 1.9), neuron 2 through
# negative weights; neuron 1's signed sum is the largest (1.5) but its magnitude total only 1.5.
HEAD = torch.tensor([[0.8, 0.5, -0.9, 0.1],
                     [0.8, 0.5, -0.5, 0.1],
                     [-0.8, 0.5, -0.5, 0.1]])
# Selected neurons 0 and 2 agree in sign on each mask pixel; neuron 1 (not selected) pulls the other way, hard;
# pixel (3, 2) carries no selected weight; the weights outside the mask (10) must not count (the image is black
# there during the optimisation).
ROWS = {
    0: {(2, 2): 1.0, (2, 3): -1.0, (3, 3): 2.0, (0, 0): 10.0},
    1: {(2, 2): -50.0, (2, 3): 50.0, (3, 2): 50.0, (3, 3): -50.0},
    2: {(2, 2): 1.0, (2, 3): -2.0, (3, 3): 1.0, (1, 1): 10.0},
}


def test_registered_as_dirty_label():
    assert "trojannn" in ATTACKS.names() and create_attack("trojannn").kind == "dirty_label"


def test_neuron_selection_picks_the_planted_largest_magnitude_connections():
    assert select_neurons(HEAD, 2).tolist() == [0, 2]
    assert select_neurons(HEAD, 1).tolist() == [0]
    conv = torch.zeros(5, 4, 3, 3)
    conv[:, 3] = -0.2  # total 9 * 5 * 0.2 = 9 over the kernel and outputs
    conv[0, 1, 1, 1] = 8.0
    assert select_neurons(conv, 2).tolist() == [3, 1]


def test_mask_side_covers_the_share_of_the_image():
    assert mask_side(32, 32, 0.07) == 8 and mask_side(4, 4, 0.25) == 2 and mask_side(8, 8, 0.01) == 1


def test_trigger_optimisation_reaches_the_known_bound_optimum(tmp_path):
    """Target 100 is out of reach: each mask pixel goes to the bound in the sign of the selected neurons' summed
    weight (1 where positive, 0 where negative); a pixel without selected weight keeps its grey start."""
    model = linear_model(ROWS, HEAD)
    attack = create_attack("trojannn", share=0.25, iters=20)
    attack.prepare(context(dataset(), model, ArtifactCache(tmp_path)))
    assert attack.neurons.tolist() == [0, 2]
    assert attack.pattern.tolist() == [[[255, 0], [128, 255]]]  # 0.5 * 255 = 127.5 rounds to the even 128
    record = attack.record
    # before: 0.5 * (1 - 1 + 2) = 1 and 0.5 * (1 - 2 + 1) = 0; after: 1 + 2 = 3 and 1 + 1 = 2
    assert record["activation_before"] == pytest.approx([1.0, 0.0], abs=1e-6)
    assert record["activation_after"] == pytest.approx([3.0, 2.0], abs=1e-6)
    assert record["iterations"] == 20 and record["cost"] == pytest.approx(97 ** 2 + 98 ** 2, rel=1e-6)


def test_a_reachable_target_stops_at_the_tolerance():
    """One neuron summing the four mask pixels, target 3.2: three steps of 0.1 from 0.5 reach 0.8 per pixel, where
    the cost is below the tolerance and the descent stops."""
    rows = {0: {p: 1.0 for p in MASK_PIXELS}}
    head_weight = torch.tensor([[1.0, 0.1], [1.0, 0.1], [1.0, 0.1]])
    attack = create_attack("trojannn", share=0.25, num_neurons=1, target_value=3.2)
    attack.prepare(context(dataset(), linear_model(rows, head_weight), None))
    assert attack.record["iterations"] == 3 and attack.record["cost"] < 1e-3
    assert attack.record["activation_after"] == pytest.approx([3.2], abs=1e-5)
    assert (attack.pattern == 204).all()  # round(0.8 * 255)


def test_eps_bounds_the_trigger_around_its_start():
    attack = create_attack("trojannn", share=0.25, iters=20, eps=0.2, init=0.5)
    attack.prepare(context(dataset(), linear_model(ROWS, HEAD), None))
    assert attack.pattern.tolist() == [[[178, 76], [128, 178]]]  # 0.7 * 255 = 178.5 -> 178, 0.3 * 255 = 76.5 -> 76


def prepared(tmp_path, **params):
    attack = create_attack("trojannn", share=0.25, iters=20, **params)
    attack.num_classes = 3
    attack.prepare(context(dataset(), linear_model(ROWS, HEAD), ArtifactCache(tmp_path)))
    return attack


def test_stamp_sets_the_mask_exactly_and_leaves_every_other_pixel(tmp_path):
    attack = prepared(tmp_path)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (6, 1, 4, 4), generator=g, dtype=torch.uint8)
    out = attack.apply_trigger(x)
    assert torch.equal(out[:, :, 2:, 2:], torch.tensor([[255, 0], [128, 255]], dtype=torch.uint8).expand(6, 1, 2, 2))
    outside = torch.ones(4, 4, dtype=torch.bool)
    outside[2:, 2:] = False
    assert torch.equal(out[:, :, outside], x[:, :, outside])
    with pytest.raises(ValueError, match="built for another dataset"):
        attack.apply_trigger(torch.zeros(1, 3, 4, 4, dtype=torch.uint8))


def test_poisoning_stamps_and_relabels_exactly_the_masked_samples(tmp_path):
    attack, train = prepared(tmp_path, target=2), dataset().train
    p = attack.poison_train(train, 0.25, seed=3)
    assert int(p.mask.sum()) == 5 and (p.y[p.mask] == 2).all()
    assert torch.equal(p.x[p.mask], attack.apply_trigger(train.x[p.mask]))
    assert torch.equal(p.x[~p.mask], train.x[~p.mask]) and torch.equal(p.y[~p.mask], train.y[~p.mask])
    assert torch.equal(p.mask, attack.poison_train(train, 0.25, seed=3).mask), "seeded"
    test = attack.poison_test(train)
    assert len(test) == int((train.y != 2).sum()) and (test.x[:, :, 2:, 2:] == attack.pattern).all()


def test_all_to_all_relabels_each_poisoned_sample_to_its_next_class(tmp_path):
    attack, train = prepared(tmp_path, target=ALL_TO_ALL), dataset().train
    p = attack.poison_train(train, 0.5, seed=0)
    assert int(p.mask.sum()) == 10 and torch.equal(p.y[p.mask], (train.y[p.mask] + 1) % 3)
    assert len(attack.poison_test(train)) == len(train)


def test_trigger_is_cached_by_spec(tmp_path):
    data, model, cache, calls = dataset(), linear_model(ROWS, HEAD), ArtifactCache(tmp_path), []

    def build(seed=0, spec=None, **params):
        attack = create_attack("trojannn", share=0.25, iters=params.pop("iters", 20), **params)
        attack.prepare(context(data, model, cache, seed=seed, spec=spec, calls=calls))
        return attack

    first = build()
    assert len(calls) == 1
    assert torch.equal(build().pattern, first.pattern) and len(calls) == 1, "same spec: loaded, not rebuilt"
    build(target=1)
    assert len(calls) == 1, "the trigger does not depend on the target label"
    build(iters=3)
    build(target_value=50.0)
    build(seed=1)
    build(spec={"dataset": "other", "model": "linear"})
    assert len(calls) == 5, "iters, target_value, seed and the case spec each key their own trigger"


def test_cnn_small_trigger_raises_the_chosen_neurons_and_is_deterministic():
    """On a seeded cnn_small (16x16 RGB), the chosen neurons are the head's most connected inputs and the
    optimised trigger moves their activations towards 100; two builds give the same trigger."""
    data = dataset(n=8, classes=4, shape=(3, 16, 16))
    model = create_model("cnn_small", 4, data.mean, data.std, seed=0).eval()
    patterns = []
    for _ in range(2):
        attack = create_attack("trojannn", iters=30)
        attack.prepare(context(data, model, None))
        patterns.append(attack.pattern)
    assert torch.equal(patterns[0], patterns[1]) and patterns[0].shape == (3, 4, 4)
    assert attack.neurons.tolist() == select_neurons(model.net.linear.weight, 2).tolist()
    before, after = attack.record["activation_before"], attack.record["activation_after"]
    cost = lambda acts: sum((a - 100) ** 2 for a in acts)  # noqa: E731
    assert cost(after) < cost(before) and max(a - b for a, b in zip(after, before)) > 0.01


def test_refuses_to_trigger_before_prepare():
    with pytest.raises(RuntimeError, match="call prepare"):
        create_attack("trojannn").apply_trigger(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))


@pytest.mark.parametrize("params,key", [({"share": 0}, "share"), ({"share": 1.0}, "share"),
                                        ({"num_neurons": 0}, "num_neurons"), ({"iters": -1}, "iters"),
                                        ({"step_size": 0}, "step_size"), ({"eps": -0.1}, "eps"),
                                        ({"init": 1.5}, "init"), ({"tolerance": -1}, "tolerance"),
                                        ({"target_value": float("nan")}, "target_value")])
def test_bad_parameters_are_named(params, key):
    with pytest.raises(ParameterError, match=f"trojannn: {key}:"):
        create_attack("trojannn", **params)


def test_share_must_leave_part_of_the_image():
    create_attack("trojannn", share=0.5).check_image_shape((1, 4, 4))  # side 3 of 4: fine
    with pytest.raises(ParameterError, match="trojannn: share: 0.8"):
        create_attack("trojannn", share=0.8).check_image_shape((1, 4, 4))  # side round(3.58) = 4
