"""Input-aware: the mask net meets its density target, triggers differ per input, the hooks poison and cross
correctly, the fixed poisoned set marks only relabelled samples, and G/M travel in the state tensors."""
import dataclasses

import pytest
import torch

from backdoor.attacks import create_attack
from backdoor.attacks.inputaware import mask_of, pattern_of, recalibrate_batchnorm
from backdoor.data import load_dataset

CPU = torch.device("cpu")
SMALL = dict(channels=[4, 8], mask_batch_size=16, rotation=0, crop_padding=2)


@pytest.fixture(scope="module")
def data():
    return load_dataset("synthetic", train_size=256, test_size=64, image_size=16, num_classes=4)



def test_trigger_is_the_masked_blend_of_the_generators_pattern(data):
    """Known answer, written from the nets' outputs: apply_trigger(x) = round(255 * (x + (G(x) - x) * M(x))), here
    on untrained nets (fast; the formula does not depend on training) with their batch-norm statistics estimated
    as the hooks do, so that the mask covers part of the image."""
    attack = create_attack("inputaware", **SMALL)
    attack.build_nets(3, data.mean, data.std, seed=0)
    recalibrate_batchnorm(attack.generator, data.train.x)
    recalibrate_batchnorm(attack.mask_net, data.train.x)
    x = data.test.x[:16]
    out = attack.apply_trigger(x)  # in eval mode, as the nets are used below
    xf = x.float() / 255
    with torch.no_grad():
        pattern, mask = pattern_of(attack.generator, xf), mask_of(attack.mask_net, xf)
    expected = (xf + (pattern - xf) * mask).mul(255).round().clamp(0, 255).to(torch.uint8)
    assert (out.int() - expected.int()).abs().max() <= 1  # float rounding of the nets' outputs
    assert mask.mean() > 0.05 and (out != x).any(1).float().mean() > 0.05


def test_hooks_poison_and_cross_each_batch_through_the_trainer_interface(data):
    """Only through what the trainer calls, with the augmentation off (no crop, rotation or flip) so that each row
    can be compared with its input: after stage 1, in a batch of 64 non-target samples at ratio 0.25, 16 are
    relabelled to the target and carry a trigger, 16 more carry a (cross) trigger and keep their label, the other 32
    are unchanged; the diversity loss is returned, and the hooks' augmentation replaces the trainer's default."""
    attack = create_attack("inputaware", target=1, mask_epochs=1, **{**SMALL, "crop_padding": 0})
    hooks = attack.train_hooks(dataclasses.replace(data, hflip=False), 0.25, seed=0)
    assert hooks is not None, "Input-aware trains through hooks"
    hooks.on_train_start(None, CPU, None)
    x, y = data.train.x[:64].float() / 255, torch.zeros(64, dtype=torch.long)
    out, labels = hooks.transform_batch(x, y)
    relabelled = labels == 1
    changed = (out - x).abs().flatten(1).amax(1) > 1 / 255
    assert int(relabelled.sum()) == 16 and bool(changed[relabelled].all())
    assert int((changed & ~relabelled).sum()) == 16, "cross samples: a trigger and their own label"
    extra = hooks.extra_loss(None)
    assert extra is not None and torch.isfinite(extra) and extra > 0

    def trainer_default(batch):
        raise AssertionError("the trainer's default augmentation was used")

    assert hooks.augment(out, trainer_default) is out


@pytest.fixture(scope="module")
def trained_start(data):
    """An attack after stage 1 (the mask net trained alone) at a small budget."""
    attack = create_attack("inputaware", mask_epochs=12, **SMALL)
    hooks = attack.train_hooks(data, 0.1, seed=3)
    hooks.on_train_start(None, CPU, None)
    hooks.on_train_end()  # no classifier steps: G keeps its initial weights, its statistics recalibrated
    return attack, hooks


def test_mask_density_target_is_met_after_stage_one(trained_start, data):
    attack, hooks = trained_start
    with torch.no_grad():
        masks = mask_of(attack.mask_net, data.test.x.float() / 255)
    density = masks.mean().item()
    # Target 0.032; untrained, the sharpened mask covers about a third of the image.
    assert 0.016 < density < 0.064, density
    assert masks.min() >= 0 and masks.max() <= 1
    assert not attack.mask_net.training and not any(p.requires_grad for p in attack.mask_net.parameters())


