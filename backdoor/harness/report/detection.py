"""The detection tables, rendered from records alone: one per detection task, in ``detection.md`` and
``detection_<task>.csv``.

- **Input-level** (per dataset, model, ratio, attack, detector; mean ± interval over seeds): AUROC of the scores
  (clean test set = negatives, triggered test set = positives), TPR and FPR at the detector's own threshold,
  the residual ASR (triggered inputs that pass and hit the target), the ASR without the detector, and the clean
  inputs lost (flagged).
- **Data-side** (the same keys): TPR, FPR, precision, AUROC of the scores against the poison mask, and samples
  flagged; the clean reference rows give the benign condition's false positives (FPR over a clean training set).
- **Model-level** (per dataset, model, detector; over the population of models the records hold: clean reference
  models are the negatives, backdoored models the positives): AUROC with its bootstrap interval over models, TPR
  and FPR at the detector's own decision, seconds per model; then the same broken down by attack family (the
  attack's kind: dirty label, clean label, training-controllable), by attack, and over the effective backdoors
  alone (ASR at least ``EFFECTIVE_ASR`` on the inspected model).

Percentages exist only here; records hold floats in [0, 1].
"""
from __future__ import annotations

import statistics
from pathlib import Path

import pandas as pd

from backdoor.detectors import DETECTORS
from backdoor.detectors.base import TASK_TITLES
from backdoor.harness.records import atomic_write
from backdoor.harness.report.cells import _cell_text, _order, _percent, _ratio_text, attack_order, attack_titles
from backdoor.stats import BOOTSTRAP_KIND, INTERVAL_KIND, auroc_interval, summarize

INPUT_FIGURES = {"auroc": "AUROC", "tpr": "TPR", "fpr": "FPR", "residual_asr": "Residual ASR",
                 "asr_before": "ASR (no detector)", "clean_lost": "Clean lost"}
DATA_FIGURES = {"tpr": "TPR", "fpr": "FPR", "precision": "Precision", "auroc": "AUROC"}
FAMILY_TITLES = {"dirty_label": "dirty label", "clean_label": "clean label",
                 "training_controllable": "training-controllable"}
#: A backdoored model whose trigger works on at least this share of the triggered test set is an effective
#: backdoor: a population row scores the detectors on those alone (TrojAI keeps only poisoned models whose trigger
#: works; a model trained on poison whose ASR stayed near the base rate carries no backdoor to find).
EFFECTIVE_ASR = 0.5


def is_detection(record: dict) -> bool:
    """A detection case's record (``backdoor.harness.case_record.detection_fields``)."""
    return bool(record.get("detector"))


def detector_title(name: str) -> str:
    return DETECTORS.title(name)


def _ok(records: list[dict], task: str) -> list[dict]:
    return [r for r in records if is_detection(r) and r.get("task") == task and r.get("status") == "ok"
            and r.get("detection")]


def _grouped(rows: list[dict]) -> dict[tuple, list[dict]]:
    """Rows per (dataset, model, ratio, attack, detector), in display order."""
    attacks = _order([r["attack"] for r in rows], attack_order())
    detectors = _order([r["detector"] for r in rows], DETECTORS.order())
    key = lambda r: (r["dataset"], r["model"], r["poison_ratio"], attacks.index(r["attack"]),  # noqa: E731
                     detectors.index(r["detector"]), r["seed"])
    groups: dict[tuple, list[dict]] = {}
    for r in sorted(rows, key=key):
        groups.setdefault((r["dataset"], r["model"], r["poison_ratio"], r["attack"], r["detector"]), []).append(r)
    return groups


