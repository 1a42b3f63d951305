"""Results are data: one JSON record per case in ``records.jsonl``, read and written here (the tables are
rendered from records alone, in ``backdoor.harness.report``).

Metrics are stored as floats in [0, 1] with provenance; percentages exist only in rendered tables.
Writing a record replaces the record of the same case and keeps every other one; every write is atomic
(temp file + rename) under a file lock, so an interrupted run never loses finished results.
"""
from __future__ import annotations

import base64
import datetime as dt
import json
import math
import os
import sys
import uuid
from pathlib import Path

from filelock import FileLock

RECORDS = "records.jsonl"
METRICS = ("c_acc", "asr", "r_acc")  # the figures every record holds (null where not measured)
DAMAGED = "records.damaged.jsonl"
# What every stored record must hold for the tables: field -> (accepted JSON types, their name in messages).
REQUIRED_FIELDS = {"case_id": (str, "a string"), "dataset": (str, "a string"), "model": (str, "a string"),
                   "attack": (str, "a string"), "defense": (str, "a string"),
                   "poison_ratio": ((int, float), "a number"), "seed": (int, "an integer"), "status": (str, "a string")}
STATUSES = ("ok", "not_applicable")
_JSON_TYPES = {dict: "an object", list: "an array", str: "a string", int: "a number", float: "a number",
               bool: "a boolean", type(None): "null"}
_warned: set[str] = set()  # records files already warned about in this process


class RecordShapeError(ValueError):
    """A line of ``records.jsonl`` is valid JSON but not a record (``{}``, ``[1, 2]``, no ``case_id``, ...)."""


def atomic_write(path: Path, text: str) -> None:
    """Write ``text`` to a temp file and rename it over ``path``; a failed write (a full disk) removes its temp
    file, so that it neither keeps the disk full nor is left behind."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def strict_json(value):
    """``value`` with every NaN or infinite float replaced by None, so that it is strict JSON (json.dumps would
    write bare NaN / Infinity, which other JSON readers refuse)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def record_problem(record) -> str | None:
    """What keeps a parsed JSON value from being a record, in words; None for a well-formed record."""
    if not isinstance(record, dict):
        return f"a record must be a JSON object, got {_JSON_TYPES.get(type(record), type(record).__name__)}"
    missing = [k for k in (*REQUIRED_FIELDS, *METRICS) if k not in record]
    if len(missing) > 3:
        return f"the record lacks {len(missing)} of its {len(REQUIRED_FIELDS) + len(METRICS)} fields " \
               f"({', '.join(missing[:3])}, ...)"
    if missing:
        return f"the record lacks {', '.join(missing)}"
    for key, (types, name) in REQUIRED_FIELDS.items():
        if not isinstance(record[key], types) or isinstance(record[key], bool):
            return f"{key} must be {name}, got {json.dumps(record[key])[:80]}"
    if record["status"] not in STATUSES:
        return f"status must be one of {', '.join(STATUSES)}, got {record['status']!r}"
    for key in METRICS:
        value = record[key]
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not (math.isnan(value) or 0 <= value <= 1)):
            return f"{key} must be null or a number in [0, 1], got {json.dumps(value)[:80]}"
    return None


