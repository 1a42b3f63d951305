"""Adap-Blend: the piece grid, partial triggers at alpha 0.15 on poison and cover samples, the whole trigger at
0.2 at test time, cover samples keeping their labels and staying out of the mask."""
import pytest
import torch

from backdoor._checks import ParameterError
from backdoor.attacks import create_attack
from backdoor.attacks._adaptive import keep_pieces, piece_index
from backdoor.data import Split


def images(n=8, size=32, seed=0, channels=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, channels, size, size), generator=g, dtype=torch.uint8)


def noise(seed, shape=(3, 32, 32)):
    """Blended's noise pattern, written out: torch.rand drawn from a generator seeded with pattern_seed."""
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


def blended(x, t, alpha):
    """round(x + alpha * (255 t - x)), written out."""
    xf = x.float()
    return (xf + alpha * (t * 255 - xf)).round().clamp(0, 255).to(torch.uint8)


def train_set(n=1000, seed=0):
    return Split(images(n, seed=seed), torch.arange(n) % 10)


def test_test_trigger_is_the_whole_pattern_blended_at_0_2():
    x = images()
    out = create_attack("adap_blend", pattern_seed=3).apply_trigger(x)
    assert torch.equal(out, blended(x, noise(3), 0.2))
    assert (out != x).float().mean() > 0.9, "every pixel of the whole pattern is blended"
    black = torch.zeros(2, 3, 32, 32, dtype=torch.uint8)
    assert torch.equal(create_attack("adap_blend", pattern_seed=3).apply_trigger(black),
                       (0.2 * 255 * noise(3)).round().to(torch.uint8).expand(2, -1, -1, -1))


