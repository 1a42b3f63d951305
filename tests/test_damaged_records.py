"""Damaged lines in records.jsonl: moved aside, never fatal to a run, never costing a good or a new record."""
import base64
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from backdoor.harness.records import DAMAGED, RecordShapeError, read_records, upsert_records

FIXTURE = Path(__file__).parent / "data" / "records.jsonl"
ROOT = Path(__file__).resolve().parent.parent
HALF_LINE = b'{"asr": 0.5, "attack": "badnets", "c_acc": 0.9'
GARBAGE = bytes(range(256))[::-1].replace(b"\n", b"")  # not UTF-8, no newline
UNREADABLE = [HALF_LINE, GARBAGE, b"[[[[", b"NaNx"]
WRONG_SHAPE = [b"{}", b"[1,2]", b'"a string"', b'{"case_id": "x"}',
               b'{"case_id": "x", "dataset": "d", "model": "m", "attack": "a", "defense": "none", "poison_ratio": 0.1,'
               b' "seed": 0, "status": "ok", "c_acc": 0.9, "asr": 0.1}']  # no r_acc


def damaged_copy(folder: Path, bad: list[bytes]) -> list[dict]:
    """The fixture's records with ``bad`` lines spliced in: one after each record, the rest at the end, and no
    final newline (as an interrupted append leaves it). Returns the good records."""
    good = FIXTURE.read_bytes().splitlines()
    lines = []
    for i, line in enumerate(good):
        lines += [line, *bad[i:i + 1]]
    (folder / "records.jsonl").write_bytes(b"\n".join(lines + bad[len(good):]))
    return [json.loads(line) for line in good]


def side_entries(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / DAMAGED).read_text().splitlines()]


def original_bytes(entry: dict) -> bytes:
    return base64.b64decode(entry["base64"]) if "base64" in entry else entry["text"].encode()


def test_unreadable_lines_are_moved_aside_and_every_good_record_kept(tmp_path, capsys):
    good = damaged_copy(tmp_path, UNREADABLE)
    assert read_records(tmp_path) == good
    moved = side_entries(tmp_path)
    assert sorted(original_bytes(e) for e in moved) == sorted(UNREADABLE), "the side file holds every bad line"
    assert all(e["reason"].startswith("unreadable") and e["line"] > 0 and e["moved_at"] for e in moved)
    warning = capsys.readouterr().err
    assert warning.count("\n") == 1 and "4 damaged line(s) moved to" in warning and DAMAGED in warning
    assert read_records(tmp_path) == good and len(side_entries(tmp_path)) == 4, "the file is clean now"
    assert [json.loads(line) for line in (tmp_path / "records.jsonl").read_text().splitlines()] == good


def test_a_folder_that_cannot_be_written_is_read_around_the_damage(tmp_path, capsys, monkeypatch):
    good = damaged_copy(tmp_path, [HALF_LINE])
    before = (tmp_path / "records.jsonl").read_bytes()

    def read_only(path):
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr("backdoor.harness.records.FileLock", read_only)  # root ignores chmod; this does not
    assert read_records(tmp_path) == good
    assert (tmp_path / "records.jsonl").read_bytes() == before and not (tmp_path / DAMAGED).exists()
    assert "1 damaged line(s) skipped (cannot move them aside: [Errno 13] Permission denied" in capsys.readouterr().err


@pytest.mark.parametrize("line", WRONG_SHAPE, ids=["empty-object", "array", "string", "only-case-id", "no-r_acc"])
def test_wrong_shape_is_one_clear_error_naming_file_and_line(tmp_path, line):
    damaged_copy(tmp_path, [line])
    before = (tmp_path / "records.jsonl").read_bytes()
    with pytest.raises(RecordShapeError) as e:
        read_records(tmp_path)
    message = str(e.value)
    assert message.startswith(f"{tmp_path / 'records.jsonl'}:2: not a record: ") and "\n" not in message
    assert (tmp_path / "records.jsonl").read_bytes() == before, "the reader leaves a wrong-shape line in place"


@pytest.mark.parametrize("record, says", [
    ({"seed": "0"}, "seed must be an integer"), ({"c_acc": 1.5}, "c_acc must be null or a number in [0, 1]"),
    ({"status": "done"}, "status must be one of ok, not_applicable"), ({"poison_ratio": True}, "poison_ratio must"),
    ({"case_id": None}, "case_id must be a string")])
