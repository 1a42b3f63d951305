"""SPECTRE: QUE scores against their direct formula and its two limits (alpha -> 0: the whitened squared norm;
alpha -> infinity: the whitened spectral score), robust whitening gives the inliers identity covariance and leaves
a planted cluster out, the projection keeps the top-k directions, a planted cluster in one label is flagged and
clean Gaussian labels lose at most the budget, flags follow the samples when shuffled, and the whole detector
flags BadNets samples through a model whose features see the trigger."""
import dataclasses

import pytest
import torch
from torch import nn

from backdoor._checks import ParameterError
from backdoor.attacks import create_attack
from backdoor.data import load_dataset
from backdoor.defenses import DefenseInputs, NotApplicable
from backdoor.detectors import DataDetector, create_detector
from backdoor.detectors.spectre import (Spectre, project, que_scores, robust_mean_cov, spectre, whiten)
from backdoor.metrics import detection_metrics
from backdoor.models import Classifier, LayerRoles, create_model
from backdoor.training import TrainConfig, fit

CPU = torch.device("cpu")
D = torch.float64


def gaussian(n, dim, seed, scale=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g, dtype=D)
    return x * scale if scale is not None else x


def planted(poison=20, clean_per_class=200, classes=4, dim=8, shift=8.0, seed=0):
    """Gaussian labels (anisotropic: scales 1..3), label 0 with ``poison`` extra rows shifted along one
    direction by ``shift`` standard deviations."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.linspace(1.0, 3.0, dim, dtype=D)
    centres = 10 * torch.randn(classes, dim, generator=g, dtype=D)
    labels = torch.arange(classes).repeat_interleave(clean_per_class)
    feats = centres[labels] + scale * torch.randn(len(labels), dim, generator=g, dtype=D)
    direction = nn.functional.normalize(torch.randn(dim, generator=g, dtype=D), dim=0)
    bad = centres[0] + shift * direction * scale + 0.5 * scale * torch.randn(poison, dim, generator=g, dtype=D)
    feats, labels = torch.cat([feats, bad]), torch.cat([labels, torch.zeros(poison, dtype=torch.long)])
    mask = torch.arange(len(labels)) >= len(labels) - poison
    order = torch.randperm(len(labels), generator=g)
    return feats[order].float(), labels[order], mask[order]


# ---- the statistical core --------------------------------------------------------------------------------

def direct_que(white, alpha):
    """tau_i = h_i^T Q h_i / tr(Q), Q = expm(alpha (S - I) / (||S||_2 - 1)), S = (1/n) sum h h^T."""
    s = white.T @ white / len(white)
    q = torch.linalg.matrix_exp(alpha * (s - torch.eye(len(s), dtype=D)) / (torch.linalg.matrix_norm(s, 2) - 1))
    return torch.einsum("ni,ij,nj->n", white, q, white) / torch.trace(q)


def test_que_scores_match_the_direct_formula():
    white = gaussian(30, 4, seed=1, scale=torch.tensor([1.0, 1.3, 0.7, 2.0], dtype=D))
    for alpha in (0.5, 4.0, 9.0):
        scores, statistic = que_scores(white, alpha)
        torch.testing.assert_close(scores, direct_que(white, alpha), rtol=1e-10, atol=1e-12)
        s = white.T @ white / len(white)
        q = torch.linalg.matrix_exp(alpha * (s - torch.eye(4, dtype=D)) / (torch.linalg.matrix_norm(s, 2) - 1))
        assert statistic == pytest.approx(float(torch.trace(s @ q) / torch.trace(q)), rel=1e-10)
    # alpha matters: 4 and 9 give different scores
    assert not torch.allclose(que_scores(white, 4.0)[0], que_scores(white, 9.0)[0])


def test_que_limits_are_the_whitened_norm_and_the_spectral_score():
    white = gaussian(40, 5, seed=2, scale=torch.tensor([1.0, 1.1, 0.9, 1.5, 3.0], dtype=D))
    norm = (white ** 2).sum(1) / 5
    torch.testing.assert_close(que_scores(white, 1e-7)[0], norm, rtol=1e-5, atol=1e-8)
    _, vectors = torch.linalg.eigh(white.T @ white / 40)
    spectral = (white @ vectors[:, -1]) ** 2
    torch.testing.assert_close(que_scores(white, 2000.0)[0], spectral, rtol=1e-6, atol=1e-8)


def test_whitening_gives_the_kept_rows_identity_covariance_and_leaves_a_planted_cluster_out():
    g = torch.Generator().manual_seed(3)
    mix = torch.randn(4, 4, generator=g, dtype=D)
    inliers = torch.randn(300, 4, generator=g, dtype=D) @ mix + 2.0
    outliers = 2.0 + 8 * mix[0] + 0.3 * torch.randn(20, 4, generator=g, dtype=D)
    x = torch.cat([inliers, outliers])
    mean, cov, kept = robust_mean_cov(x, trim=40)
    assert int(kept.sum()) == 280 and not kept[300:].any()  # the cluster is among the 40 left out
    white = whiten(x[kept], mean, cov)
    torch.testing.assert_close(white.mean(0), torch.zeros(4, dtype=D), atol=1e-10, rtol=0)
    torch.testing.assert_close(white.T @ white / len(white), torch.eye(4, dtype=D), atol=1e-10, rtol=0)
    # the plain covariance of everything is pulled along the cluster; the robust one stays near the inliers'
    inlier_cov = torch.cov(inliers.T, correction=0)
    ratio = torch.linalg.eigvalsh(torch.linalg.solve(cov, inlier_cov))
    assert ratio.min() > 0.8 and ratio.max() < 1.6, ratio  # trimming 20 inliers too shrinks it a little
    plain = torch.cov(x.T, correction=0)
    assert torch.linalg.eigvalsh(torch.linalg.solve(plain, inlier_cov)).min() < 0.2
    # trimming exactly the cluster's size gives exactly the inliers' mean and covariance
    mean, cov, kept = robust_mean_cov(x, trim=20)
    assert kept.tolist() == [True] * 300 + [False] * 20
    torch.testing.assert_close(cov, inlier_cov, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(mean, inliers.mean(0), rtol=1e-10, atol=1e-12)


def test_projection_keeps_the_top_k_directions():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(100, 6, generator=g, dtype=D) * torch.tensor([5.0, 4.0, 3.0, 0.1, 0.1, 0.1], dtype=D)
    p = project(x, 3)
    assert p.shape == (100, 3)
    c = x - x.mean(0)
    # the projection keeps the centred rows' energy in the top three directions, nearly all of it here
    assert float((p ** 2).sum()) == pytest.approx(float((torch.linalg.svdvals(c)[:3] ** 2).sum()), rel=1e-10)
    assert project(x, 50).shape == (100, 6)  # capped at the dimension


def test_k1_score_is_the_squared_projection_on_the_top_singular_vector_over_its_robust_variance():
    """k = 1 (exact): tau_i = (<h_i - mean, v> - m)^2 / s^2, with (m, s^2) the mean and variance of the kept
    projections; on a single label of clean rows, whatever alpha."""
    feats = gaussian(60, 5, seed=5, scale=torch.tensor([4.0, 1.0, 1.0, 1.0, 1.0], dtype=D))
    labels = torch.zeros(60, dtype=torch.long)
    result = spectre(feats.float(), labels, k=1, eps=0.05, classes="all")
    rows = feats.float().double()
    c = rows - rows.mean(0)
    v = torch.linalg.svd(c, full_matrices=False).Vh[0]
    proj = c @ v
    _, _, kept = robust_mean_cov(proj[:, None], trim=6)
    m, s2 = proj[kept].mean(), proj[kept].var(correction=0)
    torch.testing.assert_close(result.scores, (proj - m) ** 2 / s2, rtol=1e-6, atol=1e-9)
    assert int(result.flagged.sum()) == round(1.5 * 0.05 * 60)


def test_planted_cluster_in_one_label_is_flagged_and_only_that_label():
    feats, labels, mask = planted()
    result = spectre(feats, labels, k=32, eps=0.1)
    assert result.chosen == 0
    d = detection_metrics(result.flagged, mask, result.scores)
    assert d["tpr"] == 1.0, d
    assert int(result.flagged.sum()) == round(1.5 * 0.1 * 220)
    assert not result.flagged[labels != 0].any()
    assert d["auroc"] >= 0.99, d
    statistics = {e["label"]: e["statistic"] for e in result.per_class}
    assert statistics[0] > max(statistics[c] for c in (1, 2, 3))


def test_projection_to_k_below_the_dimension_finds_a_cluster_hidden_in_many_noise_dimensions():
    """A cluster shifted along the two largest-variance directions of 40: with k = 2 the QUE score sees it;
    without the projection, whitening in all 40 dimensions (n = 150) drowns it."""
    g = torch.Generator().manual_seed(6)
    scale = torch.ones(40, dtype=D)
    scale[:2] = 6.0
    clean = torch.randn(140, 40, generator=g, dtype=D) * scale
    bad = torch.randn(10, 40, generator=g, dtype=D) * scale * 0.3
    bad[:, :2] += 20.0
    feats = torch.cat([clean, bad]).float()
    labels = torch.zeros(150, dtype=torch.long)
    mask = torch.arange(150) >= 140
    result = spectre(feats, labels, k=2, eps=0.07, classes="all")
    assert result.per_class[0]["dims"] == 2
    d = detection_metrics(result.flagged, mask, result.scores)
    assert d["tpr"] == 1.0 and d["auroc"] >= 0.99, d


def test_whitening_uncovers_a_cluster_along_a_low_variance_direction():
    """The cluster sits 6 sd out along the label's smallest-variance direction, far inside the spread of the
    largest: after robust whitening it is the top direction, without whitening it is not."""
    g = torch.Generator().manual_seed(7)
    scale = torch.tensor([20.0, 15.0, 10.0, 1.0], dtype=D)
    clean = torch.randn(200, 4, generator=g, dtype=D) * scale
    bad = torch.randn(16, 4, generator=g, dtype=D) * scale * 0.2
    bad[:, 3] += 6.0
    feats = torch.cat([clean, bad]).float()
    labels = torch.zeros(216, dtype=torch.long)
    mask = torch.arange(216) >= 200
    result = spectre(feats, labels, k=32, eps=0.08, classes="all")
    d = detection_metrics(result.flagged, mask, result.scores)
    assert d["tpr"] >= 0.9 and d["auroc"] >= 0.98, d


def test_clean_gaussian_labels_flag_at_most_the_budget():
    g = torch.Generator().manual_seed(8)
    labels = torch.arange(3).repeat_interleave(100)
    feats = (torch.randn(3, 6, generator=g) * 5)[labels] + torch.randn(300, 6, generator=g)
    for rule, total in (("max", 15), ("all", 45)):
        result = spectre(feats, labels, eps=0.1, classes=rule)
        assert int(result.flagged.sum()) == total  # round(1.5 * 0.1 * 100) per flagged label
        for label in range(3):
            assert int(result.flagged[labels == label].sum()) in (0, 15)
    # scores are on one scale: each label's inliers average about 1
    result = spectre(feats, labels, eps=0.1)
    for label in range(3):
        assert 0.7 < float(result.scores[labels == label].median()) < 1.3


def test_shuffling_the_samples_shuffles_the_flags():
    feats, labels, _ = planted(seed=2)
    base = spectre(feats, labels)
    for s in range(2):
        perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(s))
        shuffled = spectre(feats[perm], labels[perm])
        assert torch.equal(shuffled.flagged, base.flagged[perm])
        torch.testing.assert_close(shuffled.scores, base.scores[perm])


def test_small_labels_are_skipped_not_failed():
    feats = torch.cat([torch.randn(50, 4), torch.randn(2, 4)])
    labels = torch.cat([torch.zeros(50, dtype=torch.long), torch.ones(2, dtype=torch.long)])
    result = spectre(feats, labels, eps=0.1, classes="all")
    assert not result.flagged[50:].any() and int(result.flagged[:50].sum()) == 8


@pytest.mark.parametrize("params", [{"k": 0}, {"k": 2.5}, {"alpha": 0}, {"alpha": -1.0}, {"alpha": float("nan")},
                                    {"eps": 0}, {"eps": 0.5}, {"eps": True}, {"classes": "target"}])
def test_bad_parameters_are_refused(params):
    with pytest.raises(ParameterError) as error:
        create_detector("spectre", **params)
    assert error.value.owner == "spectre" and error.value.param == next(iter(params))


def test_registered_with_its_defaults():
    detector = create_detector("spectre")
    assert isinstance(detector, Spectre) and isinstance(detector, DataDetector) and detector.task == "data"
    assert detector.params() == {"k": 32, "alpha": 4.0, "eps": 0.1, "classes": "max"}
    assert Spectre.order == 120 and Spectre.title == "SPECTRE"


# ---- end to end ------------------------------------------------------------------------------------------

class CornerNet(nn.Module):
    """Penultimate features = mean colour of the bottom-right 2x2 corner (where BadNets writes) and of the
    whole image."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.pool = nn.Identity()
        self.linear = nn.Linear(6, num_classes)

    def forward(self, x):
        return self.linear(self.pool(torch.cat([x[..., -2:, -2:].mean((2, 3)), x.mean((2, 3))], 1)))


