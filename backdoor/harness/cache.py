"""On-disk artifact cache shared by reruns, ``-k`` selections and pytest-xdist workers.

An artifact is ``(tensors, meta)``: a dict of tensors (stored with safetensors, never pickle) and a JSON
dict. Its key is a hash of its kind and full spec. Writes are atomic (built in a temp directory, renamed into
place) under a per-key file lock, so concurrent builders of one artifact build it once and the others load
it. Every file's SHA-256 is in ``manifest.json``, written last; it must list every file of the entry (at least
the tensors and the meta), and an entry whose files do not match it is removed and rebuilt, never loaded, with
one line on stderr naming it. The manifest also keeps how the entry was built (``build``: seconds, UTC time,
host, pid and the provenance the caller sets in ``ArtifactCache.provenance``), so a run that only loads it
still knows what building it cost.

A build killed mid-write leaves its temp directory ``.tmp-<key>-<host>-<pid>-<uuid>``; the first
``get_or_build`` of a later cache sweeps such directories away when their builder is gone (same host, pid no
longer running) or they are older than ``STALE_SECONDS``, and only while it holds that key's lock, which every
writer holds while its temp directory exists, so a concurrent build is never touched.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import re
import shutil
import socket
import sys
import time
import uuid
from collections import OrderedDict
from pathlib import Path
from typing import Callable

import torch
from filelock import FileLock, Timeout
from safetensors.torch import load_file, save_file

from backdoor._storage import file_sha256

Artifact = tuple[dict[str, torch.Tensor], dict]
FORMAT_VERSION = 1
_FILES = ("tensors.safetensors", "meta.json")
STALE_SECONDS = 3600.0  # a temp directory whose builder cannot be checked (other host, old name) is stale after this
HOST = re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "host"
_TMP = re.compile(r"\.tmp-(?P<key>[0-9a-f]{24})-(?:(?P<host>[A-Za-z0-9._]+)-(?P<pid>\d+)-)?[0-9a-f]{8}")


def canonical_json(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def spec_key(kind: str, spec: dict) -> str:
    payload = canonical_json({"kind": kind, "spec": spec, "format": FORMAT_VERSION})
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


def say(message: str) -> None:
    """One line on stderr (not silenced by ``-q``: it reports damage, not progress)."""
    print(f"backdoor cache: {message}", file=sys.stderr, flush=True)


def _builder_gone(host: str | None, pid: str | None) -> bool:
    """True when the process that named a temp directory is known to have ended (same host, pid not running)."""
    if host != HOST or pid is None:
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError):  # running under another user, or not a pid at all
        return False
    return False


def _build_record(value) -> dict | None:
    """A manifest's ``build`` entry if it has the shape ``_build`` writes, else None (old or hand-edited)."""
    if (isinstance(value, dict) and isinstance(value.get("seconds"), (int, float))
            and isinstance(value.get("provenance"), dict) and isinstance(value.get("utc_time"), str)
            and isinstance(value.get("host"), str)):
        return value
    return None


