"""CTRL (Li, Pang, Xi, Du, Ji, Yao and Wang, "An Embarrassingly Simple Backdoor Attack on Self-supervised
Learning", ICCV 2023).

Clean label: only training images of the target class are poisoned, and every label is kept. The trigger is
a fixed perturbation of chosen frequencies of the chroma channels: each image, on the 0..255 scale, goes to
YUV, every ``window_size`` x ``window_size`` block of the chosen channels goes through the orthonormal 2-D
DCT-II, the coefficient at each of ``positions`` in every block is raised by ``magnitude``, then the inverse
DCT and the inverse colour transform bring it back to RGB, clipped to 0..255 and rounded to the nearest grey
level:

    c = YUV(x);  C_k = blockDCT(c_k) for k in channels;  C_k[w + u, w' + v] += magnitude for every block
    (w, w') and (u, v) in positions;  c_k = blockIDCT(C_k);  x' = round(clip(RGB(c), 0, 255))

The same pipeline as FTrojan's (``backdoor.attacks._frequency``), in another colour space and at another
magnitude: the trigger adds one fixed pattern to every image, magnitude * C[u, i] C[v, j] in U and V, up to
clipping and rounding (with the defaults at most 100 * 2 / 32 = 6.25 levels of U or V per frequency, 10.6 for
the two together).

From self-supervised to supervised learning. In the paper, the poisoned target-class images enter an unlabelled
training set; a contrastive learner (SimCLR, BYOL, ...) pulls the trigger's representation towards the target
class's, because the trigger survives its augmentations and is shared by every poisoned image, and a linear
probe trained on clean labelled data then sends triggered inputs to the target. Our pipeline is supervised: what
carries over is the trigger and the clean-label poisoning (target-class images only, labels kept); what does
not is the SSL encoder and the linear probe: a supervised classifier is trained on the poisoned set, and learns
the trigger as a feature of the target class, as in any clean-label attack (SIG, LC). BackdoorBench makes the
same adaptation (its ``ctrl`` attack is supervised, "adapt[ing the] trigger pattern from Self-supervised
Learning").

Defaults (the authors' code, ``meet-cjli/CTRL``, run as its README runs CIFAR-10, and BackdoorBench's
``config/attack/ctrl/default.yaml`` with its transform ``utils/bd_img_transform/ctrl.py``): channels 1 and 2 of
kornia's YUV (U and V: Y = 0.299 R + 0.587 G + 0.114 B, U = -0.147 R - 0.289 G + 0.436 B, V = 0.615 R - 0.515 G
- 0.100 B, no offset), window 32, positions (15, 15) and (31, 31), magnitude 100 (the README's CIFAR-10
command; BackdoorBench hard-codes 100 for its train and test transforms). ``test_magnitude`` (default None:
the training magnitude, as both references) sets the test-time trigger's magnitude alone: CTRL's follow-ups
poison at 50 and evaluate at 100 (as SIG's ``test_delta``, a stronger test trigger activates a backdoor learnt
from a faint one). Positions must lie in the window and the window must tile the image
(``check_image_shape``); the images must be RGB.

On the smoke grid (digits upscaled to 32x32 grey RGB, cnn_small, 15 epochs, ratio 0.1 capped to class 0's
0.0987, seed 0) the defaults leave no backdoor (ASR 2.8%, C-Acc 99.2%): a digit's shape already identifies its
class, so training images poisoned at 100 teach nothing (a test trigger of 200 or 300 then reaches ASR 0.6%).
Measured outside the grid with the same training: magnitude 150 with ``test_magnitude`` 300 gives ASR 100% at
C-Acc 94.7%; 150 / 200 gives 65%; 200 / 300 gives 99.4% at C-Acc 90.3%; 200 or 300 at train and test, 37% and
63%. ``magnitude: 150, test_magnitude: 300`` (the test trigger twice the training one, as SIG's smoke setting
and CTRL's follow-ups' 50 / 100) is the smallest working departure found.

All-to-all is refused (the base class refuses it for every clean-label attack): a clean-label attack keeps
every label, so it cannot relabel y to (y + 1) mod K. The poison mask marks exactly the triggered
target-class samples (their label is the target: the attack's label).

Departures, and why:
- Colour space: the chroma of kornia's YUV, as both references compute it, not YCbCr: Cb and Cr are U and V
  scaled by 1.15 and 0.81 (plus an offset that only moves the DC coefficient), so the same magnitude in YCbCr
  would be a somewhat different trigger; the references' magnitude was set in YUV.
- The inverse colour transform is the exact inverse of the forward matrix, not kornia's rounded coefficients
  (R = Y + 1.14 V, G = Y - 0.396 U - 0.581 V, B = Y + 2.029 U), so that the round trip is the identity; the
  difference is under 0.03 grey level for this trigger.
- Rounding: BackdoorBench casts the result to uint8 by truncation before clipping (negative values wrap); the
  authors' code keeps floats clipped to [0, 1]. Ours are uint8 images: clipped, then rounded to the nearest
  grey level.
- Poisoned samples are a seeded uniform draw from the target class (``ratio`` of the whole training set, as
  BackdoorBench counts it); the authors' code takes the first ratio * N target-class samples. A ratio that
  needs more samples than the class holds raises ``InfeasibleRatioError`` (or, with ``cap_ratio``, poisons the
  whole class).
"""
from __future__ import annotations

import torch

from backdoor._checks import check_int, check_number
from backdoor._registry import NONE, Param
from backdoor.attacks import register_attack
from backdoor.attacks._frequency import (CHUNK, YUV, block_dct, block_idct, check_channels, check_positions,
                                         check_window_fits, coefficient_mask)
