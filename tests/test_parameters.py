"""The parameter table (``backdoor params``): every parameter of every registered method has a declared row, the
"ours" column is the signature's default, each defense declares the budgets it trains with, and docs/methods.md's
block is the generated table (the anti-drift check: it fails whenever a default changes until
``backdoor params --write docs/methods.md`` is run)."""
import inspect
import re
import sys
from pathlib import Path

import pytest

from backdoor.harness import parameters
from backdoor._registry import Method, Registry
from backdoor.harness.cli import main
from backdoor.harness.parameters import (COMMAND, END, START, format_value, methods, parameter_rows, readme_block,
                                 readme_difference, render_parameter_table)

README = Path(__file__).resolve().parents[1] / "docs" / "methods.md"
METHODS = methods()
IDS = [f"{family}-{name}" for family, name, _ in METHODS]


def constructor_defaults(cls) -> dict:
    """Keyword parameters of every ``__init__`` in the hierarchy with their defaults, read independently of
    ``backdoor.harness.parameters`` (``Method.param_names`` lists them)."""
    out = {}
    for klass in cls.__mro__[:-1]:
        if "__init__" in vars(klass):
            for p in inspect.signature(klass.__init__).parameters.values():
                out.setdefault(p.name, p.default)
    return {n: out[n] for n in cls.param_names() if n not in ("target", "cap_ratio")}


@pytest.mark.parametrize("family, name, cls", METHODS, ids=IDS)
def test_every_parameter_has_a_row_and_every_row_a_parameter(family, name, cls):
    params = set(constructor_defaults(cls))
    declared = set(cls.parameters)
    assert not params - declared, (
        f"{name}: parameter(s) {sorted(params - declared)} have no row; declare Param(paper, reference, why) for "
        f"them in {cls.__name__}.parameters ({cls.__module__}), then run `{COMMAND}`")
    assert not declared - params, (
        f"{name}: {cls.__name__}.parameters declares {sorted(declared - params)}, which {cls.__name__} does not "
        f"take; remove or rename the row(s) in {cls.__module__}, then run `{COMMAND}`")


@pytest.mark.parametrize("family, name, cls", METHODS, ids=IDS)
def test_every_method_records_each_parameter_under_its_name(family, name, cls):
    """``params()`` (recorded, and part of every cache key) reads each constructor parameter back by its name:
    a method that stores one under another attribute fails in the grid before it trains."""
    recorded = cls().params()
    for parameter, default in parameters.signature_defaults(cls).items():
        expected = list(default) if isinstance(default, tuple) else default  # sequences are recorded as lists
        assert parameter in recorded and recorded[parameter] == expected, (name, parameter)


@pytest.mark.parametrize("family, name, cls", METHODS, ids=IDS)
def test_every_method_declares_its_title_description_and_order(family, name, cls):
    assert isinstance(cls.title, str) and cls.title, f"{name}: declare `title` on {cls.__name__}"
    assert isinstance(cls.description, str) and cls.description, (
        f"{name}: declare `description` (what it does, with its paper defaults) on {cls.__name__}")
    assert isinstance(cls.order, int), f"{name}: declare `order` (an int, its place in tables) on {cls.__name__}"


def test_declarations_are_complete():
    assert parameters.declaration_problems() == []


@pytest.mark.parametrize("family, name, cls", METHODS, ids=IDS)
def test_ours_is_the_signature_default(family, name, cls):
    rows = {r["parameter"]: r for r in parameter_rows() if (r["family"], r["method"]) == (family, name)}
    defaults = constructor_defaults(cls)
    assert list(rows) == [p for p in parameters.signature_defaults(cls)]
    for param, default in defaults.items():
        assert rows[param]["default"] == default, f"{name}.{param}"
        assert rows[param]["ours"] == format_value(default), f"{name}.{param}"
        assert all(rows[param][k] and rows[param][k] != "UNDECLARED" for k in ("paper", "reference", "why"))
        argued = rows[param]["why_for"]
        assert argued is inspect.Parameter.empty or argued == default, (
            f"{name}.{param}: the why in {cls.__module__} argues for {argued!r} but the default is now "
            f"{default!r}; revisit its Param(..., argued={argued!r}), then run `{COMMAND}`")


def test_format_value():
    assert format_value(None) == "None" and format_value(True) == "True"
    assert format_value(2 ** 1.5) == "2.82843" and format_value(5e-4) == "0.0005" and format_value(6.0) == "6"
    assert format_value((500.0, 1000.0, 1000.0)) == "(500, 1000, 1000)"
    assert format_value("ica") == "ica" and format_value(inspect.Parameter.empty) == "(required)"


