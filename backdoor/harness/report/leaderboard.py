"""The leaderboard, rendered from records alone: ``leaderboard.md`` and ``leaderboard.csv`` (C-Acc, ASR and R-Acc
per dataset, model, attack, ratio and defense, and each defense's DER, mean over seeds with an interval), the
target-class, detection, benign and details tables. Percentages exist only here; records hold floats in [0, 1].
Detection cases have their own tables (``backdoor.harness.report.detection``: ``detection.md``), written beside.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from backdoor.harness.expectations import attach_undefended, metric_values
from backdoor.harness.records import atomic_write, read_records
from backdoor.harness.report.cells import (DER_TITLE, METRIC_TITLES, _cell_text, _order, _ratio_text, attack_order,
                                           attack_titles, defense_order, defense_title)
from backdoor.harness.report.cells import attack_title  # noqa: F401 (figures and tests import it from here)
from backdoor.harness.report.detection import is_detection, write_detection
from backdoor.harness.report.figure_index import figure_links
from backdoor.stats import INTERVAL_KIND, Summary, summarize
from backdoor.targets import ALL_TO_ALL

def _row_keys(df: pd.DataFrame) -> pd.DataFrame:
    keys = ["dataset", "model", "poison_ratio", "attack"]
    rows = df[keys].drop_duplicates()
    attacks = _order(df.attack, attack_order())
    rows = rows.assign(_a=rows.attack.map(attacks.index))
    return rows.sort_values(["dataset", "model", "poison_ratio", "_a"]).drop(columns="_a")


def defense_effectiveness_rate(asr_drop: float, c_acc_drop: float) -> float:
    """BackdoorBench's DER, in [0, 1]: (max(0, ASR drop) - max(0, C-Acc drop) + 1) / 2, each drop the backdoored
    model's metric less the defended model's. 0.5: the defense changed neither; 1: it removed an ASR of 1 at no
    clean accuracy. A rise in C-Acc earns nothing, a rise in ASR costs nothing (the clips). The clean-accuracy drop
    is subtracted, as BackdoorBench's docstring and its ``defense_effectiveness_rate_simplied`` have it (its
    ``defense_effectiveness_rate`` adds it, rewarding a defense that destroys clean accuracy)."""
    return (max(0.0, asr_drop) - max(0.0, c_acc_drop) + 1) / 2


def record_der(record: dict) -> float | None:
    """One seed's DER: the defense's record against the same backdoored model before the defense (its
    ``undefended``, the regression checks' ``d_asr`` and ``d_c_acc``). None for no defense, the clean reference
    (nothing to remove), a record without a result, or one without ASR or its no-defense metrics."""
    if record.get("defense") == "none" or record.get("attack") == "clean" or record.get("status") != "ok":
        return None
    changed = metric_values(record)
    if changed.get("d_asr") is None or changed.get("d_c_acc") is None:
        return None
    return defense_effectiveness_rate(-changed["d_asr"], -changed["d_c_acc"])


def with_undefended(records: list[dict]) -> list[dict]:
    """Records with each attacked defense case's ``undefended`` metrics, taken from the no-defense case of the
    same backdoored model where a record lacks them (``expectations.attach_undefended``: records written before
    the runner stored them, or a defense that returned the model unchanged). Records without a case id (made by
    hand) are left as they are."""
    return attach_undefended(records) if all("case_id" in r for r in records) else records


def cell_summaries(records: list[dict]) -> dict[tuple, dict]:
    """Per (dataset, model, poison ratio, attack, defense): ``status`` ("ok", or "n/a" when the defense does not
    apply to any seed), ``n`` (seeds with status ok), a ``Summary`` per metric over those seeds, and ``der``: the
    Summary of the per-seed DERs (``record_der``; None for no defense and the clean reference)."""
    cells: dict[tuple, list[dict]] = {}
    for r in with_undefended(defense_records(records)):
        cells.setdefault((r["dataset"], r["model"], r["poison_ratio"], r["attack"], r["defense"]), []).append(r)
    out = {}
    for key, rs in cells.items():
        ok = [r for r in rs if r.get("status") == "ok"]
        out[key] = {"status": "ok" if ok else "n/a", "n": len(ok),
                    "collapsed": sorted({r["collapsed_to"] for r in ok if r.get("collapsed_to") is not None}),
                    **{m: summarize(r.get(m) for r in ok) for m in (*METRIC_TITLES, *TARGET_FIGURES)},
                    "der": summarize(record_der(r) for r in ok),
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
    per defense (No defense first) with C-Acc, ASR, R-Acc in percent and n (seeds); a defense's group adds its
    DER (percent; ``-`` on the clean reference row) and its compute time.

    Cells give the mean over seeds and, with n >= 2, the half-width of its 95% Student-t interval
    ("99.07 ± 0.52"); "n/a" where the defense does not apply. With ``numeric`` the frame holds numbers
    instead: per metric the mean and the interval's ends ("... CI low", "... CI high"; empty when n = 1),
    for the CSV."""
    records = defense_records(records)
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
            for (sub, value) in _cell_columns(cell, numeric, defended=defense != "none"):
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


def _cell_columns(cell: dict | None, numeric: bool, defended: bool = False) -> list[tuple[str, object]]:
    """A cell's columns: the metrics, with ``defended`` DER after them, n, and with ``defended`` the time."""
    out = []
    metrics = {**METRIC_TITLES, **({"der": DER_TITLE} if defended else {})}
    for metric, title in metrics.items():
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
    if defended:  # the defense's compute time beside its metrics (mean over seeds)
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
          " (no interval when n = 1); n is the number of seeds; DER: the defense effectiveness rate in percent, "
          "(max(0, ASR drop) - max(0, C-Acc drop) + 1) / 2 against the same seed's backdoored model before the "
          "defense (50: nothing changed), over seeds the same way (`-` on the clean reference); Time (s): the "
          "defense's compute time (mean over seeds; `-` where only a cache hit without its build time is recorded); "
          "`n/a`: the defense does not apply. Records stay one per seed in records.jsonl.")


def defense_records(records: list[dict]) -> list[dict]:
    """The records of the leaderboard's tables: every case but the detection cases (``detection.md``'s)."""
    return [r for r in records if not is_detection(r)]


def render_markdown(records: list[dict], title: str, folder: Path | None = None) -> str:
    detections = any(is_detection(r) for r in records)
    records = defense_records(records)
    parts = [f"# Leaderboard: {title}", "", LEGEND, "",
             _flat(leaderboard_frame(records)).to_markdown(index=False, disable_numparse=True)]
    if detections:
        parts += ["", "Detection cases (input-level, data-side and model-level detectors): detection.md."]
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
        links = figure_links(folder)
        if links:
            parts += ["", *links]
    return "\n".join(parts) + "\n"


def write_leaderboard(folder: str | Path) -> tuple[Path, Path]:
    """Render ``leaderboard.md`` and ``leaderboard.csv`` in ``folder`` from its ``records.jsonl``."""
    folder = Path(folder)
    records = read_records(folder)
    md, csv = folder / "leaderboard.md", folder / "leaderboard.csv"
    atomic_write(md, render_markdown(records, folder.name, folder))
    atomic_write(csv, _flat(leaderboard_frame(records, numeric=True)).to_csv(index=False))
    write_detection(folder, records)
    return md, csv
