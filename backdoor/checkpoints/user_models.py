"""The paper's pure-defense mode: a model (and optionally data) the user brings, defended by the grid's defenses.

A matrix names it under ``models`` with a ``checkpoint`` instead of a registered model's parameters::

    models:
      mine:                                  # a label of your choice (a registered name sets ``arch`` itself)
        checkpoint: mine.safetensors         # .safetensors, a .pt/.pth state dict, a `backdoor export` folder,
                                             # or BackdoorBench's attack_result.pt (relative to the matrix file)
        arch: cnn_small                      # the registered architecture (from the checkpoint where it says)
        arch_params: {}                      # its parameters
        normalize: dataset                   # dataset | none | checkpoint | {mean: [...], std: [...]}
        target: 0                            # the backdoor's target (default: the matrix's)
        trigger: {attack: badnets, params: {}}   # or {images: triggered.safetensors | folder}, or checkpoint
        poisoned_train: poisoned_train.safetensors   # x, y and (for detection figures) mask; or checkpoint
        dataset: digits                      # which of the matrix's datasets (needed when it has several)

Each user model is crossed with the matrix's seeds and defenses (no attack runs, no poison ratio). The defenses
get exactly what ``DefenseInputs`` grants: the model, the defender's clean subset of the dataset's training set
(``clean_fraction``, seeded), and for data-side defenses the poisoned training set without its mask. C-Acc is
measured on the dataset's test set; ASR and R-Acc on the triggered test set (target-class images dropped, as
the paper's poisoned test set); detection figures against the mask.

``normalize``: what the harness puts in front of the network (every model here normalises inside and takes
images in [0, 1]): ``checkpoint`` the ``mean``/``std`` buffers of a ``Classifier`` state dict (the default for
one, such as an export); ``dataset`` the dataset's statistics (the default otherwise); ``none`` nothing (the
network takes [0, 1] images); or explicit per-channel lists. BackdoorBench normalises CIFAR-10 with mean
(0.4914, 0.4822, 0.4465) and std (0.247, 0.243, 0.261): give those for its models.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from safetensors.torch import load_file

from backdoor._storage import memo_file_sha256
from backdoor.attacks import PoisonedSet
from backdoor.checkpoints import checkpoint_format, map_names, read_backdoorbench, read_state_dict
from backdoor.data import Split
from backdoor.data._files import image_files, read_images
from backdoor.targets import triggered_test_keep

NO_TRIGGER = "notrigger"  # the case id's attack token when no trigger is given
IMAGES = "images"  # ... when the trigger is a set of triggered test images
CHECKPOINT = "checkpoint"


@dataclass(frozen=True)
class UserModel:
    """A validated user-model entry (paths resolved). ``trigger``: ``("attack", name, params)``,
    ``("images", path)``, ``("checkpoint",)`` or None; ``poisoned_train``: a path, ``"checkpoint"`` or None;
    ``normalize``: ``"dataset"`` or ``(mean, std)``."""

    label: str
    checkpoint: Path
    format: str
    arch: str
    arch_params: dict = field(default_factory=dict)
    normalize: Any = "dataset"
    target: int | str = 0  # a class index, or "all-to-all"
    trigger: tuple | None = None
    poisoned_train: Any = None
    dataset: str | None = None

    @property
    def trigger_token(self) -> str:
        """The case id's attack token: the trigger attack's name, ``images``, or ``notrigger``."""
        if self.trigger is None:
            return NO_TRIGGER
        return self.trigger[1] if self.trigger[0] == "attack" else IMAGES

    def describe(self) -> dict:
        """What a record says about the model and its data (JSON)."""
        trigger = None
        if self.trigger is not None and self.trigger[0] == "attack":
            trigger = {"attack": self.trigger[1], "params": self.trigger[2]}
        elif self.trigger is not None:
            trigger = {"images": str(self.trigger[1]) if self.trigger[0] == "images" else f"{self.checkpoint} (bd_test)"}
        return {"label": self.label, "checkpoint": str(self.checkpoint), "format": self.format,
                "sha256": digest(self.weights_file), "arch": self.arch, "arch_params": self.arch_params,
                "normalize": self.normalize if isinstance(self.normalize, str) else
                {"mean": list(self.normalize[0]), "std": list(self.normalize[1])},
                "target": self.target, "trigger": trigger,
                "poisoned_train": None if self.poisoned_train is None else str(self.poisoned_train)}

    @property
    def weights_file(self) -> Path:
        return self.checkpoint / "model.safetensors" if self.format == "export" else self.checkpoint


def digest(path: str | Path) -> str:
    """SHA-256 of a file, memoised per path and stat (a replaced file is a new digest)."""
    return memo_file_sha256(path)


@lru_cache(maxsize=2)
def _bb_cached(path: str, size: int, mtime: int):
    return read_backdoorbench(path)


def backdoorbench(path: Path):
    """``read_backdoorbench``, memoised per path, size and mtime (the file holds data: read it once)."""
    stat = Path(path).stat()
    return _bb_cached(str(path), stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=8)
def _state_cached(path: str, size: int, mtime: int) -> tuple[dict, str]:
    if checkpoint_format(path).kind == "backdoorbench":
        return backdoorbench(Path(path)).state_dict, "backdoorbench"
    state, fmt = read_state_dict(path)
    return state, fmt.kind


def read_state(path: Path) -> tuple[dict[str, torch.Tensor], str]:
    stat = Path(path).stat() if Path(path).is_file() else (Path(path) / "model.safetensors").stat()
    return _state_cached(str(path), stat.st_size, stat.st_mtime_ns)


def classifier_parts(state: dict) -> dict:
    """The network's part of a state dict: ``net.*`` of a Classifier state dict (with ``mean``/``std``), else all."""
    if {"mean", "std"} <= set(state) and all(k.startswith("net.") for k in state if k not in ("mean", "std")):
        return {k[len("net."):]: v for k, v in state.items() if k.startswith("net.")}
    return state


