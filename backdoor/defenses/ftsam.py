"""FT-SAM: fine-tuning with sharpness-aware minimization (Mingli Zhu, Shaokui Wei, Li Shen, Yanbo Fan and
Baoyuan Wu, "Enhancing Fine-Tuning Based Backdoor Defense with Sharpness-Aware Minimization", ICCV 2023).

The paper observes that vanilla fine-tuning barely moves backdoor-related neurons, which tend to have larger
weight norms, and fine-tunes the backdoored model on the defender's clean subset with sharpness-aware
minimization instead, which shrinks those norms. Every step, on one clean batch:

1. g = the gradient of the label-smoothed cross-entropy at the weights w;
2. the weights move uphill to w + e, with (the adaptive form, ASAM; T = |w| element-wise, one norm over all
   trained parameters) e = rho * T^2 g / ||T g||, so that ||e / T|| = rho; with ``adaptive=False`` plain SAM's
   e = rho * g / ||g||, so that ||e|| = rho;
3. g' = the gradient of the same loss on the same batch at w + e (batch-norm running statistics are not
   updated by this second pass);
4. the weights are restored to w and the base optimizer (SGD with the budget's momentum and weight decay)
   steps with g'.

Defaults: ``rho`` 2.0, ``adaptive`` True and ``label_smoothing`` 0.1, BackdoorBench's CIFAR-10 config
(config/defense/ft-sam/cifar10.yaml: rho_max = rho_min = 2.0, label_smoothing 0.1; ``--adaptive`` is a
``store_false`` flag in defense/ft-sam.py, so the reference runs the adaptive form). The paper gives
BackdoorBench as its code. The training budget (epochs, lr, batch, momentum, weight decay, cosine schedule,
crop/flip) is the matrix's ``defense_training``, the same as FT's: the reference's config (SGD lr 0.01, momentum
0.9, wd 5e-4, batch 256, cosine, 100 epochs on a 5% clean subset) matches it; ``epochs`` and ``lr`` override it.
Label smoothing puts 1 - eps on the label and eps / (K - 1) on each of the K - 1 other classes, as the
reference's ``smooth_crossentropy``.

The step runs inside the one trainer (``training.fit``'s ``step``), so batching, augmentation, autocast and
the divergence check are the trainer's; each step costs two forward and backward passes.

Departures, and why:
- Learning-rate schedule: the reference steps its CosineAnnealingLR (T_max = 100) after every batch, so the
  rate falls to 0 within 100 batches and then rises and falls again with a period of 200 batches (about 20
  epochs at 10 batches per epoch on CIFAR-10's 5%). Here it anneals per epoch over the budget, as in FT and
  every other stage trained by ``fit``: that looks like the schedule the config names.
- Per-dataset radius: the reference's GTSRB and Tiny ImageNet configs use rho 8.0 with no label smoothing;
  one default cannot follow the dataset, so the CIFAR-10 values are the defaults and a matrix sets
  ``rho: 8.0, label_smoothing: 0.0`` for those datasets.
- The loss is the cross-entropy against the smoothed labels, where the reference's is the KL divergence to
  them: they differ by the smoothed labels' entropy, a constant, so the gradients (and the training) are the
  same; only the logged loss differs. ``label_smoothing`` is limited to [0, 0.5] so that the label keeps the
  largest share on any number of classes.
- The weights are restored by copying back the saved w, where the reference subtracts e from w + e (which
  can differ from w in the last bits); the second pass's batch-norm running statistics are discarded by
  restoring the buffers, where the reference sets the momentum to 0 for that pass (the same statistics).
- Not implemented, as they are inactive in the reference's configs: the radius scheduler (rho_max = rho_min,
  so rho is constant) and GSAM's gradient decomposition (alpha 0).
- Both passes run under the trainer's bf16 autocast on CUDA (the reference runs them in fp32).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from backdoor._checks import check_int, check_number
from backdoor._registry import NONE, Param
from backdoor.defenses import register_defense
from backdoor.defenses.base import BY_DEFENSE_TRAINING, Defense, DefenseInputs, DefenseOutcome, Stage
from backdoor.mutants import Mutant

EPS = 1e-12  # added to the gradient's norm (as the reference), so a zero gradient gives a zero perturbation


@dataclass(frozen=True)
class SmoothedCrossEntropy:
    """A ``loss_fn`` for ``fit``: cross-entropy against labels smoothed as the reference does (1 - smoothing on
    the label, smoothing / (K - 1) on every other class; PyTorch's ``label_smoothing`` spreads its value over
    all K classes, hence the rescaling)."""

    smoothing: float

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = model(x)
        k = logits.shape[1]
        return F.cross_entropy(logits, y, label_smoothing=self.smoothing * k / (k - 1))


@dataclass(frozen=True)
class SharpnessAwareStep:
    """A ``step`` for ``fit``: the gradient at the weights moved uphill by ``rho`` (adaptive: in the metric
    scaled by |w|), applied by the optimizer at the original weights. Returns the loss at the weights."""

    rho: float
    adaptive: bool = True

    def perturbation(self, weights: list[torch.Tensor], grads: list[torch.Tensor]) -> list[torch.Tensor]:
        """e for each weight: rho * T^2 g / ||T g|| (T = |w|, adaptive) or rho * g / ||g||, one norm overall."""
        scales = [w.abs() if self.adaptive else torch.ones_like(w) for w in weights]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(s * g) for s, g in zip(scales, grads)]))
        scale = self.rho / (norm + EPS)
        return [scale * s * s * g for s, g in zip(scales, grads)]

    def __call__(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                 closure: Callable[[], torch.Tensor]) -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        loss = closure()
        loss.backward()
        weights = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        with torch.no_grad():
            saved = [w.detach().clone() for w in weights]
            offsets = self.perturbation(weights, [w.grad for w in weights])
            for weight, offset in zip(weights, offsets):
                weight.add_(offset)
        optimizer.zero_grad(set_to_none=True)
        with running_stats_kept(model):
            closure().backward()
        with torch.no_grad():
            for weight, original in zip(weights, saved):
                weight.copy_(original)
        optimizer.step()
        return loss


@contextmanager
def running_stats_kept(model: nn.Module) -> Iterator[None]:
    """Batch-norm running statistics (and batch counters) as they were before the block."""
    buffers = [b for m in model.modules() if isinstance(m, _BatchNorm) for b in m.buffers()]
    saved = [b.clone() for b in buffers]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in zip(buffers, saved):
                buffer.copy_(value)


@register_defense("ftsam")
class FTSAM(Defense):
    """FT-SAM: fine-tune on the defender's clean subset with (adaptive) sharpness-aware minimization."""

    kind = "model_repair"
    title = "FT-SAM"
    description = ("fine-tune with adaptive sharpness-aware minimization: each step's gradient taken at w + rho T^2 g / "
                   "||T g|| (T = |w|, rho 2.0), label smoothing 0.1")
    order = 15
    parameters = {
        "rho": Param(NONE, "2.0 (rho_max = rho_min; GTSRB, Tiny ImageNet: 8.0)", "the reference's CIFAR-10 "
                     "radius (the paper gives BackdoorBench as its code)"),
        "adaptive": Param(NONE, "True (`--adaptive` is store_false)", "as the reference: the perturbation scales "
                          "with |w|, the neuron-norm effect the paper argues for"),
        "label_smoothing": Param(NONE, "0.1 (GTSRB, Tiny ImageNet: 0.0)", "the reference's CIFAR-10 value: 1 - "
                                 "eps on the label, eps / (K - 1) on the others"),
        "epochs": Param(NONE, "100 (GTSRB: 50)", f"None: {BY_DEFENSE_TRAINING}"),
        "lr": Param(NONE, "0.01", f"None: {BY_DEFENSE_TRAINING}"),
    }
    budgets = (
        Stage("fine-tune on the clean subset, two passes a step", "defense_training", "`epochs`, `lr`"),
    )
    # Each find starts with a newline and the line's indentation: it then matches the code line and not its
    # own text here, where the newline is an escape.
    mutants = (
        Mutant("no-perturbation", "the weights are not moved uphill: plain fine-tuning with label smoothing",
               "\n                weight.add_(offset)", "\n                weight.add_(0 * offset)"),
        Mutant("descent", "the perturbation goes downhill (-g) instead of uphill",
               "\n        scale = self.rho / (norm + EPS)", "\n        scale = -self.rho / (norm + EPS)"),
        Mutant("not-restored", "the optimizer steps from the perturbed weights w + e instead of w",
               "\n                weight.copy_(original)", "\n                pass"),
        Mutant("unnormalised", "the gradient is not normalised: e = rho * g",
               "\n        scale = self.rho / (norm + EPS)", "\n        scale = self.rho"),
        Mutant("not-adaptive", "the perturbation ignores |w| (plain SAM) even when adaptive",
               "\n        scales = [w.abs() if self.adaptive", "\n        scales = [w.abs() if False"),
        Mutant("gradients-summed", "the second pass adds its gradient to the first's instead of replacing it",
               "\n        optimizer.zero_grad(set_to_none=True)\n        with running_stats_kept(model):",
               "\n        with running_stats_kept(model):"),
        Mutant("no-label-smoothing", "the loss is the plain cross-entropy",
               "\n        return F.cross_entropy(logits, y, label_smoothing=self.smoothing * k / (k - 1))",
               "\n        return F.cross_entropy(logits, y)"),
        Mutant("smoothing-over-all-classes", "PyTorch's label smoothing (eps / K on every class) without the "
               "rescaling: the label keeps 1 - eps + eps / K",
               "\n        return F.cross_entropy(logits, y, label_smoothing=self.smoothing * k / (k - 1))",
               "\n        return F.cross_entropy(logits, y, label_smoothing=self.smoothing)"),
        Mutant("stats-from-perturbed-pass", "the second pass updates the batch-norm running statistics too",
               "\n    buffers = [b for m in model.modules() if isinstance(m, _BatchNorm) for b in m.buffers()]",
               "\n    buffers = []"),
        Mutant("ignores-overrides", "its epochs and lr do not override the defense budget",
               "\n        config = inputs.training.with_(epochs=self.epochs, lr=self.lr)",
               "\n        config = inputs.training"),
    )

    def __init__(self, rho: float = 2.0, adaptive: bool = True, label_smoothing: float = 0.1,
                 epochs: int | None = None, lr: float | None = None):
        check_number("ftsam", "rho", rho, low=0)
        check_number("ftsam", "label_smoothing", label_smoothing, low=0, high=0.5)
        check_int("ftsam", "epochs", epochs, minimum=1, optional=True)
        check_number("ftsam", "lr", lr, low=0, low_open=True, optional=True)
        self.rho, self.adaptive, self.label_smoothing = rho, adaptive, label_smoothing
        self.epochs, self.lr = epochs, lr

    def run(self, inputs: DefenseInputs) -> DefenseOutcome:
        config = inputs.training.with_(epochs=self.epochs, lr=self.lr)
        history = inputs.fit(inputs.model, inputs.clean, config, seed=inputs.seed,
                             loss_fn=SmoothedCrossEntropy(self.label_smoothing),
                             step=SharpnessAwareStep(self.rho, self.adaptive), desc="ftsam")
        return DefenseOutcome(model=inputs.model, info={"epochs": config.epochs,
                                                        "final_loss": history["epochs"][-1]["loss"]})
