"""Regression checks that test the code, not the machine: calibrated bands and stated claims per case.

The last bits of every result move with the CPU's kernels (AVX-512, AVX2, SSE4.1 reduce in different orders),
and at a CI budget a small numeric difference can change a whole training trajectory. So an expectation is
not one machine's number: ``backdoor expect MATRIX --calibrate`` runs the matrix over several seeds and
numerics variants and stores, per case and metric, the centre, a band and n (``calibrate_bands``). A case's
key leaves out the seed (``case_key``), so every seed of a case is checked against the same band.

Where a metric is chaotic at the budget (its band would span most of [0, 1]), the matrix's ``regression:``
section says what to check instead, per attack/defense: a stated claim (``asr: "<= 0.3"``) or nothing
(``off``). Claims are checked as written; bands are checked as calibrated.
"""
from __future__ import annotations

import fnmatch
import math
import operator
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from backdoor.harness.case import case_group

METRICS = ("c_acc", "asr", "r_acc")
#: What a defense changed: its metric less the same backdoored model's before the defense (a record's
#: ``undefended``). The pair shares one backdoored model, so its variation over seeds cancels: a defense whose
#: outcome is steady is checked tightly even where the backdoored model itself varies.
DELTAS = {"d_c_acc": "c_acc", "d_asr": "asr", "d_r_acc": "r_acc"}
#: A detection case's figures (``backdoor.harness.case_record.detection_fields``): AUROC, TPR and FPR of an
#: input-level or data-side detector, the score a model-level detector gives the inspected model.
DETECTION_METRICS = ("det_auroc", "det_tpr", "det_fpr", "det_score")
SHARES = METRICS + ("det_auroc", "det_tpr", "det_fpr")  # figures in [0, 1]: bands are clipped to it
ALL_METRICS = METRICS + tuple(DELTAS) + DETECTION_METRICS
#: Numerics variants: environment variables that select PyTorch's, oneDNN's and MKL's CPU kernels. "native" is
#: whatever the machine picks (AVX-512 where it has it); the others make this machine compute as an AVX2 or a
#: pre-AVX machine would.
VARIANTS: dict[str, dict[str, str]] = {
    "native": {},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_CBWR": "AVX2"},
    "sse41": {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41", "MKL_CBWR": "COMPATIBLE"},
}
#: The band: the calibrated runs' range, widened on each side by the range itself and at least the floor.
#: Floors: 0.08 (about 28 of digits' 359 test images) for metrics, 0.05 for differences. Chosen by
#: leave-one-out over the smoke calibration: narrower rules failed held-out runs (see README).
WIDEN = 1.0
FLOOR = {"c_acc": 0.08, "asr": 0.08, "r_acc": 0.08, "d_c_acc": 0.05, "d_asr": 0.05, "d_r_acc": 0.05,
         "det_auroc": 0.05, "det_tpr": 0.08, "det_fpr": 0.05, "det_score": 0.1}
#: A band wider than this says the metric is chaotic at the budget: check a claim (or nothing) instead.
#: A model-level score has the detector's own scale (an anomaly index, a log p-value): never judged chaotic here.
CHAOTIC_WIDTH = {"c_acc": 0.2, "asr": 0.25, "r_acc": 0.25, "d_c_acc": 0.15, "d_asr": 0.25, "d_r_acc": 0.25,
                 "det_auroc": 0.25, "det_tpr": 0.25, "det_fpr": 0.2, "det_score": math.inf}
CLAIM = re.compile(r"^\s*(<=|>=|==|!=|<|>)\s*(-?[0-9]*\.?[0-9]+)\s*$")
OPERATORS = {"<=": operator.le, ">=": operator.ge, "==": operator.eq, "!=": operator.ne, "<": operator.lt,
             ">": operator.gt}
#: A record figure a claim may name besides the metrics: what a defense detected (``detection.tpr``) or reported
#: (``defense_info.most_anomalous_class``). Such figures are claims only (never calibrated into bands): they state
#: what the method's mechanism must produce, which a defense that does nothing never does.
FIELD = re.compile(r"^(detection|defense_info)\.[A-Za-z_][A-Za-z0-9_]*$")


class RegressionError(ValueError):
    """An invalid ``regression:`` section or expectations file (the message names the file and key)."""


@dataclass(frozen=True)
class Check:
    kind: str  # "band", "claim" or "off"
    claim: str | None = None

    def __str__(self) -> str:
        return self.claim if self.kind == "claim" else self.kind

    def holds(self, value: float | None) -> bool:
        """Whether ``value`` meets this claim (a missing value never does)."""
        op, bound = self.claim.split()
        return value is not None and OPERATORS[op](value, float(bound))


BAND = Check("band")


@dataclass(frozen=True)
class Regression:
    """A matrix's regression policy: what each attack/defense checks, and how it is calibrated."""

    checks: tuple[tuple[str, dict[str, Check]], ...] = ()
    calibrate: dict[str, list[int]] = field(default_factory=lambda: {"native": [0, 1, 2]})

    def field_checks(self, attack: str, defense: str) -> dict[str, Check]:
        """Claims on record figures (``detection.*``, ``defense_info.*``) for one attack/defense; later entries win."""
        found: dict[str, Check] = {}
        for metrics in self._matching(attack, defense):
            found.update({name: check for name, check in metrics.items() if FIELD.match(name)})
        return {name: check for name, check in found.items() if check.kind == "claim"}

    def check_for(self, attack: str, defense: str, metric: str) -> Check:
        """The check of one metric: the last ``checks`` entry whose ``attack/defense`` pattern matches, else band."""
        found = BAND
        for metrics in self._matching(attack, defense):
            found = metrics.get(metric, found)
        return found

    def _matching(self, attack: str, defense: str):
        """The ``checks`` entries (metric -> check) whose ``attack/defense`` pattern matches, in file order."""
        return (metrics for pattern, metrics in self.checks if fnmatch.fnmatchcase(f"{attack}/{defense}", pattern))


def parse_regression(path: Path, raw: Any) -> Regression:
    """Validate a matrix's ``regression:`` section::

        regression:
          calibrate: {native: [0, 1, 2], avx2: [0], sse41: [0]}   # variant -> seeds
          checks:                                                 # attack/defense (wildcards) -> metric -> check
            "*/nc": {asr: off, r_acc: off}
            badnets/fp: {asr: "<= 0.3"}
    """
    if raw is None:
        return Regression()
    if not isinstance(raw, dict) or set(raw) - {"calibrate", "checks"}:
        raise RegressionError(f"{path}: regression: expected a mapping with keys calibrate and checks, got {raw!r}")
    calibrate = raw.get("calibrate", {"native": [0, 1, 2]})
    if not isinstance(calibrate, dict) or not calibrate:
        raise RegressionError(f"{path}: regression.calibrate: expected variant -> seeds, got {calibrate!r}")
    for variant, seeds in calibrate.items():
        if variant not in VARIANTS:
            raise RegressionError(f"{path}: regression.calibrate: {variant!r} is not a numerics variant; "
                                  f"allowed: {', '.join(VARIANTS)}")
        if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool)
                                                                for s in seeds):
            raise RegressionError(f"{path}: regression.calibrate.{variant}: {seeds!r} is not allowed; "
                                  "expected a non-empty list of integer seeds")
    checks = []
    if not isinstance(raw.get("checks") or {}, dict):
        raise RegressionError(f"{path}: regression.checks: expected 'attack/defense' -> metric -> check, "
                              f"got {raw['checks']!r}")
    for pattern, metrics in (raw.get("checks") or {}).items():
        key = f"regression.checks.{pattern}"
        if not isinstance(pattern, str) or "/" not in pattern:
            raise RegressionError(f"{path}: {key}: expected an 'attack/defense' pattern such as 'badnets/fp'")
        if not isinstance(metrics, dict) or not metrics:
            raise RegressionError(f"{path}: {key}: expected metric -> check, got {metrics!r}")
        parsed = {}
        for metric, check in metrics.items():
            if metric not in ALL_METRICS and not (isinstance(metric, str) and FIELD.match(metric)):
                raise RegressionError(f"{path}: {key}: {metric!r} is not a metric; allowed: {', '.join(ALL_METRICS)}, "
                                      "or a record figure detection.<name> / defense_info.<name> (claims only)")
            parsed[metric] = _parse_check(path, f"{key}.{metric}", check)
            if metric not in ALL_METRICS and parsed[metric].kind == "band":
                raise RegressionError(f"{path}: {key}.{metric}: a record figure is checked by a claim such as "
                                      "'>= 0.5' or '== 0' (or off), never by a band")
        checks.append((pattern, parsed))
    return Regression(tuple(checks), {v: list(s) for v, s in calibrate.items()})


