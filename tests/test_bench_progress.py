"""``backdoor bench`` says what it measures as it goes (minutes on a CPU), and Ctrl-C ends it with one line."""
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

from backdoor.harness import bench as bench_module

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
SMALL = ["--images", "64", "--train-images", "128", "--epochs", "1", "--attacks", "badnets"]


def test_bench_prints_a_line_per_step():
    done = subprocess.run([sys.executable, "-m", "backdoor.harness.cli", "bench", *SMALL, "--repeats", "2"],
                          capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=300)
    assert done.returncode == 0, done.stderr
    steps = [line.split("] ", 1)[1] for line in done.stderr.splitlines() if line.startswith("  [")]
    assert steps == ["badnets: material", "poisoning round 1/2 (1 attack(s))", "poisoning round 2/2 (1 attack(s))",
                     "training round 1/2 (bare loop, trainer, trainer + crop/flip)",
                     "training round 2/2 (bare loop, trainer, trainer + crop/flip)"], done.stderr
    assert "trainer / bare loop throughput" in done.stdout


def test_an_interrupted_bench_ends_with_one_line():
    bench = subprocess.Popen([sys.executable, "-m", "backdoor.harness.cli", "bench", *SMALL, "--repeats", "200"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=ENV)
    try:
        for line in bench.stderr:
            if "training round 1/" in line:
                break
        bench.send_signal(signal.SIGINT)
        out, err = bench.communicate(timeout=300)  # a loaded CI machine (2 workers) took over 120 s
    finally:
        if bench.poll() is None:
            bench.kill()
    assert bench.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    lines = [line for line in err.splitlines() if not line.startswith("  [")]
    assert len(lines) == 1 and lines[0].startswith("backdoor bench: interrupted after "), err
    assert "badnets" in out  # the poisoning figures finished before the interrupt are printed


def test_an_interrupt_dropped_by_a_finalizer_still_ends_the_bench(monkeypatch, capsys):
    """Python prints and drops a KeyboardInterrupt raised inside a ``__del__`` (a progress bar's): the bench must
    still stop at its next step (it ran all 200 rounds in a loaded CI)."""
    steps = []

    def bench_whose_interrupt_is_swallowed(args, step):
        step("first")
        try:
            signal.raise_signal(signal.SIGINT)
        except KeyboardInterrupt:
            pass  # what a finalizer does with it
        step("second")
        steps.append("ran on")
        return 0

    monkeypatch.setattr(bench_module, "_bench", bench_whose_interrupt_is_swallowed)
    before = signal.getsignal(signal.SIGINT)
    assert bench_module.main(SimpleNamespace()) == 130 and steps == []
    err = capsys.readouterr().err
    assert "first" in err and "second" not in err and "backdoor bench: interrupted after" in err
    assert signal.getsignal(signal.SIGINT) is before  # the handler is put back
