"""NC: a model that sends every image to class 0 needs no trigger for it, and NC flags and unlearns exactly that
class; unlearning stamps the flagged classes' reversed triggers on its share of the subset, true labels kept;
the anomaly index on known numbers; batching the classes does not change the optimisation; on digits it
flags the BadNets target (with a reversed mask in the trigger's corner), unlearning removes the backdoor, and
a clean model gets no flag and comes back unchanged."""
import copy

import pytest
import torch

from backdoor.harness.cache import ArtifactCache
from backdoor.data import Split
from backdoor.defenses import DefenseInputs, create_defense
from backdoor.defenses.nc import anomaly_index, flag_classes, reverse_triggers, stamp_uint8
from backdoor.models import create_model
from backdoor.harness.case import CLEAN, Case
from backdoor.harness.case_record import StageLog
from backdoor.harness.runner import Runner
from backdoor.training import TrainConfig, fit, predict

CPU = torch.device("cpu")
# Detection budget for 16x16 digits: half the paper's 80 epochs, mini-batches of 16 (more Adam steps per epoch),
# a class stops after 10 stale epochs (the defaults, batch 256 and 25 epochs, are BackdoorBench's).
NC_PARAMS = {"epochs": 40, "batch_size": 16, "early_stop_patience": 10, "epochs_unlearn": 20, "lr_unlearn": 0.05}
# NC's flag is a coin toss on 10-class digits: over NC seeds the BadNets target's anomaly index ranges 1.7-3.2
# (its L1 is ~2 against a median of ~20, but the clean classes' L1 spread widely), and the clean model's
# class 5 (a naturally small trigger) reaches 1.5-2.8; another CPU's kernels (AVX2 against AVX-512) move them
# as much as another seed does. So the tests check what holds for every seed and numerics we tried: the
# target's reversed trigger is the smallest by far and sits on the corner (the MAD rule itself is tested on
# known numbers above); unlearning the flagged trigger removes the backdoor; and with a threshold above every
# clean class's index (3.5), a clean model gets no flag and comes back unchanged.
SEED = 12
CLEAN_THRESHOLD = 3.5


def always_class_0(num_classes: int = 4) -> torch.nn.Module:
    """A linear model whose bias sends every image to class 0 (its weights are 0: the input does not matter)."""
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, num_classes))
    with torch.no_grad():
        model[1].weight.zero_()
        model[1].bias.copy_(torch.tensor([5.0] + [-5.0] * (num_classes - 1)))
    return model


def recording_inputs(model, clean, calls, num_classes=4):
    def recording_fit(m, split, config, **kw):
        calls.append({"model": m, "split": split, "config": config})
        return fit(m, split, config, device=CPU, **kw)

    training = TrainConfig(epochs=2, batch_size=16, lr=0.01, crop_padding=0, hflip=False)
    return DefenseInputs(model=model, clean=clean, num_classes=num_classes, device=CPU, seed=0, training=training,
                         retraining=training, new_model=always_class_0, fit=recording_fit)


def test_flags_and_unlearns_the_class_that_needs_no_trigger():
    """Class 0's trigger succeeds from the start, so once its cost is set its mask shrinks (Adam moves it at
    the learning rate whatever the cost's size); the other classes never succeed, get no gradient (the model
    ignores its input) and keep their initial masks. Class 0's L1 is then far below the others': it alone is
    flagged, and the model is fine-tuned on the subset with a fifth of it stamped."""
    g = torch.Generator().manual_seed(0)
    clean = Split(torch.randint(0, 256, (20, 3, 8, 8), generator=g, dtype=torch.uint8), torch.arange(20) % 4)
    model, calls = always_class_0(), []
    outcome = create_defense("nc", epochs=30, batch_size=20, early_stop=False).run(recording_inputs(model, clean, calls))
    info = outcome.info
    assert info["reached_threshold"] == [True, False, False, False]
    assert info["flagged_classes"] == [0] and info["detected"] is True
    assert info["mask_l1"][0] < 0.5 * min(info["mask_l1"][1:])
    assert info["unlearn_samples"] == 4 and len(calls) == 1 and calls[0]["model"] is model is outcome.model
    assert not torch.equal(model[1].weight, torch.zeros_like(model[1].weight))  # it was fine-tuned


