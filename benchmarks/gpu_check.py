"""GPU check: ``backdoor bench`` figures, then GTSRB / PreAct-ResNet18 / BadNets and Blended at 10% for 50 epochs
with FT, NC and ANP through the project's own runner, beside BackdoorBench's published figures.

    python benchmarks/gpu_check.py --npz /path/to/gtsrb32.npz            # a CUDA GPU, under 8 minutes
    python benchmarks/gpu_check.py --npz /path/to/gtsrb32.npz --tiny     # the same path on the CPU, a minute

The npz holds x_train / y_train / x_test / y_test (uint8 images [N, 3, 32, 32], integer labels), as the ``npz``
dataset reads it. The grid is a temporary matrix run with ``backdoor run``; the table is read from its records.
Each stage has a share of ``--limit``: a stage over its share is stopped and the output says what was cut.
Exit status 1 when a stage fails, is cut, or a row has no record.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import yaml

CLI = [sys.executable, "-m", "backdoor.harness.cli"]  # the one place that names the command line's module

ATTACKS = {"badnets": {}, "blended": {"alpha": 0.2}}
DEFENSES = ("none", "ft", "nc", "anp")
ROWS = [(attack, defense) for attack in ATTACKS for defense in DEFENSES]
# BackdoorBench, GTSRB / PreAct-ResNet18 / poison ratio 10%: (C-Acc, ASR) in %; None where not published
PUBLISHED = {
    ("badnets", "none"): (97.24, 59.25), ("badnets", "ft"): (98.73, 5.09), ("badnets", "nc"): None,
    ("badnets", "anp"): (95.85, 0.00),
    ("blended", "none"): (98.58, 99.99), ("blended", "ft"): (98.57, 100.00), ("blended", "nc"): (97.75, 8.02),
    ("blended", "anp"): (95.85, 42.80),
}
MATRIX_NAME = "gpu_check"
BENCH_SHARE = 0.2  # of --limit; the grid gets the rest


@dataclass(frozen=True)
class Settings:
    """What one mode runs: the full check on the GPU, or the tiny one on the CPU through the same path."""
    device: str
    model_params: dict
    epochs: int
    defense_epochs: int
    defense_params: dict
    bench_args: list[str]
    subset: tuple[int, int] | None  # (train, test) images taken from the npz, or None for all of it
    workers: int


def full_settings(device: str) -> Settings:
    return Settings(device=device, model_params={}, epochs=50, defense_epochs=100,
                    defense_params={"ft": {}, "nc": {}, "anp": {}},
                    bench_args=["--model", "preact_resnet18", "--attacks", "b*", "--images", "20000",
                                "--train-images", "8192", "--epochs", "1", "--repeats", "2"],
                    subset=None, workers=2)


def tiny_settings() -> Settings:
    return Settings(device="cpu", model_params={"width": 4}, epochs=1, defense_epochs=1,
                    defense_params={"ft": {}, "nc": {"epochs": 1}, "anp": {"iterations": 5}},
                    bench_args=["--model", "cnn_small", "--attacks", "b*", "--images", "256",
                                "--train-images", "128", "--epochs", "1", "--repeats", "1"],
                    subset=(512, 256), workers=1)


@dataclass
class Stage:
    name: str
    rc: int | None = None
    seconds: float = 0.0
    output: str = ""
    cut: bool = False

    @property
    def failed(self) -> bool:
        return self.cut or self.rc != 0

    def verdict(self) -> str:
        if self.cut:
            return f"CUT by --limit after {self.seconds:.0f} s"
        return f"{'ok' if self.rc == 0 else f'FAILED (exit {self.rc})'} in {self.seconds:.1f} s"


@dataclass
class Row:
    attack: str
    defense: str
    record: dict | None = field(default=None)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--npz", required=True, help="GTSRB at 32x32 (x_train, y_train, x_test, y_test)")
    parser.add_argument("--device", default="cuda", help="torch device of the full check")
    parser.add_argument("--tiny", action="store_true",
                        help="CPU, a tiny model, one epoch, 512/256 images: the same path in about a minute")
    parser.add_argument("--limit", type=float, default=480.0, help="seconds for everything together")
    parser.add_argument("--workers", type=int, default=None,
                        help="pytest-xdist workers of the grid (default: 2 on the GPU, sharing it; 1 with --tiny)")
    parser.add_argument("--work", default=None, help="folder for the matrix, results and cache (default: a new "
                                                     "temporary folder; an existing one reuses its cache)")
    return parser.parse_args(argv)


def write_subset(source: Path, dest: Path, n_train: int, n_test: int, seed: int = 0) -> Path:
    """A seeded random subset of the npz's training and test images, as a new npz."""
    rng = np.random.default_rng(seed)
    with np.load(source, allow_pickle=False) as archive:
        arrays = {key: archive[key] for key in ("x_train", "y_train", "x_test", "y_test")}
    for split, n in (("train", n_train), ("test", n_test)):
        keep = np.sort(rng.permutation(len(arrays[f"y_{split}"]))[:n])
        arrays[f"x_{split}"], arrays[f"y_{split}"] = arrays[f"x_{split}"][keep], arrays[f"y_{split}"][keep]
    np.savez(dest, **arrays)
    return dest


