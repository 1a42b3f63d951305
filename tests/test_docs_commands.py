"""Every command in README.md and docs/*.md works as written.

Commands are read from the shell code blocks. Each block must pass ``bash -n``; every ``backdoor ...`` command
must parse with the CLI's own argparse parser (a ``backdoor run``'s extra arguments go to pytest and are checked
as pytest's); every ``pytest ...`` / ``python -m pytest ...`` command must parse with pytest's option parser,
plugins included, and its ``-k`` expression must compile; every repository path a command, a link or a
backticked path names must exist. The cheap commands also run: ``backdoor list``, ``--help``, ``backdoor
params``, ``backdoor run MATRIX --plan`` of a matrix that needs no downloaded data, and the Python scripts a page
writes itself (a python block whose first line is ``# name.py``; a yaml block ``# name.yaml`` is a matrix file
the page's commands use), each in a temporary folder. Python blocks must compile, and the method skeletons of
docs/adding-a-method.md register, their mutants apply and their tests pass.
"""
from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import re
import runpy
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

CLI_MODULE = "backdoor.harness.cli"  # the console script `backdoor` is this module's main()
ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL = {"bash", "sh", "shell", "console"}
REPO_DIRS = ("backdoor/", "benchmarks/", "docs/", "fixtures/", "matrices/", "tests/", ".ci/")
NO_DATA_MATRICES = {"quick.yaml", "smoke.yaml", "smoke_full.yaml", "all_to_all.yaml", "cluster_drill.yaml"}  # digits: embedded
SEPARATORS = {";", "&&", "||", "|", "&", "(", ")", ";;"}
WRITTEN = re.compile(r"^# ([\w./-]+\.(?:py|ya?ml))\b")
BACKTICKED_PATH = re.compile(r"`((?:backdoor|benchmarks|docs|fixtures|matrices|tests|\.ci)/[^`\s]*)`")
LINK = re.compile(r"\]\(([^)\s]+)\)")


@dataclass
class Block:
    lang: str
    body: str
    line: int


@dataclass
class Command:
    line: int
    env: dict[str, str]
    argv: list[str]


@dataclass
class Page:
    path: Path
    blocks: list[Block]
    commands: list[Command] = field(default_factory=list)
    written: dict[str, str] = field(default_factory=dict)  # file name -> content, from "# name" blocks


def code_blocks(text: str) -> list[Block]:
    blocks, lang, start, body = [], None, 0, []
    for number, line in enumerate(text.splitlines(), 1):
        if line.startswith("```") and lang is None:
            lang, start, body = line[3:].strip().lower(), number, []
        elif line.startswith("```"):
            blocks.append(Block(lang, "\n".join(body) + "\n", start))
            lang = None
        elif lang is not None:
            body.append(line)
    return blocks


def split_commands(block: Block) -> list[Command]:
    """Simple commands of a shell block: continuation lines joined, split at ; && || | & and parentheses."""
    commands = []
    for offset, line in enumerate(block.body.replace("\\\n", " ").splitlines(), 1):
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        try:
            tokens = list(lexer)
        except ValueError:
            continue  # unbalanced quotes: bash -n reports it
        segment: list[str] = []
        for token in [*tokens, ";"]:
            if token not in SEPARATORS:
                segment.append(token)
                continue
            env = {}
            while segment and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", segment[0]):
                name, _, value = segment.pop(0).partition("=")
                env[name] = value
            if segment:
                commands.append(Command(block.line + offset, env, segment))
            segment = []
    return commands


def read_page(path: Path) -> Page:
    page = Page(path, code_blocks(path.read_text()))
    for block in page.blocks:
        match = WRITTEN.match(block.body)
        if match:
            page.written[match.group(1)] = block.body
        if block.lang in SHELL:
            page.commands += split_commands(block)
    return page


def kind(argv: list[str]) -> tuple[str, list[str]] | None:
    """('backdoor' | 'pytest' | 'script', arguments), or None for a command this test does not check."""
    head = argv[0]
    if head == "backdoor":
        return "backdoor", argv[1:]
    if head == "pytest":
        return "pytest", argv[1:]
    if head in ("python", "python3") and argv[1:3] == ["-m", "pytest"]:
        return "pytest", argv[3:]
    if head in ("python", "python3") and argv[1:3] == ["-m", CLI_MODULE]:
        return "backdoor", argv[3:]
    if head in ("python", "python3") and len(argv) > 1 and argv[1].endswith(".py"):
        return "script", argv[1:]
    return None