def test_piece_grid_partitions_the_image_into_4x4_blocks():
    rows, cols = torch.meshgrid(torch.arange(32), torch.arange(32), indexing="ij")
    assert torch.equal(piece_index(32, 32, 4), (rows // 8) * 4 + cols // 8)
    assert torch.equal(piece_index(32, 32, 4).flatten().bincount(), torch.full((16,), 64))
    odd = piece_index(30, 29, 4)  # 4 does not divide: bands of 7 or 8 pixels, still a partition
    counts = odd.flatten().bincount(minlength=16)
    assert len(counts) == 16 and counts.sum() == 30 * 29 and counts.min() >= 7 * 7
    band_rows = (odd[:, 0] // 4).tolist()
    assert band_rows == sorted(band_rows) and set(band_rows) == {0, 1, 2, 3}, "contiguous row bands"
    assert torch.equal(piece_index(8, 8, 1), torch.zeros(8, 8, dtype=torch.long))


def test_poison_and_cover_samples_carry_exactly_half_of_the_pieces_at_0_15():
    """Known answer: every selected sample, block by block (4 x 4 blocks of 8 x 8 pixels), is either untouched or
    exactly round(x + 0.15 (255 t - x)); exactly 8 of its 16 blocks are blended. Other samples are untouched."""
    train = train_set()
    attack = create_attack("adap_blend", target=0, cover_ratio=0.005, pattern_seed=5)
    p = attack.poison_train(train, 0.01, seed=11)
    chosen = torch.cat([torch.nonzero(p.mask).flatten(), attack.cover_index])
    assert len(chosen) == 15
    expected = blended(train.x[chosen], noise(5), 0.15)
    got, orig = p.x[chosen], train.x[chosen]
    block = lambda t: t.reshape(len(t), 3, 4, 8, 4, 8).permute(0, 2, 4, 1, 3, 5).reshape(len(t), 16, -1)
    is_blended = (block(got) == block(expected)).all(-1)
    is_clean = (block(got) == block(orig)).all(-1)
    assert (is_blended | is_clean).all(), "every block is either blended at 0.15 or untouched"
    assert (is_blended & ~is_clean).sum(1).tolist() == [8] * 15, "exactly half of the pieces on every sample"
    assert torch.equal(is_blended & ~is_clean, attack.pieces_kept), "pieces_kept records them"
    assert len({tuple(r) for r in attack.pieces_kept.tolist()}) > 10, "each sample draws its own pieces"
    others = torch.ones(len(train), dtype=torch.bool)
    others[chosen] = False
    assert torch.equal(p.x[others], train.x[others])


def test_mask_rate_sets_the_share_of_hidden_pieces():
    attack = create_attack("adap_blend", mask_rate=0.25, cover_ratio=0.01)
    attack.poison_train(train_set(), 0.02, seed=0)
    assert attack.pieces_kept.shape == (30, 16) and (attack.pieces_kept.sum(1) == 12).all()


def test_piece_draws_are_uniform_and_exact():
    keep = keep_pieces(4000, 16, 8, torch.Generator().manual_seed(0))
    assert (keep.sum(1) == 8).all()
    assert (keep.float().mean(0) - 0.5).abs().max() < 0.04, "every piece kept half of the time"


def test_counts_labels_and_mask():
    train = train_set()
    attack = create_attack("adap_blend", target=3)  # the authors' cover rate: 0.003
    p = attack.poison_train(train, 0.01, seed=7)
    poison, cover = torch.nonzero(p.mask).flatten(), attack.cover_index
    assert len(poison) == 10 and len(cover) == 3 and p.effective_ratio == 0.01
    assert not set(poison.tolist()) & set(cover.tolist()), "cover samples are other samples"
    assert (p.y[poison] == 3).all() and (train.y[poison] != 3).any(), "dirty label, drawn from every class"
    assert torch.equal(p.y[cover], train.y[cover]), "cover samples keep their labels"
    assert (p.x[cover] != train.x[cover]).flatten(1).any(1).all(), "cover samples carry trigger pieces"
    assert not p.mask[cover].any(), "cover samples are not in the mask"
    unmasked = ~p.mask
    assert torch.equal(p.y[unmasked], train.y[unmasked])
    assert torch.equal(poison, attack.select_poison_indices(train, 0.01, 7)), "the usual dirty-label draw"


def test_seeded():
    train = train_set(300)
    attack = create_attack("adap_blend", cover_ratio=0.02)
    a, cover_a = attack.poison_train(train, 0.02, seed=1), attack.cover_index
    b, cover_b = attack.poison_train(train, 0.02, seed=1), attack.cover_index
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y) and torch.equal(a.mask, b.mask)
    assert torch.equal(cover_a, cover_b)
    c = attack.poison_train(train, 0.02, seed=2)
    assert not torch.equal(c.mask, a.mask) and not torch.equal(attack.cover_index, cover_a)


def test_all_to_all_relabels_poison_samples_only():
    train = train_set(500)
    attack = create_attack("adap_blend", target="all-to-all", cover_ratio=0.01)
    attack.num_classes = 10
    p = attack.poison_train(train, 0.02, seed=0)
    assert torch.equal(p.y[p.mask], (train.y[p.mask] + 1) % 10)
    assert torch.equal(p.y[attack.cover_index], train.y[attack.cover_index])


def test_grey_images_and_odd_sizes():
    x = images(50, size=30, channels=1)
    attack = create_attack("adap_blend", cover_ratio=0.1)
    p = attack.poison_train(Split(x, torch.zeros(50, dtype=torch.long)), 0.1, seed=0)
    assert p.x.shape == x.shape and int(p.mask.sum()) == 5 and len(attack.cover_index) == 5
    assert torch.equal(attack.apply_trigger(x), blended(x, noise(0, (1, 30, 30)), 0.2))


@pytest.mark.parametrize("key, value", [("pieces", 15), ("pieces", 0), ("mask_rate", 1.0), ("mask_rate", -0.1),
                                        ("alpha", 0.0), ("test_alpha", 1.5), ("cover_ratio", -0.01),
                                        ("pattern", "/no/such/image.png")])
def test_parameters_are_validated(key, value):
    with pytest.raises(ParameterError, match=f"adap_blend: {key}:"):
        create_attack("adap_blend", **{key: value})


def test_piece_grid_must_fit_the_image():
    create_attack("adap_blend", pieces=64).check_image_shape((3, 8, 8))
    with pytest.raises(ParameterError, match="pieces: 81 is not allowed; expected at most 64"):
        create_attack("adap_blend", pieces=81).check_image_shape((3, 8, 8))
