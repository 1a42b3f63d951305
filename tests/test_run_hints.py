"""One line at the start of a run for the two ways a newcomer runs slowly: ``-n`` beyond the machine's cores
(slower, not faster), and bare ``pytest`` in the checkout (serial, 20+ minutes: it says how to run it on the
cores)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from backdoor.harness.launch import cpu_cores, workers_warning
from fixtures.plugin import SERIAL_HINT

ROOT = Path(__file__).resolve().parent.parent
ENV = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")}  # a nested run is not a worker


def test_more_workers_than_cores_is_one_line():
    assert workers_warning(2, 2) is None and workers_warning(1, 2) is None
    line = workers_warning(4, 2)
    assert line is not None and "\n" not in line
    assert "-n 4" in line and "2 CPU core(s)" in line and "-n 2" in line


def test_cores_are_the_ones_this_process_may_use():
    assert cpu_cores() == (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())


@pytest.mark.parametrize("extra, warned", [(1, True), (0, False)])
def test_a_pytest_run_warns_once(extra, warned):
    workers = cpu_cores() + extra
    done = subprocess.run([sys.executable, "-m", "pytest", "-n", str(workers), "--collect-only", "-q",
                           "-p", "no:cacheprovider", str(ROOT / "tests" / "test_stats.py")],
                          capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=300)
    lines = [line for line in (done.stdout + done.stderr).splitlines() if "CPU core(s)" in line]
    assert lines == ([workers_warning(workers, cpu_cores())] if warned else []), done.stdout + done.stderr


@pytest.mark.parametrize("paths, hinted", [([], True), (["tests/test_stats.py"], False)], ids=["bare", "a-file"])
def test_bare_pytest_says_how_to_run_the_suite_on_the_cores(paths, hinted):
    done = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", *paths], capture_output=True,
                          text=True, cwd=ROOT, env=ENV, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count(SERIAL_HINT) == (1 if hinted else 0), done.stdout[-2000:]
    assert "-n 2 --dist loadgroup" in SERIAL_HINT
