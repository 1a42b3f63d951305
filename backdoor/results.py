"""Results are data: one JSON record per case in ``records.jsonl``; tables are rendered from records alone.

Metrics are stored as floats in [0, 1] with provenance; percentages exist only in rendered tables.
Writing a record replaces the record of the same case and keeps every other one; every write is atomic
(temp file + rename) under a file lock, so an interrupted run never loses finished results.
"""
from __future__ import annotations

import json
import math
import os
import uuid
from pathlib import Path

import pandas as pd
from filelock import FileLock

RECORDS = "records.jsonl"
ATTACK_ORDER = ["clean", "badnets", "blended", "lc", "sig", "lf", "ssba", "inputaware", "wanet"]
DEFENSE_ORDER = ["none", "ft", "fp", "nad", "nc", "anp", "ac", "spectral", "abl", "dbd"]
DEFENSE_TITLES = {"none": "No defense", "ft": "FT", "fp": "FP", "nad": "NAD", "nc": "NC", "anp": "ANP",
                  "ac": "AC", "spectral": "Spectral", "abl": "ABL", "dbd": "DBD"}
ATTACK_TITLES = {"clean": "clean (reference)", "badnets": "BadNets", "blended": "Blended", "lc": "LC",
                 "sig": "SIG", "lf": "LF", "ssba": "SSBA", "inputaware": "Input-aware", "wanet": "WaNet"}
METRIC_TITLES = {"c_acc": "C-Acc", "asr": "ASR", "r_acc": "R-Acc"}


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def read_records(folder: str | Path) -> list[dict]:
    path = Path(folder) / RECORDS
    if not path.exists():
        raise FileNotFoundError(f"no {RECORDS} in {folder}: run a matrix first (backdoor run matrices/<name>.yaml)")
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{number}: not a JSON record ({e})") from e
    return records


