"""AC: Activation Clustering (Chen, Carvalho, Baracaldo, Ludwig, Edwards, Lee, Molloy, Srivastava,
"Detecting Backdoor Attacks on Deep Neural Networks by Activation Clustering", AAAI Workshop on Artificial
Intelligence Safety (SafeAI), 2019; arXiv:1811.03728, 2018).

Data-side defense. The penultimate activations (input of ``roles.head``) of the backdoored model are computed
for every sample of the poisoned training set (batched, original order). For each label separately they are
reduced to ``n_components`` = 10 dimensions (``reduction`` = ``"ica"``, FastICA, as in the paper; ``"pca"``
as in the original BackdoorBench code) and split into two clusters by KMeans (seeded, 10 initialisations).
Which cluster is poisoned is decided by ``rule`` (Chen et al. give three ways and fix none as the default):

- ``"exclusionary"`` (default), exclusionary reclassification: a model trained without a cluster classifies
  the cluster's samples. Legitimate samples are still classified as their label; poisoned ones fall to their
  source class. The score of a cluster is l / p, with l the number of its samples classified as their label
  and p the number classified as another class; the cluster is poisoned when l / p < ``exclusion_threshold``
  = 1 (Chen et al.'s value), i.e. when most of it falls to other classes. It is the only rule that does not
  assume the poison is a minority of its label: at poison ratio 0.1 on 10 balanced classes the poison is
  about 53% of the target label, which the relative-size rule can never flag.
- ``"relative_size"``: the smaller cluster is poisoned when its share of the label's samples is below
  ``size_threshold`` = 0.35 (the paper's "relative size comparison", the default of the authors' ART
  implementation). One clustering, no extra training.

A fresh model (``new_model``) is then trained from scratch with the attack's training budget
(``retraining``; ``epochs`` overrides its epoch count) on the samples that were not flagged. The record's
``info.rule`` names the rule and ``info.per_class`` says, label by label, what it measured and decided.

Exclusionary reclassification costs two extra trainings, not one per cluster: round 1 trains a fresh model
without the smaller cluster of every label and reclassifies those clusters, round 2 does the same for the
larger clusters. (Chen et al. retrain without "the cluster in question"; removing one cluster of every label
at once gives each label's test the same model, and each label keeps its other cluster to learn from.) Two
guards, ours, keep the test meaningful: a cluster holding more than ``max_tested_share`` = 2/3 of its label
is not tested (removing it leaves too little of the label to learn, so the label would fall to other classes
whatever the cluster holds), and a label whose two clusters both fall below the threshold is inconclusive:
nothing is flagged, since a label is never all poison and the test cannot say which cluster is.

Detection score (for AUROC), one value per cluster, the quantity each rule decides with:
``exclusionary``: p / (l + p), the share of the cluster's samples that fall to the other class (flagged
when above 1 / (1 + threshold), bar the one-cluster-per-label rule above); ``relative_size``: ``1 -`` the
relative size of the sample's own cluster within its label, so a sample is flagged exactly when its score
exceeds ``1 - size_threshold``.

Departures, and why:
- The original BackdoorBench code extracts activations and clusters them per mini-batch of a shuffled loader,
  then maps the flags back through a second shuffled pass, so its flags land on the wrong samples. Here the
  features of the whole set are computed in order and every label is clustered at once; each label's rows
  are first put in a canonical (lexicographic) order so that shuffling the training set shuffles the flags
  with it and changes nothing else (``activation_clustering`` is permutation-equivariant).
- The original code uses ``cluster_analysis: smaller`` (the smaller cluster of every label is always
  flagged) and PCA. We follow the paper (ICA, relative size below a threshold); ``size_threshold: 0.5``
  reproduces "always flag the smaller cluster" (exactly equal clusters are never flagged) and
  ``reduction: pca`` the original's reduction.
- FastICA runs at most 200 iterations (the authors' ART code: 1000). This cannot change the clusters: on
  whitened data the ICA unmixing is a rotation and KMeans' Euclidean distances are rotation-invariant, so
  clustering the ICA sources equals clustering the whitened principal components (checked on our smoke
  features: identical splits for every label). ``ica`` and ``pca`` differ by that whitening only.
- Exclusionary reclassification: Chen et al.'s p is the largest number of the cluster's samples classified
  as any *one* other class, since their poison comes from one source class. All-to-one poison comes from
  every class (here including the target itself), so that p is about a tenth of a poisoned cluster, about
  the share of its samples whose source is the target, and l / p stays near 1 whatever the cluster is. We
  count every other class in p. With one source class the two agree.
- The paper's third analysis (silhouette score) is not implemented.
- The original BackdoorBench code has no exclusionary reclassification; it always flags the smaller cluster.
- Known limit of the relative-size rule (not a bug): with 10 balanced classes and poison ratio 0.1 the
  poisoned samples are about half of the target label, so neither cluster is below 0.35 and nothing is
  flagged there; the record's ``info.per_class`` shows each label's smaller-cluster share.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from backdoor._checks import ParameterError
from backdoor._registry import NONE, NOT_STATED, Param
from backdoor.defenses import register_defense
from backdoor.defenses._data_side import (check_features, label_groups, penultimate_features,
                                          require_poisoned_train, retrain_without)
from backdoor.defenses.base import BY_RETRAINING, Defense, DefenseInputs, DefenseOutcome, Stage
from backdoor.mutants import Mutant
from backdoor.training import predict

REDUCTIONS = ("ica", "pca")
RULES = ("exclusionary", "relative_size")
SMALLER, LARGER = 0, 1  # cluster ids within a label; -1: not clustered (a degenerate label)


@dataclass
class ClusteringResult:
    flagged: torch.Tensor  # bool [N], by the relative-size rule
    scores: torch.Tensor  # float [N], higher = more suspicious (relative-size score)
    per_class: list[dict]  # label, size, smaller-cluster share, flagged count
    cluster: torch.Tensor | None = None  # long [N]: SMALLER / LARGER within the sample's label, -1 if unsplit


def _reduce(rows, k: int, reduction: str, seed: int):
    from sklearn.decomposition import PCA, FastICA
    from sklearn.exceptions import ConvergenceWarning

    if reduction == "pca":
        return PCA(n_components=k, random_state=seed).fit_transform(rows)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        # tol as in the authors' implementation (IBM ART); max_iter is sklearn's 200 (ART: 1000), see the docstring
        return FastICA(n_components=k, whiten="unit-variance", random_state=seed, max_iter=200,
                       tol=0.005).fit_transform(rows)


def activation_clustering(features: torch.Tensor, labels: torch.Tensor, *, reduction: str = "ica",
                          n_components: int = 10, size_threshold: float = 0.35, seed: int = 0) -> ClusteringResult:
    """Per label: reduce ``features`` to ``n_components`` dims, 2-means, flag the smaller cluster if its share
    of the label is below ``size_threshold``. Pure function of (features, labels); permutation-equivariant."""
    from sklearn.cluster import KMeans

    check_features(features, labels)
    _check_params(reduction, n_components, size_threshold)
    seed = int(seed) % (2**32 - 1)
    n = len(labels)
    flagged = torch.zeros(n, dtype=torch.bool)
    scores = torch.zeros(n, dtype=torch.float32)
    cluster = torch.full((n,), -1, dtype=torch.long)
    per_class = []
    for label, index, rows in label_groups(features, labels):
        entry = {"label": int(label), "size": int(len(index)), "smaller_share": None, "flagged": 0}
        per_class.append(entry)
        rows = rows[:, rows.std(0) > 0] if len(index) > 1 else rows  # constant (e.g. dead ReLU) units carry nothing
        centred = rows - rows.mean(0, keepdim=True)
        rank = int(torch.linalg.matrix_rank(centred)) if len(index) > 1 and rows.shape[1] else 0
        k = min(n_components, rank)
        if k < 1 or len(index) < 2:  # all representations identical: one cluster, nothing to split
            entry["note"] = "degenerate: fewer than 2 distinct representations"
            continue
        reduced = _reduce(rows.numpy(), k, reduction, seed)
        assignment = torch.from_numpy(KMeans(n_clusters=2, n_init=10, random_state=seed).fit_predict(reduced)).long()
        sizes = torch.bincount(assignment, minlength=2).double()
        share = sizes / len(index)
        scores[index] = (1 - share[assignment]).float()
        smaller = int(torch.argmin(sizes))
        cluster[index] = torch.where(assignment == smaller, SMALLER, LARGER)
        entry["smaller_share"] = round(float(share[smaller]), 4)
        if sizes[0] != sizes[1] and share[smaller] < size_threshold:
            hit = index[assignment == smaller]
            flagged[hit] = True
            entry["flagged"] = int(len(hit))
    return ClusteringResult(flagged, scores, per_class, cluster)


def reclassification_score(predicted: torch.Tensor, label: int) -> dict:
    """l / p for one removed cluster: l = samples classified as ``label``, p = samples classified as another
    class (``other_class``: the most frequent of those, for the record)."""
    counts = torch.bincount(predicted, minlength=label + 1)
    own = int(counts[label])
    others = counts.clone()
    others[label] = -1
    other_class = int(torch.argmax(others))
    other = len(predicted) - own
    return {"size": int(len(predicted)), "as_label": own, "other_class": other_class, "as_other": other,
            "score": round(own / other, 4) if other else None,  # None: nothing fell to another class (l/p infinite)
            "other_share": other / (own + other) if own + other else 0.0}


def exclusionary_reclassification(cluster: torch.Tensor, labels: torch.Tensor, per_class: list[dict],
                                  reclassify, threshold: float,
                                  max_tested_share: float = 2 / 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Flags and scores by exclusionary reclassification.

    ``reclassify(held_out, round_)`` trains a fresh model without the samples of the bool mask ``held_out``
    and returns its predictions for them (long [held_out.sum()]). One call (``round_`` 0, 1) per cluster rank:
    the smaller clusters of every label, then the larger ones. A cluster holding more than ``max_tested_share``
    of its label is not tested. Adds each label's measurements and decision to ``per_class``.
    """
    flagged = torch.zeros(len(labels), dtype=torch.bool)
    scores = torch.zeros(len(labels), dtype=torch.float32)
    results = {}
    testable = cluster.clone()
    for label in torch.unique(labels).tolist():
        in_label = labels == label
        for rank in (SMALLER, LARGER):
            if int((in_label & (cluster == rank)).sum()) > max_tested_share * int(in_label.sum()):
                testable[in_label & (cluster == rank)] = -1
    for rank, name in ((SMALLER, "smaller"), (LARGER, "larger")):
        held_out = testable == rank
        if not held_out.any():
            continue
        predicted = torch.empty(len(labels), dtype=torch.long)
        predicted[held_out] = reclassify(held_out, rank)
        for entry in per_class:
            members = held_out & (labels == entry["label"])
            if members.any():
                results[entry["label"], name] = reclassification_score(predicted[members], entry["label"])
                scores[members] = results[entry["label"], name]["other_share"]
    for entry in per_class:
        tests = {name: results[entry["label"], name] for name in ("smaller", "larger") if (entry["label"], name) in results}
        entry["exclusionary"] = {name: {k: v for k, v in r.items() if k != "other_share"} for name, r in tests.items()}
        poisoned = [name for name, r in tests.items() if r["score"] is not None and r["score"] < threshold]
        entry["flagged"] = 0
        if not tests:
            entry["decision"] = ("not split: nothing to reclassify" if entry.get("smaller_share") is None else
                                 f"not tested: a cluster holds more than {max_tested_share:.2f} of the label")
        elif len(poisoned) == 2:
            entry["decision"] = f"inconclusive: both clusters fall below l/p {threshold:g}; nothing flagged"
        elif not poisoned:
            entry["decision"] = f"every cluster stays its label (l/p >= {threshold:g})"
        else:
            rank = SMALLER if poisoned[0] == "smaller" else LARGER
            hit = (cluster == rank) & (labels == entry["label"])
            flagged |= hit
            entry["flagged"] = int(hit.sum())
            r = tests[poisoned[0]]
            entry["decision"] = (f"{poisoned[0]} cluster poisoned: l/p = {r['as_label']}/{r['as_other']} < {threshold:g} "
                                 f"(falls to class {r['other_class']})")
    return flagged, scores


