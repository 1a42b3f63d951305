"""The grid's xdist scheduler reads a case's group from its node id, whatever the id's path looks like."""
import pytest

from fixtures.scheduling import CaseGroupScheduling

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
