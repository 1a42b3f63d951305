"""Block DCT and colour spaces shared by the frequency-domain attacks (FTrojan, CTRL).

- ``dct_matrix(n)``: the orthonormal DCT-II as an n x n matrix, C[k, i] = a_k cos(pi (2 i + 1) k / 2n) with
  a_0 = sqrt(1/n), a_k = sqrt(2/n) (OpenCV's ``cv2.dct`` and ``scipy.fft.dct(norm="ortho")``); its inverse is
  its transpose.
- ``block_dct`` / ``block_idct``: the 2-D DCT of every non-overlapping ``window`` x ``window`` block of images
  [..., H, W], as two matmuls with the block-diagonal matrix kron(I, C) over the whole batch (no loop over
  images or blocks). Each block's coefficients lie where its pixels were, as in the references' ``DCT``:
  coefficient (u, v) of the block at (a, b) is at [a * window + u, b * window + v].
- ``ColourSpace``: a linear colour transform plus offset on the 0..255 scale, ``forward`` (from RGB) and
  ``inverse`` (the exact matrix inverse, so that the round trip is the identity up to float error).
  ``YCRCB`` is OpenCV's ``COLOR_RGB2YCrCb`` for 8-bit images (channels Y, Cr, Cb; offset 128), the space
  FTrojan's code calls "YUV"; ``YUV`` is kornia's ``rgb_to_yuv`` (channels Y, U, V; no offset), CTRL's.
- ``coefficient_mask``: where the chosen positions of every window lie in an H x W coefficient image.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch

from backdoor._checks import ParameterError, is_int

CHUNK = 4096  # images per float64 chunk: bounds the temporaries (4096 x 3 x 32 x 32 x 8 bytes = 100 MB)


@lru_cache(maxsize=16)
def dct_matrix(n: int) -> torch.Tensor:
    """float64 [n, n]: the orthonormal DCT-II, X = C @ x for a signal x of length n (do not modify)."""
    k = torch.arange(n, dtype=torch.float64)[:, None]
    i = torch.arange(n, dtype=torch.float64)[None, :]
    c = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    c[0] = c[0] / math.sqrt(2.0)
    return c


@lru_cache(maxsize=16)
def _block_matrix(size: int, window: int) -> torch.Tensor:
    """float64 [size, size]: kron(I_{size / window}, C_window), the DCT of every block along one axis."""
    return torch.kron(torch.eye(size // window, dtype=torch.float64), dct_matrix(window))


def _blocks(x: torch.Tensor, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    height, width = x.shape[-2:]
    if height % window or width % window:
        raise ValueError(f"a {height}x{width} image does not tile into {window}x{window} windows")
    return _block_matrix(height, window).to(x), _block_matrix(width, window).to(x)


def block_dct(x: torch.Tensor, window: int) -> torch.Tensor:
    """The orthonormal 2-D DCT-II of every ``window`` x ``window`` block of x [..., H, W] (float)."""
    rows, cols = _blocks(x, window)
    return rows @ x @ cols.T


def block_idct(coefficients: torch.Tensor, window: int) -> torch.Tensor:
    """The inverse of ``block_dct`` (the transposed matrices: the DCT is orthonormal)."""
    rows, cols = _blocks(coefficients, window)
    return rows.T @ coefficients @ cols


@dataclass(frozen=True)
class ColourSpace:
    """c = M @ rgb + offset per pixel, on the 0..255 scale; ``inverse`` applies M^-1 to c - offset."""

    name: str
    channels: tuple[str, str, str]
    matrix: tuple[tuple[float, float, float], ...]
    offset: tuple[float, float, float]

    def _tensors(self, like: torch.Tensor, inverse: bool) -> tuple[torch.Tensor, torch.Tensor]:
        m = torch.tensor(self.matrix, dtype=torch.float64)
        m = torch.linalg.inv(m) if inverse else m
        return m.to(like), torch.tensor(self.offset, dtype=torch.float64).to(like)[:, None, None]

    def forward(self, rgb: torch.Tensor) -> torch.Tensor:
        """float [N, 3, H, W] RGB (0..255) -> this space."""
        m, offset = self._tensors(rgb, inverse=False)
        return torch.einsum("ij,njhw->nihw", m, rgb) + offset

    def inverse(self, c: torch.Tensor) -> torch.Tensor:
        """float [N, 3, H, W] in this space -> RGB (0..255, unclipped)."""
        m, offset = self._tensors(c, inverse=True)
        return torch.einsum("ij,njhw->nihw", m, c - offset)


_LUMA = (0.299, 0.587, 0.114)
# OpenCV, 8-bit: Cr = (R - Y) * 0.713 + 128, Cb = (B - Y) * 0.564 + 128.
YCRCB = ColourSpace(
    "YCrCb (OpenCV)", ("Y", "Cr", "Cb"),
    (_LUMA,
     tuple(0.713 * ((c == 0) - w) for c, w in enumerate(_LUMA)),
     tuple(0.564 * ((c == 2) - w) for c, w in enumerate(_LUMA))),
    (0.0, 128.0, 128.0))
# kornia.color.rgb_to_yuv (analog BT.601 YUV, U and V centred on 0).
YUV = ColourSpace("YUV (kornia)", ("Y", "U", "V"),
                  (_LUMA, (-0.147, -0.289, 0.436), (0.615, -0.515, -0.100)), (0.0, 0.0, 0.0))


def coefficient_mask(height: int, width: int, window: int, positions: tuple[tuple[int, int], ...]) -> torch.Tensor:
    """bool [H, W]: True at (a * window + u, b * window + v) for every window (a, b) and position (u, v)."""
    mask = torch.zeros(window, window, dtype=torch.bool)
    for u, v in positions:
        mask[u, v] = True
    return mask.repeat(height // window, width // window)


# -- parameter checks shared by the two attacks ------------------------------------------------------------
def check_channels(owner: str, channels, space: ColourSpace) -> tuple[int, ...]:
    """A non-empty list of distinct channel indices of ``space``; returned as a tuple."""
    allowed = f"a non-empty list of distinct channel indices in 0..2 ({', '.join(space.channels)})"
    values = channels if isinstance(channels, (list, tuple)) else [channels]
    if not values or not all(is_int(c) and 0 <= c <= 2 for c in values) or len(set(values)) != len(values):
        raise ParameterError(owner, "channels", channels, allowed)
    return tuple(int(c) for c in values)


def check_positions(owner: str, positions, window: int) -> tuple[tuple[int, int], ...]:
    """A non-empty list of distinct [row, column] pairs inside a ``window`` x ``window`` block."""
    allowed = f"a non-empty list of distinct [row, column] pairs, each in 0..{window - 1} (window_size {window})"
    if not isinstance(positions, (list, tuple)) or not positions:
        raise ParameterError(owner, "positions", positions, allowed)
    pairs = []
    for pair in positions:
        if (not isinstance(pair, (list, tuple)) or len(pair) != 2
                or not all(is_int(p) and 0 <= p < window for p in pair)):
            raise ParameterError(owner, "positions", positions, allowed)
        pairs.append((int(pair[0]), int(pair[1])))
    if len(set(pairs)) != len(pairs):
        raise ParameterError(owner, "positions", positions, allowed)
    return tuple(pairs)


def check_window_fits(owner: str, window: int, shape: tuple[int, int, int]) -> None:
    """RGB images whose sides are multiples of ``window`` (the windows tile the image)."""
    channels, height, width = shape
    if channels != 3:
        raise ParameterError(owner, "channels", channels, "RGB images (3 channels): the trigger lives in a "
                             f"colour space's chroma, got {channels}-channel images")
    if height % window or width % window:
        raise ParameterError(owner, "window_size", window,
                             f"a divisor of both image sides ({height}x{width}) so that the windows tile the image")
