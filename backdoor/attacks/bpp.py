"""BppAttack (Wang, Zhai & Ma, "BppAttack: Stealthy and Efficient Trojan Attacks against Deep Neural Networks via
Image Quantization and Contrastive Adversarial Learning", CVPR 2022).

Training controllable. The trigger is colour-depth squeezing: every channel value v in [0, 255] becomes the
nearest of ``squeeze_num`` evenly spaced levels, ``round(round(v / 255 * (s - 1)) / (s - 1) * 255)`` (s 8: the
levels 0, 36, 73, 109, 146, 182, 219, 255). With ``dithering`` the quantisation is Floyd-Steinberg error
diffusion instead: pixels are visited row by row, left to right, each is set to its nearest level and its error
(old - new) is passed on 7/16 to the right, 3/16 down-left, 5/16 down and 1/16 down-right (dropped past the
border), as the reference's ``floydDitherspeed`` does (it keeps the image in float32 and rounds half to even).
The scan is sequential, but pixel (y, x) only waits for (y, x - 1) and the row above up to (y - 1, x + 1), so
all pixels with the same x + 2y are independent: we process those W + 2H - 2 anti-diagonal "waves" one
after another, each vectorised over the batch, the channels and the wave's pixels (94 steps for 32 x 32 images,
instead of 1024 per image in the reference's per-image loop), and deliver every error in the order the
sequential scan does, so the result is the reference's.

Training (through ``TrainHooks``, in the one trainer; BackdoorBench's ``attack/bpp.py`` ``train_step``): in every
batch a fraction ``ratio`` (the grid's poison ratio, read as the reference's per-batch ``pratio``) of the samples
is quantised and relabelled to the target (or each to its next class, all-to-all, the reference's ``all2all``);
the next ``neg_ratio`` of the batch are the "contrastive" negative samples, which KEEP their labels: each gets
the quantisation residual ``Q(x_r) - x_r`` of another, random training image x_r added to it (clipped to
[0, 255]), so that only a true quantisation, not any similar perturbation, activates the backdoor. As in the
reference, a batch without poisoned samples gets no negatives either. The batch is then augmented as in the
reference's ``PostTensorTransform`` (that of WaNet): random crop (zero padding 5, p 0.8), random rotation (10
degrees, p 0.5), horizontal flip (p 0.5) where the dataset allows it, every coin, offset and angle drawn once per
batch (``random_crop_rotate_flip(..., same_on_batch=True)``). The test trigger is the quantisation (dithered
where ``dithering``). Nothing is learned besides the classifier: no state tensors, no prepared material.

``poison_train`` (the fixed poisoned set for data-side defenses): ``ratio * N`` quantised samples relabelled (the
mask) and ``neg_ratio * N`` other samples with a random training image's residual, keeping their labels; they
carry a trigger-like perturbation but not the attack's label, so they are NOT in the mask (the reference's saved
``bd_train`` marks them as poisoned, which would inflate the detection figures).

Defaults (BackdoorBench ``config/attack/bpp/default.yaml``): squeeze_num 8, dithering off, neg_ratio 0.1, crop 5,
rotation 10 (the authors' ``config.py``: the same, but injection and negative rates 0.2).

On the digits data at the smoke budget (cnn_small, 15 epochs at lr 0.05, ratio 0.1) the default 8 levels are
not learned (ASR 0.01, also without negatives) while 4 levels are (ASR 0.99 / 0.99 / 0.97 on seeds 0-2, C-Acc
0.97-0.98; 2 levels: 1.0): the upscaled 8 x 8 digits change too little under 8 levels for 15 epochs.

Departures, and why:
- The negative samples: the paper describes contrastive adversarial training with adversarial negative
  examples; both public codes (the authors' and BackdoorBench's) add another image's quantisation residual
  instead, which is what we do (BackdoorBench draws x_r from the whole training set, as we do; the authors draw
  from a precomputed list of residuals, the same thing).
- The classifier follows the case's ``TrainConfig`` (the project's one trainer). The reference uses MultiStepLR
  with milestones 100/200/300/400, i.e. a constant rate within the benchmark's 100 epochs.
- Per-batch counts (poisoned and negative) use stochastic rounding of ``ratio * batch`` (expected fraction
  exact); the reference truncates (``int(0.1 * 128) = 12``; it rounds up to one poisoned sample at random only
  below one per batch).
- The residual images are drawn with replacement (the reference: without, within one batch); negligible.
- Dithering: vectorised by waves (above), same arithmetic; the rotation samples bilinearly where torchvision's
  ``RandomRotation`` samples nearest-neighbour (as in wanet.py).
- The fixed poisoned set's mask leaves the negatives out (above).
"""
from __future__ import annotations

