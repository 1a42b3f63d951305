"""Blind (Bagdasaryan & Shmatikov, "Blind Backdoors in Deep Learning Models", USENIX Security 2021).

Training controllable: the attack is code in the loss computation and poisons no stored data. For every
training batch, after the trainer's augmentation, the attack code makes a backdoored copy of the batch: the
first ``round(poisoning_proportion * B)`` samples of the copy get the trigger and the target label (all of
them by default), the rest keep image and label. The step's loss is

    normal_scale * CE(model(clean batch), y)  +  backdoor_scale * CE(model(backdoored copy), y_copy)

with two forward passes, as the reference computes them. ``loss_balance: fixed`` (the reference's default
config) uses the fixed scales 1.0 / 0.9; ``loss_balance: mgda`` (the paper's choice) computes both losses'
gradients over the model's trainable parameters, divides each by its normaliser (``mgda_normalize``:
``loss+`` = min(loss * ||g||, 10), ``loss`` = min(loss, 10), ``l2`` = ||g||, ``none`` = 1; plus 1e-5), and
takes the two-task min-norm point of the normalised gradients in closed form (Sener & Koltun's
multiple-gradient descent for two tasks: gamma = (g_n.g_n - g_b.g_n) / |g_b - g_n|^2, or 0.999 / 0.001 when
one gradient's projection dominates): scales gamma (backdoor) and 1 - gamma (normal), applied to the raw
losses. The backdoor term is only added once training is stable: while fewer than ``history_len`` batches
have been seen, or while the mean clean loss of the last ``history_len`` batches is >= ``loss_threshold``,
the step's loss is the clean loss alone (the reference's ``loss_threshold`` / ``batch_history_len``; the
current batch's loss joins the history after the check, as there). ``history_len: 0`` attacks from the first
batch. The hooks replace the batch's loss through ``TrainHooks.loss``.

The trigger (the reference's pixel pattern, applied on every channel): a 5 x 3 pattern whose top-left pixel
is at (``row``, ``col``) = (3, 23), rows
    255   0 255
      .  255  .
      .   .   0
      .  255  .
    255   0 255
where "." leaves the image's pixel as it is (the reference's masked value -10). The same pattern is the
test-time trigger (the reference's test transform and its training-time synthesizer both paint it).

Target: all-to-one. All-to-all is refused: the reference's attack code fills the copy's labels with the one
backdoor label (``synthesize_labels``), so there is no all-to-all training in it to follow.

The grid's poison ratio and the fixed poisoned set: Blind changes no stored sample, and the reference
ignores ``pratio`` (commented out in its config; ``poisoning_proportion`` 1.1, i.e. the whole copy, with
the remark that it is "not useful in common poison"). So the ratio does not change training here either.
Data-side defenses (AC, Spectral, ABL, DBD) are scored against ``poison_train``: ``ratio * N`` samples
drawn as any attack's, stamped with the pattern and relabelled to the target (the mask marks exactly
these), as WaNet's fixed set does. That set stands in for what the attack code shows the model in every
batch; the backdoored model itself is trained on clean stored data through the hooks.

Departures, and why:
- The classifier follows the case's ``TrainConfig`` (the project's one trainer); BackdoorBench runs blind
  with its own optimiser settings (and ``cifar10_mgda.yaml``: batch 64, lr 0.1, 200 epochs).
- The warm-up window is the last ``history_len`` clean losses; the reference keeps the last 1000 whatever
  ``batch_history_len`` is (the same at the default 1000).
- The pattern may touch the image's last row / column (``check_image_shape``); the reference refuses a
  pattern that ends exactly at the border (its ``>=`` check).
- ``poisoning_proportion`` is at most 1 (the whole copy); the reference's 1.1 means the same.
- The warm-up's clean loss is read back to the host once per batch (``float``), as the reference's
  ``loss.item()``: one device sync per step on a GPU.
- ``train_hooks``'s seed is unused: nothing in the attack code is random (the copy is the batch itself).
- The reference's other loss tasks (Neural Cleanse / SentiNet evasion, masks) and its dynamic pattern
  position are not implemented: BackdoorBench's blind runs with the tasks ``backdoor`` and ``normal`` only
  and a fixed position.

Smoke budget (digits, cnn_small, 15 epochs of 12 batches = 180 steps): the reference's ``history_len`` 1000
outlasts the whole training, so the backdoor loss would never start; ``history_len: 12`` (one epoch here,
where the reference's 1000 batches are 2.6 of 100 CIFAR-10 epochs) gives C-Acc 0.939, ASR 1.000, R-Acc 0.000
(seed 0, ratio 0.1). The training loss swings while the clean loss hovers about the threshold (the gate
opens and closes batch by batch, as in the reference) and settles by epoch 10.
"""
from __future__ import annotations

