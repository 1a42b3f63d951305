"""LIRA (Doan, Lao, Zhao and Li, "LIRA: Learnable, Imperceptible and Robust Backdoor Attacks", ICCV 2021).

Training controllable. A learned trigger generator T (the reference's convolutional autoencoder: four 4x4
stride-2 convolutions 16-32-64-128 with batch norm and ReLU, four transposed convolutions back, tanh; it sees
images normalised by the dataset's mean / std, kept as buffers in its state) makes a per-image additive
perturbation: ``x' = clip(x + eps * T(x), 0, 1)``, quantised to uint8 for the test trigger and the fixed
poisoned set. Images whose sides are not multiples of 16 are zero-padded (in the normalised space) to the next
multiple for T and its output is cropped back.

Stage 1 (``prepare``: expensive one-time material, cached by spec through ``ctx.cached``): T and a classifier
(``ctx.new_model()``, the case's architecture) are trained jointly for ``generator_epochs`` epochs, as in the
reference. Per batch (augmented first: random crop with zero padding ``crop_padding``, rotation up to
``rotation`` degrees, horizontal flip where the dataset allows it, one draw per batch as the reference's
``PostTensorTransform``): (a) the generator step: a live copy T' of T takes one Adam step (``lr_atk``) on the
backdoor loss ``CE(f(clip(x + eps * T'(x))), eta(y))``, f fixed; (b) the classifier step: f takes one SGD step
(the case's learning rate, momentum 0.9) on ``alpha * CE(f(x), y) + (1 - alpha) * CE(f(clip(x + eps * T(x))),
eta(y))`` with T fixed (eval mode). At the end of each epoch T <- T'. eta is the target (all-to-one) or
``(y + 1) mod K`` (all-to-all, which the reference supports). Only T is kept (its weights travel in the cached
material and in ``state_tensors`` with the backdoored model).

Stage 2 (the case's training, through ``TrainHooks`` in the one trainer): a fresh classifier of the case's
architecture trains for the case's epochs; in every batch (augmented as in stage 1, before poisoning, as the
reference does) a fraction ``ratio`` (the grid's poison ratio; stochastic rounding of ``ratio * batch``) gets
the fixed T's trigger, quantised to the uint8 grid exactly as the test trigger is, and the label eta(y).

The fixed poisoned set for data-side defenses (``poison_train``): ``ratio * N`` samples with the trigger and
eta(y); the mask marks exactly them (LIRA has no cross / noise samples).

Defaults: eps 0.01, alpha 0.5 (the paper's alpha = beta = 0.5), lr_atk 1e-4, crop 5, rotation 10 (BackdoorBench
``config/attack/lira/default.yaml``); generator_epochs None = half the case's epochs (the reference's 50 joint
epochs of 100 in all).

eps and uint8: eps is on the [0, 1] pixel scale, so 0.01 is 2.55 grey levels and the rounded change of a pixel
is ``round(2.55 * T(x))`` in {-3, ..., 3}: where |T| < 0.196 a pixel does not change at all. The generator
learns through the float trigger (stage 1 has to differentiate through it); the classifier of stage 2 and every
evaluation see only the rounded trigger. Stage 1's material records how many pixels survive rounding and the
stage-1 classifier's attack success on float and on rounded triggers (``meta``). What we found on digits (smoke
budget, 8 stage-1 epochs): with the reference's lr_atk 1e-4 the generator barely moves from its initialisation
(mean |change| 0.85 grey levels, 60% of pixels change after rounding) and the backdoor does not take (ASR ~2%);
with lr_atk 0.01 the change is 2.3 grey levels on average, 90% of pixels change, and the stage-1 classifier's
attack success is the same on float and rounded triggers (1.0 / 1.0): rounding does not erase the trigger once
the generator uses its eps budget. The trigger is learnable at 10% per batch: ASR 0.87 (C-Acc 0.86) with
lr_atk 0.01, ASR 1.00 (C-Acc 0.97) with lr_atk 0.01 and eps 0.03 (7.65 grey levels).

Departures, and why:
- Stage 2 trains a fresh classifier for the case's full epochs with the grid's poison ratio per batch, like every
  other attack in the grid. The reference fine-tunes the stage-1 classifier for the remaining 50 epochs with
  ``0.5 * CE(clean) + 0.5 * CE(poisoned)`` on every sample (each sample both clean and poisoned: no poison
  ratio). Fine-tuning would give LIRA 1.5x the other attacks' classifier budget and make the grid's ratio axis
  meaningless; stage 1's classifier is attacker-side compute that only serves to train T (as Input-aware's
  mask stage).
- eps is applied in [0, 1] pixel space. The reference adds ``eps * T(x)`` to NORMALISED images (clipping to the
  normalised range), i.e. ``eps * std`` in pixels: 0.0025 on CIFAR-10 = 0.63 grey levels, which uint8 rounding
  would erase almost entirely (our pipeline stores and evaluates uint8 images); on GTSRB, which the reference
  does not normalise, the two agree.
- Stage 1 passes the clean and the poisoned batch through f in ONE forward pass (``joint_logits``; the losses are
  the same). The reference passes them separately; with batch norm in train mode an all-poisoned batch then has
  statistics of its own, which f can learn to read instead of the trigger, and which eval mode does not have.
  A precaution, not a measured fix: the eval-mode failure we saw (generator loss 0.04 in training, stage-1 ASR 0
  in eval mode, lr_atk 0.01) persisted with one pass and went away with the generator's re-estimated batch-norm
  statistics (next item); separate passes with re-estimated statistics were not tried.
- After each epoch's copy T <- T', T's batch-norm statistics are re-estimated in one pass over the training set
  with its new weights (as Input-aware's here). The running averages (momentum 0.1) lag behind a generator
  that Adam moves every step; T is used in eval mode, and with the lagging statistics its trigger did not
  fool the classifier T' had just fooled (smoke run, lr_atk 0.01: generator loss 0.04, eval-mode ASR 0).
- Stage 1's classifier step zeroes the gradients the generator step left on f. In the reference the backdoor
  loss's gradient of the generator step is not cleared from f before the classifier's backward pass, so f's step
  also carries ``grad CE(f(x'_T'), eta)``; we take the loss as written in the paper and in the code's comments.
- Stage 1's classifier uses SGD with the case's learning rate and momentum, no weight decay, no schedule (the
  reference: SGD lr 0.01, momentum 0.9, no decay); fp32 throughout (the reference uses AMP on CUDA).
- Only the autoencoder generator (the reference's default ``attack_model``); its UNet option is not offered.
- Rotation samples bilinearly (torchvision's RandomRotation, nearest-neighbour, in the reference).
"""
from __future__ import annotations

