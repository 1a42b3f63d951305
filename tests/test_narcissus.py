"""Narcissus: a universal L-inf trigger that lowers a surrogate's target-class loss, added to target-class samples
(labels kept), magnified x test_multiplier at test time; surrogate and trigger cached by spec."""
import copy

import pytest
import torch

from backdoor.attacks import ATTACKS, AttackContext, create_attack
from backdoor.attacks.narcissus import add_levels, synthesise_trigger, target_loss, warm_up
from backdoor.data import load_dataset
from backdoor.harness.cache import ArtifactCache
from backdoor.models import create_model
from backdoor.training import TrainConfig, fit

CONFIG = TrainConfig(epochs=2, lr=0.05, batch_size=64)
TINY = dict(target=1, eps=4, trigger_epochs=12, lr=4.0, batch_size=8, warmup_epochs=1)  # 36 trigger steps


@pytest.fixture(scope="module")
def data():
    return load_dataset("synthetic", num_classes=4, train_size=96, test_size=16, image_size=16)


def context(data, cache, seed=5, calls=None):
    def new_model():
        if calls is not None:
            calls.append(1)
        return create_model("cnn_small", 4, data.mean, data.std, seed=seed)

    return AttackContext(dataset=data, device=torch.device("cpu"), seed=seed, training=CONFIG, model_name="cnn_small",
                         cached=lambda kind, spec, build: cache.get_or_build(kind, spec, build)[0],
                         clean_model=None, spec={"dataset": "synthetic-test", "model": "cnn_small"},
                         new_model=new_model)


@pytest.fixture(scope="module")
def prepared(data, tmp_path_factory):
    root = tmp_path_factory.mktemp("narcissus")
    attack = create_attack("narcissus", **TINY)
    attack.prepare(context(data, ArtifactCache(root)))
    return attack, root


def test_registered_as_clean_label_and_refuses_all_to_all():
    assert "narcissus" in ATTACKS.names() and create_attack("narcissus").kind == "clean_label"
    with pytest.raises(ValueError, match="clean-label"):
        create_attack("narcissus", target="all-to-all")


def test_trigger_is_whole_grey_levels_within_the_budget_and_uses_it(prepared):
    attack, _ = prepared
    delta = attack.delta
    assert delta.dtype == torch.int16 and tuple(delta.shape) == (3, 16, 16)
    assert int(delta.abs().max()) == 4, "the trigger reaches the eps budget (4 grey levels) and never exceeds it"
    assert attack.material_meta["max_level"] == 4


def test_poisoning_adds_exactly_delta_to_the_selected_target_samples_only(prepared, data):
    attack, _ = prepared
    train = data.train
    p = attack.poison_train(train, 0.125, seed=0)  # 12 of 96, all from class 1 (24 samples)
    assert int(p.mask.sum()) == 12 and (train.y[p.mask] == 1).all()
    assert torch.equal(p.y, train.y), "clean label: no label changes"
    assert torch.equal(p.x[~p.mask], train.x[~p.mask]), "unselected samples untouched"
    expected = (train.x[p.mask].int() + attack.delta.int()).clamp(0, 255).to(torch.uint8)
    assert torch.equal(p.x[p.mask], expected)
    again = attack.poison_train(train, 0.125, seed=0)
    assert torch.equal(again.mask, p.mask) and torch.equal(again.x, p.x), "seeded"


def test_test_trigger_is_the_magnified_delta(prepared):
    attack, _ = prepared
    x = torch.full((2, 3, 16, 16), 128, dtype=torch.uint8)
    out = attack.apply_trigger(x)
    assert (out.int() - 128 == 3 * attack.delta.int()).all(), "x + 3 delta (no clipping at 128 +- 12)"
    half = copy.copy(attack)
    half.test_multiplier = 0.5
    assert (half.apply_trigger(x).int() - 128 == (0.5 * attack.delta.float()).round().int()).all()
    edge = attack.apply_trigger(torch.full((1, 3, 16, 16), 250, dtype=torch.uint8)).int()
    assert torch.equal(edge[0], (250 + 3 * attack.delta.int()).clamp(0, 255)), "clipped to [0, 255]"


def test_add_levels_known_answer():
    x = torch.tensor([[[[0, 10, 250, 255]]]], dtype=torch.uint8)
    levels = torch.tensor([[[-3, 5, 9, -300]]])
    assert add_levels(x, levels).tolist() == [[[[0, 15, 255, 0]]]]


