"""Shared machinery of the adaptive attacks of Qi et al. (ICLR 2023): Adap-Blend and Adap-Patch.

- ``select_poison_and_cover``: one seeded permutation of the training set; its first ``n_poison`` entries
  are the poison samples (the same draw as every dirty-label attack's ``select_poison_indices``), the next
  ``n_cover`` the cover samples, so the two never overlap (as in backdoor-toolbox).
- ``piece_index``: the piece grid, a ``side x side`` partition of the image (``pieces = side ** 2``) into
  row bands and column bands; every pixel belongs to exactly one piece. Where ``side`` does not divide the
  image the bands differ by one pixel (the toolbox asserts that it divides).
- ``keep_pieces``: for every selected sample at once, which pieces of the trigger it carries: exactly
  ``kept`` of ``pieces`` per row, uniformly among the subsets (one ``rand`` tensor, ranked per row).
- ``blend``: ``x + alpha * m * (t - x)`` on uint8 images, in float, rounded to the nearest grey level.
"""
from __future__ import annotations

import math

import torch

from backdoor._checks import ParameterError, is_int


def select_poison_and_cover(n: int, n_poison: int, n_cover: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(poison index, cover index), each sorted, disjoint, drawn from one seeded permutation of ``range(n)``."""
    if n_poison + n_cover > n:
        raise ValueError(f"{n_poison} poison and {n_cover} cover samples do not fit in a training set of {n}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return order[:n_poison].sort().values, order[n_poison:n_poison + n_cover].sort().values


def grid_side(owner: str, pieces: int) -> int:
    """The side of the square piece grid; ``pieces`` must be a positive perfect square."""
    side = math.isqrt(pieces) if is_int(pieces) and pieces > 0 else 0
    if side == 0 or side * side != pieces:
        raise ParameterError(owner, "pieces", pieces, "a perfect square >= 1 (the trigger is cut on a square grid)")
    return side


def piece_index(height: int, width: int, side: int) -> torch.Tensor:
    """long [H, W]: the piece of every pixel, ``row_band * side + column_band``; band i of a length L is the
    pixels p with ``p * side // L == i`` (equal bands where side divides L)."""
    rows = torch.arange(height) * side // height
    cols = torch.arange(width) * side // width
    return rows[:, None] * side + cols[None, :]


def keep_pieces(count: int, pieces: int, kept: int, g: torch.Generator) -> torch.Tensor:
    """bool [count, pieces]: each row keeps exactly ``kept`` pieces, a uniform random subset, all rows drawn
    at once (the ranks of one uniform tensor)."""
    rank = torch.rand(count, pieces, generator=g).argsort(dim=1).argsort(dim=1)
    return rank < kept


CHUNK = 4096  # images per float temporary


def blend(x: torch.Tensor, pattern: torch.Tensor, alpha: torch.Tensor | float) -> torch.Tensor:
    """uint8 ``round(x + alpha * (255 * pattern - x))`` on uint8 [N, C, H, W]. ``pattern`` is float in [0, 1]
    broadcasting against one image ([C, H, W]); ``alpha`` a number or a float weight per pixel broadcasting
    against one image ([1, H, W]) or against x ([N, 1, H, W]: the blend ratio times each sample's piece mask).
    Computed in chunks of images (bounded float temporaries), each one broadcast."""
    pattern = pattern.to(x.device) * 255
    per_sample = torch.is_tensor(alpha) and alpha.dim() == 4
    if torch.is_tensor(alpha):
        alpha = alpha.to(x.device)
    out = torch.empty_like(x)
    for start in range(0, len(x), CHUNK):
        xf = x[start:start + CHUNK].float()
        a = alpha[start:start + CHUNK] if per_sample else alpha
        out[start:start + CHUNK] = (xf + a * (pattern - xf)).round_().clamp_(0, 255).to(torch.uint8)
    return out
