"""The one training loop of the project (attacks, reference models and defenses all use it).

Speed decisions live here (after airbench / hlb-CIFAR10): the whole training set is one uint8 tensor on the
device; each batch is gathered by index, converted to float, randomly cropped and flipped in one batched op on
the device; no DataLoader on the hot path; bf16 autocast on CUDA. Everything random is drawn from generators
seeded by ``seed``.

``TrainHooks`` lets a training-controllable attack (WaNet, Input-aware, Blind) change every batch, replace the
batch's loss or add loss terms without a second loop; ``loss_fn`` lets a defense replace the objective (ABL's flooding, NAD's
attention transfer); ``step`` replaces the optimiser step for methods that need more than one gradient per
batch (FT-SAM's sharpness-aware step).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from backdoor.data import Split
from backdoor.progress import progress


@dataclass(frozen=True)
class TrainConfig:
    """Paper defaults for attack training (Table 1 protocol): SGD 0.01, momentum 0.9, wd 5e-4, batch 128,
    cosine schedule, 100 epochs, random crop (pad 4) + horizontal flip."""

    epochs: int = 100
    batch_size: int = 128
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"  # "cosine" (per epoch, to zero) or "constant"
    crop_padding: int = 4  # 0 disables the random crop
    hflip: bool = True  # the dataset may veto it (Dataset.hflip)
    amp: bool = True  # bf16 autocast, CUDA only

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        allowed = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - allowed)
        if unknown:
            raise ValueError(f"unknown training key(s) {unknown}; allowed: {sorted(allowed)}")
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)

    def with_(self, **changes) -> "TrainConfig":
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


class NonFiniteLossError(ArithmeticError):
    """Training diverged: an epoch's mean loss is NaN or infinite (the case stops; nothing is cached or scored)."""


class TrainHooks:
    """Extension points of ``fit``; every method is a no-op by default."""

    def on_train_start(self, model: nn.Module, device: torch.device, generator: torch.Generator) -> None:
        pass

    def on_epoch_start(self, epoch: int) -> None:
        pass

    def transform_batch(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Called on float [0, 1] images before augmentation; returns the batch to train on."""
        return x, y

    def augment(self, x: torch.Tensor, default: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Batch augmentation; override to replace the default crop + flip."""
        return default(x)

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: "LossFn") -> torch.Tensor:
        """The batch's loss on the augmented batch, before ``extra_loss``; override to combine several terms
        (Blind's clean loss + a triggered copy's loss). Default: ``loss_fn(model, x, y)``."""
        return loss_fn(model, x, y)

    def extra_loss(self, model: nn.Module) -> torch.Tensor | None:
        """An extra term added to the step's loss (e.g. a generator's diversity loss)."""
        return None

    def after_step(self) -> None:
        """After the classifier's optimiser step (e.g. step a generator's own optimiser)."""

    def on_train_end(self) -> None:
        pass


LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
# step(model, optimizer, closure) -> the batch's loss; closure() runs the forward pass (under autocast) and
# returns the loss, without backward: the step computes the gradients it needs and steps the optimizer.
StepFn = Callable[[nn.Module, torch.optim.Optimizer, Callable[[], torch.Tensor]], torch.Tensor]


def sgd_step(model: nn.Module, optimizer: torch.optim.Optimizer, closure: Callable[[], torch.Tensor]) -> torch.Tensor:
    """The plain step: one gradient of the batch's loss, one optimizer step."""
    optimizer.zero_grad(set_to_none=True)
    loss = closure()
    loss.backward()
    optimizer.step()
    return loss


def cross_entropy_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x), y)


def random_crop_flip(x: torch.Tensor, padding: int, flip: bool, g: torch.Generator) -> torch.Tensor:
    """Per-sample random crop (zero padding) and horizontal flip of a batch, as one gather on the device."""
    n, c, h, w = x.shape
    if padding > 0:
        padded = F.pad(x, (padding,) * 4)
        off = torch.randint(0, 2 * padding + 1, (2, n), device=x.device, generator=g)
        rows = (off[0, :, None] + torch.arange(h, device=x.device))[:, None, :, None]
        cols = (off[1, :, None] + torch.arange(w, device=x.device))[:, None, None, :]
        x = padded[torch.arange(n, device=x.device)[:, None, None, None],
                   torch.arange(c, device=x.device)[None, :, None, None], rows, cols]
    if flip:
        mirror = torch.rand(n, device=x.device, generator=g) < 0.5
        x = torch.where(mirror[:, None, None, None], x.flip(3), x)
    return x