def _per_seed_frame(rows: list[dict], figures: dict[str, str], flagged: bool) -> pd.DataFrame | None:
    if not rows:
        return None
    out, titles = [], attack_titles(rows)
    for (dataset, model, ratio, attack, detector), rs in _grouped(rows).items():
        row = {"Dataset": dataset, "Model": model, "Ratio": _ratio_text(ratio), "Attack": titles[attack],
               "Detector": detector_title(detector)}
        for key, title in figures.items():
            row[title] = _cell_text(summarize(r["detection"].get(key) for r in rs))
        if flagged:
            summary = summarize((r["detection"].get("flagged") for r in rs), bounds=None)
            row["Flagged"] = "-" if summary is None else f"{summary.mean:.0f}" if summary.n == 1 else \
                f"{summary.mean:.1f} ± {summary.half_width:.1f}"
        seconds = [r["detection_seconds"] for r in rs if r.get("detection_seconds") is not None]
        row["Time (s)"] = f"{statistics.fmean(seconds):.1f}" if seconds else "-"
        row["n"] = len(rs)
        out.append(row)
    return pd.DataFrame(out)


def input_frame(records: list[dict]) -> pd.DataFrame | None:
    """The input-level table (percent, over seeds)."""
    return _per_seed_frame(_ok(records, "input"), INPUT_FIGURES, flagged=False)


def data_frame(records: list[dict]) -> pd.DataFrame | None:
    """The data-side table (percent, over seeds; flagged samples as a count); clean reference rows: the benign
    condition (every flag a false positive)."""
    return _per_seed_frame(_ok(records, "data"), DATA_FIGURES, flagged=True)


def population(records: list[dict]) -> dict[tuple, list[dict]]:
    """Model-level records per (dataset, model, detector): the population each detector was scored over."""
    rows = _ok(records, "model")
    detectors = _order([r["detector"] for r in rows], DETECTORS.order())
    out: dict[tuple, list[dict]] = {}
    for r in sorted(rows, key=lambda r: (r["dataset"], r["model"], detectors.index(r["detector"]))):
        out.setdefault((r["dataset"], r["model"], r["detector"]), []).append(r)
    return out


def _model_row(rs: list[dict], positives: list[dict]) -> dict:
    """AUROC [interval], TPR, FPR of one detector over the clean models of ``rs`` and ``positives``."""
    negatives = [r for r in rs if not r["detection"]["backdoored"]]
    found = auroc_interval([r["detection"]["score"] for r in positives], [r["detection"]["score"] for r in negatives])
    return {"Clean models": len(negatives), "Backdoored models": len(positives),
            "AUROC": "-" if found is None else f"{_percent(found[0])} [{_percent(found[1])}, {_percent(found[2])}]",
            "TPR": _percent(_share(positives)), "FPR": _percent(_share(negatives))}


def _effective(record: dict) -> bool:
    asr = (record.get("inspected") or {}).get("asr")
    return asr is not None and asr >= EFFECTIVE_ASR


def _share(rs: list[dict]) -> float | None:
    return sum(bool(r["detection"]["flagged"]) for r in rs) / len(rs) if rs else None


def model_frame(records: list[dict]) -> pd.DataFrame | None:
    """The model-level table: per dataset, model and detector, over the whole population."""
    groups = population(records)
    if not groups:
        return None
    out = []
    for (dataset, model, detector), rs in groups.items():
        seconds = [r["detection_seconds"] for r in rs if r.get("detection_seconds") is not None]
        out.append({"Dataset": dataset, "Model": model, "Detector": detector_title(detector),
                    **_model_row(rs, [r for r in rs if r["detection"]["backdoored"]]),
                    "Seconds per model": f"{statistics.median(seconds):.1f}" if seconds else "-"})
    return pd.DataFrame(out)


