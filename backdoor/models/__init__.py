"""Model registry. Every model is a ``Classifier``: it takes float images in [0, 1] and normalises inside,
so attacks and defenses (trigger inversion, pruning) work in pixel space without knowing the dataset.

Each builder declares its ``LayerRoles`` (see ``backdoor.models.roles``): that is the one place where
architecture-specific layer names live, and every defense finds layers through it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from backdoor._registry import Registry

MODELS: Registry[nn.Module] = Registry("model", package="backdoor.models")
register_model = MODELS.register


@dataclass(frozen=True)
class LayerRoles:
    """Names (relative to ``Classifier.net``) of the layers defenses look for.

    feature_maps: three intermediate blocks whose outputs have spatial extent (NAD's attention maps).
    last_conv: the block whose output channels are "the last convolutional layer" (FP prunes these).
    head: the final linear layer; its input is the penultimate representation (AC, Spectral).
    """

    feature_maps: tuple[str, str, str]
    last_conv: str
    head: str


class Classifier(nn.Module):
    """``net`` preceded by per-channel normalisation; ``roles`` names its layers by role."""

    def __init__(self, net: nn.Module, mean, std, roles: LayerRoles, arch: str):
        super().__init__()
        self.net = net
        self.roles = roles
        self.arch = arch
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)


def create_model(name: str, num_classes: int, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), seed: int | None = None,
                 **params) -> Classifier:
    """Build a registered model for ``num_classes`` classes, normalising with ``mean``/``std``.

    With ``seed`` the initial weights are drawn from that seed (without disturbing the global generator).
    """
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        net, roles = MODELS.create(name, num_classes=num_classes, **params)
    return Classifier(net, mean, std, roles, arch=name)


def model_summary(name: str) -> str:
    doc = (MODELS.get(name).__doc__ or "").strip()
    return doc.splitlines()[0] if doc else ""