@pytest.mark.parametrize("name", sorted(n for f, n, _ in METHODS if f == "defense"))
def test_declared_budgets_match_what_the_defense_reads(name):
    """A budget named in a stage must be one the defense's module reads (``inputs.training`` is the matrix's
    defense_training, ``inputs.retraining`` or ``retrain_without`` the attack's budget), and every budget it
    reads must be named in its declaration."""
    cls = dict((n, c) for f, n, c in METHODS if f == "defense")[name]
    source = inspect.getsource(sys.modules[cls.__module__])
    reads = {"defense_training": "inputs.training" in source,
             "retraining": "inputs.retraining" in source or "retrain_without(" in source}
    stages = cls.budgets
    text = " ".join(f"{stage.what} {stage.budget} {stage.set_by}" for stage in stages)
    for budget, used in reads.items():
        named = any(stage.budget == budget for stage in stages)
        assert not (named and not used), f"{name}: declares a stage on {budget} but its module never reads it"
        assert not (used and budget not in text), f"{name}: reads {budget} but {cls.__name__}.budgets never names it"


def test_rendered_tables_are_well_formed():
    table = render_parameter_table()
    rows = parameter_rows()
    for r in rows:
        assert f"`{r['method']}.{r['parameter']}`" in table
    for block in table.split("\n\n"):
        lines = [line for line in block.splitlines() if line.startswith("|")]
        widths = {len(re.findall(r"(?<!\\)\|", line)) for line in lines}
        assert len(widths) <= 1, f"a table row has a stray '|': {block[:200]}"
    body = [line for line in table.splitlines() if line.startswith("| `")]
    assert len(body) == len(METHODS) + len(rows) + sum(len(cls.budgets) for family, _, cls in METHODS
                                                       if family == "defense")
    for family, name, cls in METHODS:  # the methods table: one row per method, its kind (task), its description
        kind = cls.task if family == "detector" else cls.kind
        assert f"| `{name}` | {kind.replace('_', ' ')} | {cls.description.replace('|', chr(92) + '|')} |" in table


def test_readme_block_is_the_generated_table():
    text = README.read_text()
    assert readme_block(text) is not None, f"docs/methods.md lacks the {START} ... {END} markers"
    difference = readme_difference(text)
    assert difference is None, (
        f"docs/methods.md's parameter table is out of date (a default or a declared row changed): run `{COMMAND}`\n"
        f"{difference}")


def test_cli_check_names_the_difference_and_write_fixes_it(tmp_path, capsys):
    copy = tmp_path / "README.md"
    copy.write_text(f"# x\n\n{START}\n{render_parameter_table()}{END}\n\nafter\n")
    assert main(["params", "--check", str(copy)]) == 0
    stale = copy.read_text().replace("| `lc.steps` |", "| `lc.stepz` |")
    copy.write_text(stale)
    capsys.readouterr()
    assert main(["params", "--check", str(copy)]) == 1
    err = capsys.readouterr().err
    assert "lc.stepz" in err and "lc.steps" in err and COMMAND in err
    assert main(["params", "--write", str(copy)]) == 0
    assert main(["params", "--check", str(copy)]) == 0
    assert copy.read_text().startswith("# x\n\n") and copy.read_text().endswith(f"{END}\n\nafter\n")
    no_markers = tmp_path / "plain.md"
    no_markers.write_text("# nothing\n")
    assert main(["params", "--check", str(no_markers)]) == 1
    assert main(["params", "--write", str(no_markers)]) == 1 and no_markers.read_text() == "# nothing\n"
    capsys.readouterr()
    assert main(["params"]) == 0 and capsys.readouterr().out == render_parameter_table()


def test_registry_display_order_and_titles_come_from_the_classes():
    """``order`` sorts (ties and undeclared ones by name, undeclared last); ``title`` falls back to the name."""
    registry = Registry("toy")
    for name, order, title in (("zeta", 1, "Zeta"), ("alpha", 2, None), ("beta", None, "Beta"), ("gamma", 1, "G")):
        registry.register(name)(type(name, (Method,), {"order": order, "title": title}))
    assert registry.order() == ["gamma", "zeta", "alpha", "beta"]
    assert [registry.title(n) for n in ("zeta", "alpha", "unregistered")] == ["Zeta", "alpha", "unregistered"]
