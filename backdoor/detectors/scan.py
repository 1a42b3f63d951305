"""SCAn: Statistical Contamination Analyzer (Tang, Wang, Tang, Zhang, "Demon in the Variant: Statistical Analysis of
DNNs for Robust Backdoor Contamination Detection", USENIX Security 2021).

Data-side detector. A representation r (the penultimate features of the model trained on the poisoned set, the
input of ``roles.head``) is modelled as an identity plus a variation, r = mu_class + e, with mu ~ N(0, S_u) and
e ~ N(0, S_e) shared by all classes (the "Joint Bayesian" decomposition the paper adopts).

1. Global model, from the defender's clean subset only: the EM of the paper estimates S_u and S_e. Start from
   the covariance of the class means and of the residuals; E-step: each class's identity is its posterior mean
   given its n samples, S_e (n S_u + S_e)^+ S_u S_e^+ sum(r) (equal to S_u (n S_u + S_e)^-1 sum(r) when S_e is
   invertible); M-step: S_u = cov(identities), S_e = cov(r - identity) (per sample, ddof 1). Stop when the
   Frobenius change of S_u plus that of S_e is at most ``tol`` or after ``max_iters`` iterations.
2. Untangling, per class of the inspected data (the poisoned training set joined by the clean subset, as in the
   references): two subgroups by hard-assignment EM in the metric F = S_e^+ (random 50/50 start; means of the
   two groups, then each sample to the nearer mean; until no sample moves, at most ``max_iters`` steps). The
   statistic J is the log-likelihood ratio of two identities against one, per sample:
   J = mean_i [ (r_i - mu)^T F (r_i - mu) - (r_i - mu_g(i))^T F (r_i - mu_g(i)) ], with mu the class's identity
   under the global model (its posterior mean) and mu_g the mean of the sample's subgroup.
3. Anomaly: J* = (J - median(J)) / (1.4826 MAD(J)) over the classes; a class is contaminated when J* exceeds
   ``threshold`` (paper: e^2). In a contaminated class the subgroup that holds fewer of the defender's clean
   samples is the poison (the references' rule); its samples of the poisoned set are flagged.

Per-sample score (for AUROC): ``min(J*_k / threshold, 2 q_i)`` where q_i is the posterior that sample i belongs
to the suspected (flagged-side) subgroup of its class k under the fitted two-identity model (two Gaussians with
covariance S_e, equal priors): q_i = sigmoid((d2_other - d2_suspect) / 2). The score exceeds 1 exactly when the
class is contaminated (J* > threshold) and the sample is nearer the suspected subgroup's mean (q_i > 1/2), which
is the decision; below that it ranks the suspected side of the most anomalous classes first.

Departures, and why:
- The test statistic's identity mu. Both references (BackdoorBench ``detection_pretrain/scan.py`` and
  backdoor-toolbox ``other_cleansers/scan.py``, which copy the authors' SCAn.py) compute it as
  S_e (n S_u + S_e)^+ sum(r), which lacks the S_u S_e^+ factor of their own global E-step: it is not the
  posterior mean of the model (in the directions outside S_u's range, which has rank <= classes - 1, it is n
  times the class mean, not the mean). We use the global E-step's posterior mean for both.
- J* is signed: the references take |J - median|, which also flags a class whose J is abnormally *small* (a
  class less bimodal than the others is no sign of contamination), and they divide J by max(J) first, which
  changes nothing for a positive max and flips every sign for a negative one. A MAD of 0 is floored at 1e-12
  (the references divide by 0).
- The suspected subgroup: the references flag the subgroup with fewer clean samples and, on a tie (e.g. no
  clean sample of the class), an arbitrary one (their subgroup "1" of a random start). We break that tie by the
  smaller subgroup of the poisoned set (the poison is assumed the minority there), then by the first subgroup.
- A subgroup emptied by a reassignment ends the untangling with one component (the class mean; J is then only
  the shrinkage term, and nothing of the class can be flagged); the references keep the stale means.
- The random 50/50 start is drawn from a generator seeded by ``inputs.seed``, class by class in ascending label
  order, over each class's rows in a canonical (lexicographic) order, so shuffling the training set shuffles the
  flags with it (the references use the global NumPy RNG in the set's order).
- Threshold: the paper's e^2, as BackdoorBench; backdoor-toolbox uses e.
- Features: the penultimate representation computed in eval mode, float64 for the statistics, on the CPU.

Cost: one forward pass per training sample and per clean sample (batches of 512); the global EM computes, per
iteration, one pseudo-inverse of a D x D matrix per class (D = feature width).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from backdoor._checks import check_int, check_number
from backdoor._registry import NOT_STATED, Param
from backdoor.defenses._data_side import (canonical_order, check_features, penultimate_features,
                                          require_poisoned_train)
from backdoor.defenses.base import DefenseInputs, NotApplicable
from backdoor.detectors import register_detector
from backdoor.detectors.base import DataDetection, DataDetector
from backdoor.mutants import Mutant

MAD_SCALE = 1.4826  # MAD of a normal distribution -> its standard deviation


@dataclass
class GlobalModel:
    """The identity/variation decomposition estimated from clean features (float64)."""

    su: torch.Tensor  # covariance of the class identities [D, D]
    se: torch.Tensor  # shared within-class covariance [D, D]
    iterations: int
    converged: bool

    @property
    def f(self) -> torch.Tensor:
        return torch.linalg.pinv(self.se, hermitian=True)


@dataclass
class ScanResult:
    flagged: torch.Tensor  # bool [N] over the inspected (poisoned) set
    scores: torch.Tensor  # float32 [N]
    posterior: torch.Tensor  # float64 [N]: posterior of the class's suspected subgroup
    labels: list[int]  # classes in the order of j / j_star
    j: torch.Tensor  # float64 [K]: the untangling statistic per class
    j_star: torch.Tensor  # float64 [K]: J normalised by median / MAD
    contaminated: list[int]
    global_model: GlobalModel
    per_class: list[dict]


def _cov(z: torch.Tensor) -> torch.Tensor:
    """Covariance of the rows (ddof 1), as ``np.cov(z.T)``."""
    centred = z - z.mean(0, keepdim=True)
    return centred.T @ centred / max(len(z) - 1, 1)


def identity_posterior(sums: torch.Tensor, counts: torch.Tensor, su: torch.Tensor, se: torch.Tensor,
                       f: torch.Tensor) -> torch.Tensor:
    """Posterior mean of each group's identity given its ``counts`` samples summing to ``sums`` [K, D]:
    S_e (n S_u + S_e)^+ S_u S_e^+ sum (= S_u (n S_u + S_e)^-1 sum when S_e is invertible)."""
    g = torch.linalg.pinv(counts.double()[:, None, None] * su + se, hermitian=True)  # [K, D, D]
    return (se @ g @ (su @ f) @ sums[..., None]).squeeze(-1)


def global_model(features: torch.Tensor, labels: torch.Tensor, *, max_iters: int = 100,
                 tol: float = 1e-5) -> GlobalModel:
    """The paper's EM for S_u and S_e on (clean) features, centred on their mean."""
    x = features.double()
    x = x - x.mean(0, keepdim=True)
    _, inverse, counts = torch.unique(labels, return_inverse=True, return_counts=True)
    sums = torch.zeros(len(counts), x.shape[1], dtype=torch.float64).index_add_(0, inverse, x)
    u = (sums / counts[:, None].double())[inverse]
    su, se = _cov(u), _cov(x - u)
    iterations, converged = 0, False
    while iterations < max_iters:
        iterations += 1
        u = identity_posterior(sums, counts, su, se, torch.linalg.pinv(se, hermitian=True))[inverse]
        new_su, new_se = _cov(u), _cov(x - u)
        change = float(torch.linalg.norm(new_su - su) + torch.linalg.norm(new_se - se))
        su, se = new_su, new_se
        if change <= tol:
            converged = True
            break
    return GlobalModel(su, se, iterations, converged)