def test_optimisation_lowers_the_surrogate_target_loss(data):
    model = create_model("cnn_small", 4, data.mean, data.std, seed=0)
    fit(model, data.train, TrainConfig(epochs=5, lr=0.05, batch_size=32), device=torch.device("cpu"), seed=0)
    x = data.train.x[data.train.y == 2][:16]
    delta = synthesise_trigger(copy.deepcopy(model), x, 2, eps=16, lr=8.0, epochs=10, batch_size=8, seed=0)
    assert delta.abs().max() <= 16 + 1e-4, "projected onto the eps ball"
    before = target_loss(model, x, 2)
    after = target_loss(model, x, 2, delta.round())
    assert after < 0.8 * before, (before, after)
    assert target_loss(model, x, 2, -delta.round()) > before, "the opposite perturbation raises it"


def test_material_is_the_warmed_up_surrogate_then_the_trigger(prepared, data):
    """Known answer: the cached surrogate, warmed up and handed to synthesise_trigger with the attack's seeds."""
    attack, root = prepared
    ctx = context(data, ArtifactCache(root))
    surrogate = attack._surrogate(ctx)
    x = data.train.x[data.train.y == 1]
    before = target_loss(surrogate, x, 1)
    warm_up(surrogate, x, 1, epochs=1, lr=0.001, batch_size=8, config=CONFIG, seed=ctx.seed + 1)
    assert attack.material_meta["loss_pretrained"] == pytest.approx(before)
    assert attack.material_meta["loss_warmed_up"] == pytest.approx(target_loss(surrogate, x, 1))
    assert attack.material_meta["loss_warmed_up"] != pytest.approx(before), "the warm-up changed the surrogate"
    delta = synthesise_trigger(surrogate, x, 1, eps=4, lr=4.0, epochs=12, batch_size=8, seed=ctx.seed + 2)
    assert torch.equal(attack.delta, delta.round().to(torch.int16))


def test_surrogate_is_trained_on_the_training_set_from_redrawn_weights(prepared, data):
    attack, root = prepared
    ctx = context(data, ArtifactCache(root))
    surrogate = attack._surrogate(ctx)
    fresh = ctx.new_model()
    first = next(name for name, _ in fresh.named_parameters())
    assert not torch.equal(surrogate.state_dict()[first], fresh.state_dict()[first])
    with torch.no_grad():
        acc = (surrogate(data.train.x.float() / 255).argmax(1) == data.train.y).float().mean()
    assert acc > 0.5, "a trained K-way classifier of the training set"


def test_material_is_cached_by_spec(prepared, data):
    attack, root = prepared
    cache = ArtifactCache(root)
    calls = []
    same = create_attack("narcissus", **TINY, test_multiplier=5.0, cap_ratio=True)  # same material
    same.prepare(context(data, cache, calls=calls))
    assert calls == [] and torch.equal(same.delta, attack.delta), "loaded, not rebuilt"
    other = create_attack("narcissus", **{**TINY, "eps": 2})
    other.prepare(context(data, cache, calls=calls))
    assert calls == [1], "another eps is another trigger on the cached surrogate (loaded: one new_model call)"
    assert int(other.delta.abs().max()) == 2
    assert len([d for d in (root / "narcissus_trigger").iterdir() if d.is_dir()]) == 2
    assert len([d for d in (root / "narcissus_surrogate").iterdir() if d.is_dir()]) == 1


def test_misuse(data, tmp_path):
    attack = create_attack("narcissus", **TINY)
    with pytest.raises(RuntimeError, match="prepare"):
        attack.apply_trigger(data.test.x[:2])
    attack.delta = torch.zeros(3, 8, 8, dtype=torch.int16)
    with pytest.raises(ValueError, match="shape"):
        attack.poison_images(data.train.x[:2], torch.arange(2))
    collapsing = create_attack("narcissus", **{**TINY, "warmup_epochs": 3, "warmup_lr": 5.0})
    with pytest.raises(ValueError, match="all zero"):
        collapsing.prepare(context(data, ArtifactCache(tmp_path)))


@pytest.mark.parametrize("bad", [{"eps": 0}, {"eps": 256}, {"eps": 2.5}, {"test_multiplier": 0}, {"lr": 0},
                                 {"trigger_epochs": -1}, {"batch_size": 0}, {"warmup_epochs": -1},
                                 {"warmup_lr": 0}, {"surrogate_epochs": 0}])
def test_bad_parameters_raise(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        create_attack("narcissus", **bad)