def exists(path: str, page: Page) -> bool:
    path = path.split("::")[0].rstrip(".,:;")
    if "<" in path or "*" in path or "..." in path:
        return True
    return (ROOT / path).exists() or path in page.written


def heading_anchors(text: str) -> set[str]:
    """The anchors GitHub gives a page's headings: lower case, punctuation dropped, spaces as hyphens."""
    headings = re.findall(r"^#{1,6} (.+)$", text, re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def reference_problems(page: Page) -> list[str]:
    text = page.path.read_text()
    problems = [f"`{p}` does not exist" for p in BACKTICKED_PATH.findall(text) if not exists(p, page)]
    for target in LINK.findall(text):
        if re.match(r"^[a-z]+:", target):
            continue
        local, _, anchor = target.partition("#")
        linked = page.path.parent / local if local else page.path
        if not linked.exists():
            problems.append(f"link ({target}) does not exist")
        elif anchor and linked.suffix == ".md" and anchor not in heading_anchors(linked.read_text()):
            problems.append(f"link ({target}): no heading #{anchor} in {linked.name}")
    for command in page.commands:
        for token in command.argv:
            if token.startswith(REPO_DIRS) and not exists(token, page):
                problems.append(f"line {command.line}: {token} does not exist")
        if command.argv[:2] == ["pip", "install"] and "-c" in command.argv:
            constraints = command.argv[command.argv.index("-c") + 1]
            if not (ROOT / constraints).is_file():
                problems.append(f"line {command.line}: {constraints} does not exist")
    return problems


def bash_problems(page: Page) -> list[str]:
    problems = []
    for block in page.blocks:
        if block.lang in SHELL:
            done = subprocess.run(["bash", "-n"], input=block.body, capture_output=True, text=True)
            if done.returncode:
                problems.append(f"block at line {block.line}: bash -n: {done.stderr.strip()}")
    return problems


def python_problems(page: Page) -> list[str]:
    problems = []
    for block in page.blocks:
        if block.lang == "python":
            try:
                compile(block.body, f"{page.path.name}:{block.line}", "exec")
            except SyntaxError as e:
                problems.append(f"python block at line {block.line}: {e}")
    return problems


def backdoor_parse_problem(args: list[str]) -> tuple[str | None, list[str]]:
    """(what the CLI's parser says is wrong, or None; the arguments `backdoor run` passes on to pytest)."""
    parser = importlib.import_module(CLI_MODULE).build_parser()
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            if args[:1] == ["run"]:
                _, extra = parser.parse_known_args(args)
                return None, extra
            parser.parse_args(args)
    except SystemExit as e:
        if e.code:
            return out.getvalue().strip().splitlines()[-1], []
    return None, []


PYTEST_CHECK = r"""
import json, sys
from _pytest.config import UsageError, _prepareconfig
from _pytest.mark.expression import Expression
errors = []
for args in json.load(sys.stdin):
    error = None
    try:
        config = _prepareconfig(list(args))
        if config.option.keyword:
            Expression.compile(config.option.keyword)
        config._ensure_unconfigure()
    except (UsageError, SyntaxError) as e:  # SyntaxError: a -k expression that does not compile
        lines = str(e).strip().splitlines() or [type(e).__name__]
        error = next((line.strip() for line in lines if "error" in line), lines[-1])
    except SystemExit as e:
        error = f"exit {e.code}"
    errors.append(error)
json.dump(errors, sys.stdout)
"""


def pytest_parse_problems(arglists: list[list[str]]) -> list[str | None]:
    """pytest's own parser (with every plugin of this checkout) on each argument list, in one process."""
    if not arglists:
        return []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", PYTEST_CHECK], input=json.dumps(arglists), capture_output=True,
                          text=True, cwd=ROOT, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def is_cheap(what: str, args: list[str], page: Page) -> bool:
    if what == "script":
        return args[0] in page.written
    if what != "backdoor" or not args:
        return False
    if args == ["list"] or "--help" in args or "-h" in args:
        return True
    if args[0] == "params":
        return "--write" not in args
    if args[0] == "run" and "--plan" in args and len(args) > 1:
        return args[1] in page.written or (args[1].startswith("matrices/") and Path(args[1]).name in NO_DATA_MATRICES)
    return False


def run_cheap(command: Command, what: str, args: list[str], workdir: Path) -> str | None:
    """Run one cheap command in-process in workdir; None when it succeeds, else its last output lines."""
    args = [str(ROOT / a) if not (workdir / a).exists() and (ROOT / a).exists() and not a.startswith("-") else a
            for a in args]
    out, old_cwd, old_env = io.StringIO(), Path.cwd(), dict(os.environ)
    os.environ.update(command.env)
    os.chdir(workdir)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            if what == "script":
                runpy.run_path(args[0], run_name="__main__")
                code = 0
            else:
                code = importlib.import_module(CLI_MODULE).main(args)
    except SystemExit as e:
        code = e.code or 0
    except Exception as e:  # noqa: BLE001 - reported as the command's failure
        code = f"{type(e).__name__}: {e}"
    finally:
        os.chdir(old_cwd)
        os.environ.clear()
        os.environ.update(old_env)
    if code == 0:
        return None
    return f"exit {code}: " + " | ".join(out.getvalue().strip().splitlines()[-3:])


def pytest_arglists(page: Page) -> list[list[str]]:
    """The argument lists a page gives pytest: its pytest commands' and its `backdoor run` commands' extras."""
    arglists = []
    for command in page.commands:
        found = kind(command.argv)
        if found and found[0] == "pytest":
            arglists.append(found[1])
        elif found and found[0] == "backdoor" and found[1][:1] == ["run"]:
            arglists.append(backdoor_parse_problem(found[1])[1])
    return [args for args in arglists if args]


def page_problems(page: Page, workdir: Path, pytest_errors: dict | None = None) -> list[str]:
    """Everything wrong with a page's commands, references and code blocks; runs its cheap commands.

    pytest_errors: pytest's verdict per argument list, already computed for several pages in one process."""
    problems = reference_problems(page) + bash_problems(page) + python_problems(page)
    for name, body in page.written.items():
        if not name.startswith(REPO_DIRS):  # a skeleton of a repository file is compiled, never written there
            (workdir / name).parent.mkdir(parents=True, exist_ok=True)
            (workdir / name).write_text(body)
    pending = []
    for command in page.commands:
        found = kind(command.argv)
        if found is None:
            continue
        what, args = found
        shown = f"line {command.line}: {shlex.join(command.argv)}"
        if what == "backdoor":
            problem, extra = backdoor_parse_problem(args)
            if problem:
                problems.append(f"{shown}: {problem}")
                continue
            if extra:
                pending.append((shown, extra))
        elif what == "pytest":
            pending.append((shown, args))
        elif what == "script" and not exists(args[0], page):
            problems.append(f"{shown}: {args[0]} does not exist")
            continue
        if is_cheap(what, args, page):
            failure = run_cheap(command, what, args, workdir)
            if failure:
                problems.append(f"{shown}: {failure}")
    if pytest_errors is None or any(tuple(args) not in pytest_errors for _, args in pending):
        pytest_errors = dict(zip([tuple(args) for _, args in pending],
                                 pytest_parse_problems([args for _, args in pending])))
    for shown, args in pending:
        error = pytest_errors[tuple(args)]
        if error:
            problems.append(f"{shown}: pytest: {error}")
    return problems


@pytest.fixture(scope="module")
def pytest_errors() -> dict:
    """pytest's parser on every page's argument lists, in one process (it imports the checkout's plugins)."""
    arglists = sorted({tuple(args) for doc in DOCS for args in pytest_arglists(read_page(doc))})
    return dict(zip(arglists, pytest_parse_problems([list(args) for args in arglists])))


@pytest.mark.parametrize("doc", DOCS, ids=[str(d.relative_to(ROOT)) for d in DOCS])
def test_every_command_of_the_page_works(doc, tmp_path, pytest_errors):
    assert page_problems(read_page(doc), tmp_path, pytest_errors) == []


def test_every_page_has_commands_or_links_and_the_readme_is_a_guide():
    readme = read_page(ROOT / "README.md")
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250
    assert any(c.argv[:2] == ["backdoor", "list"] for c in readme.commands)
    linked = set(LINK.findall((ROOT / "README.md").read_text()))
    assert {f"docs/{d.name}" for d in DOCS[1:]} <= linked, "a docs page the README does not link"


def test_the_readme_installs_and_tests_as_ci_does():
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()
          if line.strip().startswith(("python3 -m venv", "pip install", "python -m pytest"))]
    assert len(ci) == 3, ci
    readme = "\n".join(b.body for b in read_page(ROOT / "README.md").blocks if b.lang in SHELL)
    for line in ci:
        assert line in readme, f".ci/run's `{line}` is not the README's"


