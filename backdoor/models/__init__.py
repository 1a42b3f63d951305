"""Model registry. Every model is a ``Classifier``: it takes float images in [0, 1] and normalises inside,
so attacks and defenses (trigger inversion, pruning) work in pixel space without knowing the dataset.

Each builder declares its ``LayerRoles`` (see ``backdoor.models.roles``): that is the one place where
architecture-specific layer names live, and every defense finds layers through it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
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


class ChannelMap(nn.Module):
    """A per-pixel affine map of a feature map's channels: ``weight`` [C, C] @ x + ``bias`` [C] at every position
    (a 1x1 convolution with bias); starts as the identity. What a defense inserts into a model (NPD's folded
    polarizer): its shapes alone say how to rebuild it from a state dict."""

    def __init__(self, channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.eye(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight[:, :, None, None], self.bias)


class _ApplyToOutput:
    """A forward hook that replaces a layer's output by ``module(output)``; an object, not a closure, so that a
    deep copy of the model hooks the copy's own module."""

    def __init__(self, module: nn.Module):
        self.module = module

    def __call__(self, _layer, _inputs, output):
        return self.module(output)


class Classifier(nn.Module):
    """``net`` preceded by per-channel normalisation; ``roles`` names its layers by role.

    ``inserted`` holds ``ChannelMap``s that defenses placed after named layers of ``net`` (``insert_after``); it is
    empty for every model as built, so the state dict then has the architecture's keys only. A state dict with
    ``inserted.*`` keys rebuilds those maps on loading (``load_state_dict``)."""

    def __init__(self, net: nn.Module, mean, std, roles: LayerRoles, arch: str):
        super().__init__()
        self.net = net
        self.roles = roles
        self.arch = arch
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
        self.inserted = nn.ModuleDict()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)

    def insert_after(self, layer: str, module: ChannelMap) -> None:
        """Apply ``module`` to the output of ``net``'s submodule ``layer`` in every forward pass from now on."""
        key = layer.replace(".", INSERT_DOT)
        if key in self.inserted or INSERT_DOT in layer:
            raise ValueError(f"cannot insert after {layer!r}: already inserted there, or the name contains "
                             f"{INSERT_DOT!r}")
        self.net.get_submodule(layer).register_forward_hook(_ApplyToOutput(module))
        self.inserted[key] = module

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        for key, value in state_dict.items():
            parts = key.split(".")
            if parts[0] == "inserted" and parts[-1] == "weight" and len(parts) == 3 and parts[1] not in self.inserted:
                self.insert_after(parts[1].replace(INSERT_DOT, "."),
                                  ChannelMap(value.shape[0]).to(self.mean.device))
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


INSERT_DOT = "__"  # stands for "." in the keys of Classifier.inserted (a ModuleDict key cannot contain a dot)


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
