"""Results are data: one JSON record per case in ``records.jsonl``; tables are rendered from records alone.

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

import pandas as pd
from filelock import FileLock

from backdoor.attacks import ATTACKS
from backdoor.defenses import DEFENSES
from backdoor.stats import INTERVAL_KIND, Summary, summarize
from backdoor.targets import ALL_TO_ALL

RECORDS = "records.jsonl"
# Attack names of rows that no registered attack makes: the clean reference and a user's own model's trigger.
UNREGISTERED_ATTACK_TITLES = {"clean": "clean (reference)", "images": "given triggered images",
                              "notrigger": "no trigger given"}
METRIC_TITLES = {"c_acc": "C-Acc", "asr": "ASR", "r_acc": "R-Acc"}
ALL_TO_ALL_MARK = " (all-to-all)"


def attack_order() -> list[str]:
    """Attacks in display order: the clean reference, then the registered ones by their files' ``order``."""
    return ["clean", *ATTACKS.order()]


def defense_order() -> list[str]:
    return DEFENSES.order()


def attack_title(name: str) -> str:
    """An attack's title in tables and figures: its file's ``title`` (its name where it is not registered)."""
    return UNREGISTERED_ATTACK_TITLES.get(name) or ATTACKS.title(name)


def defense_title(name: str) -> str:
    return DEFENSES.title(name)


def attack_titles(records: list[dict]) -> dict[str, str]:
    """Each attack's title in tables; an attack whose records have ``target: all-to-all`` is marked as such (not
    the clean reference, which no trigger reaches)."""
    all_to_all = {r["attack"] for r in records if r.get("target") == ALL_TO_ALL and r["attack"] != "clean"}
    return {r["attack"]: attack_title(r["attack"]) + (ALL_TO_ALL_MARK if r["attack"] in all_to_all else "")
            for r in records}


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


def _atomic_write(path: Path, text: str) -> None:
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
    missing = [k for k in (*REQUIRED_FIELDS, *METRIC_TITLES) if k not in record]
    if len(missing) > 3:
        return f"the record lacks {len(missing)} of its {len(REQUIRED_FIELDS) + len(METRIC_TITLES)} fields " \
               f"({', '.join(missing[:3])}, ...)"
    if missing:
        return f"the record lacks {', '.join(missing)}"
    for key, (types, name) in REQUIRED_FIELDS.items():
        if not isinstance(record[key], types) or isinstance(record[key], bool):
            return f"{key} must be {name}, got {json.dumps(record[key])[:80]}"
    if record["status"] not in STATUSES:
        return f"status must be one of {', '.join(STATUSES)}, got {record['status']!r}"
    for key in METRIC_TITLES:
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
                    _atomic_write(path, "".join(raw.decode("utf-8") + "\n" for _, raw in kept))
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
        _atomic_write(path, "".join(json.dumps(r, sort_keys=True, allow_nan=False) + "\n" for r in by_id.values()))


def _order(values, preferred: list[str]) -> list:
    rank = {name: i for i, name in enumerate(preferred)}
    return sorted(set(values), key=lambda v: (rank.get(v, len(rank)), v))


def _ratio_text(ratio: float) -> str:
    """A poison ratio as tables show it: ``-`` for no poisoning (the clean reference, a user's model)."""
    return "-" if ratio == 0 else f"{ratio:g}"