import copy
import math
import time

import torch
import torch.nn.functional as F
from torch import nn

from backdoor._checks import check_int, check_number
from backdoor._registry import NONE, NOT_STATED, Param
from backdoor.attacks import register_attack
from backdoor.attacks._controllable import batch_poison_count, check_ratio, random_crop_rotate_flip
from backdoor.attacks.base import Attack, AttackContext, apply_to_float
from backdoor.attacks.inputaware import recalibrate_batchnorm
from backdoor.data import Dataset
from backdoor.mutants import Mutant
from backdoor.training import TrainHooks

_WIDTHS = (16, 32, 64, 128)
_STRIDE = 2 ** len(_WIDTHS)  # the autoencoder's total down-sampling: sides are padded to a multiple of it
_TRIGGER_BATCH = 512  # images per generator pass when poisoning (memory only)


class TriggerGenerator(nn.Module):
    """The reference's autoencoder: 4x4 stride-2 conv + BN + ReLU down (16-32-64-128), transposed convs back,
    tanh. ``forward`` takes float images in [0, 1] and returns T(x) in [-1, 1] of the same shape."""

    def __init__(self, channels: int, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1).clone())
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1).clone())
        down, cin = [], channels
        for c in _WIDTHS:
            down += [nn.Conv2d(cin, c, 4, stride=2, padding=1), nn.BatchNorm2d(c), nn.ReLU()]
            cin = c
        up = []
        for c in _WIDTHS[-2::-1]:
            up += [nn.ConvTranspose2d(cin, c, 4, stride=2, padding=1), nn.BatchNorm2d(c), nn.ReLU()]
            cin = c
        up += [nn.ConvTranspose2d(cin, channels, 4, stride=2, padding=1)]
        self.encoder, self.decoder = nn.Sequential(*down), nn.Sequential(*up)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        z = (x - self.mean) / self.std
        pad_h, pad_w = -h % _STRIDE, -w % _STRIDE
        if pad_h or pad_w:
            z = F.pad(z, (0, pad_w, 0, pad_h))
        return torch.tanh(self.decoder(self.encoder(z)))[..., :h, :w]


def perturb(gen: nn.Module, x: torch.Tensor, eps: float) -> torch.Tensor:
    """The float trigger: ``clip(x + eps * T(x), 0, 1)`` on float images in [0, 1]."""
    return (x + eps * gen(x)).clamp(0, 1)


