"""Any image-classification set stored as one numpy ``.npz`` archive (``numpy.savez`` / ``savez_compressed``).

Not from the BackdoorBench paper: a reader for data already converted to arrays (e.g. a GTSRB or CIFAR subset
decoded once elsewhere). ``path`` names the file: a relative path is resolved under the data root
(``$BACKDOOR_DATA_ROOT``, default ``~/.backdoor/data``, or the parameter ``root``), an absolute one (or ``~/...``)
is used as is.

Keys: ``x_train`` and ``x_test``, uint8 images [N, 3, H, W] (channels first, the layout used everywhere here);
[N, H, W, 3] (channels last, as PIL/TensorFlow write them) is accepted too and transposed, but only where it is
unambiguous: an array whose axes 1 and 3 both have length 3 is refused (store it channels first). Both splits
must have the same image size; non-square images load, but then the matrix loader cannot check the attacks'
parameters against the image size. ``y_train`` and ``y_test``: integer labels [N] (any integer dtype), one per
image, >= 0. Optional ``class_names`` (or ``class_folder``, read when ``class_names`` is absent): one string per
class, kept in the dataset's ``params["class_names"]``. Other keys are ignored. The file is read with
``numpy.load(allow_pickle=False)``: object arrays (which need pickle, and so could run code) are refused.

Classes: ``num_classes`` if given (every label must be below it), else the largest label of both splits plus
one; at least 2. Normalisation (``normalize=True``, default): per-channel mean and std of the training images,
as ``imagefolder``; ``normalize=False`` gives mean 0, std 1, as the ``gtsrb`` reader and the original code use
for GTSRB. ``hflip`` (default False) declares whether a horizontal flip keeps the label: it must stay false for
traffic signs (a mirrored "turn left" is "turn right"), digits and text; set it true for natural photographs.

Checks: ``npz.check`` (run by the matrix loader) opens the archive lazily and reads only the array headers
(dtype, shape) and the labels, not the images, so a wrong file stops a matrix at load: missing file (the error
names the resolved path and the data root), not an .npz archive, missing keys (the error lists the keys
present), wrong dtype, wrong number of axes or channels, lengths that differ, labels negative or outside
``num_classes``, a class-name list of the wrong length. Each error names the file, the key and what is allowed.

Cache: ``npz.fingerprint(params)`` is the file's sha256 (``{"sha256": ...}``, memoised per file path, size,
mtime, ctime and inode, so a replaced file is hashed again and an unchanged one once per process), for the
dataset's cache spec (``Runner.dataset_spec``), so that a file replaced under the same name never serves artifacts
built from the old one (where the spec lacks it, nothing but the parameters tells the two files apart).
The loaded dataset carries the digest of the bytes it actually read in ``params["sha256"]``.
"""
from __future__ import annotations

import errno
import hashlib
import io
import os
import stat
import zipfile
from pathlib import Path

import numpy as np
import torch

from backdoor._checks import ParameterError, check_int, is_int
from backdoor._storage import memo_file_sha256
from backdoor.data import Dataset, DatasetNotFoundError, Split, register_dataset
from backdoor.data._files import ROOT_HELP, chunked_channel_stats, resolve_root

REQUIRED = ("x_train", "y_train", "x_test", "y_test")
NAME_KEYS = ("class_names", "class_folder")  # the first present is used
HOW_TO_GET = ("write the arrays with numpy.savez(path, x_train=..., y_train=..., x_test=..., y_test=...) "
              "(uint8 images [N, 3, H, W], integer labels [N]) and put the file under the data root, or give an "
              "absolute `path`")
IMAGES = "uint8 images [N, 3, H, W] (or unambiguous channels-last [N, H, W, 3])"


# -- finding and opening the file -------------------------------------------------------------------------------
def _resolve(path, root) -> tuple[Path, Path | None]:
    """(data root, file): ``path`` under the data root unless it is absolute (``~`` expanded)."""
    base = resolve_root(root)
    if path is None:
        return base, None
    return base, base / Path(path).expanduser()