def _percent(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{100 * value:.2f}"


def _cell_text(summary: Summary | None) -> str:
    if summary is None:
        return "-"
    if summary.n == 1:
        return _percent(summary.mean)
    return f"{_percent(summary.mean)} ± {100 * summary.half_width:.2f}"


def _row_keys(df: pd.DataFrame) -> pd.DataFrame:
    keys = ["dataset", "model", "poison_ratio", "attack"]
    rows = df[keys].drop_duplicates()
    attacks = _order(df.attack, attack_order())
    rows = rows.assign(_a=rows.attack.map(attacks.index))
    return rows.sort_values(["dataset", "model", "poison_ratio", "_a"]).drop(columns="_a")


def cell_summaries(records: list[dict]) -> dict[tuple, dict]:
    """Per (dataset, model, poison ratio, attack, defense): ``status`` ("ok", or "n/a" when the defense does not
    apply to any seed), ``n`` (seeds with status ok) and a ``Summary`` per metric over those seeds."""
    cells: dict[tuple, list[dict]] = {}
    for r in records:
        cells.setdefault((r["dataset"], r["model"], r["poison_ratio"], r["attack"], r["defense"]), []).append(r)
    out = {}
    for key, rs in cells.items():
        ok = [r for r in rs if r.get("status") == "ok"]
        out[key] = {"status": "ok" if ok else "n/a", "n": len(ok),
                    "collapsed": sorted({r["collapsed_to"] for r in ok if r.get("collapsed_to") is not None}),
                    **{m: summarize(r.get(m) for r in ok) for m in (*METRIC_TITLES, *TARGET_FIGURES)},
                    "seconds": summarize((defense_seconds(r) for r in ok), bounds=None)}
    return out


def defense_seconds(record: dict) -> float | None:
    """What the defense cost to compute, in seconds: its build time (kept with the cached artifact, so a rerun
    that only loads it still knows), else the stage's time when it was built in this run; None for no defense,
    or a cache hit whose build time was not kept."""
    if record.get("defense") == "none":
        return None
    built = (record.get("build_seconds") or {}).get("defense")
    if built is not None:
        return built
    if (record.get("cache_hits") or {}).get("defense") is False:
        return (record.get("stage_seconds") or {}).get("defense")
    return None


TARGET_FIGURES = {"target_base_rate": "Base rate", "target_acc": "Target acc"}
ERASED_TARGET = 0.1  # target-class clean accuracy below this: the defense erased the class
LOST_ACCURACY = 0.5  # C-Acc below this share of the no-defense C-Acc: the defense lost most clean accuracy


def degenerate(cell: dict | None, undefended: dict | None) -> str | None:
    """Why a defended cell's ASR means little (mean over seeds), or None: the target class is erased, or most of
    the clean accuracy is gone."""
    if not cell or cell["status"] != "ok":
        return None
    if cell.get("collapsed"):
        return collapsed_reason(cell)
    if cell.get("target_acc") is not None and cell["target_acc"].mean < ERASED_TARGET:
        return f"target class erased (its clean accuracy {100 * cell['target_acc'].mean:.1f}%)"
    before = (undefended or {}).get("c_acc")
    if before is not None and cell.get("c_acc") is not None and cell["c_acc"].mean < LOST_ACCURACY * before.mean:
        return f"most clean accuracy lost (C-Acc {100 * cell['c_acc'].mean:.1f}% against {100 * before.mean:.1f}%)"
    return None


def collapsed_reason(cell: dict | None) -> str | None:
    """A cell with a model that predicts one class for every clean test image (on some seed): never a backdoor."""
    if not cell or not cell.get("collapsed"):
        return None
    return f"the model predicts one class for every input (class {', '.join(map(str, cell['collapsed']))})"


def retrained_on_fixed_poison(records: list[dict]) -> set[tuple[str, str]]:
    """(attack, defense) pairs where a data-side defense met a training-controllable attack (WaNet, Input-aware).

    Such a defense retrains on the poisoned training set as the harness stored it, a fixed set of warped or
    generator-triggered images with their labels: the attacker no longer controls that training. The result is
    a data-poisoning version of the attack, a different attack, so the cell does not measure the defense
    against the attack of its row."""
    return {(r["attack"], r["defense"]) for r in records
            if r.get("attack_kind") == "training_controllable" and r.get("defense_kind") == "data_side"}


def leaderboard_frame(records: list[dict], numeric: bool = False) -> pd.DataFrame:
    """The paper's full-result layout: one row per (dataset, model, poison ratio, attack), one column group
    per defense (No defense first) with C-Acc, ASR, R-Acc in percent and n (seeds).

    Cells give the mean over seeds and, with n >= 2, the half-width of its 95% Student-t interval
    ("99.07 ± 0.52"); "n/a" where the defense does not apply. With ``numeric`` the frame holds numbers
    instead: per metric the mean and the interval's ends ("... CI low", "... CI high"; empty when n = 1),
    for the CSV."""
    if not records:
        raise ValueError("no records to render")
    df = pd.DataFrame(records)
    summaries = cell_summaries(records)
    fixed_poison = retrained_on_fixed_poison(records)
    titles = attack_titles(records)
    defenses = _order(df.defense, defense_order())
    columns: dict[tuple, list] = {("", title): [] for title in ("Dataset", "Model", "Ratio", "Attack")}
    for _, row in _row_keys(df).iterrows():
        columns[("", "Dataset")].append(row.dataset)
        columns[("", "Model")].append(row.model)
        columns[("", "Ratio")].append(_ratio_text(row.poison_ratio))
        columns[("", "Attack")].append(titles[row.attack])
        undefended = summaries.get((row.dataset, row.model, row.poison_ratio, row.attack, "none"))
        for defense in defenses:
            cell = summaries.get((row.dataset, row.model, row.poison_ratio, row.attack, defense))
            title = defense_title(defense)
            flag = degenerate(cell, undefended) if defense != "none" else collapsed_reason(cell)
            for (sub, value) in _cell_columns(cell, numeric, timed=defense != "none"):
                if flag and not numeric and sub == "ASR":
                    value += " †"
                if (row.attack, defense) in fixed_poison and not numeric and sub == "ASR" and value:
                    value += " ‡"
                columns.setdefault((title, sub), []).append(value)
    frame = pd.DataFrame(columns)
    frame.columns = pd.MultiIndex.from_tuples(frame.columns)
    return frame


def _seconds_text(summary: Summary | None) -> str:
    if summary is None:
        return "-"
    return f"{summary.mean:.1f}" if summary.mean < 100 else f"{summary.mean:.0f}"


def _cell_columns(cell: dict | None, numeric: bool, timed: bool = False) -> list[tuple[str, object]]:
    out = []
    for metric, title in METRIC_TITLES.items():
        summary = cell.get(metric) if cell else None
        if not numeric:
            value = "" if cell is None else "n/a" if cell["status"] == "n/a" else _cell_text(summary)
            out.append((title, value))
            continue
        pct = (lambda v: None if v is None else round(100 * v, 2))
        out += [(title, pct(summary.mean) if summary else None),
                (f"{title} CI low", pct(summary.low) if summary else None),
                (f"{title} CI high", pct(summary.high) if summary else None)]
    out.append(("n", "" if cell is None else cell["n"]))
    if timed:  # the defense's compute time beside its metrics (mean over seeds)
        seconds = cell.get("seconds") if cell else None
        if numeric:
            out.append((TIME_TITLE, None if seconds is None else round(seconds.mean, 3)))
        else:
            out.append((TIME_TITLE, "" if cell is None else "n/a" if cell["status"] == "n/a" else _seconds_text(seconds)))
    return out


TIME_TITLE = "Time (s)"


DETECTION_FIGURES = {"flagged": "Flagged", "tpr": "TPR", "fpr": "FPR", "precision": "Precision", "auroc": "AUROC"}


def detection_frame(records: list[dict]) -> pd.DataFrame | None:
    """Poison detection of data-side defenses, scored by the harness against the true mask (percent; flagged
    samples as a count), aggregated over seeds like the leaderboard."""
    rows = [r for r in records if r.get("detection")]
    if not rows:
        return None
    attacks = _order([r["attack"] for r in rows], attack_order())
    defenses = _order([r["defense"] for r in rows], defense_order())
    groups: dict[tuple, list[dict]] = {}
    for r in sorted(rows, key=lambda r: _row_key(r, attacks, defenses)):
        groups.setdefault((r["dataset"], r["model"], r["poison_ratio"], r["attack"], r["defense"]), []).append(r)
    out, titles = [], attack_titles(rows)
    for (dataset, model, ratio, attack, defense), rs in groups.items():
        row = {"Dataset": dataset, "Model": model, "Ratio": _ratio_text(ratio), "Attack": titles[attack],
               "Defense": defense_title(defense)}
        for key, title in DETECTION_FIGURES.items():
            summary = summarize((r["detection"].get(key) for r in rs), bounds=None if key == "flagged" else (0, 1))
            if key == "flagged":
                row[title] = "-" if summary is None else (f"{summary.mean:.0f}" if summary.n == 1 else
                                                          f"{summary.mean:.1f} ± {summary.half_width:.1f}")
            else:
                row[title] = _cell_text(summary)
        row["n"] = len(rs)
        out.append(row)
    return pd.DataFrame(out)


def target_frame(records: list[dict]) -> pd.DataFrame | None:
    """Per cell: the clean base rate of target predictions and the target class's clean accuracy (percent, over
    seeds), next to ASR, with the reason a defended cell is marked † in the leaderboard. All-to-all cells have
    a base rate (clean images predicted as their next class) and no target class."""
    summaries = cell_summaries(records)
    rows, titles = [], attack_titles(records)
    attacks = _order([r["attack"] for r in records], attack_order())
    defenses = _order([r["defense"] for r in records], defense_order())
    for key in sorted(summaries, key=lambda k: (k[0], k[1], k[2], attacks.index(k[3]), defenses.index(k[4]))):
        cell = summaries[key]
        if cell.get("target_acc") is None and cell.get("target_base_rate") is None:
            continue
        dataset, model, ratio, attack, defense = key
        flag = degenerate(cell, summaries.get((*key[:4], "none"))) if defense != "none" else collapsed_reason(cell)
        rows.append({"Dataset": dataset, "Model": model, "Ratio": _ratio_text(ratio), "Attack": titles[attack],
                     "Defense": defense_title(defense), "ASR": _cell_text(cell["asr"]),
                     "Base rate": _cell_text(cell["target_base_rate"]), "Target acc": _cell_text(cell["target_acc"]),
                     "n": cell["n"], "Marked": flag or ""})
    return pd.DataFrame(rows) if rows else None


def benign_frame(records: list[dict]) -> pd.DataFrame | None:
    """The benign condition: each defense run on the clean reference model (matrix option ``benign``), over
    seeds: C-Acc before and after, its cost, what it flags when nothing is poisoned (every flag a false
    positive: data-side defenses' flagged training samples and FPR, a detector's flagged classes), and its
    compute time."""
    rows = [r for r in records if r["attack"] == "clean" and r["defense"] != "none" and r.get("status") == "ok"
            and r.get("benign")]
    if not rows:
        return None
    defenses = _order([r["defense"] for r in rows], defense_order())
    groups: dict[tuple, list[dict]] = {}
    for r in sorted(rows, key=lambda r: (r["dataset"], r["model"], defenses.index(r["defense"]), r["seed"])):
        groups.setdefault((r["dataset"], r["model"], r["defense"]), []).append(r)
    out = []
    for (dataset, model, defense), rs in groups.items():
        before = summarize(r["undefended"]["c_acc"] for r in rs)
        cost = summarize((r["benign"]["c_acc_cost"] for r in rs), bounds=None)
        flagged = summarize((r["benign"].get("flagged") for r in rs), bounds=None)
        fpr = summarize(r["benign"].get("fpr") for r in rs)
        classes = [r["benign"].get("flagged_classes") for r in rs]
        flags = "-"
        if flagged is not None:
            flags = f"{flagged.mean:.0f} samples (FPR {_cell_text(fpr)}%)" if flagged.n == 1 else \
                f"{flagged.mean:.1f} ± {flagged.half_width:.1f} samples (FPR {_cell_text(fpr)}%)"
        elif any(c is not None for c in classes):
            flags = "; ".join("none" if not c else "classes " + " ".join(map(str, c)) for c in classes if c is not None)
        out.append({"Dataset": dataset, "Model": model, "Defense": defense_title(defense),
                    "C-Acc clean": _cell_text(before), "C-Acc defended": _cell_text(summarize(r["c_acc"] for r in rs)),
                    "Cost": _cell_text(cost), "Flagged (all false positives)": flags,
                    TIME_TITLE: _seconds_text(summarize((defense_seconds(r) for r in rs), bounds=None)),
                    "n": len(rs)})
    return pd.DataFrame(out)


def _detail_value(v) -> bool:
    return isinstance(v, (int, float, str, bool)) or (isinstance(v, list) and len(v) <= 4)


def _row_key(r: dict, attacks: list[str], defenses: list[str]) -> tuple:
    return (r["dataset"], r["model"], r["poison_ratio"], attacks.index(r["attack"]), defenses.index(r["defense"]),
            r["seed"])


def details_frame(records: list[dict]) -> pd.DataFrame | None:
    """Figures defenses report, per seed (pruned channels, NC's flagged classes, ...; lists of at most four
    values) and not-applicable reasons: a log of what each run did, not a result table."""
    attacks = _order([r["attack"] for r in records], attack_order())
    defenses = _order([r["defense"] for r in records], defense_order())
    rows, titles = [], attack_titles(records)
    for r in sorted(records, key=lambda r: _row_key(r, attacks, defenses)):
        info = {k: v for k, v in (r.get("defense_info") or {}).items() if _detail_value(v)}
        if r.get("status") == "not_applicable":
            info = {"not applicable": r.get("reason")}
        if info:
            rows.append({"Dataset": r["dataset"], "Model": r["model"], "Ratio": _ratio_text(r["poison_ratio"]),
                         "Attack": titles[r["attack"]],
                         "Defense": defense_title(r["defense"]), "Seed": r["seed"],
                         "Details": ", ".join(f"{k}={_short(v)}" for k, v in sorted(info.items()))})
    return pd.DataFrame(rows) if rows else None


def _short(v):
    if isinstance(v, list):
        return "[" + " ".join(str(_short(x)) for x in v) + "]"
    return f"{v:.4g}" if isinstance(v, float) else v


def _flat(board: pd.DataFrame) -> pd.DataFrame:
    flat = board.copy()
    flat.columns = [b if not a else f"{a} {b}" for a, b in board.columns]
    return flat


LEGEND = (f"C-Acc, ASR and R-Acc in percent: the mean over seeds ± the half-width of its {INTERVAL_KIND.split(' of ')[0]}"
          " (no interval when n = 1); n is the number of seeds; Time (s): the defense's compute time (mean over "
          "seeds; `-` where only a cache hit without its build time is recorded); `n/a`: the defense does not apply. "
          "Records stay one per seed in records.jsonl.")


def render_markdown(records: list[dict], title: str, folder: Path | None = None) -> str:
    parts = [f"# Leaderboard: {title}", "", LEGEND, "",
             _flat(leaderboard_frame(records)).to_markdown(index=False, disable_numparse=True)]
    users = {r["model"]: r["user_model"] for r in records if r.get("source") == "user" and r.get("user_model")}
    if users:
        parts += ["", "User models (pure defense: a checkpoint you brought, defended here; Attack names how its test "
                  "set was triggered): " + "; ".join(f"{label} = {u.get('arch')} from {u.get('checkpoint')}"
                                                     for label, u in sorted(users.items())) + "."]
    if any(r.get("target") == ALL_TO_ALL for r in records):
        parts += ["", "(all-to-all): the trigger sends an image of class y to (y + 1) mod K; the poisoned test set is "
                  "the whole test set, ASR the share predicted as (y + 1) mod K, R-Acc the share predicted as y."]
    if retrained_on_fixed_poison(records):
        parts += ["", "‡: a data-side defense against a training-controllable attack (WaNet, Input-aware) retrains on "
                  "the poisoned training set as stored, with the attacker no longer in control of training: a "
                  "data-poisoning version of the attack, not the attack of its row (README, Attacks and defenses)."]
    benign = benign_frame(records)
    if benign is not None:
        parts += ["", "## Benign condition (defenses on the clean reference model: nothing is poisoned)", "",
                  "Cost: C-Acc lost to the defense, in points; Flagged: what the defense flags on a clean training "
                  "set (data-side defenses: samples, all false positives) or model (detectors: classes); seeds per "
                  "cell as the leaderboard's.", "", benign.to_markdown(index=False, disable_numparse=True)]
    target = target_frame(records)
    if target is not None:
        parts += ["", "## Target class (ASR means something only above the base rate)", "",
                  "Base rate: share of clean non-target test images predicted as the target; Target acc: clean "
                  "accuracy on the target class. † in the leaderboard: the defense erased the target class (Target acc "
                  f"< {100 * ERASED_TARGET:.0f}%) or lost most clean accuracy (C-Acc < {LOST_ACCURACY:.0%} of no defense's).",
                  "", target.to_markdown(index=False, disable_numparse=True)]
    detection = detection_frame(records)
    if detection is not None:
        parts += ["", "## Poison detection (data-side defenses, scored against the true poison mask)", "",
                  detection.to_markdown(index=False, disable_numparse=True)]
    details = details_frame(records)
    if details is not None:
        parts += ["", "## Defense details (per seed)", "", details.to_markdown(index=False, disable_numparse=True)]
    if folder is not None:
        from backdoor.harness.report.figures import figure_links  # lazy: figures imports this module
        links = figure_links(folder)
        if links:
            parts += ["", *links]
    return "\n".join(parts) + "\n"


def write_leaderboard(folder: str | Path) -> tuple[Path, Path]:
    """Render ``leaderboard.md`` and ``leaderboard.csv`` in ``folder`` from its ``records.jsonl``."""
    folder = Path(folder)
    records = read_records(folder)
    md, csv = folder / "leaderboard.md", folder / "leaderboard.csv"
    _atomic_write(md, render_markdown(records, folder.name, folder))
    _atomic_write(csv, _flat(leaderboard_frame(records, numeric=True)).to_csv(index=False))
    return md, csv