def upsert_records(folder: str | Path, new: list[dict]) -> None:
    """Add records, replacing those with the same ``case_id``; all other records are kept."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / RECORDS
    with FileLock(str(path) + ".lock"):
        existing = read_records(folder) if path.exists() else []
        by_id = {r["case_id"]: r for r in existing}
        for record in new:
            by_id[record["case_id"]] = record
        _atomic_write(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in by_id.values()))


def _order(values, preferred: list[str]) -> list:
    rank = {name: i for i, name in enumerate(preferred)}
    return sorted(set(values), key=lambda v: (rank.get(v, len(rank)), v))


def _percent(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{100 * value:.2f}"


def leaderboard_frame(records: list[dict]) -> pd.DataFrame:
    """The paper's full-result layout: one row per (dataset, model, poison ratio, attack), one column group
    per defense (No defense first) with C-Acc, ASR, R-Acc in percent (mean over seeds); "n/a" where the
    defense does not apply."""
    if not records:
        raise ValueError("no records to render")
    df = pd.DataFrame(records)
    keys = ["dataset", "model", "poison_ratio", "attack"]
    rows = df[keys].drop_duplicates()
    rows = rows.assign(_a=rows.attack.map(lambda a: _order(df.attack, ATTACK_ORDER).index(a)))
    rows = rows.sort_values(["dataset", "model", "poison_ratio", "_a"]).drop(columns="_a")
    defenses = _order(df.defense, DEFENSE_ORDER)
    table = {("", title): [] for title in ("Dataset", "Model", "Ratio", "Attack")}
    for defense in defenses:
        for metric in METRIC_TITLES.values():
            table[(DEFENSE_TITLES.get(defense, defense), metric)] = []
    for _, row in rows.iterrows():
        match = (df.dataset == row.dataset) & (df.model == row.model) & (df.poison_ratio == row.poison_ratio) \
            & (df.attack == row.attack)
        table[("", "Dataset")].append(row.dataset)
        table[("", "Model")].append(row.model)
        table[("", "Ratio")].append("-" if row.attack == "clean" else f"{row.poison_ratio:g}")
        table[("", "Attack")].append(ATTACK_TITLES.get(row.attack, row.attack))
        for defense in defenses:
            cell = df[match & (df.defense == defense)]
            title = DEFENSE_TITLES.get(defense, defense)
            for metric, metric_title in METRIC_TITLES.items():
                if cell.empty:
                    value = ""
                elif (cell.status == "not_applicable").all():
                    value = "n/a"
                else:
                    value = _percent(cell[cell.status == "ok"][metric].astype(float).mean())
                table[(title, metric_title)].append(value)
    frame = pd.DataFrame(table)
    frame.columns = pd.MultiIndex.from_tuples(frame.columns)
    return frame


def detection_frame(records: list[dict]) -> pd.DataFrame | None:
    """Poison detection of data-side defenses, scored by the harness against the true mask (percent)."""
    rows = [r for r in records if r.get("detection")]
    if not rows:
        return None
    attacks = _order([r["attack"] for r in rows], ATTACK_ORDER)
    defenses = _order([r["defense"] for r in rows], DEFENSE_ORDER)
    out = []
    for r in sorted(rows, key=lambda r: _row_key(r, attacks, defenses)):
        d = r["detection"]
        out.append({"Dataset": r["dataset"], "Model": r["model"], "Ratio": f"{r['poison_ratio']:g}",
                    "Attack": ATTACK_TITLES.get(r["attack"], r["attack"]),
                    "Defense": DEFENSE_TITLES.get(r["defense"], r["defense"]), "Seed": r["seed"],
                    "Flagged": d["flagged"], "TPR": _percent(d["tpr"]), "FPR": _percent(d["fpr"]),
                    "Precision": _percent(d["precision"]), "AUROC": _percent(d["auroc"])})
    return pd.DataFrame(out)


def _detail_value(v) -> bool:
    return isinstance(v, (int, float, str, bool)) or (isinstance(v, list) and len(v) <= 4)


def _row_key(r: dict, attacks: list[str], defenses: list[str]) -> tuple:
    return (r["dataset"], r["model"], r["poison_ratio"], attacks.index(r["attack"]), defenses.index(r["defense"]),
            r["seed"])


def details_frame(records: list[dict]) -> pd.DataFrame | None:
    """Figures defenses report (pruned channels, NC's flagged classes, ...; lists of at most four values) and
    not-applicable reasons."""
    attacks = _order([r["attack"] for r in records], ATTACK_ORDER)
    defenses = _order([r["defense"] for r in records], DEFENSE_ORDER)
    rows = []
    for r in sorted(records, key=lambda r: _row_key(r, attacks, defenses)):
        info = {k: v for k, v in (r.get("defense_info") or {}).items() if _detail_value(v)}
        if r.get("status") == "not_applicable":
            info = {"not applicable": r.get("reason")}
        if info:
            rows.append({"Dataset": r["dataset"], "Model": r["model"], "Ratio": f"{r['poison_ratio']:g}",
                         "Attack": ATTACK_TITLES.get(r["attack"], r["attack"]),
                         "Defense": DEFENSE_TITLES.get(r["defense"], r["defense"]), "Seed": r["seed"],
                         "Details": ", ".join(f"{k}={_short(v)}" for k, v in sorted(info.items()))})
    return pd.DataFrame(rows) if rows else None


def _short(v):
    if isinstance(v, list):
        return "[" + " ".join(str(_short(x)) for x in v) + "]"
    return f"{v:.4g}" if isinstance(v, float) else v


def render_markdown(records: list[dict], title: str) -> str:
    board = leaderboard_frame(records)
    flat = board.copy()
    flat.columns = [b if not a else f"{a} {b}" for a, b in board.columns]
    parts = [f"# Leaderboard: {title}", "",
             "C-Acc, ASR and R-Acc in percent (mean over seeds); `n/a`: the defense does not apply.", "",
             flat.to_markdown(index=False, disable_numparse=True)]
    detection = detection_frame(records)
    if detection is not None:
        parts += ["", "## Poison detection (data-side defenses, scored against the true poison mask)", "",
                  detection.to_markdown(index=False, disable_numparse=True)]
    details = details_frame(records)
    if details is not None:
        parts += ["", "## Defense details", "", details.to_markdown(index=False, disable_numparse=True)]
    return "\n".join(parts) + "\n"


def write_leaderboard(folder: str | Path) -> tuple[Path, Path]:
    """Render ``leaderboard.md`` and ``leaderboard.csv`` in ``folder`` from its ``records.jsonl``."""
    folder = Path(folder)
    records = read_records(folder)
    board = leaderboard_frame(records)
    flat = board.copy()
    flat.columns = [b if not a else f"{a} {b}" for a, b in board.columns]
    md, csv = folder / "leaderboard.md", folder / "leaderboard.csv"
    _atomic_write(md, render_markdown(records, folder.name))
    _atomic_write(csv, flat.to_csv(index=False))
    return md, csv
