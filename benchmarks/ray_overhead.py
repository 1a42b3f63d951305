"""The Ray path's overhead per task against local serial execution, on a tiny grid on this machine.

    python benchmarks/ray_overhead.py [--rounds 3]

Starts a one-node loopback cluster (``backdoor.harness.ray_local``, one CPU, so tasks run one at a time as a serial run
does), then times whole grid runs (``pytest benchmarks --matrix tiny``, one process each, wall clock): a cold
serial run and a cold Ray run (each on its own empty cache, so both build everything once), then ``--rounds``
interleaved warm rounds (serial, Ray), where every artifact loads from the cache and what is left is harness
and Ray cost. Prints each run's seconds and the overhead per task, (Ray - serial) / tasks, median over rounds.
It prints figures; nothing here asserts a timing.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from backdoor.harness.ray_local import LOOPBACK, LocalCluster

ROOT = Path(__file__).resolve().parent.parent
MATRIX = ROOT / "matrices" / "cluster_drill.yaml"  # the tiny grid (name: tiny)
TASKS = 6  # groups: 2 seeds x (clean reference, badnets, blended); 10 cases


def timed_run(tmp: Path, name: str, *extra: str) -> float:
    """Seconds of one whole grid run (a fresh pytest process: imports, collection, cases, leaderboard)."""
    command = [sys.executable, "-m", "pytest", str(ROOT / "benchmarks"), "--matrix", str(tmp / "tiny.yaml"),
               "--cache-dir", str(tmp / f"cache-{name}"), "--results-dir", str(tmp / f"results-{name}"), "-q", *extra]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=900,
                          env={k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")})
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{name} run failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved warm rounds (default 3)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ray-overhead-") as folder:
        tmp = Path(folder)
        (tmp / "tiny.yaml").write_text(MATRIX.read_text())
        start = time.perf_counter()
        with LocalCluster(tmp / "nodes", head_cpus=1) as cluster:
            print(f"cluster start (ray start --head, one CPU): {time.perf_counter() - start:.1f} s")
            ray = [f"--ray={cluster.address}", f"--ray-node-ip={LOOPBACK}", "--ray-cache", "shared"]
            cold = {"serial": timed_run(tmp, "serial"), "ray": timed_run(tmp, "ray", *ray)}
            warm = {"serial": [], "ray": []}
            for _ in range(args.rounds):
                warm["serial"].append(timed_run(tmp, "serial"))
                warm["ray"].append(timed_run(tmp, "ray", *ray))
    print(f"tiny grid: {TASKS} tasks (groups), 10 cases, digits / cnn_small, one thread")
    print(f"cold (builds everything): serial {cold['serial']:.1f} s, ray {cold['ray']:.1f} s, "
          f"overhead per task {(cold['ray'] - cold['serial']) / TASKS:.2f} s")
    per_task = [(r - s) / TASKS for s, r in zip(warm["serial"], warm["ray"])]
    print(f"warm (every artifact cached), {args.rounds} rounds: serial "
          f"{' / '.join(f'{s:.1f}' for s in warm['serial'])} s, ray {' / '.join(f'{r:.1f}' for r in warm['ray'])} s")
    print(f"overhead per task, warm: median {statistics.median(per_task):.2f} s "
          f"(range {min(per_task):.2f} to {max(per_task):.2f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
