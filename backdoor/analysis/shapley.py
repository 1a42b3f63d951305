"""Shapley value maps (superpixel attributions) for clean/triggered test pairs, before and after the defense.

Paper section 3.2 and supplementary B.11.1: the Shapley value (Lundberg & Lee, NeurIPS 2017) gives each input
feature its average marginal contribution to a prediction over all coalitions. Computed with captum's
``ShapleyValueSampling`` (Castro et al. 2009's permutation sampling): features are ``superpixel`` x ``superpixel``
squares (all channels together), an absent feature takes the baseline value 0 (black), and ``n_samples``
seeded permutations (the same ones for every image) are averaged. captum is run one permutation at a time so
that each permutation's marginal contributions are kept: their mean is the estimate, their standard deviation
over sqrt(n_samples) its standard error (per feature). Attributions are of the predicted class's logit; a
superpixel's value and standard error are spread evenly over its pixels.

The default of ``DEFAULT_PERMUTATIONS`` (1536) permutations is chosen so that two symmetric features come
within 0.05 of each other. On a model whose logit is the product of two superpixels' means (4 superpixels, two
of them unread), each permutation gives the whole value to whichever of the pair comes later, so the pair's
shares differ by |2k/n - 1| with k ~ Binomial(n, 1/2): the probability that they are within 0.05 is 0.951 at
1536 (1.96 / sqrt(n) <= 0.05 asks n >= 1537; the binomial's discreteness gives 1536 its 0.951), 0.889 at 1024.
Measured over seeds 0-199 with the permutations this code draws (torch's ``randperm`` after the seed, as captum
draws them; ``shapley_maps`` itself gave the same shares for seeds 0-9 at 16), the share of seeds with the pair
within 0.05 [the exact probability] and the mean gap: 16 permutations 0.155 [0.196], 0.21; 64: 0.265 [0.292],
0.099; 256: 0.62 [0.583], 0.046; 512: 0.79 [0.731], 0.032; 1024: 0.91 [0.889], 0.025; 1536: 0.93 [0.951],
0.021; 2048: 0.96 [0.977], 0.020. Seed 0 gave 0.31 / 0.69 at 16, 0.46 / 0.54 at 256 and 0.50 / 0.50 at 1536.
The cost is 1536 x (superpixels + 1) model evaluations per image: ask for fewer with ``--shapley-samples`` and
read the standard errors the tool saves.
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
DEFAULT_PERMUTATIONS = 1536
CLEAR = 2.0  # a superpixel whose |value| is under CLEAR standard errors is drawn faded


def superpixel_mask(height: int, width: int, size: int) -> torch.Tensor:
    """long [1, 1, H, W]: the index of the ``size`` x ``size`` square each pixel belongs to (row-major;
    squares at the right/bottom edge are cut when ``size`` does not divide the image)."""
    rows = torch.arange(height) // size
    cols = torch.arange(width) // size
    return (rows[:, None] * ((width + size - 1) // size) + cols[None, :])[None, None]


def permutation_contributions(model: nn.Module, image: torch.Tensor, cls: int, mask: torch.Tensor, *,
                              n_samples: int, seed: int) -> np.ndarray:
    """float64 [n_samples, features]: each of ``n_samples`` seeded permutations' marginal contributions of the
    features of ``mask`` (long [1, 1, H, W]) to ``cls``'s logit for ``image`` [C, H, W] (baseline 0)."""
    from captum.attr import ShapleyValueSampling

    model.eval()
    features = int(mask.max()) + 1
    explainer = ShapleyValueSampling(model)
    mask_on_device, flat_mask = on_device_of(model, mask), mask.flatten()
    rows = []
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)  # captum draws each permutation from the global generator
        for _ in range(n_samples):
            attribution = explainer.attribute(on_device_of(model, image[None]), baselines=0.0, target=cls,
                                              feature_mask=mask_on_device, n_samples=1,
                                              perturbations_per_eval=features)
            per_pixel = attribution[0, 0].flatten().double().cpu()  # a feature's pixels all hold its value
            rows.append(torch.zeros(features, dtype=torch.float64).scatter_(0, flat_mask, per_pixel))
    return torch.stack(rows).numpy()


