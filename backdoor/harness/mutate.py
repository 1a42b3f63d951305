"""The mutation runner behind ``backdoor mutate``: apply each mutant of a method (``backdoor.mutants``) to a
temporary copy of the checkout and run the method's tests there; a mutant is caught when a test fails.

For one (method, mutant): copy the files ``git ls-files -co --exclude-standard`` lists (tracked and untracked,
not ignored) from the checkout root to a temporary folder; apply the mutant to the method's source file in the
copy; run the method's ``mutation_tests`` there with the copy first on ``PYTHONPATH`` and ``BACKDOOR_CACHE`` /
``BACKDOOR_RESULTS`` in the temporary folder, as ``pytest -x -q -p no:cacheprovider -p no:xdist -rfE``. The
verdict:

- CAUGHT: a test failed (pytest exit 1); the first ``FAILED`` (or ``ERROR``) node id of the summary is kept.
- SURVIVED: every test passed (exit 0).
- ERROR: anything else, with the reason: the mutant does not apply (its find text is not in the file exactly
  once), the mutated file does not compile or its module does not import, a collection error (exit 2), an
  internal or usage error (3, 4), no tests collected (5), or the timeout. A mutant that merely breaks imports
  is never counted as caught: the child process imports the mutated module before pytest starts.

``mutation_tests`` entries are files or node ids (``tests/test_fp.py::test_x``). They run as successive
pytest runs in the order declared, up to the first that fails, so a fast, decisive test listed first runs
first and a mutant it catches costs one short run. (One pytest run of ``a.py::t a.py`` would not do: pytest
merges overlapping arguments and runs the file in file order. A test listed first and again in its file runs
twice when it passes; ``--deselect`` is no help, as it drops every node id that merely starts with the
given one.)
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable

from backdoor.attacks import ATTACKS
from backdoor.defenses import DEFENSES
from backdoor.detectors import DETECTORS
from backdoor.mutants import DO_NOTHING, Mutant, family, mutants_of, source_file, tests_of

CAUGHT, SURVIVED, ERROR = "CAUGHT", "SURVIVED", "ERROR"
NOT_MUTATED = ("none",)  # registered, but no method: the no-defense row
PYTEST_OPTIONS = ("-x", "-q", "-p", "no:cacheprovider", "-p", "no:xdist", "-rfE")
IMPORT_FAILED = 97  # the child's exit status when the mutated module does not import
DEFAULT_TIMEOUT = 1800.0

# Run in the copy: import the mutated module, then pytest. argv: module, then pytest's arguments.
_CHILD = f"""
import importlib, sys
try:
    importlib.import_module(sys.argv[1])
except BaseException as e:
    print(f"MUTANT-IMPORT-FAILED {{sys.argv[1]}}: {{type(e).__name__}}: {{e}}", flush=True)
    sys.exit({IMPORT_FAILED})
import pytest
sys.exit(pytest.main(sys.argv[2:]))
"""


@dataclass(frozen=True)
class Target:
    """What a mutant is applied to (``source``, relative to the checkout root, whose import name is
    ``module``) and the tests that should catch it."""

    method: str
    family: str
    source: str
    module: str
    tests: tuple[str, ...]


@dataclass(frozen=True)
class Job:
    """One mutant of one target."""

    target: Target
    mutant: Mutant


@dataclass(frozen=True)
class MutationResult:
    """One row of the table."""

    method: str
    family: str
    mutant: str
    breaks: str
    status: str  # CAUGHT, SURVIVED or ERROR
    detail: str  # the catching test's node id, or why it is an ERROR
    seconds: float

    @property
    def caught_by(self) -> str:
        """The table's cell: the test id, SURVIVED, or ERROR: why."""
        return {CAUGHT: self.detail, SURVIVED: SURVIVED}.get(self.status, f"{ERROR}: {self.detail}")


def repo_root() -> Path:
    """The checkout this library was imported from (the folder above ``backdoor/``)."""
    return Path(__file__).resolve().parents[2]


