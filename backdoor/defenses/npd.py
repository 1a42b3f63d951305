"""NPD: Neural Polarizer Defense (Mingli Zhu, Shaokui Wei, Hongyuan Zha and Baoyuan Wu, "Neural Polarizer: A
Lightweight and Effective Backdoor Defense via Purifying Poisoned Features", NeurIPS 2023).

A learnable lightweight layer, the neural polarizer, is inserted into the frozen backdoored model and trained
alone on the defender's clean subset, so that it filters trigger features out of the representation while
keeping benign ones. The polarizer is a 1x1 convolution (C -> C, no bias) followed by a batch norm, initialised
to the identity (the convolution's weight is the identity matrix; the batch norm's running variance is set to
1 - eps so that its eval-mode output is exactly its input).

Training (only the polarizer's parameters; every original weight and buffer stays bit-identical; the model runs
in eval mode throughout):

1. Warm-up, ``warm_epochs`` (5) passes of SGD (lr 1e-4, no momentum) on the clean cross-entropy with the
   polarizer's batch norm in train mode: it normalises with batch statistics and its running statistics follow
   the features (as the reference's warm-up does).
2. Then ``epochs`` (50) passes, the polarizer in eval mode, SGD (``lr`` 0.01, momentum 0.9, weight decay 5e-4,
   constant rate), batches of ``batch_size`` (128) in a seeded shuffle. Per batch (images x in [0, 1], labels y):
   - the model's prediction on x, y_hat = argmax f(x), and the estimated target t = the most likely class other
     than the true one, argmax over the classes != y of f(x);
   - inner step (targeted PGD, the bi-level's inner maximisation of the backdoor risk): delta from 0, for up to
     ``pgd_steps`` (2) steps: delta <- delta - ``pgd_step`` (0.1) * sign(grad_delta mean CE(f(clip(x + delta)), t))
     (the per-sample CE clamped to [-80, 80]), each sample's delta projected on the L2 ball of radius
     ``trigger_norm`` (3.0, pixel space); it stops early once more than 60% of the batch is classified as t;
   - outer loss, with p = softmax(f(x_adv)), x_adv = clip(x + delta):
     ``lmd1 * CE(f(x), y) + lmd2 * CE(f(x_adv), y_hat) + lmd3 * mean(-log(1.0001 - p[y'] + 1e-12))
     + lmd4 * mean(-log(1.0001 - p[t] + 1e-12))``, y' the most likely class of x_adv other than y (the
     adversarial's top class, or its second where the top one is y); weights 1, 0.4, 0.4, 0.4.

The trained polarizer (conv, then the batch norm in eval mode: an affine map of the channels at each position) is
folded into a ``ChannelMap`` (``backdoor.models``: weight diag(gamma / sqrt(var + eps)) W, bias beta - gamma * mean /
sqrt(var + eps)) and inserted after the same layer of the returned ``Classifier`` with ``insert_after``: it is
part of the model's forward pass and of its state dict (``inserted.<layer>.*``), from which ``load_state_dict``
rebuilds it, so the harness's cache, evaluation and reloading work on it unchanged.

Where: after the layer the model's roles name ``last_conv`` (the block whose output channels are the last
convolutional layer: ``layer4`` of PreAct-ResNet18, ``block3`` of cnn_small, the last feature block of the
torchvision models), on its output feature map [N, C, H, W]. A model whose ``last_conv`` output is not a
4-dimensional feature map raises ``NotApplicable``.

Defaults: BackdoorBench's config (config/defense/npd/config.yaml and cifar10.yaml, the same values):
epochs 50, batch 128, lr 0.01 (SGD, momentum 0.9, wd 5e-4), warm_epochs 5, inner_steps 2, trigger_norm 3.0 (L2),
lmd1..4 = 1, 0.4, 0.4, 0.4, the 'convbn' polarizer; the PGD step 0.1 (L2), the early stop at 60%, the loss clamp
80 and the warm-up's lr 1e-4 are constants of defense/npd.py. The paper gives BackdoorBench as its code (and a
MindSpore port), and defense/npd.py calls itself the official implementation; the paper's own text was not
available to check its numbers, hence "not stated" in its column.

Departures, and why:
- Insertion point: the reference inserts the polarizer before ``layer4.1.conv1`` of PreAct-ResNet18 (inside the
  last stage, after the second block's pre-activation; it asserts the model is PreAct-ResNet18). Here it goes
  after the ``last_conv`` role (the output of ``layer4``, one block later), the one place every registered
  model names the same way.
- The batch norm's running variance starts at 1 - eps instead of 1, so the polarizer is exactly the identity at
  the start (the reference's divides by sqrt(1 + eps)); the warm-up replaces these statistics anyway.
- The target estimate masks the true class with -inf; the reference writes -10 into its logit (the same unless
  every other logit is below -10).
- The reference's 'tiny' (Tiny ImageNet) branch (SGD steps on delta instead of sign steps, batch-norm statistics
  updated on clean batches) and its other polarizer structures and norms (ablations) are not implemented.
- The L2 projection is vectorised over the batch (the reference loops over samples; the same values).
- The reference selects its clean subset per class (``choose_by_class``); here it is the harness's defender
  subset. No augmentation, as the reference (its loader uses the test transform). Shuffles are drawn from
  ``inputs.seed``.
- The reference evaluates on the test sets after every epoch (for its logs): not done, a defense reads no test
  data.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from backdoor._checks import check_int, check_number
from backdoor._registry import NOT_STATED, Param
from backdoor.defenses import NotApplicable, register_defense
from backdoor.defenses.base import Defense, DefenseInputs, DefenseOutcome, Stage
from backdoor.models import ChannelMap, Classifier
from backdoor.models.roles import module_at
from backdoor.mutants import Mutant

LOSS_BOUND = 80.0  # the per-sample targeted CE is clamped to [-80, 80] (the reference's loss_bound)
EARLY_STOP = 0.6  # PGD stops once more than this share of the batch is classified as its target
WARM_LR = 1e-4  # the warm-up's SGD rate (a constant of the reference)
MOMENTUM, WEIGHT_DECAY = 0.9, 5e-4  # the main stage's SGD (a constant of the reference)


class Polarizer(nn.Module):
    """The neural polarizer: a 1x1 convolution (no bias) and a batch norm over ``channels``, the identity at the
    start (identity weight; running variance 1 - eps, so that eval mode divides by exactly 1)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 1, bias=False)
        self.bn = nn.BatchNorm2d(channels)
        with torch.no_grad():
            self.conv.weight.copy_(torch.eye(channels)[:, :, None, None])
            self.bn.running_var.fill_(1.0 - self.bn.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))

    @torch.no_grad()
    def folded(self) -> ChannelMap:
        """The eval-mode polarizer as one ``ChannelMap``: the same outputs (up to rounding)."""
        bn = self.bn
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        channel_map = ChannelMap(bn.num_features).to(scale.device)
        channel_map.weight.copy_(scale[:, None] * self.conv.weight[:, :, 0, 0])
        channel_map.bias.copy_(bn.bias - scale * bn.running_mean)
        return channel_map


