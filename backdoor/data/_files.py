"""Shared machinery of the on-disk dataset readers: decoding image files into one uint8 tensor, finding the
dataset folder under a data root, and the "files not found" error.

Decoding uses PIL once per file (dataset construction, cached by the pipeline afterwards), on a thread pool
of ``torch.get_num_threads()`` workers (PIL releases the GIL while decoding); every file writes only its own
slot of a preallocated uint8 tensor, so the result does not depend on the number of workers.
"""
from __future__ import annotations

import hashlib
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from backdoor._storage import memo_file_sha256
from backdoor.data import DatasetNotFoundError, default_data_root
from backdoor.progress import progress

IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp")
ROOT_HELP = ("Set the data root with the environment variable BACKDOOR_DATA_ROOT (default ~/.backdoor/data) "
             "or with the dataset parameter `root` (in a matrix: `datasets: {{{name}: {{root: /path}}}}`).")


def natural_key(path: Path) -> tuple:
    """Sort key that orders ``x_2`` before ``x_10`` (the order in which the files were numbered)."""
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name))


def check_image_size(name: str, image_size) -> int:
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"{name}: image_size must be a positive integer (pixels per side), got {image_size!r}")
    return image_size


def resolve_root(root: str | os.PathLike | None) -> Path:
    """The directory the user points at (``root``), or the default data root."""
    return Path(root).expanduser() if root is not None else default_data_root()


def not_found(name: str, root: Path, looked_for: Sequence[Path], how_to_get: str) -> DatasetNotFoundError:
    paths = "\n".join(f"  - {p}" for p in looked_for)
    return DatasetNotFoundError(
        f"{name}: dataset files not found under the data root {root}; looked for:\n{paths}\n"
        f"{ROOT_HELP.format(name=name)}\nGet the files: {how_to_get}"
    )


CONTENT_DIGEST_BYTES = 4 << 30  # trees up to this size are keyed by their files' content, larger ones by stat


def files_fingerprint(paths: Sequence[Path], base: Path) -> str:
    """What keys a dataset read from many files: a sha256 over each file's path relative to ``base`` and its
    content digest (memoised per file and stat, so a process hashes a file once). Beyond
    ``CONTENT_DIGEST_BYTES`` in all, each file's size and modification time stand in for its content (hashing
    a whole ImageNet-sized tree in every process would cost minutes)."""
    stats = [(p, p.stat()) for p in sorted(set(paths))]
    by_content = sum(st.st_size for _, st in stats) <= CONTENT_DIGEST_BYTES
    digest = hashlib.sha256(b"content" if by_content else b"stat")
    for path, st in stats:
        what = memo_file_sha256(path) if by_content else f"{st.st_size}:{st.st_mtime_ns}"
        digest.update(f"{path.relative_to(base).as_posix()}\0{what}\n".encode())
    return digest.hexdigest()


def all_files(folder: Path) -> list[Path]:
    """Every regular file under ``folder`` (recursively, hidden entries included: they may be read); a file
    is itself."""
    if folder.is_file():
        return [folder]
    return [Path(d) / f for d, _, names in os.walk(folder) for f in names if (Path(d) / f).is_file()]


def image_files(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursively, hidden entries skipped), in natural order."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found.extend(Path(dirpath) / f for f in filenames
                     if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS))
    return sorted(found, key=lambda p: (natural_key(p.parent), natural_key(p)))


def _image_error(path: Path, error: Exception) -> Exception:
    if isinstance(error, FileNotFoundError):
        return DatasetNotFoundError(f"image file {path} is listed but missing")
    reason = str(error).splitlines()[0] if str(error) else type(error).__name__
    return ValueError(f"cannot decode image file {path}: {reason}")  # PIL's UnidentifiedImageError, truncation


MAX_IMAGE_PIXELS = 50_000_000  # pixels of one image file (a 20000 x 20000 PNG would decode to 1.2 GB)
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # PIL's modes of 16-bit (and 32-bit) grey images


def check_image_files(paths: Sequence[Path], decode: bool) -> None:
    """Open every image file with PIL (reads its header: its size is bounded) and, with ``decode``, decode its
    pixels (transparency is refused); the first unusable file raises one ValueError naming it."""
    from PIL import Image

    for path in paths:
        try:
            with Image.open(path) as im:
                _check_size(path, im)
                if decode:
                    im.load()
                    _check_opaque(path, im)
        except (OSError, Image.DecompressionBombError) as e:
            raise _image_error(path, e) from None