def corner_model(num_classes: int) -> Classifier:
    roles = LayerRoles(feature_maps=("pool", "pool", "pool"), last_conv="pool", head="linear")
    return Classifier(CornerNet(num_classes), (0.5,) * 3, (0.5,) * 3, roles, arch="corner")


def detect_inputs(model, poisoned, num_classes):
    return DefenseInputs(
        model=model, clean=poisoned.subset(torch.arange(8)), num_classes=num_classes, device=CPU, seed=5,
        training=TrainConfig(epochs=1, batch_size=64), retraining=TrainConfig(epochs=1, batch_size=64),
        new_model=lambda: create_model("cnn_small", num_classes, seed=0),
        fit=lambda m, split, config, **kw: fit(m, split, config, device=CPU, **kw), poisoned_train=poisoned)


def test_detector_flags_badnets_samples_of_the_target_label():
    data = load_dataset("synthetic", num_classes=4, train_size=400, test_size=8, image_size=16)
    poisoned = create_attack("badnets", target=0, size=2).poison_train(data.train, 0.02, seed=0)
    outcome = create_detector("spectre").detect(detect_inputs(corner_model(4), poisoned.split, 4))
    assert outcome.flagged.dtype == torch.bool and outcome.scores.dtype == torch.float32
    assert outcome.flagged.shape == outcome.scores.shape == (len(poisoned.y),)
    d = detection_metrics(outcome.flagged, poisoned.mask, outcome.scores)
    assert d["tpr"] == 1.0 and d["auroc"] >= 0.95, d
    assert outcome.info["chosen_label"] == 0 and outcome.info["feature_dim"] == 6
    assert not outcome.flagged[poisoned.y != 0].any()
    import json
    json.dumps(outcome.info)
    again = create_detector("spectre").detect(detect_inputs(corner_model(4), poisoned.split, 4))
    assert torch.equal(again.flagged, outcome.flagged) and torch.equal(again.scores, outcome.scores)
    with pytest.raises(NotApplicable):
        create_detector("spectre").detect(
            dataclasses.replace(detect_inputs(corner_model(4), poisoned.split, 4), poisoned_train=None))
