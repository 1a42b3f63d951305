"""The ``backdoor`` command: run a matrix (through pytest), list the registries, render leaderboards,
refresh regression expectations, and print speed benchmarks."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path


def project_root() -> Path:
    """The checkout holding ``benchmarks/`` and ``conftest.py``: the current directory or one above it,
    else the source tree this package was installed from (editable install)."""
    candidates = [Path.cwd(), *Path.cwd().parents, Path(__file__).resolve().parent.parent]
    for folder in candidates:
        if (folder / "benchmarks" / "test_grid.py").is_file() and (folder / "conftest.py").is_file():
            return folder
    raise SystemExit("backdoor run: cannot find the benchmark grid (benchmarks/test_grid.py); "
                     "run it from a backdoor-bench checkout")


def cmd_run(args: argparse.Namespace, extra: list[str]) -> int:
    matrix = Path(args.matrix).resolve()
    if not matrix.is_file():
        print(f"backdoor run: matrix file {args.matrix} does not exist", file=sys.stderr)
        return 4
    root = project_root()
    command = [sys.executable, "-m", "pytest", str(root / "benchmarks"), "--matrix", str(matrix), *extra]
    if any(a == "-n" or a.startswith("-n") or a.startswith("--numprocesses") for a in extra) \
            and not any(a.startswith("--dist") for a in extra):
        command += ["--dist", "loadgroup"]  # all defenses of one backdoored model on one worker
    return subprocess.call(command, cwd=root)


def cmd_list(args: argparse.Namespace) -> int:
    from backdoor.attacks import ATTACKS
    from backdoor.data import DATASETS
    from backdoor.defenses import DEFENSES
    from backdoor.models import MODELS, model_summary

    print("datasets:")
    for name in DATASETS.names():
        print(f"  {name:<20} {_module_line(DATASETS.get(name))}")
    print("models:")
    for name in MODELS.names():
        print(f"  {name:<20} {model_summary(name)}")
    print("attacks:")
    for name in ATTACKS.names():
        cls = ATTACKS.get(name)
        print(f"  {name:<20} [{cls.kind.replace('_', ' ')}] {cls.summary()}")
    print("defenses:")
    for name in DEFENSES.names():
        cls = DEFENSES.get(name)
        print(f"  {name:<20} [{cls.kind.replace('_', ' ')}] {cls.summary()}")
    return 0


def _module_line(factory) -> str:
    """A dataset's summary: its factory's docstring, else its module's (first line)."""
    doc = (factory.__doc__ or sys.modules[factory.__module__].__doc__ or "").strip()
    return doc.splitlines()[0] if doc else ""


def cmd_leaderboard(args: argparse.Namespace) -> int:
    from backdoor.results import write_leaderboard

    try:
        md, csv = write_leaderboard(args.folder)
    except (FileNotFoundError, ValueError) as e:
        print(f"backdoor leaderboard: {e}", file=sys.stderr)
        return 1
    print(md.read_text())
    print(f"wrote {md} and {csv}", file=sys.stderr)
    return 0


def cmd_expect(args: argparse.Namespace) -> int:
    from backdoor.expectations import refresh
    from backdoor.matrix import MatrixError, load_matrix
    from backdoor.results import read_records

    try:
        matrix = load_matrix(args.matrix)
    except MatrixError as e:
        print(f"backdoor expect: {e}", file=sys.stderr)
        return 4
    if matrix.expected_path is None:
        print(f"backdoor expect: {args.matrix} has no 'expected:' file to write", file=sys.stderr)
        return 4
    folder = Path(args.results_dir) / matrix.name
    wanted = {c.case_id for c in matrix.cases()}
    records = [r for r in read_records(folder) if r["case_id"] in wanted]
    missing = sorted(wanted - {r["case_id"] for r in records})
    if missing:
        print(f"backdoor expect: no record yet for {len(missing)} case(s), e.g. {missing[0]}; "
              f"run `backdoor run {args.matrix}` first", file=sys.stderr)
        return 1
    count = refresh(matrix.expected_path, records)
    print(f"wrote {count} expectations to {matrix.expected_path}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from backdoor.bench import main as bench_main

    return bench_main(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="backdoor", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a matrix as a pytest grid; extra arguments go to pytest (-k, -n 2, -q)")
    run.add_argument("matrix")
    sub.add_parser("list", help="list registered datasets, models, attacks and defenses")
    board = sub.add_parser("leaderboard", help="re-render leaderboard.md/.csv from a results folder's records")
    board.add_argument("folder")
    expect = sub.add_parser("expect", help="rewrite a matrix's regression expectations from its latest records")
    expect.add_argument("matrix")
    expect.add_argument("--results-dir", default=os.environ.get("BACKDOOR_RESULTS", "results"))
    bench = sub.add_parser("bench", help="print poisoning and training throughput (images/s)")
    bench.add_argument("--images", type=int, default=50_000, help="CIFAR-shaped images to poison")
    bench.add_argument("--train-images", type=int, default=4096, help="images per training epoch")
    bench.add_argument("--epochs", type=int, default=2)
    bench.add_argument("--model", default="cnn_small")
    bench.add_argument("--device", default="cpu")
    bench.add_argument("--attacks", default="*", help="attack wildcard")
    bench.add_argument("--attack-params", default="", help='JSON: attack -> parameter overrides, e.g. {"lc": {"steps": 10}}')
    add_analysis_commands(sub)
    return parser


def add_analysis_commands(sub) -> None:
    """Figures, analysis tools and studies (``backdoor plot | analyze | study``), when that module is present.
    Each of its sub-parsers sets ``func`` (args -> exit code)."""
    try:
        from backdoor.cli_analysis import add_commands
    except ImportError as e:
        if e.name != "backdoor.cli_analysis":
            raise
        return
    add_commands(sub)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    if argv[:1] == ["run"]:
        args, extra = parser.parse_known_args(argv)
        return cmd_run(args, extra)
    args = parser.parse_args(argv)
    handlers = {"list": cmd_list, "leaderboard": cmd_leaderboard, "expect": cmd_expect, "bench": cmd_bench}
    if args.command not in handlers:
        return args.func(args)
    return handlers[args.command](args)


if __name__ == "__main__":
    raise SystemExit(main())
