"""Tiny ImageNet (200 classes, 64x64) from the official ``tiny-imagenet-200`` folder.

Y. Le, X. Yang, "Tiny ImageNet Visual Recognition Challenge", Stanford CS231N course report, 2015
(data: http://cs231n.stanford.edu/tiny-imagenet-200.zip).

Layout: ``tiny-imagenet-200/wnids.txt`` (one WordNet id per line), ``train/<wnid>/images/*.JPEG`` (500 per
class) and ``val/images/*.JPEG`` with ``val/val_annotations.txt`` (tab-separated: file name, wnid, box). As
in the paper, the labelled val split (10,000 images) is the test set; the unlabelled ``test/`` folder is not
used. ``root`` is the folder holding ``tiny-imagenet-200`` (default: the data root), or that folder itself.

Defaults, as in the BackdoorBench code: class index = line number in ``wnids.txt`` (not sorted wnids);
training images class by class in the numeric order of their file names (``<wnid>_0`` .. ``<wnid>_499``);
val images in the annotation file's order; grey-scale JPEGs converted to RGB. Normalisation: the original
code's constants, mean (0.4802, 0.4481, 0.3975), std (0.2302, 0.2265, 0.2262), used for every ``image_size``
(they are not recomputed; they are the original's values, not the exact per-pixel std of the training set,
which is larger, and only scale the inputs). ``hflip=True``: mirrored natural images keep their class; the
original code flips only CIFAR-10, so its Tiny ImageNet runs had no flip.

Option beyond the original: ``image_size`` other than 64 resizes every image (PIL bilinear, antialiased when
shrinking), e.g. 32 for quick runs. Memory: 100,000 x 3 x 64 x 64 uint8 = 1.2 GB, decoded into one tensor.
"""
from __future__ import annotations

from pathlib import Path

import torch

from backdoor.data import Dataset, Split, register_dataset
from backdoor.data._files import (all_files, check_image_size, files_fingerprint, natural_key, not_found, read_images,
                                  resolve_root)

FOLDER = "tiny-imagenet-200"
NUM_CLASSES = 200
HOW_TO_GET = ("download http://cs231n.stanford.edu/tiny-imagenet-200.zip (Stanford CS231n, Tiny ImageNet) "
              "and extract it in the data root")


def _parts(directory: Path) -> list[Path]:
    return [directory / "wnids.txt", directory / "train", directory / "val" / "images",
            directory / "val" / "val_annotations.txt"]


def _locate(root: str | None = None, image_size: int = 64) -> tuple[Path, Path]:
    """Check the parameters and find the dataset folder (nothing is read): data root, dataset folder."""
    check_image_size("tiny_imagenet", image_size)
    base = resolve_root(root)
    candidates = [base / FOLDER, base]
    for directory in candidates:
        if all(p.exists() for p in _parts(directory)):
            break
    else:
        raise not_found("tiny_imagenet", base, [p for d in candidates for p in _parts(d)], HOW_TO_GET)
    return base, directory


def _check(root: str | None = None, image_size: int = 64) -> int:
    """What the matrix loader checks: the parameters and that the files are there. Returns the image side."""
    _locate(root, image_size)
    return image_size


def _fingerprint(params: dict) -> dict:
    """A cache fingerprint of the dataset folder's files (None while it is missing or a parameter is bad)."""
    try:
        _, directory = _locate(**params)
    except (OSError, ValueError, TypeError):
        return {"files": None}
    return {"files": files_fingerprint([p for part in _parts(directory) for p in all_files(part)], directory)}


@register_dataset("tiny_imagenet")
def tiny_imagenet(root: str | None = None, image_size: int = 64) -> Dataset:
    """Tiny ImageNet: 200 classes, 64x64, 100,000 train / 10,000 val images (val is the test set)."""
    base, directory = _locate(root, image_size)
    wnids = [line.split()[0] for line in (directory / "wnids.txt").read_text().splitlines() if line.strip()]
    index = {wnid: i for i, wnid in enumerate(wnids)}
    if len(index) != len(wnids):
        raise ValueError(f"{directory / 'wnids.txt'}: duplicate class ids")
    if len(wnids) > NUM_CLASSES:
        raise ValueError(f"{directory / 'wnids.txt'}: {len(wnids)} classes, Tiny ImageNet has {NUM_CLASSES}")

    train_paths: list[Path] = []
    train_labels: list[int] = []
    for wnid, label in index.items():
        folder = directory / "train" / wnid / "images"
        files = sorted((p for p in folder.glob("*") if p.suffix.lower() in (".jpeg", ".jpg")), key=natural_key) \
            if folder.is_dir() else []
        if not files:
            raise not_found("tiny_imagenet", base, [folder / f"{wnid}_*.JPEG"], HOW_TO_GET)
        train_paths += files
        train_labels += [label] * len(files)

    annotations = directory / "val" / "val_annotations.txt"
    test_paths: list[Path] = []
    test_labels: list[int] = []
    for number, line in enumerate(annotations.read_text().splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) < 2 or fields[1] not in index:
            raise ValueError(f"{annotations}, line {number}: expected '<file>\\t<wnid>...' with a wnid listed in "
                             f"wnids.txt, got {line!r}")
        test_paths.append(directory / "val" / "images" / fields[0])
        test_labels.append(index[fields[1]])
    if not test_paths:
        raise not_found("tiny_imagenet", base, [annotations], HOW_TO_GET + f" ({annotations} lists no images)")

    train = Split(read_images(train_paths, image_size, desc="tiny_imagenet train"),
                  torch.tensor(train_labels, dtype=torch.int64))
    test = Split(read_images(test_paths, image_size, desc="tiny_imagenet val"),
                 torch.tensor(test_labels, dtype=torch.int64))
    return Dataset(name="tiny_imagenet", train=train, test=test, num_classes=NUM_CLASSES,
                   mean=(0.4802, 0.4481, 0.3975), std=(0.2302, 0.2265, 0.2262), hflip=True,
                   params={"image_size": image_size})


tiny_imagenet.num_classes = NUM_CLASSES
tiny_imagenet.check = _check
tiny_imagenet.fingerprint = _fingerprint