SKELETON_CHECK = r"""
import importlib.util, inspect, sys
from pathlib import Path

def load(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

methods, tests = sys.argv[1].split(","), sys.argv[2].split(",")
for i, path in enumerate(methods):
    source = Path(path).read_text()
    module = load(path, f"skeleton_method_{i}")
    for cls in [c for c in vars(module).values() if inspect.isclass(c) and "mutants" in vars(c)]:
        assert len(cls.mutants) >= 2, f"{cls.__name__} declares fewer than two mutants"
        for mutant in cls.mutants:
            mutant.apply(source, path)  # raises unless its find text occurs exactly once
for i, path in enumerate(tests):
    module = load(path, f"skeleton_test_{i}")
    for name, function in vars(module).items():
        if name.startswith("test_"):
            function()
            print("passed", name)
"""


def test_the_method_skeletons_register_and_pass_their_tests(tmp_path):
    """docs/adding-a-method.md's skeletons, loaded in a separate process (so that the registries of this one
    never hold them): they register, their mutants apply, and their tests pass."""
    page = read_page(ROOT / "docs" / "adding-a-method.md")
    paths = {name: tmp_path / Path(name).name for name in page.written}
    for name, body in page.written.items():
        paths[name].write_text(body)
    methods = [str(p) for n, p in paths.items() if n.startswith(("backdoor/attacks/", "backdoor/defenses/"))]
    tests = [str(p) for n, p in paths.items() if n.startswith("tests/")]
    assert len(methods) == 2 and len(tests) == 2, sorted(page.written)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", SKELETON_CHECK, ",".join(methods), ",".join(tests)],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("passed test_") == 2, done.stdout