def test_wrong_field_types_are_named(tmp_path, record, says):
    good = json.loads(FIXTURE.read_text().splitlines()[0])
    (tmp_path / "records.jsonl").write_text(json.dumps({**good, **record}) + "\n")
    with pytest.raises(RecordShapeError, match=says.replace("[", r"\[").replace("]", r"\]")):
        read_records(tmp_path)


def test_leaderboard_cli_gives_one_line_for_a_wrong_shape(tmp_path):
    damaged_copy(tmp_path, [b"[1,2]", b"{}"])
    done = subprocess.run([sys.executable, "-m", "backdoor.harness.cli", "leaderboard", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip().splitlines() == [
        f"backdoor leaderboard: {tmp_path / 'records.jsonl'}:2: not a record: a record must be a JSON object, got an "
        f"array (and 1 more: line(s) 4); fix or remove the line (a grid run moves such lines to {DAMAGED})"]


def test_leaderboard_cli_renders_around_unreadable_lines(tmp_path):
    damaged_copy(tmp_path, [HALF_LINE, GARBAGE])
    done = subprocess.run([sys.executable, "-m", "backdoor.harness.cli", "leaderboard", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "2 damaged line(s) moved to" in done.stderr and "| BadNets" in done.stdout
    assert len(side_entries(tmp_path)) == 2


def test_upsert_moves_every_damaged_line_aside_and_stores_the_new_records(tmp_path, capsys):
    good = damaged_copy(tmp_path, UNREADABLE + WRONG_SHAPE)
    new = [dict(good[1], c_acc=0.5), dict(good[1], case_id="new-case", attack="wanet")]
    upsert_records(tmp_path, new)
    after = {r["case_id"]: r for r in read_records(tmp_path)}
    assert after == {**{r["case_id"]: r for r in good}, **{r["case_id"]: r for r in new}}
    moved = side_entries(tmp_path)
    assert sorted(original_bytes(e) for e in moved) == sorted(UNREADABLE + WRONG_SHAPE)
    assert {e["reason"].split(":")[0] for e in moved} == {"unreadable", "shape"}
    assert capsys.readouterr().err.count("damaged line(s)") == 1
    (tmp_path / "records.jsonl").write_bytes((tmp_path / "records.jsonl").read_bytes() + HALF_LINE)
    upsert_records(tmp_path, [dict(good[0], c_acc=0.25)])
    assert len(read_records(tmp_path)) == len(after) and len(side_entries(tmp_path)) == len(moved) + 1
    assert capsys.readouterr().err == "", "warned once per file per process"


def test_upsert_refuses_a_new_record_without_case_id(tmp_path):
    with pytest.raises(TypeError, match="string case_id"):
        upsert_records(tmp_path, [{"c_acc": 0.5}])


MATRIX = """
name: tiny
datasets:
  synthetic: {num_classes: 4, train_size: 160, test_size: 80, image_size: 16}
models: [cnn_small]
attacks: {badnets: {}}
defenses: [none, ft]
poison_ratios: [0.1]
seeds: [0]
training: {epochs: 2, batch_size: 32, lr: 0.05}
defense_training: {epochs: 1, batch_size: 32, clean_fraction: 0.1}
"""


def test_grid_runs_through_a_damaged_records_file(tmp_path):
    matrix = tmp_path / "tiny.yaml"
    matrix.write_text(textwrap.dedent(MATRIX))
    folder = tmp_path / "results" / "tiny"
    folder.mkdir(parents=True)
    shutil.copy(FIXTURE, folder / "records.jsonl")
    with open(folder / "records.jsonl", "ab") as f:
        f.write(b"{}\n[1,2]\n" + GARBAGE + b"\n" + HALF_LINE)
    done = subprocess.run([sys.executable, "-m", "pytest", str(ROOT / "benchmarks"), "--matrix", str(matrix),
                           "--cache-dir", str(tmp_path / "cache"), "--results-dir", str(tmp_path / "results"), "-q",
                           "--other-records", "add"],  # the fixture's records are another matrix's
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "3 passed" in done.stdout
    ids = [r["case_id"] for r in read_records(folder)]
    fixture_ids = [json.loads(line)["case_id"] for line in FIXTURE.read_text().splitlines()]
    assert sorted(ids) == sorted(fixture_ids + ["synthetic-cnn_small-clean-s0-none",
                                                "synthetic-cnn_small-badnets-p0.1-s0-none",
                                                "synthetic-cnn_small-badnets-p0.1-s0-ft"])
    assert len(side_entries(folder)) == 4 and (folder / "leaderboard.md").exists()
