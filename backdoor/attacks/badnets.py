"""BadNets (Gu et al., "BadNets: Identifying Vulnerabilities in the Machine Learning Model Supply Chain", 2017).

Dirty label. Trigger: a white (255) square overwriting the bottom-right corner with no margin; 3x3 on
32x32 images (rows/cols 29-31), its side scaled with the image size (``size = round(3 * H / 32)``, so 6x6 on
64x64 Tiny ImageNet). Defaults: target 0, ``size`` None (scaled), ``value`` 255.
"""
from __future__ import annotations

import torch

from backdoor.attacks import register_attack
from backdoor.attacks.base import Attack


def square_side(height: int, size: int | None) -> int:
    return size if size is not None else max(1, round(3 * height / 32))


@register_attack("badnets")
class BadNets(Attack):
    """BadNets: white 3x3 square in the bottom-right corner (scaled with image size), dirty label."""

    kind = "dirty_label"

    def __init__(self, target: int = 0, size: int | None = None, value: int = 255, **kwargs):
        super().__init__(target=target, **kwargs)
        if size is not None and size < 1:
            raise ValueError(f"badnets: size must be >= 1, got {size}")
        if not 0 <= value <= 255:
            raise ValueError(f"badnets: value must be in [0, 255], got {value}")
        self.size, self.value = size, value

    def apply_trigger(self, x: torch.Tensor) -> torch.Tensor:
        side = square_side(x.shape[-2], self.size)
        out = x.clone()
        out[..., -side:, -side:] = self.value
        return out
