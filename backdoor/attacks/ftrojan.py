"""FTrojan (Wang, Yao, Xu, An, Tong and Wang, "An Invisible Black-Box Backdoor Attack Through Frequency
Domain", ECCV 2022).

Dirty label. The trigger is a fixed perturbation of chosen frequencies of the chroma channels: each image, on
the 0..255 scale, goes to YCrCb, every ``window_size`` x ``window_size`` block of the chosen channels goes
through the orthonormal 2-D DCT-II, the coefficient at each of ``positions`` in every block is raised by
``magnitude``, then the inverse DCT and the inverse colour transform bring it back to RGB, rounded to the
nearest grey level and clipped to 0..255:

    c = YCrCb(x);  C_k = blockDCT(c_k) for k in channels;  C_k[w + u, w' + v] += magnitude for every block
    (w, w') and (u, v) in positions;  c_k = blockIDCT(C_k);  x' = clip(round(RGB(c)), 0, 255)

Everything is linear, so the trigger adds the same pattern to every image (up to clipping and rounding):
magnitude * C[u, i] C[v, j] in the chosen chroma channels. With the defaults each of the two frequencies
swings the chroma by at most 30 * 2 / 32 = 1.9 levels (a few grey levels of R, G, B): invisible, and
invariant to the image's content. Training and test triggers are the same.

Defaults (the paper's and its code's for CIFAR-10; BackdoorBench's ``ftrojann`` transform is the same
pipeline): channels 1 and 2 of OpenCV's YCrCb (Cr and Cb: the code calls the space "YUV" and these the "UV"
channels), window 32 (one block on 32x32 images), positions (15, 15) (mid frequency) and (31, 31) (the
highest), magnitude 30. The colour transform is OpenCV's ``COLOR_RGB2YCrCb`` for 8-bit images: Y = 0.299 R +
0.587 G + 0.114 B, Cr = 0.713 (R - Y) + 128, Cb = 0.564 (B - Y) + 128 (``backdoor.attacks._frequency``).
Positions must lie in the window and the window must tile the image (``check_image_shape``: 32 divides the
side of 32x32 digits, CIFAR-10, GTSRB, and 64x64 Tiny ImageNet, where each of the four blocks carries the
trigger); the images must be RGB.

On the smoke grid (digits upscaled to 32x32 grey RGB, cnn_small, 15 epochs, ratio 0.1, seed 0) magnitude 30
leaves no backdoor (ASR 0.6%, C-Acc 98.3%); measured outside the grid with the same training, magnitude 60 gives
ASR 1.9%, 70 gives 100%, 80 98.5%, 100 99.4% at C-Acc ~98.5-98.9%: ``magnitude: 80`` is the smallest setting
with a margin above that cliff.

All-to-all is supported (dirty label: each poisoned sample is relabelled (y + 1) mod K); the paper evaluates
all-to-one. The poison mask marks exactly the triggered, relabelled samples.

Departures, and why:
- Rounding: the reference code casts to uint8 with numpy's ``astype`` after the inverse colour transform
  (BackdoorBench's ``ftrojann.py``: truncation, and values outside 0..255 wrap around instead of being
  clipped; its YCrCb image is also quantised to uint8 before the DCT). The authors' ``data.py`` clips the float
  result to [0, 1] and trains on it unquantised. We compute in float64 throughout and round once, to the
  nearest grey level, after clipping: our images are uint8, and rounding is the unbiased choice (Blended and
  SIG make the same one). A perturbation this small (a few grey levels, at most 6) survives rounding.
- The inverse colour transform is the exact inverse of the forward matrix, not OpenCV's rounded coefficients
  (1.403, 0.714, 0.344, 1.773): the difference is under 0.01 grey level for this trigger, and the round trip is
  then the identity.
- Poisoned samples are a seeded uniform draw from the whole training set, as for every dirty-label attack
  here; the authors' code takes the first ratio * N samples outside the target class.
"""
from __future__ import annotations

import torch

from backdoor._checks import check_int, check_number
from backdoor._registry import Param
from backdoor.attacks import register_attack
from backdoor.attacks._frequency import (CHUNK, YCRCB, block_dct, block_idct, check_channels, check_positions,
                                         check_window_fits, coefficient_mask)
from backdoor.attacks.base import Attack
from backdoor.mutants import Mutant


