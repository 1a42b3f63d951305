"""The benign condition (matrix option ``benign``): the defenses also run on the clean reference model; records
say what they cost and what they flag when nothing is poisoned; the leaderboard shows each defense's time."""
import dataclasses
from pathlib import Path

import pytest

from backdoor.harness.cache import ArtifactCache
from backdoor.harness.matrix import MatrixError, load_matrix
from backdoor.harness.runner import Runner
from backdoor.harness.report.leaderboard import leaderboard_frame, render_markdown

ROOT = Path(__file__).resolve().parent.parent
MATRIX = """
name: benign
datasets: [digits]
models: [cnn_small]
attacks: [badnets]
defenses:
  none: {}
  ft: {}
  nc: {epochs: 3, batch_size: 64, early_stop_patience: 2}
  spectral: {}
poison_ratios: [0.1]
seeds: [0]
training: {epochs: 2, batch_size: 64, lr: 0.05}
defense_training: {epochs: 1, batch_size: 64, clean_fraction: 0.05}
"""


pytestmark = pytest.mark.usefixtures("one_thread")


def write(tmp_path: Path, extra: str = "", name: str = "m.yaml") -> Path:
    path = tmp_path / name
    path.write_text(MATRIX + extra)
    return path


def test_benign_adds_the_defenses_on_the_clean_model_and_nothing_else(tmp_path):
    plain = load_matrix(write(tmp_path)).cases()
    off = load_matrix(write(tmp_path, "benign: false\n", "off.yaml")).cases()
    assert [c.case_id for c in off] == [c.case_id for c in plain]
    on = load_matrix(write(tmp_path, "benign: true\n", "on.yaml")).cases()
    added = [c.case_id for c in on if c.case_id not in {p.case_id for p in plain}]
    assert added == ["digits-cnn_small-clean-s0-ft", "digits-cnn_small-clean-s0-nc", "digits-cnn_small-clean-s0-spectral"]
    unhashed = lambda cases: [dataclasses.replace(c, matrix_hash="") for c in cases]  # noqa: E731
    assert unhashed(c for c in on if c.case_id not in added) == unhashed(plain)  # every other case is the same
    some = load_matrix(write(tmp_path, "benign: [sp*, nc]\n", "some.yaml")).cases()
    assert [c.case_id for c in some if c.attack == "clean"][1:] == ["digits-cnn_small-clean-s0-spectral",
                                                                    "digits-cnn_small-clean-s0-nc"]


@pytest.mark.parametrize("name", ["smoke.yaml", "quick.yaml", "cifar10.yaml"])
def test_shipped_matrices_have_no_benign_cases(name):
    cases = load_matrix(ROOT / "matrices" / name, check_data=False).cases()
    assert not [c for c in cases if c.attack == "clean" and c.defense != "none" and not c.detector]


@pytest.mark.parametrize("extra, message", [
    ("benign: [ac]\n", r"benign: 'ac' names none of the matrix's defenses"),
    ("benign: 1\n", r"benign: 1 is not allowed; expected true, false or a list"),
    ("benign: true\nreference: false\n", r"benign: needs the clean reference model"),
])
def test_benign_is_validated(tmp_path, extra, message):
    with pytest.raises(MatrixError, match=message):
        load_matrix(write(tmp_path, extra))


def test_benign_records_cost_false_positives_and_time(tmp_path):
    matrix = load_matrix(write(tmp_path, "benign: true\n"))
    runner = Runner(ArtifactCache(tmp_path / "cache"))
    records = {c.case_id: runner.run(c) for c in matrix.cases()}
    clean = records["digits-cnn_small-clean-s0-none"]
    assert "benign" not in clean and "benign" not in records["digits-cnn_small-badnets-p0.1-s0-ft"]
    for defense in ("ft", "nc", "spectral"):
        r = records[f"digits-cnn_small-clean-s0-{defense}"]
        assert r["status"] == "ok" and r["undefended"]["c_acc"] == clean["c_acc"]  # the same clean model
        assert r["benign"]["c_acc_cost"] == clean["c_acc"] - r["c_acc"]
        assert r["asr"] is None and r["stage_seconds"]["defense"] > 0
    spectral = records["digits-cnn_small-clean-s0-spectral"]
    assert spectral["detection"]["tpr"] is None and spectral["detection"]["flagged"] > 0  # every flag is false
    assert spectral["benign"]["fpr"] == spectral["detection"]["flagged"] / 1438 == spectral["detection"]["fpr"]
    assert isinstance(records["digits-cnn_small-clean-s0-nc"]["benign"]["flagged_classes"], list)
    assert records["digits-cnn_small-clean-s0-ft"]["benign"]["flagged"] is None

    rs = list(records.values())
    board = leaderboard_frame(rs)
    row = board[board[("", "Attack")] == "clean (reference)"].iloc[0]
    assert row[("FT", "C-Acc")] == f"{100 * records['digits-cnn_small-clean-s0-ft']['c_acc']:.2f}"
    assert float(row[("Spectral", "Time (s)")]) > 0
    md = render_markdown(rs, "benign")
    assert "## Benign condition" in md and "samples (FPR " in md


NEWER = """
name: benign-newer
datasets: [digits]
models: [cnn_small]
attacks: [badnets]
poison_ratios: [0.1]
defenses:
  none: {}
  ftsam: {epochs: 1}
  clp: {}
  rnp: {unlearning_epochs: 1, recovering_epochs: 1}
  ibau: {rounds: 1}
  sau: {epochs: 1}
  npd: {epochs: 1, warm_epochs: 1}
seeds: [0]
benign: true
training: {epochs: 2, batch_size: 64, lr: 0.05}
defense_training: {epochs: 1, batch_size: 64, clean_fraction: 0.05}
"""


def test_the_newer_defenses_run_on_the_clean_model_with_their_cost_and_time(tmp_path):
    path = tmp_path / "newer.yaml"
    path.write_text(NEWER)
    matrix = load_matrix(path)
    runner = Runner(ArtifactCache(tmp_path / "cache"))
    records = {c.defense: runner.run(c) for c in matrix.cases() if c.attack == "clean"}
    assert sorted(records) == sorted(["none", "ftsam", "clp", "rnp", "ibau", "sau", "npd"])
    for defense, r in records.items():
        if defense == "none":
            continue
        assert r["status"] == "ok" and r["asr"] is None, defense
        assert r["undefended"]["c_acc"] == records["none"]["c_acc"]  # the same clean model, defended
        assert r["benign"]["c_acc_cost"] == records["none"]["c_acc"] - r["c_acc"]
        assert r["stage_seconds"]["defense"] >= 0 and "defense" in r["stage_seconds"], defense
    board = leaderboard_frame(list(records.values()))
    row = board[board[("", "Attack")] == "clean (reference)"].iloc[0]
    for title in ("FT-SAM", "CLP", "RNP", "I-BAU", "SAU", "NPD"):
        assert row[(title, "C-Acc")] and row[(title, "Time (s)")] != "", title
