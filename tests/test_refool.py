"""ReFool: the three reflection blends against values computed independently (in focus on constant images, the
ghost of a one-pixel reflection, the focal blur against scipy's Gaussian filter and the reference's steps),
the per-image draws and their probabilities, the reflection sources (scikit-learn's photographs with no
download, a user folder, the training set's other classes), clean-label poisoning and parameter checks."""
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage, stats

from backdoor._checks import ParameterError
from backdoor.attacks import ATTACKS, InfeasibleRatioError, create_attack
from backdoor.attacks.refool import FOCAL, GHOST, IN_FOCUS, blend_reflections, gaussian_blur, vignette
from backdoor.data import Split


def images(n=6, size=16, channels=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, channels, size, size), generator=g, dtype=torch.uint8)


def write_images(folder, arrays):
    """Write uint8 HxWx3 arrays as PNGs named 0.png, 1.png, ... into ``folder``."""
    folder.mkdir(exist_ok=True)
    for i, array in enumerate(arrays):
        Image.fromarray(np.asarray(array, dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def per_image(n, **values):
    """Per-image parameter tensors of ``blend_reflections``, every image the same."""
    defaults = {"kind": FOCAL, "alpha_t": 0.4, "sigma": 1.0, "att": 1.1, "ghost_a": 0.0, "dy": 0, "dx": 0}
    defaults.update(values)
    out = {}
    for key, value in defaults.items():
        tensor = torch.as_tensor(value)
        out[key] = tensor.expand(n).clone() if tensor.dim() == 0 else tensor
    return out


def lin(v):
    return (v / 255) ** 2.2


def test_registered_as_clean_label_with_reference_defaults():
    attack = create_attack("refool")
    assert "refool" in ATTACKS.names() and attack.kind == "clean_label"
    assert attack.params() == {"target": 0, "cap_ratio": False, "reflections": "sklearn", "num_reflections": 200,
                               "ghost_rate": 0.49, "in_focus_rate": 0.0, "alpha_t": 0.4, "seed": 0}


# -- known answers of the three blends ----------------------------------------------------------------------------
def test_in_focus_blend_of_constants_is_the_linear_light_mix(tmp_path):
    """t = 100 everywhere, r = 200 everywhere, alpha_t 0.4: ((0.4 lin(100) + 0.6 lin(200)) ** (1 / 2.2)) * 255."""
    expected = round(255 * (0.4 * lin(100) + 0.6 * lin(200)) ** (1 / 2.2))
    assert expected == 169  # 100 and 200 mixed in linear light, not 0.4 * 100 + 0.6 * 200 = 160
    folder = write_images(tmp_path / "r", [np.full((20, 30, 3), 200)])
    attack = create_attack("refool", reflections=str(folder), ghost_rate=0.0, in_focus_rate=1.0)
    out = attack.apply_trigger(torch.full((4, 3, 8, 8), 100, dtype=torch.uint8))
    assert (out == expected).all()
    # alpha_t 0.7 and the function directly, in float
    t, r = torch.full((1, 3, 4, 4), 100 / 255), torch.full((1, 3, 4, 4), 200 / 255)
    value = blend_reflections(t, r, **per_image(1, kind=IN_FOCUS, alpha_t=0.7))
    assert torch.allclose(value, torch.tensor((0.7 * lin(100) + 0.3 * lin(200)) ** (1 / 2.2)).float())


def test_ghost_of_a_one_pixel_reflection_is_two_pixels_with_the_documented_weights():
    """r: one pixel of 255 at (9, 10) on black, t black; ghost = (1 - a) r + a r shifted by (dy, dx), so pixel
    (9, 10) holds (1 - a) and pixel (9 - dy, 10 - dx) holds a, each times (1 - alpha_t), in linear light."""
    t = torch.zeros(2, 1, 16, 16)
    r = torch.zeros(2, 1, 16, 16)
    r[:, :, 9, 10] = 1.0
    params = per_image(2, kind=GHOST, alpha_t=torch.tensor([0.4, 0.6]), ghost_a=torch.tensor([0.3, 0.8]),
                       dy=torch.tensor([3, 8]), dx=torch.tensor([5, 4]))
    out = blend_reflections(t, r, **params)
    for i, (alpha, a, dy, dx) in enumerate([(0.4, 0.3, 3, 5), (0.6, 0.8, 8, 4)]):
        expected = torch.zeros(16, 16)
        expected[9, 10] = ((1 - a) * (1 - alpha)) ** (1 / 2.2)
        expected[9 - dy, 10 - dx] = (a * (1 - alpha)) ** (1 / 2.2)
        assert torch.allclose(out[i, 0], expected, atol=1e-6), f"image {i}"


def test_attack_ghosts_use_each_images_own_draw(tmp_path):
    """Through the attack: a one-pixel reflection on black images gives, per image, the two pixels its own
    drawn weight a, shift (dy, dx) and alpha_t 0.4 predict."""
    dot = np.zeros((16, 16, 3))
    dot[12, 13] = 255
    attack = create_attack("refool", reflections=str(write_images(tmp_path / "r", [dot])), ghost_rate=1.0)
    out = attack.apply_trigger(torch.zeros(6, 3, 16, 16, dtype=torch.uint8))
    d = attack.draw(6, 1, stream=2)  # the test trigger's stream
    assert len(set(d["dy"].tolist()) | set(d["dx"].tolist())) > 1, "the draws differ between images"
    for i in range(6):
        a, dy, dx = float(d["ghost_a"][i]), int(d["dy"][i]), int(d["dx"][i])
        expected = torch.zeros(16, 16, dtype=torch.uint8)
        expected[12, 13] = round(255 * ((1 - a) * 0.6) ** (1 / 2.2))
        expected[12 - dy, 13 - dx] = round(255 * (a * 0.6) ** (1 / 2.2))
        assert torch.equal(out[i, 0], expected) and torch.equal(out[i, 2], expected), f"image {i}"


def test_ghost_shift_wraps_around_the_frame():
    t, r = torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 8)
    r[0, 0, 1, 2] = 1.0
    out = blend_reflections(t, r, **per_image(1, kind=GHOST, alpha_t=0.5, ghost_a=0.5, dy=3, dx=4))
    assert out[0, 0, 1, 2] > 0 and out[0, 0, (1 - 3) % 8, (2 - 4) % 8] > 0
    assert int((out > 0).sum()) == 2


def test_gaussian_blur_equals_scipy_per_image_sigma():
    """Each image by its own sigma, kernel radius ceil(2 sigma), mirrored border (OpenCV's reflect-101 = scipy's
    'mirror'), against scipy's separable Gaussian filter."""
    g = torch.Generator().manual_seed(1)
    x = torch.rand(3, 2, 13, 11, generator=g)
    sigma = torch.tensor([1.0, 2.7, 5.0])
    out = gaussian_blur(x, sigma)
    for i, s in enumerate(sigma.tolist()):
        radius = math.ceil(2 * s)
        expected = ndimage.gaussian_filter(x[i].double().numpy(), sigma=(0, s, s), mode="mirror",
                                           truncate=radius / s)
        assert np.allclose(out[i].numpy(), expected, atol=1e-5), f"sigma {s}"


def reference_vignette(h, w):
    """The reference's attenuation map written out with scipy: normal cell masses over +-3.5 sigma-ish edges."""
    side, nsig = max(h, w), 3
    interval = (2 * nsig + 1.0) / side
    edges = np.linspace(-nsig - interval / 2.0, nsig + interval / 2.0, side + 1)
    k1 = np.diff(stats.norm.cdf(edges))
    k = np.sqrt(np.outer(k1, k1))
    k = k / k.sum()
    return (k / k.max())[:h, :w]


def test_focal_blur_blend_follows_the_reference_steps():
    """The whole focal type recomputed in numpy: gamma, scipy blur, the range adjustment where r_blur + t > 1,
    the vignette times (1 - alpha_t / 2), the mix and the inverse gamma."""
    g = torch.Generator().manual_seed(2)
    t, r = torch.rand(2, 3, 12, 12, generator=g), torch.rand(2, 3, 12, 12, generator=g)
    t[1] = 0.9 + 0.1 * t[1]  # a bright image: r_blur + t exceeds 1 and the range adjustment acts
    sigma, att, alpha = torch.tensor([1.5, 3.2]), torch.tensor([1.1, 1.15]), torch.tensor([0.4, 0.7])
    out = blend_reflections(t, r, **per_image(2, kind=FOCAL, sigma=sigma, att=att, alpha_t=alpha))
    for i in range(2):
        tl, rl = t[i].double().numpy() ** 2.2, r[i].double().numpy() ** 2.2
        s = float(sigma[i])
        rb = ndimage.gaussian_filter(rl, sigma=(0, s, s), mode="mirror", truncate=math.ceil(2 * s) / s)
        blend = rb + tl
        for c in range(3):
            over = blend[c] > 1
            mean = max(1.0, (blend[c] * over).sum() / (over.sum() + 1e-6))
            rb[c] = rb[c] - (mean - 1) * float(att[i])
        rb = np.clip(rb, 0, 1)
        a = float(alpha[i])
        expected = np.clip((rb * reference_vignette(12, 12) * (1 - a / 2) + tl * a) ** (1 / 2.2), 0, 1)
        assert np.allclose(out[i].numpy(), expected, atol=1e-5), f"image {i}"
    assert not torch.allclose(out[1], blend_reflections(
        t, r, **per_image(2, kind=FOCAL, sigma=sigma, att=torch.zeros(2), alpha_t=alpha))[1]), "adjustment acted"


def test_vignette_peaks_in_the_centre_and_fades_to_the_corners():
    v = vignette(32, 32)
    assert np.allclose(v.numpy(), reference_vignette(32, 32), atol=1e-6)
    assert float(v.max()) == pytest.approx(1.0, abs=0.01) and float(v[0, 0]) < 0.02


def test_batched_blend_equals_one_image_at_a_time():
    g = torch.Generator().manual_seed(3)
    t, r = torch.rand(5, 3, 10, 10, generator=g), torch.rand(5, 3, 10, 10, generator=g)
    p = per_image(5, kind=torch.tensor([FOCAL, GHOST, IN_FOCUS, FOCAL, GHOST]), sigma=torch.tensor([1., 2, 3, 4.5, 5]),
                  att=torch.full((5,), 1.1), alpha_t=torch.tensor([0.4, 0.5, 0.6, 0.7, 0.8]),
                  ghost_a=torch.tensor([0.2, 0.3, 0.4, 0.6, 0.8]), dy=torch.tensor([3, 4, 5, 6, 7]),
                  dx=torch.tensor([8, 7, 6, 5, 4]))
    batched = blend_reflections(t, r, **p)
    for i in range(5):
        single = blend_reflections(t[i:i + 1], r[i:i + 1], **{k: v[i:i + 1] for k, v in p.items()})
        assert torch.allclose(batched[i], single[0], atol=1e-6)


# -- the draws ------------------------------------------------------------------------------------------------------
def test_type_probabilities_and_parameter_ranges_over_many_draws():
    n = 40000
    d = create_attack("refool", ghost_rate=0.3, in_focus_rate=0.2, alpha_t="random").draw(n, 7, stream=1)
    share = torch.bincount(d["kind"], minlength=3).float() / n
    assert torch.allclose(share, torch.tensor([0.2, 0.5, 0.3]), atol=0.012), share
    default = create_attack("refool").draw(n, 7, stream=1)
    share = torch.bincount(default["kind"], minlength=3).float() / n
    assert torch.allclose(share, torch.tensor([0.0, 0.51, 0.49]), atol=0.012), share
    assert (default["alpha_t"] == 0.4).all()
    assert 0.55 <= float(d["alpha_t"].min()) < 0.57 and 0.93 < float(d["alpha_t"].max()) <= 0.95
    assert 1.0 <= float(d["sigma"].min()) < 1.02 and 4.98 < float(d["sigma"].max()) <= 5.0
    assert 1.08 <= float(d["att"].min()) and float(d["att"].max()) <= 1.18
    a = d["ghost_a"]
    assert 0.15 <= float(a.min()) < 0.16 and 0.84 < float(a.max()) <= 0.85
    assert abs(float((a > 0.5).float().mean()) - 0.5) < 0.012, "a fair coin picks the weight's half"
    for shift in (d["dy"], d["dx"]):
        assert torch.equal(shift.unique(), torch.arange(3, 9))
    counts = torch.bincount(d["pick"], minlength=7).float() / n
    assert torch.allclose(counts, torch.full((7,), 1 / 7), atol=0.012), "reflection image uniform per image"


def test_every_image_draws_its_own_reflection(tmp_path):
    levels = [0, 60, 120, 180, 240]
    folder = write_images(tmp_path / "r", [np.full((9, 9, 3), v) for v in levels])
    attack = create_attack("refool", reflections=str(folder), ghost_rate=0.0, in_focus_rate=1.0)
    out = attack.apply_trigger(torch.full((200, 3, 4, 4), 100, dtype=torch.uint8))
    expected = {round(255 * (0.4 * lin(100) + 0.6 * lin(v)) ** (1 / 2.2)) for v in levels}
    values = out[:, 0, 0, 0].tolist()
    assert set(values) == expected, "each image gets one of the folder's reflections, all of them used"
    assert (out == out[:, :1, :1, :1]).all(), "constant in, constant out"


def test_seeded_determinism_and_separate_train_and_test_streams():
    x = images(8)
    a, b = create_attack("refool", num_reflections=6), create_attack("refool", num_reflections=6)
    assert torch.equal(a.apply_trigger(x), b.apply_trigger(x))
    assert torch.equal(a.poison_images(x, torch.arange(8)), b.poison_images(x, torch.arange(8)))
    assert not torch.equal(a.apply_trigger(x), a.poison_images(x, torch.arange(8)))
    assert not torch.equal(a.apply_trigger(x), create_attack("refool", num_reflections=6, seed=1).apply_trigger(x))


# -- reflection sources ------------------------------------------------------------------------------------------
def test_no_download_default_crops_scikit_learns_photographs():
    attack = create_attack("refool")
    bank = attack.reflection_bank((3, 32, 32))
    assert bank.shape == (200, 3, 32, 32) and bank.dtype == torch.uint8
    assert len({tuple(b.flatten()[:64].tolist()) for b in bank}) == 200, "every crop differs"
    assert float(bank.float().std()) > 30, "photographs, not flat images"
    x = images(4, size=32)
    out = attack.apply_trigger(x)
    assert out.shape == x.shape and out.dtype == torch.uint8
    assert (out.float() - x.float()).abs().mean() > 10, "a visible reflection"
    grey = attack.reflection_bank((1, 32, 32))
    luma = (bank.float() * torch.tensor([0.299, 0.587, 0.114])[:, None, None]).sum(1, keepdim=True)
    assert torch.equal(grey, luma.round().to(torch.uint8)) and attack.apply_trigger(x[:, :1]).shape == (4, 1, 32, 32)


def test_user_folder_every_image_resized_others_ignored(tmp_path):
    gradient = np.tile(np.linspace(0, 255, 40)[None, :, None], (30, 1, 3))
    folder = write_images(tmp_path / "r", [np.full((20, 30, 3), 50), gradient])
    (folder / "notes.txt").write_text("not an image")
    bank = create_attack("refool", reflections=str(folder)).reflection_bank((3, 8, 10))
    assert bank.shape == (2, 3, 8, 10)
    assert (bank[0] == 50).all()
    assert (bank[1, :, :, 1:].int() >= bank[1, :, :, :-1].int()).all() and bank[1, 0, 0, -1] > 200, "resized"


def test_classes_reflections_come_from_the_other_classes_after_prepare():
    y = torch.arange(60) % 3
    x = (y * 80 + 10).to(torch.uint8)[:, None, None, None].expand(60, 3, 6, 6).clone()
    attack = create_attack("refool", reflections="classes", num_reflections=12, target=1)
    with pytest.raises(RuntimeError, match="prepare"):
        attack.apply_trigger(x[:2])
    attack.prepare(SimpleNamespace(dataset=SimpleNamespace(train=Split(x, y))))
    bank = attack.reflection_bank((3, 6, 6))
    assert len(bank) == 12 and set(bank[:, 0, 0, 0].tolist()) == {10, 170}, "classes 0 and 2, never the target 1"


@pytest.mark.parametrize("bad", [{"reflections": "/nonexistent/folder"}, {"num_reflections": 0},
                                 {"ghost_rate": 1.5}, {"in_focus_rate": -0.1}, {"alpha_t": 1.0},
                                 {"alpha_t": 0.0}, {"alpha_t": "uniform"}, {"seed": 0.5}])
def test_bad_parameters_raise(bad):
    with pytest.raises(ParameterError, match=next(iter(bad))):
        create_attack("refool", **bad)


def test_rates_must_sum_to_at_most_one_and_empty_folder_is_refused(tmp_path):
    with pytest.raises(ParameterError, match="in_focus_rate"):
        create_attack("refool", ghost_rate=0.6, in_focus_rate=0.5)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ParameterError, match="reflections"):
        create_attack("refool", reflections=str(tmp_path / "empty"))


