"""Datasets as uint8 tensors: ``Split`` (images N x C x H x W, labels N) and ``Dataset`` (train + test).

Every dataset is a registered factory returning a ``Dataset``. ``digits`` (embedded, real) and ``synthetic``
(procedural) need no files; the others read the official on-disk formats from a local data root.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from backdoor._registry import Registry

DATASETS: Registry["Dataset"] = Registry("dataset", package="backdoor.data")
register_dataset = DATASETS.register


class DatasetNotFoundError(FileNotFoundError):
    """The files of a real dataset are not under the data root; the message says where and how to get them."""


@dataclass(frozen=True)
class Split:
    """One split: ``x`` uint8 [N, C, H, W], ``y`` int64 [N]."""

    x: torch.Tensor
    y: torch.Tensor

    def __post_init__(self):
        if self.x.dtype != torch.uint8 or self.x.dim() != 4:
            raise ValueError(f"images must be uint8 [N, C, H, W], got {self.x.dtype} {tuple(self.x.shape)}")
        if self.y.shape != (self.x.shape[0],):
            raise ValueError(f"labels {tuple(self.y.shape)} do not match {self.x.shape[0]} images")

    def __len__(self) -> int:
        return self.x.shape[0]

    def subset(self, index: torch.Tensor) -> "Split":
        return Split(self.x[index], self.y[index])


@dataclass(frozen=True)
class Dataset:
    name: str
    train: Split
    test: Split
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    hflip: bool  # horizontal flip is a label-preserving augmentation for this data
    params: dict = field(default_factory=dict)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train.x.shape[1:])

    def class_counts(self) -> torch.Tensor:
        return torch.bincount(self.train.y, minlength=self.num_classes)


def default_data_root() -> Path:
    """``$BACKDOOR_DATA_ROOT`` if set, else ``~/.backdoor/data``."""
    return Path(os.environ.get("BACKDOOR_DATA_ROOT", Path.home() / ".backdoor" / "data")).expanduser()


def channel_stats(x: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images, in [0, 1] units."""
    xf = x.float().div_(255)
    mean = xf.mean(dim=(0, 2, 3))
    std = xf.std(dim=(0, 2, 3)).clamp_min(1e-3)
    return tuple(round(v, 4) for v in mean.tolist()), tuple(round(v, 4) for v in std.tolist())


def num_classes_of(name: str, params: dict) -> int | None:
    """The class count a dataset will have, without loading it (None when only loading can tell).

    Factories declare it as a ``num_classes`` attribute: an int, or a callable of the parameters.
    """
    declared = getattr(DATASETS.get(name), "num_classes", None)
    return declared(params) if callable(declared) else declared


def test_classes_of(name: str, params: dict) -> set[int] | None:
    """The classes a dataset's test split holds, where the dataset can tell without loading (a ``test_classes``
    attribute taking the parameters), else None."""
    declared = getattr(DATASETS.get(name), "test_classes", None)
    return declared(params) if callable(declared) else None


def check_dataset(name: str, params: dict) -> int | None:
    """Check a dataset's parameters (and that its files are there) without loading it; returns the image
    side in pixels where known. Factories may declare a ``check`` attribute taking their parameters (it
    raises ValueError, ``ParameterError`` for one bad value, or ``DatasetNotFoundError``)."""
    from backdoor._checks import check_annotated

    factory = DATASETS.get(name)
    check_annotated(name, factory, kwargs=params)
    check = getattr(factory, "check", None)
    return check(**params) if check is not None else None


def load_dataset(name: str, **params) -> Dataset:
    return DATASETS.create(name, **params)


def dataset_to_tensors(data: Dataset) -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"train_x": data.train.x, "train_y": data.train.y, "test_x": data.test.x, "test_y": data.test.y}
    meta = {
        "name": data.name,
        "num_classes": data.num_classes,
        "mean": list(data.mean),
        "std": list(data.std),
        "hflip": data.hflip,
        "params": data.params,
    }
    return tensors, meta


def dataset_from_tensors(tensors: dict[str, torch.Tensor], meta: dict) -> Dataset:
    return Dataset(
        name=meta["name"],
        train=Split(tensors["train_x"], tensors["train_y"]),
        test=Split(tensors["test_x"], tensors["test_y"]),
        num_classes=meta["num_classes"],
        mean=tuple(meta["mean"]),
        std=tuple(meta["std"]),
        hflip=meta["hflip"],
        params=meta.get("params", {}),
    )
