"""LIRA: the eps-bounded generator trigger (known answers with set generator weights), stage 1's two steps, the
material cached by spec, per-batch poisoning, the fixed poisoned set and its mask."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from backdoor._checks import ParameterError
from backdoor.attacks import ATTACKS, AttackContext, create_attack
from backdoor.attacks.lira import TriggerGenerator, classifier_loss, generator_step, joint_logits, perturb
from backdoor.data import load_dataset
from backdoor.harness.cache import ArtifactCache
from backdoor.models import create_model
from backdoor.training import TrainConfig

CONFIG = TrainConfig(epochs=2, lr=0.05, batch_size=32)


@pytest.fixture(scope="module")
def data():
    return load_dataset("synthetic", num_classes=4, train_size=64, test_size=16, image_size=16)


def context(data, cache, seed=3, calls=None):
    def new_model():
        if calls is not None:
            calls.append(1)
        return create_model("cnn_small", 4, data.mean, data.std, seed=seed)

    return AttackContext(dataset=data, device=torch.device("cpu"), seed=seed, training=CONFIG, model_name="cnn_small",
                         cached=lambda kind, spec, build: cache.get_or_build(kind, spec, build)[0],
                         clean_model=lambda: pytest.fail("lira needs no clean model"),
                         spec={"dataset": "synthetic-test", "model": "cnn_small"}, new_model=new_model)


def constant_generator(channels: int, value: float) -> TriggerGenerator:
    """A generator whose last layer has zero weights and bias ``value``: T(x) = tanh(value) everywhere."""
    gen = TriggerGenerator(channels, (0.5,) * channels, (0.25,) * channels)
    last = gen.decoder[-1]
    nn.init.zeros_(last.weight)
    nn.init.constant_(last.bias, value)
    return gen.eval()


def with_generator(gen: TriggerGenerator, **kw):
    attack = create_attack("lira", **kw)
    attack.load_state_tensors({f"G.{k}": v for k, v in gen.state_dict().items()})  # the state round trip
    return attack


def test_registered_as_training_controllable_with_all_to_all():
    assert "lira" in ATTACKS.names() and create_attack("lira").kind == "training_controllable"
    a = create_attack("lira", target="all-to-all")
    a.num_classes = 4
    assert a.relabel(torch.tensor([0, 1, 3])).tolist() == [1, 2, 0]


def test_zeroed_generator_leaves_images_unchanged_and_a_saturated_one_adds_eps():
    x = torch.tensor([0, 1, 2, 100, 253, 254, 255], dtype=torch.uint8).view(1, 1, 1, 7).expand(2, 3, 16, 7).clone()
    x = torch.cat([x, x[..., :1]], dim=-1)[..., :7]  # 16x7: sides not multiples of 16 are padded for T
    assert torch.equal(with_generator(constant_generator(3, 0.0)).apply_trigger(x), x), "T = 0: x' = x"
    # T = tanh(100) = 1: +0.01 * 255 = 2.55 grey levels, rounded to 3, clipped at 255.
    up = with_generator(constant_generator(3, 100.0)).apply_trigger(x)
    assert up[0, 0, 0].tolist() == [3, 4, 5, 103, 255, 255, 255]
    down = with_generator(constant_generator(3, -100.0), eps=0.004).apply_trigger(x)  # 1.02 grey levels -> 1
    assert down[0, 0, 0].tolist() == [0, 0, 1, 99, 252, 253, 254]
    assert up.shape == x.shape and up.dtype == torch.uint8


def test_perturbation_is_bounded_by_eps_in_grey_levels_after_rounding():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (8, 3, 32, 32), generator=g, dtype=torch.uint8)
    torch.manual_seed(0)
    gen = TriggerGenerator(3, (0.5,) * 3, (0.25,) * 3)
    with torch.no_grad():
        gen.decoder[-1].weight.mul_(1000)  # saturate tanh: |T| ~ 1 on most pixels, both signs
    for eps, bound in ((0.01, 3), (0.02, 5)):  # round(2.55) = 3, round(5.1) = 5
        change = with_generator(gen, eps=eps).apply_trigger(x).int() - x.int()
        assert int(change.abs().max()) == bound
        assert (change > 0).any() and (change < 0).any()


def test_generator_step_decreases_the_backdoor_loss_and_leaves_the_classifier():
    torch.manual_seed(0)
    x = torch.rand(16, 1, 16, 16) * 0.5 + 0.25
    clf = nn.Sequential(nn.Flatten(), nn.Linear(256, 3))
    before = [p.detach().clone() for p in clf.parameters()]
    live = TriggerGenerator(1, (0.5,), (0.25,)).train()
    opt = torch.optim.Adam(live.parameters(), lr=0.01)
    target = torch.full((16,), 2)
    losses = [generator_step(live, clf, opt, x, target, eps=0.1) for _ in range(15)]
    assert losses[-1] < losses[0] - 0.05, losses
    assert all(torch.equal(a, b) for a, b in zip(before, clf.parameters())), "f is not stepped"


def test_classifier_loss_weighs_clean_and_poisoned_cross_entropy_by_alpha():
    torch.manual_seed(0)
    x = torch.rand(6, 3, 16, 16)
    y, target = torch.tensor([0, 1, 2, 0, 1, 2]), torch.full((6,), 1)
    clf = nn.Sequential(nn.Flatten(), nn.Linear(768, 3))
    gen = constant_generator(3, 100.0)  # T = 1: x' = clip(x + eps)
    clean = F.cross_entropy(clf(x), y)
    poisoned = F.cross_entropy(clf((x + 0.05).clamp(0, 1)), target)
    for alpha in (0.5, 0.2):
        got = classifier_loss(clf, gen, x, y, target, eps=0.05, alpha=alpha)
        assert float(got.detach()) == pytest.approx(float((alpha * clean + (1 - alpha) * poisoned).detach()), rel=1e-5)
    assert float(perturb(gen, x, 0.05).sub(x).max().detach()) == pytest.approx(0.05, abs=1e-6)


def test_clean_and_poisoned_batches_share_one_batch_norm_pass():
    torch.manual_seed(0)
    clf = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(2 * 14 * 14, 3)).train()
    clean, poisoned = torch.rand(4, 1, 16, 16), torch.rand(4, 1, 16, 16) + 1.0  # poisoned: another mean
    a, b = joint_logits(clf, clean, poisoned)
    both = clf(torch.cat([clean, poisoned]))
    assert torch.allclose(a, both[:4]) and torch.allclose(b, both[4:])
    assert not torch.allclose(a, clf(clean), atol=1e-3), "batch statistics of the clean half alone differ"


def test_stage_one_trains_the_generator_and_caches_it_by_spec(data, tmp_path):
    cache = ArtifactCache(tmp_path)
    calls = []
    a = create_attack("lira", target=1, generator_epochs=1, lr_atk=0.01)
    a.prepare(context(data, cache, calls=calls))
    assert calls == [1]
    torch.manual_seed(3)  # the generator's seeded initialisation (ctx.seed)
    init = TriggerGenerator(3, data.mean, data.std).state_dict()
    trained = a.generator.state_dict()
    assert not torch.equal(init["decoder.6.weight"], trained["decoder.6.weight"]), "T is the trained generator"
    b = create_attack("lira", target=1, generator_epochs=1, lr_atk=0.01, cap_ratio=True)  # the same material
    b.prepare(context(data, cache, calls=calls))
    assert calls == [1], "loaded, not rebuilt"
    assert all(torch.equal(v, b.state_tensors()[k]) for k, v in a.state_tensors().items())
    x = data.test.x
    assert torch.equal(a.apply_trigger(x), b.apply_trigger(x))
    create_attack("lira", target=1, generator_epochs=1, lr_atk=0.01, eps=0.02).prepare(context(data, cache, calls=calls))
    assert calls == [1, 1], "another eps is another artifact"
    assert len([d for d in (tmp_path / "lira_generator").iterdir() if d.is_dir()]) == 2
    # Seeded: a fresh cache rebuilds the same generator.
    c = create_attack("lira", target=1, generator_epochs=1, lr_atk=0.01)
    c.prepare(context(data, ArtifactCache(tmp_path / "other")))
    assert all(torch.equal(v, c.state_tensors()[k]) for k, v in a.state_tensors().items())


def test_hooks_poison_the_ratio_share_of_each_batch_with_the_rounded_trigger(data):
    attack = with_generator(constant_generator(3, 100.0), target=1, crop_padding=0, rotation=0)
    hooks = attack.train_hooks(data, 0.25, seed=0)
    hooks.flip = False  # augmentation off: the batch is compared with its known answer
    hooks.on_train_start(None, torch.device("cpu"), None)
    x = data.train.x[:8].float() / 255
    y = torch.tensor([0, 2, 3, 1, 2, 0, 3, 2])
    out, label = hooks.transform_batch(x, y)
    assert torch.equal(out[:2] * 255, (data.train.x[:2].float() + 3).clamp(max=255)), "+3 grey levels, on the grid"
    assert torch.equal(out[2:], x[2:]) and label.tolist() == [1, 1, 3, 1, 2, 0, 3, 2]
    assert hooks.counts == {"poisoned": 2, "seen": 8}
    assert hooks.augment(out, lambda z: pytest.fail("replaced")) is out
    a2a = with_generator(constant_generator(3, 100.0), target="all-to-all", crop_padding=0, rotation=0)
    a2a.num_classes = 4
    hooks = a2a.train_hooks(data, 0.5, seed=0)
    hooks.on_train_start(None, torch.device("cpu"), None)
    assert hooks.transform_batch(x, y)[1].tolist() == [1, 3, 0, 2, 2, 0, 3, 2]


def test_poisoned_set_marks_exactly_the_triggered_relabelled_samples(data):
    attack = with_generator(constant_generator(3, 100.0), target=1)
    train = data.train
    p = attack.poison_train(train, 0.25, seed=0)
    assert int(p.mask.sum()) == 16 and p.effective_ratio == 0.25
    assert torch.equal(p.x[p.mask], (train.x[p.mask].int() + 3).clamp(max=255).to(torch.uint8))
    assert (p.y[p.mask] == 1).all()
    assert torch.equal(p.x[~p.mask], train.x[~p.mask]) and torch.equal(p.y[~p.mask], train.y[~p.mask])
    assert torch.equal(p.mask, attack.poison_train(train, 0.25, seed=0).mask), "seeded"


def test_misuse_and_parameter_validation(data):
    attack = create_attack("lira")
    with pytest.raises(RuntimeError, match="prepare"):
        attack.apply_trigger(data.test.x[:2])
    with pytest.raises(RuntimeError, match="prepare"):
        attack.train_hooks(data, 0.1, seed=0)
    for key, value in (("eps", 0), ("eps", 1.5), ("alpha", 1.0), ("alpha", -0.1), ("lr_atk", 0),
                       ("generator_epochs", 0), ("crop_padding", -1), ("rotation", 200)):
        with pytest.raises(ParameterError, match=key):
            create_attack("lira", **{key: value})
    with pytest.raises(ValueError, match="unknown state"):
        attack.load_state_tensors({"field": torch.zeros(1)})
