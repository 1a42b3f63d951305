"""Checkerboard (an example attack: tests/test_new_method.py adds it to a copy of the checkout as one file).

Dirty label. Trigger: a 4x4 black-and-white checkerboard overwriting the bottom-right corner.
"""
from __future__ import annotations

import torch

from backdoor._checks import check_int
from backdoor._registry import NONE, Param
from backdoor.attacks import register_attack
from backdoor.attacks.base import Attack
from backdoor.mutants import Mutant


def board(size: int) -> torch.Tensor:
    """A size x size board of 0 and 255, white in its top-left square."""
    rows, cols = torch.arange(size).view(-1, 1), torch.arange(size).view(1, -1)
    return ((rows + cols) % 2 == 0).to(torch.uint8) * 255


@register_attack("checkerboard")
class Checkerboard(Attack):
    """Checkerboard: a 4x4 black-and-white board in the bottom-right corner, dirty label."""

    kind = "dirty_label"
    title = "Checkerboard"
    order = 15  # after BadNets (10), before Blended (20)
    parameters = {
        "size": Param(NONE, NONE, "side of the board in pixels"),
    }
    mutants = (
        Mutant("top-left-corner", "the board is painted in the top-left corner",
               "\n        out[..., -self.size:, -self.size:] = ", "\n        out[..., :self.size, :self.size] = "),
        Mutant("all-white", "the board is a white square",
               "\n    return ((rows + cols) % 2 == 0)", "\n    return ((rows + cols) >= 0)"),
    )
    mutation_tests = ("tests/test_checkerboard.py",)

    def __init__(self, target: int | str = 0, size: int = 4, **kwargs):
        super().__init__(target=target, **kwargs)
        check_int("checkerboard", "size", size, minimum=2)
        self.size = size

    def apply_trigger(self, x: torch.Tensor) -> torch.Tensor:
        out = x.clone()
        out[..., -self.size:, -self.size:] = board(self.size).to(out.dtype)
        return out
