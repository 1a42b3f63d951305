"""Where ``backdoor plot`` puts its figures (``<results>/figures/`` and its manifest ``figures.json``) and the
figures a results folder holds, as the leaderboard and the html page link them. Apart from ``figures.py`` so
that the leaderboard links figures without importing the module that draws them (which reads its tables)."""
from __future__ import annotations

import json
from pathlib import Path

FIGURES = "figures"
MANIFEST = "figures.json"


def figure_entries(folder: str | Path) -> list[dict]:
    """The figures ``write_figures`` listed for ``folder`` (empty when none were written)."""
    manifest = Path(folder) / FIGURES / MANIFEST
    if not manifest.is_file():
        return []
    return [e for e in json.loads(manifest.read_text())["figures"]
            if all((Path(folder) / FIGURES / f).is_file() for f in e["files"])]


def figure_links(folder: str | Path) -> list[str]:
    """Markdown lines of a "Figures" section linking the figures under ``folder/figures`` (relative links, as
    ``leaderboard.md`` sits in ``folder``); no lines when there are no figures."""
    entries = figure_entries(folder)
    if not entries:
        return []
    lines = ["## Figures", "",
             "Rendered by `backdoor plot` from records.jsonl; the page `leaderboard.html` embeds them.", ""]
    for e in entries:
        links = " · ".join(f"[{Path(f).suffix[1:].upper()}]({FIGURES}/{f})" for f in e["files"])
        lines.append(f"- {e['title']}: {links}")
    return lines