PLANTED = """# planted

```bash
backdoor list
backdoor frobnicate results/smoke
backdoor leaderboard
backdoor run matrices/nowhere.yaml --plan
backdoor run matrices/smoke.yaml --sedes 3
backdoor run matrices/quick.yaml -k "badnets and"
python -m pytest -n 2 --dist loadgrop
python benchmarks/nowhere.py
```

```yaml
# bad.yaml
name: bad
datasets: [digits]
models: [cnn_small]
attacks: {badnets: {size: -1}}
defenses: [none]
poison_ratios: [0.1]
seeds: [0]
```

```bash
backdoor run bad.yaml --plan
```

```bash
echo "unclosed
```

```python
def broken(:
```

See [the missing page](nowhere.md), [a missing heading](#nowhere) and `matrices/missing.yaml`.
"""


def test_planted_bad_commands_are_caught(tmp_path):
    doc = tmp_path / "docs" / "planted.md"
    doc.parent.mkdir()
    doc.write_text(PLANTED)
    work = tmp_path / "work"
    work.mkdir()
    problems = page_problems(read_page(doc), work)
    expected = {
        "frobnicate": "invalid choice", "backdoor leaderboard": "required", "nowhere.yaml": "does not exist",
        "--sedes": "unrecognized arguments", "badnets and": "pytest", "loadgrop": "invalid choice",
        "benchmarks/nowhere.py": "does not exist", "unclosed": "", "broken(": "python block",
        "(nowhere.md)": "does not exist", "matrices/missing.yaml": "does not exist",
        "bad.yaml --plan": "exit 4", "(#nowhere)": "no heading"}
    for planted, reason in expected.items():
        hits = [p for p in problems if reason in p and (planted in p or planted == "unclosed" and "bash -n" in p
                                                         or planted == "broken(" and "python block" in p)]
        assert hits, f"the planted {planted!r} was not caught; problems: {problems}"
    assert not [p for p in problems if "backdoor list" in p], "a good command was reported"