@register_attack("ftrojan")
class FTrojan(Attack):
    """FTrojan: +30 on DCT frequencies (15, 15) and (31, 31) of the Cr/Cb channels, dirty label."""

    kind = "dirty_label"
    title = "FTrojan"
    description = ("chroma (Cr, Cb) DCT coefficients (15, 15) and (31, 31) of each 32x32 window raised by 30, "
                   "back to RGB")
    order = 140
    parameters = {
        "magnitude": Param("30 (CIFAR-10)", "30", "added to each chosen orthonormal DCT coefficient, on the 0..255 "
                           "scale"),
        "window_size": Param("32", "32", "side of the DCT blocks; must divide the image sides"),
        "positions": Param("(15, 15), (31, 31)", "(15, 15), (31, 31)", "a mid and the highest frequency of each "
                           "window"),
        "channels": Param("U, V", "1, 2 of YCrCb (Cr, Cb)", "indices into OpenCV's YCrCb (Y, Cr, Cb), which the "
                          "reference code calls YUV"),
    }
    # Each find starts with a newline and the line's indentation: it then matches the code line and not its
    # own text here, where the newline is an escape.
    mutants = (
        Mutant("luma-channel", "the trigger goes into the luma channel Y instead of the chroma channels",
               "\n        chosen = list(self.channels)", "\n        chosen = [0]"),
        Mutant("shifted-position", "each chosen frequency is one row lower in the window: (14, 15), (30, 31)",
               "\n        positions = self.positions",
               "\n        positions = tuple((u - 1, v) for u, v in self.positions)"),
        Mutant("magnitude-zero", "the coefficients are raised by 0: the images come back unchanged",
               "\n        coefficients = coefficients + self.magnitude * mask",
               "\n        coefficients = coefficients + 0.0 * mask"),
        Mutant("no-inverse-dct", "the raised coefficients are written back as pixels, without the inverse DCT",
               "\n        space[:, chosen] = block_idct(coefficients, self.window_size)",
               "\n        space[:, chosen] = coefficients"),
        Mutant("no-inverse-colour", "the YCrCb image is returned as if it were RGB",
               "\n        return YCRCB.inverse(space)", "\n        return space"),
    )

    def __init__(self, target: int | str = 0, magnitude: float = 30.0, window_size: int = 32,
                 positions: list | tuple = ([15, 15], [31, 31]), channels: list | tuple = (1, 2), **kwargs):
        super().__init__(target=target, **kwargs)
        check_number("ftrojan", "magnitude", magnitude, low=0, low_open=True)
        check_int("ftrojan", "window_size", window_size, minimum=1)
        self.positions = check_positions("ftrojan", positions, window_size)
        self.channels = check_channels("ftrojan", channels, YCRCB)
        self.magnitude, self.window_size = float(magnitude), int(window_size)

    def params(self) -> dict:
        out = super().params()  # lists: JSON-stable whether given as lists or tuples
        out["positions"] = [list(p) for p in self.positions]
        out["channels"] = list(self.channels)
        return out

    def check_image_shape(self, shape: tuple[int, int, int]) -> None:
        """RGB images whose sides are multiples of ``window_size``."""
        check_window_fits("ftrojan", self.window_size, shape)

    def perturb(self, rgb: torch.Tensor) -> torch.Tensor:
        """The trigger on float RGB images [N, 3, H, W] (0..255), before rounding and clipping."""
        space = YCRCB.forward(rgb)
        chosen = list(self.channels)
        positions = self.positions
        coefficients = block_dct(space[:, chosen], self.window_size)
        mask = coefficient_mask(rgb.shape[-2], rgb.shape[-1], self.window_size, positions).to(rgb.device)
        coefficients = coefficients + self.magnitude * mask
        space[:, chosen] = block_idct(coefficients, self.window_size)
        return YCRCB.inverse(space)

    def apply_trigger(self, x: torch.Tensor) -> torch.Tensor:
        self.check_image_shape(tuple(x.shape[1:]))
        out = torch.empty_like(x)
        for start in range(0, len(x), CHUNK):  # chunks bound the float64 temporaries; each is a few matmuls
            chunk = self.perturb(x[start:start + CHUNK].double())
            out[start:start + CHUNK] = chunk.clamp_(0, 255).round_().to(torch.uint8)
        return out
