"""Grad-CAM and its FullGrad variant for clean/triggered test pairs, before and after the defense.

Paper section 3.2: Grad-CAM (Selvaraju et al., ICCV 2017) shows which pixels a prediction rests on, and so
whether the trigger activates the backdoor; supplementary B.11.1: BackdoorBench's code uses the FullGrad
variant (Srinivas & Fleuret, NeurIPS 2019). Both come from the ``grad-cam`` package (``pytorch_grad_cam``), the
library BackdoorBench's visualisation code uses: Grad-CAM on the model's declared last conv block
(``roles.last_conv``), FullGrad over every conv/batch-norm bias plus the input-gradient term. Each map explains
the class the model predicts for that image (for a working backdoor: the target on triggered images) and is
min-max normalised per image by the library.
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
from backdoor.models import roles

NAME = "gradcam"


def _targets(classes: torch.Tensor):
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    return [ClassifierOutputTarget(int(c)) for c in classes]


def gradcam_maps(model: nn.Module, layer: nn.Module, x: torch.Tensor, classes: torch.Tensor) -> np.ndarray:
    """Grad-CAM maps [N, H, W] in [0, 1] of ``classes`` for float images ``x``, on ``layer``'s output."""
    from pytorch_grad_cam import GradCAM

    with GradCAM(model=model.eval(), target_layers=[layer]) as cam:
        return cam(input_tensor=on_device_of(model, x).clone(), targets=_targets(classes))


def fullgrad_maps(model: nn.Module, x: torch.Tensor, classes: torch.Tensor) -> np.ndarray:
    """FullGrad maps [N, H, W] in [0, 1]: |input-gradient x input| plus |bias x bias-gradient| of every conv and
    batch-norm layer, each upsampled to the input size and summed (the library's FullGrad)."""
    from pytorch_grad_cam import FullGrad

    with FullGrad(model=model.eval(), target_layers=[]) as cam:
        return cam(input_tensor=on_device_of(model, x).clone(), targets=_targets(classes))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--samples", type=int, default=4, help="clean/triggered pairs to show (default 4)")


def run(artifacts: CaseArtifacts, folder: Path, args: argparse.Namespace) -> list[Path]:
    """Grad-CAM and FullGrad of ``args.samples`` pairs under each model; figure, maps and trigger-mass summary."""
    pairs = pick_pairs(artifacts, args.samples, args.seed)
    images = pairs.images()
    changed = torch.cat([torch.zeros_like(pairs.changed()), pairs.changed()]).numpy()
    arrays, summary, columns = pairs.arrays(), {}, []
    for stage, model in artifacts.models().items():
        classes = predictions(model, images)
        for method, maps in (("gradcam", gradcam_maps(model, roles.last_conv(model), images, classes)),
                             ("fullgrad", fullgrad_maps(model, images, classes))):
            arrays[f"{method}_{stage}"], arrays[f"classes_{stage}"] = maps, classes.numpy()
            columns.append((f"{'Grad-CAM' if method == 'gradcam' else 'FullGrad'} {stage}", maps, classes))
            n = len(pairs.labels)
            summary[f"{method}_{stage}_on_trigger"] = trigger_share(maps[n:], changed[n:])
    summary.update(case=artifacts.case.case_id, samples=len(pairs.labels), layer=artifacts.backdoored.roles.last_conv)
    fig = _figure(images, columns, len(pairs.labels), artifacts.case.case_id)
    return [save_figure(fig, folder, NAME), *save_numbers(folder, NAME, arrays, summary)]


def _figure(images: torch.Tensor, columns: list, n: int, title: str):
    plt = pyplot()
    rows = len(images)
    fig, axes = plt.subplots(rows, 1 + len(columns), figsize=(1.9 * (1 + len(columns)), 1.9 * rows), squeeze=False)
    for i in range(rows):
        axes[i, 0].imshow(image_for_plot(images[i]), cmap="gray")
        axes[i, 0].set_ylabel("clean" if i < n else "triggered", fontsize=10)
        for j, (name, maps, classes) in enumerate(columns, 1):
            axes[i, j].imshow(image_for_plot(images[i]), cmap="gray")
            axes[i, j].imshow(maps[i], cmap="jet", alpha=0.5, vmin=0, vmax=1)
            axes[i, j].set_xlabel(f"class {int(classes[i])}", fontsize=9, labelpad=1)
            if i == 0:
                axes[i, j].set_title(name, fontsize=10)
    axes[0, 0].set_title("image", fontsize=10)
    for ax in axes.flat:
        ax.set_xticks([]), ax.set_yticks([])
    fig.suptitle(f"{title}: Grad-CAM / FullGrad of the predicted class", fontsize=11)
    fig.tight_layout()
    return fig