def _parse_check(path: Path, key: str, check: Any) -> Check:
    if check is False or check == "off":  # YAML reads a bare off as False
        return Check("off")
    if check == "band":
        return BAND
    if isinstance(check, str) and CLAIM.match(check):
        return Check("claim", " ".join(CLAIM.match(check).groups()))
    raise RegressionError(f"{path}: {key}: {check!r} is not allowed; expected band, off, or a claim such as '<= 0.3' "
                          "(operators <=, >=, <, >, ==, !=)")


def case_key(case_id: str) -> str:
    """A case id without its seed: ``digits-cnn_small-badnets-p0.1-s0-ft`` -> ``digits-cnn_small-badnets-p0.1-ft``."""
    return re.sub(r"-s\d+(?=-[^-]+$)", "", case_id)


# -- the expectations file ------------------------------------------------------------------------------------

def load_expected(path: Path | None) -> dict[str, dict]:
    """Calibrated bands per case key: ``{key: {"status": ..., metric: {centre, low, high, n, ...}}}``."""
    if path is None or not path.exists():
        return {}
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict) or "cases" not in raw or set(raw) - {"calibration", "cases"}:
        raise RegressionError(f"{path}: expected the keys calibration and cases (written by "
                              "`backdoor expect MATRIX --calibrate`)")
    cases = raw["cases"] or {}
    if not isinstance(cases, dict):
        raise RegressionError(f"{path}: cases: expected case key -> metric -> band, got {cases!r}")
    for key, entry in cases.items():
        if not isinstance(entry, dict):
            raise RegressionError(f"{path}: cases.{key}: expected metric -> band, got {entry!r}")
        status = entry.get("status", ["ok"])
        if not isinstance(status, list) or not all(isinstance(s, str) for s in status):
            raise RegressionError(f"{path}: cases.{key}.status: expected a list of statuses, got {status!r}")
        for metric in ALL_METRICS:
            band = entry.get(metric)
            if band is not None and not (isinstance(band, dict) and {"centre", "low", "high", "n"} <= set(band)
                                         and all(isinstance(band[k], (int, float)) for k in ("centre", "low", "high"))):
                raise RegressionError(f"{path}: cases.{key}.{metric}: expected numbers centre, low, high and n, "
                                      f"got {band!r}")
    return cases