import math
from collections import deque

import torch

from backdoor._checks import ParameterError, check_int, check_number
from backdoor._registry import NONE, NOT_STATED, Param
from backdoor.attacks import register_attack
from backdoor.attacks.base import Attack
from backdoor.data import Dataset
from backdoor.mutants import Mutant
from backdoor.training import TrainHooks

# The reference's pattern in pixel values; -1 marks a pixel the trigger leaves alone.
PATTERN = torch.tensor([
    [255, 0, 255],
    [-1, 255, -1],
    [-1, -1, 0],
    [-1, 255, -1],
    [255, 0, 255],
])
BALANCES = ("fixed", "mgda")
NORMALISERS = ("loss+", "loss", "l2", "none")


def pattern_values() -> torch.Tensor:
    """uint8 [5, 3]: the pattern's values (0 where the pattern leaves the pixel alone)."""
    return PATTERN.clamp(min=0).to(torch.uint8)


def pattern_mask() -> torch.Tensor:
    """bool [5, 3]: True where the pattern paints the pixel."""
    return PATTERN >= 0


def stamp(x: torch.Tensor, row: int, col: int) -> torch.Tensor:
    """The pattern on a batch [N, C, H, W], uint8 (values 0 / 255) or float [0, 1] (values 0 / 1)."""
    values = pattern_values().to(x.device)
    values = values if x.dtype == torch.uint8 else values.to(x.dtype) / 255
    mask = pattern_mask().to(x.device)
    h, w = PATTERN.shape
    out = x.clone()
    region = out[..., row:row + h, col:col + w]
    out[..., row:row + h, col:col + w] = torch.where(mask, values, region)
    return out


def gradient_normaliser(grad: torch.Tensor, loss: torch.Tensor, kind: str) -> float:
    """The reference's ``gradient_normalizers`` for one task's flattened gradient."""
    if kind == "l2":
        return float(grad.norm())
    if kind == "loss":
        return min(float(loss), 10.0)
    if kind == "loss+":
        return min(float(loss) * float(grad.norm()), 10.0)
    return 1.0


def min_norm_two(v11: float, v12: float, v22: float) -> float:
    """gamma minimising |gamma v1 + (1 - gamma) v2|^2 over [0.001, 0.999] (the two-task MGDA step)."""
    if v12 >= v11:
        return 0.999
    if v12 >= v22:
        return 0.001
    return (v22 - v12) / (v11 + v22 - 2 * v12)


def mgda_scales(model: torch.nn.Module, backdoor: torch.Tensor, normal: torch.Tensor, normalize: str) -> tuple[float, float]:
    """(backdoor scale, normal scale) from the min-norm point of the two losses' normalised gradients."""
    params = [p for p in model.parameters() if p.requires_grad]
    flat = []
    for loss in (backdoor, normal):
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        g = torch.cat([(torch.zeros_like(p) if gi is None else gi).detach().float().flatten()
                       for gi, p in zip(grads, params)])
        flat.append(g / (gradient_normaliser(g, loss.detach(), normalize) + 1e-5))
    gb, gn = flat
    gamma = min_norm_two(float(gb @ gb), float(gb @ gn), float(gn @ gn))
    return gamma, 1.0 - gamma


