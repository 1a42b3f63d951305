"""Analysis tools with known answers (paper 3.2, supplementary B.11), and loading a case without training."""
import argparse
import json

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

from backdoor.analysis import tool
from backdoor.harness.cached_case import NotCachedError, load_case
from backdoor.analysis._common import predictions
from backdoor.analysis.activation import STYLE
from backdoor.analysis.frequency import frequency_saliency
from backdoor.analysis.gradcam import fullgrad_maps, gradcam_maps
from backdoor.analysis.shapley import DEFAULT_PERMUTATIONS, shapley_maps, superpixel_mask
from backdoor.analysis.tsne import clean_target_neighbour_share, embed, knn_purity, target_neighbour_share
from backdoor.attacks import create_attack
from backdoor.harness.cache import ArtifactCache
from backdoor.harness.cli import main as cli_main
from backdoor.data import load_dataset
from backdoor.defenses._data_side import penultimate_features
from backdoor.models import create_model
from backdoor.harness.case import Case
from backdoor.harness.runner import Runner
from backdoor.harness.records import upsert_records
from backdoor.training import TrainConfig, fit

@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One CPU thread, as the grid's plugin sets (also when this file runs without it)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


SIDE = 8


def region(rows: slice, cols: slice) -> torch.Tensor:
    mask = torch.zeros(SIDE, SIDE)
    mask[rows, cols] = 1
    return mask


class RegionMask(nn.Module):
    """Keeps channel k of its input on region k only (the layer Grad-CAM looks at)."""

    def __init__(self, masks: torch.Tensor):
        super().__init__()
        self.register_buffer("masks", masks)

    def forward(self, z):
        return z * self.masks


class TwoRegionNet(nn.Module):
    """Hand-set weights: z = conv(x) with z_0 = red + 0.5, z_1 = green + 0.25 and z_2 = blue + 1 (1x1 convolution
    with bias); a_k = z_k on region k (A: top-left 3x3, B: bottom-right 3x4; channel 2 everywhere), 0 elsewhere;
    logit_c = sum_k V[c, k] sum a_k with V = [[2, 0, 0], [0, 1, 0]]: class 0 rests on region A only, class 1 on
    region B only, and channel 2, the strongest activation and active over the whole image, on nothing."""

    V = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.eye(3)[:, :, None, None])
            self.conv.bias.copy_(torch.tensor([0.5, 0.25, 1.0]))
        self.regions = RegionMask(torch.stack([region(slice(0, 3), slice(0, 3)), region(slice(5, 8), slice(4, 8)),
                                               torch.ones(SIDE, SIDE)]))

    def forward(self, x):
        return self.regions(self.conv(x)).sum((2, 3)) @ self.V.T


def minmax(a: np.ndarray) -> np.ndarray:
    """The library's per-map normalisation (scale_cam_image): shift to 0, divide by (1e-7 + max)."""
    a = a - a.min()
    return a / (1e-7 + a.max())


def expected_gradcam(model: TwoRegionNet, image: torch.Tensor, cls: int) -> np.ndarray:
    """Grad-CAM by hand: d logit_c / d a_k = V[c, k] at every position, so the channel weights (mean gradients)
    are V[c]; the map is ReLU(sum_k V[c, k] a_k), min-max normalised."""
    with torch.no_grad():
        a = model.regions(model.conv(image[None]))[0].numpy()
    return minmax(np.maximum(np.einsum("k,khw->hw", model.V[cls].numpy(), a), 0))


def expected_fullgrad(model: TwoRegionNet, image: torch.Tensor, cls: int) -> np.ndarray:
    """FullGrad by hand: d logit_c / d z_k = V[c, k] M_k and d logit_c / d x_j = sum_k V[c, k] M_k W[k, j]; the
    map is the normalised sum of min-max(|x_j dx_j|) per input channel and min-max(|b_k dz_k|) per bias."""
    V, M = model.V[cls].numpy(), model.regions.masks.numpy()
    W, b = model.conv.weight[:, :, 0, 0].detach().numpy(), model.conv.bias.detach().numpy()
    dz = V[:, None, None] * M                       # [k, H, W]
    dx = np.einsum("khw,kj->jhw", dz, W)            # [j, H, W]
    inputs = sum(minmax(np.abs(image[j].numpy() * dx[j])) for j in range(3))
    biases = sum(minmax(np.abs(b[k] * dz[k])) for k in range(3))  # channel 2's term is 0
    return minmax(inputs + biases)


