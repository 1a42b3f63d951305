"""SCAn: the global EM against an independent per-sample implementation on the clean features, the median/MAD
normalisation by hand, a class mixing two separated Gaussians flagged (its poison subgroup, also when the poison
is the class's majority) while single-Gaussian classes are not, scores consistent with the flags, the threshold's
direction, flags that follow the samples when shuffled, seeded determinism, parameter validation, and the whole
detector on a tiny model whose features see a BadNets corner."""
import dataclasses
import math

import numpy as np
import pytest
import torch
from torch import nn

from backdoor._checks import ParameterError
from backdoor.attacks import create_attack
from backdoor.data import load_dataset
from backdoor.defenses import DefenseInputs, NotApplicable
from backdoor.detectors import DETECTORS, create_detector
from backdoor.detectors.scan import global_model, normalised_j, scan_statistics
from backdoor.metrics import detection_metrics
from backdoor.models import Classifier, LayerRoles, create_model
from backdoor.training import TrainConfig, fit

CPU = torch.device("cpu")


def gaussian_classes(poison: int, per_class: int = 150, clean_per_class: int = 30, classes: int = 6, dim: int = 8,
                     shift: float = 8.0, seed: int = 0):
    """Single-Gaussian classes (unit covariance) and ``poison`` rows of class 0 drawn around its centre moved by
    ``shift`` along the first axis; the defender's clean rows come from the single Gaussians."""
    g = torch.Generator().manual_seed(seed)
    centres = 4 * torch.randn(classes, dim, generator=g)
    labels = torch.arange(classes).repeat_interleave(per_class)
    feats = centres[labels] + torch.randn(len(labels), dim, generator=g)
    offset = torch.zeros(dim)
    offset[0] = shift
    poisoned = centres[0] + offset + torch.randn(poison, dim, generator=g)
    feats, labels = torch.cat([feats, poisoned]), torch.cat([labels, torch.zeros(poison, dtype=torch.long)])
    mask = torch.arange(len(labels)) >= len(labels) - poison
    order = torch.randperm(len(labels), generator=g)
    clean_labels = torch.arange(classes).repeat_interleave(clean_per_class)
    clean = centres[clean_labels] + torch.randn(len(clean_labels), dim, generator=g)
    return feats[order], labels[order], mask[order], clean, clean_labels


def reference_em(x: np.ndarray, y: np.ndarray, iters: int = 100, eps: float = 1e-5):
    """The paper's EM written independently, sample by sample, with NumPy's covariance."""
    x = x - x.mean(0)
    classes = sorted(set(y.tolist()))
    means = {k: x[y == k].mean(0) for k in classes}
    u = np.stack([means[k] for k in y])
    su, se = np.cov(u.T), np.cov((x - u).T)
    for _ in range(iters):
        ident = {}
        for k in classes:  # the identity's posterior mean S_u (n S_u + S_e)^-1 sum(x) (S_e is invertible here)
            rows = x[y == k]
            ident[k] = su @ np.linalg.inv(len(rows) * su + se) @ rows.sum(0)
        u = np.stack([ident[k] for k in y])
        new_su, new_se = np.cov(u.T), np.cov((x - u).T)
        change = np.linalg.norm(new_su - su) + np.linalg.norm(new_se - se)
        su, se = new_su, new_se
        if change <= eps:
            break
    return su, se


def test_global_model_matches_an_independent_em_on_the_clean_features():
    feats, labels, _, clean, clean_labels = gaussian_classes(poison=40)
    su, se = reference_em(clean.double().numpy(), clean_labels.numpy())
    gm = global_model(clean, clean_labels)
    assert gm.converged and 1 < gm.iterations < 100
    np.testing.assert_allclose(gm.su.numpy(), su, atol=1e-8)
    np.testing.assert_allclose(gm.se.numpy(), se, atol=1e-8)
    # unit within-class noise: S_e is near the identity, S_u carries the class centres
    assert torch.allclose(gm.se, torch.eye(8, dtype=torch.float64), atol=0.35)
    # the detector fits its global model on the clean features, not on the inspected (poisoned) ones
    result = scan_statistics(feats, labels, clean, clean_labels)
    np.testing.assert_allclose(result.global_model.se.numpy(), se, atol=1e-8)
    np.testing.assert_allclose(result.global_model.su.numpy(), su, atol=1e-8)


