"""Analysis tools with known answers (paper 3.2, supplementary B.11), and loading a case without training."""
import argparse
import json

import numpy as np
import pytest
import torch
from torch import nn

from backdoor.analysis import tool
from backdoor.analysis._artifacts import NotCachedError, load_case
from backdoor.analysis.frequency import frequency_saliency
from backdoor.analysis.gradcam import fullgrad_maps, gradcam_maps
from backdoor.analysis.shapley import shapley_maps, superpixel_mask
from backdoor.analysis.tsne import embed, knn_purity
from backdoor.attacks import create_attack
from backdoor.cache import ArtifactCache
from backdoor.cli import main as cli_main
from backdoor.data import load_dataset
from backdoor.defenses._data_side import penultimate_features
from backdoor.models import create_model
from backdoor.pipeline import Case, Runner
from backdoor.results import upsert_records
from backdoor.training import TrainConfig, fit

SIZE, PATCH = 24, 3


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One CPU thread, as the grid's plugin sets (also when this file runs without it)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class PatchNet(nn.Module):
    """Reads only the bottom-right 3x3 patch: the input is masked, then 1x1 convolutions (no bias, positive
    weights) keep every activation outside the patch at zero; two classes, summed over positions."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        mask = torch.zeros(1, 1, SIZE, SIZE)
        mask[..., -PATCH:, -PATCH:] = 1
        self.register_buffer("mask", mask)
        self.conv1 = nn.Conv2d(3, 8, 1, bias=False)
        self.conv2 = nn.Conv2d(8, 8, 1, bias=False)
        self.head = nn.Linear(8, 2, bias=False)
        with torch.no_grad():
            for layer in (self.conv1, self.conv2, self.head):
                layer.weight.copy_(torch.rand(layer.weight.shape, generator=g) + 0.1)
            self.head.weight[1] *= 0.5  # class 0 always wins: a definite target to explain
        self.relu = nn.ReLU()

    def forward(self, x):
        a = self.relu(self.conv2(self.relu(self.conv1(x * self.mask))))
        return self.head(a.sum((2, 3)))


def images(n=3, seed=1):
    return torch.rand(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def patch_mass(maps: np.ndarray) -> np.ndarray:
    positive = np.clip(maps, 0, None)
    return positive[:, -PATCH:, -PATCH:].sum((1, 2)) / positive.sum((1, 2))


def test_gradcam_and_fullgrad_put_their_mass_on_the_patch():
    model, x = PatchNet().eval(), images()
    classes = torch.zeros(len(x), dtype=torch.long)
    assert (patch_mass(gradcam_maps(model, model.conv2, x, classes)) > 0.9).all()
    assert (patch_mass(fullgrad_maps(model, x, classes)) > 0.9).all()


def test_shapley_map_puts_its_mass_on_the_patch():
    model, x = PatchNet().eval(), images()
    maps = shapley_maps(model, x, torch.zeros(len(x), dtype=torch.long), superpixel=PATCH, n_samples=3, seed=0)
    assert maps.shape == (len(x), SIZE, SIZE)
    assert (patch_mass(maps) > 0.9).all()
    assert np.abs(maps[:, :-PATCH, :]).max() < 1e-4  # features the model never reads get no value
    # efficiency of Shapley values: the attributions add up to f(x) - f(baseline)
    with torch.no_grad():
        gain = model(x)[:, 0] - model(torch.zeros_like(x))[:, 0]
    np.testing.assert_allclose(maps.sum((1, 2)), gain.numpy(), rtol=1e-4)


def test_superpixel_mask_covers_the_image_in_squares():
    mask = superpixel_mask(5, 7, 2)[0, 0]
    assert mask.shape == (5, 7) and int(mask.max()) + 1 == 3 * 4
    assert mask[0, 0] == mask[1, 1] != mask[0, 2]


class FrequencyReader(nn.Module):
    """Logit 0 = the image's correlation with one cosine of frequency (u, v) (all channels); logit 1 = its minus."""

    def __init__(self, u: int, v: int, size: int = 16):
        super().__init__()
        h, w = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
        self.register_buffer("basis", torch.cos(2 * torch.pi * (u * h + v * w) / size))

    def forward(self, x):
        s = (x * self.basis).sum((1, 2, 3))
        return torch.stack([s, -s], 1)


