"""SIG (Barni, Kallas and Tondi, "A New Backdoor Attack in CNNs by Training Set Corruption Without Label
Poisoning", IEEE ICIP 2019).

Clean label: only target-class training images are poisoned and their labels are kept; the attack relies on
the network associating the superimposed signal with the class that always carries it. Trigger: the
paper's sinusoidal signal,

    x' = clip(x + delta * sin(2 * pi * j * f / W), 0, 255)

with j the column index (0..W-1) and W the image width; the same value on every row and every channel.
It is one broadcast over the whole uint8 tensor, computed in float and rounded to the nearest integer.
The paper lets the test-time amplitude differ from the training one; we use one ``delta`` for both, as
BackdoorBench does.

Defaults (BackdoorBench supplementary Table 1): delta = 40 (on the 0..255 scale), f = 6, target class 0.

Departures: from the paper, only the single delta above. From the original code: unlike the original BackdoorBench code, a ratio that needs more samples than
the target class holds raises ``InfeasibleRatioError`` naming the largest feasible ratio (or, with
``cap_ratio=True``, poisons the whole target class and records the effective ratio) instead of crashing.
"""
from __future__ import annotations

import math

import torch

from backdoor.attacks import register_attack
from backdoor.attacks.base import Attack


def sig_pattern(width: int, delta: float, frequency: float) -> torch.Tensor:
    """The additive signal of one image row, float [W] on the 0..255 scale."""
    j = torch.arange(width, dtype=torch.float64)
    return (delta * torch.sin(2 * math.pi * j * frequency / width)).float()


@register_attack("sig")
class SIG(Attack):
    """SIG: horizontal sinusoid (delta 40, f 6) added to target-class images, clean label."""

    kind = "clean_label"

    def __init__(self, target: int = 0, delta: float = 40.0, frequency: float = 6.0, **kwargs):
        super().__init__(target=target, **kwargs)
        if not 0 < delta <= 255:
            raise ValueError(f"sig: delta must be in (0, 255] (pixel units), got {delta}")
        if not frequency > 0:
            raise ValueError(f"sig: frequency must be > 0 (periods across the image width), got {frequency}")
        self.delta, self.frequency = float(delta), float(frequency)

    def apply_trigger(self, x: torch.Tensor) -> torch.Tensor:
        row = sig_pattern(x.shape[-1], self.delta, self.frequency).to(x.device)
        return (x.float() + row).round().clamp(0, 255).to(torch.uint8)