def test_mad_normalisation_by_hand():
    j = torch.tensor([1.0, 2.0, 3.0, 4.0, 100.0])  # median 3, deviations 2 1 0 1 97 -> MAD 1
    expected = (j.double() - 3.0) / 1.4826
    torch.testing.assert_close(normalised_j(j), expected)
    j = torch.tensor([1.0, 2.0, 3.0, 10.0])  # median 2.5 (mean of the middle two), deviations 1.5 .5 .5 7.5 -> 1
    torch.testing.assert_close(normalised_j(j), (j.double() - 2.5) / 1.4826)
    assert normalised_j(torch.tensor([1.0, 0.0, 2.0, -40.0, 1.0]))[3] < 0  # signed: a small J is not an outlier


def test_two_gaussian_class_is_flagged_and_single_gaussians_are_not():
    feats, labels, mask, clean, clean_labels = gaussian_classes(poison=40)
    result = scan_statistics(feats, labels, clean, clean_labels, seed=3)
    j = dict(zip(result.labels, result.j.tolist()))
    # two components 8 sigma apart, shares 40/220 and 180/220: J near 8^2 * p (1 - p) ~ 9.5 (+ the split gain)
    assert j[0] > 8
    # one Gaussian: J is only the split gain of 2-means (2/pi along one axis) and the shrinkage, near 1
    assert all(0 < j[k] < 2 for k in range(1, 6)), j
    assert result.contaminated == [0]
    assert result.j_star[0] > math.exp(2) and (result.j_star[1:] < 3).all()
    assert torch.equal(result.flagged, mask)  # exactly the poison subgroup, nothing of the clean classes
    # the scores agree with the decision and rank every poisoned sample above every clean one
    assert torch.equal(result.scores > 1, result.flagged)
    assert result.scores[mask].min() > result.scores[~mask].max()
    expected = torch.minimum(result.j_star[labels] / math.exp(2), 2 * result.posterior)
    torch.testing.assert_close(result.scores, expected.float())
    assert detection_metrics(result.flagged, mask, result.scores)["auroc"] == 1.0


def test_the_subgroup_with_fewer_clean_samples_is_flagged_even_when_it_is_the_majority():
    """160 poisoned rows against 150 clean ones in class 0: the clean subset, not the size, says which is poison."""
    feats, labels, mask, clean, clean_labels = gaussian_classes(poison=160, seed=1)
    result = scan_statistics(feats, labels, clean, clean_labels, seed=0)
    assert result.contaminated == [0]
    assert torch.equal(result.flagged, mask)
    entry = result.per_class[0]
    assert entry["suspect_size"] == 160 and entry["size"] == 310


def test_without_clean_samples_of_the_class_the_smaller_subgroup_is_flagged():
    """No clean sample of class 0 to vote (the references' tie): the smaller subgroup of the class is the poison."""
    feats, labels, mask, clean, clean_labels = gaussian_classes(poison=40, seed=4)
    keep = clean_labels != 0
    result = scan_statistics(feats, labels, clean[keep], clean_labels[keep], seed=1)
    assert result.contaminated == [0]
    # 39 of the 40 (one poisoned row of this draw lies nearer the clean mean), and no clean row
    assert not (result.flagged & ~mask).any() and int(result.flagged.sum()) == 39
    assert result.per_class[0]["clean"] == 0 and result.per_class[0]["suspect_size"] == 39