class ArtifactCache:
    """``get_or_build(kind, spec, build)`` -> ``(artifact, hit)``; memory first, then disk, then build.
    ``build_info(kind, spec)`` says how the entry was built (seconds, time, provenance)."""

    def __init__(self, root: str | os.PathLike, memory_items: int = 8):
        self.root = Path(root)
        self._memory: OrderedDict[str, Artifact] = OrderedDict()
        self._memory_items = memory_items
        self.provenance: dict = {}  # stored with every build (the runner sets versions and device)
        self._builds: dict[str, dict | None] = {}
        self._swept = False

    def path(self, kind: str, spec: dict) -> Path:
        return self.root / kind / spec_key(kind, spec)

    def build_info(self, kind: str, spec: dict) -> dict | None:
        """How the entry was built (``seconds``, ``utc_time``, ``host``, ``pid``, ``provenance``), once this cache
        has built or loaded it; None for entries written before the cache kept it."""
        return self._builds.get(str(self.path(kind, spec)))

    def get_or_build(self, kind: str, spec: dict, build: Callable[[], Artifact]) -> tuple[Artifact, bool]:
        self.sweep_stale()
        key = f"{kind}/{spec_key(kind, spec)}"
        if key in self._memory:
            self._memory.move_to_end(key)
            return self._memory[key], True
        final = self.path(kind, spec)
        artifact, _ = self._load(final)
        hit = artifact is not None
        if not hit:
            final.parent.mkdir(parents=True, exist_ok=True)
            with FileLock(str(final) + ".lock"):
                artifact, problem = self._load(final)  # another process may have built it meanwhile
                hit = artifact is not None
                if not hit:
                    if problem:
                        say(f"corrupt entry {final} ({problem}): removing and rebuilding it")
                    artifact = self._build(final, kind, spec, build)
        self._remember(key, artifact)
        return artifact, hit

    def _build(self, final: Path, kind: str, spec: dict, build: Callable[[], Artifact]) -> Artifact:
        """Build and write the entry (the caller holds its lock); temp directories of this key are stale."""
        for tmp in final.parent.glob(f".tmp-{final.name}-*"):
            shutil.rmtree(tmp, ignore_errors=True)
            say(f"removed {tmp}, left by a build of this artifact that was killed mid-write")
        start = time.perf_counter()
        artifact = build()
        info = {"seconds": round(time.perf_counter() - start, 3), "host": HOST, "pid": os.getpid(),
                "utc_time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                "provenance": self.provenance}
        self._write(final, kind, spec, artifact, info)
        self._builds[str(final)] = json.loads(canonical_json(info))
        return artifact

    def sweep_stale(self) -> None:
        """Once per cache object: remove the temp directories of builds that were killed mid-write."""
        if self._swept:
            return
        self._swept = True
        for tmp in sorted(self.root.glob("*/.tmp-*")):
            match = _TMP.fullmatch(tmp.name)
            if match is None or not tmp.is_dir():
                continue
            try:
                age = time.time() - tmp.stat().st_mtime
            except OSError:  # gone meanwhile
                continue
            if _builder_gone(match["host"], match["pid"]) or age > STALE_SECONDS:
                self._remove_stale(tmp, tmp.parent / match["key"], match["host"], match["pid"])

    @staticmethod
    def _remove_stale(tmp: Path, final: Path, host: str | None, pid: str | None) -> None:
        """Remove ``tmp`` if ``final``'s lock is free now (a writer holds it while its temp directory exists)."""
        try:
            with FileLock(str(final) + ".lock", timeout=0):
                if tmp.is_dir():
                    shutil.rmtree(tmp, ignore_errors=True)
                    say(f"removed {tmp}, left by a build that was killed mid-write"
                        + (f" (pid {pid} on {host})" if pid else ""))
        except (Timeout, OSError):  # being written now, or not ours to remove
            return

    def _remember(self, key: str, artifact: Artifact) -> None:
        self._memory[key] = artifact
        while len(self._memory) > self._memory_items:
            self._memory.popitem(last=False)

    def _write(self, final: Path, kind: str, spec: dict, artifact: Artifact, build: dict) -> None:
        tensors, meta = artifact
        tmp = final.parent / f".tmp-{final.name}-{HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        try:
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                      str(tmp / "tensors.safetensors"))
            (tmp / "meta.json").write_text(canonical_json(meta))
            manifest = {"kind": kind, "spec": spec, "format": FORMAT_VERSION, "created": time.time(),
                        "files": {name: {"sha256": file_sha256(tmp / name), "size": (tmp / name).stat().st_size}
                                  for name in _FILES}, "build": build}
            (tmp / "manifest.json").write_text(canonical_json(manifest))
            if final.exists():  # a corrupt entry, found invalid under the lock
                shutil.rmtree(final)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def _load(self, final: Path) -> tuple[Artifact | None, str | None]:
        """``(artifact, None)``, or ``(None, what is wrong)`` (``(None, None)``: no entry)."""
        if not final.exists():
            return None, None
        problem = self._problem(final)
        if problem:
            return None, problem
        try:
            tensors = load_file(str(final / "tensors.safetensors"))
            meta = json.loads((final / "meta.json").read_text())
            build = _build_record(json.loads((final / "manifest.json").read_text()).get("build"))
        except Exception as e:  # checksums matched but the content still does not parse: rebuild
            return None, f"its content does not parse: {type(e).__name__}"
        self._builds[str(final)] = build
        return (tensors, meta), None

    @staticmethod
    def _problem(final: Path) -> str | None:
        """Why the entry cannot be trusted, or None: its manifest lists every file of the entry (at least the
        tensors and the meta) and every listed file matches its size and SHA-256."""
        try:
            files = json.loads((final / "manifest.json").read_text())["files"]
            unlisted = sorted({p.name for p in final.iterdir()} - {"manifest.json"} - set(files))
            missing = [name for name in _FILES if name not in files]
            if missing or unlisted:
                return f"its manifest does not list {', '.join(missing + unlisted)}"
            for name, expected in files.items():
                path = final / name
                if path.stat().st_size != expected["size"] or file_sha256(path) != expected["sha256"]:
                    return f"{name} does not match its manifest"
            return None
        except FileNotFoundError as e:
            return f"{Path(e.filename).name if e.filename else 'a file'} is missing"
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            return f"unreadable manifest: {type(e).__name__}"