def checkout_files(root: Path) -> list[str]:
    """Tracked and untracked, not ignored, files of the checkout, relative to ``root``."""
    try:
        listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=root, check=True,
                                capture_output=True).stdout.decode()
    except (OSError, subprocess.CalledProcessError) as e:
        raise RuntimeError(f"mutants run in copies of a git checkout; {root} is not one (or git is missing): "
                           f"{getattr(e, 'stderr', b'').decode(errors='replace').strip() or e}") from None
    return sorted({name for name in listed.split("\0") if name})


def copy_checkout(root: Path, files: Iterable[str], dest: Path) -> None:
    """Copy ``files`` (relative to ``root``) to ``dest``, keeping their relative paths."""
    for name in files:
        source = root / name
        if source.is_file():  # a tracked file deleted in the working tree is not copied
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)


def target_of(method: type, root: Path) -> Target:
    """The target of a registered attack or defense class in the checkout at ``root``."""
    try:
        source = source_file(method).resolve().relative_to(root.resolve())
    except ValueError:
        raise ValueError(f"{method.name}: its file {source_file(method)} is not inside the checkout {root}") from None
    return Target(method.name, family(method), source.as_posix(), method.__module__, tests_of(method))


DETECTOR_PREFIX = "detector:"  # names a detector whose name is also a defense's (``detector:nc``)


def registered_methods(names: list[str] | None = None) -> list[type]:
    """The named methods (attack, defense or detector names; ``detector:<name>`` for a detector that shares a
    defense's name), default every registered one but ``none``."""
    if not names:
        return ([ATTACKS.get(n) for n in ATTACKS.names()] + [DEFENSES.get(n) for n in DEFENSES.names()
                                                             if n not in NOT_MUTATED]
                + [DETECTORS.get(n) for n in DETECTORS.names()])
    return [_method_named(n) for n in names]


def _method_named(name: str) -> type:
    if name.startswith(DETECTOR_PREFIX):
        return DETECTORS.get(name[len(DETECTOR_PREFIX):])
    for registry in (DEFENSES, ATTACKS, DETECTORS):
        if name in registry:
            return registry.get(name)
    return ATTACKS.get(name)  # raises, naming the attacks


def select_jobs(methods: list[type], root: Path, mutant_names: list[str] | None = None,
                do_nothing_only: bool = False) -> list[Job]:
    """(method, mutant) pairs: every mutant of each method, or those named, or the do-nothing one only.
    A mutant name that no selected method has is an error."""
    wanted = {DO_NOTHING} if do_nothing_only else set(mutant_names or ())
    jobs = [Job(target_of(m, root), mutant) for m in methods for mutant in mutants_of(m)
            if not wanted or mutant.name in wanted]
    missing = wanted - {job.mutant.name for job in jobs}
    if missing:
        raise ValueError(f"no selected method has a mutant named {', '.join(sorted(missing))}")
    return jobs


def run_job(job: Job, root: Path, timeout: float = DEFAULT_TIMEOUT, files: list[str] | None = None) -> MutationResult:
    """Apply ``job``'s mutant to a temporary copy of the checkout at ``root`` and judge it by its tests."""
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix=f"mutant-{job.target.method}-") as tmp:
        copy = Path(tmp) / "checkout"
        copy_checkout(root, checkout_files(root) if files is None else files, copy)
        problem = apply_mutant(job, copy)
        status, detail = (ERROR, problem) if problem else run_tests(job.target, copy, Path(tmp), timeout)
    t, m = job.target, job.mutant
    return MutationResult(t.method, t.family, m.name, m.breaks, status, detail, round(time.monotonic() - started, 1))


def apply_mutant(job: Job, copy: Path) -> str | None:
    """Write the mutated source into the copy; returns why it could not be, or None."""
    path = copy / job.target.source
    if not path.is_file():
        return f"{job.target.source} is not in the checkout"
    try:
        mutated = job.mutant.apply(path.read_text(), job.target.source)
        compile(mutated, job.target.source, "exec")
    except ValueError as e:
        return f"does not apply: {e}"
    except SyntaxError as e:
        return f"the mutated {job.target.source} does not compile: {e.msg} (line {e.lineno})"
    path.write_text(mutated)
    return None