def test_gradcam_and_fullgrad_match_the_hand_computed_maps_of_each_class():
    """Each class rests on its own region, so explaining the wrong class moves the map; a map without
    gradients (channel weights 1, a principal component of the activations, or |x| in place of |x dx|) shows
    the unread channel 2, which covers the whole image."""
    model = TwoRegionNet().eval()
    x = torch.rand(4, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(1))
    classes = torch.tensor([0, 1, 1, 0])
    cams, full = gradcam_maps(model, model.regions, x, classes), fullgrad_maps(model, x, classes)
    a, b, _ = model.regions.masks.numpy().astype(bool)
    for i, c in enumerate(classes.tolist()):
        np.testing.assert_allclose(cams[i], expected_gradcam(model, x[i], c), atol=1e-5)
        np.testing.assert_allclose(full[i], expected_fullgrad(model, x[i], c), atol=1e-5)
        own, other = (a, b) if c == 0 else (b, a)
        assert cams[i][~own].max() == 0 and full[i][~own].max() == 0  # nothing off the class's region
        assert cams[i][own].max() == pytest.approx(1, abs=1e-5)


class ProductNet(nn.Module):
    """On 8x8 images cut in four 4x4 superpixels A (top-left), B (top-right), C (bottom-left), D (bottom-right),
    with m_S the mean of superpixel S: logit 0 = m_A m_B + m_C (A and B interact, C adds), logit 1 = m_D."""

    def forward(self, x):
        m = x.mean(1).unfold(1, 4, 4).unfold(2, 4, 4).mean((-1, -2)).flatten(1)  # [N, 4]: A, B, C, D
        return torch.stack([m[:, 0] * m[:, 1] + m[:, 2], m[:, 3]], 1)


def superpixel_sums(maps: np.ndarray) -> np.ndarray:
    """[N, 4]: a map's total over A, B, C, D (a superpixel's value, spread over its pixels, summed back)."""
    return maps.reshape(len(maps), 2, 4, 2, 4).sum((2, 4)).reshape(len(maps), 4)


def superpixel_means(x: torch.Tensor) -> np.ndarray:
    return x.mean(1).reshape(len(x), 2, 4, 2, 4).mean((2, 4)).reshape(len(x), 4).double().numpy()


def test_shapley_values_of_a_product_model_split_the_interaction_and_not_what_occlusion_gives():
    """Known answer: C's value is m_C in every permutation, D's is 0; A and B share m_A m_B, each getting it in
    the permutations where it comes after the other (k of n for A), so A's estimate is m_A m_B k / n and its
    standard error m_A m_B sqrt(k (n - k) / (n (n - 1))) / sqrt(n). Occlusion would give A and B m_A m_B each
    (twice the gain in total); explaining class 1 would put everything on D."""
    n = 64
    x = torch.rand(2, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(2))
    classes = torch.tensor([0, 1])
    maps, errors = shapley_maps(ProductNet(), x, classes, superpixel=4, n_samples=n, seed=0)
    assert maps.shape == errors.shape == (2, SIDE, SIDE)
    values, ses = superpixel_sums(maps), superpixel_sums(errors)
    m = superpixel_means(x)
    product = m[0, 0] * m[0, 1]
    k = round(values[0, 0] / product * n)
    assert values[0, :2] == pytest.approx([product * k / n, product * (n - k) / n], rel=1e-5)
    assert values[0, 2:] == pytest.approx([m[0, 2], 0], rel=1e-5, abs=1e-7)
    assert ses[0, 0] == pytest.approx(product * np.sqrt(k * (n - k) / (n * (n - 1)) / n), rel=1e-4)
    assert ses[0, 1] == pytest.approx(ses[0, 0], rel=1e-4)
    assert ses[0, 2] < 1e-6 and ses[0, 3] == 0  # additive feature: same contribution every time; unread: none
    assert abs(values[0, 0] - product / 2) < 3 * ses[0, 0]
    assert values[1] == pytest.approx([0, 0, 0, m[1, 3]], abs=1e-7, rel=1e-5) and (ses[1] == 0).all()
    with torch.no_grad():  # efficiency: the map adds up to f(x) - f(baseline), exactly for each permutation
        gain = ProductNet()(x)[[0, 1], classes] - ProductNet()(torch.zeros_like(x))[[0, 1], classes]
    np.testing.assert_allclose(maps.sum((1, 2)), gain.numpy(), rtol=1e-5)