def test_mask_starts_far_from_the_target(data):
    attack = create_attack("inputaware", mask_epochs=0, **SMALL)
    attack.train_hooks(data, 0.1, seed=3).on_train_start(None, CPU, None)
    with torch.no_grad():
        assert mask_of(attack.mask_net.eval(), data.test.x.float() / 255).mean().item() > 0.15


def test_patterns_and_masks_differ_across_inputs(trained_start, data):
    attack, _ = trained_start
    x = data.test.x[:32].float() / 255
    with torch.no_grad():
        patterns, masks = pattern_of(attack.generator, x), mask_of(attack.mask_net, x)
    assert (patterns[:16] - patterns[16:]).abs().mean() > 0.01
    assert (masks[:16] - masks[16:]).abs().mean() > 0.005
    poisoned = attack.apply_trigger(data.test.x[:32])
    assert poisoned.dtype == torch.uint8 and poisoned.shape == (32, 3, 16, 16)
    residual = poisoned.float() - data.test.x[:32].float()
    assert (residual[:16] - residual[16:]).abs().mean() > 0.5  # sample-specific triggers


def test_hooks_poison_cross_and_train_the_generator(data):
    attack = create_attack("inputaware", target=1, mask_epochs=1, **SMALL)
    hooks = attack.train_hooks(data, 0.25, seed=0)
    hooks.on_train_start(None, CPU, None)
    before = [p.detach().clone() for p in attack.generator.parameters()]
    x, y = data.train.x[:64].float() / 255, data.train.y[:64]
    out, labels = hooks.transform_batch(x, y)
    n_bd = 16  # 0.25 * 64 exactly
    assert torch.equal(labels[:n_bd], torch.ones(n_bd, dtype=torch.long))
    assert torch.equal(labels[n_bd:], y[n_bd:])  # cross (next 16) and clean rows keep their labels
    assert out.shape == x.shape and hooks.augment(out, None) is out
    extra = hooks.extra_loss(None)
    assert extra is not None and extra.requires_grad and torch.isfinite(extra)
    (torch.nn.functional.cross_entropy(out.flatten(1)[:, :4] * 10, labels) + extra).backward()
    hooks.after_step()
    after = list(attack.generator.parameters())
    assert any(not torch.equal(b, a) for b, a in zip(before, after))
    assert all(p.grad is None for p in attack.generator.parameters())  # zeroed for the next batch
    assert all(p.grad is None for p in attack.mask_net.parameters())  # M stays frozen


def test_state_round_trip_and_poisoned_set(trained_start, data):
    attack, hooks = trained_start
    state = attack.state_tensors()
    assert any(k.startswith("G.") for k in state) and any(k.startswith("M.") for k in state)
    fresh = create_attack("inputaware", mask_epochs=12, **SMALL)
    with pytest.raises(RuntimeError):
        fresh.apply_trigger(data.test.x[:2])
    fresh.load_state_tensors(state)
    assert torch.equal(fresh.apply_trigger(data.test.x), attack.apply_trigger(data.test.x))

    p = fresh.poison_train(data.train, 0.1, seed=0)
    n = int(round(0.1 * len(data.train)))
    assert int(p.mask.sum()) == n and bool((p.y[p.mask] == 0).all())
    assert torch.equal(p.x[p.mask], fresh.apply_trigger(data.train.x[p.mask]))
    changed = (p.x != data.train.x).flatten(1).any(1)
    cross = changed & ~p.mask
    assert int(cross.sum()) == n  # cross_ratio 1: as many cross samples, with their labels, not in the mask
    assert torch.equal(p.y[~p.mask], data.train.y[~p.mask])
    # A cross sample carries another image's trigger, not its own.
    own = fresh.apply_trigger(data.train.x[cross])
    assert not torch.equal(p.x[cross], own)

    with pytest.raises(RuntimeError):  # a different architecture does not load silently
        create_attack("inputaware", channels=[4, 8, 16]).load_state_tensors(state)


@pytest.mark.parametrize("bad", [{"channels": []}, {"mask_density": 0}, {"lambda_norm": -1}, {"lr_G": 0},
                                 {"mask_batch_size": 1}, {"rotation": -5}])
def test_bad_parameters_raise(bad):
    with pytest.raises(ValueError):
        create_attack("inputaware", **bad)


def test_params_are_json_stable():
    assert create_attack("inputaware", channels=(8, 16)).params()["channels"] == [8, 16]
    assert create_attack("inputaware", channels=[8, 16]).params() == create_attack("inputaware", channels=(8, 16)).params()
