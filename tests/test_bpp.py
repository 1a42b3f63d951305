"""BppAttack: colour-depth squeezing (known levels), Floyd-Steinberg dithering (hand-computed error diffusion and
a plain sequential scan), per-batch poisoning with residual negatives, the fixed poisoned set and its mask."""
from dataclasses import replace

import pytest
import torch

from backdoor._checks import ParameterError
from backdoor.attacks import create_attack
from backdoor.attacks.bpp import floyd_steinberg
from backdoor.data import Split, load_dataset


def sequential_dither(image: torch.Tensor, levels: int) -> torch.Tensor:
    """The textbook scan, one pixel at a time (an independent statement of what the waves must reproduce):
    float32 image [C, H, W] on 0..255; each pixel to its nearest level, the error passed 7/16 right, 3/16
    down-left, 5/16 down, 1/16 down-right, in float64, stored back in float32."""
    img = image.clone().float()
    c, h, w = img.shape
    for y in range(h):
        for x in range(w):
            old = img[:, y, x].double()
            new = torch.round(old / 255.0 * (levels - 1)) / (levels - 1) * 255
            err = old - new
            img[:, y, x] = new.float()
            for dy, dx, weight in ((0, 1, 7 / 16), (1, 1, 1 / 16), (1, 0, 5 / 16), (1, -1, 3 / 16)):
                if 0 <= y + dy < h and 0 <= x + dx < w:
                    img[:, y + dy, x + dx] = (img[:, y + dy, x + dx].double() + err * weight).float()
    return img


def test_quantisation_levels_of_a_hand_made_image():
    """squeeze_num 8: the levels k * 255 / 7 rounded, 0 36 73 109 146 182 219 255; each value to the nearest."""
    values = torch.tensor([0, 18, 19, 36, 54, 55, 100, 127, 128, 200, 240, 255], dtype=torch.uint8)
    expected = torch.tensor([0, 0, 36, 36, 36, 73, 109, 109, 146, 182, 255, 255], dtype=torch.uint8)
    x = values.view(1, 1, 1, -1).expand(2, 3, 4, -1).contiguous()
    out = create_attack("bpp").apply_trigger(x)
    assert out.dtype == torch.uint8 and torch.equal(out, expected.view(1, 1, 1, -1).expand_as(x))
    levels = torch.arange(256, dtype=torch.uint8).view(1, 1, 1, -1)
    assert create_attack("bpp").apply_trigger(levels).unique().tolist() == [0, 36, 73, 109, 146, 182, 219, 255]
    assert create_attack("bpp", squeeze_num=2).apply_trigger(levels).unique().tolist() == [0, 255]
    assert create_attack("bpp", squeeze_num=256).apply_trigger(levels).equal(levels)  # 256 levels: no change


def test_dithering_diffuses_the_error_of_a_tiny_image_as_computed_by_hand():
    """Two levels (0, 255), every pixel 100. Row [100 100 100]: 100 -> 0 (error 100, 7/16 = 43.75 to the right);
    143.75 -> 255 (error -111.25, -48.671875 on); 51.328125 -> 0. So [0 255 0] where plain rounding gives black.
    2 x 2: (0,0) -> 0, error 100: right 143.75, down 131.25, down-right 106.25; (0,1) 143.75 -> 255, error
    -111.25: down -34.765625 -> 71.484375, down-left -20.859375 -> 110.390625; (1,0) 110.390625 -> 0, its error
    7/16 to the right -> 119.7802734375 -> 0. So [[0 255] [0 0]]."""
    attack = create_attack("bpp", squeeze_num=2, dithering=True)
    row = torch.full((1, 1, 1, 3), 100, dtype=torch.uint8)
    assert attack.apply_trigger(row).flatten().tolist() == [0, 255, 0]
    assert create_attack("bpp", squeeze_num=2).apply_trigger(row).flatten().tolist() == [0, 0, 0]
    square = torch.full((1, 1, 2, 2), 100, dtype=torch.uint8)
    assert attack.apply_trigger(square).flatten().tolist() == [0, 255, 0, 0]
    # 2 x 3: row 0 as the row above, [0 255 0], passing 6.25, 31.25 (from (0,0)), -6.953125, -34.765625,
    # -20.859375 (from (0,1)), 16.0400390625, 9.6240234375 (from (0,2)) down. Row 1: (1,0) 110.390625 -> 0;
    # (1,1) 100 + 6.25 - 34.765625 + 9.6240234375 + 48.2958984375 = 129.404296875 -> 255 (error -125.595703125);
    # (1,2) 100 - 6.953125 + 16.0400390625 - 54.948120117... = 54.138... -> 0.
    out = floyd_steinberg(torch.full((1, 1, 2, 3), 100.0), 2)
    assert out[0, 0].tolist() == [[0.0, 255.0, 0.0], [0.0, 255.0, 0.0]]


