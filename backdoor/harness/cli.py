"""The ``backdoor`` command: run a matrix (through pytest), list the registries, render leaderboards,
refresh regression expectations, print speed benchmarks, and run the methods' mutants against their tests.

Each command imports what it needs when it runs, not at the top of this module: the library imports torch
(about 5 s), and ``backdoor --help`` and ``backdoor list`` need none of it (``list`` reads the registered
modules' source, ``backdoor.harness.catalog``); ``tests/test_cli_speed.py`` keeps them free of torch."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from backdoor.harness.catalog import catalog
from backdoor.harness.launch import grid_command, run_in_own_group
from backdoor.harness.run_options import RUN_OPTIONS, add_run_options


def cmd_run(args: argparse.Namespace, extra: list[str]) -> int:
    matrix = Path(args.matrix).resolve()
    if not matrix.is_file():
        print(f"backdoor run: matrix file {args.matrix} does not exist", file=sys.stderr)
        return 4
    if args.plan:
        from backdoor.harness.plan import print_plan
        return print_plan(matrix, args, extra)
    forwarded = []
    for option in RUN_OPTIONS:
        value = getattr(args, option.flag[2:].replace("-", "_"))
        if value is not None:
            forwarded += [option.flag, str(Path(value).resolve()) if option.flag.endswith("-dir") else str(value)]
    if args.ray is not None:
        forwarded.append(f"--ray={args.ray}" if args.ray else "--ray")
    regression = "off" if args.no_regression else "strict" if args.strict else "report"
    command = grid_command(matrix, [*forwarded, "--regression", regression, *extra])
    print(f"backdoor run: results in {Path(args.results_dir).resolve()}, cache in {Path(args.cache_dir).resolve()}",
          file=sys.stderr, flush=True)
    return run_in_own_group(command, lambda name: _after_signal(name, matrix, Path(args.results_dir).resolve()))


def _after_signal(name: str, matrix: Path, results: Path) -> None:
    """A run stopped by a signal: its finished records stay; the leaderboard is rendered from them; one line."""
    from backdoor.harness.matrix import MatrixError, load_matrix
    from backdoor.harness.records import RECORDS
    from backdoor.harness.report.leaderboard import write_leaderboard

    try:
        folder = results / load_matrix(matrix, check_data=False).name
    except (MatrixError, OSError):
        folder = results / matrix.stem
    kept = "no record was finished"
    if (folder / RECORDS).exists():
        try:
            md, _ = write_leaderboard(folder)
            kept = f"finished records kept in {folder / RECORDS}; leaderboard re-rendered: {md}"
        except (OSError, ValueError) as e:
            kept = f"finished records kept in {folder / RECORDS}; leaderboard not rendered ({e})"
    print(f"backdoor run: stopped by {name}; every process of the run ended; {kept}", file=sys.stderr, flush=True)


def cmd_list(args: argparse.Namespace) -> int:
    for title, family in (("datasets", "data"), ("models", "models"), ("attacks", "attacks"),
                          ("defenses", "defenses"), ("detectors", "detectors")):
        print(f"{title}:")
        for entry in catalog(family):
            kind = f"[{entry.kind.replace('_', ' ')}{' detection' if family == 'detectors' else ''}] " \
                if entry.kind else ""
            said = not entry.title or entry.title == entry.name or entry.summary.startswith(f"{entry.title}:")
            title = "" if said else f"({entry.title}) "
            print(f"  {entry.name:<20} {title}{kind}{entry.summary}")
    return 0


def cmd_leaderboard(args: argparse.Namespace) -> int:
    from backdoor.harness.report.leaderboard import write_leaderboard

    try:
        md, csv = write_leaderboard(args.folder)
    except (FileNotFoundError, ValueError) as e:
        print(f"backdoor leaderboard: {e}", file=sys.stderr)
        return 1
    print(md.read_text())
    print(f"wrote {md} and {csv}", file=sys.stderr)
    return 0


def cmd_expect(args: argparse.Namespace) -> int:
    from backdoor.harness.calibration import calibrate
    from backdoor.harness.matrix import MatrixError, load_matrix

    try:
        matrix = load_matrix(args.matrix)
    except MatrixError as e:
        print(f"backdoor expect: {e}", file=sys.stderr)
        return 4
    if matrix.expected_path is None:
        print(f"backdoor expect: {args.matrix} has no 'expected:' file to write", file=sys.stderr)
        return 4
    if not args.calibrate:
        print("backdoor expect: expectations are calibrated bands, never one run's numbers: use "
              f"`backdoor expect {args.matrix} --calibrate` (runs the plan in the matrix's regression.calibrate: "
              f"{matrix.regression.calibrate})", file=sys.stderr)
        return 4
    command = f"backdoor expect {args.matrix} --calibrate" + "".join(f" --cells '{c}'" for c in args.cells or ())
    try:
        summary = calibrate(matrix, Path(args.results_dir).resolve(), Path(args.cache_dir).resolve(), args.workers,
                            run=not args.no_run, command=command, only=args.only, cells=args.cells)
    except (RuntimeError, ValueError) as e:  # ValueError: a damaged records file names its line
        print(f"backdoor expect: {e}", file=sys.stderr)
        return 1
    print(f"wrote calibrated bands for {len(summary['runs'])} runs ({', '.join(summary['runs'])}) to "
          f"{matrix.expected_path}")
    print("leave-one-out coverage (share of a held-out run's banded values inside the bands of the others): "
          + ", ".join(f"{k} {v:.3f}" for k, v in summary["leave_one_out_coverage"].items()))
    uncovered = []
    for line in summary["chaotic"]:
        key, metric = line.split()[:2]
        attack, defense = key.split("-")[2], key.rsplit("-", 1)[1]
        covered = matrix.regression.check_for(attack, defense, metric).kind != "band"
        print(f"chaotic: {line}" + ("" if covered else "  <- still checked as a band"))
        uncovered += [] if covered else [f"{attack}/{defense} {metric}"]
    if uncovered:
        print(f"backdoor expect: {len(uncovered)} chaotic band(s) are still checked as bands; give them a claim or "
              f"'off' in {args.matrix}'s regression.checks: {', '.join(uncovered)}", file=sys.stderr)
        return 1
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Pure attack: write a case's backdoored model, poisoned sets and trigger material to a folder."""
    import torch

    from backdoor.harness.cached_case import CaseNotFoundError
    from backdoor.checkpoints.export import ExportError
    from backdoor.harness.export import export_case

    torch.set_num_threads(args.threads)  # a rebuild trains: one thread gives the grid's numbers
    try:
        report = export_case(args.results_dir, args.case, args.out_dir, args.cache_dir, args.device)
    except (CaseNotFoundError, ExportError, ValueError, FileNotFoundError) as e:
        print(f"backdoor export: {e}", file=sys.stderr)
        return 1
    if report.rebuilt:
        print(f"backdoor export: not in the cache, rebuilt (and cached): {', '.join(report.rebuilt)}", file=sys.stderr)
    if not report.metrics_match:
        print(f"backdoor export: warning: the exported model scores {report.metrics}, its record says "
              f"{report.record_metrics} (rebuilt with other code or numerics?)", file=sys.stderr)
    for name in report.files:
        print(report.out_dir / name)
    shown = "  ".join(f"{title} {'-' if report.metrics.get(m) is None else f'{100 * report.metrics[m]:.2f}'}"
                      for m, title in (("c_acc", "C-Acc"), ("asr", "ASR"), ("r_acc", "R-Acc")))
    print(f"exported {report.case_id}: {shown}; load it with backdoor.load_model({str(report.out_dir)!r})",
          file=sys.stderr)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from backdoor.harness.bench import main as bench_main

    return bench_main(args)