def estimate(contributions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The Shapley value estimate per feature (mean over permutations) and its standard error (sample standard
    deviation over permutations / sqrt(permutations))."""
    n = len(contributions)
    return contributions.mean(0), contributions.std(0, ddof=1) / np.sqrt(n)


def shapley_maps(model: nn.Module, x: torch.Tensor, classes: torch.Tensor, *, superpixel: int = 4,
                 n_samples: int = DEFAULT_PERMUTATIONS, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel Shapley value estimates [N, H, W] of ``classes``' logits and their standard errors [N, H, W]:
    each superpixel's value (and standard error) spread evenly over its pixels, so a map adds up to
    f(x) - f(baseline) (the Shapley values' efficiency, exact for every sampled permutation)."""
    if n_samples < 2:
        raise ValueError(f"shapley: {n_samples} permutation(s); a standard error needs at least 2")
    mask = superpixel_mask(x.shape[-2], x.shape[-1], superpixel)  # broadcast over channels: squares span them
    area = torch.bincount(mask.flatten()).double().numpy()
    pixels = mask[0, 0].numpy()
    values, errors = [], []
    for image, cls in zip(x, classes):
        value, error = estimate(permutation_contributions(model, image, int(cls), mask, n_samples=n_samples,
                                                          seed=seed))
        values.append((value / area)[pixels])
        errors.append((error / area)[pixels])
    return np.stack(values).astype(np.float32), np.stack(errors).astype(np.float32)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--samples", type=int, default=4, help="clean/triggered pairs to show (default 4)")
    parser.add_argument("--superpixel", type=int, default=4, help="side of the square features (default 4)")
    parser.add_argument("--shapley-samples", type=int, default=DEFAULT_PERMUTATIONS,
                        help=f"sampled permutations, at least 2 (default {DEFAULT_PERMUTATIONS}: two symmetric "
                             "features within 0.05 of each other with probability 0.95)")


def run(artifacts: CaseArtifacts, folder: Path, args: argparse.Namespace) -> list[Path]:
    """Shapley maps and their standard errors of ``args.samples`` pairs under each model; figure, maps and
    trigger-mass summary."""
    pairs = pick_pairs(artifacts, args.samples, args.seed)
    images = pairs.images()
    n = len(pairs.labels)
    arrays, summary, columns = pairs.arrays(), {}, []
    for stage, model in artifacts.models().items():
        classes = predictions(model, images)
        maps, errors = shapley_maps(model, images, classes, superpixel=args.superpixel,
                                    n_samples=args.shapley_samples, seed=args.seed)
        arrays.update({f"shapley_{stage}": maps, f"shapley_se_{stage}": errors, f"classes_{stage}": classes.numpy()})
        columns.append((f"Shapley {stage}", maps, errors, classes))
        summary[f"shapley_{stage}_on_trigger"] = trigger_share(maps[n:], pairs.changed().numpy())
        summary[f"shapley_{stage}_clear_of_zero"] = float(clear_of_zero(maps, errors).mean())
    summary.update(case=artifacts.case.case_id, samples=n, superpixel=args.superpixel,
                   permutations=args.shapley_samples, baseline=0.0)
    fig = _figure(images, columns, n, artifacts.case.case_id)
    return [save_figure(fig, folder, NAME), *save_numbers(folder, NAME, arrays, summary)]


def clear_of_zero(maps: np.ndarray, errors: np.ndarray) -> np.ndarray:
    """bool: pixels whose value is at least ``CLEAR`` standard errors away from 0."""
    return np.abs(maps) >= CLEAR * errors


def _figure(images: torch.Tensor, columns: list, n: int, title: str):
    plt = pyplot()
    rows = len(images)
    fig, axes = plt.subplots(rows, 1 + len(columns), figsize=(2.0 * (1 + len(columns)), 1.9 * rows), squeeze=False)
    for i in range(rows):
        axes[i, 0].imshow(image_for_plot(images[i]), cmap="gray")
        axes[i, 0].set_ylabel("clean" if i < n else "triggered", fontsize=10)
        for j, (name, maps, errors, classes) in enumerate(columns, 1):
            limit = max(float(np.abs(maps[i]).max()), 1e-12)
            alpha = np.where(clear_of_zero(maps[i], errors[i]), 1.0, 0.3)
            shown = axes[i, j].imshow(maps[i], cmap="RdBu_r", vmin=-limit, vmax=limit, alpha=alpha)
            axes[i, j].set_xlabel(f"class {int(classes[i])}", fontsize=9, labelpad=1)
            fig.colorbar(shown, ax=axes[i, j], fraction=0.046, pad=0.03).ax.tick_params(labelsize=7)
            if i == 0:
                axes[i, j].set_title(name, fontsize=10)
    axes[0, 0].set_title("image", fontsize=10)
    for ax in axes.flat:
        ax.set_xticks([]), ax.set_yticks([])
    fig.suptitle(f"{title}: Shapley values of the predicted class (red: for it; faded: within {CLEAR:g} standard "
                 "errors of 0)", fontsize=11)
    fig.tight_layout()
    return fig