def net_mapping(shapes: dict, expected: dict, where: str) -> dict[str, str]:
    """Our network's tensor names -> the checkpoint's (``checkpoints.map_names`` on the network's part)."""
    return map_names(classifier_parts(shapes), expected, where)


# -- loading (run time) --------------------------------------------------------------------------------------------
def normalization(um: UserModel, data) -> tuple[tuple, tuple]:
    if um.normalize == "dataset":
        return tuple(data.mean), tuple(data.std)
    mean, std = um.normalize
    channels = data.image_shape[0]
    return (tuple(mean) * channels if len(mean) == 1 else tuple(mean)), (tuple(std) * channels if len(std) == 1
                                                                        else tuple(std))


def load_weights(um: UserModel, model) -> None:
    """Load the checkpoint's network weights into ``model.net`` (names mapped as ``net_mapping``)."""
    state = classifier_parts(read_state(um.checkpoint)[0])
    mapping = net_mapping({k: tuple(v.shape) for k, v in state.items()},
                          {k: tuple(v.shape) for k, v in model.net.state_dict().items()}, str(um.checkpoint))
    model.net.load_state_dict({o: state[t] for o, t in mapping.items()})


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def _expect_images(x: torch.Tensor, data, where: str) -> None:
    if x.dtype != torch.uint8:
        raise ValueError(f"{where}: images must be uint8, got {x.dtype}")
    if tuple(x.shape[1:]) != tuple(data.image_shape):
        raise ValueError(f"{where}: images of shape {list(x.shape[1:])}, the dataset's are {list(data.image_shape)}")


def triggered_test(um: UserModel, data) -> tuple:
    """The triggered test set from images (a file, a folder, or the checkpoint's), target-class images dropped
    (all-to-all: none): returns (Split, number dropped)."""
    kind = um.trigger[0]
    if kind == "checkpoint":  # BackdoorBench: bd_test are the dataset's non-target test images, in order
        bb = backdoorbench(um.checkpoint)
        own = data.test.y[triggered_test_keep(um.target, data.test.y)]
        if len(bb.test_x) != len(own):
            raise ValueError(f"{um.checkpoint}: bd_test has {len(bb.test_x)} images; the dataset's test set has "
                             f"{len(own)} non-target images (BackdoorBench's bd_test are those, in order). Give the "
                             "triggered images with their true labels: trigger: {images: FILE.safetensors}")
        x, y = bb.test_x, own
    elif um.trigger[1].is_dir():
        x, y = read_image_folder(um.trigger[1], data)
    else:
        tensors = read_tensors(um.trigger[1])
        x, y = tensors["x"], tensors["y"].long()
    _expect_images(x, data, str(um.trigger[1] if kind == "images" else um.checkpoint))
    keep = triggered_test_keep(um.target, y)
    return Split(x[keep].contiguous(), y[keep].contiguous()), int((~keep).sum())


