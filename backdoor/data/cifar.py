"""CIFAR-10 and CIFAR-100 from the official python-pickle distribution.

A. Krizhevsky, "Learning Multiple Layers of Features from Tiny Images", technical report, University of
Toronto, 2009 (https://www.cs.toronto.edu/~kriz/cifar.html).

Layout (the extracted ``cifar-10-python.tar.gz`` / ``cifar-100-python.tar.gz``): ``cifar-10-batches-py/``
with ``data_batch_1`` .. ``data_batch_5`` (train, in this order) and ``test_batch``; ``cifar-100-python/``
with ``train`` and ``test``. ``root`` is the folder that holds that directory (default: the data root,
``$BACKDOOR_DATA_ROOT``), or the directory itself.

Defaults, as in the BackdoorBench paper and code: 32x32, 50,000 train / 10,000 test images; CIFAR-10 10
classes, mean (0.4914, 0.4822, 0.4465), std (0.247, 0.243, 0.261); CIFAR-100 100 fine-label classes, mean
(0.5071, 0.4865, 0.4409), std (0.2673, 0.2564, 0.2762). Horizontal flip is label-preserving for both.

Departures: the original code flips only CIFAR-10 during training (its transform builder tests for the name
``cifar10``); we declare ``hflip=True`` for CIFAR-100 as well, because mirrored natural images keep their
class. The trainer's own ``hflip`` switch still turns it off for a run that wants the original behaviour.
The pickles are read by this module, not by torchvision's ``CIFAR10``, so that no md5 check rejects a
subset or a re-packed copy; the arrays are used as stored (row-major 3 x 32 x 32 per image, RGB planes).
Pickle files can run code when loaded, so they are read by a restricted unpickler that builds only what the
official files hold (dicts, lists, strings, numbers and numpy arrays: ``numpy.ndarray``, ``numpy.dtype`` and
numpy's array-reconstruction functions, plus ``_codecs.encode`` for bytes in protocol-2 re-packs); any other
global (``os.system``, ``builtins.eval``, ...) is refused with an error naming the file, before it is called.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch

from backdoor.data import Dataset, Split, register_dataset
from backdoor.data._files import files_fingerprint, not_found, resolve_root

# The globals a CIFAR pickle may name: numpy array reconstruction (protocols 2-4: _reconstruct + ndarray + dtype;
# protocol 5: _frombuffer), under numpy 1's ``numpy.core`` and numpy 2's ``numpy._core`` module names, and
# ``_codecs.encode``, which Python 3 uses for bytes objects in protocol-2 pickles.
ALLOWED_GLOBALS = frozenset({
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
})

HOW_TO_GET = ("download the python version ({archive}) from https://www.cs.toronto.edu/~kriz/cifar.html "
              "and extract it in the data root")


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only ``ALLOWED_GLOBALS``: it refuses (and so never calls) anything else."""

    def find_class(self, module: str, name: str):
        if (module, name) not in ALLOWED_GLOBALS:
            allowed = ", ".join(f"{m}.{n}" for m, n in sorted(ALLOWED_GLOBALS))
            raise pickle.UnpicklingError(f"refused to load {module}.{name}: a CIFAR pickle may only name {allowed}")
        return super().find_class(module, name)


def _unpickle(path: Path):
    """The object stored in ``path``, read with ``RestrictedUnpickler`` (Python 2 strings as latin-1)."""
    with open(path, "rb") as f:
        try:
            return RestrictedUnpickler(f, encoding="latin1").load()
        except pickle.UnpicklingError as e:
            raise ValueError(f"{path}: not an official CIFAR pickle ({e})") from e