def matrix_document(settings: Settings, npz: Path) -> dict:
    """The check's matrix: BackdoorBench's protocol (target 0, SGD lr 0.01 cosine, batch 128, 5% clean data)."""
    return {
        "name": MATRIX_NAME,
        "description": "GPU check: GTSRB / PreAct-ResNet18 / BadNets and Blended at 10% with FT, NC and ANP",
        "datasets": {"npz": {"path": str(npz), "normalize": False, "hflip": False}},
        "models": {"preact_resnet18": settings.model_params},
        "attacks": ATTACKS,
        "defenses": {"none": {}, **settings.defense_params},
        "poison_ratios": [0.1],
        "seeds": [0],
        "target": 0,
        "reference": False,  # no clean model: a third 50-epoch training the table has no row for
        "training": {"epochs": settings.epochs, "batch_size": 128, "lr": 0.01, "momentum": 0.9,
                     "weight_decay": 0.0005, "schedule": "cosine"},
        "defense_training": {"epochs": settings.defense_epochs, "batch_size": 256, "lr": 0.01,
                             "clean_fraction": 0.05},
    }


def run_stage(name: str, command: list[str], limit: float) -> Stage:
    """Runs ``command`` in its own process group, echoing its output as it comes; past ``limit`` seconds the whole
    group is stopped (the grid's pytest workers too) and the stage is marked cut."""
    print(f"\n== {name}: {' '.join(command)}  (limit {limit:.0f} s)", flush=True)
    stage, started, lines = Stage(name), time.perf_counter(), []
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    echo = threading.Thread(target=_echo, args=(process.stdout, lines), daemon=True)
    echo.start()
    try:
        stage.rc = process.wait(timeout=max(limit, 1.0))
    except subprocess.TimeoutExpired:
        _stop_group(process)
        stage.cut = True
    echo.join(timeout=30)
    stage.seconds, stage.output = time.perf_counter() - started, "".join(lines)
    print(f"== {name}: {stage.verdict()}", flush=True)
    return stage


PROGRESS_BAR = re.compile(r"(it/s|s/it)[,\]]|^\s*$")  # tqdm's redraws arrive as lines through a pipe


def _echo(stream, lines: list[str]) -> None:
    """Keeps every line; prints all but progress-bar redraws (per-case lines and the ETA stay)."""
    for line in stream:
        lines.append(line)
        if not PROGRESS_BAR.search(line):
            print(line, end="", flush=True)


def _stop_group(process: subprocess.Popen) -> None:
    """SIGTERM to the stage's process group (the runner renders what finished), SIGKILL after 30 s."""
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def trainer_rate(bench_output: str) -> float | None:
    """The trainer's images/s from ``backdoor bench``'s line ``trainer  12,345 img/s (min ..., max ...)``."""
    match = re.search(r"^trainer\s+([\d,]+) img/s", bench_output, re.MULTILINE)
    return float(match.group(1).replace(",", "")) if match else None


def training_estimate(rate: float, train_images: int, epochs: int, models: int, workers: int) -> float:
    """Seconds to train the backdoored models at the bench's rate, ``workers`` of them at once (an estimate: it
    leaves out the defenses, data loading and the GPU shared between workers)."""
    return math.ceil(models / workers) * epochs * train_images / rate


def read_rows(folder: Path) -> list[Row]:
    """The check's rows, each with its latest record (None where the grid wrote none)."""
    latest: dict[tuple[str, str], dict] = {}
    path = folder / "records.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            latest[(record.get("attack"), record.get("defense"))] = record
    return [Row(attack, defense, latest.get((attack, defense))) for attack, defense in ROWS]


def _percent(value) -> str:
    return "—" if value is None else f"{100 * value:.2f}"


def wall_seconds(record: dict) -> float | None:
    """The row's own build: the backdoored model's training for ``none``, the defense's run otherwise."""
    stage = "backdoor_model" if record.get("defense") == "none" else "defense"
    return record.get("build_seconds", {}).get(stage)


