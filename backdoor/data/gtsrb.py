"""GTSRB, the German Traffic Sign Recognition Benchmark, from its official on-disk format.

J. Stallkamp, M. Schlipsing, J. Salmen, C. Igel, "The German Traffic Sign Recognition Benchmark: A multi-class
classification competition", IJCNN 2011 (https://benchmark.ini.rub.de/gtsrb_dataset.html).

Layouts read (``root`` is the folder the archives were extracted in; default: the data root):

- official: ``GTSRB/Final_Training/Images/000NN/*.ppm`` with ``GT-000NN.csv`` in each class folder
  (``GTSRB_Final_Training_Images.zip``), ``GTSRB/Final_Test/Images/*.ppm`` (``GTSRB_Final_Test_Images.zip``)
  and ``GT-final_test.csv`` (``GTSRB_Final_Test_GT.zip``; searched in ``root``, ``root/GTSRB``,
  ``GTSRB/Final_Test`` and ``GTSRB/Final_Test/Images``). The annotation files are semicolon-separated with
  the header ``Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId``; labels are their ``ClassId``.
- torchvision's ``GTSRB(root, download=True)``: ``gtsrb/GTSRB/Training/000NN/*.ppm`` (labels from the CSV
  when present, else from the folder number), ``gtsrb/GTSRB/Final_Test/Images`` and ``gtsrb/GT-final_test.csv``.

Order: training images class folder by class folder, each in its annotation file's order (as the original
code); test images in ``GT-final_test.csv`` order. 39,209 train / 12,630 test images, 43 classes.

Defaults, as in the BackdoorBench paper and code: every image resized to 32x32 (``image_size``), the whole
image with its border, not the annotated sign region, with PIL's bilinear filter (antialiased when
shrinking), which is what the original's ``transforms.Resize((32, 32))`` does to a PIL image; the aspect
ratio is not kept. No normalisation (mean 0, std 1), as the original code. ``hflip=False``: signs are not
mirror-symmetric (a mirrored "turn left" is "turn right"); the original code also flips only CIFAR-10.

Option beyond the original: ``crop_roi=True`` crops each image to its annotated sign region (Roi.X2/Roi.Y2
taken as inclusive pixel coordinates) before resizing; it needs the annotation files, so it is not available
for a torchvision training folder without them.
"""
from __future__ import annotations

import csv
from pathlib import Path

import torch

from backdoor.data import Dataset, Split, register_dataset
from backdoor.data._files import all_files, check_image_size, files_fingerprint, not_found, read_images, resolve_root

NUM_CLASSES = 43
HOW_TO_GET = ("the official GTSRB page https://benchmark.ini.rub.de/gtsrb_dataset.html (archives at "
              "https://sid.erda.dk/public/archives/daaeac0d7ce1152aea9b61d9f1e19370/): extract "
              "GTSRB_Final_Training_Images.zip, GTSRB_Final_Test_Images.zip and GTSRB_Final_Test_GT.zip in the "
              "data root; or run torchvision.datasets.GTSRB(root, split=..., download=True) for both splits")
TEST_CSV = "GT-final_test.csv"


def _layouts(base: Path) -> list[tuple[Path, Path, list[Path]]]:
    """(training folder, test image folder, candidate test annotation files) of each supported layout."""
    official = (base / "GTSRB" / "Final_Training" / "Images", base / "GTSRB" / "Final_Test" / "Images",
                [base / TEST_CSV, base / "GTSRB" / TEST_CSV, base / "GTSRB" / "Final_Test" / TEST_CSV,
                 base / "GTSRB" / "Final_Test" / "Images" / TEST_CSV])
    tv = base / "gtsrb"
    torchvision = (tv / "GTSRB" / "Training", tv / "GTSRB" / "Final_Test" / "Images", [tv / TEST_CSV])
    # ``root`` may also be torchvision's ``gtsrb`` folder itself.
    torchvision_base = (base / "GTSRB" / "Training", base / "GTSRB" / "Final_Test" / "Images", [base / TEST_CSV])
    return [official, torchvision, torchvision_base]


