"""Frequency saliency map (FSM), BackdoorBench supplementary B.11.1, formulas (1)-(4).

With F(x~) = f(IDFT(x~)) (1), the chain rule gives the gradient of the class-s logit with respect to the
channel-wise spectrum, dF_s/dx~(u, v, c) = sum_{h,w} df_s/dx(h, w, c) e^{2 pi i (uh/H + vw/W)} (2), i.e. H W times
the inverse DFT of the pixel gradient (computed here with ``torch.fft.ifft2``, exactly). It is averaged over
channels (3) and min-max normalised (4). Two choices the formulas leave open: (4) needs real numbers, so it is
applied to the modulus of (3); and the map is ``fftshift``-ed so that low frequencies sit at the centre, as in
the supplementary's Figure 14. The class s is the model's prediction for the image.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from torch import nn

from backdoor.analysis._artifacts import CaseArtifacts
from backdoor.analysis._common import (image_for_plot, on_device_of, pick_pairs, predictions, pyplot, save_figure,
                                      save_numbers)

NAME = "frequency"


def spectrum_gradient(model: nn.Module, x: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """Formula (2): complex [N, C, H, W] gradient of each image's ``classes`` logit w.r.t. its DFT."""
    x = on_device_of(model, x).detach().clone().requires_grad_(True)
    logits = model.eval()(x)
    (grad,) = torch.autograd.grad(logits.gather(1, classes[:, None].to(logits.device)).sum(), x)
    h, w = x.shape[-2:]
    return torch.fft.ifft2(grad.double().cpu()) * (h * w)


def frequency_saliency(model: nn.Module, x: torch.Tensor, classes: torch.Tensor) -> np.ndarray:
    """Formulas (3)-(4): FSM [N, H, W] in [0, 1], low frequencies centred."""
    fsm = spectrum_gradient(model, x, classes).mean(1).abs()
    fsm = torch.fft.fftshift(fsm, dim=(-2, -1))
    low = fsm.amin((-2, -1), keepdim=True)
    high = fsm.amax((-2, -1), keepdim=True)
    return ((fsm - low) / (high - low).clamp_min(1e-300)).float().numpy()


def radial_low_share(maps: np.ndarray, radius_fraction: float = 0.25) -> np.ndarray:
    """Per map, the share of its total within ``radius_fraction`` of the half-size from the centre (how much
    of the saliency sits at low frequencies)."""
    h, w = maps.shape[-2:]
    rows, cols = np.mgrid[0:h, 0:w]
    inside = np.hypot(rows - h // 2, cols - w // 2) <= radius_fraction * min(h, w) / 2
    return (maps * inside).reshape(len(maps), -1).sum(1) / np.maximum(maps.reshape(len(maps), -1).sum(1), 1e-12)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--samples", type=int, default=4, help="clean/triggered pairs to show (default 4)")


def run(artifacts: CaseArtifacts, folder: Path, args: argparse.Namespace) -> list[Path]:
    """FSMs of ``args.samples`` clean/triggered pairs under each model; figure, maps and low-frequency shares."""
    pairs = pick_pairs(artifacts, args.samples, args.seed)
    images = pairs.images()
    n = len(pairs.labels)
    arrays, summary, columns = pairs.arrays(), {}, []
    for stage, model in artifacts.models().items():
        classes = predictions(model, images)
        maps = frequency_saliency(model, images, classes)
        arrays[f"fsm_{stage}"], arrays[f"classes_{stage}"] = maps, classes.numpy()
        columns.append((f"FSM {stage}", maps, classes))
        share = radial_low_share(maps)
        summary[f"low_frequency_share_{stage}"] = {"clean": float(share[:n].mean()),
                                                   "triggered": float(share[n:].mean())}
    summary.update(case=artifacts.case.case_id, samples=n, centred="low frequencies at the centre (fftshift)")
    fig = _figure(images, columns, n, artifacts.case.case_id)
    return [save_figure(fig, folder, NAME), *save_numbers(folder, NAME, arrays, summary)]


def _figure(images: torch.Tensor, columns: list, n: int, title: str):
    plt = pyplot()
    rows = len(images)
    fig, axes = plt.subplots(rows, 1 + len(columns), figsize=(2.0 * (1 + len(columns)) + 0.6, 1.9 * rows),
                             squeeze=False, layout="constrained")
    for i in range(rows):
        axes[i, 0].imshow(image_for_plot(images[i]), cmap="gray")
        axes[i, 0].set_ylabel("clean" if i < n else "triggered", fontsize=10)
        for j, (name, maps, classes) in enumerate(columns, 1):
            shown = axes[i, j].imshow(maps[i], cmap="viridis", vmin=0, vmax=1)
            axes[i, j].set_xlabel(f"class {int(classes[i])}", fontsize=9, labelpad=1)
            if i == 0:
                axes[i, j].set_title(name, fontsize=10)
    fig.colorbar(shown, ax=axes[:, -1].tolist(), fraction=0.08, pad=0.04, shrink=0.5).ax.tick_params(labelsize=8)
    axes[0, 0].set_title("image", fontsize=10)
    for ax in axes.flat:
        ax.set_xticks([]), ax.set_yticks([])
    fig.suptitle(f"{title}: frequency saliency (centre: low frequencies)", fontsize=11)
    return fig