def _read_pickle(path: Path, label_key: str, num_classes: int) -> Split:
    entry = _unpickle(path)
    if not isinstance(entry, dict) or "data" not in entry or label_key not in entry:
        keys = sorted(entry) if isinstance(entry, dict) else type(entry).__name__
        raise ValueError(f"{path}: expected a dict with keys 'data' and {label_key!r}, got {keys}")
    data = np.asarray(entry["data"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{path}: 'data' must be uint8 [N, 3072], got {data.dtype} {data.shape}")
    labels = torch.as_tensor(np.asarray(entry[label_key], dtype=np.int64))
    if labels.shape != (data.shape[0],):
        raise ValueError(f"{path}: {labels.numel()} labels for {data.shape[0]} images")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"{path}: labels must lie in 0..{num_classes - 1}, "
                         f"found {int(labels.min())}..{int(labels.max())}")
    x = torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())
    return Split(x, labels)


def _locate(name: str, root, folder: str, archive: str, names: list[str]) -> Path:
    """The directory holding every official file (under the data root, or the root itself)."""
    base = resolve_root(root)
    candidates = [base / folder, base]  # the folder that holds the extracted directory, or the directory itself
    for directory in candidates:
        if all((directory / n).is_file() for n in names):
            return directory
    looked_for = [directory / n for directory in candidates for n in names]
    raise not_found(name, base, looked_for, HOW_TO_GET.format(archive=archive))


CIFAR10_FILES = ("cifar10", "cifar-10-batches-py", "cifar-10-python.tar.gz", [f"data_batch_{i}" for i in range(1, 6)] +
                 ["test_batch"])
CIFAR100_FILES = ("cifar100", "cifar-100-python", "cifar-100-python.tar.gz", ["train", "test"])


def _load(name: str, root, folder: str, archive: str, train_files: list[str], test_file: str, label_key: str,
          num_classes: int, mean: tuple[float, ...], std: tuple[float, ...]) -> Dataset:
    directory = _locate(name, root, folder, archive, train_files + [test_file])
    parts = [_read_pickle(directory / n, label_key, num_classes) for n in train_files]
    train = Split(torch.cat([p.x for p in parts]), torch.cat([p.y for p in parts]))
    test = _read_pickle(directory / test_file, label_key, num_classes)
    return Dataset(name=name, train=train, test=test, num_classes=num_classes, mean=mean, std=std, hflip=True,
                   params={})


@register_dataset("cifar10")
def cifar10(root: str | None = None) -> Dataset:
    """CIFAR-10: 32x32 natural images, 10 classes, 50,000 train / 10,000 test (official pickles)."""
    return _load("cifar10", root, "cifar-10-batches-py", "cifar-10-python.tar.gz",
                 [f"data_batch_{i}" for i in range(1, 6)], "test_batch", "labels", 10,
                 (0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261))


@register_dataset("cifar100")
def cifar100(root: str | None = None) -> Dataset:
    """CIFAR-100: 32x32 natural images, 100 fine-label classes, 50,000 train / 10,000 test (official pickles)."""
    return _load("cifar100", root, "cifar-100-python", "cifar-100-python.tar.gz", ["train"], "test",
                 "fine_labels", 100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))


def _check_cifar10(root: str | None = None) -> int:
    """What the matrix loader checks: the official files are there (nothing is read). Returns the image side."""
    _locate(CIFAR10_FILES[0], root, CIFAR10_FILES[1], CIFAR10_FILES[2], CIFAR10_FILES[3])
    return 32


def _check_cifar100(root: str | None = None) -> int:
    _locate(CIFAR100_FILES[0], root, CIFAR100_FILES[1], CIFAR100_FILES[2], CIFAR100_FILES[3])
    return 32


def _fingerprint(files: tuple):
    """A cache fingerprint of the official files' content (None while they are missing: the check says so)."""
    def fingerprint(params: dict) -> dict:
        try:
            directory = _locate(files[0], params.get("root"), files[1], files[2], files[3])
        except OSError:
            return {"files": None}
        return {"files": files_fingerprint([directory / n for n in files[3]], directory)}
    return fingerprint


cifar10.num_classes = 10
cifar100.num_classes = 100
cifar10.check = _check_cifar10
cifar100.check = _check_cifar100
cifar10.fingerprint = _fingerprint(CIFAR10_FILES)
cifar100.fingerprint = _fingerprint(CIFAR100_FILES)