def _read_annotations(path: Path, image_folder: Path, crop_roi: bool):
    """Image paths, labels and (if crop_roi) PIL boxes listed in one semicolon-separated annotation file."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f, delimiter=";", skipinitialspace=True))
    if rows:
        missing = {"Filename", "ClassId"} | ({"Roi.X1", "Roi.Y1", "Roi.X2", "Roi.Y2"} if crop_roi else set())
        missing -= set(rows[0])
        if missing:
            raise ValueError(f"{path}: missing column(s) {', '.join(sorted(missing))}; an annotation file has "
                             "the header Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId")
    paths, labels, boxes = [], [], []
    for row in rows:
        try:
            label = int(row["ClassId"])
            if crop_roi:
                x1, y1, x2, y2 = (int(row[k]) for k in ("Roi.X1", "Roi.Y1", "Roi.X2", "Roi.Y2"))
                if not (0 <= x1 <= x2 and 0 <= y1 <= y2):
                    raise ValueError(f"empty region ({x1}, {y1}, {x2}, {y2})")
                boxes.append((x1, y1, x2 + 1, y2 + 1))
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: bad row {row}: {e}") from e
        if not 0 <= label < NUM_CLASSES:
            raise ValueError(f"{path}: ClassId {label} of {row['Filename']} is outside 0..{NUM_CLASSES - 1}")
        paths.append(image_folder / row["Filename"])
        labels.append(label)
    return paths, labels, (boxes if crop_roi else None)


def _read_training(folder: Path, crop_roi: bool):
    paths, labels, boxes = [], [], []
    class_folders = sorted(d for d in folder.iterdir() if d.is_dir() and d.name.isdigit())
    if not class_folders:
        raise not_found("gtsrb", folder, [folder / "000NN"], HOW_TO_GET)
    for class_folder in class_folders:
        annotations = class_folder / f"GT-{class_folder.name}.csv"
        if annotations.is_file():
            p, y, b = _read_annotations(annotations, class_folder, crop_roi)
        elif crop_roi:
            raise ValueError(f"gtsrb: crop_roi=True needs the annotation file {annotations}, which is missing; "
                             "use crop_roi=False or the official training archive")
        else:  # torchvision's training folder may come without annotations: the folder number is the class
            label = int(class_folder.name)
            if not 0 <= label < NUM_CLASSES:
                raise ValueError(f"gtsrb: class folder {class_folder} is outside 0..{NUM_CLASSES - 1}")
            p = sorted(class_folder.glob("*.ppm"))
            y, b = [label] * len(p), None
        paths += p
        labels += y
        boxes += b or []
    return paths, labels, (boxes if crop_roi else None)


def _locate(root: str | None = None, image_size: int = 32, crop_roi: bool = False) -> tuple[Path, Path, Path, Path]:
    """Check the parameters and find the files (nothing is read): data root, training folder, test image
    folder, test annotation file."""
    check_image_size("gtsrb", image_size)
    if not isinstance(crop_roi, bool):
        raise ValueError(f"gtsrb: crop_roi must be true or false, got {crop_roi!r}")
    base = resolve_root(root)
    looked_for: list[Path] = []
    for train_dir, test_dir, csv_candidates in _layouts(base):
        test_csv = next((c for c in csv_candidates if c.is_file()), None)
        if train_dir.is_dir() and test_dir.is_dir() and test_csv is not None:
            break
        looked_for += [train_dir, test_dir, *csv_candidates]
    else:
        raise not_found("gtsrb", base, looked_for, HOW_TO_GET)
    return base, train_dir, test_dir, test_csv


def _check(root: str | None = None, image_size: int = 32, crop_roi: bool = False) -> int:
    """What the matrix loader checks: the parameters and that the files are there. Returns the image side."""
    _locate(root, image_size, crop_roi)
    return image_size


def _fingerprint(params: dict) -> dict:
    """A cache fingerprint of the files read (None while they are missing or a parameter is bad: the check says
    so)."""
    try:
        base, train_dir, test_dir, test_csv = _locate(**params)
    except (OSError, ValueError, TypeError):
        return {"files": None}
    return {"files": files_fingerprint(all_files(train_dir) + all_files(test_dir) + [test_csv], base)}


@register_dataset("gtsrb")
def gtsrb(root: str | None = None, image_size: int = 32, crop_roi: bool = False) -> Dataset:
    """GTSRB: German traffic signs, 43 classes, resized to 32x32, no normalisation (official format)."""
    base, train_dir, test_dir, test_csv = _locate(root, image_size, crop_roi)
    train_paths, train_labels, train_boxes = _read_training(train_dir, crop_roi)
    test_paths, test_labels, test_boxes = _read_annotations(test_csv, test_dir, crop_roi)
    if not train_paths or not test_paths:
        empty = train_dir if not train_paths else test_csv
        raise not_found("gtsrb", base, [empty], HOW_TO_GET + f" ({empty} lists no images)")
    train = Split(read_images(train_paths, image_size, train_boxes, desc="gtsrb train"),
                  torch.tensor(train_labels, dtype=torch.int64))
    test = Split(read_images(test_paths, image_size, test_boxes, desc="gtsrb test"),
                 torch.tensor(test_labels, dtype=torch.int64))
    return Dataset(name="gtsrb", train=train, test=test, num_classes=NUM_CLASSES, mean=(0.0, 0.0, 0.0),
                   std=(1.0, 1.0, 1.0), hflip=False, params={"image_size": image_size, "crop_roi": crop_roi})


gtsrb.num_classes = NUM_CLASSES
gtsrb.check = _check
gtsrb.fingerprint = _fingerprint
