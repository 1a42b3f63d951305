"""Blended (Chen et al., "Targeted Backdoor Attacks on Deep Learning Systems Using Data Poisoning", 2017).

Dirty label. x' = (1 - alpha) * x + alpha * t with alpha = 0.2 at train and test time, computed in float and
rounded to uint8. ``pattern``: ``"noise"`` (default) is a fixed uniform-noise image drawn from ``pattern_seed``
(the original uses a cartoon "Hello Kitty" image that we cannot ship); a path to any image file is accepted
and resized to the input size as BackdoorBench does: with PIL's bilinear resize, which antialiases (its
filter widens with the downscale factor), to uint8 grey levels.

Departures, and why:
- Rounding: BackdoorBench truncates the blend when it casts back to uint8; we round to the nearest grey
  level. Truncation darkens every blended pixel by half a grey level on average (on about half of the pixels
  by one level); rounding is the unbiased choice and keeps x' = x where the blend leaves a pixel unchanged.
  SIG makes the same choice.
- An earlier version resized image patterns with ``F.interpolate(mode="bilinear")`` without antialiasing:
  on the Hello Kitty image that pattern differed from PIL's by up to 169 grey levels (aliasing of the fine
  outlines), the poisoned pixels by up to 34. PIL's resize is now the one used.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch

from backdoor._checks import ParameterError
from backdoor._registry import NONE, NOT_STATED, Param
from backdoor.attacks import register_attack
from backdoor.attacks.base import Attack
from backdoor.mutants import Mutant


CHUNK = 4096


@lru_cache(maxsize=8)
def _image_pattern(path: str, height: int, width: int) -> torch.Tensor:
    """The image at ``path`` as RGB, resized by PIL (bilinear, antialiased) to ``height`` x ``width``:
    uint8 [3, H, W]."""
    from PIL import Image

    if not Path(path).is_file():
        raise FileNotFoundError(f"blended: pattern image {path!r} does not exist (use 'noise' or an image path)")
    with Image.open(path) as image:
        resized = image.convert("RGB").resize((width, height), Image.Resampling.BILINEAR)
    array = torch.frombuffer(bytearray(resized.tobytes()), dtype=torch.uint8)
    return array.view(height, width, 3).permute(2, 0, 1).clone()


def blend_pattern(pattern: str, pattern_seed: int, shape: tuple[int, int, int]) -> torch.Tensor:
    """The trigger image t as float [C, H, W] in [0, 1]."""
    c, h, w = shape
    if pattern == "noise":
        g = torch.Generator().manual_seed(pattern_seed)
        return torch.rand(c, h, w, generator=g)
    return _image_pattern(str(Path(pattern).expanduser()), h, w)[:c].float().div(255)


@register_attack("blended")
class Blended(Attack):
    """Blended: alpha-blend (0.2) a fixed image into the input, dirty label."""

    kind = "dirty_label"
    title = "Blended"
    description = "x' = 0.8 x + 0.2 t, t a fixed seeded noise image or any image file (`pattern`)"
    order = 20
    parameters = {
        "alpha": Param("0.2", NOT_STATED, "Table 1; the blend is rounded to the nearest grey level (the reference "
                       "truncates)"),
        "pattern": Param("hello kitty", "hello kitty image, resized with PIL",
                         "the cartoon cannot be shipped: seeded uniform noise by default; any image path is accepted "
                         "and resized as PIL does"),
        "pattern_seed": Param(NONE, NONE, "seed of the noise pattern"),
    }
    # Each find starts with a newline and the line's indentation: it then matches the code line and not its
    # own text here, where the newline is an escape.
    mutants = (
        Mutant("alpha-zero", "alpha is 0: the blend leaves every image unchanged",
               "\n        self.alpha, self.pattern, self.pattern_seed = alpha, pattern, pattern_seed",
               "\n        self.alpha, self.pattern, self.pattern_seed = 0.0, pattern, pattern_seed"),
        Mutant("grey-pattern", "the noise pattern is a flat mid-grey image: a contrast change, no pattern",
               "\n        return torch.rand(c, h, w, generator=g)", "\n        return torch.full((c, h, w), 0.5)"),
        Mutant("added-not-blended", "the image keeps its full weight (x + alpha * t): added, not blended",
               "\n            chunk = x[start:start + CHUNK].float().mul_(1 - self.alpha).add_(offset)",
               "\n            chunk = x[start:start + CHUNK].float().add_(offset)"),
    )
    mutation_tests = ("tests/test_triggers.py",)

    def __init__(self, target: int | str = 0, alpha: float = 0.2, pattern: str = "noise", pattern_seed: int = 0,
                 **kwargs):
        super().__init__(target=target, **kwargs)
        if not 0.0 < alpha <= 1.0:
            raise ParameterError("blended", "alpha", alpha, "a number in (0, 1]")
        if pattern != "noise" and not Path(pattern).expanduser().is_file():
            raise ParameterError("blended", "pattern", pattern, "'noise' or the path of an existing image file")
        self.alpha, self.pattern, self.pattern_seed = alpha, pattern, pattern_seed

    def apply_trigger(self, x: torch.Tensor) -> torch.Tensor:
        t = blend_pattern(self.pattern, self.pattern_seed, tuple(x.shape[1:])).to(x.device)
        offset = self.alpha * 255 * t
        out = torch.empty_like(x)
        for start in range(0, len(x), CHUNK):  # chunks bound the float temporaries; each is one broadcast
            chunk = x[start:start + CHUNK].float().mul_(1 - self.alpha).add_(offset)
            out[start:start + CHUNK] = chunk.round_().clamp_(0, 255).to(torch.uint8)
        return out
