"""FP: the channel silencer is exact on every registered model; the search keeps a copy under the accuracy
limit (one more channel would break it); the pruning survives fine-tuning and the state-dict round trip."""
import copy

import pytest
import torch

from backdoor.cache import ArtifactCache
from backdoor.defenses import create_defense
from backdoor.defenses.base import split_validation
from backdoor.defenses.fp import ChannelSilencer, accuracy, mean_channel_activation, prune_search
from backdoor.models import MODELS, create_model, roles
from backdoor.pipeline import Case, Runner, StageLog
from backdoor.training import TrainConfig

CPU = torch.device("cpu")


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
    defended, result = runner.defend(case, model, data, poisoned, runner.backdoor_spec(case, attack), log)
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
