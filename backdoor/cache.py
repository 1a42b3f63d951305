"""On-disk artifact cache shared by reruns, ``-k`` selections and pytest-xdist workers.

An artifact is ``(tensors, meta)``: a dict of tensors (stored with safetensors, never pickle) and a JSON
dict. Its key is a hash of its kind and full spec. Writes are atomic (built in a temp directory, renamed into
place) under a per-key file lock, so concurrent builders of one artifact build it once and the others load
it. Every file's SHA-256 is in ``manifest.json``, written last; an entry whose files do not match is treated
as missing, removed and rebuilt, never loaded.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from collections import OrderedDict
from pathlib import Path
from typing import Callable

import torch
from filelock import FileLock
from safetensors.torch import load_file, save_file

Artifact = tuple[dict[str, torch.Tensor], dict]
FORMAT_VERSION = 1
_FILES = ("tensors.safetensors", "meta.json")


def canonical_json(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def spec_key(kind: str, spec: dict) -> str:
    payload = canonical_json({"kind": kind, "spec": spec, "format": FORMAT_VERSION})
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class ArtifactCache:
    """``get_or_build(kind, spec, build)`` -> ``(artifact, hit)``; memory first, then disk, then build."""

    def __init__(self, root: str | os.PathLike, memory_items: int = 8):
        self.root = Path(root)
        self._memory: OrderedDict[str, Artifact] = OrderedDict()
        self._memory_items = memory_items

    def path(self, kind: str, spec: dict) -> Path:
        return self.root / kind / spec_key(kind, spec)

    def get_or_build(self, kind: str, spec: dict, build: Callable[[], Artifact]) -> tuple[Artifact, bool]:
        key = f"{kind}/{spec_key(kind, spec)}"
        if key in self._memory:
            self._memory.move_to_end(key)
            return self._memory[key], True
        final = self.path(kind, spec)
        artifact = self._load(final)
        hit = artifact is not None
        if not hit:
            final.parent.mkdir(parents=True, exist_ok=True)
            with FileLock(str(final) + ".lock"):
                artifact = self._load(final)  # another process may have built it meanwhile
                hit = artifact is not None
                if not hit:
                    artifact = build()
                    self._write(final, kind, spec, artifact)
        self._remember(key, artifact)
        return artifact, hit

    def _remember(self, key: str, artifact: Artifact) -> None:
        self._memory[key] = artifact
        while len(self._memory) > self._memory_items:
            self._memory.popitem(last=False)

    def _write(self, final: Path, kind: str, spec: dict, artifact: Artifact) -> None:
        tensors, meta = artifact
        tmp = final.parent / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        try:
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                      str(tmp / "tensors.safetensors"))
            (tmp / "meta.json").write_text(canonical_json(meta))
            manifest = {"kind": kind, "spec": spec, "format": FORMAT_VERSION, "created": time.time(),
                        "files": {name: {"sha256": _sha256(tmp / name), "size": (tmp / name).stat().st_size}
                                  for name in _FILES}}
            (tmp / "manifest.json").write_text(canonical_json(manifest))
            if final.exists():  # a corrupt entry, found invalid under the lock
                shutil.rmtree(final)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def _load(self, final: Path) -> Artifact | None:
        if not self._valid(final):
            return None
        try:
            tensors = load_file(str(final / "tensors.safetensors"))
            meta = json.loads((final / "meta.json").read_text())
        except Exception:  # checksums matched but the content still does not parse: rebuild
            return None
        return tensors, meta

    @staticmethod
    def _valid(final: Path) -> bool:
        try:
            manifest = json.loads((final / "manifest.json").read_text())
            for name, expected in manifest["files"].items():
                path = final / name
                if path.stat().st_size != expected["size"] or _sha256(path) != expected["sha256"]:
                    return False
            return True
        except (OSError, ValueError, KeyError, TypeError):
            return False


def module_to_tensors(module: torch.nn.Module, prefix: str = "model.") -> dict[str, torch.Tensor]:
    return {prefix + k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def tensors_with_prefix(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
