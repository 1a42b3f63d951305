"""SAU: Shared Adversarial Unlearning (Shaokui Wei, Mingda Zhang, Hongyuan Zha and Baoyuan Wu, "Shared Adversarial
Unlearning: Backdoor Mitigation by Unlearning Shared Adversarial Examples", NeurIPS 2023).

A backdoor trigger is an adversarial perturbation that the backdoored model and the model being purified both
follow to the same wrong class. SAU keeps a frozen copy of the backdoored model (``f_ref``) and fine-tunes the
model ``f`` (initialised from it) on the defender's clean subset; for each mini-batch:

1. Shared adversarial examples, by L-inf PGD on a per-sample perturbation ``delta`` (pixel space, images in
   [0, 1]): ``delta`` starts at ``+bound`` everywhere (the reference's ``max`` initialisation), then ``pgd_steps``
   (5) times ``delta <- clip(delta - step_size * sign(grad J), -bound, bound)`` (bound 0.2, step 0.2), where

       J = beta_1 * L_adv + beta_2 * L_share,
       L_adv = -(sum_{i: f not yet fooled} CE(f(x_i'), y_i) + sum_{i: f_ref not yet fooled} CE(f_ref(x_i'), y_i))
               / (2 B),
       L_share = sum_{i not yet shared} JS(softmax f(x_i') || softmax f_ref(x_i')) / B

   ("fooled": the prediction at x' differs from the same model's prediction at x; "shared": both fooled, to the
   same class; probabilities clamped at 1e-8 inside the JS divergence). Descending J raises both models' loss
   and pulls their predictions together: beta_1 0.01, beta_2 1. It stops early once every sample is shared
   (after the step that follows).
2. One Adam step (lr 1e-4) on ``f`` for

       L = lambda_1 * CE(f(x), y) + lambda_2 * CE(f(x'), y) + lambda_3 * L_sar,
       L_sar = sum_{i in P} -log(1 - p_f(yhat_ref_i | x_i')) / B,

   ``yhat_ref`` = f_ref's prediction at x', P the samples where it differs from both the label and f_ref's
   prediction at x (potential backdoor examples). As the reference, -log(1 - p) is evaluated as the mean of
   ``-log(1e-6 + min(1 - p, 0.999))`` and ``-log(1 + 1e-6 - max(p, 0.001))`` (the same in exact arithmetic).
   Defaults lambda_1 1, lambda_2 0 (no adversarial training term), lambda_3 1: unlearn only the shared
   examples, keep clean accuracy.

Both models stay in eval mode (batch norm uses its running statistics), as the reference's default
(``train_mode`` off). ``f_ref`` is never changed; only ``f``'s parameters are trained.

Defaults are BackdoorBench's config (config/defense/sau/config.yaml, the authors' own implementation: Shaokui
Wei wrote defense/sau.py): L_inf bound (``trigger_norm``) 0.2, ``adv_lr`` 0.2, ``adv_steps`` 5, ``pgd_init`` max,
beta_1 0.01, beta_2 1, lmd_1 1, lmd_2 0, lmd_3 1, Adam lr 1e-4 (weight decay 0), batch 256, 100 rounds over the
5% clean subset, no augmentation. The paper's experimental setup agrees where it gives values: PGD with the
L_inf norm, 5 steps, bound 0.2, "lambda_1 = lambda_2 = lambda_4 = 1 and lambda_3 = 0.01", 100 epochs on CIFAR-10
and GTSRB (20 on Tiny ImageNet), 5% clean data. Its equations were not available here: that its lambda_1 and
lambda_2 weigh the clean and shared losses and lambda_3, lambda_4 the PGD's adversarial and shared terms is
read off the values (0.01 is the reference's beta_1 alone); the step size, the optimiser and its rate are the
reference's.

Budget: ``epochs`` (None) takes the matrix's ``defense_training`` epochs, and the mini-batch is its batch size,
as FT and FT-SAM (the paper's protocol, 100 epochs and batch 256, is that budget's); ``epochs`` overrides it.
The learning rate is SAU's own (``lr``, 1e-4): the optimiser is Adam, and the budget's rate is an SGD rate (0.01)
that Adam must not take; the budget's momentum, weight decay, schedule and augmentation are likewise not used.

``info``: ``epochs``; the last epoch's mean (over its batches) clean loss CE(f(x), y), adversarial loss
CE(f(x'), y) and shared loss L_sar, all at the step's start; ``potential_fraction``, the share of the clean
subset in P, and ``shared_fraction``, the share whose x' is a shared adversarial example at the update (f and
f_ref both misclassify it, to the same class, and f_ref's prediction moved), over the last epoch.

Departures, and why:
- ``x + delta`` is clipped to [0, 1] (``delta`` is projected on the bound, then on the valid pixel range): the
  reference leaves that clip commented out ("not necessary for backdoor defense"), so its shared examples can
  be impossible images. Here the perturbed images are images.
- The PGD's gradient is taken with respect to ``delta`` only (the reference back-propagates into both models'
  parameters too and discards those gradients; its optimiser clears them).
- The reference's CosineAnnealingLR is built but never stepped: the rate is constant here too.
- Not implemented: the reference's L1 / L2 / unregularised norm types, its other initialisations (zero, random,
  min), ``outer_steps`` > 1 (its default is 1) and ``train_mode`` (batch norm in training mode during the update;
  the reference's comment says it raises both ACC and ASR; off by default).
- fp32 throughout (the reference's config sets amp, which its loop does not use).
- The shuffles are drawn from ``inputs.seed`` (the reference uses the loader's global shuffle).
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from backdoor._checks import check_int, check_number
from backdoor._registry import NOT_STATED, Param
from backdoor.defenses import register_defense
from backdoor.defenses.base import BY_DEFENSE_TRAINING, Defense, DefenseInputs, DefenseOutcome, Stage
from backdoor.mutants import Mutant

JS_FLOOR = 1e-8  # probabilities are clamped at this inside the JS divergence (the reference's value)


def fooled_masks(pred: torch.Tensor, pred_ref: torch.Tensor, clean_pred: torch.Tensor,
                 clean_pred_ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The PGD's masks [B]: f fooled (prediction at x' differs from its prediction at x), f_ref fooled, and
    shared (both fooled, to the same class)."""
    fooled, fooled_ref = pred != clean_pred, pred_ref != clean_pred_ref
    return fooled, fooled_ref, fooled & fooled_ref & (pred == pred_ref)


