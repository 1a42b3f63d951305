"""LF: Gaussian low-pass, batched targeted DeepFool, and the universal perturbation (bound, spectrum, fooling)."""
import pytest
import torch
from torch import nn

from backdoor.attacks import ATTACKS, AttackContext, create_attack
from backdoor.attacks.lf import deepfool_to_target, gaussian_lowpass, low_frequency_share
from backdoor.harness.cache import ArtifactCache
from backdoor.data import load_dataset
from backdoor.models import create_model
from backdoor.training import TrainConfig, fit, predict

CPU = torch.device("cpu")
CONFIG = TrainConfig(epochs=3, lr=0.05, batch_size=64)
TINY = dict(samples=20, max_passes=3, max_iter=30)


@pytest.fixture(scope="module")
def setup():
    data = load_dataset("synthetic", num_classes=4, train_size=160, test_size=40, image_size=32)
    model = create_model("cnn_small", 4, data.mean, data.std, seed=0)
    fit(model, data.train, CONFIG, device=CPU, seed=0)
    return data, model.eval()


def context(data, model, cache, seed=3):
    return AttackContext(dataset=data, device=CPU, seed=seed, training=CONFIG, model_name="cnn_small",
                         cached=lambda kind, spec, build: cache.get_or_build(kind, spec, build)[0],
                         clean_model=lambda: model, spec={"dataset": "synthetic-test", "model": "cnn_small"},
                         new_model=lambda: create_model("cnn_small", 4, data.mean, data.std, seed=seed))


def high_frequency_energy(delta: torch.Tensor, cutoff: float = 0.25) -> float:
    """Fraction of the spectral energy at max(|fx|, |fy|) >= cutoff cycles per pixel.

    The image is mirrored to twice its size first, so that its periodic extension has no jump at the borders
    (a plain FFT would count that artificial edge as high-frequency energy): the DCT-II view of the image.
    """
    mirrored = torch.cat([delta, delta.flip(-1)], -1)
    mirrored = torch.cat([mirrored, mirrored.flip(-2)], -2).double()
    power = torch.fft.fft2(mirrored).abs() ** 2
    fy, fx = torch.fft.fftfreq(mirrored.shape[-2]).abs(), torch.fft.fftfreq(mirrored.shape[-1]).abs()
    high = torch.maximum(fy[:, None], fx[None, :]) >= cutoff
    return float(power[:, high].sum() / power.sum())


def test_registered_as_dirty_label():
    assert "lf" in ATTACKS.names() and create_attack("lf").kind == "dirty_label"


def test_lowpass_keeps_constants_and_removes_the_nyquist_checkerboard():
    const = torch.full((3, 16, 16), 0.3)
    assert torch.allclose(gaussian_lowpass(const, 7, 1.5), const, atol=1e-6)
    signs = (torch.arange(16)[:, None] + torch.arange(16)[None, :]) % 2 * 2.0 - 1
    board = signs.expand(3, 16, 16)
    assert gaussian_lowpass(board, 7, 1.5).abs().max() < 1e-3 * board.abs().max()
    slow = torch.cos(2 * torch.pi * torch.arange(32) / 32).expand(1, 32, 32)  # period 32 px
    assert gaussian_lowpass(slow, 7, 1.5)[0, 10:22, 10:22].sub(slow[0, 10:22, 10:22]).abs().max() < 0.05


def test_low_frequency_share_counts_non_dc_energy_within_two_cycles_per_image():
    j = torch.arange(32, dtype=torch.float64)
    one_cycle = torch.cos(2 * torch.pi * (j + 0.5) / 64).expand(3, 32, 32)  # half a cosine period: DCT k=1
    assert low_frequency_share(one_cycle + 5.0) == pytest.approx(1.0), "the DC offset does not count"
    signs = ((torch.arange(32)[:, None] + torch.arange(32)[None, :]) % 2 * 2.0 - 1).expand(3, 32, 32)
    assert low_frequency_share(signs) < 1e-3
    noise = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0)) - 0.5
    assert low_frequency_share(noise) < 0.05  # white noise: ~pi * 4^2 / 4 of 64^2 mirrored bins


def test_reference_filter_passes_only_the_lowest_frequencies():
    """sigma 6 px (BackdoorBench's gauss_smooth): white noise keeps most of its energy within 2 cycles per
    image; our former sigma 1.5 px kept a small part of it."""
    noise = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0)) - 0.5
    attack = create_attack("lf")
    assert (attack.sigma, attack.kernel_size) == (6.0, 31)
    assert low_frequency_share(gaussian_lowpass(noise, 31, 6.0)) > 0.9
    assert low_frequency_share(gaussian_lowpass(noise, 7, 1.5)) < 0.5