@pytest.mark.parametrize("levels, shape", [(8, (3, 7, 9)), (4, (1, 9, 5)), (2, (3, 6, 6))])
def test_dithering_waves_reproduce_the_sequential_scan(levels, shape):
    g = torch.Generator().manual_seed(levels)
    x = torch.randint(0, 256, (4, *shape), generator=g).float()
    waves = floyd_steinberg(x, levels)
    for i in range(len(x)):
        assert torch.equal(waves[i], sequential_dither(x[i], levels))
    out = create_attack("bpp", squeeze_num=levels, dithering=True).apply_trigger(x.to(torch.uint8))
    assert torch.equal(out, waves.round().to(torch.uint8))
    allowed = torch.round(torch.arange(levels) * 255 / (levels - 1)).to(torch.uint8)
    assert bool(torch.isin(out, allowed).all())  # only the levels
    plain = create_attack("bpp", squeeze_num=levels).apply_trigger(x.to(torch.uint8))
    assert not torch.equal(out, plain)  # the errors were diffused
    # Dithering keeps the local mean: the error never accumulates beyond half a level step per pixel.
    step = 255 / (levels - 1)
    assert (out.float().mean((2, 3)) - x.mean((2, 3))).abs().max() < step


def hook_data(train_x: torch.Tensor | None = None):
    data = load_dataset("synthetic", train_size=64, test_size=8, image_size=8, num_classes=4)
    if train_x is not None:
        data = replace(data, train=Split(train_x, torch.zeros(len(train_x), dtype=torch.long)))
    return data


def test_hooks_quantise_relabel_and_add_residual_negatives():
    """Batch of 100 samples of class 1 at ratio 0.1, neg_ratio 0.2: 10 quantised and relabelled to 0; 20 negatives
    keep label 1 and get a training image's residual. Every training image is 100 everywhere, so the residual is
    Q(100) - 100 = 109 - 100 = 9 on every pixel (known answer); the other 70 are untouched."""
    data = hook_data(torch.full((32, 3, 8, 8), 100, dtype=torch.uint8))
    attack = create_attack("bpp", target=0, neg_ratio=0.2)
    hooks = attack.train_hooks(data, 0.1, seed=3)
    hooks.on_train_start(None, torch.device("cpu"), None)
    x = torch.randint(0, 256, (100, 3, 8, 8), generator=torch.Generator().manual_seed(0)).float().div(255)
    y = torch.ones(100, dtype=torch.long)
    out, labels = hooks.transform_batch(x, y)
    assert hooks.counts == {"poisoned": 10, "negative": 20, "seen": 100}
    assert labels[:10].tolist() == [0] * 10 and labels[10:].tolist() == [1] * 90
    expected_bd = attack.apply_trigger(x[:10].mul(255).round().to(torch.uint8)).float().div(255)
    assert torch.equal(out[:10], expected_bd)
    assert torch.allclose(out[10:30], (x[10:30] + 9 / 255).clamp(0, 1), atol=1e-6)
    assert torch.equal(out[30:], x[30:])

    def trainer_default(batch):
        raise AssertionError("the trainer's default augmentation was used")

    assert hooks.augment(out, trainer_default).shape == out.shape


def test_negatives_only_in_batches_that_carry_poisoned_samples():
    """As the reference: a batch whose draw gives no poisoned sample gets no negatives either; the counts are
    exact in expectation (ratio 0.01 of 50 = 0.5 per batch, neg_ratio 0.1 = 5 per poisoned batch)."""
    data = hook_data()
    hooks = create_attack("bpp").train_hooks(data, 0.01, seed=0)
    hooks.on_train_start(None, torch.device("cpu"), None)
    x, y = torch.rand(50, 3, 8, 8), torch.ones(50, dtype=torch.long)
    per_batch = []
    for _ in range(400):
        before = dict(hooks.counts)
        hooks.transform_batch(x, y)
        per_batch.append((hooks.counts["poisoned"] - before["poisoned"], hooks.counts["negative"] - before["negative"]))
    assert {p for p, _ in per_batch} == {0, 1}
    assert all(neg == 0 for p, neg in per_batch if p == 0)
    assert all(neg == 5 for p, neg in per_batch if p == 1)
    assert hooks.counts["poisoned"] / 400 == pytest.approx(0.5, abs=0.1)