# -- clean-label poisoning ---------------------------------------------------------------------------------------
def test_poisons_only_target_class_samples_and_keeps_labels():
    y = torch.arange(100) % 5
    train = Split(images(100, size=8), y)
    attack = create_attack("refool", target=2, num_reflections=8)
    p = attack.poison_train(train, 0.1, seed=3)
    assert int(p.mask.sum()) == 10 and p.effective_ratio == 0.1
    assert (y[p.mask] == 2).all() and torch.equal(p.y, y), "clean label: target class only, labels kept"
    assert torch.equal(p.x[~p.mask], train.x[~p.mask])
    index = p.mask.nonzero().flatten()
    assert torch.equal(p.x[p.mask], attack.poison_images(train.x[index], index))
    assert (p.x[p.mask] != train.x[p.mask]).any(dim=(1, 2, 3)).all(), "every masked sample carries a reflection"
    test = attack.poison_test(train)
    assert torch.equal(test.y, y[y != 2]) and torch.equal(test.x, attack.apply_trigger(train.x[y != 2]))


def test_ratio_beyond_the_target_class_raises_or_caps_and_all_to_all_is_refused():
    train = Split(images(50, size=8), torch.arange(50) % 5)  # 10 target-class samples = ratio 0.2
    with pytest.raises(InfeasibleRatioError, match="largest feasible ratio is 0.2000"):
        create_attack("refool", num_reflections=4).poison_train(train, 0.3, seed=0)
    capped = create_attack("refool", num_reflections=4, cap_ratio=True).poison_train(train, 0.3, seed=0)
    assert torch.equal(capped.mask, train.y == 0) and capped.effective_ratio == 0.2
    with pytest.raises(ParameterError, match="target"):
        create_attack("refool", target="all-to-all")