def _autocast(device: torch.device, enabled: bool):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled and device.type == "cuda")


def fit(model: nn.Module, data: Split, config: TrainConfig, *, device: torch.device, seed: int,
        hooks: TrainHooks | None = None, loss_fn: LossFn = cross_entropy_loss, params=None,
        step: StepFn = sgd_step, desc: str = "train") -> dict:
    """Train ``model`` in place on ``data`` and return per-epoch statistics.

    ``params`` restricts the optimised parameters (default: all of ``model``'s); ``step`` replaces the
    optimizer step (default ``sgd_step``).
    """
    if len(data) == 0:
        raise ValueError("cannot train on an empty split")
    hooks = hooks or TrainHooks()
    model.to(device).train()
    g_cpu = torch.Generator().manual_seed(seed)
    g_dev = torch.Generator(device=device).manual_seed(seed + 1)
    torch.manual_seed(seed + 2)  # dropout and any other global draws
    x_all, y_all = data.x.to(device), data.y.to(device)
    optimizer = torch.optim.SGD(params if params is not None else model.parameters(), lr=config.lr,
                                momentum=config.momentum, weight_decay=config.weight_decay)
    scheduler = (torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(config.epochs, 1))
                 if config.schedule == "cosine" else None)
    default_aug = lambda x: random_crop_flip(x, config.crop_padding, config.hflip, g_dev)  # noqa: E731
    hooks.on_train_start(model, device, g_dev)
    history = []
    bar = progress(range(config.epochs), desc=desc)
    for epoch in bar:
        hooks.on_epoch_start(epoch)
        order = torch.randperm(len(data), generator=g_cpu).to(device)
        total_loss, seen = torch.zeros((), device=device), 0
        for start in range(0, len(data), config.batch_size):
            idx = order[start:start + config.batch_size]
            x = x_all[idx].float().div_(255)
            x, y = hooks.transform_batch(x, y_all[idx])
            x = hooks.augment(x, default_aug)

            def closure(x=x, y=y) -> torch.Tensor:
                with _autocast(device, config.amp):
                    loss = hooks.loss(model, x, y, loss_fn)
                    extra = hooks.extra_loss(model)
                    return loss if extra is None else loss + extra

            loss = step(model, optimizer, closure)
            hooks.after_step()
            total_loss += loss.detach() * len(idx)
            seen += len(idx)
        if scheduler is not None:
            scheduler.step()
        mean_loss = float(total_loss) / seen
        if not math.isfinite(mean_loss):
            raise NonFiniteLossError(f"{desc}: the training loss is {mean_loss} after epoch {epoch + 1} of "
                                     f"{config.epochs} (lr {config.lr}, batch {config.batch_size}): training diverged; "
                                     "nothing was cached or recorded. Lower the learning rate or check the data")
        history.append({"epoch": epoch, "loss": mean_loss})
        bar.set_postfix(loss=f"{mean_loss:.3f}")
    hooks.on_train_end()
    model.eval()
    return {"epochs": history}


@torch.no_grad()
def predict_logits(model: nn.Module, x: torch.Tensor, *, device: torch.device, batch_size: int = 512) -> torch.Tensor:
    """Logits for uint8 (or float [0, 1]) images, in batches, returned on the CPU."""
    model.to(device).eval()
    out = []
    for start in range(0, len(x), batch_size):
        xb = x[start:start + batch_size].to(device)
        xb = xb.float().div_(255) if xb.dtype == torch.uint8 else xb.float()
        with _autocast(device, True):
            out.append(model(xb).float().cpu())
    return torch.cat(out) if out else torch.empty(0)


def predict(model: nn.Module, x: torch.Tensor, *, device: torch.device, batch_size: int = 512) -> torch.Tensor:
    return predict_logits(model, x, device=device, batch_size=batch_size).argmax(1)