def quantise(x: torch.Tensor) -> torch.Tensor:
    """Round float images in [0, 1] to the uint8 grid (the values a stored image can take), still float."""
    return x.mul(255).round().div(255)


def joint_logits(clf: nn.Module, clean: torch.Tensor, poisoned: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """f's logits on the clean and the poisoned batch from ONE forward pass of both, so that batch norm (in train
    mode) normalises them with shared statistics: passed separately, an all-poisoned batch has statistics of its
    own, which f learns to read instead of the trigger (the backdoor then vanishes in eval mode)."""
    logits = clf(torch.cat([clean, poisoned]))
    return logits[:len(clean)], logits[len(clean):]


def generator_step(live: nn.Module, clf: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, target: torch.Tensor,
                   eps: float) -> float:
    """Stage 1 (a): one Adam step of the live generator on ``CE(f(clip(x + eps * T'(x))), target)``; f is not
    stepped (its gradients from this loss are cleared by the classifier step). f sees the clean and the poisoned
    batch in one pass (see ``joint_logits``). Returns the loss before the step."""
    loss = F.cross_entropy(joint_logits(clf, x, perturb(live, x, eps))[1], target)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(loss.detach())


def classifier_loss(clf: nn.Module, gen: nn.Module, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor,
                    eps: float, alpha: float) -> torch.Tensor:
    """Stage 1 (b): ``alpha * CE(f(x), y) + (1 - alpha) * CE(f(clip(x + eps * T(x))), target)``, T fixed."""
    with torch.no_grad():
        poisoned = perturb(gen, x, eps)
    clean_logits, poisoned_logits = joint_logits(clf, x, poisoned)
    return alpha * F.cross_entropy(clean_logits, y) + (1 - alpha) * F.cross_entropy(poisoned_logits, target)


@register_attack("lira")
class LIRA(Attack):
    """LIRA: a learned autoencoder adds an eps-bounded per-image perturbation (training controllable)."""

    kind = "training_controllable"
    title = "LIRA"
    description = ("autoencoder trigger x + 0.01 T(x), learned jointly with a classifier (stage 1, cached), then "
                   "per-batch poisoning of a fresh classifier")
    order = 120
    parameters = {
        "eps": Param(NOT_STATED, "0.01 (normalised space)", "on the [0, 1] pixel scale (2.55 grey levels), so that "
                     "the trigger survives uint8 rounding; the reference's is eps * std in pixels"),
        "alpha": Param("0.5", "0.5", "weight of the clean loss in stage 1 (the poisoned loss gets 1 - alpha)"),
        "lr_atk": Param(NOT_STATED, "1e-4 (Adam)", "as the reference"),
        "generator_epochs": Param(NOT_STATED, "50 (of 100 in all)", "None: half the case's epochs, the reference's "
                                  "proportion"),
        "crop_padding": Param(NONE, "5", "as the reference (one draw per batch)"),
        "rotation": Param(NONE, "10 degrees (nearest-neighbour)", "as the reference, sampled bilinearly"),
    }
    # Each find starts with a newline and the line's indentation: it then matches the code line and not its
    # own text here, where the newline is an escape.
    mutants = (
        Mutant("eps-zero", "the perturbation is scaled by 0: the trigger is the identity",
               "\n    return (x + eps * gen(x)).clamp(0, 1)", "\n    return (x + 0 * gen(x)).clamp(0, 1)"),
        Mutant("generator-ascends", "the generator step climbs the backdoor loss instead of descending it",
               "\n    loss.backward()\n    opt.step()", "\n    (-loss).backward()\n    opt.step()"),
        Mutant("no-poison-term", "stage 1's classifier loss has no poisoned term (alpha is taken as 1)",
               "\n    return alpha * F.cross_entropy(clean_logits, y) + (1 - alpha) * F.cross_entropy(poisoned_logits, target)",
               "\n    return F.cross_entropy(clean_logits, y) + 0 * F.cross_entropy(poisoned_logits, target)"),
        Mutant("separate-passes", "stage 1 passes the clean and the poisoned batch through f separately (own BN statistics)",
               "\n    logits = clf(torch.cat([clean, poisoned]))\n    return logits[:len(clean)], logits[len(clean):]",
               "\n    return clf(clean), clf(poisoned)"),
        Mutant("generator-not-kept", "the trained live generator is never copied back: T stays at its initialisation",
               "\n            gen.load_state_dict(live.state_dict())", "\n            pass"),
        Mutant("no-relabel", "poisoned batch rows keep their own labels",
               "\n        y[:n_bd] = self.attack.relabel(y[:n_bd])", "\n        y[:n_bd] = y[:n_bd]"),
        Mutant("hooks-do-nothing", "the training hooks are the trainer's no-ops: no batch is poisoned",
               "\n        return LIRAHooks(self, dataset, ratio, seed)", "\n        return TrainHooks()"),
    )

    def __init__(self, target: int | str = 0, eps: float = 0.01, alpha: float = 0.5, lr_atk: float = 1e-4,
                 generator_epochs: int | None = None, crop_padding: int = 5, rotation: float = 10.0, **kwargs):
        super().__init__(target=target, **kwargs)
        check_number("lira", "eps", eps, low=0, high=1, low_open=True)
        check_number("lira", "alpha", alpha, low=0, high=1, high_open=True)
        check_number("lira", "lr_atk", lr_atk, low=0, low_open=True)
        check_int("lira", "generator_epochs", generator_epochs, minimum=1, optional=True)
        check_int("lira", "crop_padding", crop_padding, minimum=0)
        check_number("lira", "rotation", rotation, low=0, high=180)
        self.eps, self.alpha, self.lr_atk = float(eps), float(alpha), float(lr_atk)
        self.generator_epochs, self.crop_padding, self.rotation = generator_epochs, int(crop_padding), float(rotation)
        self.generator: TriggerGenerator | None = None  # T, trained in stage 1 (or loaded)

    # -- material (stage 1) --------------------------------------------------------------------------------
    def _epochs(self, ctx: AttackContext) -> int:
        return self.generator_epochs or max(1, math.ceil(ctx.training.epochs / 2))

    def material_spec(self, ctx: AttackContext) -> dict:
        params = {"target": self.target, "eps": self.eps, "alpha": self.alpha, "lr_atk": self.lr_atk,
                  "generator_epochs": self._epochs(ctx), "crop_padding": self.crop_padding, "rotation": self.rotation}
        return {"model_spec": ctx.spec, "attack": "lira", "params": params, "seed": ctx.seed}

    def prepare(self, ctx: AttackContext) -> None:
        if self.num_classes is None:
            self.num_classes = ctx.dataset.num_classes
        tensors, _ = ctx.cached("lira_generator", self.material_spec(ctx), lambda: self._train_generator(ctx))
        self.load_state_tensors(tensors)

    def _augment(self, x: torch.Tensor, g: torch.Generator, flip: bool) -> torch.Tensor:
        if not (self.crop_padding or self.rotation or flip):
            return x
        return random_crop_rotate_flip(x, g, padding=self.crop_padding, p_crop=1.0, degrees=self.rotation,
                                       p_rotate=1.0, flip=flip, same_on_batch=True)

    def _train_generator(self, ctx: AttackContext) -> tuple[dict, dict]:
        if ctx.new_model is None:
            raise ValueError("lira: stage 1 needs AttackContext.new_model (the classifier trained with the generator)")
        data, device = ctx.dataset, ctx.device
        started = time.perf_counter()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(ctx.seed)
            gen = TriggerGenerator(data.train.x.shape[1], data.mean, data.std)
        gen = gen.to(device).eval()
        live = copy.deepcopy(gen).train()  # T': stepped every batch; T <- T' at the end of each epoch
        clf = ctx.new_model().to(device).train()
        opt_g = torch.optim.Adam(live.parameters(), lr=self.lr_atk)
        opt_c = torch.optim.SGD(clf.parameters(), lr=ctx.training.lr, momentum=ctx.training.momentum)
        g_cpu = torch.Generator().manual_seed(ctx.seed)
        g_dev = torch.Generator(device=device).manual_seed(ctx.seed + 1)
        x_all, y_all = data.train.x.to(device), data.train.y.to(device)
        flip = bool(data.hflip and ctx.training.hflip)
        n, batch, history = len(x_all), ctx.training.batch_size, []
        for _ in range(self._epochs(ctx)):
            order = torch.randperm(n, generator=g_cpu).to(device)
            losses_g, losses_c = [], []
            for start in range(0, n, batch):
                idx = order[start:start + batch]
                x = self._augment(x_all[idx].float().div(255), g_dev, flip)
                y = y_all[idx]
                target = self.relabel(y)
                losses_g.append(generator_step(live, clf, opt_g, x, target, self.eps))
                loss = classifier_loss(clf, gen, x, y, target, self.eps, self.alpha)
                opt_c.zero_grad(set_to_none=True)
                loss.backward()
                opt_c.step()
                losses_c.append(float(loss.detach()))
            gen.load_state_dict(live.state_dict())
            recalibrate_batchnorm(gen, x_all)  # running statistics for the final weights (eval mode)
            history.append({"generator_loss": sum(losses_g) / len(losses_g),
                            "classifier_loss": sum(losses_c) / len(losses_c)})
        meta = {"history": history, "seconds": round(time.perf_counter() - started, 3),
                **self._rounding_stats(gen, clf.eval(), x_all[:512], y_all[:512])}
        return {f"G.{k}": v.detach().cpu().clone() for k, v in gen.state_dict().items()}, meta

    @torch.no_grad()
    def _rounding_stats(self, gen: nn.Module, clf: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict:
        """How much of the trigger survives uint8 rounding, and the stage-1 classifier's attack success on float
        and on rounded triggers (samples whose label eta(y) differs from y)."""
        xf = x.float().div(255)
        soft = perturb(gen, xf, self.eps)
        hard = quantise(soft)
        target = self.relabel(y)
        keep = target != y
        asr = lambda z: float((clf(z[keep]).argmax(1) == target[keep]).float().mean()) if keep.any() else 0.0  # noqa: E731
        return {"pixels_changed_after_rounding": float((hard != xf).float().mean()),
                "mean_abs_change_grey_levels": float((soft - xf).abs().mean() * 255),
                "stage1_asr_float": asr(soft), "stage1_asr_uint8": asr(hard),
                "stage1_clean_acc": float((clf(xf).argmax(1) == y).float().mean())}

    # -- learned state -------------------------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        if self.generator is None:
            return {}
        return {f"G.{k}": v.detach().cpu().clone() for k, v in self.generator.state_dict().items()}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        if not tensors:
            return
        unknown = sorted(k for k in tensors if not k.startswith("G."))
        if unknown:
            raise ValueError(f"lira: unknown state tensors {unknown[:5]}; allowed: 'G.*'")
        state = {k[2:]: v for k, v in tensors.items()}
        gen = TriggerGenerator(state["encoder.0.weight"].shape[1], state["mean"].flatten(), state["std"].flatten())
        gen.load_state_dict(state)  # strict: a different architecture fails loudly
        self.generator = gen.eval().requires_grad_(False)

    # -- poisoning -----------------------------------------------------------------------------------------
    def apply_trigger(self, x: torch.Tensor) -> torch.Tensor:
        if self.generator is None:
            raise RuntimeError("lira: call prepare(ctx) first (it trains or loads the trigger generator)")
        gen = self.generator.to(x.device).eval()
        with torch.no_grad():
            parts = [apply_to_float(x[s:s + _TRIGGER_BATCH], lambda xf: perturb(gen, xf, self.eps))
                     for s in range(0, len(x), _TRIGGER_BATCH)]
        return torch.cat(parts) if parts else x.clone()

    def train_hooks(self, dataset: Dataset, ratio: float, seed: int) -> TrainHooks:
        check_ratio(self.name, ratio, 0.0)
        if self.generator is None:
            raise RuntimeError("lira: call prepare(ctx) before training (it trains or loads the trigger generator)")
        return LIRAHooks(self, dataset, ratio, seed)


class LIRAHooks(TrainHooks):
    """Per batch: the reference's augmentation (one draw per batch), then the first ``ratio`` share gets the fixed
    generator's trigger, rounded to the uint8 grid, and the label eta(y). Replaces the trainer's crop + flip."""

    def __init__(self, attack: LIRA, dataset: Dataset, ratio: float, seed: int):
        self.attack, self.ratio, self.seed = attack, float(ratio), int(seed)
        self.flip = bool(dataset.hflip)
        self.counts = {"poisoned": 0, "seen": 0}

    def on_train_start(self, model, device, generator) -> None:
        self.g = torch.Generator(device=device).manual_seed(self.seed)
        self.gen = copy.deepcopy(self.attack.generator).to(device).eval()

    def transform_batch(self, x, y):
        a = self.attack
        x = a._augment(x, self.g, self.flip)
        n_bd = batch_poison_count(self.ratio, len(x), self.g)
        x, y = x.clone(), y.clone()
        if n_bd:
            with torch.no_grad():
                x[:n_bd] = quantise(perturb(self.gen, x[:n_bd], a.eps))
        y[:n_bd] = self.attack.relabel(y[:n_bd])
        self.counts["poisoned"] += n_bd
        self.counts["seen"] += len(x)
        return x, y

    def augment(self, x, default):
        return x  # augmented before poisoning, in transform_batch
