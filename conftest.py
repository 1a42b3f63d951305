"""pytest wiring of the grid: options, case generation from a matrix, and the results collector."""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
import torch

from backdoor import progress
from backdoor.expectations import load_expected
from backdoor.matrix import MatrixError, load_matrix, parse_seeds
from backdoor.results import upsert_records, write_leaderboard

pytest_plugins = ["fixtures.artifacts", "fixtures.scheduling"]

ROOT = Path(__file__).resolve().parent
DEFAULT_MATRIX = ROOT / "matrices" / "smoke.yaml"
RECORD_PROPERTY = "backdoor_record"


def pytest_addoption(parser):
    group = parser.getgroup("backdoor", "backdoor-bench grid")
    group.addoption("--matrix", default=None, help=f"grid matrix YAML (default: {DEFAULT_MATRIX.relative_to(ROOT)})")
    group.addoption("--results-dir", default=os.environ.get("BACKDOOR_RESULTS", str(ROOT / "results")),
                    help="results root; records go to <root>/<matrix name>/ (default: ./results)")
    group.addoption("--cache-dir", default=os.environ.get("BACKDOOR_CACHE", str(ROOT / ".backdoor-cache")),
                    help="artifact cache shared by runs and workers (default: ./.backdoor-cache)")
    group.addoption("--device", default="auto", help="torch device, or 'auto' (one GPU per xdist worker, else CPU)")
    group.addoption("--no-regression", action="store_true", help="do not compare metrics with the matrix's expectations")
    group.addoption("--seeds", default=None,
                    help="override the matrix's seeds: a count n (seeds 0..n-1) or a list such as 0,1,2")
    group.addoption("--threads", type=int, default=1,
                    help="CPU threads per pytest process (default 1: the same numbers serial and under -n N)")


def pytest_configure(config):
    path = Path(config.getoption("--matrix") or DEFAULT_MATRIX)
    try:
        matrix = load_matrix(path)
        if config.getoption("--seeds"):
            matrix = dataclasses.replace(matrix, seeds=parse_seeds(
                config.getoption("--seeds"), lambda message: MatrixError(f"--seeds: {message}")))
        tolerance, expected = load_expected(matrix.expected_path)
    except (MatrixError, ValueError) as e:
        raise pytest.UsageError(str(e)) from None
    config.backdoor_matrix = matrix
    config.backdoor_expected = (tolerance, expected)
    # CPU kernels reduce in a thread-count-dependent order, so one thread per process (serial or each xdist
    # worker) gives bit-identical numbers across -n settings; -n N then uses N cores.
    torch.set_num_threads(config.getoption("--threads"))
    quiet = config.getoption("verbose") < 0 or hasattr(config, "workerinput")
    progress.set_quiet(quiet)
    if not hasattr(config, "workerinput"):  # the xdist controller, or a serial run, owns the results files
        results = Path(config.getoption("--results-dir")) / matrix.name
        config.pluginmanager.register(ResultsCollector(results), "backdoor-results")


def pytest_generate_tests(metafunc):
    if "grid_case" not in metafunc.fixturenames:
        return
    cases = metafunc.config.backdoor_matrix.cases()
    metafunc.parametrize("grid_case", [
        pytest.param(case, id=case.case_id, marks=[pytest.mark.grid, pytest.mark.xdist_group(case.group)])
        for case in cases
    ])


class ResultsCollector:
    """Stores each case's record as soon as its report arrives; renders the leaderboard at session end."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.count = 0

    def pytest_runtest_logreport(self, report):
        if report.when != "call":
            return
        records = [value for name, value in report.user_properties if name == RECORD_PROPERTY]
        if records:
            upsert_records(self.folder, records)
            self.count += len(records)

    def pytest_sessionfinish(self, session):
        if self.count:
            write_leaderboard(self.folder)

    def pytest_terminal_summary(self, terminalreporter):
        if self.count:
            terminalreporter.write_line(f"backdoor-bench: {self.count} record(s) in {self.folder}/records.jsonl; "
                                        f"leaderboard: {self.folder}/leaderboard.md")