def cmd_params(args: argparse.Namespace) -> int:
    """Print the method-parameter table, or check / rewrite a README's block of it."""
    from backdoor.harness.parameters import (COMMAND, END, START, declaration_problems, readme_difference,
                                             render_parameter_table, replace_block)

    for problem in declaration_problems():
        print(f"backdoor params: {problem}", file=sys.stderr)
    table = render_parameter_table()
    path = Path(args.check or args.write) if (args.check or args.write) else None
    if path is None:
        print(table, end="")
        return 0
    if not path.is_file():
        print(f"backdoor params: {path} does not exist", file=sys.stderr)
        return 4
    text = path.read_text()
    if args.check:
        difference = readme_difference(text, table)
        if difference is None:
            print(f"backdoor params: {path}'s parameter table is up to date")
            return 0
        print(f"backdoor params: {path}'s parameter table differs from the generated one (run `{COMMAND}`):\n"
              f"{difference}", file=sys.stderr)
        return 1
    try:
        new = replace_block(text, table)
    except ValueError:
        print(f"backdoor params: {path} has no {START} ... {END} markers; add them where the table goes",
              file=sys.stderr)
        return 1
    if new != text:
        path.write_text(new)
    print(f"backdoor params: {'wrote' if new != text else 'unchanged:'} the parameter table in {path}")
    return 0


