"""Adap-Blend (Qi, Xie, Li, Mahloujifar & Mittal, "Revisiting the Assumption of Latent Separability for
Backdoor Defenses", ICLR 2023).

Dirty label, with conservatism. The blend trigger t is cut into ``pieces`` pieces on a square grid (16: a
4 x 4 grid). In the training set:
- poison samples (the grid's poison ratio: ``ratio * N``, rounded) carry a PARTIAL trigger, a random
  ``1 - mask_rate`` of the pieces (8 of 16), blended at ``alpha`` (0.15): x' = x + alpha * m * (t - x), m the
  pixel mask of the kept pieces; they are relabelled to the target. They, and only they, are the poison mask;
- cover samples (``cover_ratio * N``, rounded, other samples than the poison ones) carry a partial trigger
  drawn the same way but KEEP their true label: they regularise the backdoor so that only (most of) the
  whole trigger activates it, which keeps the poison samples' latent representations near the clean ones
  (what defeats latent-separation defenses). They are not in the mask (they carry no attack label). Their
  indices are ``attack.cover_index`` after ``poison_train`` (sorted, in the training set), and
  ``poison_train`` also records ``attack.pieces_kept`` (bool [poison + cover, pieces]: the pieces each of
  the poison samples, then each of the cover samples, carries, both in index order).
(Both are set by ``poison_train`` itself, not when the harness loads the poisoned set from its cache;
``poison_train`` with the same training set, ratio and seed recomputes them exactly.)
At test time the WHOLE trigger is blended at ``test_alpha`` (0.2).

Piece masks are drawn for all selected samples at once (one tensor) from the poison seed; the pattern is
Blended's (``blend_pattern``): seeded uniform noise by default, or any image file.

Defaults are backdoor-toolbox's (vtu81/backdoor-toolbox, the authors' toolbox: ``adaptive_blend.py`` and
its README commands for CIFAR-10 / GTSRB: poison rate 0.003, cover rate 0.003, alpha 0.15, test alpha 0.2,
16 pieces, mask rate 0.5). The grid's poison ratio is the poison rate; ``cover_ratio`` is in units of the
training set, as the toolbox's cover rate.

All-to-all: neither the paper nor the toolbox evaluates it (the toolbox takes one target class). The
relabelling is a plain dirty-label one, so all-to-all is supported the usual way (poison samples go to
(y + 1) mod K; cover samples keep their labels).

On the embedded digits at the smoke budget (cnn_small, 15 epochs, ratio 0.1, seed 0) the defaults reach
ASR 1.00 at C-Acc 0.98.

Departures, and why:
- Trigger: the toolbox blends the Hello Kitty image, which we cannot ship; Blended's seeded noise pattern by
  default (``pattern``/``pattern_seed``, as Blended; any image path is accepted).
- Counts: ``round(rate * N)`` for both poison and cover samples (every attack here rounds); the toolbox
  truncates (``int(N * rate)``).
- Pieces: the toolbox requires the grid side to divide the image side; here the bands of a side that does
  not divide it differ by one pixel (``_adaptive.piece_index``), so any size works.
- Rounding: the blend is rounded to the nearest grey level (as Blended; the toolbox keeps floats).
- Randomness: the toolbox draws each sample's pieces with Python's ``random`` in a per-image loop; here one
  seeded torch draw for all of them (the same distribution: a uniform subset of ``round(mask_rate * pieces)``
  hidden pieces per sample).
"""
from __future__ import annotations

from pathlib import Path

import torch

from backdoor._checks import ParameterError, check_number
from backdoor._registry import NONE, NOT_STATED, Param
from backdoor.attacks import register_attack
from backdoor.attacks._adaptive import blend, grid_side, keep_pieces, piece_index, select_poison_and_cover
from backdoor.attacks.base import Attack, PoisonedSet
from backdoor.attacks.blended import blend_pattern
from backdoor.data import Split
from backdoor.mutants import Mutant


