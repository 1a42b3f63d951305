"""The paper's result figures, rendered from ``records.jsonl`` alone (``backdoor plot RESULTS_DIR``).

- Figure 2 (paper section 4.1): per dataset x model x poison ratio, C-Acc against ASR and R-Acc against ASR for
  every attack-defense pair (means over seeds; up to 90 points, so no error bars, as in the paper); attacks
  told apart by marker, defenses by colour; the ASR + R-Acc = 1 anti-diagonal drawn (R-Acc <= 1 - ASR always).
  A third panel gives each pair's DER (defense effectiveness rate, mean over seeds, in percent) as a grid of
  attacks by defenses, coloured from red (0: accuracy lost, backdoor kept) through yellow (50: no change) to
  green (100: backdoor removed at no accuracy); a pair without a DER is left blank.
- Figure 3 (section 4.2): per dataset x model, ASR against poison ratio, one panel per defense, one line per
  attack, with 95% t-interval error bars over seeds where there are several.
- Figure 5 (section 4.4): per dataset x poison ratio, when the records hold several models: ASR per attack,
  one bar per model, one panel per defense.

Cells are the per-seed means of ``backdoor.harness.report.leaderboard.cell_summaries``. Each figure is written
as PNG and SVG under ``RESULTS_DIR/figures/``, with ``figures.json`` listing them (``figure_index``).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from backdoor.detectors import DETECTORS
from backdoor.detectors.base import TASK_TITLES
from backdoor.metrics import auroc, roc_points
from backdoor.harness.report.detection import is_detection

from backdoor.harness.records import read_records
from backdoor.harness.report.figure_index import FIGURES, MANIFEST
from backdoor.harness.report.leaderboard import attack_order, attack_title, cell_summaries, defense_order, defense_title

MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*", "h", "<", ">", "p"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 10, "axes.titlesize": 11, "axes.labelsize": 10, "legend.fontsize": 9,
                         "svg.fonttype": "none"})
    return plt


def _order(values, preferred):
    rank = {v: i for i, v in enumerate(preferred)}
    return sorted(set(values), key=lambda v: (rank.get(v, len(rank)), str(v)))


def _defense_colours(defenses: list[str]) -> dict[str, tuple]:
    plt = _pyplot()
    cmap = plt.get_cmap("tab10" if len(defenses) <= 10 else "tab20")
    return {d: cmap(i % cmap.N) for i, d in enumerate(defenses)}


def _ok_cells(records: list[dict]) -> dict[tuple, dict]:
    """Cells with a result (status ok) of attacked models (the clean reference has no ASR)."""
    return {k: v for k, v in cell_summaries(records).items()
            if v["status"] == "ok" and k[3] != "clean" and v["asr"] is not None}


def _err(summary) -> tuple[float, float]:
    """(below, above) the mean of the 95% t-interval clipped to [0, 100%]; zero without an interval (n = 1)."""
    if summary is None or summary.low is None:
        return 0.0, 0.0
    return 100 * (summary.mean - summary.low), 100 * (summary.high - summary.mean)


def _errs(summaries: list) -> np.ndarray:
    """Matplotlib's asymmetric error array [2, n]."""
    return np.array([_err(s) for s in summaries]).T.reshape(2, -1)


def _save(fig, folder: Path, stem: str) -> list[Path]:
    plt = _pyplot()
    paths = [folder / f"{stem}.png", folder / f"{stem}.svg"]
    fig.savefig(paths[0], dpi=150, bbox_inches="tight")
    fig.savefig(paths[1], bbox_inches="tight")
    plt.close(fig)
    return paths


def der_grid(cells: dict, attacks: list[str], defenses: list[str]) -> np.ndarray:
    """DER in percent (mean over seeds) per attack (row) and defense (column); NaN where a pair has none."""
    grid = np.full((len(attacks), len(defenses)), np.nan)
    for (*_, attack, defense), cell in cells.items():
        if attack in attacks and defense in defenses and cell.get("der") is not None:
            grid[attacks.index(attack), defenses.index(defense)] = 100 * cell["der"].mean
    return grid


