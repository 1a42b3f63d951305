"""The grid end to end on a tiny synthetic matrix: records, leaderboard, cache reuse, xdist, -k, regression."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
MATRIX = """
name: tiny
datasets:
  synthetic: {num_classes: 4, train_size: 160, test_size: 80, image_size: 16}
models: [cnn_small]
attacks: {badnets: {}, blended: {}}
defenses: [none, ft, fp]
poison_ratios: [0.1]
seeds: [0]
training: {epochs: 2, batch_size: 32, lr: 0.05}
defense_training: {epochs: 1, batch_size: 32, clean_fraction: 0.1}
"""


ENV = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")}  # a nested run is not a worker


def run_grid(matrix: Path, cache: Path, results: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pytest", str(ROOT / "benchmarks"), "--matrix", str(matrix),
                           "--cache-dir", str(cache), "--results-dir", str(results), "-q", *extra],
                          capture_output=True, text=True, cwd=ROOT, timeout=600, env=ENV)


def records(results: Path) -> dict[str, dict]:
    lines = (results / "tiny" / "records.jsonl").read_text().splitlines()
    return {r["case_id"]: r for r in map(json.loads, lines)}


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("grid")
    matrix = tmp / "tiny.yaml"
    matrix.write_text(textwrap.dedent(MATRIX))
    done = run_grid(matrix, tmp / "cache", tmp / "results")
    assert done.returncode == 0, done.stdout + done.stderr
    return tmp, matrix


def test_records_and_leaderboard(first_run):
    tmp, _ = first_run
    recs = records(tmp / "results")
    assert sorted(recs) == sorted([
        "synthetic-cnn_small-clean-s0-none", "synthetic-cnn_small-badnets-p0.1-s0-none",
        "synthetic-cnn_small-badnets-p0.1-s0-ft", "synthetic-cnn_small-blended-p0.1-s0-none",
        "synthetic-cnn_small-blended-p0.1-s0-ft", "synthetic-cnn_small-badnets-p0.1-s0-fp",
        "synthetic-cnn_small-blended-p0.1-s0-fp"])
    r = recs["synthetic-cnn_small-badnets-p0.1-s0-ft"]
    for metric in ("c_acc", "asr", "r_acc"):
        assert isinstance(r[metric], float) and 0 <= r[metric] <= 1
    assert r["attack_params"]["target"] == 0 and r["defense"] == "ft" and r["poison_ratio"] == 0.1
    assert set(r["provenance"]) >= {"matrix_hash", "package_version", "git_commit", "torch_version", "device",
                                    "seed", "utc_time"}
    assert "backdoor_model" in r["stage_seconds"] and r["cache_hits"]["backdoor_model"] is True  # built by "none"
    assert recs["synthetic-cnn_small-badnets-p0.1-s0-none"]["cache_hits"]["backdoor_model"] is False
    board = (tmp / "results" / "tiny" / "leaderboard.md").read_text()
    assert "| synthetic | cnn_small | 0.1 | BadNets" in board.replace("  ", " ").replace("  ", " ").replace("  ", " ")
    assert (tmp / "results" / "tiny" / "leaderboard.csv").exists()


def test_rerun_loads_everything_from_the_cache(first_run):
    tmp, matrix = first_run
    before = records(tmp / "results")
    done = run_grid(matrix, tmp / "cache", tmp / "results")
    assert done.returncode == 0, done.stdout + done.stderr
    after = records(tmp / "results")
    assert sorted(after) == sorted(before), "re-running replaces records, loses none"
    for case_id, r in after.items():
        assert all(r["cache_hits"].values()), case_id
        assert (r["c_acc"], r["asr"], r["r_acc"]) == (before[case_id]["c_acc"], before[case_id]["asr"],
                                                     before[case_id]["r_acc"])


def test_xdist_run_equals_serial_run(first_run):
    tmp, matrix = first_run
    done = run_grid(matrix, tmp / "cache-x", tmp / "results-x", "-n", "2", "--dist", "loadgroup")
    assert done.returncode == 0, done.stdout + done.stderr
    serial, parallel = records(tmp / "results"), records(tmp / "results-x")
    assert sorted(serial) == sorted(parallel)
    built = [r for r in parallel.values() if r["cache_hits"].get("backdoor_model") is False]
    assert len(built) == 2, "each backdoored model was trained afresh, once"
    workers = {}
    for case_id, r in parallel.items():
        workers.setdefault(case_id.rsplit("-", 1)[0], set()).add(r["provenance"]["worker"])
    assert all(len(w) == 1 for w in workers.values()), f"a backdoored model's cases ran on several workers: {workers}"
    assert set().union(*workers.values()) == {"gw0", "gw1"}, "both workers got work"
    for case_id in serial:
        for metric in ("c_acc", "asr", "r_acc"):
            assert parallel[case_id][metric] == serial[case_id][metric], (case_id, metric)


def test_k_selects_pairs(first_run):
    tmp, matrix = first_run
    done = run_grid(matrix, tmp / "cache", tmp / "results-k", "-k", "badnets and ft")
    assert done.returncode == 0, done.stdout + done.stderr
    assert list(records(tmp / "results-k")) == ["synthetic-cnn_small-badnets-p0.1-s0-ft"]


def band(value: float, shift: float = 0.0) -> dict:
    return {"centre": round(value + shift, 4), "low": round(value + shift - 0.01, 4),
            "high": round(value + shift + 0.01, 4), "n": 3}


def test_drift_outside_a_band_fails_strictly_is_reported_otherwise_and_keeps_the_record(first_run):
    tmp, matrix = first_run
    recs = records(tmp / "results")
    badnets, blended = recs["synthetic-cnn_small-badnets-p0.1-s0-none"], recs["synthetic-cnn_small-blended-p0.1-s0-none"]
    shift = 0.2 if badnets["asr"] < 0.8 else -0.2  # a band the badnets ASR lies outside
    cases = {
        "synthetic-cnn_small-badnets-p0.1-none": {"c_acc": band(badnets["c_acc"]), "asr": band(badnets["asr"], shift),
                                                  "r_acc": band(badnets["r_acc"])},
        "synthetic-cnn_small-blended-p0.1-none": {m: band(blended[m]) for m in ("c_acc", "asr", "r_acc")},
        "synthetic-cnn_small-clean-none": {"c_acc": band(recs["synthetic-cnn_small-clean-s0-none"]["c_acc"])},
    }
    (tmp / "tiny.expected.yaml").write_text(yaml.safe_dump({"calibration": {}, "cases": cases}))
    drifting = tmp / "tiny-expect.yaml"
    drifting.write_text(matrix.read_text().replace("name: tiny", "name: tiny\nexpected: tiny.expected.yaml"))
    done = run_grid(drifting, tmp / "cache", tmp / "results-e", "-k", "none")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "1 failed" in done.stdout and "badnets-p0.1-s0-none drifted: asr = " in done.stdout
    assert "outside its band" in done.stdout and "backdoor-bench drift (1 case(s)" in done.stdout
    assert "synthetic-cnn_small-badnets-p0.1-s0-none" in records(tmp / "results-e")

    reported = run_grid(drifting, tmp / "cache", tmp / "results-r", "-k", "none", "--regression", "report")
    assert reported.returncode == 0, reported.stdout + reported.stderr
    assert "reported only" in reported.stdout and "synthetic-cnn_small-badnets-p0.1-s0-none: asr = " in reported.stdout

    claimed = tmp / "tiny-claim.yaml"  # a claim replaces the band: badnets/none's ASR is checked as stated
    op = ">=" if shift > 0 else "<="
    claimed.write_text(drifting.read_text().replace("name: tiny", "name: tiny\nregression:\n  checks:\n"
                                                   f"    badnets/none: {{asr: '{op} 0.0'}}\n    blended/*: {{asr: off}}"))
    held = run_grid(claimed, tmp / "cache", tmp / "results-c", "-k", "none")
    assert held.returncode == 0, held.stdout + held.stderr


def backdoor_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "backdoor.harness.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=600, env=ENV)


def test_run_works_from_any_folder_and_reads_no_conftest(tmp_path):
    """`backdoor run` runs the packaged grid: results and cache default to the current folder, and a conftest.py
    (or pytest.ini) in that folder is never executed."""
    (tmp_path / "tiny.yaml").write_text(textwrap.dedent(MATRIX))
    (tmp_path / "conftest.py").write_text("raise SystemExit('an untrusted conftest.py ran')\n")
    (tmp_path / "pytest.ini").write_text("[pytest]\naddopts = --this-option-does-not-exist\n")
    done = backdoor_cli("run", "tiny.yaml", "-k", "badnets", cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "an untrusted conftest.py ran" not in done.stdout + done.stderr
    assert sorted(records(tmp_path / "results")) == ["synthetic-cnn_small-badnets-p0.1-s0-fp",
                                                     "synthetic-cnn_small-badnets-p0.1-s0-ft",
                                                     "synthetic-cnn_small-badnets-p0.1-s0-none"]
    assert (tmp_path / ".backdoor-cache" / "backdoor_model").is_dir()
    assert f"results in {tmp_path / 'results'}" in done.stderr
    lines = [line for line in done.stdout.splitlines() if line.startswith("[")]
    assert len(lines) == 3 and lines[0].startswith("[1/3] synthetic-cnn_small-badnets-p0.1-s0-") and "C-Acc" in lines[0]
    assert "2 left, ETA" in lines[0] and "0 left" in lines[2]
    quiet = backdoor_cli("run", "tiny.yaml", "-k", "badnets", "-q", cwd=tmp_path)
    assert quiet.returncode == 0 and not [line for line in quiet.stdout.splitlines() if line.startswith("[1/3]")]

    planned = backdoor_cli("run", "tiny.yaml", "--plan", "-n", "2", cwd=tmp_path)
    assert planned.returncode == 0, planned.stderr
    assert "synthetic-cnn_small-badnets-p0.1-s0-ft: dataset: cached, poison: cached, backdoor_model: cached, " \
           "defense: cached" in planned.stdout
    blended = next(line for line in planned.stdout.splitlines() if "blended-p0.1-s0-none:" in line)
    assert "backdoor_model: build (time unknown)" in blended  # never built, nor timed, in this folder
    assert "clean-s0-none: dataset: cached, clean_model: build (time unknown)" in planned.stdout
    assert "blended-p0.1-s0-ft: dataset: cached, poison: built above, backdoor_model: built above, defense: build ~" \
        in planned.stdout  # timed from the badnets FT case's record
    assert "3 build(s) have no recorded timing yet" in planned.stdout


def test_run_help_shows_every_option_with_its_default(tmp_path):
    done = backdoor_cli("run", "--help", cwd=tmp_path)
    for option in ("--results-dir", "--cache-dir", "--device", "--threads", "--seeds", "--strict", "--plan",
                   "--no-regression"):
        assert option in done.stdout
    text = " ".join(done.stdout.split())  # argparse wraps lines
    assert "(default: results)" in text and "(default: .backdoor-cache)" in text and "(default: auto)" in text
