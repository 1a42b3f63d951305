"""Digests of the source code that decides an artifact's content, for cache keys.

The code of an artifact is derived, never listed by hand: the modules that build it (a method's, dataset's or
model's module, and ``backdoor.harness.runner``, which derives seeds, chooses the defender's clean subset and calls
the builders), and every module of the ``backdoor`` package they import, followed transitively. Imports are
found by parsing each file (``ast``), at any depth of it (a function-level import counts too), plus the
``__init__.py`` of every package on the way, which Python runs when it imports a submodule. Only a module's
``__getattr__`` (a lazy public attribute, such as ``backdoor.load_model``) is not followed: no builder runs it.

A new import in any of these files extends the set by itself, so the digest cannot go stale when the code grows.
"""
from __future__ import annotations

import ast
import hashlib
import sys
from functools import lru_cache
from pathlib import Path

PACKAGE = "backdoor"
_PACKAGE_DIR = Path(__file__).resolve().parent.parent
LAZY_HOOKS = ("__getattr__",)  # module functions whose imports no builder runs


def module_file(name: str, package_dir: Path | None = None) -> Path | None:
    """The source file of a module of the package, or None when ``name`` is not a module (an attribute imported
    by ``from x import name``). Without ``package_dir``: the loaded module's ``__file__`` where it is imported,
    else the file in this package's folder; with it, the file in that copy of the package."""
    loaded = getattr(sys.modules.get(name), "__file__", None) if package_dir is None else None
    if loaded:
        return Path(loaded)
    base = (package_dir or _PACKAGE_DIR).joinpath(*name.split(".")[1:])
    for candidate in (base.parent / f"{base.name}.py", base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _is_package_file(file: Path) -> bool:
    return file.name == "__init__.py"


def _absolute(module: str, file: Path, level: int, target: str | None) -> str:
    """The absolute module name of a (possibly relative) ``from`` import in ``module``."""
    if level == 0:
        return target or ""
    parts = module.split(".")
    package = parts if _is_package_file(file) else parts[:-1]
    base = package[:len(package) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def _lazy_nodes(tree: ast.Module) -> set[int]:
    """ids of the nodes inside the module's lazy hooks (``__getattr__``), whose imports are not followed."""
    hooks = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name in LAZY_HOOKS]
    return {id(inner) for hook in hooks for inner in ast.walk(hook)}


def imported_modules(module: str, file: Path) -> frozenset[str]:
    """The package's modules ``module`` (its source in ``file``) imports, as absolute names; a ``from x import
    y`` yields ``x`` and, where it is a module, ``x.y``. Parsed once per file content."""
    return _imports(module, str(file), file.read_bytes())


@lru_cache(maxsize=512)
def _imports(module: str, file: str, source: bytes) -> frozenset[str]:
    tree = ast.parse(source, filename=file)
    skip = _lazy_nodes(tree)
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(module, Path(file), node.level, node.module)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return frozenset(name for name in found if name == PACKAGE or name.startswith(PACKAGE + "."))


def _with_parents(name: str) -> list[str]:
    """``a.b.c`` -> ``a``, ``a.b``, ``a.b.c``: importing a submodule runs every package above it."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def source_closure(*roots: str, package_dir: Path | None = None) -> dict[str, Path]:
    """Module name -> source file of ``roots`` and everything of the package they import, transitively
    (``package_dir``: read from that copy of the package)."""
    files: dict[str, Path] = {}
    pending = [parent for root in roots for parent in _with_parents(root)]
    while pending:
        name = pending.pop()
        if name in files:
            continue
        file = module_file(name, package_dir)
        if file is None:
            continue
        files[name] = file
        pending += [parent for imported in imported_modules(name, file) for parent in _with_parents(imported)]
    return dict(sorted(files.items()))


def code_digest(*roots: str, package_dir: Path | None = None) -> str:
    """sha256 (16 hex digits) of the names and bytes of ``source_closure(*roots)`` (read afresh at each call;
    callers memoise)."""
    digest = hashlib.sha256()
    for name, file in source_closure(*roots, package_dir=package_dir).items():
        digest.update(name.encode() + b"\0" + file.read_bytes() + b"\0")
    return digest.hexdigest()[:16]