def test_shapley_default_permutations_split_a_symmetric_pair_within_005():
    """m_A = m_B: A and B are symmetric, their true shares 1/2 each. Each permutation gives the product to the
    later of the two, so A's share is k / n with k ~ Binomial(n, 1/2): at the default n the pair is within 0.05
    with probability at least 0.95 (256 permutations: 0.58). At the default the seeded estimates come within
    0.05 (16 permutations gave 0.31 / 0.69), and the standard error is sqrt(default / 64) times smaller than
    with 64 permutations."""
    k = np.arange(DEFAULT_PERMUTATIONS + 1)
    within = np.abs(2 * k / DEFAULT_PERMUTATIONS - 1) <= 0.05
    assert stats.binom.pmf(k[within], DEFAULT_PERMUTATIONS, 0.5).sum() >= 0.95
    x = torch.full((1, 3, SIDE, SIDE), 0.5)
    x[..., 4:, :4] = 0.25  # C
    classes = torch.zeros(1, dtype=torch.long)
    maps, errors = shapley_maps(ProductNet(), x, classes, superpixel=4)
    values = superpixel_sums(maps)[0]
    shares = values[:2] / values[:2].sum()
    assert values[:2].sum() == pytest.approx(0.25, rel=1e-5)
    assert abs(shares[0] - shares[1]) <= 0.05
    _, few = shapley_maps(ProductNet(), x, classes, superpixel=4, n_samples=64)
    ratio = superpixel_sums(few)[0, 0] / superpixel_sums(errors)[0, 0]
    assert ratio == pytest.approx(np.sqrt(DEFAULT_PERMUTATIONS / 64), rel=0.15)


def test_shapley_needs_two_permutations_for_a_standard_error():
    with pytest.raises(ValueError, match="at least 2"):
        shapley_maps(ProductNet(), torch.zeros(1, 3, SIDE, SIDE), torch.zeros(1, dtype=torch.long), n_samples=1)


def test_superpixel_mask_covers_the_image_in_squares():
    mask = superpixel_mask(5, 7, 2)[0, 0]
    assert mask.shape == (5, 7) and int(mask.max()) + 1 == 3 * 4
    assert mask[0, 0] == mask[1, 1] != mask[0, 2]


def cosine(u: int, v: int, height: int, width: int) -> torch.Tensor:
    h, w = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    return torch.cos(2 * torch.pi * (u * h / height + v * w / width))


class FrequencyReader(nn.Module):
    """On H x W = 15 x 12 images (odd x even, so a wrong shift shows): logit 0 = <red - green, cos f_a> +
    <blue, cos f_b>, logit 1 = <red + green + blue, cos f_c>. Averaged over channels (formula 3), class 0's
    spectral gradient keeps only f_b (f_a cancels); class 1's is f_c."""

    H, W = 15, 12
    FA, FB, FC = (1, 3), (2, 1), (4, 5)

    def __init__(self):
        super().__init__()
        self.register_buffer("a", cosine(*self.FA, self.H, self.W))
        self.register_buffer("b", cosine(*self.FB, self.H, self.W))
        self.register_buffer("c", cosine(*self.FC, self.H, self.W))

    def forward(self, x):
        r, g, b = x.unbind(1)
        zero = ((r - g) * self.a).sum((1, 2)) + (b * self.b).sum((1, 2))
        return torch.stack([zero, (x.sum(1) * self.c).sum((1, 2))], 1)