def drift(record: dict, expected: dict | None, regression: Regression, bands: bool = True) -> list[str]:
    """Messages for every checked metric of ``record`` outside its band or breaking its claim (empty: all hold).

    A metric checked by a claim needs no calibration; a banded metric without a calibrated band is reported."""
    problems = []
    statuses = (expected or {}).get("status", ["ok"])
    if expected is not None and record.get("status") not in statuses:
        return [f"status {record.get('status')!r}, expected {' or '.join(map(repr, statuses))}"]
    if record.get("status") != "ok":
        return []  # a defense that does not apply (ANP without batch norm) has no metrics to check
    values = metric_values(record)
    for metric in ALL_METRICS:
        check = regression.check_for(record["attack"], record["defense"], metric)
        got = values.get(metric)
        if check.kind == "off":
            continue
        if check.kind == "claim":
            if got is None and not (expected or {}).get(metric):
                continue  # a metric the case never has (ASR of the clean reference row)
            if not check.holds(got):
                problems.append(f"{metric} = {_fmt(got)} breaks the claim {metric} {check.claim}")
            continue
        band = (expected or {}).get(metric)
        if band is None and got is None:
            continue
        if not bands:
            continue  # no expectations file: claims only (the run said so once at its start)
        if band is None:
            problems.append(f"{metric} = {_fmt(got)} has no calibrated band (run `backdoor expect MATRIX --calibrate`)")
        elif got is None or not band["low"] <= got <= band["high"]:
            problems.append(f"{metric} = {_fmt(got)} outside its band [{band['low']}, {band['high']}] "
                            f"(centre {band['centre']}, n {band['n']})")
    for name, check in regression.field_checks(record["attack"], record["defense"]).items():
        got = record_figure(record, name)
        if not check.holds(got):
            problems.append(f"{name} = {_fmt(got)} breaks the claim {name} {check.claim}")
    return problems


def record_figure(record: dict, name: str) -> float | None:
    """A record figure named ``detection.<name>`` or ``defense_info.<name>`` as a number (bools as 0/1); None
    when absent or not a number."""
    section, key = name.split(".", 1)
    value = (record.get(section) or {}).get(key)
    if isinstance(value, bool):
        return float(value)
    return float(value) if isinstance(value, (int, float)) else None


def metric_values(record: dict) -> dict[str, float | None]:
    """A record's metrics and, for a defense case, what the defense changed (``d_<metric>``)."""
    out = {m: record.get(m) for m in METRICS + DETECTION_METRICS}
    before = record.get("undefended") or {}
    for delta, metric in DELTAS.items():
        if before.get(metric) is not None and record.get(metric) is not None:
            out[delta] = record[metric] - before[metric]
    return out