def _scan(path: Path) -> tuple[list[tuple[int, bytes, dict]], list[tuple[int, bytes, str]]]:
    """Split ``path`` into good lines ``(number, raw, record)`` and bad ones ``(number, raw, what is wrong)``,
    each bad one tagged ``unreadable`` (not UTF-8 JSON) or ``shape`` (JSON, but not a record)."""
    good, bad = [], []
    for number, raw in enumerate(path.read_bytes().split(b"\n"), 1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            bad.append((number, raw, "unreadable: not UTF-8 text"))
            continue
        except (ValueError, RecursionError) as e:
            bad.append((number, raw, f"unreadable: not a JSON line ({str(e)[:80]})"))
            continue
        problem = record_problem(record)
        if problem:
            bad.append((number, raw, f"shape: {problem}"))
        else:
            good.append((number, raw, record))
    return good, bad


def _set_aside(path: Path, bad: list[tuple[int, bytes, str]]) -> Path:
    """Append ``bad`` lines to the side file next to ``path`` (line number, time, reason, text), synced to disk
    before the caller rewrites ``path`` without them, so a line is never lost."""
    side = path.with_name(DAMAGED)
    moved_at = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    entries = []
    for number, raw, reason in bad:
        entry = {"line": number, "moved_at": moved_at, "reason": reason}
        try:
            entry["text"] = raw.decode("utf-8")
        except UnicodeDecodeError:  # keep the exact bytes, and a readable rendering of them
            entry["text"], entry["base64"] = raw.decode("utf-8", "backslashreplace"), base64.b64encode(raw).decode()
        entries.append(json.dumps(entry, sort_keys=True) + "\n")
    with open(side, "a") as f:
        f.write("".join(entries))
        f.flush()
        os.fsync(f.fileno())
    return side


def _warn_once(path: Path, bad: list[tuple[int, bytes, str]], where: str) -> None:
    """One line on stderr per records file per process, naming the lines and what was done with them."""
    key = str(path.resolve())
    if key in _warned:
        return
    _warned.add(key)
    shown = "; ".join(f"line {n}: {reason}" for n, _, reason in bad[:3]) + ("; ..." if len(bad) > 3 else "")
    print(f"backdoor: warning: {path}: {len(bad)} damaged line(s) {where} ({shown}); every other record is kept",
          file=sys.stderr, flush=True)


def _shape_message(path: Path, bad: list[tuple[int, bytes, str]]) -> str:
    number, _, reason = bad[0]
    more = f" (and {len(bad) - 1} more: line(s) {', '.join(str(n) for n, _, _ in bad[1:6])})" if len(bad) > 1 else ""
    return (f"{path}:{number}: not a record: {reason.removeprefix('shape: ')}{more}; fix or remove the line "
            f"(a grid run moves such lines to {DAMAGED})")


def read_records(folder: str | Path) -> list[dict]:
    """The records of ``folder/records.jsonl``. Unreadable lines (half a line, binary garbage) are moved to
    ``records.damaged.jsonl`` (or skipped, where the folder cannot be written) with one warning; a JSON line
    that is not a record raises ``RecordShapeError`` naming the file, the line and what is wrong."""
    path = Path(folder) / RECORDS
    if not path.exists():
        raise FileNotFoundError(f"no {RECORDS} in {folder}: run a matrix first (backdoor run matrices/<name>.yaml)")
    good, bad = _scan(path)
    unreadable = [b for b in bad if b[2].startswith("unreadable")]
    if unreadable:
        try:
            with FileLock(str(path) + ".lock"):
                good, bad = _scan(path)  # again, under the lock: a writer may have changed it meanwhile
                unreadable = [b for b in bad if b[2].startswith("unreadable")]
                if unreadable:
                    side = _set_aside(path, unreadable)
                    gone = {n for n, _, _ in unreadable}
                    kept = [(n, raw) for n, raw, _ in sorted(good + bad) if n not in gone]
                    atomic_write(path, "".join(raw.decode("utf-8") + "\n" for _, raw in kept))
                    _warn_once(path, unreadable, f"moved to {side}")
                    good, bad = _scan(path)
        except OSError as e:  # a read-only results folder: read around the damage
            _warn_once(path, unreadable, f"skipped (cannot move them aside: {e})")
    shape = [b for b in bad if b[2].startswith("shape")]
    if shape:
        raise RecordShapeError(_shape_message(path, shape))
    return [record for _, _, record in good]


class ResultsFolderError(OSError):
    """The results folder cannot take records; the message is one line naming it and why."""


def prepare_results_folder(folder: str | Path) -> int:
    """Before any case runs: the folder exists (created if need be) and a file can be written in it, else
    ``ResultsFolderError`` names it; temp files of record writes that were killed (``.records.jsonl.*.tmp``,
    which a writer keeps only while it holds the records lock) are removed under that lock. Returns how many."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-probe.{uuid.uuid4().hex[:8]}.tmp"
        probe.write_bytes(b"0" * 4096)  # a full disk fails here too, not after the first case
        probe.unlink()
        with FileLock(str(folder / RECORDS) + ".lock"):
            stale = sorted(folder.glob(f".{RECORDS}.*.tmp"))
            for tmp in stale:
                tmp.unlink()
    except OSError as e:
        reason = e.strerror or type(e).__name__
        raise ResultsFolderError(f"results folder {folder}: cannot be written ({reason}); expected a writable "
                                 "folder (--results-dir or BACKDOOR_RESULTS)") from None
    return len(stale)


def other_matrix_hashes(folder: str | Path, digest: str) -> set[str]:
    """The matrix hashes of ``folder``'s records that are not ``digest``: records of another matrix (or of an
    earlier version of the file) under the same name."""
    path = Path(folder) / RECORDS
    if not path.exists():
        return set()
    good, _ = _scan(path)
    return {h for _, _, r in good if (h := (r.get("provenance") or {}).get("matrix_hash")) and h != digest}


def set_records_aside(folder: str | Path) -> Path:
    """Move ``records.jsonl`` to ``records.replaced-<UTC time>.jsonl`` (nothing is deleted); returns where."""
    path = Path(folder) / RECORDS
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    target = path.with_name(f"records.replaced-{stamp}.jsonl")
    with FileLock(str(path) + ".lock"):
        os.replace(path, target)
    return target


def upsert_records(folder: str | Path, new: list[dict]) -> None:
    """Add records, replacing those with the same ``case_id``; all other records are kept. Damaged lines of the
    file (unreadable, or JSON that is not a record) are moved to ``records.damaged.jsonl`` with one warning, so
    they never stop a run or cost a new record."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / RECORDS
    for record in new:
        if not isinstance(record, dict) or not isinstance(record.get("case_id"), str):
            raise TypeError(f"upsert_records: a record must be a dict with a string case_id, got {record!r:.120}")
    with FileLock(str(path) + ".lock"):
        good, bad = _scan(path) if path.exists() else ([], [])
        if bad:
            side = _set_aside(path, bad)
            _warn_once(path, bad, f"moved to {side}")
        by_id = {record["case_id"]: record for _, _, record in good}
        for record in new:
            by_id[record["case_id"]] = strict_json(record)
        atomic_write(path, "".join(json.dumps(r, sort_keys=True, allow_nan=False) + "\n" for r in by_id.values()))
