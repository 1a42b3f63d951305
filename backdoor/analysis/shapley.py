"""Shapley value maps (superpixel attributions) for clean/triggered test pairs, before and after the defense.

Paper section 3.2 and supplementary B.11.1: the Shapley value (Lundberg & Lee, NeurIPS 2017) gives each input
feature its average marginal contribution to a prediction over all coalitions. Computed with captum's
``ShapleyValueSampling`` (Castro et al. 2009's permutation sampling): features are ``superpixel`` x ``superpixel``
squares (all channels together), an absent feature takes the baseline value 0 (black), ``n_samples``
permutations are averaged. Attributions are of the predicted class's logit; a superpixel's value is spread
evenly over its pixels.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from torch import nn

from backdoor.analysis._artifacts import CaseArtifacts
from backdoor.analysis._common import (image_for_plot, on_device_of, pick_pairs, predictions, pyplot, save_figure,
                                      save_numbers, trigger_share)

NAME = "shapley"


def superpixel_mask(height: int, width: int, size: int) -> torch.Tensor:
    """long [1, 1, H, W]: the index of the ``size`` x ``size`` square each pixel belongs to (row-major;
    squares at the right/bottom edge are cut when ``size`` does not divide the image)."""
    rows = torch.arange(height) // size
    cols = torch.arange(width) // size
    return (rows[:, None] * ((width + size - 1) // size) + cols[None, :])[None, None]


def shapley_maps(model: nn.Module, x: torch.Tensor, classes: torch.Tensor, *, superpixel: int = 4,
                 n_samples: int = 16, seed: int = 0) -> np.ndarray:
    """Per-pixel Shapley value estimates [N, H, W] of ``classes``' logits: each superpixel's value spread evenly
    over its pixels, so a map adds up to f(x) - f(baseline) (the Shapley values' efficiency)."""
    from captum.attr import ShapleyValueSampling

    model.eval()
    mask = superpixel_mask(x.shape[-2], x.shape[-1], superpixel)  # broadcast over channels: squares span them
    features = int(mask.max()) + 1
    area = torch.bincount(mask.flatten(), minlength=features)[mask[0, 0]].double()
    explainer = ShapleyValueSampling(model)
    out = []
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)  # captum draws its permutations from the global generator
        for image, cls in zip(x, classes):
            attribution = explainer.attribute(on_device_of(model, image[None]), baselines=0.0, target=int(cls),
                                              feature_mask=on_device_of(model, mask),
                                              n_samples=n_samples, perturbations_per_eval=features)
            out.append((attribution[0, 0].double().cpu() / area).float().numpy())  # channels share one value
    return np.stack(out)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--samples", type=int, default=4, help="clean/triggered pairs to show (default 4)")
    parser.add_argument("--superpixel", type=int, default=4, help="side of the square features (default 4)")
    parser.add_argument("--shapley-samples", type=int, default=16, help="sampled permutations (default 16)")


def run(artifacts: CaseArtifacts, folder: Path, args: argparse.Namespace) -> list[Path]:
    """Shapley maps of ``args.samples`` pairs under each model; figure, maps and trigger-mass summary."""
    pairs = pick_pairs(artifacts, args.samples, args.seed)
    images = pairs.images()
    n = len(pairs.labels)
    arrays, summary, columns = pairs.arrays(), {}, []
    for stage, model in artifacts.models().items():
        classes = predictions(model, images)
        maps = shapley_maps(model, images, classes, superpixel=args.superpixel, n_samples=args.shapley_samples,
                            seed=args.seed)
        arrays[f"shapley_{stage}"], arrays[f"classes_{stage}"] = maps, classes.numpy()
        columns.append((f"Shapley {stage}", maps, classes))
        summary[f"shapley_{stage}_on_trigger"] = trigger_share(maps[n:], pairs.changed().numpy())
    summary.update(case=artifacts.case.case_id, samples=n, superpixel=args.superpixel,
                   permutations=args.shapley_samples, baseline=0.0)
    fig = _figure(images, columns, n, artifacts.case.case_id)
    return [save_figure(fig, folder, NAME), *save_numbers(folder, NAME, arrays, summary)]


def _figure(images: torch.Tensor, columns: list, n: int, title: str):
    plt = pyplot()
    rows = len(images)
    fig, axes = plt.subplots(rows, 1 + len(columns), figsize=(2.0 * (1 + len(columns)), 1.9 * rows), squeeze=False)
    for i in range(rows):
        axes[i, 0].imshow(image_for_plot(images[i]), cmap="gray")
        axes[i, 0].set_ylabel("clean" if i < n else "triggered", fontsize=10)
        for j, (name, maps, classes) in enumerate(columns, 1):
            limit = max(float(np.abs(maps[i]).max()), 1e-12)
            shown = axes[i, j].imshow(maps[i], cmap="RdBu_r", vmin=-limit, vmax=limit)
            axes[i, j].set_xlabel(f"class {int(classes[i])}", fontsize=9, labelpad=1)
            fig.colorbar(shown, ax=axes[i, j], fraction=0.046, pad=0.03).ax.tick_params(labelsize=7)
            if i == 0:
                axes[i, j].set_title(name, fontsize=10)
    axes[0, 0].set_title("image", fontsize=10)
    for ax in axes.flat:
        ax.set_xticks([]), ax.set_yticks([])
    fig.suptitle(f"{title}: Shapley values of the predicted class (red: for it)", fontsize=11)
    fig.tight_layout()
    return fig
