"""Running grid cases on a Ray cluster: one Ray task per group (a backdoored model and all its defenses).

The driver (the pytest process) submits one task per group with ``RayGrid.submit`` and takes each case's record
from its finished task with ``RayGrid.run(case)``; it alone writes records. A task builds a ``Runner`` on its
node and runs the group's cases in order, through one of two caches (``CACHE_MODES``):

- ``shared``: every node opens the driver's ``--cache-dir`` (a mount all nodes see: NFS, Lustre, ...), and the
  cache's file locks make concurrent builders build an artifact once, exactly as xdist workers do.
- ``object-store``: no shared storage. Each node keeps its own cache under ``node_cache/<node id>``; on a miss
  it first asks a relay actor on the driver's node for the entry (so a rerun loads what any earlier run built),
  and the task returns every entry it built, which the driver writes into its own cache. Entries travel as
  bytes through Ray's object store and are checked against their manifest before they are used.

Node loss and worker crashes are retried by Ray (``max_retries``); an exception raised outside the cases (an
import, the cache) is retried the same way (``retry_exceptions``). An exception inside one case is that case's
failure only: the task records it and goes on with the group, as a local run would.

Ray is imported lazily: the core install works without it, and ``require_ray`` names the extra to install.
"""
from __future__ import annotations

import os
import socket
import tempfile
import traceback
import uuid
from pathlib import Path

from filelock import FileLock

CACHE_MODES = ("shared", "object-store")
RELAY_NAME = "backdoor-cache-relay"


def require_ray():
    """The ``ray`` module, or a clear error naming the extra that brings it."""
    try:
        import ray
    except ImportError:
        raise RuntimeError("--ray needs Ray, an optional extra: pip install -c constraints.txt -e .[ray]") from None
    return ray


def connect(address: str | None, node_ip: str | None = None):
    """Connect this process to a Ray cluster: ``address`` (host:port, or ``auto``), else ``$RAY_ADDRESS`` or a
    cluster started on this machine, else a new local one. ``node_ip`` is this machine's address as the
    cluster knows it (needed where it is not the address of the default route). Returns the ``ray`` module."""
    ray = require_ray()
    if not ray.is_initialized():
        ray.init(address=address or None, _node_ip_address=node_ip, log_to_driver=False,
                 configure_logging=False)
    return ray


def check_options(cpus: float, gpus: float | None, retries: int, cache_mode: str) -> None:
    """Bad option values stop the run with the value and what is allowed."""
    if not cpus > 0:
        raise ValueError(f"--ray-cpus: {cpus} is not allowed; expected a number of CPUs per task > 0")
    if gpus is not None and gpus < 0:
        raise ValueError(f"--ray-gpus: {gpus} is not allowed; expected a number of GPUs per task >= 0")
    if retries < 0:
        raise ValueError(f"--ray-retries: {retries} is not allowed; expected a count >= 0")
    if cache_mode not in CACHE_MODES:
        raise ValueError(f"--ray-cache: {cache_mode!r} is not allowed; expected one of {', '.join(CACHE_MODES)}")


# -- the cache of a task --------------------------------------------------------------------------------------
def entry_files(root: Path, rel: str) -> dict[str, bytes]:
    """The files of one cache entry (``kind/key``) as bytes; empty when the entry is not there."""
    folder = root / rel
    if not (folder / "manifest.json").is_file():
        return {}
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def store_entry(root: Path, rel: str, files: dict[str, bytes]) -> bool:
    """Write an entry into the cache at ``root`` unless it is there (atomically, under the entry's lock, as
    the cache writes). True when written. A damaged entry is refused by the cache's own check when read."""
    final = root / rel
    final.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(final) + ".lock"):
        if final.exists() or not files:
            return False
        tmp = final.parent / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        for name, data in files.items():
            (tmp / Path(name).name).write_bytes(data)
        os.rename(tmp, final)
    return True


class CacheRelay:
    """A Ray actor on the driver's node: hands out the driver cache's entries (object-store mode)."""

    def __init__(self, root: str):
        self.root = Path(root)

    def fetch(self, rel: str) -> dict[str, bytes]:
        return entry_files(self.root, rel)


def relay_cache_class():
    """``RelayCache``: an ``ArtifactCache`` that, on a miss, loads the entry from the relay, and remembers the
    entries it built (defined here so that importing this module imports neither torch nor ray)."""
    from backdoor.harness.cache import ArtifactCache

    class RelayCache(ArtifactCache):
        def __init__(self, root, relay=None):
            super().__init__(root)
            self.relay = relay
            self.built: list[str] = []

        def get_or_build(self, kind, spec, build):
            final = self.path(kind, spec)
            rel = f"{final.parent.name}/{final.name}"
            if self.relay is not None and not final.exists():
                try:
                    store_entry(self.root, rel, require_ray().get(self.relay.fetch.remote(rel)))
                except Exception as e:  # the relay is gone: build it here
                    print(f"backdoor ray: cache relay unavailable ({type(e).__name__}); building {rel}", flush=True)
            artifact, hit = super().get_or_build(kind, spec, build)
            if not hit:
                self.built.append(rel)
            return artifact, hit

    return RelayCache


