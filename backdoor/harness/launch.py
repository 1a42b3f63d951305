"""The command line that runs a matrix: pytest over the packaged grid.

``fixtures/grid.py`` (the grid test) and ``fixtures.plugin`` ship with the package, so a run needs no checkout:
pytest is configured by the packaged ``grid.ini`` and reads no ``conftest.py`` (``--noconftest``), so nothing of
the current folder runs but the matrix it names. Results and cache default to the current folder.
"""
from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Callable

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
GRACE_SECONDS = 20.0  # after a forwarded signal, how long the run may take to stop before it is killed


def grid_command(matrix: Path, extra: list[str]) -> list[str]:
    grid = importlib.util.find_spec("fixtures.grid")
    if grid is None or grid.origin is None:
        raise SystemExit("backdoor: the packaged grid (fixtures.grid) is not installed; reinstall backdoor-bench")
    ini = Path(grid.origin).with_name("grid.ini")
    command = [sys.executable, "-m", "pytest", "-c", str(ini), "--rootdir", str(Path.cwd()), "--noconftest",
               "-p", "fixtures.plugin", "--pyargs", "fixtures.grid", "--matrix", str(matrix), *extra]
    if any(a == "-n" or a.startswith("-n") or a.startswith("--numprocesses") for a in extra) \
            and not any(a.startswith("--dist") for a in extra):
        command += ["--dist", "loadgroup"]  # all defenses of one backdoored model on one worker
    return command


def workers_of(extra: list[str]) -> int:
    """The -n N of pytest arguments (1 when absent or 'auto')."""
    for i, a in enumerate(extra):
        value = extra[i + 1] if a in ("-n", "--numprocesses") and i + 1 < len(extra) else \
            a[2:] if a.startswith("-n") and len(a) > 2 else a.split("=", 1)[1] if a.startswith("--numprocesses=") else None
        if value is not None:
            return int(value) if value.isdigit() else 1
    return 1


def cpu_cores() -> int:
    """The cores this process may run on (its affinity, which containers and ``taskset`` narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def workers_warning(workers: int, cores: int) -> str | None:
    """One line when ``-n`` asks for more workers than cores: each case runs one thread, so the extra workers
    only share the cores with the others and the run is slower, not faster."""
    if workers <= cores:
        return None
    return (f"backdoor: warning: -n {workers} starts {workers} workers on {cores} CPU core(s); they would share "
            f"the cores and run slower than -n {cores}")


def run_in_own_group(command: list[str], on_stop: Callable[[str], None]) -> int:
    """Run ``command`` (pytest) as the leader of its own process group, which its xdist workers join. SIGTERM,
    SIGINT and SIGHUP to this process end the whole group (a second one, or ``GRACE_SECONDS`` without an end,
    kills it), so no worker runs on; then ``on_stop(signal name)`` runs and the exit status is 128 + the
    signal's number. Otherwise pytest's own exit status is returned.

    The group is sent SIGTERM whatever was received: a SIGINT would raise KeyboardInterrupt in pytest and in
    every worker, each printing its traceback and xdist its teardown warnings (``OSError: cannot send``) about
    workers already gone, while SIGTERM ends them silently. Records are written atomically as each case
    finishes, so the finished ones are kept either way, and ``on_stop`` says so."""
    child = subprocess.Popen(command, start_new_session=True)
    received: list[int] = []

    def forward(signum, _frame):
        received.append(signum)
        _signal_group(child.pid, signal.SIGTERM if len(received) == 1 else signal.SIGKILL)

    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED}
    try:
        status = _wait(child, received)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if not received:
        return status
    _signal_group(child.pid, signal.SIGKILL)  # whatever of the group is left (a worker that caught SIGINT)
    on_stop(signal.Signals(received[0]).name)
    return 128 + received[0]


def _wait(child: subprocess.Popen, received: list[int]) -> int:
    while True:
        try:
            return child.wait(timeout=GRACE_SECONDS if received else None)
        except subprocess.TimeoutExpired:
            _signal_group(child.pid, signal.SIGKILL)


def _signal_group(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except (ProcessLookupError, PermissionError):  # the group has ended
        pass
