"""Narcissus (Zeng, Pan, Just, Lyu, Qiu and Jia, "Narcissus: A Practical Clean-Label Backdoor Attack with Limited
Information", ACM CCS 2023).

Clean label: the poisoned samples are target-class training images that keep their labels; the network learns to
associate with the target class a trigger that already points towards it. The trigger is one universal additive
perturbation ``delta`` (the whole image, every channel), ``||delta||_inf <= eps``, synthesised to make the target
class *more* recognisable: it minimises a surrogate model's cross-entropy of the target label on target-class
images, ``min_delta E_{x in target class} CE(f(clip(x + delta)), target)``.

Steps (all in ``prepare``, cached by spec):
1. Surrogate: a fresh model of the case's architecture (``ctx.new_model()``, its weights re-drawn from the
   attack's material seed so it shares neither the victim's initialisation nor its data order), trained with the
   case's training recipe (SGD, its augmentation) for ``surrogate_epochs`` (None: the case's epochs) on the
   out-of-distribution stand-in plus the target class: see "What ours uses" below. Cached as its own artifact
   (``narcissus_surrogate``), so trigger variants share it.
2. Poison warm-up: the surrogate is fine-tuned on the target-class training images only (label: the target),
   ``warmup_epochs`` epochs of RAdam at ``warmup_lr``, batches of ``batch_size``, with the case's crop / flip.
3. Trigger: ``delta`` starts at 0 and takes ``trigger_epochs`` passes over the target-class images (seeded
   shuffle, batches of ``batch_size``), each batch one RAdam step of ``lr`` grey levels on the mean
   cross-entropy of the target label at ``clip(x + delta, 0, 1)``, the surrogate in eval mode and frozen; after
   each step ``delta`` is projected onto the ``eps`` ball. It is then rounded to whole grey levels (an integer
   ``eps`` keeps it inside the ball): the stored trigger is an int16 [C, H, W] tensor.
4. Poisoning: the selected target-class samples get ``clip(x + delta, 0, 255)``, labels unchanged; the poison
   mask marks exactly them (they carry the trigger and the attack's label, the target). The grid's poison ratio
   is the share of the whole training set, drawn from the target class (``cap_ratio`` caps it at the class).
   The paper poisons 0.05% of the training set (25 CIFAR-10 images, 0.5% of the target class).
5. Test time: the trigger is magnified, ``clip(x + round(test_multiplier * delta), 0, 255)``, multiplier 3 as in
   the paper and its code (a 48/255 perturbation for eps 16).

What ours uses for the surrogate (no second dataset): the paper pre-trains the surrogate on a public
out-of-distribution set (Tiny-ImageNet for CIFAR-10, its 200 classes plus the target class as a 201st) and the
attacker never sees the victim's non-target data. We have no second dataset of the same image shape, so the
stand-in for the POOD set is the training set's own non-target classes with their own labels, and the target
class keeps its label: the surrogate is a K-way classifier trained on the clean training set. This attacker
therefore knows more than the paper's (in-distribution non-target images and the victim's architecture), so the
trigger is, if anything, better aligned with the victim than the paper's; ASR here is an optimistic figure for
Narcissus's threat model. The warm-up and the trigger synthesis use only target-class images, as in the paper.

Measured on digits / cnn_small at the smoke budget (the whole target class poisoned, ratio 0.0987, 15 epochs):
the backdoor is not learnt (ASR 0.00 at eps 16 x3; 0.01 at eps 32 and 64, x3): the digit 0 is recognised from its
shape alone, and the perturbation adds nothing the victim needs. RAdam's first steps are un-adapted momentum
steps, so a trigger needs a few dozen steps before it moves (the tests use larger steps for that reason).

All-to-all: refused (clean label: a sample keeps its own label, so it cannot be relabelled to (y + 1) mod K).

Departures from the paper and from the reference code (reds-lab/Narcissus), and why:
- The surrogate's data, above (no second dataset); its training recipe is the case's (SGD with the case's
  schedule), where the reference trains 200 epochs of SGD lr 0.1 with a cosine schedule.
- Defaults are CPU-sized: ``trigger_epochs`` 200 (paper / reference 1000) and ``surrogate_epochs`` None (the
  case's; reference 200). The paper's values are in ``parameters``.
- The reference keeps the unconstrained perturbation in the optimiser and clamps it only where it is applied;
  ours projects the iterate onto the ball after each step (PGD-like), so a coordinate at the boundary moves back
  as soon as its gradient turns. The applied perturbation is the same kind of point of the ball.
- The reference leaves the warmed-up surrogate in train mode while it optimises the trigger (batch statistics,
  running averages still updated); ours fixes it in eval mode, so the objective does not move under the trigger.
- The reference optimises on the [-1, 1] scale (RAdam lr 0.01, clamp 32/255): our ``lr`` 1.275 grey levels and
  ``eps`` 16 grey levels are the same values on the 0..255 scale. The stored trigger is rounded to whole grey
  levels (images are uint8 here); the reference adds the float perturbation to float images.
- Warm-up learning rate 0.001 (reference: 0.1). At 0.1 RAdam's first steps on the target class alone make our
  small surrogate predict the target for every input: its target-class loss is exactly 0 in float32, the
  trigger's gradient vanishes and delta stays 0 (measured on digits / cnn_small). A trigger that comes out all
  zero raises an error naming this, rather than poisoning with nothing.
- The reference's warm-up and trigger labels are the CIFAR class index inside a 201-way Tiny-ImageNet label
  space (a quirk of its data pipeline); ours is the target class of the K-way surrogate.
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

from backdoor._checks import ParameterError, check_int, check_number
from backdoor._registry import NONE, Param
from backdoor._storage import module_to_tensors, tensors_with_prefix
from backdoor.attacks import register_attack
from backdoor.attacks.base import Attack, AttackContext
from backdoor.mutants import Mutant
from backdoor.training import TrainConfig, fit, random_crop_flip

_EVAL_BATCH = 512  # images per no-grad pass when measuring losses (memory only)


def redraw_weights(model: nn.Module, seed: int) -> nn.Module:
    """Re-initialise every submodule that has ``reset_parameters`` from ``seed`` (global generator untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for module in model.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
    return model


@torch.no_grad()
def target_loss(model: nn.Module, x: torch.Tensor, target: int, delta: torch.Tensor | None = None) -> float:
    """Mean cross-entropy of ``target`` on uint8 images ``x`` (plus a grey-level ``delta``, clipped), eval mode."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total = 0.0
    for start in range(0, len(x), _EVAL_BATCH):
        xb = x[start:start + _EVAL_BATCH].to(device).float()
        if delta is not None:
            xb = xb + delta.to(device).float()
        logits = model(xb.clamp(0, 255) / 255)
        y = torch.full((len(xb),), target, device=device)
        total += float(F.cross_entropy(logits, y, reduction="sum"))
    model.train(was_training)
    return total / max(len(x), 1)


def warm_up(model: nn.Module, x: torch.Tensor, target: int, *, epochs: int, lr: float, batch_size: int,
            config: TrainConfig, seed: int) -> None:
    """Poison warm-up: fine-tune ``model`` in place on target-class uint8 images ``x`` (label ``target``), RAdam,
    seeded shuffle, the case's crop / flip."""
    device = next(model.parameters()).device
    g_cpu = torch.Generator().manual_seed(seed)
    g_dev = torch.Generator(device=device).manual_seed(seed + 1)
    optimizer = torch.optim.RAdam(model.parameters(), lr=lr)
    x_all = x.to(device)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x_all), generator=g_cpu).to(device)
        for start in range(0, len(x_all), batch_size):
            xb = x_all[order[start:start + batch_size]].float().div_(255)
            xb = random_crop_flip(xb, config.crop_padding, config.hflip, g_dev)
            y = torch.full((len(xb),), target, device=device)
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(xb), y).backward()
            optimizer.step()
    model.eval()