def cmd_mutate(args: argparse.Namespace) -> int:
    """Apply each selected mutant to a copy of the checkout and run its method's tests; table of verdicts."""
    from backdoor._registry import UnknownNameError
    from backdoor.harness.mutate import (DEFAULT_TIMEOUT, exit_status, markdown_table, registered_methods, repo_root,
                                         run_jobs, select_jobs, write_report)

    root = repo_root()
    try:
        jobs = select_jobs(registered_methods(args.methods), root, args.mutant, args.do_nothing_only)
    except (UnknownNameError, ValueError) as e:
        print(f"backdoor mutate: {e}", file=sys.stderr)
        return 4
    print(f"backdoor mutate: {len(jobs)} mutant(s) of {len({j.target.method for j in jobs})} method(s), "
          f"{args.workers} at a time, in copies of {root}", file=sys.stderr, flush=True)

    def progress_line(r) -> None:
        print(f"  {r.method}/{r.mutant}: {r.caught_by} ({r.seconds:.0f} s)", file=sys.stderr, flush=True)

    try:
        results = run_jobs(jobs, root, workers=args.workers, timeout=args.timeout or DEFAULT_TIMEOUT,
                           on_result=progress_line)
    except RuntimeError as e:  # not a git checkout
        print(f"backdoor mutate: {e}", file=sys.stderr)
        return 4
    print(markdown_table(results), end="")
    if args.out:
        write_report(results, Path(args.out))
        print(f"backdoor mutate: wrote {args.out}", file=sys.stderr)
    return exit_status(results)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The whole parser; ``argv`` (the command line) limits the analysis tools and studies whose own options
    are added (importing one imports torch) to the one it names."""
    parser = argparse.ArgumentParser(prog="backdoor", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a matrix as a pytest grid; extra arguments go to pytest (-k, -n 2, -q)",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                         epilog="Any other argument goes to pytest: -k EXPR selects cases, -n N spreads them over N "
                                "workers (with --dist loadgroup added: one backdoored model's cases on one worker), "
                                "-q silences progress, -x stops at the first failure.")
    run.add_argument("matrix", help="the matrix YAML file")
    add_run_options(run.add_argument)
    run.add_argument("--strict", action="store_true",
                     help="fail cases that drift outside their calibrated bands or claims (else: print a drift "
                          "summary and exit 0; the test suite and CI are strict)")
    run.add_argument("--no-regression", action="store_true", help="skip the regression comparison")
    run.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                     help="run the cases on a Ray cluster (pip install -e .[ray]): ADDRESS host:port, else "
                          "$RAY_ADDRESS or a cluster started here, else a new local one; --ray-cpus, --ray-gpus, "
                          "--ray-retries, --ray-cache shared|object-store, --ray-node-cache and --ray-node-ip go "
                          "to pytest (see README)")
    run.add_argument("--plan", action="store_true",
                     help="list the cases, what is cached and what will be built, and a time estimate; run nothing")
    sub.add_parser("list", help="list registered datasets, models, attacks and defenses")
    board = sub.add_parser("leaderboard", help="re-render leaderboard.md/.csv from a results folder's records")
    board.add_argument("folder")
    expect = sub.add_parser("expect", help="calibrate a matrix's regression bands over seeds and numerics variants")
    expect.add_argument("matrix")
    expect.add_argument("--calibrate", action="store_true",
                        help="run the matrix's regression.calibrate plan (variant -> seeds) and write its bands")
    expect.add_argument("--no-run", action="store_true", help="only aggregate the calibration runs already recorded")
    expect.add_argument("--only", action="append", metavar="VARIANT",
                        help="run only this variant of the plan (repeatable), then aggregate every recorded run")
    expect.add_argument("--cells", metavar="ATTACK/DEFENSE", action="append",
                        help="recalibrate only the cells this wildcard selects (repeatable) (e.g. '*/nc' after a change to NC); "
                             "every other cell keeps its band and the calibration that wrote it")
    expect.add_argument("-n", "--workers", type=int, default=2, help="pytest-xdist workers per run (default 2)")
    expect.add_argument("--results-dir", default=os.environ.get("BACKDOOR_RESULTS", "results"),
                        help="results root; calibration runs go to <root>/_calibration/<variant>/ (default: results)")
    expect.add_argument("--cache-dir", default=os.environ.get("BACKDOOR_CACHE", ".backdoor-cache"),
                        help="artifact cache, shared by the variants (its keys carry the numerics) (default: .backdoor-cache)")
    export = sub.add_parser("export", help="pure attack: write a case's backdoored model (safetensors + model.json), "
                                           "poisoned training and test sets and trigger material to a folder")
    export.add_argument("results_dir", metavar="RESULTS_DIR",
                        help="a matrix's results folder (holding records.jsonl), or the results root")
    export.add_argument("--case", required=True, help="case id, e.g. digits-cnn_small-badnets-p0.1-s0-none")
    export.add_argument("out_dir", metavar="OUT_DIR", help="folder to write (new, empty, or a previous export)")
    export.add_argument("--cache-dir", default=os.environ.get("BACKDOOR_CACHE", ".backdoor-cache"),
                        help="artifact cache; artifacts not in it are rebuilt and cached (default: .backdoor-cache)")
    export.add_argument("--device", default="cpu")
    export.add_argument("--threads", type=int, default=1, help="CPU threads (default 1, as the grid)")
    bench = sub.add_parser("bench", help="print poisoning and training throughput (images/s)")
    bench.add_argument("--images", type=int, default=50_000, help="CIFAR-shaped images to poison")
    bench.add_argument("--train-images", type=int, default=4096, help="images per training epoch")
    bench.add_argument("--epochs", type=int, default=2)
    bench.add_argument("--model", default="cnn_small")
    bench.add_argument("--device", default="cpu")
    bench.add_argument("--attacks", default="*", help="attack wildcard")
    bench.add_argument("--repeats", type=int, default=5, help="interleaved rounds per measurement (default 5)")
    bench.add_argument("--attack-params", default="", help='JSON: attack -> parameter overrides, e.g. {"lc": {"steps": 10}}')
    params = sub.add_parser("params", help="print every method parameter: paper, reference code, ours, why "
                                           "(markdown); or check / rewrite README.md's block")
    where = params.add_mutually_exclusive_group()
    where.add_argument("--check", metavar="FILE", help="exit 1, naming the difference, if FILE's block between "
                       "<!-- parameters:start --> and <!-- parameters:end --> is not the generated table")
    where.add_argument("--write", metavar="FILE", help="rewrite FILE's block with the generated table")
    mutate = sub.add_parser("mutate", help="apply each method's mutants (deliberately broken versions) to a copy of "
                                           "the checkout and run its tests: every mutant must be caught",
                            epilog="Exit status 1 when a mutant survived (its tests all passed) or errored (did "
                                   "not apply, did not import, collection error, timeout).")
    mutate.add_argument("methods", nargs="*", metavar="METHOD",
                        help="attack or defense names (default: every registered one but none)")
    mutate.add_argument("--mutant", action="append", metavar="NAME", help="only this mutant (repeatable)")
    mutate.add_argument("--do-nothing-only", action="store_true", help="only the family's do-nothing mutant")
    mutate.add_argument("-n", "--workers", type=int, default=1, help="mutants run at once (default 1)")
    mutate.add_argument("--out", metavar="FILE", help="also write the table: markdown, or JSON if FILE ends in .json")
    mutate.add_argument("--timeout", type=float, default=None,
                        help="seconds per mutant before it is an ERROR (default 1800)")
    add_analysis_commands(sub, argv)
    return parser


def add_analysis_commands(sub, argv: list[str] | None = None) -> None:
    """Figures, analysis tools and studies (``backdoor plot | analyze | study``), when that module is present.
    Each of its sub-parsers sets ``func`` (args -> exit code)."""
    try:
        from backdoor.harness.cli_analysis import add_commands
    except ImportError as e:
        if e.name != "backdoor.harness.cli_analysis":
            raise
        return
    add_commands(sub, argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv)
    if argv[:1] == ["run"]:
        args, extra = parser.parse_known_args(argv)
        return cmd_run(args, extra)
    args = parser.parse_args(argv)
    handlers = {"list": cmd_list, "leaderboard": cmd_leaderboard, "expect": cmd_expect, "bench": cmd_bench,
                "params": cmd_params, "export": cmd_export, "mutate": cmd_mutate}
    if args.command not in handlers:
        return args.func(args)
    return handlers[args.command](args)


if __name__ == "__main__":
    raise SystemExit(main())
