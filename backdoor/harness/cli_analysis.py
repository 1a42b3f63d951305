"""``backdoor plot | analyze | study``: the paper's figures, its five analysis tools and its three studies.

Wired into ``backdoor.harness.cli`` by ``add_commands(sub)``; every sub-parser sets ``func`` (args -> exit code).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path


def _threads(args: argparse.Namespace) -> None:
    """One CPU thread by default (like the grid): reproducible numbers, and room for a running grid."""
    import torch

    torch.set_num_threads(args.threads)


def cmd_plot(args: argparse.Namespace) -> int:
    from backdoor.harness.report.figures import write_figures
    from backdoor.harness.report.html import write_html
    from backdoor.harness.report.leaderboard import write_leaderboard

    try:
        written, skipped = write_figures(args.folder)
        write_leaderboard(args.folder)  # re-render the markdown, which links the figures
        html = write_html(args.folder)
    except (FileNotFoundError, ValueError) as e:
        print(f"backdoor plot: {e}", file=sys.stderr)
        return 1
    for path in written:
        print(path)
    for reason in skipped:
        print(f"skipped: {reason}", file=sys.stderr)
    print(html)
    return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    from backdoor.analysis import tool
    from backdoor.harness.cached_case import NotCachedError, load_case, output_dir

    _threads(args)
    started = time.perf_counter()
    try:
        artifacts = load_case(args.folder, args.case, args.cache_dir, args.device)
        paths = tool(args.tool).run(artifacts, output_dir(args.folder, args.case), args)
    except (NotCachedError, LookupError, ValueError, FileNotFoundError) as e:
        print(f"backdoor analyze {args.tool}: {e}", file=sys.stderr)
        return 1
    return _print_written(paths, args.tool, started)


def cmd_study(args: argparse.Namespace) -> int:
    from backdoor.harness.study_cases import StudyCases
    from backdoor.studies import study

    _threads(args)
    started = time.perf_counter()
    out = Path(args.out or Path(os.environ.get("BACKDOOR_RESULTS", "results")) / "studies" / args.study)
    out.mkdir(parents=True, exist_ok=True)
    try:
        paths = study(args.study).run(args, out, StudyCases(args))
    except ValueError as e:
        print(f"backdoor study {args.study}: {e}", file=sys.stderr)
        return 1
    return _print_written(paths, args.study, started)


def _print_written(paths: list[Path], name: str, started: float) -> int:
    """The files a tool or study wrote, one per line on stdout, then its time on stderr."""
    for path in paths:
        print(path)
    print(f"{name}: {time.perf_counter() - started:.1f} s", file=sys.stderr)
    return 0


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cache-dir", default=os.environ.get("BACKDOOR_CACHE", ".backdoor-cache"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0, help="seed of every random choice (default 0)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default 1)")


def add_commands(sub, argv: list[str] | None = None) -> None:
    """Add the ``plot``, ``analyze`` and ``study`` sub-commands to the ``backdoor`` parser's ``sub``. A tool's
    or study's own options come from importing its module, which imports torch: with the command line
    ``argv`` given, only the one it names is imported (``backdoor --help`` stays fast)."""
    from backdoor.analysis import TOOL_SUMMARIES, tool
    from backdoor.studies import STUDY_SUMMARIES, study

    plot = sub.add_parser("plot", help="figures 2, 3, 5 (PNG + SVG) and leaderboard.html from a results folder")
    plot.add_argument("folder")
    plot.set_defaults(func=cmd_plot)

    analyze = sub.add_parser("analyze", help="an analysis tool on a finished case's cached artifacts")
    tools = analyze.add_subparsers(dest="tool", required=True, metavar="TOOL")
    for name, summary in TOOL_SUMMARIES.items():
        p = tools.add_parser(name, help=summary, description=summary)
        p.add_argument("folder", metavar="RESULTS_DIR")
        p.add_argument("--case", required=True, help="case id, e.g. digits-cnn_small-badnets-p0.1-s0-ft")
        _common(p)
        if _named(argv, "analyze", name):
            tool(name).add_arguments(p)
        p.set_defaults(func=cmd_analyze)

    studies = sub.add_parser("study", help="a training-dynamics study (quick learning, forgetting, generalisation)")
    names = studies.add_subparsers(dest="study", required=True, metavar="NAME")
    for name, summary in STUDY_SUMMARIES.items():
        p = names.add_parser(name, help=summary, description=summary)
        p.add_argument("--out", help="output folder (default results/studies/NAME)")
        _common(p)
        if _named(argv, "study", name):
            study(name).add_arguments(p)
        p.set_defaults(func=cmd_study)


def _named(argv: list[str] | None, command: str, name: str) -> bool:
    """Whether the command line runs ``backdoor COMMAND NAME`` (every name when there is no command line)."""
    return argv is None or argv[:2] == [command, name]