def _sq_dist(x: torch.Tensor, m: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    d = x - m
    return ((d @ f) * d).sum(-1)


def untangle(x: torch.Tensor, f: torch.Tensor, generator: torch.Generator,
             max_iters: int = 100) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two subgroups of the rows ``x`` by hard-assignment EM in the metric ``f``: (first [n] bool, mean of the
    first, mean of the second). One component (all first, both means the mean) for a single row or when a
    reassignment empties a subgroup."""
    n = len(x)
    if n < 2:
        return torch.ones(n, dtype=torch.bool), x.mean(0), x.mean(0)
    first = torch.rand(n, generator=generator, dtype=torch.float64) >= 0.5
    if not bool(first.any()):
        first[0] = True
    if bool(first.all()):
        first[0] = False
    for _ in range(max_iters):
        m1, m2 = x[first].mean(0), x[~first].mean(0)
        bias = m1 @ f @ m1 - m2 @ f @ m2
        new = bias - 2 * (x @ f @ (m1 - m2)) < 0  # nearer the first mean
        if bool(new.all()) or not bool(new.any()):
            return torch.ones(n, dtype=torch.bool), x.mean(0), x.mean(0)
        moved = not torch.equal(new, first)
        first = new
        if not moved:
            break
    return first, m1, m2


def normalised_j(j: torch.Tensor) -> torch.Tensor:
    """(J - median) / (1.4826 MAD), signed; median of an even count is the mean of the middle two."""
    values = j.double().numpy()
    median = float(np.median(values))
    mad = max(MAD_SCALE * float(np.median(np.abs(values - median))), 1e-12)
    return (j.double() - median) / mad


def scan_statistics(features: torch.Tensor, labels: torch.Tensor, clean_features: torch.Tensor,
                    clean_labels: torch.Tensor, *, threshold: float = math.exp(2), max_iters: int = 100,
                    tol: float = 1e-5, seed: int = 0) -> ScanResult:
    """SCAn on features: global model from the clean features, untangling of each class of the inspected
    features joined by the clean ones, J normalised over the classes, flags and scores over the inspected rows.
    A pure function of its arguments; shuffling the inspected rows shuffles the result with them."""
    check_features(features, labels)
    check_features(clean_features, clean_labels)
    gm = global_model(clean_features, clean_labels, max_iters=max_iters, tol=tol)
    f = gm.f
    n = len(labels)
    raw = torch.cat([features, clean_features]).double()
    x = raw - raw.mean(0, keepdim=True)
    all_labels = torch.cat([labels, clean_labels])
    is_clean = torch.arange(len(all_labels)) >= n
    generator = torch.Generator().manual_seed(seed)
    posterior = torch.zeros(len(all_labels), dtype=torch.float64)
    suspect = torch.zeros(len(all_labels), dtype=torch.bool)
    class_of = torch.zeros(len(all_labels), dtype=torch.long)
    classes, js, per_class = [], [], []
    for k, label in enumerate(torch.unique(all_labels).tolist()):
        index = torch.nonzero(all_labels == label).flatten()
        index = index[canonical_order(raw[index])]
        rows, clean_rows = x[index], is_clean[index]
        first, m1, m2 = untangle(rows, f, generator, max_iters)
        mu = identity_posterior(rows.sum(0)[None], torch.tensor([len(rows)]), gm.su, gm.se, f)[0]
        d1, d2 = _sq_dist(rows, m1, f), _sq_dist(rows, m2, f)
        j = float((_sq_dist(rows, mu, f) - torch.where(first, d1, d2)).mean())
        c1, c2 = int((first & clean_rows).sum()), int((~first & clean_rows).sum())
        p1, p2 = int((first & ~clean_rows).sum()), int((~first & ~clean_rows).sum())
        one_component = bool(first.all())
        if c1 != c2:
            flag_first = c1 < c2  # the subgroup holding fewer of the defender's clean samples
        else:
            flag_first = p1 <= p2  # tie: the smaller subgroup of the inspected set
        if one_component:
            side = torch.zeros(len(rows), dtype=torch.bool)
            q = torch.zeros(len(rows), dtype=torch.float64)
        else:
            side = first if flag_first else ~first
            gap = (d2 - d1) if flag_first else (d1 - d2)  # d2_other - d2_suspect
            q = torch.sigmoid(gap / 2)
        suspect[index], posterior[index], class_of[index] = side, q, k
        classes.append(int(label))
        js.append(j)
        per_class.append({"label": int(label), "size": int(p1 + p2), "clean": int(c1 + c2), "j": j,
                          "suspect_size": int((side & ~clean_rows).sum()), "one_component": one_component})
    j_all = torch.tensor(js, dtype=torch.float64)
    j_star = normalised_j(j_all)
    contaminated = j_star > threshold
    for entry, value, hit in zip(per_class, j_star.tolist(), contaminated.tolist()):
        entry["j_star"], entry["contaminated"] = value, bool(hit)
    flagged = (contaminated[class_of] & suspect)[:n]
    scores = torch.minimum(j_star[class_of] / threshold, 2 * posterior)[:n]
    return ScanResult(flagged, scores.float(), posterior[:n], classes, j_all, j_star,
                      [c for c, hit in zip(classes, contaminated.tolist()) if hit], gm, per_class)


def _check(threshold, max_iters, tol) -> None:
    check_number("scan", "threshold", threshold, low=0, low_open=True)
    check_int("scan", "max_iters", max_iters, minimum=1)
    check_number("scan", "tol", tol, low=0)


@register_detector("scan")
class SCAn(DataDetector):
    """SCAn: per class, two-identity untangling against the clean subset's identity/variation model; flag the
    poison subgroup of classes whose likelihood-ratio statistic is a median/MAD outlier."""

    title = "SCAn"
    description = ("per class, likelihood ratio of two identities against one under a covariance model fitted on the "
                   "clean subset; flag the subgroup with fewer clean samples in classes with J* > e^2")
    order = 110
    parameters = {
        "threshold": Param("e^2", "e^2 (BackdoorBench; backdoor-toolbox: e)",
                           "the paper's e^2 on the signed J* (the references threshold |J*|)", argued=math.exp(2)),
        "max_iters": Param(NOT_STATED, "100", "the references' cap, for the global EM and the untangling alike",
                           argued=100),
        "tol": Param(NOT_STATED, "1e-5", "the references' stopping change of ||S_u|| + ||S_e|| (Frobenius)",
                     argued=1e-5),
    }
    # Each find starts with a newline and the line's indentation, so it matches the code and not its own text.
    mutants = (
        Mutant("one-component", "the untangling never splits a class (one identity: J is only the shrinkage term)",
               "\n        new = bias - 2 * (x @ f @ (m1 - m2)) < 0", "\n        new = x[:, 0] == x[:, 0]"),
        Mutant("poisoned-covariance", "the global model is fitted on the poisoned set instead of the clean subset",
               "\n    gm = global_model(clean_features, clean_labels,", "\n    gm = global_model(features, labels,"),
        Mutant("flag-majority", "flags the subgroup holding more of the clean samples",
               "\n            flag_first = c1 < c2", "\n            flag_first = c1 > c2"),
        Mutant("tie-flags-larger", "with no clean sample to vote, flags the larger subgroup of the class",
               "\n            flag_first = p1 <= p2", "\n            flag_first = p1 > p2"),
        Mutant("threshold-reversed", "classes below the threshold are the contaminated ones",
               "\n    contaminated = j_star > threshold", "\n    contaminated = j_star < threshold"),
        Mutant("raw-j", "J is thresholded without the median/MAD normalisation",
               "\n    return (j.double() - median) / mad", "\n    return j.double()"),
    )

    def __init__(self, threshold: float = math.exp(2), max_iters: int = 100, tol: float = 1e-5):
        _check(threshold, max_iters, tol)
        self.threshold, self.max_iters, self.tol = threshold, max_iters, tol

    def detect(self, inputs: DefenseInputs) -> DataDetection:
        data = require_poisoned_train(inputs, "scan")
        if len(inputs.clean) < 2:
            raise NotApplicable(f"scan needs at least 2 clean samples for its covariance model; got {len(inputs.clean)}")
        features = penultimate_features(inputs.model, data.x, device=inputs.device)
        clean_features = penultimate_features(inputs.model, inputs.clean.x, device=inputs.device)
        result = scan_statistics(features, data.y.cpu(), clean_features, inputs.clean.y.cpu(),
                                 threshold=self.threshold, max_iters=self.max_iters, tol=self.tol, seed=inputs.seed)
        info = {"flagged": int(result.flagged.sum()), "contaminated_classes": result.contaminated,
                "feature_dim": int(features.shape[1]), "global_em_iterations": result.global_model.iterations,
                "global_em_converged": result.global_model.converged, "per_class": result.per_class}
        return DataDetection(result.flagged, result.scores, info)