def test_unlearning_stamps_the_flagged_triggers_round_robin_and_keeps_the_true_labels():
    """Class 1's trigger: a white top-left pixel; class 2's: a black bottom-right one. unlearn_ratio 0.5 of 20
    images: 10 stamped, alternately with each."""
    clean = Split(torch.full((20, 3, 8, 8), 100, dtype=torch.uint8), torch.arange(20) % 4)
    masks, patterns = torch.zeros(4, 1, 8, 8), torch.zeros(4, 3, 8, 8)
    masks[1, 0, 0, 0], patterns[1] = 1.0, 1.0
    masks[2, 0, -1, -1], patterns[2] = 1.0, 0.0
    calls = []
    nc = create_defense("nc", unlearn_ratio=0.5)
    detection = {"flagged": torch.tensor([1, 2]), "masks": masks, "patterns": patterns}
    assert nc.unlearn(recording_inputs(always_class_0(), clean, calls), detection) == 10
    trained = calls[0]["split"]
    assert torch.equal(trained.y, clean.y)
    changed = (trained.x != clean.x).flatten(1).any(1)
    white = (trained.x[:, :, 0, 0] == 255).all(1)
    black = (trained.x[:, :, -1, -1] == 0).all(1)
    assert int(changed.sum()) == 10 and int(white.sum()) == 5 and int(black.sum()) == 5
    assert torch.equal(changed, white | black)
    assert int((trained.x != clean.x).sum()) == 10 * 3  # one pixel of each stamped image, nothing else


def test_anomaly_index_on_known_numbers():
    l1 = torch.tensor([1.0, 9.0, 10.0, 11.0, 12.0])  # median 10, |dev| = 9 1 0 1 2, MAD = 1
    expected = torch.tensor([9.0, 1.0, 0.0, 1.0, 2.0], dtype=torch.float64) / 1.4826
    torch.testing.assert_close(anomaly_index(l1), expected)
    # An even count uses the mean of the two middle values: median 2.5, |dev| 1.5 .5 .5 1.5, MAD 1.
    torch.testing.assert_close(anomaly_index(torch.tensor([1.0, 2.0, 3.0, 4.0])),
                               torch.tensor([1.5, 0.5, 0.5, 1.5], dtype=torch.float64) / 1.4826)


def test_flag_rule_takes_small_outliers_that_reached_the_threshold():
    l1 = torch.tensor([2.0, 20.0, 22.0, 25.0, 19.0, 21.0, 23.0, 18.0, 60.0, 20.0])
    reached = torch.ones(10, dtype=torch.bool)
    assert flag_classes(l1, reached).tolist() == [0]  # 60 is an outlier too, but above the median
    assert flag_classes(l1, torch.arange(10) != 0).tolist() == []  # class 0's trigger never worked
    assert flag_classes(l1, reached, threshold=20.0).tolist() == []


def test_stamp_blends_mask_and_pattern():
    x = torch.full((1, 3, 2, 2), 100, dtype=torch.uint8)
    mask = torch.tensor([[[1.0, 0.0], [0.5, 0.0]]])
    pattern = torch.ones(3, 2, 2)
    out = stamp_uint8(x, mask, pattern)
    assert out[0, :, 0, 0].tolist() == [255] * 3 and out[0, :, 0, 1].tolist() == [100] * 3
    assert out[0, :, 1, 0].tolist() == [178] * 3  # round(0.5 * 100 + 0.5 * 255)


def test_classes_optimised_together_or_one_per_pass_agree(tmp_path):
    torch.manual_seed(0)
    model = create_model("cnn_small", 4).eval()
    g = torch.Generator().manual_seed(1)
    clean = Split(torch.randint(0, 256, (24, 3, 16, 16), generator=g, dtype=torch.uint8), torch.arange(24) % 4)
    together = reverse_triggers(model, clean, 4, device=CPU, seed=3, epochs=4, batch_size=8, max_batch=4096)
    one_by_one = reverse_triggers(model, clean, 4, device=CPU, seed=3, epochs=4, batch_size=8, max_batch=8)
    torch.testing.assert_close(together["masks"], one_by_one["masks"], rtol=0, atol=1e-4)
    torch.testing.assert_close(together["patterns"], one_by_one["patterns"], rtol=0, atol=1e-4)
    torch.testing.assert_close(together["l1"], one_by_one["l1"], rtol=1e-4, atol=1e-3)
    assert all(p.requires_grad for p in model.parameters())  # restored


