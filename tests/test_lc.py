"""Label-consistent attack: four-corner trigger, PGD-hardened target-class images within eps, cached material."""
import copy

import pytest
import torch
import torch.nn.functional as F

from backdoor.attacks import ATTACKS, AttackContext, InfeasibleRatioError, create_attack
from backdoor.attacks.lc import pgd_linf
from backdoor.harness.cache import ArtifactCache
from backdoor.data import load_dataset
from backdoor.models import create_model
from backdoor.training import TrainConfig, fit

CONFIG = TrainConfig(epochs=3, lr=0.05, batch_size=64)
BOARD = torch.tensor([[255, 0, 255], [0, 255, 0], [255, 0, 255]], dtype=torch.uint8)


@pytest.fixture(scope="module")
def setup():
    data = load_dataset("synthetic", num_classes=4, train_size=160, test_size=40, image_size=32)
    model = create_model("cnn_small", 4, data.mean, data.std, seed=0)
    fit(model, data.train, CONFIG, device=torch.device("cpu"), seed=0)
    return data, model.eval()


def context(data, model, cache, seed=5):
    return AttackContext(dataset=data, device=torch.device("cpu"), seed=seed, training=CONFIG, model_name="cnn_small",
                         cached=lambda kind, spec, build: cache.get_or_build(kind, spec, build)[0],
                         clean_model=lambda: model, spec={"dataset": "synthetic-test", "model": "cnn_small"},
                         new_model=lambda: create_model("cnn_small", 4, data.mean, data.std, seed=seed))


def corners_mask(size, side):
    m = torch.zeros(size, size, dtype=torch.bool)
    m[:side, :side] = m[:side, -side:] = m[-side:, :side] = m[-side:, -side:] = True
    return m


def test_registered_as_clean_label():
    assert "lc" in ATTACKS.names() and create_attack("lc").kind == "clean_label"


def test_test_trigger_is_the_four_corner_checkerboard_and_nothing_else():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (5, 3, 32, 32), generator=g, dtype=torch.uint8)
    out = create_attack("lc").apply_trigger(x)
    for rows in (slice(0, 3), slice(29, 32)):
        for cols in (slice(0, 3), slice(29, 32)):
            assert torch.equal(out[:, :, rows, cols], BOARD.expand(5, 3, 3, 3))
    outside = ~corners_mask(32, 3)
    assert torch.equal(out[:, :, outside], x[:, :, outside]), "no perturbation outside the corners"


def test_trigger_scales_with_image_size():
    out = create_attack("lc").apply_trigger(torch.full((1, 3, 64, 64), 100, dtype=torch.uint8))
    big = BOARD.repeat_interleave(2, 0).repeat_interleave(2, 1)  # 6x6: each cell 2x2
    assert torch.equal(out[0, :, -6:, -6:], big.expand(3, 6, 6)) and torch.equal(out[0, :, :6, :6], big.expand(3, 6, 6))
    assert (out[0, :, ~corners_mask(64, 6)] == 100).all()


def test_reduced_amplitude_adds_and_subtracts():
    out = create_attack("lc", amplitude=32).apply_trigger(torch.full((1, 1, 32, 32), 100, dtype=torch.uint8))
    assert out[0, 0, 0, 0] == 132 and out[0, 0, 0, 1] == 68 and out[0, 0, 31, 31] == 132


def test_training_images_carry_trigger_plus_bounded_perturbation(setup, tmp_path):
    data, model = setup
    attack = create_attack("lc", target=1, eps=8, steps=10)
    attack.prepare(context(data, model, ArtifactCache(tmp_path)))
    train = data.train
    p = attack.poison_train(train, 0.15, seed=0)
    assert int(p.mask.sum()) == 24 and (train.y[p.mask] == 1).all() and torch.equal(p.y, train.y)
    assert torch.equal(p.x[~p.mask], train.x[~p.mask]), "unpoisoned samples untouched"
    poisoned, clean = p.x[p.mask], train.x[p.mask]
    corners = corners_mask(32, 3)
    assert torch.equal(poisoned[:, :, corners], create_attack("lc").apply_trigger(clean)[:, :, corners])
    change = (poisoned.int() - clean.int())[:, :, ~corners]
    assert int(change.abs().max()) == 8, "perturbation uses the eps budget and never exceeds it"
    assert (change != 0).flatten(1).any(1).all(), "every poisoned image is perturbed"
    # The perturbation makes the images hard for the reference model (the point of LC).
    with torch.no_grad():
        y = train.y[p.mask]
        before = F.cross_entropy(model(clean.float() / 255), y)
        after = F.cross_entropy(model(attack._hard[torch.searchsorted(attack._index, p.mask.nonzero().flatten())]
                                      .float() / 255), y)
    assert after > before + 0.1


