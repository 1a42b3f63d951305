"""Regression expectations: expected metrics per case with tolerances, kept beside a matrix.

The grid test compares each finished case with its expectation and fails when a metric drifts beyond its
tolerance. ``backdoor expect MATRIX`` rewrites the file from the matrix's latest records.
"""
from __future__ import annotations

from pathlib import Path

import yaml

METRICS = ("c_acc", "asr", "r_acc")
DEFAULT_TOLERANCE = {"c_acc": 0.03, "asr": 0.05, "r_acc": 0.05}


def load_expected(path: Path | None) -> tuple[dict[str, float], dict[str, dict]]:
    if path is None or not path.exists():
        return dict(DEFAULT_TOLERANCE), {}
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict) or set(raw) - {"tolerance", "cases"}:
        raise ValueError(f"{path}: expected keys 'tolerance' and 'cases', got {sorted(raw) if isinstance(raw, dict) else raw!r}")
    tolerance = {**DEFAULT_TOLERANCE, **(raw.get("tolerance") or {})}
    return tolerance, raw.get("cases") or {}


def drift(record: dict, expected: dict, tolerance: dict[str, float]) -> list[str]:
    """Messages for every metric of ``record`` outside ``expected`` +- tolerance (empty when within)."""
    problems = []
    if expected.get("status", "ok") != record.get("status"):
        return [f"status {record.get('status')!r}, expected {expected.get('status', 'ok')!r}"]
    for metric in METRICS:
        want, got = expected.get(metric), record.get(metric)
        if want is None and got is None:
            continue
        if want is None or got is None or abs(got - want) > tolerance[metric]:
            problems.append(f"{metric} = {got} but expected {want} +- {tolerance[metric]}")
    return problems


def refresh(path: Path, records: list[dict], tolerance: dict[str, float] | None = None) -> int:
    """Write expectations for every record's case (keeping the file's tolerances); returns the case count."""
    old_tolerance, _ = load_expected(path)
    cases = {}
    for r in sorted(records, key=lambda r: r["case_id"]):
        entry = {m: (round(r[m], 4) if r.get(m) is not None else None) for m in METRICS}
        if r.get("status") != "ok":
            entry["status"] = r.get("status")
        cases[r["case_id"]] = entry
    body = {"tolerance": tolerance or old_tolerance, "cases": cases}
    header = ("# Expected metrics of each case (regression check run by the grid test).\n"
              "# Regenerate from the latest results with: backdoor expect <matrix.yaml>\n")
    path.write_text(header + yaml.safe_dump(body, sort_keys=False))
    return len(cases)