def run_tests(target: Target, copy: Path, scratch: Path, timeout: float) -> tuple[str, str]:
    """Run the target's test stages in the copy; (status, detail) of the first stage that does not pass."""
    env = child_environment(copy, scratch)
    deadline = time.monotonic() + timeout
    for entry in target.tests:
        command = [sys.executable, "-c", _CHILD, target.module, *PYTEST_OPTIONS, entry]
        returncode, output = run_child(command, copy, env, deadline - time.monotonic())
        if returncode != 0:
            return verdict(returncode, output, timeout)
    return SURVIVED, ""


def child_environment(copy: Path, scratch: Path) -> dict[str, str]:
    """This process's environment with the copy first on the path and the cache and results in ``scratch``."""
    # A runner started inside a pytest-xdist worker (the suite's own mutation test) must not pass on the
    # worker's identity: the children are standalone pytest runs.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST") and k != "PYTEST_CURRENT_TEST"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(copy), env.get("PYTHONPATH", "")) if p)
    env["BACKDOOR_CACHE"] = str(scratch / "cache")
    env["BACKDOOR_RESULTS"] = str(scratch / "results")
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def run_child(command: list[str], cwd: Path, env: dict[str, str], timeout: float) -> tuple[int | None, str]:
    """(exit status, stdout + stderr); status None when ``timeout`` ran out and its process group was killed."""
    if timeout <= 0:
        return None, ""
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=timeout)
        return process.returncode, output
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # pytest and anything it started
        output, _ = process.communicate()
        return None, output


_SUMMARY = re.compile(r"^(FAILED|ERROR) (\S.*?)(?: - .*)?$")
_EXIT_MEANING = {2: "interrupted (collection error?)", 3: "pytest internal error", 4: "pytest usage error",
                 5: "no tests collected"}


def verdict(returncode: int | None, output: str, timeout: float) -> tuple[str, str]:
    """(status, detail) of a stage that did not pass."""
    lines = [line.rstrip() for line in output.splitlines() if line.strip()]
    if returncode is None:
        return ERROR, f"timed out after {timeout:g} s"
    if returncode == IMPORT_FAILED:
        return ERROR, next((line for line in lines if line.startswith("MUTANT-IMPORT-FAILED")), "import failed")
    if returncode == 1:
        for line in lines:
            match = _SUMMARY.match(line)
            if match:
                return CAUGHT, match.group(2) + (" (error)" if match.group(1) == "ERROR" else "")
        return CAUGHT, lines[-1] if lines else "a test failed"
    why = _EXIT_MEANING.get(returncode, f"exit status {returncode}")
    reason = next((line for line in lines if line.startswith(("ERROR", "E "))), lines[-1] if lines else "")
    return ERROR, f"pytest exit {returncode}, {why}: {reason}"[:300]


def run_jobs(jobs: list[Job], root: Path, *, workers: int = 1, timeout: float = DEFAULT_TIMEOUT,
             on_result: Callable[[MutationResult], None] | None = None) -> list[MutationResult]:
    """Run the jobs, ``workers`` at a time (each a subprocess); results in the jobs' order."""
    files = checkout_files(root)

    def one(job: Job) -> MutationResult:
        result = run_job(job, root, timeout, files)
        if on_result is not None:
            on_result(result)
        return result

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(one, jobs))


def exit_status(results: list[MutationResult]) -> int:
    """0 when every mutant was caught, else 1."""
    return 0 if all(r.status == CAUGHT for r in results) else 1


def markdown_table(results: list[MutationResult]) -> str:
    """The table: method, family, mutant, what it breaks, caught by (test id, SURVIVED or ERROR: why), seconds."""
    rows = ["| method | family | mutant | breaks | caught by | seconds |", "|---|---|---|---|---|---|"]
    for r in results:
        cells = (r.method, r.family, r.mutant, r.breaks, r.caught_by, f"{r.seconds:.1f}")
        rows.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    return "\n".join(rows) + "\n"


def write_report(results: list[MutationResult], path: Path) -> None:
    """Markdown table, or JSON rows when ``path`` ends in .json."""
    if path.suffix == ".json":
        path.write_text(json.dumps([{**asdict(r), "caught_by": r.caught_by} for r in results], indent=1) + "\n")
    else:
        path.write_text(markdown_table(results))
