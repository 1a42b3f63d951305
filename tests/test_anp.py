"""ANP: the defense zeroes the batch-norm weight of exactly the channels its learned masks put below the threshold;
the masked/perturbed batch norm computes what the paper says; on a BadNets model the masks fall on the
channels the trigger drives and pruning zeroes those below 0.2; models without batch norm are n/a."""
import copy

import pytest
import torch
import torch.nn.functional as F

from backdoor.harness.cache import ArtifactCache
from backdoor.data import Split
from backdoor.defenses import DefenseInputs, NotApplicable, create_defense
from backdoor.defenses.anp import NeuronMasks, optimize_masks, prune_by_threshold
from backdoor.models import create_model, roles
from backdoor.harness.case import Case
from backdoor.harness.case_record import StageLog
from backdoor.harness.runner import Runner
from backdoor.training import TrainConfig, fit

CPU = torch.device("cpu")


def test_run_prunes_exactly_the_channels_whose_masks_fall_below_the_threshold():
    """The masks the defense learns are ``optimize_masks``' with its seed and budget; with the threshold at
    their median, the channels below it (and only they) get a zero batch-norm weight, the rest keep theirs."""
    model = create_model("cnn_small", 10, seed=0)
    g = torch.Generator().manual_seed(0)
    clean = Split(torch.randint(0, 256, (32, 3, 16, 16), generator=g, dtype=torch.uint8), torch.arange(32) % 10)
    inputs = _inputs(copy.deepcopy(model), clean)
    masks = optimize_masks(copy.deepcopy(model), clean, device=CPU, seed=inputs.seed, iterations=5, batch_size=16,
                           crop_padding=inputs.training.crop_padding, hflip=inputs.training.hflip)
    threshold = float(torch.cat(list(masks.values())).median())
    below = {name: m < threshold for name, m in masks.items()}
    count = sum(int(b.sum()) for b in below.values())
    assert 0 < count < 112
    outcome = create_defense("anp", iterations=5, batch_size=16, threshold=threshold).run(inputs)
    assert outcome.info["pruned_channels"] == count and outcome.info["total_channels"] == 112
    original = dict(roles.batchnorm_layers(model))
    for name, bn in roles.batchnorm_layers(outcome.model):
        expected = torch.where(below[name], 0.0, original[name].weight.detach())
        assert torch.equal(bn.weight.detach(), expected), name


def test_masked_and_perturbed_batch_norm_on_known_values():
    torch.manual_seed(0)
    model = create_model("cnn_small", 10).eval()
    x = torch.rand(6, 3, 32, 32)
    name, bn = roles.batchnorm_layers(model)[0]
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
        reference = copy.deepcopy(model).train()(x)  # batch statistics, as during the mask optimisation
    masks = NeuronMasks(model, CPU)
    with masks.applied(), torch.no_grad():
        torch.testing.assert_close(model(x), reference)  # masks 1, no noise: the model itself

        store = {}
        handle = bn.register_forward_hook(lambda _m, _i, out: store.__setitem__(name, out.clone()))  # before ReLU
        try:
            masks.masks[0][3] = 0.0  # a zero mask leaves the channel its bias
            model(x)
            assert torch.allclose(store[name][:, 3], bn.bias[3].expand_as(store[name][:, 3]))
            masks.masks[0][3] = 0.5
            masks.noise_w[0][3], masks.noise_b[0][3] = 0.25, -0.4
            masks.perturbed = True
            model(x)
            inp = model.net.block1[0][0]((x - model.mean) / model.std)  # the conv feeding this batch norm
            normed = F.batch_norm(inp, None, None, training=True, eps=bn.eps)[:, 3]
            expected = normed * bn.weight[3] * (0.5 + 0.25) + bn.bias[3] * (1 - 0.4)
            torch.testing.assert_close(store[name][:, 3], expected)
        finally:
            handle.remove()
    # The hooks are gone and the running statistics were never touched.
    torch.testing.assert_close(model(x), copy.deepcopy(model).eval()(x))
    # With running statistics, masks of 1 and no noise reproduce the deployed (eval-mode) model.
    with NeuronMasks(model, CPU, batch_stats=False).applied(), torch.no_grad():
        torch.testing.assert_close(model(x), copy.deepcopy(model).eval()(x))


def test_pruning_zeroes_exactly_the_low_mask_weights():
    torch.manual_seed(0)
    model = create_model("cnn_small", 10)
    layers = roles.batchnorm_layers(model)
    masks = {name: torch.ones(bn.num_features) for name, bn in layers}
    masks[layers[1][0]][[2, 5]] = torch.tensor([0.1, 0.19])
    masks[layers[2][0]][7] = 0.2  # not below the threshold
    before = {name: bn.weight.detach().clone() for name, bn in layers}
    pruned = prune_by_threshold(model, masks, 0.2)
    assert pruned == {layers[0][0]: [], layers[1][0]: [2, 5], layers[2][0]: []}
    for name, bn in layers:
        expected = before[name].clone()
        expected[pruned[name]] = 0.0
        assert torch.equal(bn.weight.detach(), expected)