def _der_panel(ax, mine: dict, attacks: list[str], defenses: list[str]) -> None:
    """Figure 2's DER panel: attacks by defenses (no defense left out: it has no DER), the value in each cell."""
    defended = [d for d in defenses if d != "none"]
    ax.set_title("DER (%): 50 = no change, 100 = backdoor removed")
    if not defended:
        ax.text(0.5, 0.5, "no defense in these records", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return
    grid = der_grid(mine, attacks, defended)
    ax.imshow(np.ma.masked_invalid(grid), cmap="RdYlGn", vmin=0, vmax=100, aspect="auto")
    for (i, j), value in np.ndenumerate(grid):
        if not np.isnan(value):
            ax.text(j, i, f"{value:.1f}", ha="center", va="center", fontsize=9)
    ax.set_xticks(range(len(defended)), [defense_title(d) for d in defended], rotation=35, ha="right")
    ax.set_yticks(range(len(attacks)), [attack_title(a) for a in attacks])


def figure2(cells: dict, dataset: str, model: str, ratio: float):
    """C-Acc vs ASR and R-Acc vs ASR of every attack-defense pair of one dataset x model x ratio, and each pair's
    DER."""
    plt = _pyplot()
    mine = {k: v for k, v in cells.items() if k[:3] == (dataset, model, ratio)}
    attacks = _order([k[3] for k in mine], attack_order())
    defenses = _order([k[4] for k in mine], defense_order())
    colours = _defense_colours(defenses)
    fig, axes = plt.subplots(1, 3, figsize=(18.5, 5.4), gridspec_kw={"width_ratios": [1, 1, 0.85]})
    for (_, _, _, attack, defense), cell in sorted(mine.items(), key=lambda kv: (attacks.index(kv[0][3]),
                                                                                defenses.index(kv[0][4]))):
        marker = MARKERS[attacks.index(attack) % len(MARKERS)]
        for ax, metric in zip(axes[:2], ("c_acc", "r_acc")):
            if cell[metric] is None:
                continue
            ax.plot(100 * cell["asr"].mean, 100 * cell[metric].mean, marker, color=colours[defense], markersize=8,
                    markeredgecolor="black", markeredgewidth=0.5, alpha=0.9)
    axes[1].plot([0, 100], [100, 0], "--", color="grey", linewidth=1, label="ASR + R-Acc = 100%")
    for ax, label in zip(axes[:2], ("C-Acc (%)", "R-Acc (%)")):
        ax.set_xlabel("ASR (%)")
        ax.set_ylabel(label)
        ax.set_xlim(-3, 103)
        ax.set_ylim(-3, 103)
        ax.grid(alpha=0.3)
    axes[0].set_title("C-Acc against ASR (defender wants top-left)")
    axes[1].set_title("R-Acc against ASR (on the dashed line: every sample recovered)")
    _der_panel(axes[2], mine, attacks, defenses)
    attack_handles = [plt.Line2D([], [], linestyle="", marker=MARKERS[i % len(MARKERS)], color="white",
                                 markeredgecolor="black", markersize=8, label=attack_title(a))
                      for i, a in enumerate(attacks)]
    defense_handles = [plt.Line2D([], [], linestyle="", marker="s", color=colours[d], markersize=9,
                                  label=defense_title(d)) for d in defenses]
    first = fig.legend(handles=attack_handles, title="attack (marker)", loc="upper left", bbox_to_anchor=(0.995, 0.93))
    fig.legend(handles=defense_handles + [plt.Line2D([], [], linestyle="--", color="grey", label="ASR + R-Acc = 100%")],
               title="defense (colour)", loc="upper left", bbox_to_anchor=(0.995, 0.93 - 0.05 * (len(attacks) + 2)))
    fig.add_artist(first)
    seeds = max(c["n"] for c in mine.values())
    note = f" (means over up to {seeds} seeds)" if seeds > 1 else ""
    fig.suptitle(f"Figure 2: attack-defense pairs, {dataset} / {model}, poison ratio {ratio:g}{note}", fontsize=12)
    fig.tight_layout()
    return fig


def figure3(cells: dict, dataset: str, model: str):
    """ASR against poison ratio, one panel per defense, one line per attack (error bars: 95% t-interval)."""
    plt = _pyplot()
    mine = {k: v for k, v in cells.items() if k[:2] == (dataset, model)}
    ratios = sorted({k[2] for k in mine})
    attacks = _order([k[3] for k in mine], attack_order())
    defenses = _order([k[4] for k in mine], defense_order())
    cols = min(5, len(defenses))
    rows = math.ceil(len(defenses) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.3 * cols, 3.0 * rows + 0.9), squeeze=False, sharey=True)
    cmap = plt.get_cmap("tab10")
    for ax, defense in zip(axes.flat, defenses):
        for i, attack in enumerate(attacks):
            points = [(j, mine[(dataset, model, r, attack, defense)]["asr"]) for j, r in enumerate(ratios)
                      if (dataset, model, r, attack, defense) in mine]
            dodge = 0.5 * (i - (len(attacks) - 1) / 2) / max(len(attacks), 1)  # keep error bars apart
            if points:
                ax.errorbar([j + dodge for j, _ in points], [100 * s.mean for _, s in points],
                            yerr=_errs([s for _, s in points]),
                            marker=MARKERS[i % len(MARKERS)], color=cmap(i % 10), capsize=2, linewidth=1.4,
                            markersize=6, label=attack_title(attack))
        ax.set_title(defense_title(defense))
        ax.set_xticks(range(len(ratios)), [f"{100 * r:g}%" for r in ratios])
        ax.set_xlim(-0.5, len(ratios) - 0.5)
        ax.set_ylim(-3, 103)
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(defenses):]:
        ax.set_visible(False)
    for ax in axes[:, 0]:
        ax.set_ylabel("ASR (%)")
    for ax in axes[-1]:
        ax.set_xlabel("poison ratio")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(attacks), 9), bbox_to_anchor=(0.5, -0.01))
    fig.suptitle(f"Figure 3: ASR against poison ratio, {dataset} / {model}", fontsize=12)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    return fig


