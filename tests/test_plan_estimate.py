"""``backdoor run --plan``'s estimate: a build no record has timed is unknown, never zero; timings come from
the records of any matrix that built the same case with the same budgets."""
import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from backdoor.harness.matrix import load_matrix
from backdoor.harness.eta import eta_seconds
from backdoor.harness.plan import _recorded_seconds, estimate_line, stage_estimates, timing_key, timing_records
from backdoor.harness.records import RECORDS

ROOT = Path(__file__).resolve().parent.parent
MATRIX = """
name: planned
datasets:
  synthetic: {num_classes: 4, train_size: 64, test_size: 32, image_size: 16}
models: [cnn_small]
attacks: {badnets: {}}
defenses: [none, ft]
poison_ratios: [0.1]
seeds: [0]
reference: false
training: {epochs: 1, batch_size: 32}
"""


def test_unknown_is_said_as_unknown():
    assert estimate_line(0.0, 3, 2).startswith("estimate: unknown: no record times any of the 3 build(s)")
    assert "0.0" not in estimate_line(0.0, 3, 2)
    assert estimate_line(120.0, 2, 2) == ("estimate: more than ~2.0 min of builds on one worker, ~60 s with 2 "
                                          "worker(s): 2 build(s) have no recorded timing yet, not counted")
    assert estimate_line(120.0, 0, 1) == "estimate: ~2.0 min of builds on one worker, ~2.0 min with 1 worker(s)"
    assert estimate_line(0.0, 0, 1) == "estimate: nothing to build (every artifact is cached)"


def _record(case, stage_seconds: dict, training: dict) -> dict:
    return {"case_id": case.case_id, "attack": case.attack, "defense": case.defense, "dataset": case.dataset,
            "model": case.model, "training": training, "defense_training": case.defense_training.to_dict(),
            "stage_seconds": stage_seconds, "build_seconds": stage_seconds, "cache_hits": {}}


def test_timings_come_from_other_matrices_records_of_the_same_builds(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text(textwrap.dedent(MATRIX))
    matrix = load_matrix(path)
    ft = next(c for c in matrix.cases() if c.defense == "ft")
    other = tmp_path / "results" / "other"
    other.mkdir(parents=True)
    record = _record(ft, {"backdoor_model": 42.0, "defense": 7.0}, ft.training.to_dict())
    (other / RECORDS).write_text(json.dumps(record) + "\n{half a line\n")
    records = timing_records(tmp_path / "results", tmp_path / "results" / matrix.name)
    assert len(records) == 1
    assert (other / RECORDS).read_text().endswith("{half a line\n")  # read only: left as it was
    by_case, by_method = stage_estimates(records)
    assert _recorded_seconds(ft, "backdoor_model", by_case, by_method) == 42.0
    assert _recorded_seconds(ft, "defense", by_case, by_method) == 7.0
    longer = dataclasses.replace(ft, training=ft.training.with_(epochs=9))  # another build of the same method
    assert timing_key(longer.case_id, "backdoor_model", longer.training.to_dict(), None) not in by_case
    assert _recorded_seconds(longer, "backdoor_model", by_case, by_method) == 42.0  # the method's median

def test_a_first_plan_says_the_estimate_is_unknown(tmp_path):
    (tmp_path / "m.yaml").write_text(textwrap.dedent(MATRIX))
    done = subprocess.run([sys.executable, "-m", "backdoor.harness.cli", "run", "m.yaml", "--plan"], capture_output=True,
                          text=True, cwd=tmp_path, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stdout + done.stderr
    estimate = [line for line in done.stdout.splitlines() if line.startswith("estimate:")]
    assert estimate == ["estimate: unknown: no record times any of the 4 build(s) (no run of these cases or methods "
                        "yet); a first run records them for the next plan"], done.stdout


# -- the ETA of a running grid ------------------------------------------------------------------------------------

def _finished(case_id: str, total: float, defense: float, loaded: bool) -> dict:
    return {"case_id": case_id, "total_seconds": total, "stage_seconds": {"defense": defense},
            "cache_hits": {"backdoor_model": loaded}}


def test_the_eta_counts_a_groups_model_once():
    """Group A's model took 100 s to build; its FT case loaded it (2 s) and defended (10 s). Left: A's FP
    (load + the defenses' median), and group B, whose first case builds its model again."""
    finished = [_finished("d-m-badnets-p0.1-s0-none", 100.0, 0.0, loaded=False),
                _finished("d-m-badnets-p0.1-s0-ft", 12.0, 10.0, loaded=True)]
    pending = ["d-m-badnets-p0.1-s0-fp", "d-m-blended-p0.1-s0-none", "d-m-blended-p0.1-s0-ft",
               "d-m-blended-p0.1-s0-fp"]
    assert eta_seconds(finished, pending, workers=1) == (5 + 2) + (0 + 100) + (10 + 2) + (5 + 2)
    assert eta_seconds(finished, pending, workers=2) == 126 / 2
    assert eta_seconds([], pending, workers=1) is None  # nothing measured yet: no ETA rather than a guess
    assert eta_seconds(finished, [], workers=1) == 0.0
