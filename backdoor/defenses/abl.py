"""ABL: Anti-Backdoor Learning (Li, Lyu, Koren, Lyu, Li, Ma, "Anti-Backdoor Learning: Training Clean Models on
Poisoned Data", NeurIPS 2021).

Data-side defense, three stages, all with the one trainer ``fit`` on a fresh model (``new_model``):

1. Isolation: train from scratch for ``isolation_epochs`` = 20 on the whole poisoned training set with the
   flooding loss ``|CE - gamma| + gamma`` (``gamma`` = 0.5, on the batch-mean CE). Its gradient is
   ``sign(CE - gamma) * grad CE``, the same as the paper's local gradient ascent ``sign(CE - gamma) * CE``:
   descent while the batch loss is above gamma, ascent below, so samples that are learned unusually fast
   (the backdoor) stand out with the lowest losses.
2. Split: the per-sample CE of every training sample (batched forward passes, eval mode, no augmentation);
   the ``isolation_ratio`` = 1% lowest-loss samples are isolated (``flagged``; ``scores`` = -loss, so a lower
   loss is more suspicious).
3. Fine-tune the isolation model on the remaining 99% for ``finetune_epochs`` = 60 (plain CE), then
   unlearn: gradient ascent (minimise -CE) on the isolated samples for ``unlearn_epochs`` = 20 at the
   constant learning rate ``unlearn_lr`` = 1e-4 (see below: what both reference codes run, not Table 2's 5e-4). The model is in train mode throughout, as in the original:
   during unlearning its batch-norm running statistics move towards those of the isolated samples, which on
   a small isolated set accounts for much of the effect (and of the clean-accuracy cost).

Budget: isolation and fine-tuning train a model on the poisoned set, so they use the attack's training budget
(``retraining``: optimiser, batch size, learning rate, schedule, augmentation), with the epoch counts above;
``lr`` overrides its learning rate (not the unlearning's). Unlearning uses the same optimiser settings with
``unlearn_lr`` and a constant schedule. Defaults are Table 2 of the BackdoorBench supplementary (CIFAR-10/100,
GTSRB; Tiny ImageNet used 40/120/4 epochs), except ``unlearn_lr``.

Departures, and why:
- The paper writes stage 3 as one objective (descent on the rest, ascent on the isolated set); its released
  code, and BackdoorBench, fine-tune first and then unlearn, which is what we do.
- The original BackdoorBench config trains both stages with batch 256, lr 0.01 (the paper's defense budget);
  we use the attack's budget (paper: batch 128, lr 0.01) because both stages are full training runs on the
  poisoned set, and at reduced budgets (smoke) the defense budget's few steps do not fit the data.
- Isolation trains without augmentation (crop and flip off), as the original BackdoorBench code does (its
  isolation loader uses the test transform); fine-tuning and unlearning use the budget's augmentation, also
  as the original.
- The original computes per-sample losses with batch size 1; here they come from batched forward passes in
  eval mode (same values, much faster).
- Unlearning lr 1e-4, not Table 2's 5e-4. Gradient ascent has no stopping point, so clean accuracy is kept
  only by how much ascent is done, and both reference codes do a fifth of what Table 2 states. BackdoorBench's
  unlearning code hard-codes lr 1e-4 for its 20 epochs although its config says 5e-4. The ABL authors' code
  (bboylyg/ABL, backdoor_unlearning.py) runs 5 unlearning epochs at 5e-4 of which the first only evaluates,
  i.e. 4 epochs, and keeps clean accuracy by that brevity (its demo log: C-Acc 82.8 -> 81.9 while the ASR
  falls from 99.98 to 0.48); nothing else in it guards clean accuracy (it evaluates the test sets each epoch
  and saves checkpoints, leaving the choice to the user). 20 x 1e-4 = 4 x 5e-4. Measured on the smoke grid
  (digits, 14 isolated samples, one step per epoch) at 5e-4: C-Acc fell to 0.09-0.10 (one class predicted,
  the target erased) on Blended, SIG and LC; per epoch on Blended, ASR 1.00 -> 0.12 by epoch 7 (C-Acc 0.81),
  then C-Acc 0.35 by epoch 10 and 0.09 by 20; on SIG, C-Acc fell first (0.67 at epoch 10) with the ASR still
  1.00, since the isolated samples are genuine target-class images. ``unlearn_lr: 5e-4`` gives Table 2's setting.
- The original's fine-tuning uses a step schedule (0.01 for 40 epochs, then 0.001); we use the budget's
  cosine schedule. No nesterov momentum (the one trainer's SGD).
- Ties in the loss are broken by sample index (stable sort).

What the unlearning can do is measured on real photographs (GTSRB, cnn_small, BadNets at 10%: the 251 isolated
samples are all poisoned; ``benchmarks/abl_unlearning.py``): from the fine-tuned model (C-Acc 0.958, ASR 0.939)
no learning rate gives a step where the ASR is low and C-Acc kept. After 40 epochs at 1e-4, 0.928 / 0.947; at
5e-4, 0.941 / 0.928; at 2e-3, 0.895 / 0.894 at epoch 20 and 0.061 / 0.000 at 30; with batch norm frozen in eval
mode the collapse only comes sooner. The ascent either leaves the backdoor or takes the model with it, so a
"no effect" or a "target erased" cell for ABL is the method's behaviour here, not an unlearning budget.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from backdoor._checks import ParameterError
from backdoor._registry import NONE, NOT_STATED, Param
from backdoor.defenses import register_defense
from backdoor.defenses._data_side import fresh_model, per_sample_loss, require_poisoned_train
from backdoor.defenses.base import BY_RETRAINING, Defense, DefenseInputs, DefenseOutcome, Stage
from backdoor.mutants import Mutant


def flooding_loss(gamma: float):
    """``|CE - gamma| + gamma`` on the batch-mean cross entropy (ABL's isolation objective)."""

    def loss_fn(model, x, y):
        ce = F.cross_entropy(model(x), y)
        return (ce - gamma).abs() + gamma

    return loss_fn


def ascent_loss(model, x, y):
    """Gradient ascent on the cross entropy (ABL's unlearning objective)."""
    return -F.cross_entropy(model(x), y)


def isolate_lowest(losses: torch.Tensor, ratio: float) -> torch.Tensor:
    """Boolean mask of the ``round(ratio * N)`` (at least one) lowest-loss samples; ties by index."""
    count = min(len(losses), max(1, int(round(ratio * len(losses)))))
    mask = torch.zeros(len(losses), dtype=torch.bool)
    mask[torch.sort(losses, stable=True).indices[:count]] = True
    return mask


@register_defense("abl")
class AntiBackdoorLearning(Defense):
    """ABL: isolate the lowest-loss 1% under a flooding loss, fine-tune on the rest, unlearn the isolated."""

    kind = "data_side"
    title = "ABL"
    description = ("20 epochs under a flooding loss (gamma 0.5), isolate the lowest-loss 1%, fine-tune 60 epochs, "
                   "unlearn the isolated 20 epochs (lr 1e-4, what both reference codes run; Table 2: 5e-4)")
    order = 80
    parameters = {
        "isolation_epochs": Param("20", NOT_STATED, "Table 2 (E_tu)"),
        "isolation_ratio": Param("0.01", NOT_STATED, "Table 2 (p_i)"),
        "gamma": Param("0.5", NOT_STATED, "Table 2 (flooding)"),
        "finetune_epochs": Param("60", NOT_STATED, "Table 2 (E_ft)"),
        "unlearn_epochs": Param("20", NOT_STATED, "Table 2 (E_u); the ABL authors' code unlearns 5 epochs (the first "
                                "evaluation only) at batch 64"),
        "unlearn_lr": Param("0.0005", "1e-4 for 20 epochs (hard-coded; its config says 5e-4)", "what both reference "
                            "codes run: the ABL authors' code does 4 epochs at 5e-4, and 20 x 1e-4 = 4 x 5e-4; at 5e-4 "
                            "for 20 epochs the smoke grid lost its clean accuracy. `unlearn_lr: 5e-4` is Table 2's",
                            argued=1e-4),
        "lr": Param(NONE, "batch 256, lr 0.01 (the defense budget); fine-tune 0.01, 0.001 after 40 epochs",
                    f"None: {BY_RETRAINING}: both stages are full training runs on the poisoned set"),
    }
    budgets = (
        Stage("isolation (flooding loss, no augmentation)", "retraining", "`isolation_epochs`, `lr`"),
        Stage("fine-tune on the rest", "retraining", "`finetune_epochs`, `lr`"),
        Stage("unlearning (gradient ascent, constant schedule)", "retraining", "`unlearn_epochs`, `unlearn_lr`"),
    )
    # Each find starts with a newline and the line's indentation: it then matches the code line and not its
    # own text here, where the newline is an escape.
    mutants = (
        Mutant("no-unlearning", "skips the unlearning stage",
               "\n        if self.unlearn_epochs:", "\n        if False:"),
        Mutant("isolates-highest", "isolates the highest-loss samples instead of the lowest",
               "\n    mask[torch.sort(losses, stable=True).indices[:count]] = True",
               "\n    mask[torch.sort(losses, descending=True, stable=True).indices[:count]] = True"),
        Mutant("no-flooding", "isolation trains on plain cross entropy (no ascent below gamma)",
               "\n        return (ce - gamma).abs() + gamma", "\n        return ce"),
    )

    def __init__(self, isolation_epochs: int = 20, isolation_ratio: float = 0.01, gamma: float = 0.5,
                 finetune_epochs: int = 60, unlearn_epochs: int = 20, unlearn_lr: float = 1e-4,
                 lr: float | None = None):
        if not isinstance(isolation_epochs, int) or isolation_epochs < 1:
            raise ParameterError("abl", "isolation_epochs", isolation_epochs, "an integer >= 1")
        for name, value in (("finetune_epochs", finetune_epochs), ("unlearn_epochs", unlearn_epochs)):
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"abl: {name} must be an integer >= 0, got {value!r}")
        if not 0.0 < isolation_ratio < 1.0:
            raise ParameterError("abl", "isolation_ratio", isolation_ratio, "a value in (0, 1)")
        if gamma < 0:
            raise ValueError(f"abl: gamma (flooding level) must be >= 0, got {gamma}")
        if unlearn_lr <= 0:
            raise ParameterError("abl", "unlearn_lr", unlearn_lr, "a value > 0")
        if lr is not None and lr <= 0:
            raise ParameterError("abl", "lr", lr, "a value > 0 (or None for the defense budget's)")
        self.isolation_epochs, self.isolation_ratio, self.gamma = isolation_epochs, isolation_ratio, gamma
        self.finetune_epochs, self.unlearn_epochs, self.unlearn_lr, self.lr = (
            finetune_epochs, unlearn_epochs, unlearn_lr, lr)

    def isolate(self, inputs: DefenseInputs) -> tuple[nn.Module, torch.Tensor, torch.Tensor, dict]:
        """The isolation stage: (the model trained under the flooding loss, the isolated mask, the per-sample
        losses, info); the ABL detector runs it alone."""
        data = require_poisoned_train(inputs, "abl")
        model = fresh_model(inputs, inputs.seed)  # ABL trains a model from scratch on the poisoned set
        isolation = inputs.retraining.with_(lr=self.lr, epochs=self.isolation_epochs, crop_padding=0, hflip=False)
        iso_history = inputs.fit(model, data, isolation, seed=inputs.seed, loss_fn=flooding_loss(self.gamma),
                                 desc="abl isolation")
        losses = per_sample_loss(model, data, device=inputs.device)
        flagged = isolate_lowest(losses, self.isolation_ratio)
        info = {"isolated": int(flagged.sum()), "isolation_final_loss": iso_history["epochs"][-1]["loss"],
                "isolated_max_loss": float(losses[flagged].max()), "median_loss": float(losses.median())}
        return model, flagged, losses, info

    def run(self, inputs: DefenseInputs) -> DefenseOutcome:
        data = require_poisoned_train(inputs, "abl")
        budget = inputs.retraining.with_(lr=self.lr)
        model, flagged, losses, info = self.isolate(inputs)
        if self.finetune_epochs:
            history = inputs.fit(model, data.subset(torch.nonzero(~flagged).flatten()),
                                 budget.with_(epochs=self.finetune_epochs), seed=inputs.seed + 1,
                                 desc="abl finetune")
            info["finetune_final_loss"] = history["epochs"][-1]["loss"]
        if self.unlearn_epochs:
            unlearn = budget.with_(epochs=self.unlearn_epochs, lr=self.unlearn_lr, schedule="constant")
            history = inputs.fit(model, data.subset(torch.nonzero(flagged).flatten()), unlearn,
                                 seed=inputs.seed + 2, loss_fn=ascent_loss, desc="abl unlearn")
            info["unlearn_final_ce"] = -history["epochs"][-1]["loss"]
        return DefenseOutcome(model=model, flagged=flagged, scores=-losses, info=info)