# -- the task -------------------------------------------------------------------------------------------------
def node_cache_root(node_cache: str | None, node_id: str) -> Path:
    """A node's own cache in object-store mode: ``<node_cache or the temp dir>/backdoor-ray-cache/<node id>``
    (the node id keeps two nodes of one machine apart, as two machines would be)."""
    return Path(node_cache or tempfile.gettempdir()) / "backdoor-ray-cache" / node_id[:16]


def run_group(cases: list, cache_dir: str, cache_mode: str, relay, device: str, threads: int,
              node_cache: str | None = None) -> dict:
    """The body of one Ray task: run a group's cases in order on this node. Returns ``records`` (case id ->
    record, with the node in ``provenance``), ``errors`` (case id -> traceback) and, in object-store mode,
    ``entries`` (the cache entries this task built: ``kind/key`` -> files)."""
    import torch

    from backdoor import progress
    from backdoor.harness.runner import Runner

    ray = require_ray()
    torch.set_num_threads(threads)
    progress.set_quiet(True)
    context = ray.get_runtime_context()
    node = {"node_id": context.get_node_id(), "host": socket.gethostname(), "pid": os.getpid()}
    root = Path(cache_dir) if cache_mode == "shared" else node_cache_root(node_cache, node["node_id"])
    cache = relay_cache_class()(root, relay if cache_mode == "object-store" else None)
    gpus = context.get_accelerator_ids().get("GPU", [])
    runner = Runner(cache, device if device != "auto" else "cuda:0" if gpus else "cpu")
    records, errors = {}, {}
    for case in cases:
        try:
            record = runner.run(case)
        except Exception:
            errors[case.case_id] = traceback.format_exc()
            continue
        record["provenance"]["ray_node"] = node
        records[case.case_id] = record
    entries = {rel: entry_files(root, rel) for rel in cache.built} if cache_mode == "object-store" else {}
    return {"records": records, "errors": errors, "entries": entries}


class CaseFailed(RuntimeError):
    """A case raised on its Ray worker; the message carries the remote traceback."""


class RayGrid:
    """The driver's side: submits one task per group, then hands each case its record (``run``), storing the
    cache entries a task built into the driver's cache (object-store mode)."""

    def __init__(self, cache_dir: str | os.PathLike, *, cpus: float = 1.0, gpus: float | None = None,
                 retries: int = 3, cache_mode: str = "shared", device: str = "auto", threads: int = 1,
                 node_cache: str | None = None):
        check_options(cpus, gpus, retries, cache_mode)
        self.cache_dir = Path(cache_dir).resolve()
        self.cpus, self.gpus, self.retries, self.cache_mode = cpus, gpus, retries, cache_mode
        self.device, self.threads, self.node_cache = device, threads, node_cache
        self.pending: dict = {}  # ObjectRef -> group
        self.done: dict[str, dict] = {}  # group -> the task's result
        self.groups: dict[str, str] = {}  # case id -> group
        self.relay = None
        self.stored = 0  # cache entries the driver received (object-store mode)

    def submit(self, groups: dict[str, list]) -> None:
        """One task per group (group -> its selected cases, in run order)."""
        ray = require_ray()
        gpus = self.gpus if self.gpus is not None else (1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0)
        if self.cache_mode == "object-store":
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
            here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
            self.relay = ray.remote(num_cpus=0, scheduling_strategy=here, max_restarts=-1)(CacheRelay).remote(
                str(self.cache_dir))
        task = ray.remote(run_group).options(num_cpus=self.cpus, num_gpus=gpus, max_retries=self.retries,
                                             retry_exceptions=True, name="backdoor-group")
        for group, cases in groups.items():
            ref = task.remote(cases, str(self.cache_dir), self.cache_mode, self.relay, self.device, self.threads,
                              self.node_cache)
            self.pending[ref] = group
            self.groups.update({case.case_id: group for case in cases})

    def run(self, case) -> dict:
        """The record of ``case`` from its group's finished task (waiting for it; collecting every other task
        that finishes meanwhile, so a finished result never waits on a node that may die)."""
        group = self.groups[case.case_id]
        while group not in self.done:
            self._collect()
        result = self.done[group]
        if "failed" in result:
            raise CaseFailed(f"{case.case_id}: its group's Ray task failed after {self.retries} retries: "
                             f"{result['failed']}")
        if case.case_id in result["errors"]:
            raise CaseFailed(f"{case.case_id} failed on its Ray worker:\n{result['errors'][case.case_id]}")
        return result["records"][case.case_id]

    def _collect(self) -> None:
        ray = require_ray()
        ready, _ = ray.wait(list(self.pending), num_returns=1)
        for ref in ready:
            group = self.pending.pop(ref)
            try:
                result = ray.get(ref)
            except ray.exceptions.RayError as e:  # retries spent (node lost, worker crashed, raised outside a case)
                self.done[group] = {"failed": f"{type(e).__name__}: {e}"}
                continue
            for rel, files in result.pop("entries").items():
                self.stored += store_entry(self.cache_dir, rel, files)
            self.done[group] = result

    def close(self) -> None:
        """Cancel what is still pending and disconnect (the cluster keeps running)."""
        ray = require_ray()
        for ref in list(self.pending):
            ray.cancel(ref, force=True)
        self.pending.clear()
        if ray.is_initialized():
            ray.shutdown()
