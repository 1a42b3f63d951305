"""scikit-learn's handwritten digits (UCI optdigits test set, 1,797 real 8x8 images, 10 classes).

The embedded default: it ships with scikit-learn, so it needs no download. Served CIFAR-shaped: each 8x8
grey image (0..16) is scaled to 0..255, resized bilinearly to ``image_size`` and repeated over 3 channels.
The train/test split is a fixed, seeded, class-stratified permutation.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from backdoor._checks import check_int, check_number
from backdoor.data import Dataset, Split, channel_stats, register_dataset


def _stratified_split(y: torch.Tensor, test_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(y), generator=g)
    # Rank of each sample within its class (in the permuted order) decides its side of the split.
    ys = y[order]
    rank = torch.zeros_like(ys)
    for c in ys.unique():  # 10 classes, not a per-image loop
        members = ys == c
        rank[members] = torch.arange(int(members.sum()))
    counts = torch.bincount(ys)
    is_test = rank < (counts[ys].float() * test_fraction).round().long()
    return order[~is_test].sort().values, order[is_test].sort().values


def _check(image_size: int = 32, test_fraction: float = 0.2, split_seed: int = 0) -> int:
    """Every parameter's range (nothing is loaded); returns the image side."""
    check_int("digits", "image_size", image_size, minimum=1)
    check_number("digits", "test_fraction", test_fraction, low=0, high=1, low_open=True, high_open=True)
    check_int("digits", "split_seed", split_seed)
    return image_size


@register_dataset("digits")
def digits(image_size: int = 32, test_fraction: float = 0.2, split_seed: int = 0) -> Dataset:
    _check(image_size, test_fraction, split_seed)
    from sklearn.datasets import load_digits

    bunch = load_digits()
    grey = torch.as_tensor(bunch.images, dtype=torch.float32).unsqueeze(1) * (255.0 / 16.0)
    big = F.interpolate(grey, size=(image_size, image_size), mode="bilinear", align_corners=False)
    x = big.round().clamp(0, 255).to(torch.uint8).repeat(1, 3, 1, 1)
    y = torch.as_tensor(bunch.target, dtype=torch.int64)
    train_idx, test_idx = _stratified_split(y, test_fraction, split_seed)
    train = Split(x[train_idx].contiguous(), y[train_idx].contiguous())
    mean, std = channel_stats(train.x)
    return Dataset(
        name="digits",
        train=train,
        test=Split(x[test_idx].contiguous(), y[test_idx].contiguous()),
        num_classes=10,
        mean=mean,
        std=std,
        hflip=False,  # a mirrored digit is another glyph
        params={"image_size": image_size, "test_fraction": test_fraction, "split_seed": split_seed},
    )


digits.num_classes = 10
digits.check = _check