import torch

from backdoor._checks import ParameterError, check_int, check_number
from backdoor._registry import NONE, NOT_STATED, Param
from backdoor.attacks import register_attack
from backdoor.attacks._controllable import batch_poison_count, random_crop_rotate_flip, select_poison_and_cross
from backdoor.attacks.base import Attack, PoisonedSet
from backdoor.data import Dataset, Split
from backdoor.mutants import Mutant
from backdoor.training import TrainHooks


def squeeze(x: torch.Tensor, levels: int) -> torch.Tensor:
    """Float values on the 0..255 scale, each rounded to the nearest of ``levels`` evenly spaced levels (the
    reference's arithmetic: round(v / 255 * (levels - 1)) / (levels - 1) * 255)."""
    return torch.round(x / 255.0 * (levels - 1)) / (levels - 1) * 255


def _waves(height: int, width: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(rows, columns) of the pixels with x + 2y = t, for t = 0, 1, ...: pixels of one wave do not depend on
    each other in the Floyd-Steinberg scan, and every pixel a wave depends on lies in an earlier wave."""
    rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    wave = (cols + 2 * rows).flatten()
    rows, cols = rows.flatten(), cols.flatten()
    return [(rows[wave == t], cols[wave == t]) for t in range(int(wave.max()) + 1)]


def floyd_steinberg(x: torch.Tensor, levels: int) -> torch.Tensor:
    """Floyd-Steinberg dithering of float images [N, C, H, W] on the 0..255 scale to ``levels`` levels per channel;
    returns the level values (float32, unrounded), exactly as the reference's sequential scan of a float32 image.

    The image lives in a float32 buffer padded by one column on each side and one row below: an error diffused
    past the border lands in the padding and is dropped (the reference's bounds checks). Each wave's arithmetic is
    float64 (the reference's numba promotion) and stored back to float32. A receiving pixel gets its errors in the
    scan's order: down-right, down, then (in one wave) down-left before right."""
    n, c, h, w = x.shape
    buf = torch.zeros(n, c, h + 1, w + 2, dtype=torch.float32, device=x.device)
    buf[:, :, :h, 1:w + 1] = x
    for rows, cols in _waves(h, w):
        rows, cols = rows.to(x.device), (cols + 1).to(x.device)  # +1: the padding column on the left
        old = buf[:, :, rows, cols].double()
        new = squeeze(old, levels)
        err = old - new
        buf[:, :, rows, cols] = new.float()
        for dy, dx, weight in ((1, -1, 0.1875), (0, 1, 0.4375), (1, 0, 0.3125), (1, 1, 0.0625)):
            r, k = rows + dy, cols + dx
            buf[:, :, r, k] = (buf[:, :, r, k].double() + err * weight).float()
    return buf[:, :, :h, 1:w + 1]


@register_attack("bpp")
class Bpp(Attack):
    """BppAttack: colour-depth squeezing (optionally dithered) as trigger, with residual-perturbed negative samples
    that keep their labels (training controllable)."""

    kind = "training_controllable"
    title = "BppAttack"
    description = "colour depth squeezed to 8 levels per channel; negatives (0.1) carry another image's residual"
    order = 90
    parameters = {
        "squeeze_num": Param(NOT_STATED, "8", "levels per channel (3 bits), BackdoorBench's default.yaml and the "
                             "authors' config.py"),
        "dithering": Param(NOT_STATED, "False", "as the reference (Floyd-Steinberg error diffusion when on)"),
        "neg_ratio": Param(NOT_STATED, "0.1", "BackdoorBench's default.yaml (the authors' config.py: 0.2); the share "
                           "of every batch with another image's quantisation residual, keeping its label"),
        "crop_padding": Param(NONE, "5", "the reference's batch augmentation (PostTensorTransform, as WaNet's): every "
                              "coin, offset and angle drawn once per batch"),
        "p_crop": Param(NONE, "0.8", "as the reference"),
        "rotation": Param(NONE, "10 degrees (nearest-neighbour)", "as the reference, sampled bilinearly"),
        "p_rotation": Param(NONE, "0.5", "as the reference"),
    }
    # Each find starts with a newline and the line's indentation: it then matches the code line and not its
    # own text here, where the newline is an escape.
    mutants = (
        Mutant("levels-off-by-one", "squeeze_num + 1 levels instead of squeeze_num",
               "\n    return torch.round(x / 255.0 * (levels - 1)) / (levels - 1) * 255",
               "\n    return torch.round(x / 255.0 * levels) / levels * 255"),
        Mutant("no-error-diffusion", "dithering passes no error on: plain quantisation",
               "\n        err = old - new", "\n        err = (old - new) * 0"),
        Mutant("diffusion-weights-swapped", "down-left gets 1/16 and down-right 3/16 of the error",
               "\n        for dy, dx, weight in ((1, -1, 0.1875), (0, 1, 0.4375), (1, 0, 0.3125), (1, 1, 0.0625)):",
               "\n        for dy, dx, weight in ((1, -1, 0.0625), (0, 1, 0.4375), (1, 0, 0.3125), (1, 1, 0.1875)):"),
        Mutant("no-negatives", "no negative samples in the training batches",
               "\n        n_neg = min(n - n_bd, batch_poison_count(a.neg_ratio, n, self.g)) if n_bd else 0",
               "\n        n_neg = 0"),
        Mutant("negatives-relabelled", "the negative samples get the attack's label too",
               "\n        y[:n_bd] = a.relabel(y[:n_bd])", "\n        y[:n_bd + n_neg] = a.relabel(y[:n_bd + n_neg])"),
        Mutant("own-residual", "a negative sample gets its own residual: it is the poisoned image, with its label",
               "\n            source = self.train_x[pick].to(x.device).float().div(255)",
               "\n            source = x[n_bd:n_bd + n_neg]"),
        Mutant("negatives-in-mask", "the fixed set's mask also marks the negative samples",
               "\n        mask[index] = True", "\n        mask[index] = True\n        mask[neg] = True"),
        Mutant("hooks-do-nothing", "the training hooks are the trainer's no-ops: no batch is poisoned",
               "\n        return BppHooks(self, dataset, ratio, seed)", "\n        return TrainHooks()"),
    )

    def __init__(self, target: int | str = 0, squeeze_num: int = 8, dithering: bool = False, neg_ratio: float = 0.1,
                 crop_padding: int = 5, p_crop: float = 0.8, rotation: float = 10.0, p_rotation: float = 0.5,
                 **kwargs):
        super().__init__(target=target, **kwargs)
        check_int("bpp", "squeeze_num", squeeze_num, minimum=2)
        if squeeze_num > 256:
            raise ParameterError("bpp", "squeeze_num", squeeze_num, "an integer in [2, 256] (levels per channel)")
        if not isinstance(dithering, bool):
            raise ParameterError("bpp", "dithering", dithering, "true or false")
        check_number("bpp", "neg_ratio", neg_ratio, low=0, high=1, high_open=True)
        check_int("bpp", "crop_padding", crop_padding, minimum=0)
        check_number("bpp", "p_crop", p_crop, low=0, high=1)
        check_number("bpp", "rotation", rotation, low=0, high=180)
        check_number("bpp", "p_rotation", p_rotation, low=0, high=1)
        self.squeeze_num, self.dithering, self.neg_ratio = int(squeeze_num), dithering, float(neg_ratio)
        self.crop_padding, self.p_crop = int(crop_padding), float(p_crop)
        self.rotation, self.p_rotation = float(rotation), float(p_rotation)

    # -- the trigger -------------------------------------------------------------------------------------
    def quantise(self, x255: torch.Tensor) -> torch.Tensor:
        """The trigger on float images on the 0..255 scale with integer values; returns integer values."""
        if len(x255) == 0:
            return x255
        out = floyd_steinberg(x255, self.squeeze_num) if self.dithering else squeeze(x255, self.squeeze_num)
        return torch.round(out).clamp(0, 255).to(x255.dtype)

    def apply_trigger(self, x: torch.Tensor) -> torch.Tensor:
        return self.quantise(x.float()).to(torch.uint8)

    def trigger_float(self, x: torch.Tensor) -> torch.Tensor:
        """The trigger on float [0, 1] batches whose values are multiples of 1 / 255 (the trainer's): the very
        images ``apply_trigger`` makes, as floats."""
        return self.quantise(x.mul(255).round()).div(255)

    # -- poisoning -----------------------------------------------------------------------------------------
    def check_ratios(self, ratio: float) -> None:
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"bpp: poison ratio must be in [0, 1], got {ratio}")
        if ratio + self.neg_ratio > 1.0:
            raise ValueError(f"bpp: poison ratio {ratio} with neg_ratio {self.neg_ratio} needs "
                             f"{ratio + self.neg_ratio:.3f} of every batch; allowed: ratio + neg_ratio <= 1")

    def train_hooks(self, dataset: Dataset, ratio: float, seed: int) -> TrainHooks:
        self.check_ratios(ratio)
        return BppHooks(self, dataset, ratio, seed)

    def poison_train(self, train: Split, ratio: float, seed: int) -> PoisonedSet:
        """A fixed poisoned set: ``ratio * N`` quantised samples relabelled (the mask), and ``neg_ratio * N`` other
        samples plus a random training image's quantisation residual, keeping their labels (not in the mask)."""
        self.check_ratios(ratio)
        wanted = int(round(self.neg_ratio * len(train))) if self.poison_count(train, ratio) else 0
        index, neg, g = select_poison_and_cross(self, train, ratio, seed, n_cross=wanted)
        x, y = train.x.clone(), train.y.clone()
        if len(index):
            x[index] = self.apply_trigger(train.x[index])
            y[index] = self.relabel(y[index])
        if len(neg):
            source = train.x[torch.randint(len(train), (len(neg),), generator=g)]
            residual = self.apply_trigger(source).int() - source.int()
            x[neg] = (train.x[neg].int() + residual).clamp(0, 255).to(torch.uint8)
        mask = torch.zeros(len(train), dtype=torch.bool)
        mask[index] = True
        return PoisonedSet(x, y, mask, effective_ratio=len(index) / len(train))


class BppHooks(TrainHooks):
    """Per batch: quantise + relabel the first ``ratio`` share, add a random training image's residual to the next
    ``neg_ratio`` share (labels kept); then the reference's crop / rotation / flip, one draw for the whole batch."""

    def __init__(self, attack: Bpp, dataset: Dataset, ratio: float, seed: int):
        self.attack, self.ratio, self.seed = attack, float(ratio), int(seed)
        self.flip = bool(dataset.hflip)
        self.train_x = dataset.train.x  # uint8, where the negatives' residual images are drawn from
        self.g: torch.Generator | None = None
        self.g_pick: torch.Generator | None = None
        self.counts = {"poisoned": 0, "negative": 0, "seen": 0}

    def on_train_start(self, model, device, generator) -> None:
        self.g = torch.Generator(device=device).manual_seed(self.seed)
        self.g_pick = torch.Generator().manual_seed(self.seed + 1)  # CPU: indices into the CPU training set

    def transform_batch(self, x, y):
        a, n = self.attack, len(x)
        n_bd = batch_poison_count(self.ratio, n, self.g)
        n_neg = min(n - n_bd, batch_poison_count(a.neg_ratio, n, self.g)) if n_bd else 0
        x = x.clone()
        x[:n_bd] = a.trigger_float(x[:n_bd])
        if n_neg:
            pick = torch.randint(len(self.train_x), (n_neg,), generator=self.g_pick)
            source = self.train_x[pick].to(x.device).float().div(255)
            residual = a.trigger_float(source) - source
            x[n_bd:n_bd + n_neg] = (x[n_bd:n_bd + n_neg] + residual).clamp(0, 1)
        y = y.clone()
        y[:n_bd] = a.relabel(y[:n_bd])
        self.counts["poisoned"] += n_bd
        self.counts["negative"] += n_neg
        self.counts["seen"] += n
        return x, y

    def augment(self, x, default):
        a = self.attack
        return random_crop_rotate_flip(x, self.g, padding=a.crop_padding, p_crop=a.p_crop, degrees=a.rotation,
                                       p_rotate=a.p_rotation, flip=self.flip, same_on_batch=True)
