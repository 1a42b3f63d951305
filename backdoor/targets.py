"""What a backdoor's trigger sends an input to: one class (all-to-one) or each class's successor (all-to-all).

All-to-one, ``target: t``: every triggered input should be classified as ``t``; the poisoned test set is the
non-target test images (a target image already carries the target label). All-to-all, ``target: all-to-all``:
an input of class ``y`` should go to ``(y + 1) mod K``, as in BadNets' all-to-all experiment (Gu et al. 2017,
section 4.2); no class is the target, so the poisoned test set is the whole test set. In both modes ASR is the
share of the poisoned test set classified as its attack label and R-Acc the share classified as its true label.
Clean-label attacks (SIG, LC) cannot relabel, and LF's trigger is a perturbation built towards one class, so
they refuse all-to-all (their papers are all-to-one).
"""
from __future__ import annotations

import torch

ALL_TO_ALL = "all-to-all"
ALLOWED = f"a class index (integer) or {ALL_TO_ALL!r}"

Target = int | str


def is_all_to_all(target: Target) -> bool:
    return target == ALL_TO_ALL


def target_problem(target: object, num_classes: int | None = None, dataset: str = "the dataset") -> str | None:
    """Why ``target`` is not a target of ``dataset`` with ``num_classes`` classes (for error messages that name
    it), or None."""
    if is_all_to_all(target):
        return None if num_classes is None or num_classes >= 2 else f"{ALL_TO_ALL} needs at least 2 classes; {dataset} has {num_classes}"
    if not isinstance(target, int) or isinstance(target, bool):
        return f"{target!r} is not allowed; expected {ALLOWED}"
    if num_classes is not None and not 0 <= target < num_classes:
        return f"{target} is outside {dataset}'s classes; allowed: 0..{num_classes - 1} or {ALL_TO_ALL!r}"
    return None


def attack_labels(target: Target, y: torch.Tensor, num_classes: int | None) -> torch.Tensor:
    """The label the backdoor assigns to inputs whose true labels are ``y``."""
    if not is_all_to_all(target):
        return torch.full_like(y, int(target))
    if num_classes is None:
        raise ValueError(f"an {ALL_TO_ALL} target needs the dataset's class count")
    return (y + 1) % num_classes


def triggered_test_keep(target: Target, y: torch.Tensor) -> torch.Tensor:
    """Which test samples form the poisoned test set: the non-target ones (all-to-one), or all (all-to-all)."""
    if is_all_to_all(target):
        return torch.ones_like(y, dtype=torch.bool)
    return y != int(target)
