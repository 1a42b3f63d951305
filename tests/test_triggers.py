"""BadNets and Blended triggers, and the shared poisoned-index selection."""
import numpy as np
import pytest
import torch

from backdoor.attacks import InfeasibleRatioError, create_attack
from backdoor.attacks.blended import blend_pattern
from backdoor.data import Split


def images(n=8, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 200, (n, 3, size, size), generator=g, dtype=torch.uint8)


def test_badnets_overwrites_exactly_the_bottom_right_3x3():
    x = images()
    out = create_attack("badnets").apply_trigger(x)
    assert (out[:, :, 29:32, 29:32] == 255).all()
    changed = (out != x).any(dim=1)
    changed[:, 29:32, 29:32] = False
    assert not changed.any(), "pixels outside rows/cols 29-31 changed"
    assert x.max() < 255, "input untouched"


def test_badnets_scales_with_image_size():
    out = create_attack("badnets").apply_trigger(images(size=64))
    assert (out[:, :, 58:, 58:] == 255).all() and (out[:, :, :58, :] < 255).all()


def test_blended_formula_and_rounding():
    x = images()
    attack = create_attack("blended", alpha=0.2, pattern_seed=3)
    t = blend_pattern("noise", 3, (3, 32, 32))
    expected = (0.8 * x.float() + 0.2 * 255 * t).round().clamp(0, 255).to(torch.uint8)
    assert torch.equal(attack.apply_trigger(x), expected)
    assert torch.equal(attack.apply_trigger(x), attack.apply_trigger(x)), "pattern is fixed"



def test_blended_noise_trigger_is_alpha_times_the_seeded_uniform_pattern():
    """Known answer, written without ``blend_pattern``: on a black image the trigger is round(alpha * 255 * t),
    t = torch.rand(C, H, W) drawn from a generator seeded with ``pattern_seed``; another seed, another pattern."""
    black = torch.zeros(2, 3, 32, 32, dtype=torch.uint8)
    t = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(3))
    out = create_attack("blended", alpha=0.2, pattern_seed=3).apply_trigger(black)
    assert torch.equal(out, (0.2 * 255 * t).round().to(torch.uint8).expand(2, -1, -1, -1))
    assert out.float().std() > 10, "a pattern (uniform over 0..51: std 14.7), not a flat image"
    assert not torch.equal(out, create_attack("blended", alpha=0.2, pattern_seed=4).apply_trigger(black))

def test_blended_accepts_a_user_image(tmp_path):
    from PIL import Image

    path = tmp_path / "kitty.png"
    Image.new("RGB", (50, 40), (255, 0, 0)).save(path)
    out = create_attack("blended", alpha=0.5, pattern=str(path)).apply_trigger(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))
    assert (out[:, 0] == 128).all() and (out[:, 1:] == 0).all()
    with pytest.raises(ValueError, match="missing.png' is not allowed; expected 'noise' or the path of an existing"):
        create_attack("blended", pattern=str(tmp_path / "missing.png"))  # at construction, before any use


@pytest.mark.parametrize("name", ["badnets", "blended"])
def test_dirty_label_poisoning_selects_ratio_of_all_samples(name):
    y = torch.arange(200) % 10
    train = Split(images(200), y)
    attack = create_attack(name, target=3)
    p = attack.poison_train(train, 0.1, seed=7)
    assert int(p.mask.sum()) == 20 and p.effective_ratio == 0.1
    assert (p.y[p.mask] == 3).all() and torch.equal(p.y[~p.mask], y[~p.mask])
    assert torch.equal(p.x[~p.mask], train.x[~p.mask])
    assert torch.equal(p.x[p.mask], attack.apply_trigger(train.x[p.mask]))
    assert (y[p.mask] != 3).any(), "dirty-label indices are drawn from every class"
    again = attack.poison_train(train, 0.1, seed=7)
    assert torch.equal(again.mask, p.mask), "seeded"
    assert not torch.equal(attack.poison_train(train, 0.1, seed=8).mask, p.mask)


def test_index_selection_is_uniform_over_the_pool():
    train = Split(images(1000), torch.arange(1000) % 10)
    counts = torch.zeros(1000)
    attack = create_attack("badnets")
    for seed in range(40):
        counts += attack.select_poison_indices(train, 0.1, seed).bincount(minlength=1000)
    assert counts.sum() == 4000
    assert counts.std() < 3 * (40 * 0.1 * 0.9) ** 0.5  # binomial spread, no bias to a region


def test_clean_label_pool_and_infeasible_ratio():
    from backdoor.attacks.base import Attack

    class CleanLabel(Attack):
        name, kind = "test_clean", "clean_label"

        def apply_trigger(self, x):
            return x

    train = Split(images(100), torch.arange(100) % 10)  # 10 target-class samples
    attack = CleanLabel(target=0)
    assert set(train.y[attack.select_poison_indices(train, 0.05, 0)].tolist()) == {0}
    with pytest.raises(InfeasibleRatioError, match="largest feasible ratio is 0.1000"):
        attack.poison_train(train, 0.2, 0)
    capped = CleanLabel(target=0, cap_ratio=True).poison_train(train, 0.2, 0)
    assert capped.effective_ratio == 0.1 and torch.equal(capped.y, train.y)


def test_registered_classes_carry_their_registry_name():
    from backdoor.attacks import ATTACKS
    from backdoor.defenses import DEFENSES

    for registry in (ATTACKS, DEFENSES):
        for name in registry.names():
            assert registry.get(name).name == name
    with pytest.raises(InfeasibleRatioError, match="^sig: poison ratio 0.5"):
        create_attack("sig").poison_train(Split(images(20), torch.arange(20) % 10), 0.5, 0)


def test_blended_image_pattern_is_resized_as_pil_does(tmp_path):
    """A fine 1-px stripe image downscaled 3x: PIL's antialiased bilinear averages the stripes to mid grey,
    where plain bilinear interpolation samples them (aliasing). The pattern must be PIL's, grey level for grey level."""
    from PIL import Image

    stripes = ((torch.arange(96) % 2) * 255).to(torch.uint8).expand(96, 3, 96).permute(1, 0, 2).contiguous()
    path = tmp_path / "stripes.png"
    Image.fromarray(stripes.permute(1, 2, 0).numpy()).save(path)
    pattern = blend_pattern(str(path), 0, (3, 32, 32))
    expected = torch.from_numpy(np.asarray(Image.open(path).convert("RGB").resize((32, 32), Image.BILINEAR)).copy())
    assert torch.equal((pattern * 255).round().to(torch.uint8), expected.permute(2, 0, 1))
    assert (pattern - 0.5).abs().max() < 0.1, "antialiased: the stripes average out"
    aliased = torch.nn.functional.interpolate(stripes[None].float() / 255, size=(32, 32), mode="bilinear")[0]
    assert (aliased - 0.5).abs().max() > 0.3, "plain bilinear aliases (what the old code did)"
