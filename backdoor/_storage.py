"""Helpers the library and the harness share for stored files and tensors: a file's SHA-256 (memoised per stat)
and a module's state dict as prefixed tensors, as the cache and the checkpoint readers store them."""
from __future__ import annotations

import hashlib
import os
from functools import lru_cache

import torch


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes (hex), read in blocks."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def memo_file_sha256(path: str | os.PathLike) -> str:
    """``file_sha256`` memoised per path and stat (size, mtime, ctime, inode): a file changed or replaced under
    its name is hashed again."""
    st = os.stat(path)
    return _memo_sha256(str(path), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


@lru_cache(maxsize=200_000)  # an image tree's files too (backdoor.data._files.files_fingerprint)
def _memo_sha256(path: str, size: int, mtime_ns: int, ctime_ns: int, inode: int) -> str:
    return file_sha256(path)  # the stat fields are part of the memo key only


def module_to_tensors(module: torch.nn.Module, prefix: str = "model.") -> dict[str, torch.Tensor]:
    return {prefix + k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def tensors_with_prefix(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