def format_table(rows: list[Row]) -> str:
    header = ("attack", "defense", "C-Acc", "ASR", "R-Acc", "wall s", "paper C-Acc", "paper ASR")
    lines = [header]
    for row in rows:
        paper = PUBLISHED[(row.attack, row.defense)]
        paper_cells = ("—", "—") if paper is None else (f"{paper[0]:.2f}", f"{paper[1]:.2f}")
        if row.record is None:
            measured = ("no record",) + ("",) * 3
        elif row.record.get("status") != "ok":
            measured = (str(row.record.get("status")),) + ("",) * 3
        else:
            wall = wall_seconds(row.record)
            measured = (_percent(row.record.get("c_acc")), _percent(row.record.get("asr")),
                        _percent(row.record.get("r_acc")), "—" if wall is None else f"{wall:.1f}")
        lines.append((row.attack, row.defense, *measured, *paper_cells))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in
                               enumerate(zip(line, widths))) for line in lines)


def summary(stages: list[Stage], rows: list[Row]) -> tuple[str, bool]:
    """The closing lines and whether everything passed."""
    missing = [f"{r.attack}/{r.defense}" for r in rows if r.record is None or r.record.get("status") != "ok"]
    lines = [f"{s.name}: {s.verdict()}" for s in stages]
    if missing:
        lines.append(f"rows without a result: {', '.join(missing)}")
    cut = [s.name for s in stages if s.cut]
    if cut:
        lines.append(f"cut by --limit: {', '.join(cut)} (raise --limit, or rerun with the same --work: finished "
                     f"builds come from its cache)")
    ok = not missing and not any(s.failed for s in stages)
    lines.append("gpu check: " + ("PASSED" if ok else "FAILED"))
    return "\n".join(lines), ok


def prepare(args: argparse.Namespace, settings: Settings, work: Path) -> Path:
    """The matrix file (and, in tiny mode, the subset npz it reads) under ``work``."""
    npz = Path(args.npz).resolve()
    if settings.subset is not None:
        npz = write_subset(npz, work / "subset.npz", *settings.subset)
    matrix = work / f"{MATRIX_NAME}.yaml"
    matrix.write_text(yaml.safe_dump(matrix_document(settings, npz), sort_keys=False))
    return matrix


def train_images(args: argparse.Namespace, settings: Settings) -> int:
    if settings.subset is not None:
        return settings.subset[0]
    with np.load(args.npz, allow_pickle=False) as archive:
        return len(archive["y_train"])


def grid_command(settings: Settings, matrix: Path, work: Path) -> list[str]:
    workers = ["-n", str(settings.workers)] if settings.workers > 1 else []
    return [*CLI, "run", str(matrix), "--results-dir", str(work / "results"), "--cache-dir", str(work / "cache"),
            "--device", settings.device, "--no-regression", "-p", "no:cacheprovider", *workers]


def print_estimate(args: argparse.Namespace, settings: Settings, bench: Stage) -> None:
    rate = trainer_rate(bench.output)
    if rate:
        n = train_images(args, settings)
        guess = training_estimate(rate, n, settings.epochs, len(ATTACKS), settings.workers)
        print(f"estimate (from the bench's trainer rate {rate:,.0f} img/s): training {len(ATTACKS)} models x "
              f"{settings.epochs} epochs x {n:,} images takes about {guess:.0f} s, defenses not included")


def report(settings: Settings, work: Path, stages: list[Stage], started: float) -> bool:
    """Prints the table and the closing lines; True when everything passed."""
    rows = read_rows(work / "results" / MATRIX_NAME)
    print(f"\nGTSRB / PreAct-ResNet18 / poison ratio 10%, {settings.epochs} epoch(s), device {settings.device}: "
          f"ours beside BackdoorBench's published figures (%, wall s: the row's own build)")
    print(format_table(rows))
    text, ok = summary(stages, rows)
    print(f"\n{text}\ntotal {time.perf_counter() - started:.0f} s")
    return ok


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = tiny_settings() if args.tiny else full_settings(args.device)
    if args.workers is not None:
        settings = replace(settings, workers=args.workers)
    work = Path(args.work or tempfile.mkdtemp(prefix="gpu_check_")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    print(f"gpu check ({'tiny, CPU' if args.tiny else settings.device}): work folder {work}, limit {args.limit:.0f} s")
    matrix = prepare(args, settings, work)
    bench = run_stage("bench", [*CLI, "bench", "--device", settings.device, *settings.bench_args],
                      BENCH_SHARE * args.limit)
    print_estimate(args, settings, bench)
    grid = run_stage("grid", grid_command(settings, matrix, work), args.limit - (time.perf_counter() - started))
    return 0 if report(settings, work, [bench, grid], started) else 1

if __name__ == "__main__":
    sys.exit(main())