def model_breakdown_frame(records: list[dict]) -> pd.DataFrame | None:
    """The model-level table over the effective backdoors, by attack family and by attack: the population's clean
    models against the backdoored models whose ASR reaches ``EFFECTIVE_ASR``, then those of one family (or one
    attack) whatever their ASR."""
    groups = population(records)
    out = []
    for (dataset, model, detector), rs in groups.items():
        backdoored = [r for r in rs if r["detection"]["backdoored"]]
        titles = attack_titles(backdoored) if backdoored else {}
        out.append({"Dataset": dataset, "Model": model, "Detector": detector_title(detector),
                    "Backdoored by": f"effective (ASR >= {100 * EFFECTIVE_ASR:g}%)",
                    **_model_row(rs, [r for r in backdoored if _effective(r)])})
        families = _order([r.get("attack_kind") for r in backdoored], list(FAMILY_TITLES))
        for family in families:
            members = [r for r in backdoored if r.get("attack_kind") == family]
            out.append({"Dataset": dataset, "Model": model, "Detector": detector_title(detector),
                        "Backdoored by": f"family: {FAMILY_TITLES.get(family, family)}", **_model_row(rs, members)})
        for attack in _order([r["attack"] for r in backdoored], attack_order()):
            members = [r for r in backdoored if r["attack"] == attack]
            out.append({"Dataset": dataset, "Model": model, "Detector": detector_title(detector),
                        "Backdoored by": titles[attack], **_model_row(rs, members)})
    return pd.DataFrame(out) if out else None


LEGENDS = {
    "input": ("Clean test set = negatives, triggered test set = positives. AUROC of the detector's scores; TPR and FPR "
              "at the detector's own threshold (set on the defender's clean data only); Residual ASR: triggered "
              "inputs that pass the detector and are predicted as the target; ASR (no detector): the model's own; "
              "Clean lost: clean inputs flagged (refused). Percent, mean over seeds ± the half-width of the "
              f"{INTERVAL_KIND}; Time: the detector's calibration and scoring, seconds."),
    "data": ("Scored against the true poison mask of the training set. clean (reference) rows: the benign "
             "condition, nothing poisoned, so every flag is a false positive. Percent, mean over seeds ± the "
             f"half-width of the {INTERVAL_KIND}; Flagged: samples; Time: the detector's run, seconds."),
    "model": ("Negatives: the clean reference models; positives: the backdoored models (every attack, ratio and "
              "seed). AUROC of the detector's score over the population, with the "
              f"{BOOTSTRAP_KIND}; TPR / FPR: the share of backdoored / clean models the detector's own rule flags; "
              "Seconds per model: the median. A backdoored model counts as one whatever its ASR (`inspected` in "
              "records.jsonl holds it); the breakdown's first row keeps only the effective backdoors (ASR at least "
              f"{100 * EFFECTIVE_ASR:g}%)."),
}


def render_detection(records: list[dict], title: str) -> str | None:
    """``detection.md`` (None when the records hold no detection case)."""
    frames = {"input": input_frame(records), "data": data_frame(records), "model": model_frame(records)}
    if all(f is None for f in frames.values()):
        return None
    parts = [f"# Detection: {title}", ""]
    for task, frame in frames.items():
        if frame is None:
            continue
        parts += [f"## {TASK_TITLES[task].capitalize()} detection", "", LEGENDS[task], "",
                  frame.to_markdown(index=False, disable_numparse=True), ""]
        if task == "model":
            breakdown = model_breakdown_frame(records)
            if breakdown is not None:
                parts += ["### By attack family and attack", "",
                          breakdown.to_markdown(index=False, disable_numparse=True), ""]
    failed = [r for r in records if is_detection(r) and r.get("status") != "ok"]
    if failed:
        parts += ["Not applicable: " + "; ".join(f"{r['case_id']} ({r.get('reason')})" for r in failed), ""]
    return "\n".join(parts)


def write_detection(folder: str | Path, records: list[dict]) -> list[Path]:
    """Write ``detection.md`` and one ``detection_<task>.csv`` per task the records hold (none without
    detection cases)."""
    folder = Path(folder)
    text = render_detection(records, folder.name)
    if text is None:
        return []
    written = [folder / "detection.md"]
    atomic_write(written[0], text + "\n")
    frames = {"input": input_frame(records), "data": data_frame(records), "model": model_frame(records),
              "model_breakdown": model_breakdown_frame(records)}
    for task, frame in frames.items():
        if frame is not None:
            written.append(folder / f"detection_{task}.csv")
            atomic_write(written[-1], frame.to_csv(index=False))
    return written