def synthesise_trigger(model: nn.Module, x: torch.Tensor, target: int, *, eps: int, lr: float, epochs: int,
                       batch_size: int, seed: int) -> torch.Tensor:
    """The Narcissus trigger: ``delta`` (grey levels, float [C, H, W]) minimising the target label's cross-entropy
    on ``clip(x + delta)`` over the target-class uint8 images ``x``; RAdam steps of ``lr`` grey levels, projected
    onto ``[-eps, eps]`` after each step. The model is frozen in eval mode."""
    device = next(model.parameters()).device
    model.eval().requires_grad_(False)
    x_all = x.to(device)
    delta = torch.zeros(x.shape[1:], device=device, requires_grad=True)  # on the [0, 1] scale
    optimizer = torch.optim.RAdam([delta], lr=lr / 255)
    bound = eps / 255
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(x_all), generator=g).to(device)
        for start in range(0, len(x_all), batch_size):
            xb = x_all[order[start:start + batch_size]].float().div_(255)
            y = torch.full((len(xb),), target, device=device)
            loss = F.cross_entropy(model((xb + delta).clamp(0, 1)), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                delta.clamp_(-bound, bound)
    return delta.detach().mul(255).cpu()


def add_levels(x: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """``clip(x + levels, 0, 255)`` on uint8 images [N, C, H, W] with integer grey levels [C, H, W]."""
    levels = levels.to(x.device).clamp(-255, 255).to(torch.int16)
    return (x.to(torch.int16) + levels).clamp_(0, 255).to(torch.uint8)


@register_attack("narcissus")
class Narcissus(Attack):
    """Narcissus: a universal L-inf perturbation that makes the target class more itself, clean label."""

    kind = "clean_label"
    title = "Narcissus"
    description = ("universal L-inf (16/255) perturbation minimising a surrogate's target-class loss on target-class "
                   "images, added to a few of them; test: the trigger x3")
    order = 180
    parameters = {
        "eps": Param("16 (/255)", "16/255", "L-inf budget in whole grey levels"),
        "test_multiplier": Param("3", "3 (multi_test)", "the test-time trigger is round(3 * delta)"),
        "trigger_epochs": Param("1000", "1000 (gen_round)", "passes over the target class; 200 keeps it CPU-sized "
                                "and reach the eps budget on digits (largest |delta| 16)"),
        "lr": Param(NONE, "0.01 on [-1, 1] (RAdam)", "RAdam step in grey levels: 1.275 is the reference's 0.01 on the "
                    "0..255 scale"),
        "batch_size": Param(NONE, "350", "the reference's, for warm-up and trigger batches"),
        "warmup_epochs": Param(NONE, "5 (warmup_round)", "the reference's poison warm-up on the target class"),
        "warmup_lr": Param(NONE, "0.1 (RAdam)", "0.1 collapses our small surrogate to the target class (its target-class "
                           "loss reaches 0 in float32, the trigger's gradient vanishes, delta stays 0 on digits); "
                           "0.001 fine-tunes without collapse"),
        "surrogate_epochs": Param("200", "200", "None: the case's epochs (the surrogate is trained the case's way, "
                                  "on the training set's non-target classes plus the target class: no second "
                                  "dataset)"),
    }
    # Each find starts with a newline and the line's indentation: it then matches the code line and not its
    # own text here, where the newline is an escape.
    mutants = (
        Mutant("trigger-ascends", "the trigger maximises the target-class loss (an adversarial, not a Narcissus, "
               "perturbation)",
               "\n            loss = F.cross_entropy(model((xb + delta).clamp(0, 1)), y)",
               "\n            loss = -F.cross_entropy(model((xb + delta).clamp(0, 1)), y)"),
        Mutant("no-projection", "delta is never projected onto the eps ball: the budget is not kept",
               "\n                delta.clamp_(-bound, bound)", "\n                pass"),
        Mutant("no-test-magnification", "the test-time trigger is delta itself, not test_multiplier * delta",
               "\n        return add_levels(x, (self.test_multiplier * delta).round())",
               "\n        return add_levels(x, delta)"),
        Mutant("no-warm-up", "the surrogate is not fine-tuned on the target class before the trigger is made",
               "\n        warm_up(model, x_target, self.target,", "\n        (lambda *a, **k: None)(model, x_target, self.target,"),
        Mutant("trigger-not-in-training", "the poisoned training images are left clean (trigger at test time only)",
               "\n        return add_levels(x, delta)\n", "\n        return x.clone()\n"),
    )

    def __init__(self, target: int | str = 0, eps: int = 16, test_multiplier: float = 3.0, trigger_epochs: int = 200,
                 lr: float = 1.275, batch_size: int = 350, warmup_epochs: int = 5, warmup_lr: float = 0.001,
                 surrogate_epochs: int | None = None, **kwargs):
        super().__init__(target=target, **kwargs)
        check_int("narcissus", "eps", eps, minimum=1)
        if eps > 255:
            raise ParameterError("narcissus", "eps", eps, "an integer in [1, 255] grey levels (16 = 16/255)")
        check_number("narcissus", "test_multiplier", test_multiplier, low=0, low_open=True)
        check_int("narcissus", "trigger_epochs", trigger_epochs, minimum=0)
        check_number("narcissus", "lr", lr, low=0, low_open=True)
        check_int("narcissus", "batch_size", batch_size, minimum=1)
        check_int("narcissus", "warmup_epochs", warmup_epochs, minimum=0)
        check_number("narcissus", "warmup_lr", warmup_lr, low=0, low_open=True)
        check_int("narcissus", "surrogate_epochs", surrogate_epochs, minimum=1, optional=True)
        self.eps, self.test_multiplier, self.trigger_epochs = int(eps), float(test_multiplier), int(trigger_epochs)
        self.lr, self.batch_size = float(lr), int(batch_size)
        self.warmup_epochs, self.warmup_lr, self.surrogate_epochs = int(warmup_epochs), float(warmup_lr), surrogate_epochs
        self.delta: torch.Tensor | None = None  # int16 [C, H, W] grey levels, set by prepare
        self.material_meta: dict = {}

    # -- material -----------------------------------------------------------------------------------------
    def prepare(self, ctx: AttackContext) -> None:
        params = {"target": self.target, "eps": self.eps, "trigger_epochs": self.trigger_epochs, "lr": self.lr,
                  "batch_size": self.batch_size, "warmup_epochs": self.warmup_epochs, "warmup_lr": self.warmup_lr,
                  "surrogate_epochs": self.surrogate_epochs or ctx.training.epochs}
        spec = {"model_spec": ctx.spec, "attack": "narcissus", "params": params, "seed": ctx.seed}
        tensors, meta = ctx.cached("narcissus_trigger", spec, lambda: self._build_material(ctx))
        self.delta, self.material_meta = tensors["delta"].to(torch.int16), dict(meta)

    def _surrogate(self, ctx: AttackContext) -> nn.Module:
        """The surrogate before warm-up: trained the case's way on the clean training set (cached)."""
        if ctx.new_model is None:
            raise ValueError("narcissus: the surrogate needs AttackContext.new_model")
        epochs = self.surrogate_epochs or ctx.training.epochs
        spec = {"model_spec": ctx.spec, "attack": "narcissus", "surrogate_epochs": epochs, "seed": ctx.seed}
        new, data = ctx.new_model, ctx.dataset

        def build():
            model = redraw_weights(new(), ctx.seed).to(ctx.device)
            history = fit(model, data.train, ctx.training.with_(epochs=epochs), device=ctx.device, seed=ctx.seed,
                          desc="narcissus surrogate")
            return module_to_tensors(model), {"history": history}

        tensors, _ = ctx.cached("narcissus_surrogate", spec, build)
        model = new()
        model.load_state_dict(tensors_with_prefix(tensors, "model."))
        return model.to(ctx.device).eval()

    def _build_material(self, ctx: AttackContext) -> tuple[dict, dict]:
        train = ctx.dataset.train
        x_target = train.x[train.y == self.target]
        if len(x_target) == 0:
            raise ValueError(f"narcissus: the training set has no sample of the target class {self.target}")
        model = self._surrogate(ctx)
        started = time.perf_counter()  # the warm-up's and the trigger's own cost, not the surrogate's training
        loss_pretrained = target_loss(model, x_target, self.target)
        warm_up(model, x_target, self.target,
                epochs=self.warmup_epochs, lr=self.warmup_lr, batch_size=self.batch_size, config=ctx.training,
                seed=ctx.seed + 1)
        loss_warm = target_loss(model, x_target, self.target)
        delta = synthesise_trigger(model, x_target, self.target, eps=self.eps, lr=self.lr, epochs=self.trigger_epochs,
                                   batch_size=self.batch_size, seed=ctx.seed + 2)
        levels = delta.round().to(torch.int16)
        if self.trigger_epochs > 0 and not bool(levels.any()):
            raise ValueError(f"narcissus: the synthesised trigger is all zero (the surrogate's target-class loss after "
                             f"warm-up is {loss_warm:.3g}: its gradient vanished); lower warmup_lr or warmup_epochs")
        others = train.x[train.y != self.target]
        with torch.no_grad():
            test_levels = (self.test_multiplier * levels.float()).round()
            hits = sum(int((model(add_levels(others[s:s + _EVAL_BATCH], test_levels).to(ctx.device).float() / 255)
                            .argmax(1) == self.target).sum()) for s in range(0, len(others), _EVAL_BATCH))
        meta = {"target_count": len(x_target), "loss_pretrained": loss_pretrained, "loss_warmed_up": loss_warm,
                "loss_with_trigger": target_loss(model, x_target, self.target, levels),
                "surrogate_asr_test_trigger": hits / max(len(others), 1),
                "max_level": int(levels.abs().max()), "seconds": round(time.perf_counter() - started, 3)}
        return {"delta": levels}, meta

    def _levels(self, x: torch.Tensor) -> torch.Tensor:
        if self.delta is None:
            raise RuntimeError("narcissus: call prepare(ctx) first (it synthesises the trigger)")
        if tuple(self.delta.shape) != tuple(x.shape[1:]):
            raise ValueError(f"narcissus: the trigger has shape {tuple(self.delta.shape)}, the images "
                             f"{tuple(x.shape[1:])} (material built for another dataset?)")
        return self.delta

    # -- poisoning ----------------------------------------------------------------------------------------
    def apply_trigger(self, x: torch.Tensor) -> torch.Tensor:
        """The test-time trigger: ``clip(x + round(test_multiplier * delta))``."""
        delta = self._levels(x).float()
        return add_levels(x, (self.test_multiplier * delta).round())

    def poison_images(self, x: torch.Tensor, train_index: torch.Tensor) -> torch.Tensor:
        """The training-time trigger: ``clip(x + delta)`` (no magnification)."""
        delta = self._levels(x)
        return add_levels(x, delta)
