"""BadNets (Gu et al., "BadNets: Identifying Vulnerabilities in the Machine Learning Model Supply Chain", 2017).

Dirty label. Trigger: a white (255) square overwriting the bottom-right corner with no margin; 3x3 on
32x32 images (rows/cols 29-31), its side scaled with the image size (``size = round(3 * H / 32)``, so 6x6 on
64x64 Tiny ImageNet). Defaults: target 0, ``size`` None (scaled), ``value`` 255.
"""
from __future__ import annotations

import torch

from backdoor._checks import ParameterError, check_int
from backdoor._registry import NOT_STATED, Param
from backdoor.attacks import register_attack
from backdoor.attacks.base import Attack
from backdoor.mutants import Mutant


def square_side(height: int, size: int | None) -> int:
    return size if size is not None else max(1, round(3 * height / 32))


@register_attack("badnets")
class BadNets(Attack):
    """BadNets: white 3x3 square in the bottom-right corner (scaled with image size), dirty label."""

    kind = "dirty_label"
    title = "BadNets"
    description = "3x3 white square, bottom-right corner (scaled with image size)"
    order = 10
    parameters = {
        "size": Param("3x3, no margin (enlarged on Tiny ImageNet)", NOT_STATED,
                      "None scales the side with the image: round(3 H / 32), 3x3 on 32x32, 6x6 on 64x64"),
        "value": Param("pure white", NOT_STATED, "Table 1 (255 = white)"),
    }
    # Each find starts with a newline and the line's indentation: it then matches the code line and not its
    # own text here, where the newline is an escape.
    mutants = (
        Mutant("top-left-corner", "the square is painted in the top-left corner instead of the bottom-right",
               "\n        out[..., -side:, -side:] = self.value", "\n        out[..., :side, :side] = self.value"),
        Mutant("black-square", "the square is black (255 - value) instead of white",
               "\n        out[..., -side:, -side:] = self.value",
               "\n        out[..., -side:, -side:] = 255 - self.value"),
        Mutant("unscaled-square", "the square stays 3x3 whatever the image size",
               "\n    return size if size is not None else max(1, round(3 * height / 32))",
               "\n    return size if size is not None else 3"),
    )
    mutation_tests = ("tests/test_triggers.py",)

    def __init__(self, target: int | str = 0, size: int | None = None, value: int = 255, **kwargs):
        super().__init__(target=target, **kwargs)
        check_int("badnets", "size", size, minimum=1, optional=True)
        if not 0 <= value <= 255:
            raise ParameterError("badnets", "value", value, "an integer in [0, 255]")
        self.size, self.value = size, value

    def check_image_shape(self, shape: tuple[int, int, int]) -> None:
        """The square must be smaller than the image (a square as large as the image paints it all)."""
        height, width = shape[-2:]
        if square_side(height, self.size) >= min(height, width):
            raise ParameterError("badnets", "size", self.size,
                                 f"an integer in [1, {min(height, width) - 1}] for {height}x{width} images")

    def apply_trigger(self, x: torch.Tensor) -> torch.Tensor:
        self.check_image_shape(tuple(x.shape[1:]))
        side = square_side(x.shape[-2], self.size)
        out = x.clone()
        out[..., -side:, -side:] = self.value
        return out
