"""Shared machinery of the training-controllable attacks (WaNet, Input-aware).

- ``batch_poison_count``: how many samples of one batch get the trigger when the grid's poison ratio is
  read as the per-batch fraction (both originals' ``pratio`` / ``p_attack``). Stochastic rounding keeps the
  expected fraction exact for any ratio (BackdoorBench's ``generalize_to_lower_pratio`` does the same only
  below one sample per batch; ``int(ratio * batch)`` elsewhere, which under-poisons, e.g. 12 of 128 at 0.1).
- ``random_crop_rotate_flip``: both originals augment with random crop (zero padding 5), random rotation
  (10 degrees) and, where the data allow it, a horizontal flip. Here the three are composed into one affine
  sampling grid and applied with a single ``grid_sample`` on the device: no per-image loop. The draws are
  per sample (Input-aware), or with ``same_on_batch`` one per batch for the whole batch (WaNet, whose
  original draws once per batch: see wanet.py).
- ``check_ratio``: the poisoned plus cross fraction must fit in a batch.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def check_ratio(name: str, ratio: float, cross_ratio: float) -> None:
    """Poisoned (``ratio``) plus cross (``cross_ratio * ratio``) samples must fit in one batch."""
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"{name}: poison ratio must be in [0, 1], got {ratio}")
    if ratio * (1.0 + cross_ratio) > 1.0:
        raise ValueError(f"{name}: poison ratio {ratio} with cross_ratio {cross_ratio} needs "
                         f"{ratio * (1 + cross_ratio):.3f} of every batch; allowed: ratio * (1 + cross_ratio) <= 1")


def batch_poison_count(ratio: float, batch: int, g: torch.Generator) -> int:
    """``floor(ratio * batch)`` plus one with probability ``frac(ratio * batch)`` (seeded by ``g``)."""
    expected = ratio * batch
    base = math.floor(expected)
    frac = expected - base
    if frac > 0 and float(torch.rand((), device=g.device, generator=g)) < frac:
        base += 1
    return min(base, batch)


def random_crop_rotate_flip(x: torch.Tensor, g: torch.Generator, *, padding: int, p_crop: float, degrees: float,
                            p_rotate: float, flip: bool, p_flip: float = 0.5,
                            same_on_batch: bool = False) -> torch.Tensor:
    """Random crop (zero padding ``padding``, probability ``p_crop``), rotation (uniform in [-degrees, degrees],
    probability ``p_rotate``) and horizontal flip (probability ``p_flip`` if ``flip``), composed in that order,
    on a float batch [N, C, H, W]. Each sample draws its own (the default), or with ``same_on_batch`` one draw
    of every coin, offset and angle is applied to the whole batch.

    Output pixel u (pixel units, origin at the image centre) reads the input at ``R(a) F u + t``: F the
    mirror, R the rotation about the centre, t the crop's integer shift in [-padding, padding]. With
    ``align_corners=False`` integer shifts and flips hit pixel centres exactly (bilinear weights 1/0), so
    a sample that draws neither rotation nor anything else comes back unchanged.
    """
    n, c, h, w = x.shape
    if n == 0:
        return x
    dev = x.device
    m = 1 if same_on_batch else n  # how many independent draws

    def coin(p: float) -> torch.Tensor:
        return torch.rand(m, device=dev, generator=g) < p

    shift = torch.zeros(2, m, device=dev)
    if padding > 0:
        shift = torch.randint(-padding, padding + 1, (2, m), device=dev, generator=g).float()
        shift = shift * coin(p_crop).float()
    angle = torch.zeros(m, device=dev)
    if degrees > 0:
        angle = (torch.rand(m, device=dev, generator=g) * 2 - 1) * math.radians(degrees)
        angle = angle * coin(p_rotate).float()
    mirror = torch.ones(m, device=dev)
    if flip:
        mirror = torch.where(coin(p_flip), -1.0, 1.0)
    cos, sin = torch.cos(angle), torch.sin(angle)
    # theta = S^-1 R S F in normalised coordinates, S = diag(W/2, H/2); translation S^-1 t.
    theta = torch.stack([
        torch.stack([cos * mirror, -sin * (h / w), shift[0] * 2 / w], dim=1),
        torch.stack([sin * (w / h) * mirror, cos, shift[1] * 2 / h], dim=1),
    ], dim=1)
    grid = F.affine_grid(theta, [m, c, h, w], align_corners=False).expand(n, -1, -1, -1)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def select_poison_and_cross(attack, train, ratio: float, seed: int, *, n_cross: int | None = None):
    """Indices of a fixed poisoned set of a training-controllable attack: ``ratio * N`` samples to relabel
    (drawn like any attack's) and ``cross_ratio`` times as many other samples (cross / noise samples that keep
    their labels), or ``n_cross`` of them where given (an attack whose cross samples are a share of the data
    rather than of the poisoned samples checks its own ratios). Returns (poison index, cross index, the
    generator that drew them, for further draws)."""
    if n_cross is None:
        check_ratio(attack.name, ratio, attack.cross_ratio)
    index = attack.select_poison_indices(train, ratio, seed)
    g = torch.Generator().manual_seed(seed + 1)
    rest = torch.ones(len(train), dtype=torch.bool)
    rest[index] = False
    rest = torch.nonzero(rest).flatten()
    wanted = int(round(attack.cross_ratio * len(index))) if n_cross is None else int(n_cross)
    n_cross = min(len(rest), wanted)
    cross = rest[torch.randperm(len(rest), generator=g)[:n_cross]].sort().values
    return index, cross, g
