"""``leaderboard.html`` carries everything ``leaderboard.md`` does: every table cell and every note."""
import html
import json
from pathlib import Path

from backdoor.harness.report.html import render_html
from backdoor.harness.records import upsert_records
from backdoor.harness.report.leaderboard import render_markdown

FIXTURE = Path(__file__).parent / "data" / "records.jsonl"


def record(defense, c_acc, asr, target_acc, seed=0, **fields):
    return {"case_id": f"d-m-badnets-p0.1-s{seed}-{defense}", "dataset": "d", "model": "m", "attack": "badnets",
            "defense": defense, "poison_ratio": 0.1, "seed": seed, "status": "ok", "c_acc": c_acc, "asr": asr,
            "r_acc": 1 - asr, "target_base_rate": 0.01, "target_acc": target_acc, "reason": None,
            "detection": None, "defense_info": {}, **fields}


def records_with_every_section() -> list[dict]:
    """The fixture's records (detection, details, n/a, seeds) and a grid whose defenses are timed, one marked
    † (target erased), one ‡ (data-side against a training-controllable attack), with target-class figures."""
    rows = [json.loads(line) for line in FIXTURE.read_text().splitlines()]
    rows += [record("none", 0.99, 0.99, 0.99), record("ft", 0.97, 0.2, 0.95, build_seconds={"defense": 12.5}),
             record("abl", 0.9, 0.0, 0.0, build_seconds={"defense": 80.0},
                    defense_info={"isolated": 123, "rule": "loss"}),
             {**record("ac", 0.95, 0.33, 0.9, build_seconds={"defense": 3.25}), "attack": "wanet",
              "case_id": "d-m-wanet-p0.1-s0-ac", "attack_kind": "training_controllable", "defense_kind": "data_side"},
             {**record("none", 0.95, 0.11, 0.9), "attack": "wanet", "case_id": "d-m-wanet-p0.1-s0-none",
              "attack_kind": "training_controllable", "defense_kind": "none"}]
    return rows


def markdown_values(markdown: str) -> list[str]:
    """Every table cell and every other line of the markdown but its title."""
    values = []
    for line in markdown.splitlines()[1:]:
        if line.startswith("|"):
            if not set(line) <= set("|:- "):
                values += [c.strip() for c in line.strip().strip("|").split("|") if c.strip()]
        elif line.strip():
            values.append(line.lstrip("#").strip())
    return values


def test_the_page_carries_every_value_of_the_markdown(tmp_path):
    upsert_records(tmp_path, records_with_every_section())
    markdown = render_markdown(records_with_every_section(), tmp_path.name)
    for needed in ("†", "‡", "Time (s)", "## Target class", "## Defense details", "## Poison detection"):
        assert needed in markdown  # the records exercise every section
    page = render_html(tmp_path)
    missing = [v for v in markdown_values(markdown) if html.escape(v) not in page]
    assert missing == []
    assert page.count("<table>") >= markdown.count("\n|:") + 1  # each markdown table, and the shaded one
