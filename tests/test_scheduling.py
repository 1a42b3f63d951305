"""The grid's xdist scheduler reads a case's group from its node id, whatever the id's path looks like, and
the grid's cases are collected first."""
import subprocess
import sys
from pathlib import Path

import pytest

from fixtures.scheduling import GRID_NODE, CaseGroupScheduling

SCOPE = CaseGroupScheduling._split_scope


@pytest.mark.parametrize("nodeid, scope", [
    ("benchmarks/test_grid.py::test_case[digits-cnn_small-badnets-p0.1-s0-ft]", "grid:digits-cnn_small-badnets-p0.1-s0"),
    ("benchmarks/test_grid.py::test_case[digits-cnn_small-badnets-p0.1-s0-none]", "grid:digits-cnn_small-badnets-p0.1-s0"),
    ("../../lib/python3.11/site-packages/fixtures/grid.py::test_case[x-m-wanet-p0.05-s3-dbd]", "grid:x-m-wanet-p0.05-s3"),
    ("fixtures/grid.py::test_case[digits-cnn_small-clean-s1-none]", "grid:digits-cnn_small-clean-s1"),
    ("benchmarks/test_grid.py::test_case[digits-cnn_small-lc-p0.1-s0-nc]@digits-cnn_small-lc-p0.1-s0",
     "grid:digits-cnn_small-lc-p0.1-s0"),
    ("tests/test_x.py::TestC::test_t[a@b]", "tests/test_x.py"),
    ("tests/test_x.py::test_t", "tests/test_x.py"),
])
def test_scope_of_node_ids(nodeid, scope):
    assert SCOPE(None, nodeid) == scope


def test_grid_cases_are_collected_before_the_tests(tmp_path):
    """Named tests first on the command line, the grid's cases still come first in the collection, which is the
    order the scheduler hands out work in."""
    root = Path(__file__).resolve().parent.parent
    command = [sys.executable, "-m", "pytest", "--collect-only", "-q", "tests/test_scheduling.py", "benchmarks",
               "--matrix", "matrices/cluster_drill.yaml", "--cache-dir", str(tmp_path / "cache"),
               "--results-dir", str(tmp_path / "results")]
    collected = subprocess.run(command, capture_output=True, text=True, cwd=root, timeout=120)
    assert collected.returncode == 0, collected.stdout + collected.stderr
    ids = [line for line in collected.stdout.splitlines() if "::" in line]
    grid = [GRID_NODE.search(node_id) is not None for node_id in ids]
    assert sum(grid) == 10 and len(ids) > 10, ids
    assert grid == sorted(grid, reverse=True), ids