@register_attack("adap_blend")
class AdapBlend(Attack):
    """Adap-Blend: half of a 16-piece blend trigger at alpha 0.15 on poison and (label-keeping) cover
    samples; the whole trigger at 0.2 at test time."""

    kind = "dirty_label"
    title = "Adap-Blend"
    description = ("blend trigger cut in 16 pieces: poison and label-keeping cover samples (0.003 each) get a "
                   "random half at alpha 0.15; test: the whole trigger at 0.2")
    order = 160
    parameters = {
        "alpha": Param(NOT_STATED, "toolbox: 0.15 (-alpha)", "the toolbox's training blend ratio; rounded to the nearest "
                       "grey level"),
        "test_alpha": Param(NOT_STATED, "toolbox: 0.2 (-test_alpha)", "as the toolbox: the whole trigger, blended more "
                            "strongly than in training"),
        "pieces": Param(NOT_STATED, "toolbox: 16", "as the toolbox; any perfect square (bands differ by a pixel where "
                        "the grid side does not divide the image)"),
        "mask_rate": Param(NOT_STATED, "toolbox: 0.5", "share of the pieces hidden on each poison / cover sample "
                           "(round(mask_rate * pieces))"),
        "cover_ratio": Param(NOT_STATED, "toolbox: 0.003 (-cover_rate, CIFAR-10 and GTSRB)", "label-keeping cover samples, "
                             "in units of the training set; not in the poison mask"),
        "pattern": Param("hello kitty", "toolbox: hellokitty_32.png", "the cartoon cannot be shipped: Blended's seeded "
                         "noise by default; any image path is accepted"),
        "pattern_seed": Param(NONE, NONE, "seed of the noise pattern"),
    }
    # Each find starts with a newline and the line's indentation: it then matches the code line and not its
    # own text here, where the newline is an escape.
    mutants = (
        Mutant("train-at-test-alpha", "poison and cover samples are blended at the test alpha (0.2), not 0.15",
               "\n        weight = self.alpha * keep[:, piece_index(h, w, self.side)].float()",
               "\n        weight = self.test_alpha * keep[:, piece_index(h, w, self.side)].float()"),
        Mutant("whole-trigger-in-training", "every poison / cover sample carries every piece",
               "\n        self.kept = pieces - int(round(mask_rate * pieces))",
               "\n        self.kept = pieces"),
        Mutant("no-cover", "no cover samples: only relabelled poison samples carry the trigger",
               "\n        n_cover = int(round(self.cover_ratio * n))",
               "\n        n_cover = 0"),
        Mutant("cover-relabelled", "cover samples are relabelled too (they become poison samples)",
               "\n            y[poison] = self.relabel(y[poison])",
               "\n            y[chosen] = self.relabel(y[chosen])"),
        Mutant("cover-in-mask", "the mask marks the cover samples too",
               "\n        mask[poison] = True",
               "\n        mask[chosen] = True"),
        Mutant("test-at-train-alpha", "the test trigger is blended at the training alpha (0.15)",
               "\n        return blend(x, self.trigger(tuple(x.shape[1:])), self.test_alpha)",
               "\n        return blend(x, self.trigger(tuple(x.shape[1:])), self.alpha)"),
    )

    def __init__(self, target: int | str = 0, alpha: float = 0.15, test_alpha: float = 0.2, pieces: int = 16,
                 mask_rate: float = 0.5, cover_ratio: float = 0.003, pattern: str = "noise", pattern_seed: int = 0,
                 **kwargs):
        super().__init__(target=target, **kwargs)
        check_number("adap_blend", "alpha", alpha, low=0, high=1, low_open=True)
        check_number("adap_blend", "test_alpha", test_alpha, low=0, high=1, low_open=True)
        check_number("adap_blend", "mask_rate", mask_rate, low=0, high=1, high_open=True)
        check_number("adap_blend", "cover_ratio", cover_ratio, low=0, high=1)
        self.side = grid_side("adap_blend", pieces)
        if pattern != "noise" and not Path(pattern).expanduser().is_file():
            raise ParameterError("adap_blend", "pattern", pattern, "'noise' or the path of an existing image file")
        self.alpha, self.test_alpha, self.pieces, self.mask_rate = alpha, test_alpha, pieces, mask_rate
        self.cover_ratio, self.pattern, self.pattern_seed = cover_ratio, pattern, pattern_seed
        self.kept = pieces - int(round(mask_rate * pieces))
        self.cover_index: torch.Tensor | None = None  # set by poison_train
        self.pieces_kept: torch.Tensor | None = None  # set by poison_train

    def check_image_shape(self, shape: tuple[int, int, int]) -> None:
        if self.side > min(shape[1:]):
            raise ParameterError("adap_blend", "pieces", self.pieces, f"at most {min(shape[1:]) ** 2} on images "
                                 f"of {shape[1]} x {shape[2]} (every piece at least one pixel)")

    def trigger(self, shape: tuple[int, int, int]) -> torch.Tensor:
        return blend_pattern(self.pattern, self.pattern_seed, shape)

    def apply_trigger(self, x: torch.Tensor) -> torch.Tensor:
        """The test trigger: the whole pattern blended at ``test_alpha``."""
        return blend(x, self.trigger(tuple(x.shape[1:])), self.test_alpha)

    def poison_train(self, train: Split, ratio: float, seed: int) -> PoisonedSet:
        n, (h, w) = len(train), train.x.shape[-2:]
        n_poison = self.poison_count(train, ratio)
        n_cover = int(round(self.cover_ratio * n))
        poison, cover = select_poison_and_cover(n, n_poison, n_cover, seed)
        chosen = torch.cat([poison, cover])
        keep = keep_pieces(len(chosen), self.pieces, self.kept, torch.Generator().manual_seed(seed + 1))
        weight = self.alpha * keep[:, piece_index(h, w, self.side)].float()
        x, y = train.x.clone(), train.y.clone()
        if len(chosen):
            x[chosen] = blend(train.x[chosen], self.trigger(tuple(train.x.shape[1:])), weight[:, None])
        if len(poison):
            y[poison] = self.relabel(y[poison])
        mask = torch.zeros(n, dtype=torch.bool)
        mask[poison] = True
        self.cover_index, self.pieces_kept = cover, keep
        return PoisonedSet(x, y, mask, effective_ratio=n_poison / n)
