"""The attack x defense grid: one test per case of the matrix (``--matrix``, default matrices/smoke.yaml)."""
from __future__ import annotations

import json
import os
from contextlib import nullcontext


from backdoor import progress
from backdoor.expectations import drift


def test_case(grid_case, artifacts, record_property, capsys, request):
    show = nullcontext() if progress.is_quiet() else capsys.disabled()
    with show:
        record = artifacts.run(grid_case)
    record["provenance"]["worker"] = os.environ.get("PYTEST_XDIST_WORKER", "main")  # which process ran it
    record_property("backdoor_record", json.loads(json.dumps(record)))  # plain JSON types cross xdist
    if request.config.getoption("--no-regression"):
        return
    tolerance, expected = request.config.backdoor_expected
    if grid_case.case_id in expected:
        problems = drift(record, expected[grid_case.case_id], tolerance)
        assert not problems, f"{grid_case.case_id} drifted from its expectation: " + "; ".join(problems)
