"""What ``backdoor list`` shows, read from the source of the registered modules instead of importing them.

Importing any dataset, model or method imports torch (several seconds); listing needs only each registered
name, its kind and its description, which the source states literally: the ``register_*("name")`` decorator,
a class's ``kind = "..."`` and the docstring. ``tests/test_cli_speed.py`` checks this view against the
imported registries, so the two cannot drift apart.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parent.parent  # backdoor/
#: A detector's task is its base class's (``backdoor.detectors.base``).
DETECTOR_TASKS = {"InputDetector": "input", "DataDetector": "data", "ModelDetector": "model"}


@dataclass(frozen=True)
class Entry:
    name: str
    kind: str | None  # the class's ``kind`` (attacks and defenses), a detector's task; None for function factories
    title: str | None  # the class's ``title`` (its name in tables); None where it declares none
    summary: str


def first_paragraph(doc: str | None) -> str:
    """The docstring's first paragraph on one line: a description is never cut mid-sentence."""
    lines: list[str] = []
    for line in (doc or "").strip().splitlines():
        if not line.strip():
            break
        lines.append(line.strip())
    return " ".join(lines)


def catalog(family: str) -> list[Entry]:
    """The registered entries of ``backdoor.<family>`` (``attacks``, ``defenses``, ``detectors``, ``models``,
    ``data``), sorted by name, as the registry's ``names()`` lists them."""
    entries: list[Entry] = []
    for path in sorted((PACKAGE_ROOT / family).glob("*.py")):
        if not path.name.startswith("_"):
            entries += _registered_in(ast.parse(path.read_text(), filename=str(path)))
    return sorted(entries, key=lambda e: e.name)


def _registered_in(module: ast.Module) -> list[Entry]:
    module_doc = ast.get_docstring(module)
    out = []
    for node in module.body:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef)):
            name = _registered_name(node)
            if name is not None:
                doc = ast.get_docstring(node) or module_doc
                kind = _class_constant(node, "kind") or _detector_task(node)
                out.append(Entry(name, kind, _class_constant(node, "title"), first_paragraph(doc)))
    return out


def _detector_task(node: ast.ClassDef | ast.FunctionDef) -> str | None:
    bases = [b.id for b in getattr(node, "bases", []) if isinstance(b, ast.Name)]
    return next((DETECTOR_TASKS[b] for b in bases if b in DETECTOR_TASKS), None)


def _registered_name(node: ast.ClassDef | ast.FunctionDef) -> str | None:
    """``"x"`` for ``@register_attack("x")`` or ``@ATTACKS.register("x")``."""
    for decorator in node.decorator_list:
        if isinstance(decorator, ast.Call) and decorator.args and isinstance(decorator.args[0], ast.Constant):
            func = decorator.func
            called = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
            if called.startswith("register"):
                return decorator.args[0].value
    return None


def _class_constant(node: ast.ClassDef | ast.FunctionDef, attribute: str) -> str | None:
    """The constant a class body assigns to ``attribute`` (``kind = "..."``); None for a function."""
    if isinstance(node, ast.ClassDef):
        for statement in node.body:
            if isinstance(statement, ast.Assign) and isinstance(statement.value, ast.Constant) and any(
                    isinstance(t, ast.Name) and t.id == attribute for t in statement.targets):
                return statement.value.value
    return None