def estimated_target(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The most likely class other than the true one: argmax of the logits with the label's masked out."""
    return logits.scatter(1, labels[:, None], float("-inf")).argmax(1)


def project_l2(delta: torch.Tensor, radius: float) -> torch.Tensor:
    """Each sample's perturbation scaled onto the L2 ball of ``radius`` where it lies outside."""
    norms = delta.flatten(1).norm(dim=1).view(-1, *([1] * (delta.dim() - 1)))
    return torch.where(norms > radius, delta * (radius / norms.clamp_min(1e-12)), delta)


def targeted_pgd(model: nn.Module, x: torch.Tensor, target: torch.Tensor, *, steps: int, step: float,
                 radius: float, early_stop: float = EARLY_STOP) -> torch.Tensor:
    """The inner step: per-sample perturbations (pixel space, x in [0, 1]) from 0 that lower the clamped
    cross-entropy towards ``target`` by sign steps of ``step``, each projected on the L2 ball of ``radius``;
    stops once more than ``early_stop`` of the batch is classified as its target. The model is not changed."""
    delta = torch.zeros_like(x)
    for _ in range(steps):
        delta.requires_grad_(True)
        loss = F.cross_entropy(model((x + delta).clamp(0, 1)), target, reduction="none")
        (grad,) = torch.autograd.grad(loss.clamp(-LOSS_BOUND, LOSS_BOUND).mean(), delta)
        with torch.no_grad():
            delta = delta - step * grad.sign()
            delta = project_l2(delta, radius)
            hit = (model((x + delta).clamp(0, 1)).argmax(1) == target).float().mean()
        if float(hit) > early_stop:
            break
    return delta.detach()


def npd_loss(clean_logits: torch.Tensor, adv_logits: torch.Tensor, labels: torch.Tensor, predicted: torch.Tensor,
             target: torch.Tensor, weights: tuple[float, float, float, float]) -> tuple[torch.Tensor, list[float]]:
    """The outer loss and its four terms: clean CE to the labels; the adversarial examples' CE to the model's
    predictions on the clean images; -log(1.0001 - p) of their most likely wrong class; and of the estimated
    target."""
    probs = F.softmax(adv_logits, dim=1)
    top2 = probs.topk(2, dim=1).indices
    wrong = torch.where(top2[:, 0] == labels, top2[:, 1], top2[:, 0])

    def suppress(classes: torch.Tensor) -> torch.Tensor:
        return -torch.log(1.0001 - probs.gather(1, classes[:, None]) + 1e-12).mean()

    terms = [F.cross_entropy(clean_logits, labels), F.cross_entropy(adv_logits, predicted), suppress(wrong),
             suppress(target)]
    total = sum(w * t for w, t in zip(weights, terms))
    return total, [float(t.detach()) for t in terms]


def insertion_point(model: Classifier, x: torch.Tensor) -> tuple[str, int]:
    """The layer after which the polarizer goes (the ``last_conv`` role) and its channel count, read from its
    output on ``x``; NotApplicable unless that output is a feature map [N, C, H, W]."""
    name = model.roles.last_conv
    store = {}
    handle = module_at(model, name).register_forward_hook(lambda _m, _i, out: store.__setitem__("out", out))
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    out = store.get("out")
    if not isinstance(out, torch.Tensor) or out.dim() != 4:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise NotApplicable(f"npd: the last convolutional block ({name!r}) outputs {shape}, not a feature map "
                            "[N, C, H, W] to insert the polarizer after")
    return name, out.shape[1]


@register_defense("npd")
class NeuralPolarizerDefense(Defense):
    """NPD: train an identity-initialised 1x1 conv + BN inserted after the last conv block, alone, on clean and
    targeted adversarial examples; return the model with it inserted."""

    kind = "model_repair"
    title = "NPD"
    description = ("insert a neural polarizer (1x1 conv + BN, identity at the start) after the last conv block and train "
                   "only it against targeted L2 PGD examples (norm 3, 2 steps): clean CE + 0.4 x three adversarial "
                   "terms, 50 epochs, lr 0.01")
    order = 58
    parameters = {  # the paper's column: its text was not available to check (see the docstring)
        "epochs": Param(NOT_STATED, "50", "BackdoorBench's config (the authors' implementation)"),
        "warm_epochs": Param(NOT_STATED, "5", "clean warm-up (lr 1e-4, polarizer BN in train mode): the config"),
        "lr": Param(NOT_STATED, "0.01", "SGD, momentum 0.9, wd 5e-4, constant: the config"),
        "batch_size": Param(NOT_STATED, "128", "the config"),
        "pgd_steps": Param(NOT_STATED, "2 (`inner_steps`)", "the config; early stop at 60% on the target"),
        "pgd_step": Param(NOT_STATED, "0.1 (L2)", "sign-step size in pixel space: the reference's constant"),
        "trigger_norm": Param(NOT_STATED, "3.0 (L2)", "per-sample L2 radius in pixel space: the config"),
        "lmd1": Param(NOT_STATED, "1.0", "weight of the clean CE: the config"),
        "lmd2": Param(NOT_STATED, "0.4", "weight of the adversarial CE to the clean prediction: the config"),
        "lmd3": Param(NOT_STATED, "0.4", "weight of -log(1 - p) of the adversarial's top wrong class: the config"),
        "lmd4": Param(NOT_STATED, "0.4", "weight of -log(1 - p) of the estimated target: the config"),
    }
    budgets = (
        Stage("warm-up of the polarizer on the clean subset", "own parameters", "`warm_epochs`, `batch_size`"),
        Stage("polarizer training on clean + targeted PGD examples", "own parameters",
              "`epochs`, `lr`, `batch_size`, `pgd_steps`, `pgd_step`, `trigger_norm`, `lmd1`-`lmd4`"),
    )
    # Each find starts with a newline and the line's indentation: it then matches the code line and not its
    # own text here, where the newline is an escape.
    mutants = (
        Mutant("not-in-forward", "the polarizer is trained outside the model's forward: training does not "
               "see it, and the returned model carries an untrained one",
               "\n        hook = module_at(model, site).register_forward_hook(lambda _m, _i, out: polarizer(out))",
               "\n        hook = module_at(model, site).register_forward_hook(lambda _m, _i, out: None)"),
        Mutant("not-returned", "the trained polarizer is not inserted into the returned model",
               "\n        model.insert_after(site, polarizer.folded())", "\n        pass"),
        Mutant("trains-the-model", "the original weights are trained along with the polarizer",
               "\n        trained = list(polarizer.parameters())",
               "\n        trained = list(polarizer.parameters()) + [p.requires_grad_(True) for p in frozen]"),
        Mutant("pgd-away", "the PGD step ascends the targeted loss: away from the target instead of towards it",
               "\n            delta = delta - step * grad.sign()", "\n            delta = delta + step * grad.sign()"),
        Mutant("no-adversarial-terms", "the outer loss is the clean CE alone",
               "\n    total = sum(w * t for w, t in zip(weights, terms))", "\n    total = weights[0] * terms[0]"),
        Mutant("not-identity", "the polarizer starts from PyTorch's random 1x1 conv instead of the identity",
               "\n            self.conv.weight.copy_(torch.eye(channels)[:, :, None, None])",
               "\n            pass"),
        Mutant("adversarial-ce-to-labels", "the adversarial CE goes to the true labels instead of the model's "
               "clean predictions",
               "\n                    predicted, target = logits.argmax(1), estimated_target(logits, y)",
               "\n                    predicted, target = y, estimated_target(logits, y)"),
        Mutant("target-may-be-the-label", "the target estimate is the model's top class, the true one included",
               "\n                    predicted, target = logits.argmax(1), estimated_target(logits, y)",
               "\n                    predicted, target = logits.argmax(1), logits.argmax(1)"),
        Mutant("no-projection", "the perturbation is not projected on the L2 ball",
               "\n            delta = project_l2(delta, radius)", "\n            pass"),
    )

    def __init__(self, epochs: int = 50, warm_epochs: int = 5, lr: float = 0.01, batch_size: int = 128,
                 pgd_steps: int = 2, pgd_step: float = 0.1, trigger_norm: float = 3.0, lmd1: float = 1.0,
                 lmd2: float = 0.4, lmd3: float = 0.4, lmd4: float = 0.4):
        check_int("npd", "epochs", epochs, minimum=1)
        check_int("npd", "warm_epochs", warm_epochs, minimum=0)
        check_number("npd", "lr", lr, low=0, low_open=True)
        check_int("npd", "batch_size", batch_size, minimum=1)
        check_int("npd", "pgd_steps", pgd_steps, minimum=1)
        check_number("npd", "pgd_step", pgd_step, low=0, low_open=True)
        check_number("npd", "trigger_norm", trigger_norm, low=0, low_open=True)
        for key, value in (("lmd1", lmd1), ("lmd2", lmd2), ("lmd3", lmd3), ("lmd4", lmd4)):
            check_number("npd", key, value, low=0)
        self.epochs, self.warm_epochs, self.lr, self.batch_size = epochs, warm_epochs, lr, batch_size
        self.pgd_steps, self.pgd_step, self.trigger_norm = pgd_steps, pgd_step, trigger_norm
        self.lmd1, self.lmd2, self.lmd3, self.lmd4 = lmd1, lmd2, lmd3, lmd4

    def run(self, inputs: DefenseInputs) -> DefenseOutcome:
        device = inputs.device
        model = inputs.model.to(device).eval()
        x_all = inputs.clean.x.to(device).float().div_(255)
        y_all = inputs.clean.y.to(device)
        n, batch = len(x_all), min(self.batch_size, len(x_all))
        site, channels = insertion_point(model, x_all[:batch])
        polarizer = Polarizer(channels).to(device)
        frozen = [p for p in model.parameters() if p.requires_grad]
        for p in frozen:
            p.requires_grad_(False)
        trained = list(polarizer.parameters())
        g = torch.Generator().manual_seed(inputs.seed)

        def batches():
            order = torch.randperm(n, generator=g).to(device)
            return [order[i:i + batch] for i in range(0, n, batch)]

        hook = module_at(model, site).register_forward_hook(lambda _m, _i, out: polarizer(out))
        try:
            warm = torch.optim.SGD(trained, lr=WARM_LR)
            polarizer.train()
            for _ in range(self.warm_epochs):
                for idx in batches():
                    loss = F.cross_entropy(model(x_all[idx]), y_all[idx])
                    warm.zero_grad(set_to_none=True)
                    loss.backward()
                    warm.step()
            polarizer.eval()
            optimizer = torch.optim.SGD(trained, lr=self.lr, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
            for _ in range(self.epochs):
                totals, count = torch.zeros(5), 0
                for idx in batches():
                    x, y = x_all[idx], y_all[idx]
                    with torch.no_grad():
                        logits = model(x)
                    predicted, target = logits.argmax(1), estimated_target(logits, y)
                    delta = targeted_pgd(model, x, target, steps=self.pgd_steps, step=self.pgd_step,
                                         radius=self.trigger_norm)
                    loss, terms = npd_loss(model(x), model((x + delta).clamp(0, 1)), y, predicted, target,
                                           (self.lmd1, self.lmd2, self.lmd3, self.lmd4))
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    totals += torch.tensor([float(loss.detach()), *terms]) * len(idx)
                    count += len(idx)
                epoch_losses = (totals / count).tolist()
        finally:
            hook.remove()
            for p in frozen:
                p.requires_grad_(True)
        model.insert_after(site, polarizer.folded())
        names = ("total", "clean_ce", "adversarial_ce", "wrong_class", "target_class")
        info = {"insertion_point": site, "channels": channels, "epochs": self.epochs,
                "warm_epochs": self.warm_epochs, "last_epoch_losses": dict(zip(names, epoch_losses))}
        return DefenseOutcome(model=model.eval(), info=info)