def attach_undefended(records: list[dict]) -> list[dict]:
    """Records of one run, each defense case given its ``undefended`` metrics from the run's no-defense case of the
    same backdoored model when it lacks them (records written before the pipeline stored them)."""
    none = {case_group(r["case_id"]): r for r in records if r.get("defense") == "none"}
    out = []
    for r in records:
        base = none.get(case_group(r["case_id"]))
        if "undefended" not in r and r.get("defense") != "none" and base is not None and r.get("attack") != "clean":
            r = {**r, "undefended": {m: base.get(m) for m in METRICS}}
        out.append(r)
    return out


def _fmt(value) -> str:
    return "None" if value is None else f"{value:.4f}"


def band_of(values: list[float], metric: str = "asr") -> dict:
    """Centre (mean), band and spread of one metric's calibrated values (the band rounded outwards)."""
    lo, hi = min(values), max(values)
    mean = sum(values) / len(values)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    margin = max(WIDEN * (hi - lo), FLOOR[metric])
    low, high = lo - margin, hi + margin
    if metric in SHARES:
        low, high = max(0.0, low), min(1.0, high)
    return {"centre": round(mean, 4), "low": math.floor(low * 1e4) / 1e4, "high": math.ceil(high * 1e4) / 1e4,
            "n": len(values), "sd": round(sd, 4), "min": round(lo, 4), "max": round(hi, 4)}


def calibrate_bands(runs: dict[str, list[dict]]) -> dict[str, dict]:
    """Bands per case key from records of several runs (``{"native/s0": [records], ...}``; every record of a
    case key, over all runs and seeds, is one calibrated value)."""
    values: dict[str, dict[str, list[float]]] = {}
    statuses: dict[str, set[str]] = {}
    for records in runs.values():
        for r in attach_undefended(records):
            key = case_key(r["case_id"])
            statuses.setdefault(key, set()).add(r.get("status"))
            for metric, value in metric_values(r).items():
                if value is not None and r.get("status") == "ok":
                    values.setdefault(key, {}).setdefault(metric, []).append(float(value))
    out = {}
    for key in sorted(statuses):
        status = statuses[key]
        entry: dict[str, Any] = {} if status == {"ok"} else {"status": sorted(map(str, status))}
        for metric in ALL_METRICS:
            if metric in values.get(key, {}):
                entry[metric] = band_of(values[key][metric], metric)
        out[key] = entry
    return out


def chaotic(bands: dict[str, dict]) -> list[tuple[str, str, float]]:
    """(case key, metric, band width) of every band wider than CHAOTIC_WIDTH."""
    return [(key, m, round(entry[m]["high"] - entry[m]["low"], 4)) for key, entry in bands.items() for m in ALL_METRICS
            if m in entry and entry[m]["high"] - entry[m]["low"] > CHAOTIC_WIDTH[m]]


def leave_one_out_coverage(runs: dict[str, list[dict]], skip: set | None = None) -> dict[str, float]:
    """For each run, the share of its (case, metric) values inside the bands calibrated from the other runs:
    how often the band rule would pass a machine it has never seen (``skip``: (case key, metric) not checked)."""
    out = {}
    for held in runs:
        bands = calibrate_bands({name: rs for name, rs in runs.items() if name != held})
        inside = total = 0
        for r in attach_undefended(runs[held]):
            entry = bands.get(case_key(r["case_id"]), {})
            for metric, value in metric_values(r).items():
                if value is not None and metric in entry and (skip is None or (case_key(r["case_id"]), metric) not in skip):
                    total += 1
                    inside += entry[metric]["low"] <= value <= entry[metric]["high"]
        out[held] = round(inside / total, 4) if total else float("nan")
    return out


def floors_text() -> str:
    """The band floors in words, from ``FLOOR`` itself (so the expectations header cannot state other floors)."""
    by_value: dict[float, list[str]] = {}
    for metric, floor in FLOOR.items():
        by_value.setdefault(floor, []).append(metric)
    return ", ".join(f"{floor:g} for {'/'.join(metrics)}" for floor, metrics in by_value.items())


def write_expected(path: Path, bands: dict[str, dict], calibration: dict) -> None:
    header = ("# Calibrated regression bands per case (seed left out of the key) and metric (d_*: the defense's change\n"
              "# of that metric on the same backdoored model): centre = mean of the calibrated values, band = their\n"
              f"# range widened on each side by the range itself (at least {floors_text()}),\n"
              "# n = values (seeds x numerics variants). Written by `backdoor expect MATRIX --calibrate`; never edit by hand.\n")
    body = {"calibration": calibration, "cases": bands}
    text = header + yaml.safe_dump(body, sort_keys=False, default_flow_style=None, width=120)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)