def class_folders(folder: Path) -> list[Path]:
    """The visible sub-folders of a triggered-image folder."""
    return sorted((d for d in folder.iterdir() if d.is_dir() and not d.name.startswith(".")), key=lambda d: d.name)


def image_folder_problem(folder: Path, num_classes: int) -> str | None:
    """Why a triggered-image folder cannot be used (its sub-folders must be the true classes' indices), or None.
    Names only: cheap enough for the matrix loader."""
    classes = class_folders(folder)
    bad = [d.name for d in classes if not d.name.isdigit() or int(d.name) >= num_classes]
    if bad or not classes:
        return (f"expected one sub-folder per true class, named by its index 0..{num_classes - 1}"
                + (f"; found {bad[:5]}" if bad else "; found none"))
    return None


def read_image_folder(folder: Path, data) -> tuple[torch.Tensor, torch.Tensor]:
    """Triggered test images as ``folder/<true class index>/*.png`` (any image type PIL reads), at the dataset's
    size (not resized: resizing would change the trigger)."""
    problem = image_folder_problem(folder, data.num_classes)
    if problem is not None:
        raise ValueError(f"{folder}: {problem}")
    classes = class_folders(folder)
    paths, labels = [], []
    for d in sorted(classes, key=lambda d: int(d.name)):
        files = image_files(d)
        paths += files
        labels += [int(d.name)] * len(files)
    side = data.image_shape[-1]
    for path in paths:
        with Image.open(path) as im:
            if im.size != (data.image_shape[-1], data.image_shape[-2]):
                raise ValueError(f"{path}: {im.size[0]}x{im.size[1]} pixels, the dataset's images are {side}x{side} "
                                 "(save triggered images at the dataset's size)")
    return read_images(paths, side, desc="triggered images"), torch.tensor(labels, dtype=torch.long)


def poisoned_train(um: UserModel, data):
    """The user's poisoned training set as a ``PoisonedSet`` (mask None when not given)."""
    if um.poisoned_train == CHECKPOINT:  # BackdoorBench: the clean training set with the poisoned rows replaced
        bb = backdoorbench(um.checkpoint)
        if bb.train_index is None:
            x, y, mask = bb.train_x, bb.train_y, None
        else:
            if len(bb.train_index) and int(bb.train_index.max()) >= len(data.train):
                raise ValueError(f"{um.checkpoint}: bd_train.original_index reaches {int(bb.train_index.max())}; the "
                                 f"dataset's training set has {len(data.train)} images")
            x, y = data.train.x.clone(), data.train.y.clone()
            x[bb.train_index], y[bb.train_index] = bb.train_x, bb.train_y
            mask = torch.zeros(len(x), dtype=torch.bool)
            mask[bb.train_index] = True
    else:
        tensors = read_tensors(um.poisoned_train)
        x, y, mask = tensors["x"], tensors["y"].long(), tensors.get("mask")
        mask = None if mask is None else mask.bool()
    _expect_images(x, data, str(um.poisoned_train if um.poisoned_train != CHECKPOINT else um.checkpoint))
    return PoisonedSet(x, y, mask, None if mask is None else float(mask.float().mean()))


def upstream_spec(um: UserModel, dataset_spec: dict, model_params: dict) -> dict:
    """What determines a defense of this model (its cache key's upstream): the weights, the architecture, the
    normalisation, the dataset and the poisoned training set (data-side defenses retrain on it)."""
    train = None if um.poisoned_train is None else digest(um.checkpoint if um.poisoned_train == CHECKPOINT
                                                          else um.poisoned_train)
    return {"user_model": {"weights": digest(um.weights_file), "format": um.format, "arch": um.arch,
                           "arch_params": model_params, "normalize": json.loads(json.dumps(um.normalize)),
                           "poisoned_train": train, **dataset_spec}}