def test_noise_is_not_clipped_after_the_ascent_step(monkeypatch):
    """As in ANP's and BackdoorBench's code: uniform start in [-eps, eps], one signed step of eps, no clip."""
    import backdoor.defenses.anp as anp

    made = []

    class Recording(anp.NeuronMasks):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(anp, "NeuronMasks", Recording)
    torch.manual_seed(0)
    model = create_model("cnn_small", 10)
    g = torch.Generator().manual_seed(0)
    clean = Split(torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8, generator=g), torch.arange(16) % 10)
    optimize_masks(model, clean, device=CPU, seed=0, iterations=1, eps=0.4, batch_size=16, hflip=False)
    # Weight noise (a fresh model's batch-norm biases are 0, so the bias noise gets no gradient and stays put).
    noise = torch.cat([t.detach().flatten() for t in made[0].noise_w])
    assert float(noise.abs().max()) <= 0.8 + 1e-6
    assert float((noise.abs() > 0.4).float().mean()) > 0.25  # about half the coordinates step past eps


@pytest.fixture(scope="module")
def backdoored(tmp_path_factory):
    runner = Runner(ArtifactCache(tmp_path_factory.mktemp("anp-cache")), CPU)
    case = Case(matrix="test", dataset="digits", model="cnn_small", attack="badnets", defense="anp", ratio=0.1,
                seed=0, training=TrainConfig(epochs=10, lr=0.05))
    log = StageLog()
    data = runner.dataset(case, log)
    attack = runner.attack(case, data, log)
    model, _ = runner.backdoored_model(case, attack, data, log)
    return model, attack, data, runner.defender_clean_subset(case, data)


def _inputs(model, clean):
    training = TrainConfig(epochs=1, batch_size=256, lr=0.01, hflip=False)
    return DefenseInputs(model=model, clean=clean, num_classes=10, device=CPU, seed=1, training=training,
                         retraining=training, new_model=lambda: create_model("cnn_small", 10),
                         fit=lambda m, split, config, **kw: fit(m, split, config, device=CPU, **kw))


def test_masks_fall_on_the_channels_the_trigger_drives(backdoored):
    model, attack, _data, clean = backdoored
    masks = optimize_masks(copy.deepcopy(model), clean, device=CPU, seed=1, iterations=100, batch_size=32,
                           hflip=False)
    # Channels of the last batch norm that the trigger drives hardest (10%) are masked much more than the rest.
    name = roles.batchnorm_layers(model)[-1][0]
    with torch.no_grad(), roles.capture_outputs(model, [name]) as store:
        model(clean.x.float() / 255)
        plain = store[name].relu().mean((0, 2, 3))
        model(attack.apply_trigger(clean.x).float() / 255)
        triggered = store[name].relu().mean((0, 2, 3))
    driven = (triggered - plain).argsort(descending=True)[:len(plain) // 10]
    rest = torch.ones(len(plain), dtype=torch.bool)
    rest[driven] = False
    low_driven = float((masks[name][driven] < 0.5).float().mean())
    low_rest = float((masks[name][rest] < 0.5).float().mean())
    assert float(masks[name][driven].mean()) < float(masks[name][rest].mean()) - 0.2
    assert low_driven > 3 * low_rest
    assert float(masks[name][rest].mean()) < 1.0  # masks moved at all

    # The defense prunes (zeroes the batch-norm weight of) exactly the channels whose mask fell below 0.2.
    outcome = create_defense("anp", iterations=100, batch_size=32).run(_inputs(copy.deepcopy(model), clean))
    info = outcome.info
    assert 0 < info["pruned_channels"] < info["total_channels"] == 16 + 32 + 64
    assert info["pruned_channels"] == sum(int((m < 0.2).sum()) for m in masks.values())  # same seed, same masks
    zeroed = sum(int((bn.weight == 0).sum()) for _, bn in roles.batchnorm_layers(outcome.model))
    assert zeroed == info["pruned_channels"]


def test_model_without_batch_norm_is_not_applicable():
    vgg = create_model("vgg19", 10)
    clean = Split(torch.zeros(4, 3, 32, 32, dtype=torch.uint8), torch.arange(4))
    with pytest.raises(NotApplicable, match="no batch-norm"):
        create_defense("anp").run(_inputs(vgg, clean))


@pytest.mark.parametrize("params", [{"iterations": 0}, {"eps": -0.1}, {"alpha": 2}, {"threshold": 1.5}])
def test_bad_parameters_are_refused(params):
    with pytest.raises(ValueError, match="anp: "):
        create_defense("anp", **params)
