"""SIG (Barni, Kallas and Tondi, "A New Backdoor Attack in CNNs by Training Set Corruption Without Label
Poisoning", IEEE ICIP 2019).

Clean label: only target-class training images are poisoned and their labels are kept; the network learns
to associate the superimposed signal with the class that always carries it. Trigger: the paper's
sinusoidal signal,

    x' = clip(x + delta * sin(2 * pi * j * f / W), 0, 255)

with j the column index (0..W-1) and W the image width; the same value on every row and every channel.
It is one broadcast over the whole uint8 tensor, computed in float and rounded to the nearest integer.

Defaults (BackdoorBench supplementary Table 1): delta = 40 (on the 0..255 scale), f = 6, target class 0.
``test_delta`` (default None: the training ``delta``, as in BackdoorBench) sets the amplitude of the test-time
trigger: Barni et al. treat the training and test amplitudes as separate knobs, since only the poisoned
training images need to be inconspicuous, and a stronger test signal activates a backdoor learnt from a
faint one.

Departures: none from the paper. From the original code: a ratio that needs more samples than the target
class holds raises ``InfeasibleRatioError`` naming the largest feasible ratio (or, with ``cap_ratio=True``,
poisons the whole target class and records the effective ratio) instead of crashing.
"""
from __future__ import annotations

import math

import torch

from backdoor._checks import ParameterError
from backdoor._registry import NONE, NOT_STATED, Param
from backdoor.attacks import register_attack
from backdoor.attacks.base import Attack
from backdoor.mutants import Mutant


def sig_pattern(width: int, delta: float, frequency: float) -> torch.Tensor:
    """The additive signal of one image row, float [W] on the 0..255 scale."""
    j = torch.arange(width, dtype=torch.float64)
    return (delta * torch.sin(2 * math.pi * j * frequency / width)).float()


def add_sinusoid(x: torch.Tensor, delta: float, frequency: float) -> torch.Tensor:
    """clip(x + delta * sin(2 pi j f / W)) on uint8 images [N, C, H, W], rounded back to uint8."""
    row = sig_pattern(x.shape[-1], delta, frequency).to(x.device)
    return (x.float() + row).round().clamp(0, 255).to(torch.uint8)


@register_attack("sig")
class SIG(Attack):
    """SIG: horizontal sinusoid (delta 40, f 6) added to target-class images, clean label."""

    kind = "clean_label"
    title = "SIG"
    description = "x + delta sin(2 pi j f / W), delta 40, f 6 (optional separate `test_delta`)"
    order = 40
    parameters = {
        "delta": Param("40", NOT_STATED, "Table 1; rounded to the nearest grey level (the reference truncates)"),
        "frequency": Param("6", NOT_STATED, "Table 1"),
        "test_delta": Param(NONE, "the training delta", "None: the training delta, as the reference; Barni et al. "
                            "treat the test amplitude as a separate knob"),
    }
    # Each find starts with a newline and the line's indentation: it then matches the code line and not its
    # own text here, where the newline is an escape.
    mutants = (
        Mutant("amplitude-zero", "the sinusoid's amplitude is 0: the trigger adds nothing",
               "\n    row = sig_pattern(x.shape[-1], delta, frequency).to(x.device)",
               "\n    row = sig_pattern(x.shape[-1], 0.0, frequency).to(x.device)"),
        Mutant("wrong-frequency", "the sinusoid has f + 1 periods across the image instead of f",
               "\n    return (delta * torch.sin(2 * math.pi * j * frequency / width)).float()",
               "\n    return (delta * torch.sin(2 * math.pi * j * (frequency + 1) / width)).float()"),
        Mutant("vertical-signal", "the signal varies down the rows instead of across the columns",
               "\n    return (x.float() + row).round().clamp(0, 255).to(torch.uint8)",
               "\n    return (x.float() + row[:, None]).round().clamp(0, 255).to(torch.uint8)"),
    )

    def __init__(self, target: int | str = 0, delta: float = 40.0, frequency: float = 6.0,
                 test_delta: float | None = None, **kwargs):
        super().__init__(target=target, **kwargs)
        for name, value in (("delta", delta), ("test_delta", delta if test_delta is None else test_delta)):
            if not 0 < value <= 255:
                raise ParameterError("sig", name, value, "a number in (0, 255] (grey levels)")
        if not frequency > 0:
            raise ParameterError("sig", "frequency", frequency, "a number > 0 (periods across the image width)")
        self.delta, self.frequency = float(delta), float(frequency)
        self.test_delta = None if test_delta is None else float(test_delta)

    def apply_trigger(self, x: torch.Tensor) -> torch.Tensor:
        """The test-time trigger (amplitude ``test_delta``, default ``delta``)."""
        return add_sinusoid(x, self.delta if self.test_delta is None else self.test_delta, self.frequency)

    def poison_images(self, x: torch.Tensor, train_index: torch.Tensor) -> torch.Tensor:
        """The training-time trigger (amplitude ``delta``)."""
        return add_sinusoid(x, self.delta, self.frequency)
