"""``leaderboard.html``: the leaderboard as one self-contained static page (no scripts, no external files).

The paper's full-result layout (one row per dataset x model x ratio x attack, one column group per defense with
C-Acc, ASR, R-Acc) under grouped defense headers; each ASR cell is shaded from white (0%) to red (100%); cells
give the mean over seeds and, with several seeds, the half-width of the 95% Student-t interval
(``backdoor.harness.report.leaderboard.cell_summaries``). Everything of ``leaderboard.md`` follows, its tables and notes converted
as they are (the † and ‡ marks, the defenses' time columns, the target-class, benign, poison-detection and
defense-details tables), so the page never says less than the markdown; the figures written by ``backdoor
plot`` are embedded as base64 PNG.
"""
from __future__ import annotations

import base64
import datetime as dt
import html
import os
from pathlib import Path

from backdoor.harness.records import read_records
from backdoor.harness.report.detection import render_detection
from backdoor.harness.report.figure_index import FIGURES, figure_entries
from backdoor.harness.report.leaderboard import (DER_TITLE, METRIC_TITLES, attack_order, attack_titles,
                                                 cell_summaries, defense_order, defense_title, render_markdown)
from backdoor.stats import INTERVAL_KIND

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; margin: 24px;
       color: #1a1a1a; font-size: 13px; }