def test_material_is_cached_by_spec(setup, tmp_path):
    data, model = setup
    cache = ArtifactCache(tmp_path)
    a = create_attack("lc", target=1, steps=3)
    a.prepare(context(data, model, cache))
    calls = []
    counting = AttackContext(**{**context(data, model, cache).__dict__,
                                "clean_model": lambda: calls.append(1) or model})
    b = create_attack("lc", target=1, steps=3, cap_ratio=True, amplitude=64)  # same material
    b.prepare(counting)
    assert calls == [] and torch.equal(a._hard, b._hard), "loaded, not rebuilt"
    create_attack("lc", target=1, steps=3, eps=16).prepare(counting)
    assert calls == [1], "another eps is another artifact"
    assert len([d for d in (tmp_path / "lc_perturbed").iterdir() if d.is_dir()]) == 2


def test_ratio_checks_and_misuse(setup, tmp_path):
    data, model = setup
    train = data.train  # 40 samples per class: largest clean-label ratio 0.25
    attack = create_attack("lc", target=1, steps=1)
    with pytest.raises(RuntimeError, match="prepare"):
        attack.poison_train(train, 0.1, seed=0)
    attack.prepare(context(data, model, ArtifactCache(tmp_path)))
    with pytest.raises(InfeasibleRatioError, match="largest feasible ratio is 0.2500"):
        attack.poison_train(train, 0.3, seed=0)
    capped = create_attack("lc", target=1, steps=1, cap_ratio=True)
    capped.prepare(context(data, model, ArtifactCache(tmp_path)))
    p = capped.poison_train(train, 0.3, seed=0)
    assert p.effective_ratio == 0.25 and torch.equal(p.mask, train.y == 1)
    with pytest.raises(ValueError, match="target-class"):
        attack.poison_images(train.x[:2], torch.nonzero(train.y != 1).flatten()[:2])


def test_pgd_stays_in_the_ball_and_raises_the_loss(setup):
    data, model = setup
    x, y = data.train.x[:16].float() / 255, data.train.y[:16]
    adv = pgd_linf(model.requires_grad_(False), x, y, eps=4 / 255, step=1 / 255, steps=8)
    model.requires_grad_(True)
    assert (adv - x).abs().max() <= 4 / 255 + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    assert F.cross_entropy(model(adv), y) > F.cross_entropy(model(x), y)


def test_adversarial_reference_is_trained_and_cached(setup, tmp_path):
    data, model = setup
    cache = ArtifactCache(tmp_path)
    attack = create_attack("lc", target=1, steps=3, reference="adversarial", adv_epochs=1, adv_steps=2)
    attack.prepare(context(data, model, cache))
    assert len([d for d in (tmp_path / "lc_reference").iterdir() if d.is_dir()]) == 1
    clean = create_attack("lc", target=1, steps=3)
    clean.prepare(context(data, model, cache))
    assert not torch.equal(attack._hard, clean._hard), "a different reference gives different perturbations"
    # The adversarial objective trains on PGD examples: its loss exceeds the clean loss (both in train mode).
    loss_fn = attack._adversarial_loss(context(data, model, cache))
    x, y = data.train.x[:32].float() / 255, data.train.y[:32]
    trainee = copy.deepcopy(model).train()
    with torch.no_grad():
        clean_loss = F.cross_entropy(trainee(x), y)
    assert loss_fn(trainee, x, y) > clean_loss + 0.1
    assert trainee.training, "the objective hands the model back in train mode"


@pytest.mark.parametrize("bad", [{"eps": -1}, {"steps": -1}, {"reference": "robust"}, {"amplitude": 0},
                                 {"adv_epochs": 0}, {"size": 0}])
def test_bad_parameters_raise(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        create_attack("lc", **bad)