def peak_distance_from_centre(fsm: np.ndarray) -> float:
    h, w = fsm.shape
    r, c = np.unravel_index(fsm.argmax(), fsm.shape)
    return float(np.hypot(r - h // 2, c - w // 2))


def test_frequency_saliency_of_a_low_frequency_reader_peaks_at_the_centre():
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    fsm = frequency_saliency(FrequencyReader(1, 0), x, torch.zeros(2, dtype=torch.long))
    assert fsm.shape == (2, 16, 16) and fsm.min() == 0 and fsm.max() == pytest.approx(1)
    for m in fsm:
        assert peak_distance_from_centre(m) <= 1
        assert m.mean() < 0.05  # everything but the read frequency (and its mirror) is ~0
    # the contrast: a reader of the highest vertical frequency peaks at the border, far from the centre
    high = frequency_saliency(FrequencyReader(8, 0), x, torch.zeros(2, dtype=torch.long))
    assert peak_distance_from_centre(high[0]) >= 7


def test_knn_purity_on_hand_made_points():
    points = np.r_[np.zeros((5, 2)), np.full((5, 2), 10.0)] + np.arange(10)[:, None] * 0.01
    marked = np.r_[np.zeros(5, bool), np.ones(5, bool)]
    assert knn_purity(points, marked, k=4) == 1.0
    assert knn_purity(points, np.tile([True, False], 5), k=4) < 0.7


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
    0.985); under a clean model they mix with the clean images they come from (measured 0.45, bound < 0.7)."""
    model, data, attack = _digits_model(attack_name)
    triggered = attack.poison_test(data.test)
    features = torch.cat([penultimate_features(model, data.test.x, device=torch.device("cpu")),
                          penultimate_features(model, triggered.x, device=torch.device("cpu"))]).numpy()
    flag = np.r_[np.zeros(len(data.test.y), bool), np.ones(len(triggered.y), bool)]
    purity = knn_purity(embed(features, seed=0), flag, k=10)
    if attack_name == "badnets":
        with torch.no_grad():
            assert float((model(triggered.x.float() / 255).argmax(1) == 0).float().mean()) > 0.9  # backdoor formed
        assert purity > 0.9
    else:
        assert purity < 0.7


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
def test_every_tool_writes_a_figure_and_numbers(finished_case, name):
    record, cache, results = finished_case
    argv = ["analyze", name, str(results), "--case", record["case_id"], "--cache-dir", str(cache)]
    extra = {"tsne": ["--perplexity", "10"], "shapley": ["--samples", "2", "--shapley-samples", "2"],
             "gradcam": ["--samples", "2"], "frequency": ["--samples", "2"]}
    assert cli_main(argv + extra.get(name, [])) == 0
    folder = results / "analysis" / record["case_id"]
    for suffix in (".png", ".npz", ".json"):
        assert (folder / f"{name}{suffix}").stat().st_size > 0
    summary = json.loads((folder / f"{name}.json").read_text())
    assert summary["case"] == record["case_id"]
    arrays = np.load(folder / f"{name}.npz")
    assert all(np.isfinite(arrays[k]).all() for k in arrays.files if arrays[k].dtype.kind == "f")


def test_tool_registry_names_every_module():
    for name in ("tsne", "gradcam", "shapley", "frequency", "activation"):
        assert tool(name).NAME == name
    with pytest.raises(KeyError, match="available"):
        tool("lime")
    parser = argparse.ArgumentParser()
    tool("activation").add_arguments(parser)
    assert parser.parse_args([]).layer == "last_conv"
