"""FP: on a hand-built model whose backdoor channel is dormant on clean data, FP prunes exactly that channel and
the backdoor is gone; the channel silencer is exact on every registered model; the search keeps a copy under
the accuracy limit (one more channel would break it); the pruning survives fine-tuning and the state-dict round
trip."""
import copy

import pytest
import torch
from torch import nn

from backdoor.harness.cache import ArtifactCache
from backdoor.data import Split
from backdoor.defenses import DefenseInputs, create_defense
from backdoor.defenses.base import split_validation
from backdoor.defenses.fp import ChannelSilencer, accuracy, mean_channel_activation, prune_search
from backdoor.models import MODELS, Classifier, LayerRoles, create_model, roles
from backdoor.harness.case import Case
from backdoor.harness.case_record import StageLog
from backdoor.harness import specs
from backdoor.harness.runner import Runner
from backdoor.training import TrainConfig, fit, predict

CPU = torch.device("cpu")


def dormant_backdoor_model() -> Classifier:
    """1x1 conv -> ReLU (the last block) -> mean pool -> linear. Channel 0 = R - G votes class 0, channel 1 =
    G - R votes class 1, channel 2 = 4B - 2 fires only where blue is above 0.5 (the trigger) and votes class 0
    ten times harder: clean images have no blue, so it is the least active channel on clean data. A third
    class, at a constant logit of 1, takes the images whose class channel is silenced."""
    net = nn.Sequential()
    net.add_module("conv", nn.Conv2d(3, 3, 1))
    net.add_module("relu", nn.ReLU())
    net.add_module("pool", nn.AdaptiveAvgPool2d(1))
    net.add_module("flat", nn.Flatten())
    net.add_module("fc", nn.Linear(3, 3))
    with torch.no_grad():
        net.conv.weight.copy_(torch.tensor([[1.0, -1, 0], [-1, 1, 0], [0, 0, 4]])[:, :, None, None])
        net.conv.bias.copy_(torch.tensor([0.0, 0, -2]))
        net.fc.weight.copy_(torch.tensor([[10.0, 0, 100], [0, 10, 0], [0, 0, 0]]))
        net.fc.bias.copy_(torch.tensor([0.0, 0, 1]))
    return Classifier(net, (0.0,) * 3, (1.0,) * 3, LayerRoles(("conv", "conv", "conv"), "relu", "fc"), arch="toy")


def red_green_images(n: int = 40) -> Split:
    """Class 0 reddish, class 1 greenish, no blue; 4x4."""
    g = torch.Generator().manual_seed(0)
    y = torch.arange(n) % 2
    x = torch.zeros(n, 3, 4, 4)
    x[:, :2] = 0.2 + 0.1 * torch.rand(n, 2, 4, 4, generator=g)
    x[y == 0, 0] += 0.5
    x[y == 1, 1] += 0.5
    return Split((x * 255).round().to(torch.uint8), y)


def with_trigger(x: torch.Tensor) -> torch.Tensor:
    x = x.clone()
    x[:, 2, -2:, -2:] = 255
    return x


def test_fp_prunes_exactly_the_dormant_backdoor_channel():
    """Pruning channel 2 keeps validation accuracy at 1; pruning either class channel next loses that class's
    validation images (accuracy below 0.9 of 1), so the search stops after one channel. With no fine-tuning the
    returned model is that pruning."""
    model, clean = dormant_backdoor_model(), red_green_images()
    triggered = with_trigger(clean.x[clean.y == 1])
    assert torch.equal(predict(model, clean.x, device=CPU), clean.y)
    assert (predict(model, triggered, device=CPU) == 0).all()  # the backdoor works
    budget = TrainConfig(epochs=1, batch_size=64, crop_padding=0, hflip=False)
    inputs = DefenseInputs(model=model, clean=clean, num_classes=3, device=CPU, seed=0, training=budget,
                           retraining=budget, new_model=dormant_backdoor_model,
                           fit=lambda m, split, config, **kw: fit(m, split, config, device=CPU, **kw))
    outcome = create_defense("fp", epochs=0).run(inputs)
    assert outcome.info["pruned_channel_ids"] == [2] and outcome.info["total_channels"] == 3
    assert outcome.info["val_acc_before"] == outcome.info["val_acc_pruned"] == 1.0
    assert outcome.info["val_acc_next"] < 0.9  # one class's images all go to class 2
    assert (predict(outcome.model, triggered, device=CPU) == 1).all()  # the backdoor is gone
    assert torch.equal(predict(outcome.model, clean.x, device=CPU), clean.y)
    assert torch.equal(outcome.model.net.fc.weight[:, 2], torch.zeros(3))


