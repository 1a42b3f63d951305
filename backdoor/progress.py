"""Progress bars (tqdm) that the harness can silence globally (``-q``, xdist workers)."""
from __future__ import annotations

import sys
from typing import Iterable, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")
_quiet = False


def set_quiet(quiet: bool) -> None:
    global _quiet
    _quiet = quiet


def is_quiet() -> bool:
    return _quiet


def progress(iterable: Iterable[T], desc: str, total: int | None = None, leave: bool = False) -> tqdm:
    return tqdm(iterable, desc=desc, total=total, leave=leave, disable=_quiet, file=sys.stderr,
                dynamic_ncols=True, mininterval=0.5)


def log(message: str) -> None:
    if not _quiet:
        tqdm.write(message, file=sys.stderr)