def expected_fsm(u: int, v: int, height: int, width: int) -> np.ndarray:
    """The IDFT of cos(2 pi (u h / H + v w / W)) is 1/2 at (u, v) and at (-u, -v): after min-max, 1 there and 0
    elsewhere; fftshift moves frequency (u, v) to ((u + H // 2) mod H, (v + W // 2) mod W)."""
    out = np.zeros((height, width))
    for su, sv in ((u, v), (-u, -v)):
        out[(su + height // 2) % height, (sv + width // 2) % width] = 1
    return out


def test_frequency_saliency_is_one_at_the_read_frequency_of_the_explained_class():
    """Known answer on an odd x even image: a missing or wrong shift (ifftshift, one axis), the wrong class, or
    the modulus taken before the channel mean (f_a would show) each move or add peaks."""
    model, h, w = FrequencyReader(), FrequencyReader.H, FrequencyReader.W
    x = torch.rand(2, 3, h, w, generator=torch.Generator().manual_seed(0))
    fsm = frequency_saliency(model, x, torch.tensor([0, 1]))
    assert fsm.shape == (2, h, w)
    np.testing.assert_allclose(fsm[0], expected_fsm(*FrequencyReader.FB, h, w), atol=1e-6)
    np.testing.assert_allclose(fsm[1], expected_fsm(*FrequencyReader.FC, h, w), atol=1e-6)
    # low frequencies sit at the centre: the zero frequency's place is (H // 2, W // 2)
    assert expected_fsm(0, 1, h, w)[h // 2, w // 2 + 1] == 1


def test_knn_purity_on_hand_made_points():
    points = np.r_[np.zeros((5, 2)), np.full((5, 2), 10.0)] + np.arange(10)[:, None] * 0.01
    marked = np.r_[np.zeros(5, bool), np.ones(5, bool)]
    assert knn_purity(points, marked, k=4) == 1.0
    assert knn_purity(points, np.tile([True, False], 5), k=4) < 0.7


CENTRES = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])  # classes 0 (the target), 1, 2


def hand_features(triggered_go_to_target: bool):
    """Clean features: 20 per class around its centre (spread 0.3). Triggered features of 10 class-1 and 10
    class-2 samples: with a working backdoor, packed tightly (spread 0.01) at (0.5, 0.5) inside the target's
    cluster, nearer each other than any clean sample; without one, at their own class's centre."""
    g = np.random.default_rng(0)
    labels = np.repeat([0, 1, 2], 20)
    clean = CENTRES[labels] + g.normal(0, 0.3, (60, 2))
    true = np.repeat([1, 2], 10)
    place = np.full((20, 2), 0.5) if triggered_go_to_target else CENTRES[true]
    return clean, labels, place + g.normal(0, 0.01, (20, 2))


def test_target_neighbour_share_tracks_where_triggered_samples_land():
    """1 when every triggered sample's clean neighbours are target-class, 0 when they stay with their class. kNN
    purity is 1 in both cases (it cannot tell the backdoor from a tight cluster of its own)."""
    for backdoor, expected in ((True, 1.0), (False, 0.0)):
        clean, labels, triggered = hand_features(backdoor)
        assert target_neighbour_share(clean, labels, triggered, target=0, k=10) == expected
        flag = np.r_[np.zeros(len(clean), bool), np.ones(len(triggered), bool)]
        assert knn_purity(np.r_[clean, triggered], flag, k=9) == 1.0
    assert clean_target_neighbour_share(clean, labels, target=0, k=10) == 0.0  # clean samples: own clusters


def test_target_neighbour_share_needs_more_than_half_target_neighbours():
    clean = np.array([[0.0], [1.0], [2.1], [3.3], [4.6], [10.0]])
    labels = np.array([0, 0, 1, 1, 1, 0])
    # the 4 nearest of 1.5: 1.0, 2.1, 0.0, 3.3, half of them target (not mostly); the 3 nearest of 0.5: two target
    assert target_neighbour_share(clean, labels, np.array([[1.5]]), target=0, k=4) == 0.0
    assert target_neighbour_share(clean, labels, np.array([[0.5]]), target=0, k=3) == 1.0
    # clean class-1 points, 3 nearest others: 2.1 -> 1.0, 3.3, 0.0 (mostly target); 3.3 -> 2.1, 4.6, 1.0 and
    # 4.6 -> 3.3, 2.1, 1.0 (not): one of three
    assert clean_target_neighbour_share(clean, labels, target=0, k=3) == pytest.approx(1 / 3)


def _digits_model(attack_name: str | None):
    data = load_dataset("digits")
    model = create_model("cnn_small", 10, data.mean, data.std, seed=0)
    train = data.train
    attack = create_attack("badnets", target=0)
    if attack_name is not None:
        train = attack.poison_train(data.train, 0.1, seed=0).split
    # 8 epochs without augmentation: BadNets reaches ASR ~0.99 here (about 6 s on one core)
    fit(model, train, TrainConfig(epochs=8, lr=0.05, batch_size=64, crop_padding=0, hflip=False),
        device=torch.device("cpu"), seed=0)
    return model, data, attack


@pytest.mark.parametrize("attack_name", ["badnets", None])
def test_tsne_separates_badnets_triggered_samples(attack_name):
    """BadNets' triggered test samples form a cluster apart (10-NN purity in the embedding > 0.9; measured
    0.985) whose nearest clean samples in feature space are mostly of the target for most of them (target-
    neighbour share measured 0.77, bound > 0.6); under a clean model they mix with the clean images they come
    from (purity measured 0.45, bound < 0.7) and their neighbours are of their own class (share measured 0.00,
    bound < 0.1; the clean non-target samples' own level is 0.00 under both models)."""
    model, data, attack = _digits_model(attack_name)
    triggered = attack.poison_test(data.test)
    clean_f = penultimate_features(model, data.test.x, device=torch.device("cpu")).numpy()
    triggered_f = penultimate_features(model, triggered.x, device=torch.device("cpu")).numpy()
    flag = np.r_[np.zeros(len(data.test.y), bool), np.ones(len(triggered.y), bool)]
    purity = knn_purity(embed(np.r_[clean_f, triggered_f], seed=0), flag, k=10)
    share = target_neighbour_share(clean_f, data.test.y.numpy(), triggered_f, target=0, k=10)
    if attack_name == "badnets":
        with torch.no_grad():
            assert float((model(triggered.x.float() / 255).argmax(1) == 0).float().mean()) > 0.9  # backdoor formed
        assert purity > 0.9 and share > 0.6
    else:
        assert purity < 0.7 and share < 0.1


TINY = dict(matrix="tiny", dataset="synthetic", model="cnn_small", attack="badnets", defense="ft", ratio=0.1, seed=0,
            dataset_params={"num_classes": 4, "train_size": 160, "test_size": 80, "image_size": 16},
            attack_params={"cap_ratio": True}, training=TrainConfig(epochs=2, batch_size=32, lr=0.05),
            defense_training=TrainConfig(epochs=1, batch_size=32), clean_fraction=0.1)


@pytest.fixture(scope="module")
def finished_case(tmp_path_factory):
    """A tiny case run end to end through Runner, its record written like the grid writes it."""
    tmp = tmp_path_factory.mktemp("analysis")
    cache, results = tmp / "cache", tmp / "results"
    record = Runner(ArtifactCache(cache)).run(Case(**TINY))
    upsert_records(results, [record])
    return record, cache, results


def test_load_case_refuses_to_train(finished_case, tmp_path):
    record, _, results = finished_case
    empty = tmp_path / "empty-cache"
    empty.mkdir()
    with pytest.raises(NotCachedError, match="not cached.*run the case first"):
        load_case(results, record["case_id"], empty)
    assert list(empty.rglob("*")) == []  # not even a lock file
    with pytest.raises(LookupError, match="no case"):
        load_case(results, "synthetic-cnn_small-badnets-p0.1-s9-ft", empty)


def test_load_case_returns_the_cached_models(finished_case):
    record, cache, results = finished_case
    artifacts = load_case(results, record["case_id"], cache)
    assert artifacts.defended is not None and set(artifacts.models()) == {"before", "after"}
    triggered = artifacts.triggered_test()
    pred = artifacts.defended(triggered.x.float() / 255).argmax(1)
    assert float((pred == 0).float().mean()) == pytest.approx(record["asr"], abs=1e-6)


@pytest.mark.parametrize("name", ["tsne", "gradcam", "shapley", "frequency", "activation"])
def test_every_tool_writes_a_figure_and_numbers(finished_case, name, monkeypatch):
    """Each tool end to end; its figure's plotted values are read back and compared with the numbers it saved."""
    record, cache, results = finished_case
    module, figures = tool(name), []
    save = module.save_figure
    monkeypatch.setattr(module, "save_figure", lambda fig, *a: figures.append(fig) or save(fig, *a))
    argv = ["analyze", name, str(results), "--case", record["case_id"], "--cache-dir", str(cache)]
    extra = {"tsne": ["--perplexity", "10"], "shapley": ["--samples", "6", "--shapley-samples", "2"],
             "gradcam": ["--samples", "6"], "frequency": ["--samples", "6"]}
    assert cli_main(argv + extra.get(name, [])) == 0
    folder = results / "analysis" / record["case_id"]
    for suffix in (".png", ".npz", ".json"):
        assert (folder / f"{name}{suffix}").stat().st_size > 0
    summary = json.loads((folder / f"{name}.json").read_text())
    assert summary["case"] == record["case_id"]
    arrays = dict(np.load(folder / f"{name}.npz"))
    assert all(np.isfinite(arrays[k]).all() for k in arrays if arrays[k].dtype.kind == "f")
    models = load_case(results, record["case_id"], cache).models()
    FIGURE_CHECKS[name](figures[0], arrays, summary, models)


def grid(fig, arrays: dict, columns: int) -> np.ndarray:
    """The figure's [images, columns] panels (colour bars, appended after them, left out)."""
    return np.array(fig.axes[:len(arrays["images"]) * columns]).reshape(-1, columns)


def check_explained_classes(arrays: dict, models: dict) -> None:
    """The maps explain what each model predicts for each image: of the 6 pairs the backdoored model gets 3
    images wrong, so explaining the true label instead would show."""
    wrong = 0
    for stage, model in models.items():
        predicted = predictions(model, torch.from_numpy(arrays["images"])).numpy()
        assert arrays[f"classes_{stage}"].tolist() == predicted.tolist()
        wrong += int((predicted != np.tile(arrays["labels"], 2)).sum())
    assert wrong > 0


def check_gradcam_figure(fig, arrays, summary, models):
    check_explained_classes(arrays, models)
    columns = [f"{method}_{stage}" for stage in models for method in ("gradcam", "fullgrad")]
    axes = grid(fig, arrays, 1 + len(columns))
    for i, row in enumerate(axes):
        np.testing.assert_allclose(row[0].images[0].get_array(), arrays["images"][i].transpose(1, 2, 0))
        for ax, key in zip(row[1:], columns):
            np.testing.assert_array_equal(ax.images[1].get_array(), arrays[key][i])
            assert ax.get_xlabel() == f"class {arrays['classes_' + key.split('_')[1]][i]}"


def check_shapley_figure(fig, arrays, summary, models):
    check_explained_classes(arrays, models)
    axes = grid(fig, arrays, 1 + len(models))
    for i, row in enumerate(axes):
        for ax, stage in zip(row[1:], models):
            values, errors = arrays[f"shapley_{stage}"][i], arrays[f"shapley_se_{stage}"][i]
            np.testing.assert_array_equal(ax.images[0].get_array(), values)
            np.testing.assert_array_equal(ax.images[0].get_alpha(), np.where(np.abs(values) >= 2 * errors, 1, 0.3))
    for stage in models:
        clear = np.abs(arrays[f"shapley_{stage}"]) >= 2 * arrays[f"shapley_se_{stage}"]
        assert summary[f"shapley_{stage}_clear_of_zero"] == pytest.approx(clear.mean())


def check_frequency_figure(fig, arrays, summary, models):
    check_explained_classes(arrays, models)
    axes = grid(fig, arrays, 1 + len(models))
    for i, row in enumerate(axes):
        for ax, stage in zip(row[1:], models):
            np.testing.assert_array_equal(ax.images[0].get_array(), arrays[f"fsm_{stage}"][i])


def check_tsne_figure(fig, arrays, summary, models):
    labels, flag = arrays["labels"], arrays["triggered"].astype(bool)
    for ax, stage in zip(fig.axes, models):
        points = arrays[f"embedding_{stage}"]
        *classes, triggered = ax.collections
        np.testing.assert_allclose(triggered.get_offsets(), points[flag])
        for collection, label in zip(classes, np.unique(labels)):
            np.testing.assert_allclose(collection.get_offsets(), points[(labels == label) & ~flag])
        assert f"purity {summary[f'knn_purity_{stage}']:.2f}" in ax.get_title()
        assert f"(features): {summary[f'target_neighbour_share_{stage}']:.2f}" in ax.get_title()


def check_activation_figure(fig, arrays, summary, models):
    lines = {line.get_label(): line.get_ydata() for line in fig.axes[0].get_lines()}
    assert len(lines) == 2 * len(models)
    for key, (_, _, label) in STYLE.items():
        if key in arrays:
            np.testing.assert_allclose(lines[label], arrays[key][arrays["order"]])
    assert (np.diff(lines["triggered, no defense"]) <= 0).all()  # sorted by it


FIGURE_CHECKS = {"gradcam": check_gradcam_figure, "shapley": check_shapley_figure,
                 "frequency": check_frequency_figure, "tsne": check_tsne_figure,
                 "activation": check_activation_figure}


def test_tool_registry_names_every_module():
    for name in ("tsne", "gradcam", "shapley", "frequency", "activation"):
        assert tool(name).NAME == name
    with pytest.raises(KeyError, match="available"):
        tool("lime")
    parser = argparse.ArgumentParser()
    tool("activation").add_arguments(parser)
    assert parser.parse_args([]).layer == "last_conv"