LEGEND_COLUMNS = 6
#: ten colours (tab10), then the same colours dashed, then dotted: thirty attacks stay apart in one panel
ATTACK_LINESTYLES = ("-", "--", ":")


def roc_figure(records: list[dict], task: str, dataset: str, model: str):
    """ROC curves of each detector of one task, one panel per detector: input-level and data-side, each case's
    curve (from its record's ``detection.roc``) coloured by attack; model-level, the curve over the population
    (clean reference models against backdoored ones), AUROC in the legend."""
    plt = _pyplot()
    rows = [r for r in detection_rows(records, task) if (r["dataset"], r["model"]) == (dataset, model)]
    detectors = _order([r["detector"] for r in rows], DETECTORS.order())
    attacks = _order([r["attack"] for r in rows if r["attack"] != "clean"], attack_order())
    cols = min(4, len(detectors))
    panel_rows = math.ceil(len(detectors) / cols)
    # the attacks' legend goes under the panels, LEGEND_COLUMNS entries a row: room for it in inches
    legend = 0.0 if task == "model" else 0.15 + 0.2 * math.ceil(len(attacks) / LEGEND_COLUMNS)
    height = 3.2 * panel_rows + 0.5 + legend
    fig, axes = plt.subplots(panel_rows, cols, figsize=(3.3 * cols, height), squeeze=False)
    cmap = plt.get_cmap("tab10")
    for ax, detector in zip(axes.flat, detectors):
        mine = [r for r in rows if r["detector"] == detector]
        if task == "model":
            negatives = [r["detection"]["score"] for r in mine if not r["detection"]["backdoored"]]
            positives = [r["detection"]["score"] for r in mine if r["detection"]["backdoored"]]
            curve = roc_points(torch.tensor(positives), torch.tensor(negatives))
            if curve is not None:
                found = auroc(torch.tensor(positives), torch.tensor(negatives))
                ax.plot(curve["fpr"], curve["tpr"], color=cmap(0), linewidth=1.6,
                        label=f"AUROC {100 * found:.1f} ({len(positives)} vs {len(negatives)} models)")
                ax.legend(loc="lower right")
        else:
            for i, attack in enumerate(attacks):
                for j, r in enumerate(r for r in mine if r["attack"] == attack and r["detection"].get("roc")):
                    roc = r["detection"]["roc"]
                    ax.plot(roc["fpr"], roc["tpr"], color=cmap(i % 10), linestyle=ATTACK_LINESTYLES[i // 10 % 3],
                            linewidth=1.2, alpha=0.8, label=attack_title(attack) if j == 0 else None)
        ax.plot([0, 1], [0, 1], color="0.6", linewidth=0.8, linestyle=":")
        ax.set_title(DETECTORS.title(detector))
        ax.set_xlim(-0.02, 1.02)
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("FPR")
        ax.set_ylabel("TPR")
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(detectors):]:
        ax.set_visible(False)
    if task != "model":
        handles, labels = [], []
        for ax in axes.flat:
            for h, label in zip(*ax.get_legend_handles_labels()):
                if label not in labels:
                    handles.append(h)
                    labels.append(label)
        fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), LEGEND_COLUMNS) or 1,
                   bbox_to_anchor=(0.5, 0.0))
    fig.suptitle(f"ROC, {TASK_TITLES[task]} detection, {dataset} / {model}", fontsize=12)
    fig.tight_layout(rect=(0, legend / height, 1, 1))
    return fig


def detection_rows(records: list[dict], task: str) -> list[dict]:
    return [r for r in records if is_detection(r) and r.get("task") == task and r.get("status") == "ok"
            and r.get("detection")]


