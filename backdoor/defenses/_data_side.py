"""Shared machinery of the poisoned-data-side defenses (AC, Spectral, ABL, DBD).

Everything here works on whole tensors in batched forward passes (never one sample at a time), in the
original order of the poisoned training set, so that flags and scores index the samples they were computed
from.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from backdoor.data import Split
from backdoor.defenses.base import DefenseInputs, NotApplicable
from backdoor.models import roles


def require_poisoned_train(inputs: DefenseInputs, name: str) -> Split:
    """The poisoned training set, or NotApplicable when the case has none (a clean reference row)."""
    if inputs.poisoned_train is None or len(inputs.poisoned_train) == 0:
        raise NotApplicable(f"{name} needs the poisoned training set; this case has none (clean reference row)")
    return inputs.poisoned_train


def _float_batch(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    x = x.to(device)
    return x.float().div_(255) if x.dtype == torch.uint8 else x.float()


@torch.no_grad()
def penultimate_features(model: nn.Module, x: torch.Tensor, *, device: torch.device,
                         batch_size: int = 512) -> torch.Tensor:
    """Penultimate representation (the input of ``roles.head``) of every image, float32 on the CPU, in order.

    Computed in eval mode, without augmentation and in float32 (no autocast: the features feed ICA, KMeans
    and an SVD).
    """
    model.to(device).eval()
    out = []
    for start in range(0, len(x), batch_size):
        _, feats = roles.forward_with_features(model, _float_batch(x[start:start + batch_size], device))
        out.append(feats.float().cpu())
    return torch.cat(out)


LossPerSample = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def cross_entropy_per_sample(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, y, reduction="none")


@torch.no_grad()
def per_sample_loss(model: nn.Module, data: Split, *, device: torch.device, batch_size: int = 512,
                    loss: LossPerSample = cross_entropy_per_sample) -> torch.Tensor:
    """Loss of every sample of ``data`` (float32, CPU, original order), eval mode, no augmentation."""
    model.to(device).eval()
    out = []
    for start in range(0, len(data), batch_size):
        logits = model(_float_batch(data.x[start:start + batch_size], device)).float()
        out.append(loss(logits, data.y[start:start + batch_size].to(device)).float().cpu())
    return torch.cat(out)


def label_groups(features: torch.Tensor, labels: torch.Tensor):
    """For each label (ascending): its sample indices in canonical order and their features as float64 rows
    (the per-label loop of AC and Spectral; the order makes results independent of the input order)."""
    for label in torch.unique(labels).tolist():
        index = torch.nonzero(labels == label).flatten()
        index = index[canonical_order(features[index])]
        yield int(label), index, features[index].double()


def canonical_order(features: torch.Tensor) -> torch.Tensor:
    """A permutation that sorts the rows of ``features`` lexicographically (first column first).

    Running a per-class analysis on rows in this order makes its result depend on the samples only, not on
    the order they came in: shuffling the training set permutes the flags with it (seeded KMeans
    initialisation and ICA otherwise see a different row order and may split differently). Identical rows
    get identical results, so their relative order does not matter.
    """
    f = features.detach().double().cpu().numpy()
    if f.ndim != 2:
        raise ValueError(f"features must be [N, D], got shape {tuple(f.shape)}")
    if len(f) == 0:
        return torch.empty(0, dtype=torch.long)
    return torch.from_numpy(np.lexsort(f.T[::-1]).astype(np.int64))


def rank_within_groups(scores: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """Scores mapped to their rank within their group, scaled to [0, 1] (1 = highest of the group).

    Tied scores share the highest of their ranks (so a group's top score is always 1); a group of one gets 1.
    """
    from scipy.stats import rankdata

    out = torch.zeros(len(scores), dtype=torch.float32)
    s = scores.detach().double().cpu().numpy()
    g = groups.cpu()
    for value in torch.unique(g).tolist():
        index = torch.nonzero(g == value).flatten()
        if len(index) == 1:
            out[index] = 1.0
            continue
        ranks = rankdata(s[index.numpy()], method="max")  # 1 .. n
        out[index] = torch.from_numpy((ranks - 1) / (len(index) - 1)).float()
    return out


def check_features(features: torch.Tensor, labels: torch.Tensor) -> None:
    if features.dim() != 2:
        raise ValueError(f"features must be [N, D], got shape {tuple(features.shape)}")
    if labels.shape != (features.shape[0],):
        raise ValueError(f"labels {tuple(labels.shape)} do not match {features.shape[0]} feature rows")
    if not bool(torch.isfinite(features).all()):
        raise ValueError("features contain NaN or infinite values")


def fresh_model(inputs: DefenseInputs, seed: int) -> nn.Module:
    """``inputs.new_model()`` built under ``seed`` with the global RNG left untouched, so the defense's result
    never depends on what ran before it in the process (a ``new_model`` that seeds itself keeps its seed)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return inputs.new_model()


def retrain_without(inputs: DefenseInputs, data: Split, flagged: torch.Tensor, *, epochs: int | None,
                    seed_offset: int, desc: str) -> tuple[nn.Module, dict]:
    """Train a fresh model (``new_model``) from scratch on the unflagged samples with the attack's budget."""
    keep = torch.nonzero(~flagged.bool()).flatten()
    if len(keep) == 0:
        raise ValueError(f"{desc}: every training sample was flagged; nothing is left to retrain on")
    config = inputs.retraining.with_(epochs=epochs)
    model = fresh_model(inputs, inputs.seed + seed_offset)
    history = inputs.fit(model, data.subset(keep), config, seed=inputs.seed + seed_offset, desc=desc)
    return model, {"retrained_on": int(len(keep)), "retrain_epochs": config.epochs,
                   "retrain_final_loss": history["epochs"][-1]["loss"] if history["epochs"] else None}