def _logits_with_block_offset(model, x, channels, offset):
    """Logits when ``offset`` is added to the given output channels of the last conv block."""
    def hook(_m, _i, out):
        out = out.clone()
        out[:, channels] += offset
        return out

    handle = roles.last_conv(model).register_forward_hook(hook)
    try:
        with torch.no_grad():
            return model(x)
    finally:
        handle.remove()


@pytest.mark.parametrize("name", MODELS.names())
def test_silencer_removes_exactly_the_pruned_channels(name):
    torch.manual_seed(0)
    model = create_model(name, 10).eval()
    x = torch.rand(2, 3, 32, 32)
    silencer = ChannelSilencer.probe(model, x[:1])
    channels = torch.arange(0, silencer.num_channels, 3)
    silencer.silence(model, channels)
    with torch.no_grad():
        base = model(x)
    noisy = _logits_with_block_offset(model, x, channels, 5 * torch.randn(2, len(channels), 1, 1))
    torch.testing.assert_close(noisy, base, rtol=0, atol=0)
    kept = torch.tensor([1])  # not a multiple of 3: still live
    assert not torch.allclose(_logits_with_block_offset(model, x, kept, 5.0), base)


@pytest.fixture(scope="module")
def backdoored(tmp_path_factory):
    runner = Runner(ArtifactCache(tmp_path_factory.mktemp("fp-cache")), CPU)
    case = Case(matrix="test", dataset="digits", model="cnn_small", attack="badnets", defense="fp", ratio=0.1,
                seed=0, training=TrainConfig(epochs=10, lr=0.05),
                defense_training=TrainConfig(epochs=4, batch_size=256, lr=0.01), defense_params={"step_fraction": 0.01})
    log = StageLog()
    data = runner.dataset(case, log)
    attack = runner.attack(case, data, log)
    model, poisoned = runner.backdoored_model(case, attack, data, log)
    return runner, case, data, attack, model, poisoned


def test_search_keeps_a_copy_under_the_limit_and_one_more_channel_breaks_it(backdoored):
    runner, case, data, _attack, model, _ = backdoored
    clean = runner.defender_clean_subset(case, data)
    train, val = split_validation(clean, 0.2, seed=3)
    order = torch.sort(mean_channel_activation(model, train.x, device=CPU), stable=True).indices
    silencer = ChannelSilencer.probe(model, train.x[:1].float() / 255)
    original = copy.deepcopy(model.state_dict())

    pruned, info = prune_search(model, silencer, order, val, device=CPU, step=1, max_drop=0.1)

    for k, v in model.state_dict().items():  # the input model is untouched
        assert torch.equal(v, original[k]), k
    assert pruned is not model
    assert all(p.data_ptr() != q.data_ptr() for p, q in zip(pruned.parameters(), model.parameters()))
    k = info["pruned_channels"]
    assert 0 < k < silencer.num_channels
    limit = 0.9 * info["val_acc_before"]
    assert info["val_acc_limit"] == pytest.approx(limit)
    assert accuracy(pruned, val, CPU) == info["val_acc_pruned"] >= limit
    one_more = copy.deepcopy(pruned)
    silencer.silence(one_more, order[k:k + 1])
    assert accuracy(one_more, val, CPU) == info["val_acc_next"] < limit
    # The least active channels went first, and the kept copy has exactly them silenced.
    x = clean.x[:8].float() / 255
    with torch.no_grad():
        base = pruned(x)
    torch.testing.assert_close(_logits_with_block_offset(pruned, x, order[:k], 3.0), base, rtol=0, atol=0)
    assert not torch.allclose(_logits_with_block_offset(pruned, x, order[k:k + 1], 3.0), base)


def test_defense_output_keeps_channels_silent_after_fine_tuning_and_reload(backdoored):
    runner, case, data, attack, model, poisoned = backdoored
    log = StageLog()
    defended, result = runner.defend(case, model, data, poisoned, specs.backdoor_spec(case, attack), log)
    info = result["info"]
    assert info["total_channels"] == 64 and info["step"] == 1
    assert len(info["pruned_channel_ids"]) == info["pruned_channels"] > 0
    assert info["val_acc_pruned"] >= info["val_acc_limit"]
    # ``defended`` was rebuilt from its state dict by the harness: the pruning lives in the parameters.
    pruned = torch.tensor(info["pruned_channel_ids"])
    x = data.train.x[:8].float() / 255
    with torch.no_grad():
        base = defended(x)
    torch.testing.assert_close(_logits_with_block_offset(defended, x, pruned, 4.0), base, rtol=0, atol=0)
    # Fine-tuning did change the model (the other weights moved).
    assert not torch.equal(defended.net.fc[1].weight, model.net.fc[1].weight)


@pytest.mark.parametrize("params", [{"step_fraction": 0}, {"max_drop": 1.0}, {"val_fraction": 1.0}, {"lr": -1}])
def test_bad_parameters_are_refused(params):
    with pytest.raises(ValueError, match="fp: "):
        create_defense("fp", **params)