def figure5(cells: dict, dataset: str, ratio: float):
    """ASR per attack and model architecture, one panel per defense (one dataset x ratio)."""
    plt = _pyplot()
    mine = {k: v for k, v in cells.items() if (k[0], k[2]) == (dataset, ratio)}
    models = sorted({k[1] for k in mine})
    attacks = _order([k[3] for k in mine], attack_order())
    defenses = _order([k[4] for k in mine], defense_order())
    cols = min(3, len(defenses))
    rows = math.ceil(len(defenses) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(max(4.5, 0.55 * len(attacks) * len(models) + 1.5) * cols,
                                                  3.2 * rows + 0.9), squeeze=False, sharey=True)
    cmap = plt.get_cmap("tab10")
    width = 0.8 / len(models)
    for ax, defense in zip(axes.flat, defenses):
        for m, model in enumerate(models):
            xs, ys, es = [], [], []  # es: the cells' summaries
            for a, attack in enumerate(attacks):
                cell = mine.get((dataset, model, ratio, attack, defense))
                if cell is not None:
                    xs.append(a - 0.4 + width * (m + 0.5)), ys.append(100 * cell["asr"].mean), es.append(cell["asr"])
            ax.bar(xs, ys, width=width, yerr=_errs(es), color=cmap(m % 10), capsize=2, label=model)
        ax.set_title(defense_title(defense))
        ax.set_xticks(range(len(attacks)), [attack_title(a) for a in attacks], rotation=35, ha="right")
        ax.set_ylim(0, 103)
        ax.grid(alpha=0.3, axis="y")
    for ax in axes.flat[len(defenses):]:
        ax.set_visible(False)
    for ax in axes[:, 0]:
        ax.set_ylabel("ASR (%)")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, title="model", loc="lower center", ncol=len(models), bbox_to_anchor=(0.5, -0.01))
    fig.suptitle(f"Figure 5: ASR by model architecture, {dataset}, poison ratio {ratio:g}", fontsize=12)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    return fig


def write_figures(folder: str | Path) -> tuple[list[Path], list[str]]:
    """Write every figure the records allow under ``folder/figures`` and its ``figures.json``; returns the
    paths written and the reasons for figures skipped."""
    folder = Path(folder)
    records = read_records(folder)
    cells = _ok_cells(records)
    if not cells:
        raise ValueError(f"{folder}: no finished attacked case (status ok) to plot")
    out = folder / FIGURES
    out.mkdir(exist_ok=True)
    entries, skipped = [], []
    for dataset, model, ratio in sorted({k[:3] for k in cells}):
        stem = f"fig2_{dataset}_{model}_p{ratio:g}"
        title = f"Figure 2: C-Acc / R-Acc against ASR and DER, {dataset} / {model}, ratio {ratio:g}"
        entries.append({"figure": 2, "stem": stem, "title": title,
                        "files": [p.name for p in _save(figure2(cells, dataset, model, ratio), out, stem)]})
    for dataset, model in sorted({k[:2] for k in cells}):
        stem = f"fig3_{dataset}_{model}"
        entries.append({"figure": 3, "stem": stem, "title": f"Figure 3: ASR against poison ratio, {dataset} / {model}",
                        "files": [p.name for p in _save(figure3(cells, dataset, model), out, stem)]})
    for dataset, ratio in sorted({(k[0], k[2]) for k in cells}):
        models = sorted({k[1] for k in cells if (k[0], k[2]) == (dataset, ratio)})
        if len(models) < 2:
            skipped.append(f"Figure 5 for {dataset}, ratio {ratio:g}: one model ({models[0]}), nothing to compare")
            continue
        stem = f"fig5_{dataset}_p{ratio:g}"
        entries.append({"figure": 5, "stem": stem, "title": f"Figure 5: ASR by model, {dataset}, ratio {ratio:g}",
                        "files": [p.name for p in _save(figure5(cells, dataset, ratio), out, stem)]})
    for task in TASK_TITLES:
        for dataset, model in sorted({(r["dataset"], r["model"]) for r in detection_rows(records, task)}):
            stem = f"roc_{task}_{dataset}_{model}"
            entries.append({"figure": "roc", "stem": stem, "title": f"ROC, {TASK_TITLES[task]} detection, {dataset} / {model}",
                            "files": [p.name for p in _save(roc_figure(records, task, dataset, model), out, stem)]})
    (out / MANIFEST).write_text(json.dumps({"figures": entries, "skipped": skipped}, indent=1) + "\n")
    return [out / f for e in entries for f in e["files"]], skipped
