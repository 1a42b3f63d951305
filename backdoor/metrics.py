"""The paper's three metrics (BackdoorBench section 3.2), as fractions in [0, 1].

C-Acc: accuracy on the whole clean test set. ASR: fraction of the poisoned test set (every non-target test
sample with the trigger; all-to-all: every test sample) predicted as its attack label (the target; all-to-all:
(y + 1) mod K). R-Acc: fraction of the poisoned test set predicted as its true label. Since no poisoned sample's
attack label is its true label, ASR + R-Acc <= 1.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from sklearn.metrics import roc_auc_score, roc_curve

from backdoor.targets import Target, attack_labels, is_all_to_all


@dataclass(frozen=True)
class Metrics:
    c_acc: float
    asr: float
    r_acc: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def clean_accuracy(pred: torch.Tensor, y: torch.Tensor) -> float:
    if len(y) == 0:
        raise ValueError("clean accuracy of an empty test set")
    return float((pred == y).float().mean())


def attack_success_rate(pred: torch.Tensor, target: int | torch.Tensor) -> float:
    """Fraction of poisoned test samples predicted as their attack label (``target``: one class, or one per
    sample)."""
    if len(pred) == 0:
        raise ValueError("attack success rate of an empty poisoned test set")
    return float((pred == target).float().mean())


def robust_accuracy(pred: torch.Tensor, y_true: torch.Tensor) -> float:
    """Fraction of poisoned test samples still predicted as their true label."""
    if len(pred) == 0:
        raise ValueError("robust accuracy of an empty poisoned test set")
    return float((pred == y_true).float().mean())


def backdoor_metrics(clean_pred: torch.Tensor, clean_y: torch.Tensor, poisoned_pred: torch.Tensor,
                     poisoned_y: torch.Tensor, target: int | torch.Tensor) -> Metrics:
    """``poisoned_y`` are the true labels of the poisoned test set and ``target`` its attack labels (one class,
    or one per sample); no sample's attack label may be its true label (all-to-one: no target-class sample)."""
    if bool((poisoned_y == target).any()):
        raise ValueError("the poisoned test set must exclude target-class samples: none may have its attack label "
                         "as its true label")
    return Metrics(
        c_acc=clean_accuracy(clean_pred, clean_y),
        asr=attack_success_rate(poisoned_pred, target),
        r_acc=robust_accuracy(poisoned_pred, poisoned_y),
    )


def target_class_figures(clean_pred: torch.Tensor, clean_y: torch.Tensor, target: Target,
                         num_classes: int | None = None) -> dict[str, float | None]:
    """What ASR must be read against: ``target_base_rate``, the share of clean non-target test images the model
    predicts as the target (a model biased to the target scores that much ASR with no trigger), and
    ``target_acc``, its clean accuracy on the target class (near 0: the defense erased the class, so ASR 0
    means nothing). All-to-all has no target class: the base rate is the share of clean test images predicted
    as (y + 1) mod K, and ``target_acc`` is None."""
    if is_all_to_all(target):
        base = (clean_pred == attack_labels(target, clean_y, num_classes)).float().mean()
        return {"target_base_rate": float(base) if len(clean_y) else None, "target_acc": None}
    others, own = clean_y != target, clean_y == target
    return {"target_base_rate": float((clean_pred[others] == target).float().mean()) if others.any() else None,
            "target_acc": float((clean_pred[own] == target).float().mean()) if own.any() else None}