h1 { font-size: 22px; margin: 0 0 6px; } h2 { font-size: 18px; margin: 28px 0 8px; }
p.legend { max-width: 1100px; color: #333; }
.wrap { overflow-x: auto; border: 1px solid #ccc; max-height: 80vh; }
table { border-collapse: separate; border-spacing: 0; font-variant-numeric: tabular-nums; }
th, td { padding: 3px 6px; border-bottom: 1px solid #e2e2e2; white-space: nowrap; text-align: right; }
thead { position: sticky; top: 0; z-index: 4; }
thead th { background: #f3f4f6; text-align: center; }
thead tr:first-child th { border-bottom: 1px solid #bbb; }
thead tr:nth-child(2) th { font-weight: 600; font-size: 12px; }
th.group { border-left: 2px solid #888; }
td.first, th.first { border-left: 2px solid #888; }
td.key { text-align: left; background: #fff; }
td.key.sticky, th.sticky { position: sticky; left: 0; z-index: 3; }
th.sticky { z-index: 5; }
tbody tr:hover td { outline: 1px solid #999; }
td.na { color: #888; text-align: center; }
td small { color: #555; }
figure { margin: 16px 0 28px; } figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { font-weight: 600; margin-bottom: 6px; }
"""


def _cell(summary, attrs: str = "") -> str:
    """One metric's ``<td>``: the mean in percent, with the interval's half-width when n > 1 (its clipped ends
    in the tooltip); ``attrs`` are extra attributes (class, shading)."""
    if summary is None:
        return f"<td{attrs}>-</td>"
    if summary.n > 1 and summary.half_width is not None:
        tip = f' title="95% interval {100 * summary.low:.2f} to {100 * summary.high:.2f} (n = {summary.n})"'
        return f"<td{attrs}{tip}>{100 * summary.mean:.2f} <small>± {100 * summary.half_width:.2f}</small></td>"
    return f"<td{attrs}>{100 * summary.mean:.2f}</td>"


def _shade(asr: float | None) -> str:
    """White at ASR 0, saturated red at ASR 1 (text stays dark enough to read on it)."""
    if asr is None:
        return ""
    a = max(0.0, min(1.0, asr))
    g = round(255 - 155 * a)
    return f' style="background: rgb(255,{g},{g})"'


def _rows(records: list[dict]) -> list[tuple]:
    keys = {(r["dataset"], r["model"], r["poison_ratio"], r["attack"]) for r in records}
    rank = {a: i for i, a in enumerate(attack_order())}
    return sorted(keys, key=lambda k: (k[0], k[1], k[2], rank.get(k[3], len(rank)), k[3]))


def table_html(records: list[dict]) -> str:
    """The leaderboard table: two header rows (defense groups, metrics), one body row per model and attack."""
    cells = cell_summaries(records)
    titles = attack_titles(records)
    rank = {d: i for i, d in enumerate(defense_order())}
    defenses = sorted({r["defense"] for r in records}, key=lambda d: (rank.get(d, len(rank)), d))
    columns = {**METRIC_TITLES, "der": DER_TITLE}
    metrics_of = {d: [m for m in columns if m != "der" or d != "none"] for d in defenses}  # DER: defenses only
    head1 = ['<th rowspan="2" class="sticky">Attack</th>', '<th rowspan="2">Dataset</th>', '<th rowspan="2">Model</th>',
             '<th rowspan="2">Ratio</th>']
    head1 += [f'<th colspan="{len(metrics_of[d]) + 1}" class="group">{html.escape(defense_title(d))}</th>'
              for d in defenses]
    head2 = []
    for d in defenses:
        head2 += [f'<th class="{"first" if i == 0 else ""}">{columns[m]}</th>' for i, m in enumerate(metrics_of[d])]
        head2.append('<th title="seeds">n</th>')
    body = []
    for dataset, model, ratio, attack in _rows(records):
        tds = [f'<td class="key sticky">{html.escape(titles[attack])}</td>',
               f'<td class="key">{html.escape(dataset)}</td>', f'<td class="key">{html.escape(model)}</td>',
               f'<td>{"-" if attack == "clean" else f"{ratio:g}"}</td>']
        for d in defenses:
            cell, metrics = cells.get((dataset, model, ratio, attack, d)), metrics_of[d]
            if cell is None:
                tds += ['<td class="first na">·</td>'] + ['<td class="na">·</td>'] * len(metrics)
            elif cell["status"] == "n/a":
                tds += [f'<td class="first na" colspan="{len(metrics)}">n/a</td>', f'<td>{cell["n"]}</td>']
            else:
                for i, m in enumerate(metrics):
                    cls = ' class="first"' if i == 0 else ""
                    shade = _shade(cell["asr"].mean) if m == "asr" and cell["asr"] is not None else ""
                    tds.append(_cell(cell[m], cls + shade))
                tds.append(f'<td>{cell["n"]}</td>')
        body.append("<tr>" + "".join(tds) + "</tr>")
    return ('<div class="wrap"><table><thead><tr>' + "".join(head1) + "</tr><tr>" + "".join(head2) +
            "</tr></thead><tbody>" + "\n".join(body) + "</tbody></table></div>")


def markdown_html(markdown: str) -> str:
    """``render_markdown``'s text as HTML: its ``#`` headings, pipe tables and paragraphs, each cell and line
    escaped as written (the markdown holds no other markup)."""
    parts, table = [], []
    for line in markdown.splitlines() + [""]:
        if line.startswith("|"):
            table.append(line)
            continue
        if table:
            parts.append(_pipe_table_html(table))
            table = []
        if line.startswith("#"):
            level = min(len(line) - len(line.lstrip("#")) + 1, 3)
            parts.append(f"<h{level}>{html.escape(line.lstrip('#').strip())}</h{level}>")
        elif line.strip():
            parts.append(f'<p class="legend">{html.escape(line)}</p>')
    return "\n".join(parts)


def _pipe_table_html(lines: list[str]) -> str:
    """A pipe table (header, ``|:---|`` rule, rows) as an HTML table."""
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in lines]
    head, body = rows[0], [r for r in rows[2:]]
    return ('<div class="wrap"><table><thead><tr>' + "".join(f"<th>{html.escape(c)}</th>" for c in head)
            + "</tr></thead><tbody>" + "\n".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row)
                                                + "</tr>" for row in body) + "</tbody></table></div>")


def figures_html(folder: Path) -> str:
    """Each figure's PNG, base64-embedded, with its title."""
    parts = []
    for entry in figure_entries(folder):
        png = next((f for f in entry["files"] if f.endswith(".png")), None)
        if png is None:
            continue
        data = base64.b64encode((folder / FIGURES / png).read_bytes()).decode()
        parts.append(f'<figure><figcaption>{html.escape(entry["title"])}</figcaption>'
                     f'<img alt="{html.escape(entry["title"])}" src="data:image/png;base64,{data}"></figure>')
    return "\n".join(parts)


def render_html(folder: str | Path) -> str:
    """The whole page for a results folder."""
    folder = Path(folder)
    records = read_records(folder)
    seeds = sorted({r["seed"] for r in records})
    figures = figures_html(folder)
    markdown = markdown_html(render_markdown(records, folder.name).split("\n", 1)[1])  # its title is the page's
    detection = render_detection(records, folder.name)
    if detection is not None:
        markdown += "<h2>detection.md</h2>" + markdown_html(detection.split("\n", 1)[1])
    legend = (f"C-Acc, ASR and R-Acc in percent: the mean over seeds, ± the half-width of its {INTERVAL_KIND} "
              f"when there are several seeds; n: seeds with a result; n/a: the defense does not apply. ASR cells "
              f"are shaded from white (0%) to red (100%). {len(records)} records, seeds {', '.join(map(str, seeds))}.")
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>Leaderboard: {html.escape(folder.name)}'
            f'</title><style>{CSS}</style></head><body><h1>Leaderboard: {html.escape(folder.name)}</h1>'
            f'<p class="legend">{html.escape(legend)} Rendered {stamp} from records.jsonl.</p>{table_html(records)}'
            + "<h2>leaderboard.md</h2>" + markdown + (f"<h2>Figures</h2>{figures}" if figures else "")
            + "</body></html>\n")


def write_html(folder: str | Path) -> Path:
    """Write ``folder/leaderboard.html``."""
    path = Path(folder) / "leaderboard.html"
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(render_html(folder))
    os.replace(tmp, path)  # readers never see a half-written page
    return path
