"""Calibrate a matrix's regression bands: run it over several seeds and numerics variants, then store the
measured variation (``backdoor expect MATRIX --calibrate``).

Each variant runs as its own pytest process with that variant's environment variables (they are read when
PyTorch loads, so a process cannot switch) and its own results folder ``<results>/_calibration/<variant>/``.
They share the cache: its keys carry the CPU kernels in use. Reruns reuse both, so an interrupted calibration
resumes where it stopped.

``--cells PATTERN`` (repeatable) recalibrates only the cells its ``attack/defense`` wildcards select (after a
change to one method, or for a cell that drifted on a new machine): only their cases run, their bands are replaced, and every other cell keeps its band, with the
calibration that wrote it kept in the file's ``calibration.earlier``.
"""
from __future__ import annotations

import datetime as dt
import fnmatch
import os
import re
import subprocess
import sys
from pathlib import Path

import torch

import yaml

from backdoor.harness.expectations import (ALL_METRICS, FLOOR, VARIANTS, WIDEN, calibrate_bands, case_key, chaotic,
                                           leave_one_out_coverage, load_expected, write_expected)
from backdoor.harness.launch import grid_command
from backdoor.harness.matrix import Matrix
from backdoor.harness.records import RECORDS, read_records


def variant_results(results_root: Path, variant: str) -> Path:
    return Path(results_root) / "_calibration" / variant


def run_variant(matrix: Matrix, variant: str, seeds: list[int], results_root: Path,
                cache_root: Path, workers: int, extra: list[str] = ()) -> int:
    """One pytest run of the whole matrix at ``seeds`` under ``variant``'s numerics; returns pytest's exit code."""
    env = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_CBWR")}
    env.update(VARIANTS[variant])
    command = grid_command(matrix.path.resolve(), [
        "--seeds", ",".join(map(str, seeds)) + ",", "--results-dir", str(variant_results(results_root, variant)),
        "--cache-dir", str(cache_root), "--regression", "off", "-q", *extra,
        # A partial recalibration (--cells) reruns some cells of an edited matrix into the folder that holds the
        # earlier calibration's records: those are kept (the calibrated cells' records are replaced by case id).
        "--other-records", "add",
        *(["-n", str(workers)] if workers > 1 else [])])
    print(f"calibration: {variant} ({' '.join(f'{k}={v}' for k, v in VARIANTS[variant].items()) or 'no variables'}), "
          f"seeds {seeds}", file=sys.stderr, flush=True)
    return subprocess.call(command, env=env)


def selected_cases(matrix: Matrix, cells: list[str] | None) -> list:
    """The matrix's cases whose ``attack/defense`` matches one of ``cells`` (all of them when None)."""
    return [c for c in matrix.cases()
            if cells is None or any(fnmatch.fnmatchcase(f"{c.attack}/{c.defense}", p) for p in cells)]


def selection_args(cases: list, seeds: list[int]) -> list[str]:
    """pytest's ``-k`` selecting exactly these cases at these seeds (case ids are unique in a matrix)."""
    ids = sorted({re.sub(r"-s\d+-(?=[^-]+$)", f"-s{seed}-", c.case_id) for c in cases for seed in seeds})
    return ["-k", " or ".join(ids)]


def collect_runs(matrix: Matrix, plan: dict[str, list[int]], results_root: Path,
                 cells: list[str] | None = None) -> dict[str, list[dict]]:
    """Records of every (variant, seed) run of the plan, keyed ``"variant/s<seed>"``; missing ones are absent."""
    wanted = {case_key(c.case_id) for c in selected_cases(matrix, cells)}
    runs: dict[str, list[dict]] = {}
    for variant, seeds in plan.items():
        folder = variant_results(results_root, variant) / matrix.name
        if not (folder / RECORDS).exists():
            continue
        for record in read_records(folder):
            if record["seed"] in seeds and case_key(record["case_id"]) in wanted:
                runs.setdefault(f"{variant}/s{record['seed']}", []).append(record)
    return runs


