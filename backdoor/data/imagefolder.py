"""Any image-classification data set on disk as ``root/train/<class>/*`` and ``root/test/<class>/*``.

Not from the BackdoorBench paper: a reader for user data in the folder-per-class convention popularised by
torchvision's ``ImageFolder``. ``root`` is required (there is no default folder).

Classes are the sorted names of the (non-hidden) folders under ``train/``; ``test/`` must have the same
folders, otherwise ValueError names the differences. Image files (bmp, gif, jpeg/jpg, pgm, png, ppm, tif/tiff,
webp, any case) are searched recursively inside each class folder and read in natural name order; every image
is converted to RGB and resized to ``image_size`` x ``image_size`` (default 32) with PIL's bilinear filter
(antialiased when shrinking; the aspect ratio is not kept, as the original code's ``Resize((h, w))``).
Normalisation: per-channel mean and std of the training images (computed in chunks, no float copy of the
whole set). ``hflip`` (default True) declares whether a horizontal flip keeps the label; set it to false for
text, digits, signs and the like. Every class folder of both splits must hold at least one image.

``imagefolder.check`` (run by the matrix loader) checks all this without loading: the parameters, the tree, and
every image file, opened by PIL (header) and, for trees of at most ``DECODE_AT_CHECK`` files, fully decoded,
so a corrupt file stops a matrix at load with one line naming it. In larger trees a file whose header is fine
but whose pixel data is damaged is found when the data is first read (the same one-line ValueError).
"""
from __future__ import annotations

from pathlib import Path

import torch

from backdoor.data import Dataset, DatasetNotFoundError, Split, register_dataset
from backdoor.data._files import (ROOT_HELP, check_image_files, check_image_size, chunked_channel_stats,
                                  files_fingerprint, image_files, read_images)

DECODE_AT_CHECK = 5000  # trees up to this many files are fully decoded by the matrix loader's check


def _class_folders(split_dir: Path) -> dict[str, Path]:
    return {d.name: d for d in sorted(split_dir.iterdir()) if d.is_dir() and not d.name.startswith(".")}


def _count_classes(params: dict) -> int | None:
    root = params.get("root")
    train = Path(root).expanduser() / "train" if root else None
    return len(_class_folders(train)) if train is not None and train.is_dir() else None


def _scan(root: str | None = None, image_size: int = 32,
          hflip: bool = True) -> tuple[dict[str, tuple[list[Path], list[int]]], int]:
    """Check the parameters and the folder tree (without decoding images): the image files and labels of
    each split, and the class count. Every class folder of both splits must hold at least one image file."""
    if root is None:
        raise ValueError("imagefolder: the parameter `root` is required (a folder holding train/<class>/ and "
                         "test/<class>/); in a matrix: `datasets: {imagefolder: {root: /path}}`")
    check_image_size("imagefolder", image_size)
    if not isinstance(hflip, bool):
        raise ValueError(f"imagefolder: hflip must be true or false, got {hflip!r}")
    base = Path(root).expanduser()
    split_dirs = {"train": base / "train", "test": base / "test"}
    missing = [d for d in split_dirs.values() if not d.is_dir()]
    if missing:
        paths = "\n".join(f"  - {d}" for d in split_dirs.values())
        raise DatasetNotFoundError(
            f"imagefolder: dataset folders not found under {base}; looked for:\n{paths}\n"
            f"(each holding one sub-folder of images per class). {ROOT_HELP.format(name='imagefolder')}\n"
            "Get the files: arrange your own images as root/train/<class>/*.png (or .jpg, ...) and "
            "root/test/<class>/*")

    train_classes = _class_folders(split_dirs["train"])
    test_classes = _class_folders(split_dirs["test"])
    if list(train_classes) != list(test_classes):
        only_train = sorted(set(train_classes) - set(test_classes))
        only_test = sorted(set(test_classes) - set(train_classes))
        raise ValueError(f"imagefolder: train and test class folders differ under {base}: only in train/: "
                         f"{only_train or 'none'}; only in test/: {only_test or 'none'}")
    if len(train_classes) < 2:
        raise ValueError(f"imagefolder: {split_dirs['train']} has {len(train_classes)} class folder(s); "
                         "a classifier needs at least 2")
    splits = {}
    for split, classes in (("train", train_classes), ("test", test_classes)):
        paths: list[Path] = []
        labels: list[int] = []
        for label, folder in enumerate(classes.values()):
            files = image_files(folder)
            if not files:
                raise ValueError(f"imagefolder: {split} class folder {folder} holds no image files "
                                 f"(every class needs images in train/ and test/)")
            paths += files
            labels += [label] * len(files)
        splits[split] = (paths, labels)
    return splits, len(train_classes)


def _check(root: str | None = None, image_size: int = 32, hflip: bool = True) -> int:
    """What the matrix loader checks: parameters, the folder tree, and every image file's header (the whole
    image is decoded too when the tree holds at most ``DECODE_AT_CHECK`` files). Returns the image side."""
    files = [p for paths, _ in _scan(root, image_size, hflip)[0].values() for p in paths]
    check_image_files(files, decode=len(files) <= DECODE_AT_CHECK)
    return image_size


def _fingerprint(params: dict) -> dict:
    """What keys cached artifacts beyond the parameters: the tree's files (their paths, which give the labels, and
    their content; ``files_fingerprint``). None while the tree cannot be scanned (the check reports why)."""
    try:
        splits, _ = _scan(**params)
    except (ValueError, OSError, TypeError):
        return {"files": None}
    base = Path(params["root"]).expanduser()
    return {"files": files_fingerprint([p for paths, _ in splits.values() for p in paths], base)}


@register_dataset("imagefolder")
def imagefolder(root: str | None = None, image_size: int = 32, hflip: bool = True) -> Dataset:
    """Your own images as root/train/<class>/* and root/test/<class>/*, resized to image_size (default 32)."""
    files, num_classes = _scan(root, image_size, hflip)
    splits = {split: Split(read_images(paths, image_size, desc=f"imagefolder {split}"),
                           torch.tensor(labels, dtype=torch.int64)) for split, (paths, labels) in files.items()}
    mean, std = chunked_channel_stats(splits["train"].x)
    return Dataset(name="imagefolder", train=splits["train"], test=splits["test"], num_classes=num_classes,
                   mean=mean, std=std, hflip=hflip, params={"image_size": image_size, "hflip": hflip})


imagefolder.num_classes = _count_classes
imagefolder.check = _check
imagefolder.fingerprint = _fingerprint
