"""Neuron activation: mean activation per channel of one layer, clean vs triggered, before vs after the defense.

Paper section 4.3 and Figure 4 (top row): the average activation of each neuron (channel) of a layer on clean
and on poisoned inputs, for the backdoored model and for the defended one, shows what a defense (FT there)
changed. The layer is chosen by its declared role (``roles``): ``last_conv`` (default) or ``feature_map1..3``;
the mean is over images and spatial positions, taken inside a forward hook (before any later in-place op).
Channels are sorted by the backdoored model's mean activation on triggered inputs.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from torch import nn

from backdoor.analysis._artifacts import CaseArtifacts
from backdoor.analysis._common import on_device_of, pyplot, save_figure, save_numbers, to_float
from backdoor.models import Classifier, roles

NAME = "activation"
ROLES = ("last_conv", "feature_map1", "feature_map2", "feature_map3")


def layer_name(model: Classifier, role: str) -> str:
    """The module name a role points to in ``model`` (``feature_mapK`` is the K-th of ``roles.feature_maps``)."""
    if role == "last_conv":
        return model.roles.last_conv
    if role in ROLES:
        return model.roles.feature_maps[int(role[-1]) - 1]
    raise ValueError(f"unknown layer role {role!r}; allowed: {', '.join(ROLES)}")


@torch.no_grad()
def mean_channel_activation(model: nn.Module, layer: nn.Module, x: torch.Tensor, batch_size: int = 256) -> np.ndarray:
    """Mean over images (and positions) of each output channel of ``layer``, float64 [channels]."""
    total, count = None, 0

    def hook(_module, _inputs, output):
        nonlocal total
        out = output.detach().double()
        per_image = out.mean(tuple(range(2, out.dim()))) if out.dim() > 2 else out
        total = per_image.sum(0) if total is None else total + per_image.sum(0)

    handle = layer.register_forward_hook(hook)
    try:
        model.eval()
        for start in range(0, len(x), batch_size):
            model(on_device_of(model, to_float(x[start:start + batch_size])))
            count += len(x[start:start + batch_size])
    finally:
        handle.remove()
    return (total / count).cpu().numpy()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--layer", default="last_conv", choices=ROLES, help="layer role (default last_conv)")


def run(artifacts: CaseArtifacts, folder: Path, args: argparse.Namespace) -> list[Path]:
    """Per-channel mean activations on the clean and the triggered test set under each model."""
    triggered, clean = artifacts.triggered_test(), artifacts.untriggered_test()
    name = layer_name(artifacts.backdoored, args.layer)
    arrays = {}
    for stage, model in artifacts.models().items():
        layer = roles.module_at(model, name)
        arrays[f"clean_{stage}"] = mean_channel_activation(model, layer, clean.x)
        arrays[f"triggered_{stage}"] = mean_channel_activation(model, layer, triggered.x)
    order = np.argsort(-arrays["triggered_before"], kind="stable")
    arrays["order"] = order
    summary = {"case": artifacts.case.case_id, "layer": name, "role": args.layer, "channels": int(len(order)),
               **{f"mean_{k}": float(v.mean()) for k, v in arrays.items() if k != "order"}}
    if "triggered_after" in arrays:
        for inputs in ("triggered", "clean"):
            change = np.abs(arrays[f"{inputs}_after"] - arrays[f"{inputs}_before"])
            summary[f"mean_abs_change_{inputs}"] = float(change.mean())
    fig = _figure(arrays, order, f"{artifacts.case.case_id}: mean activation per channel of {name} ({args.layer})")
    return [save_figure(fig, folder, NAME), *save_numbers(folder, NAME, arrays, summary)]


STYLE = {"clean_before": ("tab:blue", "-", "clean, no defense"),
         "triggered_before": ("tab:green", "-", "triggered, no defense"),
         "clean_after": ("tab:orange", "--", "clean, after defense"),
         "triggered_after": ("tab:purple", "--", "triggered, after defense")}


def _figure(arrays: dict, order: np.ndarray, title: str):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(10, 4.2))
    for key, (color, style, label) in STYLE.items():
        if key in arrays:
            ax.plot(np.arange(len(order)), arrays[key][order], style, color=color, label=label, linewidth=1.6)
    ax.set_xlabel("channel (sorted by mean activation on triggered inputs, no defense)", fontsize=11)
    ax.set_ylabel("mean activation", fontsize=11)
    ax.tick_params(labelsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=10)
    ax.set_title(title, fontsize=11)
    fig.tight_layout()
    return fig