def _missing(base: Path, file: Path | None) -> DatasetNotFoundError:
    if file is None:
        what = (f"npz: no .npz file given: set the parameter `path` (a file name under the data root {base}, "
                "or an absolute path; in a matrix: `datasets: {npz: {path: name.npz}}`)")
    elif file.is_dir():
        what = f"npz: {file} is a directory, not an .npz file (data root {base})"
    else:
        what = f"npz: dataset file {file} not found (data root {base})"
    return DatasetNotFoundError(f"{what}\n{ROOT_HELP.format(name='npz')}\nGet the files: {HOW_TO_GET}")


def _not_regular(file: Path) -> str | None:
    """What ``file`` is when it exists but is no regular file nor a directory (reading a FIFO blocks, /dev/zero
    never ends, a symlink loop cannot be opened), else None."""
    try:
        mode = os.stat(file).st_mode
    except OSError as e:
        return "a symbolic link loop" if e.errno == errno.ELOOP else None
    kinds = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
             (stat.S_ISSOCK, "a socket"))
    return next((name for test, name in kinds if test(mode)), None)


def _locate(path, root) -> Path:
    base, file = _resolve(path, root)
    odd = _not_regular(file) if file is not None else None
    if odd is not None:
        raise ValueError(f"npz: {file} is {odd}, not a regular file; expected an .npz file")
    if file is None or not file.is_file():
        raise _missing(base, file)
    return file


def _open(source, file: Path) -> np.lib.npyio.NpzFile:
    """``np.load(source, allow_pickle=False)`` as an .npz archive; anything else is one ValueError naming ``file``."""
    try:
        archive = np.load(source, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"npz: {file} is not an .npz archive ({reason})") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ValueError(f"npz: {file} holds a single array {archive.dtype} {archive.shape}, not an .npz archive "
                         f"of the keys {', '.join(REQUIRED)} (write it with numpy.savez)")
    return archive


def _check_keys(archive, file: Path) -> None:
    missing = [k for k in REQUIRED if k not in archive.files]
    if missing:
        present = ", ".join(sorted(archive.files)) or "none"
        raise ValueError(f"npz: {file}: missing key(s) {', '.join(missing)}; the file has: {present}; expected "
                         f"{', '.join(REQUIRED)} (optional: {' or '.join(NAME_KEYS)})")


def _header(archive, key: str, file: Path) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of one member, from its .npy header only (the data is not decompressed)."""
    member = f"{key}.npy" if f"{key}.npy" in archive.zip.namelist() else key
    try:
        with archive.zip.open(member) as fp:
            version = np.lib.format.read_magic(fp)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(fp)
            elif version == (2, 0):
                shape, _, dtype = np.lib.format.read_array_header_2_0(fp)
            else:  # format 3.0 (utf-8 field names): rare, read below
                shape = dtype = None
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"npz: {file}: {key} is not a readable .npy array ({e})") from None
    if shape is None:
        array = _array(archive, key, file)
        return array.shape, array.dtype
    return tuple(shape), dtype


def _array(archive, key: str, file: Path) -> np.ndarray:
    try:
        return archive[key]
    except ValueError as e:
        if "allow_pickle" in str(e):
            raise ValueError(f"npz: {file}: {key} is an object array (stored with pickle), which is not loaded; "
                             f"store {'strings' if key in NAME_KEYS else 'numbers'} instead") from None
        raise ValueError(f"npz: {file}: {key} cannot be read ({e})") from None
    except (OSError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"npz: {file}: {key} cannot be read ({e})") from None


# -- validation (shared by the check and the loader) --------------------------------------------------------------
def _image_layout(shapes: dict, dtypes: dict, file: Path) -> bool:
    """Check both image arrays' dtype and shape; returns True for channels last."""
    layouts, sizes = {}, {}
    for key in ("x_train", "x_test"):
        shape, dtype = shapes[key], dtypes[key]
        if dtype.hasobject:
            raise ValueError(f"npz: {file}: {key} is an object array (stored with pickle), which is not loaded; "
                             f"expected {IMAGES}")
        if dtype != np.uint8:
            raise ValueError(f"npz: {file}: {key} has dtype {dtype}; expected {IMAGES}, values 0..255 "
                             "(convert with (x * 255).round().astype(np.uint8) for floats in [0, 1])")
        if len(shape) != 4:
            raise ValueError(f"npz: {file}: {key} has {len(shape)} axes {shape}; expected {IMAGES} "
                             "(grey images: repeat them over 3 channels)")
        if shape[1] == 3 and shape[3] == 3:
            raise ValueError(f"npz: {file}: {key} has shape {shape}: ambiguous between channels first and channels "
                             "last; store it as [N, 3, H, W]")
        if shape[1] == 3:
            layouts[key], sizes[key] = False, shape[2:]
        elif shape[3] == 3:
            layouts[key], sizes[key] = True, shape[1:3]
        else:
            raise ValueError(f"npz: {file}: {key} has shape {shape}, with no axis of 3 channels; expected {IMAGES}")
        if shape[0] == 0 or 0 in sizes[key]:
            raise ValueError(f"npz: {file}: {key} has shape {shape}, which holds no image; every split needs images")
    if sizes["x_train"] != sizes["x_test"]:
        raise ValueError(f"npz: {file}: x_train images are {'x'.join(map(str, sizes['x_train']))} but x_test images "
                         f"are {'x'.join(map(str, sizes['x_test']))}; both splits need the same size")
    return layouts["x_train"]