def test_deepfool_on_a_linear_model_takes_the_closed_form_step():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3)).requires_grad_(False)
    x = torch.rand(64, 3, 2, 2) * 0.2 + 0.4  # interior, so clipping does not interfere
    logits = model(x)
    start = logits.argmax(1)
    keep = start != 2
    x, start = x[keep], start[keep]
    r, reached = deepfool_to_target(model, x, target=2, overshoot=0.02, max_iter=50)
    assert reached.all() and (model(x + r).argmax(1) == 2).all()
    w = model[1].weight
    direction = (w[2] - w[start]).view(-1, 3, 2, 2)
    gap = (logits[keep].gather(1, start[:, None]).squeeze(1) - logits[keep][:, 2])
    one_step = 1.02 * ((gap + 1e-4) / direction.flatten(1).pow(2).sum(1)).view(-1, 1, 1, 1) * direction
    first = (model(x + one_step).argmax(1) == 2)  # one linear step suffices unless a third class intervenes
    assert torch.allclose(r[first], one_step[first], atol=1e-5) and first.float().mean() > 0.5


def test_perturbation_is_bounded_low_frequency_and_fools(setup, tmp_path):
    data, model = setup
    attack = create_attack("lf", target=2, **TINY)
    ctx = context(data, model, ArtifactCache(tmp_path))
    attack.prepare(ctx)
    delta = attack.delta
    assert delta.shape == (3, 32, 32)
    assert abs(float(delta.abs().max()) - 0.2) < 1e-6, "largest |delta| is exactly the bound"
    assert high_frequency_energy(delta) < 1e-3, "almost no energy at periods under 4 px"
    assert low_frequency_share(delta) > 0.95, "the reference filter's spectrum: within 2 cycles per image"
    assert attack.material_info["low_frequency_share"] == pytest.approx(low_frequency_share(delta), abs=1e-4)
    assert high_frequency_energy(torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0)) - 0.5) > 0.5
    samples = data.train.x[attack.uap_samples(ctx)]
    assert (data.train.y[attack.uap_samples(ctx)] != 2).all() and len(samples) == 20
    fooled = predict(model, attack.apply_trigger(samples), device=CPU) == 2
    before = predict(model, samples, device=CPU) == 2
    assert fooled.float().mean() >= 0.2 and fooled.sum() > before.sum(), "the trigger fools the clean model"
    assert attack.material_info["fooling_rate_final"] >= 0.2 and attack.material_info["passes"] >= 1


def test_trigger_is_x_plus_delta_clipped_and_dirty_label(setup, tmp_path):
    data, model = setup
    attack = create_attack("lf", target=2, **TINY)
    attack.prepare(context(data, model, ArtifactCache(tmp_path)))
    x = data.test.x
    expected = (x.double() + 255 * attack.delta.double()).round().clamp(0, 255).to(torch.uint8)
    assert (attack.apply_trigger(x).int() - expected.int()).abs().max() <= 1  # float32 vs float64 rounding ties
    p = attack.poison_train(data.train, 0.1, seed=0)
    assert int(p.mask.sum()) == 16 and (p.y[p.mask] == 2).all()
    assert (data.train.y[p.mask] != 2).any(), "dirty label: drawn from every class"
    assert torch.equal(p.x[p.mask], attack.apply_trigger(data.train.x[p.mask]))


def test_material_is_cached_and_batching_is_an_option(setup, tmp_path):
    data, model = setup
    cache = ArtifactCache(tmp_path)
    a = create_attack("lf", target=2, **TINY)
    a.prepare(context(data, model, cache))
    calls = []
    counting = AttackContext(**{**context(data, model, cache).__dict__,
                                "clean_model": lambda: calls.append(1) or model})
    b = create_attack("lf", target=2, cap_ratio=True, **TINY)
    b.prepare(counting)
    assert calls == [] and torch.equal(a.delta, b.delta), "loaded from the cache"
    sequential = create_attack("lf", target=2, deepfool_batch=1, **TINY)
    sequential.prepare(counting)
    assert calls == [1] and sequential.delta.abs().max() == pytest.approx(0.2)
    with pytest.raises(RuntimeError, match="prepare"):
        create_attack("lf").apply_trigger(data.test.x)


@pytest.mark.parametrize("bad", [{"samples": 0}, {"bound": 1.5}, {"kernel_size": 4}, {"sigma": 0},
                                 {"fooling_rate": 0}, {"deepfool_batch": 0}, {"overshoot": -0.1}])
def test_bad_parameters_raise(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        create_attack("lf", **bad)