def _check_size(path: Path, im) -> None:
    if im.width * im.height > MAX_IMAGE_PIXELS:
        raise ValueError(f"image file {path}: {im.width}x{im.height} pixels is not allowed; expected at most "
                         f"{MAX_IMAGE_PIXELS} pixels per image")


def _check_opaque(path: Path, im) -> None:
    """An image with transparent pixels has no one RGB rendering (convert("RGB") keeps whatever colour they
    hold): refused, naming the file; fully opaque alpha channels are fine."""
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
        alpha = im.convert("RGBA").getchannel("A")
        if alpha.getextrema()[0] < 255:
            raise ValueError(f"image file {path} has transparent pixels (alpha < 255): not allowed; expected "
                             "opaque images (flatten them onto a background first)")


def to_rgb(im):
    """A PIL image as 8-bit RGB: 16-bit grey images are scaled to 8 bits (convert("RGB") would clip them to 0 or
    255), everything else through PIL's convert."""
    from PIL import Image

    if im.mode in SIXTEEN_BIT_MODES:  # "I" holds 16-bit PNGs too; one whose values fit 8 bits is taken as is
        wide = np.asarray(im).astype(np.int64).clip(0, 65535)
        sixteen = im.mode != "I" or wide.max(initial=0) > 255
        im = Image.fromarray((wide >> 8 if sixteen else wide).astype(np.uint8), mode="L")
    return im.convert("RGB")


def read_images(paths: Sequence[Path], image_size: int, boxes: Sequence[tuple[int, int, int, int]] | None = None,
                desc: str = "reading images") -> torch.Tensor:
    """Decode image files into one uint8 tensor [N, 3, S, S].

    Each image is converted to RGB, optionally cropped to its box (left, upper, right, lower; right/lower
    exclusive), and resized to S x S with PIL's bilinear filter (antialiased when shrinking, the filter that
    torchvision's ``Resize`` applies to PIL images) when it is not already S x S; the aspect ratio is not kept.
    """
    from PIL import Image

    if boxes is not None and len(boxes) != len(paths):
        raise ValueError(f"{len(boxes)} boxes for {len(paths)} images")
    out = torch.empty((len(paths), 3, image_size, image_size), dtype=torch.uint8)
    slots = out.numpy()  # shares memory with ``out``

    def decode(i: int) -> None:
        path = paths[i]
        try:
            with Image.open(path) as im:
                _check_size(path, im)
                _check_opaque(path, im)
                im = to_rgb(im)
                if boxes is not None:
                    im = im.crop(boxes[i])
                if im.size != (image_size, image_size):
                    im = im.resize((image_size, image_size), Image.BILINEAR)
                slots[i] = np.asarray(im).transpose(2, 0, 1)
        except (OSError, Image.DecompressionBombError) as e:  # missing, unidentified, truncated: one line naming it
            raise _image_error(path, e) from None

    workers = max(1, min(torch.get_num_threads(), 16, len(paths)))
    with ThreadPoolExecutor(workers) as pool:
        for _ in progress(pool.map(decode, range(len(paths))), desc, total=len(paths)):
            pass
    return out


def chunked_channel_stats(x: torch.Tensor, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``backdoor.data.channel_stats`` (mean, unbiased std, [0, 1] units, 4 decimals, std >= 1e-3) computed in
    chunks, so that a large uint8 set is never copied whole to float."""
    c = x.shape[1]
    total = torch.zeros(c, dtype=torch.float64)
    total_sq = torch.zeros(c, dtype=torch.float64)
    for start in range(0, x.shape[0], chunk):
        part = x[start:start + chunk].to(torch.float64).div_(255)
        total += part.sum(dim=(0, 2, 3))
        total_sq += part.square().sum(dim=(0, 2, 3))
    n = x.shape[0] * x.shape[2] * x.shape[3]
    mean = total / n
    var = ((total_sq - n * mean.square()) / max(n - 1, 1)).clamp_min(0)
    std = var.sqrt().clamp_min(1e-3)
    return tuple(round(v, 4) for v in mean.tolist()), tuple(round(v, 4) for v in std.tolist())
