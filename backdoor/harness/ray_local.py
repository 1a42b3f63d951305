"""A Ray cluster of ``ray start`` processes on this machine's loopback, for the cluster test and the overhead
benchmark: a head node and any number of extra nodes, each with its own CPUs and temp dir.

Everything listens on ``LOOPBACK`` (127.0.0.2): Ray rewrites 127.0.0.1 and ``localhost`` to the machine's
outbound address (``resolve_ip_for_localhost``), while any other loopback address is kept, so a node started
with ``--node-ip-address 127.0.0.2`` binds to it and to nothing else. Each node is started in a session of
its own, so stopping it ends exactly its processes (its process group, and the workers its raylet spawned
into their own groups), never another Ray on the machine, as ``ray stop`` would. Every wait is bounded.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LOOPBACK = "127.0.0.2"


def free_port(host: str = LOOPBACK) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _children() -> dict[int, list[int]]:
    """Parent pid -> child pids, from /proc."""
    tree: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        tree.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    return tree


def group_members(pgid: int) -> list[int]:
    """The live processes of process group ``pgid``."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            pids.append(int(stat.parent.name))
    return pids


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


class LocalCluster:
    """``with LocalCluster(folder) as cluster: cluster.add_node(cpus=1)``: a head (started on entry) and extra
    nodes (logs in ``folder``, Ray's temp dirs under a short ``/tmp/bbray-*``, removed on exit); ``address`` is
    the head's host:port; ``kill_node(i)`` ends node i's processes; exit stops them all."""

    def __init__(self, folder: Path, head_cpus: float = 1, timeout: float = 60.0):
        self.folder = Path(folder)
        self.head_cpus = head_cpus
        self.timeout = timeout
        self.port = free_port()
        self.address = f"{LOOPBACK}:{self.port}"
        self.temp = Path(tempfile.mkdtemp(prefix="bbray-"))  # short: Ray's socket paths must fit in 107 bytes
        self.sessions: list[int] = []  # the pid (= session and group id) of each node's `ray start`
        self.ray = str(Path(sys.executable).with_name("ray"))

    def __enter__(self) -> "LocalCluster":
        try:
            self._start("head", ["--head", f"--port={self.port}", "--include-dashboard=false"], self.head_cpus)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def add_node(self, cpus: float = 1) -> int:
        """Start another node joining the head; returns its index (the head is 0)."""
        return self._start(f"node{len(self.sessions)}", [f"--address={self.address}"], cpus)

    def _start(self, name: str, args: list[str], cpus: float) -> int:
        temp = self.temp / name
        self.folder.mkdir(parents=True, exist_ok=True)
        command = [self.ray, "start", *args, f"--node-ip-address={LOOPBACK}", f"--num-cpus={cpus}", "--num-gpus=0",
                   f"--temp-dir={temp}", "--disable-usage-stats"]
        with open(self.folder / f"{name}.log", "w") as log:
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       start_new_session=True, env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
            self.sessions.append(process.pid)
            code = process.wait(timeout=self.timeout)
        if code != 0:
            raise RuntimeError(f"`{' '.join(command)}` exited {code}: {(self.folder / f'{name}.log').read_text()[-2000:]}")
        return len(self.sessions) - 1

    def node_processes(self, index: int) -> list[int]:
        """Node ``index``'s processes: its group and every descendant (task workers start groups of their own)."""
        tree = _children()
        todo, seen = group_members(self.sessions[index]), []
        while todo:
            pid = todo.pop()
            if pid not in seen:
                seen.append(pid)
                todo += tree.get(pid, [])
        return seen

    def kill_node(self, index: int) -> list[int]:
        """SIGKILL node ``index``'s processes (a node lost without warning); returns the pids killed."""
        pids = self.node_processes(index)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return pids

    def stop(self) -> None:
        """End every node's processes, workers first, head last; waits at most ``timeout`` seconds."""
        deadline = time.monotonic() + self.timeout
        for index in reversed(range(len(self.sessions))):
            pids = self.node_processes(index)
            for sig in (signal.SIGTERM, signal.SIGKILL):
                for pid in pids:
                    try:
                        os.kill(pid, sig)
                    except ProcessLookupError:
                        pass
                until = min(deadline, time.monotonic() + 5)
                while any(_alive(pid) for pid in pids) and time.monotonic() < until:
                    time.sleep(0.1)
                pids = [pid for pid in pids if _alive(pid)]
                if not pids:
                    break
        shutil.rmtree(self.temp, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"
