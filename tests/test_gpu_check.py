"""benchmarks/gpu_check.py: its --tiny mode end to end on a tiny npz written here, the table, the exit status."""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
ENV = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")}  # a nested run is not a worker
ENV["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))

spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
gpu_check = importlib.util.module_from_spec(spec)
sys.modules["gpu_check"] = gpu_check  # dataclasses look their module up there
spec.loader.exec_module(gpu_check)


def tiny_npz(path: Path, classes: int = 4, n_train: int = 160, n_test: int = 80) -> Path:
    rng = np.random.default_rng(0)
    y_train, y_test = np.arange(n_train) % classes, np.arange(n_test) % classes
    np.savez(path, x_train=rng.integers(0, 256, (n_train, 3, 32, 32), dtype=np.uint8), y_train=y_train.astype(np.int64),
             x_test=rng.integers(0, 256, (n_test, 3, 32, 32), dtype=np.uint8), y_test=y_test.astype(np.int64))
    return path


def table_cells(output: str) -> dict[tuple[str, str], list[str]]:
    """The printed table's rows, attack/defense -> the other cells."""
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:3] == ["attack", "defense", "C-Acc"])
    rows = {}
    for line in lines[start + 1:]:
        cells = line.split()
        if len(cells) != 8:
            break
        rows[(cells[0], cells[1])] = cells[2:]
    return rows


def record(attack, defense, c_acc=0.9724, asr=0.5925, r_acc=0.4, seconds=12.5, status="ok"):
    stage = "backdoor_model" if defense == "none" else "defense"
    return {"attack": attack, "defense": defense, "c_acc": c_acc, "asr": asr, "r_acc": r_acc, "status": status,
            "build_seconds": {stage: seconds}}