def calibrate(matrix: Matrix, results_root: Path, cache_root: Path, workers: int,
              run: bool = True, command: str = "", only: list[str] | None = None,
              cells: list[str] | None = None) -> dict:
    """Run (unless ``run`` is false; only the variants in ``only`` when given; only the cells ``cells`` selects)
    and aggregate the calibration plan of ``matrix``; write its expectations file. Returns a summary: runs,
    chaotic bands and leave-one-out coverage."""
    plan = matrix.regression.calibrate
    cases = selected_cases(matrix, cells)
    if not cases:
        raise RuntimeError(f"--cells {' '.join(cells or ())}: no attack/defense of {matrix.path} matches")
    if cells is not None and not (matrix.expected_path and matrix.expected_path.exists()):
        raise RuntimeError(f"--cells: {matrix.expected_path} does not exist yet: calibrate every cell first")
    unknown = sorted(set(only or ()) - set(plan))
    if unknown:
        raise RuntimeError(f"--only {', '.join(unknown)}: not in the plan's variants ({', '.join(plan)})")
    if run:
        for variant, seeds in plan.items():
            if only and variant not in only:
                continue
            extra = selection_args(cases, seeds) if cells is not None else ()
            code = run_variant(matrix, variant, seeds, results_root, cache_root, workers, extra)
            if code not in (0, 1):  # 1: some case failed; its siblings still count, and it is reported below
                raise RuntimeError(f"calibration run {variant} stopped with pytest exit code {code}")
    runs = collect_runs(matrix, plan, results_root, cells)
    expected_runs = [f"{v}/s{s}" for v, seeds in plan.items() for s in seeds]
    missing = [name for name in expected_runs if name not in runs]
    if missing:
        raise RuntimeError(f"no records for calibration run(s) {', '.join(missing)}: run without --no-run first")
    keys = {case_key(c.case_id) for c in cases}
    incomplete = sorted(name for name, rs in runs.items() if {case_key(r["case_id"]) for r in rs} != keys)
    if incomplete:
        raise RuntimeError(f"calibration run(s) {', '.join(incomplete)} lack some cases of {matrix.path}; rerun them")
    bands = calibrate_bands(runs)
    summary = {
        "command": command, "date": dt.date.today().isoformat(), "runs": expected_runs,
        "variants": {v: VARIANTS[v] for v in plan}, "torch": str(torch.__version__),
        "native_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "band_rule": f"[min - m, max + m] (metrics clipped to [0, 1]), m = max({WIDEN} (max - min), floor), "
                     f"floors {FLOOR}",
        "leave_one_out_coverage": leave_one_out_coverage(runs, skip=not_banded(matrix, bands)),
        "chaotic": [f"{key} {metric} width {width}" for key, metric, width in chaotic(bands)],
    }
    if cells is not None:
        bands, summary = _keep_other_cells(matrix, bands, summary, cells)
    write_expected(matrix.expected_path, bands, summary)
    return summary


def _keep_other_cells(matrix: Matrix, bands: dict, summary: dict, cells: list[str]) -> tuple[dict, dict]:
    """A partial calibration's bands and summary merged into the existing file: the other cells keep their bands
    (in the matrix's case order) and their chaotic entries; the calibration that wrote them moves to ``earlier``."""
    existing = load_expected(matrix.expected_path)
    previous = (yaml.safe_load(matrix.expected_path.read_text()) or {}).get("calibration") or {}
    ordered = [case_key(c.case_id) for c in matrix.cases()]
    merged = {key: bands.get(key, existing.get(key)) for key in ordered if key in bands or key in existing}
    earlier = [{k: v for k, v in previous.items() if k not in ("earlier", "chaotic")}, *previous.get("earlier", [])]
    earlier = [e for i, e in enumerate(earlier)
               if not any(_superseded(e, newer.get("cells") or []) for newer in [{"cells": cells}, *earlier[:i]])]
    kept_chaotic = [line for line in previous.get("chaotic", []) if line.split()[0] not in bands]
    return merged, {**summary, "cells": cells, "chaotic": kept_chaotic + summary["chaotic"], "earlier": earlier}


def _superseded(calibration: dict, cells: list[str]) -> bool:
    """A partial calibration whose cells this one recalibrates, every one of them: none of its bands remains."""
    return bool(calibration.get("cells")) and set(calibration["cells"]) <= set(cells)


def not_banded(matrix: Matrix, bands: dict[str, dict]) -> set[tuple[str, str]]:
    """(case key, metric) that the matrix does not check as a band: its checks say off or a claim, or the band
    is chaotic (then ``expect --calibrate`` asks for a check)."""
    out = {(key, metric) for key, metric, _ in chaotic(bands)}
    for key in bands:
        attack, defense = key.split("-")[2], key.rsplit("-", 1)[1]
        out |= {(key, m) for m in ALL_METRICS if matrix.regression.check_for(attack, defense, m).kind != "band"}
    return out