def js_divergence(logits: torch.Tensor, logits_ref: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon divergence [B] between the two softmax distributions (natural log), probabilities
    clamped at ``JS_FLOOR``."""
    p, q = F.softmax(logits, 1).clamp(min=JS_FLOOR), F.softmax(logits_ref, 1).clamp(min=JS_FLOOR)
    m = 0.5 * (p + q)
    return 0.5 * (p * (p.log() - m.log()) + q * (q.log() - m.log())).sum(1)


def pgd_objective(logits: torch.Tensor, logits_ref: torch.Tensor, y: torch.Tensor, clean_pred: torch.Tensor,
                  clean_pred_ref: torch.Tensor, beta_1: float, beta_2: float) -> torch.Tensor:
    """J = beta_1 * L_adv + beta_2 * L_share at the perturbed images' logits (f's and f_ref's), which the PGD
    descends: L_adv is minus the mean cross-entropy (halved, one half per model) over the samples a model does
    not yet misclassify, L_share the JS divergence summed over the samples not yet shared, over B."""
    b = len(y)
    fooled, fooled_ref, shared = fooled_masks(logits.argmax(1), logits_ref.argmax(1), clean_pred, clean_pred_ref)
    ce = F.cross_entropy(logits, y, reduction="none")
    ce_ref = F.cross_entropy(logits_ref, y, reduction="none")
    loss_adv = -((ce * ~fooled).sum() + (ce_ref * ~fooled_ref).sum()) / (2 * b)
    loss_share = (js_divergence(logits, logits_ref) * ~shared).sum() / b
    return beta_1 * loss_adv + beta_2 * loss_share


def shared_pgd(model: nn.Module, reference: nn.Module, x: torch.Tensor, y: torch.Tensor, *, bound: float = 0.2,
               step_size: float = 0.2, steps: int = 5, beta_1: float = 0.01, beta_2: float = 1.0) -> torch.Tensor:
    """Per-sample shared adversarial perturbations ``delta`` (the shape of ``x``, float images in [0, 1]):
    from +bound, ``steps`` signed-gradient steps descending ``pgd_objective``, each projected on the L-inf
    ball of radius ``bound`` and on [0, 1] for ``x + delta``. Neither model changes."""
    with torch.no_grad():
        clean_pred, clean_pred_ref = model(x).argmax(1), reference(x).argmax(1)
    delta = project(torch.full_like(x, bound), x, bound)
    for _ in range(steps):
        delta.requires_grad_(True)
        logits, logits_ref = model(x + delta), reference(x + delta)
        objective = pgd_objective(logits, logits_ref, y, clean_pred, clean_pred_ref, beta_1, beta_2)
        (grad,) = torch.autograd.grad(objective, delta)
        with torch.no_grad():
            all_shared = bool(fooled_masks(logits.argmax(1), logits_ref.argmax(1), clean_pred, clean_pred_ref)[2].all())
            delta = delta.detach() - step_size * grad.sign()
            delta = project(delta, x, bound)
        if all_shared:
            break
    return delta.detach()


def project(delta: torch.Tensor, x: torch.Tensor, bound: float) -> torch.Tensor:
    """``delta`` clipped to [-bound, bound], then so that ``x + delta`` lies in [0, 1]."""
    delta = delta.clamp(-bound, bound)
    return (x + delta).clamp(0, 1) - x


def shared_unlearning_loss(adv_logits: torch.Tensor, adv_logits_ref: torch.Tensor,
                           clean_logits_ref: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """L_sar and its mask P [B]: sum over P of -log(1 - p_f(yhat_ref | x')) / B, yhat_ref f_ref's prediction at
    x', P where it differs from the label and from f_ref's prediction at x. Evaluated as the reference (the
    mean of two clamped forms of the same value)."""
    pred_ref = adv_logits_ref.argmax(1)
    potential = (pred_ref != y) & (pred_ref != clean_logits_ref.argmax(1))
    p = F.softmax(adv_logits, 1).gather(1, pred_ref[:, None])[:, 0]
    rest = (F.softmax(adv_logits, 1) * (1 - F.one_hot(pred_ref, adv_logits.shape[1]))).sum(1)
    per_sample = -(torch.log(1e-6 + rest.clamp(max=0.999)) + torch.log(1 + 1e-6 - p.clamp(min=0.001))) / 2
    return (per_sample * potential).sum() / len(y), potential


def unlearning_loss(model: nn.Module, reference: nn.Module, x: torch.Tensor, y: torch.Tensor, delta: torch.Tensor,
                    lambdas: tuple[float, float, float]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss the model steps on: lambda_1 * CE(f(x), y) + lambda_2 * CE(f(x'), y) + lambda_3 * L_sar, x' = x +
    delta. Returns it and its parts (detached): clean, adversarial (CE at x'), shared (L_sar), the masks
    ``potential`` (P) and ``shared`` (f and f_ref both misclassify x', to the same class, f_ref's prediction
    also moved by delta)."""
    logits, adv_logits = model(torch.cat([x, x + delta])).split(len(x))
    with torch.no_grad():
        clean_logits_ref, adv_logits_ref = reference(torch.cat([x, x + delta])).split(len(x))
    loss_clean = F.cross_entropy(logits, y)
    loss_adv = F.cross_entropy(adv_logits, y)
    loss_shared, potential = shared_unlearning_loss(adv_logits, adv_logits_ref, clean_logits_ref, y)
    lambda_1, lambda_2, lambda_3 = lambdas
    total = lambda_1 * loss_clean + lambda_2 * loss_adv + lambda_3 * loss_shared
    shared = potential & (adv_logits.argmax(1) != y) & (adv_logits.argmax(1) == adv_logits_ref.argmax(1))
    parts = {"clean": loss_clean.detach(), "adversarial": loss_adv.detach(), "shared": loss_shared.detach(),
             "potential": potential, "shared_mask": shared}
    return total, parts


@register_defense("sau")
class SharedAdversarialUnlearning(Defense):
    """SAU: unlearn shared adversarial examples of the backdoored model and the model being purified."""

    kind = "model_repair"
    title = "SAU"
    description = ("unlearn shared adversarial examples: per batch, L-inf PGD (5 steps, bound 0.2) makes the "
                   "backdoored and the purified model misclassify alike, then Adam (lr 1e-4) on clean CE + the "
                   "shared-adversarial loss")
    order = 57
    # The paper's column: from its experimental setup (its equations were not available to check; the mapping
    # of its lambda_1..lambda_4 onto these weights is inferred from the values, see the docstring).
    parameters = {
        "epochs": Param("100 (Tiny ImageNet: 20)", "100 (`n_rounds`)", f"None: {BY_DEFENSE_TRAINING}"),
        "lr": Param(NOT_STATED, "1e-4 (Adam, wd 0)", "SAU's own rate: Adam does not take the budget's SGD rate"),
        "bound": Param("0.2 (L_inf)", "0.2 (`trigger_norm`, L_inf)", "the L_inf radius of the perturbation, in [0, 1] "
                       "pixel units"),
        "step_size": Param(NOT_STATED, "0.2 (`adv_lr`)", "the PGD's signed-gradient step"),
        "pgd_steps": Param("5", "5 (`adv_steps`)", "PGD steps per batch (fewer once all are shared)"),
        "beta_1": Param("0.01 (its lambda_3)", "0.01", "weight of the adversarial loss in the PGD's objective"),
        "beta_2": Param("1 (its lambda_4)", "1", "weight of the JS (shared) loss in the PGD's objective"),
        "lambda_1": Param("1 (its lambda_1)", "1 (`lmd_1`)", "weight of the clean loss in the unlearning loss"),
        "lambda_2": Param(NOT_STATED, "0 (`lmd_2`)", "weight of adversarial training (CE at x') in it; 0: none"),
        "lambda_3": Param("1 (its lambda_2)", "1 (`lmd_3`)", "weight of the shared adversarial loss L_sar in it"),
    }
    budgets = (
        Stage("shared adversarial unlearning (PGD, then one Adam step per batch)", "defense_training",
              "`epochs` (the budget's epochs and batch size; the Adam rate is SAU's `lr`)"),
    )
    # Each find starts with a newline and the line's indentation: it then matches the code line and not its
    # own text here, where the newline is an escape.
    mutants = (
        Mutant("pgd-ascends", "the PGD climbs its objective instead of descending it",
               "\n            delta = delta.detach() - step_size * grad.sign()",
               "\n            delta = delta.detach() + step_size * grad.sign()"),
        Mutant("unprojected", "the perturbation is not clipped to the L_inf bound (only to [0, 1])",
               "\n    delta = delta.clamp(-bound, bound)", "\n    delta = delta.clamp(-1, 1)"),
        Mutant("plain-adversarial", "the unlearning term is the plain adversarial loss (CE at x', adversarial "
               "training) instead of the shared one",
               "\n    total = lambda_1 * loss_clean + lambda_2 * loss_adv + lambda_3 * loss_shared",
               "\n    total = lambda_1 * loss_clean + lambda_2 * loss_adv + lambda_3 * loss_adv"),
        Mutant("shared-weight-ignored", "lambda_3 is taken as 1 whatever it is set to",
               "\n    lambda_1, lambda_2, lambda_3 = lambdas",
               "\n    lambda_1, lambda_2, lambda_3 = (*lambdas[:2], 1.0)"),
        Mutant("no-shared-term", "the PGD ignores the shared (JS) term: plain adversarial examples of both models",
               "\n    return beta_1 * loss_adv + beta_2 * loss_share", "\n    return beta_1 * loss_adv"),
        Mutant("model-not-updated", "the optimiser never steps: the model is returned unchanged",
               "\n                optimizer.step()", "\n                pass"),
        Mutant("reference-not-frozen", "f_ref is the model being trained, not a frozen copy of the backdoored one",
               "\n        reference = copy.deepcopy(model).eval().requires_grad_(False)",
               "\n        reference = model"),
        Mutant("ignores-epochs", "its epochs do not override the defense budget",
               "\n        epochs = inputs.training.epochs if self.epochs is None else self.epochs",
               "\n        epochs = inputs.training.epochs"),
    )

    def __init__(self, epochs: int | None = None, lr: float = 1e-4, bound: float = 0.2, step_size: float = 0.2,
                 pgd_steps: int = 5, beta_1: float = 0.01, beta_2: float = 1.0, lambda_1: float = 1.0,
                 lambda_2: float = 0.0, lambda_3: float = 1.0):
        check_int("sau", "epochs", epochs, minimum=1, optional=True)
        check_number("sau", "lr", lr, low=0, low_open=True)
        check_number("sau", "bound", bound, low=0, high=1, low_open=True)
        check_number("sau", "step_size", step_size, low=0, low_open=True)
        check_int("sau", "pgd_steps", pgd_steps, minimum=1)
        for key, value in (("beta_1", beta_1), ("beta_2", beta_2), ("lambda_1", lambda_1), ("lambda_2", lambda_2),
                           ("lambda_3", lambda_3)):
            check_number("sau", key, value, low=0)
        self.epochs, self.lr, self.bound, self.step_size, self.pgd_steps = epochs, lr, bound, step_size, pgd_steps
        self.beta_1, self.beta_2 = beta_1, beta_2
        self.lambda_1, self.lambda_2, self.lambda_3 = lambda_1, lambda_2, lambda_3

    def run(self, inputs: DefenseInputs) -> DefenseOutcome:
        device = inputs.device
        epochs = inputs.training.epochs if self.epochs is None else self.epochs
        model = inputs.model.to(device).eval()
        reference = copy.deepcopy(model).eval().requires_grad_(False)  # f_ref: the backdoored model, frozen
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.Adam(params, lr=self.lr)
        g = torch.Generator().manual_seed(inputs.seed)
        x_all = inputs.clean.x.to(device).float().div_(255)
        y_all = inputs.clean.y.to(device)
        n = len(x_all)
        batch = min(inputs.training.batch_size, n)
        for _ in range(epochs):
            sums = {"clean": 0.0, "adversarial": 0.0, "shared": 0.0}
            potential = shared = batches = 0
            order = torch.randperm(n, generator=g).to(device)
            for i in range(0, n, batch):
                x, y = x_all[order[i:i + batch]], y_all[order[i:i + batch]]
                delta = shared_pgd(model, reference, x, y, bound=self.bound, step_size=self.step_size,
                                   steps=self.pgd_steps, beta_1=self.beta_1, beta_2=self.beta_2)
                optimizer.zero_grad(set_to_none=True)
                loss, parts = unlearning_loss(model, reference, x, y, delta,
                                               (self.lambda_1, self.lambda_2, self.lambda_3))
                loss.backward()
                optimizer.step()
                for key in sums:
                    sums[key] += float(parts[key])
                potential += int(parts["potential"].sum())
                shared += int(parts["shared_mask"].sum())
                batches += 1
        optimizer.zero_grad(set_to_none=True)
        info = {"epochs": epochs, "clean_loss": sums["clean"] / batches,
                "adversarial_loss": sums["adversarial"] / batches, "shared_loss": sums["shared"] / batches,
                "shared_fraction": shared / n, "potential_fraction": potential / n}
        return DefenseOutcome(model=model.eval(), info=info)