def test_tiny_run_prints_every_row_with_numbers(tmp_path):
    npz = tiny_npz(tmp_path / "tiny.npz")
    done = subprocess.run([sys.executable, str(SCRIPT), "--npz", str(npz), "--tiny", "--work", str(tmp_path / "w")],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "trainer / bare loop throughput" in done.stdout  # the bench's figures are printed
    rows = table_cells(done.stdout)
    assert set(rows) == set(gpu_check.ROWS)
    for key, cells in rows.items():
        c_acc, asr, r_acc, wall = (float(c) for c in cells[:4])
        assert all(0 <= v <= 100 for v in (c_acc, asr, r_acc)) and wall >= 0
        paper = gpu_check.PUBLISHED[key]
        assert cells[4:] == (["—", "—"] if paper is None else [f"{paper[0]:.2f}", f"{paper[1]:.2f}"])
    assert "gpu check: PASSED" in done.stdout


def test_table_cells_and_published_figures():
    rows = [gpu_check.Row("badnets", "none", record("badnets", "none")),
            gpu_check.Row("badnets", "nc", record("badnets", "nc", c_acc=0.5, asr=None, r_acc=None, seconds=3.0)),
            gpu_check.Row("blended", "anp", None),
            gpu_check.Row("blended", "ft", record("blended", "ft", status="error"))]
    cells = table_cells(gpu_check.format_table(rows) + "\n")
    assert cells[("badnets", "none")] == ["97.24", "59.25", "40.00", "12.5", "97.24", "59.25"]
    assert cells[("badnets", "nc")] == ["50.00", "—", "—", "3.0", "—", "—"]
    text = gpu_check.format_table(rows)
    lines = [line.split() for line in text.splitlines()]
    assert ["blended", "anp", "no", "record", "95.85", "42.80"] in lines
    assert ["blended", "ft", "error", "98.57", "100.00"] in lines
    assert len({len(line) for line in text.splitlines()}) == 1  # columns line up


def test_rows_take_each_cells_latest_record(tmp_path):
    lines = [record("badnets", "ft", c_acc=0.1), record("badnets", "ft", c_acc=0.2), record("blended", "nc")]
    (tmp_path / "records.jsonl").write_text("\n".join(map(gpu_check.json.dumps, lines)) + "\nnot json\n")
    rows = {(r.attack, r.defense): r.record for r in gpu_check.read_rows(tmp_path)}
    assert list(rows) == gpu_check.ROWS
    assert rows[("badnets", "ft")]["c_acc"] == 0.2 and rows[("blended", "nc")] is not None
    assert rows[("badnets", "none")] is None


def test_bench_rate_and_estimate():
    output = "bare loop     1,000 img/s (min 9, max 9)\ntrainer     12,345 img/s (min 1, max 2)\n"
    assert gpu_check.trainer_rate(output) == 12345.0
    assert gpu_check.trainer_rate("nothing") is None
    assert gpu_check.training_estimate(1000.0, 25_000, 50, models=2, workers=2) == pytest.approx(1250.0)
    assert gpu_check.training_estimate(1000.0, 25_000, 50, models=2, workers=1) == pytest.approx(2500.0)


def test_summary_passes_only_when_every_stage_and_row_is_good():
    good = [gpu_check.Row(a, d, record(a, d)) for a, d in gpu_check.ROWS]
    ok_stage = gpu_check.Stage("grid", rc=0, seconds=1.0)
    assert gpu_check.summary([ok_stage], good) == ("grid: ok in 1.0 s\ngpu check: PASSED", True)
    text, ok = gpu_check.summary([ok_stage], good[:-1] + [gpu_check.Row("blended", "anp", None)])
    assert not ok and "rows without a result: blended/anp" in text
    text, ok = gpu_check.summary([gpu_check.Stage("bench", rc=None, seconds=96.0, cut=True)], good)
    assert not ok and "CUT by --limit after 96 s" in text and "cut by --limit: bench" in text


def test_a_stage_over_its_limit_is_stopped_and_cut():
    command = [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"]
    stage = gpu_check.run_stage("sleep", command, limit=2)
    assert stage.cut and stage.failed and stage.seconds < 30
    assert stage.output == "started\n"  # what it printed before the cut is kept


def test_failing_stages_exit_1(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(gpu_check, "CLI", [sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"])
    status = gpu_check.main(["--npz", str(tiny_npz(tmp_path / "t.npz")), "--tiny", "--work", str(tmp_path / "w")])
    out = capsys.readouterr().out
    assert status == 1
    assert "bench: FAILED (exit 3)" in out and "grid: FAILED (exit 3)" in out and "gpu check: FAILED" in out
    assert "rows without a result: badnets/none" in out


def test_published_figures_are_backdoorbenchs():
    """BackdoorBench, GTSRB / PreAct-ResNet18 / 10% (C-Acc, ASR in %); NC against BadNets is not published."""
    assert gpu_check.PUBLISHED == {
        ("badnets", "none"): (97.24, 59.25), ("badnets", "ft"): (98.73, 5.09), ("badnets", "nc"): None,
        ("badnets", "anp"): (95.85, 0.00), ("blended", "none"): (98.58, 99.99), ("blended", "ft"): (98.57, 100.00),
        ("blended", "nc"): (97.75, 8.02), ("blended", "anp"): (95.85, 42.80)}


def test_stage_output_is_kept_whole_and_echoed_without_progress_bars(capsys):
    bar = "train:  50%|#####     | 1/2 [00:01<00:01,  1.41s/it, loss=3.783]"
    command = [sys.executable, "-c", f"print('case done'); print({bar!r}); print('[1/8] ETA 9 s')"]
    stage = gpu_check.run_stage("echo", command, limit=60)
    assert stage.rc == 0 and not stage.failed
    assert stage.output == f"case done\n{bar}\n[1/8] ETA 9 s\n"
    echoed = capsys.readouterr().out.splitlines()[2:]  # after the stage's header (which names the command)
    assert echoed[:2] == ["case done", "[1/8] ETA 9 s"] and echoed[2].startswith("== echo: ok in ")
    assert len(echoed) == 3