def detection_metrics(flagged: torch.Tensor, truth: torch.Tensor, scores: torch.Tensor | None = None) -> dict:
    """Score a defense's poison detection against the true mask (harness side only).

    TPR = flagged poisoned / poisoned, FPR = flagged clean / clean, precision = flagged poisoned / flagged,
    AUROC of ``scores`` (higher = more suspicious) when given. Undefined figures are None.
    """
    flagged, truth = flagged.bool(), truth.bool()
    if flagged.shape != truth.shape:
        raise ValueError(f"flags {tuple(flagged.shape)} do not match the poison mask {tuple(truth.shape)}")
    tp = int((flagged & truth).sum())
    fp = int((flagged & ~truth).sum())
    positives, negatives = int(truth.sum()), int((~truth).sum())
    out = {
        "flagged": int(flagged.sum()),
        "tpr": tp / positives if positives else None,
        "fpr": fp / negatives if negatives else None,
        "precision": tp / (tp + fp) if tp + fp else None,
        "auroc": None,
    }
    if scores is not None and positives and negatives:
        out["auroc"] = auroc(scores[truth], scores[~truth])
    return out


def auroc(positive_scores: torch.Tensor, negative_scores: torch.Tensor) -> float | None:
    """Area under the ROC curve of scores where higher = positive (ties count one half); None without both
    classes."""
    if len(positive_scores) == 0 or len(negative_scores) == 0:
        return None
    truth, scores = _labelled(positive_scores, negative_scores)
    return float(roc_auc_score(truth, scores))


def roc_points(positive_scores: torch.Tensor, negative_scores: torch.Tensor, max_points: int = 101) -> dict | None:
    """The ROC curve as ``{"fpr": [...], "tpr": [...]}`` (at most ``max_points`` points, both ends kept, rounded
    to 4 decimals) for a record, so that figures are drawn from records alone; None without both classes."""
    if len(positive_scores) == 0 or len(negative_scores) == 0:
        return None
    truth, scores = _labelled(positive_scores, negative_scores)
    fpr, tpr, _ = roc_curve(truth, scores)
    if len(fpr) > max_points:
        keep = np.unique(np.linspace(0, len(fpr) - 1, max_points).round().astype(int))
        fpr, tpr = fpr[keep], tpr[keep]
    return {"fpr": [round(float(v), 4) for v in fpr], "tpr": [round(float(v), 4) for v in tpr]}


def _labelled(positive_scores: torch.Tensor, negative_scores: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    scores = torch.cat([positive_scores.double().flatten(), negative_scores.double().flatten()]).numpy()
    truth = np.r_[np.ones(len(positive_scores)), np.zeros(len(negative_scores))]
    return truth, scores


def input_detection_metrics(clean_scores: torch.Tensor, triggered_scores: torch.Tensor, threshold: float, *,
                            clean_pred: torch.Tensor, clean_y: torch.Tensor, triggered_pred: torch.Tensor,
                            triggered_y: torch.Tensor, attack_label: int | torch.Tensor) -> dict:
    """Score an input-level detector (harness side only): the clean test set is its negatives, the triggered test
    set its positives, each input flagged when its score exceeds the detector's own ``threshold``.

    AUROC of the scores; TPR and FPR at the threshold; ``clean_lost``: the share of clean inputs flagged (refused
    service: the FPR on the test set); ``residual_asr``: the share of triggered inputs that pass the detector and
    are predicted as their attack label; ``asr_before``: the same without the detector; ``c_acc_kept``: the share of
    clean inputs that pass and are classified correctly; ``r_acc_kept``: the share of triggered inputs that pass
    and keep their true label."""
    clean_flag, trig_flag = clean_scores > threshold, triggered_scores > threshold
    hit = triggered_pred == attack_label
    return {
        "auroc": auroc(triggered_scores, clean_scores),
        "tpr": float(trig_flag.float().mean()), "fpr": float(clean_flag.float().mean()),
        "threshold": float(threshold),
        "clean_lost": float(clean_flag.float().mean()),
        "residual_asr": float((hit & ~trig_flag).float().mean()),
        "asr_before": float(hit.float().mean()),
        "c_acc_kept": float(((clean_pred == clean_y) & ~clean_flag).float().mean()),
        "r_acc_kept": float(((triggered_pred == triggered_y) & ~trig_flag).float().mean()),
        "positives": len(triggered_scores), "negatives": len(clean_scores),
    }