def test_threshold_decides_which_classes_are_contaminated():
    feats, labels, mask, clean, clean_labels = gaussian_classes(poison=40)
    base = scan_statistics(feats, labels, clean, clean_labels)
    top = float(base.j_star[0])
    above = scan_statistics(feats, labels, clean, clean_labels, threshold=top * 1.01)
    assert above.contaminated == [] and not above.flagged.any()
    below = scan_statistics(feats, labels, clean, clean_labels, threshold=top * 0.99)
    assert torch.equal(below.flagged, mask)


def test_shuffling_the_samples_shuffles_the_flags_and_the_seed_fixes_the_result():
    feats, labels, _, clean, clean_labels = gaussian_classes(poison=40, seed=2)
    base = scan_statistics(feats, labels, clean, clean_labels, seed=7)
    again = scan_statistics(feats, labels, clean, clean_labels, seed=7)
    assert torch.equal(base.flagged, again.flagged) and torch.equal(base.scores, again.scores)
    for s in range(2):
        perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(s))
        shuffled = scan_statistics(feats[perm], labels[perm], clean, clean_labels, seed=7)
        assert torch.equal(shuffled.flagged, base.flagged[perm])
        torch.testing.assert_close(shuffled.scores, base.scores[perm])


def test_parameters_are_validated():
    detector = create_detector("scan")
    assert (detector.threshold, detector.max_iters, detector.tol) == (math.exp(2), 100, 1e-5)
    assert DETECTORS.get("scan").task == "data" and DETECTORS.get("scan").order == 110
    for key, value in [("threshold", 0.0), ("threshold", -1.0), ("threshold", float("nan")), ("threshold", "e"),
                       ("max_iters", 0), ("max_iters", 1.5), ("max_iters", True), ("tol", -1e-3)]:
        with pytest.raises(ParameterError) as error:
            create_detector("scan", **{key: value})
        assert error.value.owner == "scan" and error.value.param == key


class CornerNet(nn.Module):
    """Penultimate features = mean colour of the bottom-right 2x2 corner (where BadNets writes)."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.pool = nn.Identity()
        self.linear = nn.Linear(3, num_classes)

    def forward(self, x):
        return self.linear(self.pool(x[..., -2:, -2:].mean((2, 3))))


def corner_model(num_classes: int) -> Classifier:
    roles = LayerRoles(feature_maps=("pool", "pool", "pool"), last_conv="pool", head="linear")
    return Classifier(CornerNet(num_classes), (0.5,) * 3, (0.5,) * 3, roles, arch="corner")


def detector_inputs(poisoned, clean, num_classes, seed=5):
    return DefenseInputs(
        model=corner_model(num_classes), clean=clean, num_classes=num_classes, device=CPU, seed=seed,
        training=TrainConfig(epochs=1, batch_size=64), retraining=TrainConfig(epochs=1, batch_size=64),
        new_model=lambda: create_model("cnn_small", num_classes, seed=0),
        fit=lambda m, split, config, **kw: fit(m, split, config, device=CPU, **kw), poisoned_train=poisoned)


def test_detector_flags_the_badnets_samples_of_a_model_that_sees_the_corner():
    data = load_dataset("synthetic", num_classes=4, train_size=400, test_size=8, image_size=16)
    attack = create_attack("badnets", target=0, size=2).poison_train(data.train, 0.05, seed=0)
    clean = data.train.subset(torch.nonzero(~attack.mask).flatten()[:60])
    detection = create_detector("scan").detect(detector_inputs(attack.split, clean, 4))
    d = detection_metrics(detection.flagged, attack.mask, detection.scores)
    assert d["tpr"] == 1.0 and d["fpr"] <= 0.02, d
    assert d["auroc"] >= 0.99, d
    assert detection.info["contaminated_classes"] == [0]
    assert detection.scores.dtype == torch.float32 and detection.flagged.dtype == torch.bool
    with pytest.raises(NotApplicable):
        create_detector("scan").detect(dataclasses.replace(detector_inputs(attack.split, clean, 4),
                                                           poisoned_train=None))