@register_attack("blind")
class Blind(Attack):
    """Blind: the loss computation adds a backdoored copy of every batch (fixed scales 1.0 / 0.9, or MGDA)."""

    kind = "training_controllable"
    title = "Blind"
    description = ("attack code in the loss: 1.0 x clean loss + 0.9 x loss of a pattern-stamped, relabelled copy "
                   "of every batch, once the clean loss is stable")
    order = 110
    parameters = {
        "loss_balance": Param("MGDA", "fixed", "the reference's default config (its cifar10_mgda.yaml: MGDA); "
                              "`mgda` is implemented for the two tasks"),
        "normal_scale": Param(NONE, "1.0", "as the reference (fixed balance)"),
        "backdoor_scale": Param(NONE, "0.9", "as the reference (fixed balance)"),
        "mgda_normalize": Param(NOT_STATED, "loss+", "as the reference (MGDA balance)"),
        "loss_threshold": Param(NOT_STATED, "1.0", "as the reference: the backdoor loss starts once the mean clean "
                                "loss is below it"),
        "history_len": Param(NOT_STATED, "1000", "as the reference (batches of clean loss averaged); 0 attacks from "
                             "the first batch"),
        "poisoning_proportion": Param(NOT_STATED, "1.1 (the whole copy)", "1.0: the whole copy carries the trigger"),
        "row": Param(NOT_STATED, "3", "as the reference (x_top: the pattern's first row)"),
        "col": Param(NOT_STATED, "23", "as the reference (y_top: the pattern's first column)"),
    }
    # Each find starts with a newline and the line's indentation: it then matches the code line and not its
    # own text here, where the newline is an escape.
    mutants = (
        Mutant("no-backdoor-loss", "the backdoored copy's loss is weighted 0",
               "\n        return s_normal * normal + s_backdoor * backdoor",
               "\n        return s_normal * normal + 0 * backdoor"),
        Mutant("copy-keeps-labels", "the backdoored copy keeps the true labels",
               "\n        yb[:n] = self.relabel(y[:n])", "\n        yb[:n] = y[:n]"),
        Mutant("unmasked-pattern", "the whole 5 x 3 block is painted (the pattern's holes become black)",
               "\n    out[..., row:row + h, col:col + w] = torch.where(mask, values, region)",
               "\n    out[..., row:row + h, col:col + w] = torch.where(mask | True, values, region)"),
        Mutant("scales-swapped", "the fixed scales are swapped (0.9 clean, 1.0 backdoor)",
               "\n            s_backdoor, s_normal = a.backdoor_scale, a.normal_scale",
               "\n            s_backdoor, s_normal = a.normal_scale, a.backdoor_scale"),
        Mutant("never-stable", "the warm-up never ends: the backdoor loss is never added",
               "\n        return len(self.history) >= a.history_len and mean < a.loss_threshold",
               "\n        return False"),
        Mutant("mgda-gamma-flipped", "MGDA's min-norm weight goes to the wrong task",
               "\n    return (v22 - v12) / (v11 + v22 - 2 * v12)",
               "\n    return (v11 - v12) / (v11 + v22 - 2 * v12)"),
    )

    def __init__(self, target: int | str = 0, loss_balance: str = "fixed", normal_scale: float = 1.0,
                 backdoor_scale: float = 0.9, mgda_normalize: str = "loss+", loss_threshold: float = 1.0,
                 history_len: int = 1000, poisoning_proportion: float = 1.0, row: int = 3, col: int = 23, **kwargs):
        super().__init__(target=target, **kwargs)
        if self.all_to_all:
            raise ParameterError("blind", "target", target, "a class index: the reference's attack code gives the "
                                 "backdoored copy one backdoor label, so it has no all-to-all training")
        if loss_balance not in BALANCES:
            raise ParameterError("blind", "loss_balance", loss_balance, f"one of {list(BALANCES)}")
        if mgda_normalize not in NORMALISERS:
            raise ParameterError("blind", "mgda_normalize", mgda_normalize, f"one of {list(NORMALISERS)}")
        check_number("blind", "normal_scale", normal_scale, low=0)
        check_number("blind", "backdoor_scale", backdoor_scale, low=0, low_open=True)
        check_number("blind", "loss_threshold", loss_threshold, low=0, low_open=True)
        check_int("blind", "history_len", history_len, minimum=0)
        check_number("blind", "poisoning_proportion", poisoning_proportion, low=0, high=1, low_open=True)
        check_int("blind", "row", row, minimum=0)
        check_int("blind", "col", col, minimum=0)
        self.loss_balance, self.mgda_normalize = loss_balance, mgda_normalize
        self.normal_scale, self.backdoor_scale = float(normal_scale), float(backdoor_scale)
        self.loss_threshold = float(loss_threshold)
        self.history_len, self.poisoning_proportion = int(history_len), float(poisoning_proportion)
        self.row, self.col = int(row), int(col)

    def check_image_shape(self, shape: tuple[int, int, int]) -> None:
        height, width = shape[-2:]
        h, w = PATTERN.shape
        if self.row + h > height:
            raise ParameterError("blind", "row", self.row, f"an integer in [0, {height - h}] for {height}x{width} "
                                 f"images (the pattern is {h} rows tall)")
        if self.col + w > width:
            raise ParameterError("blind", "col", self.col, f"an integer in [0, {width - w}] for {height}x{width} "
                                 f"images (the pattern is {w} columns wide)")

    def apply_trigger(self, x: torch.Tensor) -> torch.Tensor:
        self.check_image_shape(tuple(x.shape[1:]))
        return stamp(x, self.row, self.col)

    def backdoor_copy(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The backdoored copy of a float batch: its first round(poisoning_proportion * B) samples stamped and
        relabelled to the target, the rest as they are."""
        n = min(len(x), int(round(self.poisoning_proportion * len(x))))
        xb = x.clone()
        xb[:n] = stamp(x[:n], self.row, self.col)
        yb = y.clone()
        yb[:n] = self.relabel(y[:n])
        return xb, yb

    def train_hooks(self, dataset: Dataset, ratio: float, seed: int) -> TrainHooks:
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"blind: poison ratio must be in [0, 1], got {ratio}")
        self.check_image_shape(tuple(dataset.image_shape))
        return BlindHooks(self)


class BlindHooks(TrainHooks):
    """The attack code: the batch's loss is the clean loss plus, once training is stable, the scaled loss of
    the backdoored copy."""

    def __init__(self, attack: Blind):
        self.attack = attack
        self.history: deque[float] = deque(maxlen=attack.history_len)
        self.scales: dict[str, float] = {}  # the last step's scales
        self.counts = {"batches": 0, "attacked": 0}

    def on_train_start(self, model, device, generator) -> None:
        self.history.clear()

    def stable(self) -> bool:
        """Whether the backdoor loss is added to this batch's (before its own clean loss joins the history)."""
        a = self.attack
        if a.history_len == 0:
            return True
        mean = sum(self.history) / len(self.history) if self.history else math.inf
        return len(self.history) >= a.history_len and mean < a.loss_threshold

    def loss(self, model, x, y, loss_fn):
        a = self.attack
        normal = loss_fn(model, x, y)
        attack = self.stable()
        self.history.append(float(normal.detach()))
        self.counts["batches"] += 1
        if not attack:
            self.scales = {"normal": 1.0}
            return normal
        xb, yb = a.backdoor_copy(x, y)
        backdoor = loss_fn(model, xb, yb)
        if a.loss_balance == "mgda":
            s_backdoor, s_normal = mgda_scales(model, backdoor, normal, a.mgda_normalize)
        else:
            s_backdoor, s_normal = a.backdoor_scale, a.normal_scale
        self.scales = {"normal": s_normal, "backdoor": s_backdoor}
        self.counts["attacked"] += 1
        return s_normal * normal + s_backdoor * backdoor

