"""Procedural images for tests: any size, class count and image size, generated from a seed.

Each class has a smooth random colour prototype (a coarse grid upsampled bicubically); a sample is its class
prototype, shifted by up to ``max_shift`` pixels, plus Gaussian noise. Classes are separable but not trivially.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from backdoor._checks import ParameterError, check_int, check_number
from backdoor.data import Dataset, Split, channel_stats, register_dataset


def _prototypes(num_classes: int, image_size: int, g: torch.Generator) -> torch.Tensor:
    coarse = torch.rand(num_classes, 3, 4, 4, generator=g)
    return F.interpolate(coarse, size=(image_size, image_size), mode="bicubic", align_corners=False).clamp(0, 1)


def _samples(protos: torch.Tensor, n: int, noise: float, max_shift: int, g: torch.Generator) -> Split:
    k, _, size, _ = protos.shape
    y = torch.arange(n) % k
    y = y[torch.randperm(n, generator=g)]
    # One padded gather applies a different shift to every sample.
    padded = F.pad(protos[y], (max_shift,) * 4, mode="replicate")
    dy, dx = (torch.randint(0, 2 * max_shift + 1, (2, n), generator=g))
    rows = dy[:, None] + torch.arange(size)
    cols = dx[:, None] + torch.arange(size)
    shifted = padded[torch.arange(n)[:, None, None, None], torch.arange(3)[None, :, None, None],
                     rows[:, None, :, None], cols[:, None, None, :]]
    images = shifted + noise * torch.randn(shifted.shape, generator=g)
    return Split((images.clamp(0, 1) * 255).round().to(torch.uint8), y)


MAX_BYTES = 4 << 30  # the uint8 images of both splits (generated as float first: 4x that, briefly)


def _check(num_classes: int = 10, train_size: int = 1000, test_size: int = 200, image_size: int = 32,
           noise: float = 0.1, max_shift: int = 2, seed: int = 0) -> int:
    """Every parameter's range (no data is generated); returns the image side."""
    check_int("synthetic", "num_classes", num_classes, minimum=2)
    for name, value in (("train_size", train_size), ("test_size", test_size), ("image_size", image_size)):
        check_int("synthetic", name, value, minimum=1)
    pixels = (train_size + test_size) * 3 * image_size * image_size
    if pixels > MAX_BYTES:
        raise ParameterError("synthetic", "train_size", train_size, f"sizes whose images fit in {MAX_BYTES >> 30} GiB "
                             f"((train_size + test_size) x 3 x image_size^2 bytes; these need {pixels / 2**30:.0f} GiB)")
    check_number("synthetic", "noise", noise, low=0)
    check_int("synthetic", "max_shift", max_shift, minimum=0)
    check_int("synthetic", "seed", seed)
    return image_size


@register_dataset("synthetic")
def synthetic(num_classes: int = 10, train_size: int = 1000, test_size: int = 200, image_size: int = 32,
              noise: float = 0.1, max_shift: int = 2, seed: int = 0) -> Dataset:
    _check(num_classes, train_size, test_size, image_size, noise, max_shift, seed)
    g = torch.Generator().manual_seed(seed)
    protos = _prototypes(num_classes, image_size, g)
    train = _samples(protos, train_size, noise, max_shift, g)
    test = _samples(protos, test_size, noise, max_shift, g)
    mean, std = channel_stats(train.x)
    return Dataset(
        name="synthetic", train=train, test=test, num_classes=num_classes, mean=mean, std=std, hflip=True,
        params={"num_classes": num_classes, "train_size": train_size, "test_size": test_size,
                "image_size": image_size, "noise": noise, "max_shift": max_shift, "seed": seed},
    )


synthetic.num_classes = lambda params: params.get("num_classes", 10)
synthetic.check = _check