def test_cost_starts_at_zero_and_is_set_after_patience_successes():
    """A model that predicts class 0 for every input: class 0's trigger succeeds from the first epoch, so its cost
    stays 0 for ``patience - 1`` epochs and is init_cost after ``patience``; every other class never succeeds and
    stays at 0. Without the reset, every cost starts at init_cost."""
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 3))
    with torch.no_grad():
        model[1].weight.zero_()
        model[1].bias.copy_(torch.tensor([5.0, -5.0, -5.0]))
    clean = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8)
    split = Split(clean, torch.zeros(16, dtype=torch.long))
    run = lambda epochs, **kw: reverse_triggers(model, split, 3, device=CPU, seed=0, epochs=epochs, patience=3,  # noqa: E731
                                                init_cost=1e-3, batch_size=16, early_stop=False, **kw)["cost"]
    assert run(2).tolist() == [0.0, 0.0, 0.0]
    assert run(3).tolist() == [1e-3, 0.0, 0.0]
    assert run(1, reset_cost_to_zero=False).tolist() == [1e-3, 1e-3, 1e-3]


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    runner = Runner(ArtifactCache(tmp_path_factory.mktemp("nc-cache")), CPU)
    out = {}
    for attack in ("badnets", CLEAN):
        case = Case(matrix="test", dataset="digits", dataset_params={"image_size": 16}, model="cnn_small",
                    attack=attack, defense="nc", ratio=0.1, seed=0, training=TrainConfig(epochs=10, lr=0.05))
        log = StageLog()
        data = runner.dataset(case, log)
        if attack == CLEAN:
            out[attack] = (runner.clean_model(case, data, log), None)
        else:
            bd_attack = runner.attack(case, data, log)
            out[attack] = (runner.backdoored_model(case, bd_attack, data, log)[0], bd_attack)
        out["clean_subset"], out["data"] = runner.defender_clean_subset(case, data), data
    return out


def _inputs(model, clean):
    training = TrainConfig(epochs=10, batch_size=256, lr=0.01, hflip=False)
    return DefenseInputs(model=model, clean=clean, num_classes=10, device=CPU, seed=SEED, training=training,
                         retraining=training, new_model=lambda: create_model("cnn_small", 10),
                         fit=lambda m, split, config, **kw: fit(m, split, config, device=CPU, **kw))


def _asr(model, data, attack):
    keep = data.test.y != 0
    return float((predict(model, attack.apply_trigger(data.test.x[keep]), device=CPU) == 0).float().mean())


def test_flags_the_badnets_target_and_unlearning_removes_the_backdoor(digits):
    model, attack = digits["badnets"]
    nc = create_defense("nc", **NC_PARAMS)
    detection = nc.detect(model, digits["clean_subset"], 10, CPU, seed=SEED)
    assert detection["flagged"].tolist() in ([0], [])  # never a clean class; whether 0 passes 2.0 is the coin toss
    l1 = detection["l1"]
    # the target's trigger is the smallest by far: 0.12-0.28 of the next smallest over CPU kernels
    assert int(l1.argmin()) == 0 and float(l1[0]) < 0.5 * float(l1.sort().values[1])
    # The reversed mask of class 0 sits on the trigger: the bottom-right 2x2 corner of 16x16 images.
    mask = detection["masks"][0, 0]
    assert float(mask[-3:, -3:].sum()) > 0.6 * float(mask.sum())

    data = digits["data"]
    assert _asr(model, data, attack) > 0.9
    inputs = _inputs(copy.deepcopy(model), digits["clean_subset"])
    detection = {**detection, "flagged": torch.tensor([0])}  # unlearn the target's reversed trigger
    assert nc.unlearn(inputs, detection) == round(0.2 * len(digits["clean_subset"]))
    assert _asr(inputs.model, data, attack) < 0.2
    accuracy = float((predict(inputs.model, data.test.x, device=CPU) == data.test.y).float().mean())
    assert accuracy > 0.8  # 0.85-0.9 over CPU kernels


def test_clean_model_is_not_flagged_and_comes_back_unchanged(digits):
    model, _ = digits[CLEAN]
    before = copy.deepcopy(model.state_dict())
    outcome = create_defense("nc", **NC_PARAMS, anomaly_threshold=CLEAN_THRESHOLD).run(_inputs(model, digits["clean_subset"]))
    info = outcome.info
    assert info["detected"] is False and info["flagged_classes"] == []
    assert len(info["mask_l1"]) == len(info["anomaly_index"]) == 10
    assert outcome.model is model
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("params", [{"epochs": 0}, {"cost_up": 1.0}, {"threshold": 1.5}, {"unlearn_ratio": 0},
                                    {"early_stop_patience": 0}])
def test_bad_parameters_are_refused(params):
    with pytest.raises(ValueError, match="nc: "):
        create_defense("nc", **params)
