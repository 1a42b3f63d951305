"""Adap-Patch: four seeded corner patches; one per poison / cover sample at its own training alpha, in k equal
groups; all four pasted at test time; cover samples keep their labels and stay out of the mask."""
import pytest
import torch

from backdoor._checks import ParameterError
from backdoor.attacks import create_attack
from backdoor.data import Split

ALPHAS = (0.5, 0.2, 0.5, 0.3)
CORNERS = ((slice(0, 5), slice(0, 5)), (slice(0, 5), slice(27, 32)),  # top-left, top-right,
           (slice(27, 32), slice(0, 5)), (slice(27, 32), slice(27, 32)))  # bottom-left, bottom-right (5 px)


def images(n=8, size=32, seed=0, low=1, high=255):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(low, high, (n, 3, size, size), generator=g, dtype=torch.uint8)


def patterns(seed, k=4, channels=3, size=5):
    """The patches written out: 0/1 bits per pixel and channel from torch.randint seeded with pattern_seed."""
    return torch.randint(0, 2, (k, channels, size, size), generator=torch.Generator().manual_seed(seed)).float()


def train_set(n=1000, seed=0):
    return Split(images(n, seed=seed), torch.arange(n) % 10)


def test_test_trigger_pastes_all_four_black_and_white_patches():
    x = images(low=1, high=255)  # no 0 or 255 in the input: every patched pixel changes
    out = create_attack("adap_patch", pattern_seed=4).apply_trigger(x)
    bits = patterns(4)
    rest = torch.ones(32, 32, dtype=torch.bool)
    for j, (r, c) in enumerate(CORNERS):
        assert torch.equal(out[:, :, r, c], (bits[j] * 255).to(torch.uint8).expand(len(x), -1, -1, -1)), j
        rest[r, c] = False
    assert torch.equal(out[:, :, rest], x[:, :, rest]), "pixels outside the four corners unchanged"
    assert 0.3 < bits.mean() < 0.7, "black and white"
    assert not torch.equal(out, create_attack("adap_patch", pattern_seed=5).apply_trigger(x))


def test_poison_and_cover_samples_carry_one_patch_each_at_its_alpha_in_equal_groups():
    """Known answer: sample i of the poison samples (index order; likewise of the cover samples) carries patch
    i * 4 // count, blended at that patch's alpha: round(x + alpha_j (255 t_j - x)) in its corner, nothing else."""
    train = train_set()
    attack = create_attack("adap_patch", target=0, cover_ratio=0.012, pattern_seed=2)
    p = attack.poison_train(train, 0.008, seed=5)
    poison, cover = torch.nonzero(p.mask).flatten(), attack.cover_index
    assert len(poison) == 8 and len(cover) == 12
    bits = patterns(2)
    for group in (poison, cover):
        for i, index in enumerate(group.tolist()):
            j = i * 4 // len(group)  # 2 poison / 3 cover samples per patch
            r, c = CORNERS[j]
            x = train.x[index].float()
            expected = x.clone()
            expected[:, r, c] = (x[:, r, c] + ALPHAS[j] * (bits[j] * 255 - x[:, r, c])).round()
            assert torch.equal(p.x[index], expected.to(torch.uint8)), (index, j)
    assert attack.patch_of.tolist() == [0, 0, 1, 1, 2, 2, 3, 3] + [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3
    others = torch.ones(len(train), dtype=torch.bool)
    others[poison], others[cover] = False, False
    assert torch.equal(p.x[others], train.x[others])


def test_counts_labels_and_mask():
    train = train_set()
    attack = create_attack("adap_patch", target=3)  # the authors' CIFAR-10 cover rate: 0.006
    p = attack.poison_train(train, 0.003, seed=7)
    poison, cover = torch.nonzero(p.mask).flatten(), attack.cover_index
    assert len(poison) == 3 and len(cover) == 6 and p.effective_ratio == 0.003
    assert not set(poison.tolist()) & set(cover.tolist()), "cover samples are other samples"
    assert (p.y[poison] == 3).all()
    assert torch.equal(p.y[cover], train.y[cover]), "cover samples keep their labels"
    assert (p.x[cover] != train.x[cover]).flatten(1).any(1).all(), "cover samples carry a patch"
    assert not p.mask[cover].any(), "cover samples are not in the mask"
    assert torch.equal(p.y[~p.mask], train.y[~p.mask])
    assert torch.equal(poison, attack.select_poison_indices(train, 0.003, 7)), "the usual dirty-label draw"


def test_seeded():
    train = train_set(300)
    attack = create_attack("adap_patch", cover_ratio=0.02)
    a, cover_a = attack.poison_train(train, 0.02, seed=1), attack.cover_index
    b = attack.poison_train(train, 0.02, seed=1)
    assert torch.equal(a.x, b.x) and torch.equal(a.mask, b.mask) and torch.equal(attack.cover_index, cover_a)
    attack.poison_train(train, 0.02, seed=2)
    assert not torch.equal(attack.cover_index, cover_a)


def test_all_to_all_relabels_poison_samples_only():
    train = train_set(500)
    attack = create_attack("adap_patch", target="all-to-all", cover_ratio=0.01)
    attack.num_classes = 10
    p = attack.poison_train(train, 0.02, seed=0)
    assert torch.equal(p.y[p.mask], (train.y[p.mask] + 1) % 10)
    assert torch.equal(p.y[attack.cover_index], train.y[attack.cover_index])


def test_fewer_patches_and_grey_images():
    x = torch.full((4, 1, 16, 16), 100, dtype=torch.uint8)
    attack = create_attack("adap_patch", alphas=[1.0, 1.0], patch_size=3, test_alpha=0.5)
    out = attack.apply_trigger(x)
    bits = patterns(0, k=2, channels=1, size=3)
    assert torch.equal(out[:, :, :3, :3], (100 + 0.5 * (bits[0] * 255 - 100)).round().to(torch.uint8).expand(4, -1, -1, -1))
    assert torch.equal(out[:, :, :3, 13:], (100 + 0.5 * (bits[1] * 255 - 100)).round().to(torch.uint8).expand(4, -1, -1, -1))
    assert (out[:, :, 3:] == 100).all() and (out[:, :, :, 3:13] == 100).all(), "two patches: top corners only"
    assert attack.params()["alphas"] == [1.0, 1.0]


@pytest.mark.parametrize("key, value", [("alphas", []), ("alphas", [0.5] * 5), ("alphas", [0.5, 0.0]),
                                        ("alphas", 0.5), ("test_alpha", 0.0), ("patch_size", 0),
                                        ("cover_ratio", 1.5)])
def test_parameters_are_validated(key, value):
    with pytest.raises(ParameterError, match=f"adap_patch: {key}:"):
        create_attack("adap_patch", **{key: value})


def test_corner_patches_must_not_overlap():
    create_attack("adap_patch", patch_size=4).check_image_shape((3, 8, 8))
    with pytest.raises(ParameterError, match="patch_size: 5 is not allowed; expected at most 4"):
        create_attack("adap_patch", patch_size=5).check_image_shape((3, 8, 8))