def _check_label_arrays(shapes: dict, dtypes: dict, file: Path) -> None:
    for split in ("train", "test"):
        key, n = f"y_{split}", shapes[f"x_{split}"][0]
        shape, dtype = shapes[key], dtypes[key]
        if dtype.hasobject:
            raise ValueError(f"npz: {file}: {key} is an object array (stored with pickle), which is not loaded; "
                             "expected integer labels [N] (e.g. int64)")
        if dtype.kind not in "iu":
            raise ValueError(f"npz: {file}: {key} has dtype {dtype}; expected integer labels [N] (e.g. int64)")
        if len(shape) != 1:
            raise ValueError(f"npz: {file}: {key} has shape {shape}; expected integer labels [N], one per image")
        if shape[0] != n:
            raise ValueError(f"npz: {file}: {key} has {shape[0]} labels for the {n} images of x_{split}; expected "
                             "one label per image")


def _class_count(labels: dict[str, np.ndarray], num_classes: int | None, file: Path) -> int:
    for key, y in labels.items():
        if y.size and int(y.min()) < 0:
            raise ValueError(f"npz: {file}: {key} holds the negative label {int(y.min())}; labels are class "
                             "indices 0..num_classes-1")
    largest = max(int(y.max()) for y in labels.values() if y.size)
    samples = labels["y_train"].size if "y_train" in labels else max(y.size for y in labels.values())
    if (num_classes if num_classes is not None else largest + 1) > samples:
        what = f"num_classes {num_classes}" if num_classes is not None else \
            f"the label {largest} (which makes {largest + 1} classes)"
        raise ValueError(f"npz: {file}: {what} is not allowed; expected at most as many classes as the "
                         f"{samples} training samples (class indices 0..K-1)")
    if num_classes is not None:
        for key, y in labels.items():
            if int(y.max()) >= num_classes:
                raise ValueError(f"npz: {file}: {key} holds the label {int(y.max())}, outside 0..{num_classes - 1} "
                                 f"(num_classes {num_classes}); raise num_classes or leave it out")
        return num_classes
    if largest + 1 < 2:
        raise ValueError(f"npz: {file}: every label is {largest}, so there is {largest + 1} class; a classifier "
                         "needs at least 2")
    return largest + 1


def _class_names(archive, file: Path, num_classes: int, read: bool) -> list[str] | None:
    key = next((k for k in NAME_KEYS if k in archive.files), None)
    if key is None:
        return None
    shape, dtype = _header(archive, key, file)
    if dtype.hasobject or dtype.kind not in "US" or len(shape) != 1:
        raise ValueError(f"npz: {file}: {key} is {dtype} {shape}; expected one string per class "
                         "(numpy.array(names), dtype str)")
    if shape[0] != num_classes:
        raise ValueError(f"npz: {file}: {key} has {shape[0]} names for {num_classes} classes; expected one per class")
    if not read:
        return None
    names = _array(archive, key, file)
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names.tolist()]


def _check_params(path, root, num_classes, hflip, normalize) -> None:
    if path is None:
        raise ParameterError("npz", "path", path, "an .npz file: a path relative to the data root, or absolute")
    check_int("npz", "num_classes", num_classes, minimum=2, optional=True)
    for name, value in (("hflip", hflip), ("normalize", normalize)):
        if not isinstance(value, bool):
            raise ParameterError("npz", name, value, "true or false")


