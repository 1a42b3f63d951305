"""Find layers by role, the same way for every registered model (no per-architecture branches elsewhere)."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from backdoor.models import Classifier


def module_at(model: Classifier, name: str) -> nn.Module:
    return model.net.get_submodule(name)


def last_conv(model: Classifier) -> nn.Module:
    return module_at(model, model.roles.last_conv)


def head(model: Classifier) -> nn.Linear:
    return module_at(model, model.roles.head)


def batchnorm_layers(model: Classifier) -> list[tuple[str, nn.modules.batchnorm._BatchNorm]]:
    return [(n, m) for n, m in model.net.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@contextmanager
def capture_outputs(model: Classifier, names: list[str]) -> Iterator[dict[str, torch.Tensor]]:
    """Record the outputs of the named submodules during forward passes inside the block.

    The stored tensors are the modules' own outputs (not copies, so gradients flow through them): a later
    in-place op of the network (``ReLU(inplace=True)`` after a batch norm) changes them. Capture a module whose
    output is not modified in place, or clone in the caller.
    """
    store: dict[str, torch.Tensor] = {}
    handles = [
        module_at(model, n).register_forward_hook(lambda _m, _i, out, n=n: store.__setitem__(n, out))
        for n in names
    ]
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


@contextmanager
def capture_head_input(model: Classifier) -> Iterator[dict[str, torch.Tensor]]:
    """Record the penultimate representation (the input of the head) during forward passes."""
    store: dict[str, torch.Tensor] = {}
    handle = head(model).register_forward_hook(lambda _m, inp, _o: store.__setitem__("features", inp[0]))
    try:
        yield store
    finally:
        handle.remove()


def forward_with_features(model: Classifier, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and penultimate features of one batch."""
    with capture_head_input(model) as store:
        logits = model(x)
    return logits, store["features"].flatten(1)


def forward_with_maps(model: Classifier, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Logits and the three intermediate feature maps of one batch."""
    names = list(model.roles.feature_maps)
    with capture_outputs(model, names) as store:
        logits = model(x)
    return logits, [store[n] for n in names]
