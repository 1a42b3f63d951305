import torch

from backdoor.data import load_dataset
from backdoor.models import create_model
from backdoor.training import TrainConfig, TrainHooks, fit, predict, random_crop_flip

CPU = torch.device("cpu")


def test_crop_is_a_shifted_window_of_the_zero_padded_image():
    x = torch.rand(16, 3, 8, 8)
    g = torch.Generator().manual_seed(0)
    out = random_crop_flip(x, padding=2, flip=False, g=g)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(16):  # a test may loop; the trainer does not
        windows = [padded[i, :, r:r + 8, c:c + 8] for r in range(5) for c in range(5)]
        assert any(torch.equal(out[i], w) for w in windows)


def test_flip_mirrors_about_half_and_no_op_without_augmentation():
    x = torch.rand(400, 3, 4, 4)
    out = random_crop_flip(x, padding=0, flip=True, g=torch.Generator().manual_seed(1))
    mirrored = (out == x.flip(3)).flatten(1).all(1)
    assert ((out == x).flatten(1).all(1) | mirrored).all()
    assert 150 < int(mirrored.sum()) < 250
    assert torch.equal(random_crop_flip(x, 0, False, torch.Generator()), x)


def _train(seed, hooks=None):
    data = load_dataset("synthetic", train_size=120, test_size=40, image_size=16, num_classes=3)
    model = create_model("cnn_small", 3, data.mean, data.std, seed=0)
    fit(model, data.train, TrainConfig(epochs=2, batch_size=32, lr=0.05), device=CPU, seed=seed, hooks=hooks)
    return model, data


def test_training_is_seeded():
    a, data = _train(0)
    b, _ = _train(0)
    c, _ = _train(1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_hooks_change_batches_without_a_second_loop():
    class RelabelAll(TrainHooks):
        calls = 0

        def transform_batch(self, x, y):
            RelabelAll.calls += 1
            return x, torch.zeros_like(y)

    model, data = _train(0, RelabelAll())
    assert RelabelAll.calls == 2 * 4  # 2 epochs x ceil(120 / 32) batches
    assert (predict(model, data.test.x, device=CPU) == 0).all()
