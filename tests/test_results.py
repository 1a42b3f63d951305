"""Leaderboard rendering from a fixture records file, and record upserts."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

from backdoor.harness.records import read_records, upsert_records
from backdoor.harness.report.leaderboard import leaderboard_frame, render_markdown, write_leaderboard

FIXTURE = Path(__file__).parent / "data" / "records.jsonl"


def test_leaderboard_layout_follows_the_paper():
    board = leaderboard_frame(read_records(FIXTURE.parent))
    groups = list(dict.fromkeys(a for a, _ in board.columns if a))
    assert groups == ["No defense", "FT", "ANP", "AC"], "No defense first, then paper order"
    assert [b for a, b in board.columns if a == "FT"] == ["C-Acc", "ASR", "R-Acc", "DER", "n", "Time (s)"]
    assert [b for a, b in board.columns if a == "No defense"] == ["C-Acc", "ASR", "R-Acc", "n"]  # no DER, nothing to time
    rows = board[("", "Attack")].tolist()
    assert rows == ["clean (reference)", "BadNets", "BadNets", "Blended"]
    badnets = board[(board[("", "Attack")] == "BadNets") & (board[("", "Ratio")] == "0.1")].iloc[0]
    # seeds 0.97 / 0.99: mean 98.00, t(0.975, 1) * s / sqrt(2) = 12.706 * 0.01 = 12.71 points
    assert badnets[("No defense", "C-Acc")] == "98.00 ± 12.71" and badnets[("No defense", "n")] == 2
    assert badnets[("No defense", "ASR")].startswith("96.00 ± ")
    assert badnets[("FT", "ASR")] == "10.00" and badnets[("FT", "R-Acc")] == "85.00" and badnets[("FT", "n")] == 1
    assert badnets[("ANP", "C-Acc")] == "n/a"
    clean = board[board[("", "Attack")] == "clean (reference)"].iloc[0]
    assert clean[("No defense", "C-Acc")] == "99.00" and clean[("No defense", "ASR")] == "-"


def test_rows_are_ordered_by_ratio_then_paper_attack_order():
    board = leaderboard_frame(read_records(FIXTURE.parent))
    keys = list(zip(board[("", "Ratio")], board[("", "Attack")]))
    assert keys == [("-", "clean (reference)"), ("0.05", "BadNets"), ("0.1", "BadNets"), ("0.1", "Blended")]


def test_markdown_has_detection_and_details_tables():
    md = render_markdown(read_records(FIXTURE.parent), "fixture")
    header = next(line for line in md.splitlines() if line.startswith("| Dataset"))
    assert [c.strip() for c in header.strip("|").split("|")][:7] == [
        "Dataset", "Model", "Ratio", "Attack", "No defense C-Acc", "No defense ASR", "No defense R-Acc"]
    assert "## Poison detection" in md and "| AC " in md and "90.00" in md
    assert "not applicable=no batch-norm layers" in md


def test_cli_rerenders_from_records_alone(tmp_path):
    shutil.copy(FIXTURE, tmp_path / "records.jsonl")
    done = subprocess.run([sys.executable, "-m", "backdoor.harness.cli", "leaderboard", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout == (tmp_path / "leaderboard.md").read_text() + "\n"
    csv = (tmp_path / "leaderboard.csv").read_text().splitlines()
    assert csv[0].startswith("Dataset,Model,Ratio,Attack,No defense C-Acc,No defense C-Acc CI low,"
                             "No defense C-Acc CI high,No defense ASR,")
    assert len(csv) == 5
    header = csv[0].split(",")
    badnets = next(line.split(",") for line in csv if ",0.1,BadNets," in line)
    cell = dict(zip(header, badnets))
    assert cell["No defense C-Acc"] == "98.0" and cell["No defense n"] == "2"
    assert float(cell["No defense C-Acc CI low"]) == 85.29 and float(cell["No defense C-Acc CI high"]) == 100.0
    assert cell["FT C-Acc CI low"] == "" and cell["FT n"] == "1"  # one seed: no interval


def test_upsert_replaces_a_case_and_keeps_the_others(tmp_path):
    shutil.copy(FIXTURE, tmp_path / "records.jsonl")
    before = read_records(tmp_path)
    changed = dict(before[1], c_acc=0.5)
    upsert_records(tmp_path, [changed, dict(before[1], case_id="new-case", attack="wanet")])
    after = {r["case_id"]: r for r in read_records(tmp_path)}
    assert len(after) == len(before) + 1
    assert after[before[1]["case_id"]]["c_acc"] == 0.5
    assert all(after[r["case_id"]] == r for r in before if r["case_id"] != before[1]["case_id"])
    write_leaderboard(tmp_path)
    assert "50.00" in (tmp_path / "leaderboard.md").read_text()


def test_missing_records_is_a_clear_error(tmp_path):
    done = subprocess.run([sys.executable, "-m", "backdoor.harness.cli", "leaderboard", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "no records.jsonl in" in done.stderr


def test_records_are_json_lines_with_floats():
    for line in FIXTURE.read_text().splitlines():
        record = json.loads(line)
        for metric in ("c_acc", "asr", "r_acc"):
            assert record[metric] is None or 0.0 <= record[metric] <= 1.0
