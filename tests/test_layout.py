"""The package's layout, read from the source (``ast``), every import counted, function-level ones included:
the library (``backdoor`` outside ``backdoor.harness``) never imports the harness, nothing under ``backdoor/``
imports pytest, and the package's modules import one another without a circle.

``python tests/test_layout.py [PACKAGE_DIR]`` prints the circles and the upward imports it finds.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent.parent / "backdoor"
HARNESS = "backdoor.harness"


def module_files(package_dir: Path) -> dict[str, Path]:
    """``{module name: source file}`` of every module under ``package_dir`` (a package is its ``__init__``)."""
    out = {}
    for file in sorted(package_dir.rglob("*.py")):
        parts = (package_dir.name, *file.relative_to(package_dir).with_suffix("").parts)
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = file
    return out


def _absolute(module: str, is_package: bool, level: int, target: str | None) -> str:
    """The absolute name a (possibly relative) ``from`` import of ``module`` names."""
    if level == 0:
        return target or ""
    parts = module.split(".") if is_package else module.split(".")[:-1]
    return ".".join(parts[:len(parts) - (level - 1)] + ([target] if target else []))


def imported_names(module: str, file: Path, modules=frozenset()) -> set[str]:
    """Every dotted name ``module`` imports, at any depth of its source (functions, ``if`` blocks, classes).
    ``from x import y`` names ``x.y`` when that is one of ``modules``, else ``x`` (``y`` is an attribute). The
    parent packages an import runs implicitly are not counted (every submodule would otherwise import them)."""
    names = set()
    for node in ast.walk(ast.parse(file.read_text(), str(file))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(module, file.name == "__init__.py", node.level, node.module)
            names.update(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names)
    return names


def import_graph(package_dir: Path = PACKAGE_DIR) -> dict[str, set[str]]:
    """``{module: the package's modules it imports}``."""
    files = module_files(package_dir)
    return {module: {name for name in imported_names(module, file, files) if name in files and name != module}
            for module, file in files.items()}


def external_imports(package_dir: Path, top_level: str) -> list[str]:
    """The modules under ``package_dir`` that import the top-level package ``top_level`` (e.g. pytest)."""
    return sorted(module for module, file in module_files(package_dir).items()
                  if any(name.split(".")[0] == top_level for name in imported_names(module, file)))


def upward_imports(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    """``(library module, harness module)`` for each import of the harness by the library."""
    def in_harness(name: str) -> bool:
        return name == HARNESS or name.startswith(HARNESS + ".")

    return sorted((module, target) for module, targets in graph.items() if not in_harness(module)
                  for target in targets if in_harness(target))


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted: every import circle."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(out)


def test_the_library_never_imports_the_harness():
    assert upward_imports(import_graph()) == []


def test_nothing_in_the_package_imports_pytest():
    assert external_imports(PACKAGE_DIR, "pytest") == []


def test_the_package_has_no_import_circle():
    assert import_cycles(import_graph()) == []


def _write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "backdoor"


def test_the_checker_finds_planted_violations(tmp_path):
    """A synthetic package: a library module importing the harness inside a function, a relative import closing
    a circle, a module importing pytest; the checker names each, and a clean package gives nothing."""
    package = _write(tmp_path, {
        "backdoor/__init__.py": "",
        "backdoor/lib.py": "def f():\n    from backdoor.harness import engine\n",
        "backdoor/other.py": "import os\n",
        "backdoor/harness/__init__.py": "",
        "backdoor/harness/engine.py": "from backdoor.harness.report import render\nfrom backdoor import other\n",
        "backdoor/harness/report.py": "from . import engine\n\ndef g():\n    import pytest\n",
    })
    graph = import_graph(package)
    assert upward_imports(graph) == [("backdoor.lib", "backdoor.harness.engine")]
    assert import_cycles(graph) == [["backdoor.harness.engine", "backdoor.harness.report"]]
    assert external_imports(package, "pytest") == ["backdoor.harness.report"]
    clean = _write(tmp_path / "clean", {"backdoor/__init__.py": "", "backdoor/a.py": "from backdoor import b\n",
                                        "backdoor/b.py": "import os\n"})
    assert (upward_imports(import_graph(clean)), import_cycles(import_graph(clean))) == ([], [])
    assert external_imports(clean, "pytest") == []


if __name__ == "__main__":
    package_dir = Path(sys.argv[1]).resolve() if len(sys.argv) > 1 else PACKAGE_DIR
    graph = import_graph(package_dir)
    cycles, upward = import_cycles(graph), upward_imports(graph)
    print(f"{len(graph)} modules, {sum(map(len, graph.values()))} imports")
    print(f"{len(cycles)} import circle(s)")
    for cycle in cycles:
        print("  circle:", " <-> ".join(cycle))
    print(f"{len(upward)} upward import(s) (library -> harness)")
    for module, target in upward:
        print(f"  {module} -> {target}")
    print("pytest imported by:", external_imports(package_dir, "pytest"))
