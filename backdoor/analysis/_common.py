"""Helpers shared by the analysis tools: sample pairs, float batches, saving figures and numbers.

Every tool shows "a few clean/triggered pairs" (BackdoorBench supplementary B.11.2 shows one poisoned test
sample per attack and defense); the pairs are drawn with a seeded generator from the non-target test images,
so a rerun shows the same images.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from backdoor.analysis._artifacts import CaseArtifacts


@dataclass(frozen=True)
class Pairs:
    """``n`` test images (float [0, 1], [n, C, H, W]) with and without the trigger, and their true labels."""

    clean: torch.Tensor
    triggered: torch.Tensor
    labels: torch.Tensor
    index: torch.Tensor  # positions in the poisoned test set (non-target test images)

    def changed(self) -> torch.Tensor:
        """bool [n, H, W]: pixels the trigger changed (any channel), where a tool's mass should go."""
        return (self.triggered - self.clean).abs().amax(1) > 0

    def images(self) -> torch.Tensor:
        """[2n, C, H, W]: the clean images, then the same images triggered (the batch every map tool explains)."""
        return torch.cat([self.clean, self.triggered])

    def arrays(self) -> dict:
        """The raw arrays every map tool saves first: the images and their labels."""
        return {"images": self.images().numpy(), "labels": self.labels.numpy()}


def pick_pairs(artifacts: CaseArtifacts, n: int, seed: int) -> Pairs:
    """``n`` seeded non-target test images of the case, clean and with the case's trigger."""
    triggered, clean = artifacts.triggered_test(), artifacts.untriggered_test()
    g = torch.Generator().manual_seed(seed)
    index = torch.randperm(len(clean), generator=g)[:n].sort().values
    return Pairs(to_float(clean.x[index]), to_float(triggered.x[index]), clean.y[index], index)


def to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 images as float [0, 1] (float input passes through)."""
    return x.float().div(255) if x.dtype == torch.uint8 else x.float()


def image_for_plot(x: torch.Tensor) -> np.ndarray:
    """A [C, H, W] float image as an [H, W, C] (or [H, W] grey) array for ``imshow``."""
    array = x.detach().cpu().clamp(0, 1).permute(1, 2, 0).numpy()
    return array[..., 0] if array.shape[-1] == 1 else array


def on_device_of(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``x`` on the device of ``model``'s parameters (or buffers): tools take CPU tensors and any model."""
    tensor = next(iter(model.parameters()), None)
    tensor = tensor if tensor is not None else next(iter(model.buffers()), x)
    return x.to(tensor.device)


@torch.no_grad()
def predictions(model: torch.nn.Module, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Predicted classes (on the CPU) of float images, eval mode, float32 (no autocast)."""
    model.eval()
    batches = (on_device_of(model, x[i:i + batch_size]) for i in range(0, len(x), batch_size))
    return torch.cat([model(batch).argmax(1).cpu() for batch in batches])


def mass_in(maps: np.ndarray, region: np.ndarray) -> np.ndarray:
    """Per map, the fraction of its (non-negative part's) total mass inside ``region`` (bool, same shape)."""
    positive = np.clip(maps, 0, None).reshape(len(maps), -1)
    inside = (positive * region.reshape(len(maps), -1)).sum(1)
    return inside / np.maximum(positive.sum(1), 1e-12)


def trigger_share(maps: np.ndarray, region: np.ndarray) -> dict:
    """How much of the triggered images' maps falls on the trigger: the mean mass share inside it, and that
    share over the trigger's area share ("enrichment": 1 for a map spread evenly, large when concentrated)."""
    if not region.any():
        return {"mass": None, "enrichment": None}
    share = mass_in(maps, region)
    area = region.reshape(len(region), -1).mean(1)
    return {"mass": float(share.mean()), "enrichment": float((share / np.maximum(area, 1e-12)).mean())}


def save_numbers(folder: Path, name: str, arrays: dict[str, np.ndarray], summary: dict) -> list[Path]:
    """Write ``<name>.npz`` (raw arrays) and ``<name>.json`` (summary figures); return the paths."""
    npz, js = folder / f"{name}.npz", folder / f"{name}.json"
    np.savez_compressed(npz, **{k: np.asarray(v) for k, v in arrays.items()})
    js.write_text(json.dumps(summary, indent=2, sort_keys=True, default=float) + "\n")
    return [npz, js]


def save_figure(fig, folder: Path, name: str) -> Path:
    """Write ``<name>.png`` (150 dpi) and close the figure."""
    import matplotlib.pyplot as plt

    path = folder / f"{name}.png"
    fig.savefig(path, dpi=150, bbox_inches="tight")
    plt.close(fig)
    return path


def pyplot():
    """matplotlib's pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