def _check_params(reduction: str, n_components: int, size_threshold: float) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"ac: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not isinstance(n_components, int) or n_components < 1:
        raise ParameterError("ac", "n_components", n_components, "an integer >= 1")
    if not 0.0 < size_threshold <= 0.5:
        raise ParameterError("ac", "size_threshold", size_threshold, "a value in (0, 0.5]")


@register_defense("ac")
class ActivationClustering(Defense):
    """AC: per-label ICA + 2-means on penultimate activations; the poisoned cluster (by exclusionary
    reclassification, or relative size) is dropped and a model is retrained from scratch."""

    kind = "data_side"
    title = "AC"
    description = ("per-label ICA to 10 dims + 2-means on penultimate activations; a cluster is poisoned when a model "
                   "trained without it sends most of it to other classes (exclusionary reclassification; `rule: "
                   "relative_size`: the smaller cluster below 35% of its label); retrain from scratch on the rest")
    order = 60
    parameters = {
        "rule": Param(NONE, "`smaller`: the smaller cluster of every label is flagged", "Chen et al.'s exclusionary "
                      "reclassification, the only rule that does not assume the poison is a minority of its label "
                      "(about 53% of the target label at ratio 0.1 on 10 classes); `relative_size` is the other",
                      argued="exclusionary"),
        "reduction": Param(NONE, "PCA", "ICA, as Chen et al.; `pca` is the reference's reduction"),
        "n_components": Param("10", NOT_STATED, "Table 2"),
        "size_threshold": Param(NONE, "— (`smaller`: always; 0.5 reproduces it)", "`relative_size` only: Chen et "
                                "al.'s relative size, the default of the authors' ART code"),
        "exclusion_threshold": Param(NONE, "— (no exclusionary reclassification)",
                                     "`exclusionary` only: a cluster is poisoned when l / p is below it; 1 is the "
                                     "value Chen et al. found reasonable"),
        "max_tested_share": Param(NONE, NONE, "`exclusionary` only, ours: a cluster holding more than 2/3 of its "
                                  "label is not tested (without it too little of the label is left to learn)"),
        "epochs": Param(NONE, NOT_STATED, f"None: {BY_RETRAINING}, retraining from scratch"),
    }
    budgets = (
        Stage("`exclusionary`: two reclassification models, each trained without one cluster of every label",
              "retraining",
              "`epochs`"),
        Stage("retrain from scratch on the unflagged samples", "retraining", "`epochs`"),
    )
    # Each find starts with a newline and the line's indentation: it then matches the code line and not its
    # own text here, where the newline is an escape.
    mutants = (
        Mutant("clusters-noise", "each label's 2-means runs on random noise instead of its reduced activations",
               "\n        reduced = _reduce(rows.numpy(), k, reduction, seed)",
               "\n        reduced = torch.rand(len(index), k, generator=torch.Generator().manual_seed(seed)).numpy()"),
        Mutant("never-reclassifies", "the exclusionary rule falls back to relative size (no reclassification)",
               "\n        if self.rule == \"exclusionary\":", "\n        if False:"),
        Mutant("retrains-on-everything", "the retraining keeps the flagged samples",
               "\n        model, retrained = retrain_without(inputs, inputs.poisoned_train, flagged,",
               "\n        model, retrained = retrain_without(inputs, inputs.poisoned_train, torch.zeros_like(flagged),"),
    )

    def __init__(self, rule: str = "exclusionary", reduction: str = "ica", n_components: int = 10,
                 size_threshold: float = 0.35, exclusion_threshold: float = 1.0, max_tested_share: float = 2 / 3,
                 epochs: int | None = None):
        _check_params(reduction, n_components, size_threshold)
        if rule not in RULES:
            raise ParameterError("ac", "rule", rule, f"one of {', '.join(RULES)}")
        if not exclusion_threshold > 0:
            raise ParameterError("ac", "exclusion_threshold", exclusion_threshold, "a value > 0 (the l/p bound)")
        if not 0.5 <= max_tested_share <= 1:
            raise ParameterError("ac", "max_tested_share", max_tested_share, "a value in [0.5, 1]")
        if epochs is not None and epochs < 1:
            raise ParameterError("ac", "epochs", epochs, "a value >= 1 (or None for the attack's budget)")
        self.max_tested_share = max_tested_share
        self.rule, self.reduction, self.n_components = rule, reduction, n_components
        self.size_threshold, self.exclusion_threshold, self.epochs = size_threshold, exclusion_threshold, epochs

    def detect_poison(self, inputs: DefenseInputs) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """The detection step (flags, scores, info) before the retraining; the AC detector runs it alone."""
        data = require_poisoned_train(inputs, "ac")
        features = penultimate_features(inputs.model, data.x, device=inputs.device)
        result = activation_clustering(features, data.y, reduction=self.reduction, n_components=self.n_components,
                                       size_threshold=self.size_threshold, seed=inputs.seed)
        flagged, scores = result.flagged, result.scores
        if self.rule == "exclusionary":
            flagged, scores = exclusionary_reclassification(
                result.cluster, data.y, result.per_class, lambda held_out, round_: self._reclassify(inputs, data, held_out, round_),
                self.exclusion_threshold, self.max_tested_share)
        info = {"rule": self.rule, "flagged": int(flagged.sum()), "feature_dim": int(features.shape[1]),
                "per_class": result.per_class}
        return flagged, scores, info

    def run(self, inputs: DefenseInputs) -> DefenseOutcome:
        flagged, scores, info = self.detect_poison(inputs)
        model, retrained = retrain_without(inputs, inputs.poisoned_train, flagged, epochs=self.epochs, seed_offset=1,
                                           desc="ac retrain")
        return DefenseOutcome(model=model, flagged=flagged, scores=scores, info={**info, **retrained})

    def _reclassify(self, inputs: DefenseInputs, data, held_out: torch.Tensor, round_: int) -> torch.Tensor:
        """Train a fresh model without ``held_out`` (attack's budget) and classify the held-out samples."""
        model, _ = retrain_without(inputs, data, held_out, epochs=self.epochs, seed_offset=2 + round_,
                                   desc=f"ac exclusion {round_ + 1}")
        return predict(model, data.x[held_out], device=inputs.device)