def _inspect(archive, file: Path, num_classes: int | None) -> tuple[bool, int, tuple[int, int]]:
    """Everything but the images: keys, headers, labels, names. (channels last, class count, (H, W))."""
    _check_keys(archive, file)
    headers = {k: _header(archive, k, file) for k in REQUIRED}
    shapes = {k: s for k, (s, _) in headers.items()}
    dtypes = {k: d for k, (_, d) in headers.items()}
    channels_last = _image_layout(shapes, dtypes, file)
    _check_label_arrays(shapes, dtypes, file)
    labels = {k: _array(archive, k, file) for k in ("y_train", "y_test")}
    classes = _class_count(labels, num_classes, file)
    _class_names(archive, file, classes, read=False)
    x_shape = shapes["x_train"]
    return channels_last, classes, (x_shape[1:3] if channels_last else x_shape[2:])


def _check(path: str | None = None, root: str | None = None, num_classes: int | None = None, hflip: bool = False,
           normalize: bool = True) -> int | None:
    """What the matrix loader checks: the parameters, the file, its keys, the arrays' dtypes and shapes (headers
    only) and the labels. Returns the image side (None for non-square images)."""
    _check_params(path, root, num_classes, hflip, normalize)
    file = _locate(path, root)
    with _open(file, file) as archive:
        _, _, (h, w) = _inspect(archive, file, num_classes)
    return h if h == w else None


def _count_classes(params: dict) -> int | None:
    """``num_classes`` if given, else from the labels (the images are not read); None when the file cannot tell."""
    declared = params.get("num_classes")
    if declared is not None:
        return declared if is_int(declared) and declared >= 2 else None  # a bad value: the check reports it
    try:
        file = _locate(params.get("path"), params.get("root"))
        with _open(file, file) as archive:
            return _inspect(archive, file, None)[1]
    except (ValueError, OSError):
        return None  # the check reports what is wrong


def _test_classes(params: dict) -> set[int] | None:
    """The classes present in the test split (labels only are read); None when the file cannot tell."""
    try:
        file = _locate(params.get("path"), params.get("root"))
        with _open(file, file) as archive:
            return {int(v) for v in np.unique(_array(archive, "y_test", file))}
    except (ValueError, OSError):
        return None  # the check reports what is wrong


# -- cache fingerprint ----------------------------------------------------------------------------------------
def _fingerprint(params: dict) -> dict:
    """What keys cached artifacts beyond the parameters: the file's content digest (None while it is missing)."""
    try:
        return {"sha256": memo_file_sha256(_locate(params.get("path"), params.get("root")).resolve())}
    except OSError:
        return {"sha256": None}


# -- the dataset ----------------------------------------------------------------------------------------------
@register_dataset("npz")
def npz(path: str | None = None, root: str | None = None, num_classes: int | None = None, hflip: bool = False,
        normalize: bool = True) -> Dataset:
    """Arrays from one .npz file (x_train, y_train, x_test, y_test), found under the data root."""
    file = _locate(path, root)  # first: without `path`, the error says where files belong
    _check_params(path, root, num_classes, hflip, normalize)
    raw = file.read_bytes()  # one read: the digest is of exactly the bytes loaded
    with _open(io.BytesIO(raw), file) as archive:
        channels_last, classes, _ = _inspect(archive, file, num_classes)
        names = _class_names(archive, file, classes, read=True)
        splits = {}
        for split in ("train", "test"):
            x = torch.from_numpy(np.ascontiguousarray(_array(archive, f"x_{split}", file)))
            if channels_last:
                x = x.permute(0, 3, 1, 2).contiguous()
            y = torch.from_numpy(_array(archive, f"y_{split}", file).astype(np.int64))
            splits[split] = Split(x, y)
    mean, std = chunked_channel_stats(splits["train"].x) if normalize else ((0.0,) * 3, (1.0,) * 3)
    params = {"path": str(path), "sha256": hashlib.sha256(raw).hexdigest(), "num_classes": classes, "hflip": hflip,
              "normalize": normalize}
    if names is not None:
        params["class_names"] = names
    return Dataset(name="npz", train=splits["train"], test=splits["test"], num_classes=classes, mean=mean, std=std,
                   hflip=hflip, params=params)


npz.num_classes = _count_classes
npz.check = _check
npz.fingerprint = _fingerprint
npz.test_classes = _test_classes