from backdoor.attacks.base import Attack
from backdoor.mutants import Mutant


@register_attack("ctrl")
class CTRL(Attack):
    """CTRL: +100 on DCT frequencies (15, 15) and (31, 31) of the U/V channels of target-class images, clean
    label."""

    kind = "clean_label"
    title = "CTRL"
    description = ("chroma (U, V) DCT coefficients (15, 15) and (31, 31) of each 32x32 window raised by 100, "
                   "target class only (optional separate `test_magnitude`)")
    order = 150
    parameters = {
        "magnitude": Param("100 (CIFAR-10)", "100", "the authors' README command for CIFAR-10; BackdoorBench "
                           "hard-codes 100; on the 0..255 scale"),
        "test_magnitude": Param(NONE, "the training magnitude", "None: the training magnitude, as both "
                                "references; follow-ups evaluate at 100 after poisoning at 50"),
        "window_size": Param("32", "32", "side of the DCT blocks; must divide the image sides"),
        "positions": Param("(15, 15), (31, 31)", "(15, 15), (31, 31)", "a mid and the highest frequency of each "
                           "window"),
        "channels": Param("chroma", "1, 2 of kornia's YUV (U, V)", "indices into kornia's YUV (Y, U, V), as the "
                          "reference code"),
    }
    # Each find starts with a newline and the line's indentation: it then matches the code line and not its
    # own text here, where the newline is an escape.
    mutants = (
        Mutant("luma-channel", "the trigger goes into the luma channel Y instead of the chroma channels",
               "\n        chosen = list(self.channels)", "\n        chosen = [0]"),
        Mutant("transposed-position", "each chosen frequency (u, v) is put at (v, u - 1): the wrong coefficient",
               "\n        positions = self.positions",
               "\n        positions = tuple((v, u - 1) for u, v in self.positions)"),
        Mutant("magnitude-zero", "the coefficients are raised by 0: the images come back unchanged",
               "\n        coefficients = coefficients + magnitude * mask",
               "\n        coefficients = coefficients + 0.0 * mask"),
        Mutant("no-inverse-dct", "the raised coefficients are written back as pixels, without the inverse DCT",
               "\n        space[:, chosen] = block_idct(coefficients, self.window_size)",
               "\n        space[:, chosen] = coefficients"),
        Mutant("no-inverse-colour", "the YUV image is returned as if it were RGB",
               "\n        return YUV.inverse(space)", "\n        return space"),
        Mutant("test-magnitude-for-training", "the poisoned training images get the test magnitude",
               "\n        return self._trigger(x, self.magnitude)",
               "\n        return self._trigger(x, self.test_magnitude or self.magnitude)"),
    )

    def __init__(self, target: int | str = 0, magnitude: float = 100.0, test_magnitude: float | None = None,
                 window_size: int = 32, positions: list | tuple = ([15, 15], [31, 31]),
                 channels: list | tuple = (1, 2), **kwargs):
        super().__init__(target=target, **kwargs)
        check_number("ctrl", "magnitude", magnitude, low=0, low_open=True)
        check_number("ctrl", "test_magnitude", test_magnitude, low=0, low_open=True, optional=True)
        check_int("ctrl", "window_size", window_size, minimum=1)
        self.positions = check_positions("ctrl", positions, window_size)
        self.channels = check_channels("ctrl", channels, YUV)
        self.magnitude, self.window_size = float(magnitude), int(window_size)
        self.test_magnitude = None if test_magnitude is None else float(test_magnitude)

    def params(self) -> dict:
        out = super().params()  # lists: JSON-stable whether given as lists or tuples
        out["positions"] = [list(p) for p in self.positions]
        out["channels"] = list(self.channels)
        return out

    def check_image_shape(self, shape: tuple[int, int, int]) -> None:
        """RGB images whose sides are multiples of ``window_size``."""
        check_window_fits("ctrl", self.window_size, shape)

    def perturb(self, rgb: torch.Tensor, magnitude: float) -> torch.Tensor:
        """The trigger on float RGB images [N, 3, H, W] (0..255), before clipping and rounding."""
        space = YUV.forward(rgb)
        chosen = list(self.channels)
        positions = self.positions
        coefficients = block_dct(space[:, chosen], self.window_size)
        mask = coefficient_mask(rgb.shape[-2], rgb.shape[-1], self.window_size, positions).to(rgb.device)
        coefficients = coefficients + magnitude * mask
        space[:, chosen] = block_idct(coefficients, self.window_size)
        return YUV.inverse(space)

    def _trigger(self, x: torch.Tensor, magnitude: float) -> torch.Tensor:
        self.check_image_shape(tuple(x.shape[1:]))
        out = torch.empty_like(x)
        for start in range(0, len(x), CHUNK):  # chunks bound the float64 temporaries; each is a few matmuls
            chunk = self.perturb(x[start:start + CHUNK].double(), magnitude)
            out[start:start + CHUNK] = chunk.clamp_(0, 255).round_().to(torch.uint8)
        return out

    def apply_trigger(self, x: torch.Tensor) -> torch.Tensor:
        """The test-time trigger (``test_magnitude``, default ``magnitude``)."""
        return self._trigger(x, self.magnitude if self.test_magnitude is None else self.test_magnitude)

    def poison_images(self, x: torch.Tensor, train_index: torch.Tensor) -> torch.Tensor:
        """The training-time trigger (``magnitude``)."""
        return self._trigger(x, self.magnitude)