def test_all_to_all_relabels_each_poisoned_sample_to_its_next_class():
    data = hook_data()
    attack = create_attack("bpp", target="all-to-all")
    attack.num_classes = 4
    hooks = attack.train_hooks(data, 0.5, seed=1)
    hooks.on_train_start(None, torch.device("cpu"), None)
    y = torch.arange(20) % 4
    _, labels = hooks.transform_batch(torch.rand(20, 3, 8, 8), y)
    assert torch.equal(labels[:10], (y[:10] + 1) % 4) and torch.equal(labels[10:], y[10:])
    p = attack.poison_train(data.train, 0.25, seed=0)
    assert torch.equal(p.y[p.mask], (data.train.y[p.mask] + 1) % 4)


def test_poison_train_marks_only_the_quantised_relabelled_samples():
    """ratio 0.1 of 300 = 30 quantised and relabelled (the mask); neg_ratio 0.1 = 30 more with a training image's
    residual, labels kept, not in the mask. On a training set of images that are 100 everywhere the residual is
    Q(100) - 100 = +9: poisoned and negative samples alike become 109 (known answer)."""
    data = load_dataset("synthetic", train_size=300, test_size=20, image_size=8)
    attack = create_attack("bpp", target=2)
    p = attack.poison_train(data.train, 0.1, seed=0)
    assert int(p.mask.sum()) == 30 and p.effective_ratio == pytest.approx(0.1)
    assert bool((p.y[p.mask] == 2).all())
    assert torch.equal(p.x[p.mask], attack.apply_trigger(data.train.x[p.mask]))
    changed = (p.x != data.train.x).flatten(1).any(1)
    negatives = changed & ~p.mask
    assert int(negatives.sum()) == 30
    assert torch.equal(p.y[~p.mask], data.train.y[~p.mask])
    again = attack.poison_train(data.train, 0.1, seed=0)
    assert torch.equal(again.x, p.x) and torch.equal(again.mask, p.mask)

    flat = Split(torch.full((100, 3, 8, 8), 100, dtype=torch.uint8), torch.arange(100) % 4)
    q = attack.poison_train(flat, 0.1, seed=1)
    assert bool((q.x[q.mask] == 109).all())
    neg = (q.x != 100).flatten(1).any(1) & ~q.mask
    assert int(neg.sum()) == 10 and bool((q.x[neg] == 109).all())  # 100 + (109 - 100)
    assert torch.equal(q.y[~q.mask], flat.y[~q.mask])


def test_parameter_validation_and_ratio_limits():
    for bad in ({"squeeze_num": 1}, {"squeeze_num": 257}, {"squeeze_num": 8.5}, {"dithering": "yes"},
                {"neg_ratio": 1.0}, {"neg_ratio": -0.1}, {"p_crop": 1.5}, {"rotation": 400}, {"crop_padding": -1}):
        with pytest.raises(ParameterError):
            create_attack("bpp", **bad)
    data = hook_data()
    with pytest.raises(ValueError, match="neg_ratio"):
        create_attack("bpp", neg_ratio=0.5).train_hooks(data, 0.6, seed=0)
    with pytest.raises(ValueError, match="neg_ratio"):
        create_attack("bpp", neg_ratio=0.5).poison_train(data.train, 0.6, seed=0)


def test_training_through_hooks_learns_the_quantisation():
    """End to end in the one trainer (known answer: ASR near 1, clean accuracy intact) on synthetic data, with the
    negatives, no rotation. Two levels: with 4 the negatives keep the backdoor unlearned here (ASR 0.53 at 12
    epochs, 0.16 at 20; 0.97 without negatives); with 2, ASR 1.0 on seeds 0-2."""
    from backdoor.models import create_model
    from backdoor.training import TrainConfig, fit, predict

    cpu = torch.device("cpu")
    data = load_dataset("synthetic", train_size=400, test_size=100, image_size=16, num_classes=4)
    attack = create_attack("bpp", squeeze_num=2, crop_padding=1, rotation=0)
    model = create_model("cnn_small", data.num_classes, data.mean, data.std)
    fit(model, data.train, TrainConfig(epochs=12, lr=0.02, batch_size=64), device=cpu, seed=0,
        hooks=attack.train_hooks(data, 0.1, seed=1))
    test = attack.poison_test(data.test)
    asr = (predict(model, test.x, device=cpu) == 0).float().mean().item()
    clean = (predict(model, data.test.x, device=cpu) == data.test.y).float().mean().item()
    assert clean > 0.9 and asr > 0.9
