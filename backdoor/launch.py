"""The command line that runs a matrix: pytest over the packaged grid.

``fixtures/grid.py`` (the grid test) and ``fixtures.plugin`` ship with the package, so a run needs no checkout:
pytest is configured by the packaged ``grid.ini`` and reads no ``conftest.py`` (``--noconftest``), so nothing of
the current folder runs but the matrix it names. Results and cache default to the current folder.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path


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
