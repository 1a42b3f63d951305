"""Every method parameter beside the paper's value, the reference code's and ours (``backdoor params``).

- paper: BackdoorBench's supplementary Tables 1 (attacks) and 2 (defenses), including their general settings
  (in the text conversion Table 1's rows are shifted: LC's PGD takes the eps of 8, SIG the f of 6).
- reference: the public BackdoorBench code, as the method docstrings quote it.
- ours: the default of the registered class's ``__init__`` signature, read here with ``inspect``, so the table
  cannot drift from the code.
- why: where ours differs, the reason (from the method's docstring); where it agrees, where it comes from.

Each method's own file declares them: ``parameters = {name: Param(paper, reference, why)}`` on its class
(``backdoor._registry.Param``; NONE ("—") marks a source that gives no value, NOT_STATED one whose value the
docstrings do not quote; ``argued=`` the default a why argues for, so that a changed default fails the tests
until its why is revisited), and each defense its ``budgets``: the stages it trains and the budget each uses
(``backdoor.defenses.base.Stage``). This module only reads the registries. The tests fail when a parameter is
added without a row, when a row names a parameter that does not exist, when a why argues for another default,
when a method lacks its title, order or budgets, and when docs/methods.md's block is not the generated table.
"""
from __future__ import annotations

import difflib
import inspect
import textwrap
from typing import Any

from backdoor._registry import UNARGUED, Param
from backdoor.attacks import ATTACKS
from backdoor.defenses import DEFENSES
from backdoor.defenses.base import BUDGETS, Stage
from backdoor.detectors import DETECTORS

GENERIC = ("self", "target", "cap_ratio")  # shared by every attack: not listed
START, END = "<!-- parameters:start -->", "<!-- parameters:end -->"
COMMAND = "backdoor params --write docs/methods.md"
UNDECLARED = Param("UNDECLARED", "UNDECLARED", "UNDECLARED")


def _registries():
    return {"attack": ATTACKS, "defense": DEFENSES, "detector": DETECTORS}


def signature_defaults(cls) -> dict[str, Any]:
    """The keyword parameters of every ``__init__`` of ``cls``'s hierarchy, in signature order (the class's
    own first), with their defaults (``inspect.Parameter.empty`` where required); generic ones left out."""
    out: dict[str, Any] = {}
    for klass in cls.__mro__[:-1]:
        if "__init__" not in vars(klass):
            continue
        for p in inspect.signature(klass.__init__).parameters.values():  # follows the type-check wrapper
            if p.name not in GENERIC and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
                out.setdefault(p.name, p.default)
    return out


def format_value(value: Any) -> str:
    """A default as the table shows it: floats in 6 significant digits, sequences as tuples."""
    if value is inspect.Parameter.empty:
        return "(required)"
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, tuple)):
        return "(" + ", ".join(format_value(v) for v in value) + ")"
    return str(value)


def methods() -> list[tuple[str, str, type]]:
    """(family, name, class) of every registered attack, defense and detector, in registry (name) order."""
    return [(family, name, registry.get(name)) for family, registry in _registries().items()
            for name in registry.names()]


def _file(cls) -> str:
    return inspect.getsourcefile(cls) or cls.__module__


def declaration_problems() -> list[str]:
    """Parameters without a row, rows naming no parameter, whys arguing for another default, methods without a
    title, a description, an order or (defenses) budgets, unknown budgets: one line each (empty when the
    declarations are complete)."""
    problems = []
    for family, name, cls in methods():
        params, declared, where = set(signature_defaults(cls)), set(cls.parameters), _file(cls)
        problems += [f"{name}.{p}: parameter without a Param in {cls.__name__}.parameters ({where})"
                     for p in sorted(params - declared)]
        problems += [f"{name}.{p}: {cls.__name__}.parameters ({where}) names no parameter of {cls.__name__}"
                     for p in sorted(declared - params)]
        problems += [f"{name}: {cls.__name__} declares no {attribute} ({where})"
                     for attribute in ("title", "description", "order") if getattr(cls, attribute) is None]
        if family == "defense" and cls.budgets is None:
            problems.append(f"{name}: {cls.__name__} declares no budgets (a tuple of Stage) ({where})")
        problems += [f"{name}: unknown budget {stage.budget!r} (allowed: {', '.join(BUDGETS)})"
                     for stage in getattr(cls, "budgets", None) or () if stage.budget not in BUDGETS]
    problems += [f"{r['method']}.{r['parameter']}: its why argues for {r['why_for']!r} but the default is now "
                 f"{r['default']!r}; update its Param in the method's file"
                 for r in parameter_rows() if r["why_for"] is not UNARGUED and r["why_for"] != r["default"]]
    return problems


def parameter_rows() -> list[dict]:
    """One dict per (method, parameter) of every registered method: family, method, parameter, paper,
    reference, ours (formatted), default (the signature's value), why and why_for (the default the why argues
    for, where the declaration names one; else ``inspect.Parameter.empty``). An undeclared parameter gets
    "UNDECLARED" cells (the tests fail on it); a declared parameter that does not exist gets no row."""
    rows = []
    for family, name, cls in methods():
        for param, default in signature_defaults(cls).items():
            declared = cls.parameters.get(param, UNDECLARED)
            rows.append({"family": family, "method": name, "parameter": param, "paper": declared.paper,
                         "reference": declared.reference, "ours": format_value(default), "default": default,
                         "why": declared.why, "why_for": declared.argued})
    return rows


def budget_stages(cls) -> tuple[Stage, ...]:
    """A defense's declared stages (one UNDECLARED stage where it declares none)."""
    return cls.budgets or (Stage("UNDECLARED", "UNDECLARED", "UNDECLARED"),)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]


def method_rows(family: str) -> list[list[str]]:
    """The methods table's rows of one family, in display order: name, kind, description."""
    registry = _registries()[family]
    kind = "task" if family == "detector" else "kind"  # a detector's kind is its task (input, data, model)
    return [[f"`{name}`", str(getattr(registry.get(name), kind, "")).replace("_", " "),
             registry.get(name).description or "UNDECLARED"] for name in registry.order()]


def render_parameter_table() -> str:
    """The docs/methods.md block: the attacks and defenses with what each does, their parameter tables and the
    defenses' training budgets."""
    rows = parameter_rows()
    header = ["parameter", "paper (Tables 1-2)", "reference (BackdoorBench)", "ours", "why"]
    lines = ["<!-- generated by `backdoor params` from the methods' files (their signatures and declarations);",
             f"     do not edit by hand: run `{COMMAND}` -->", ""]
    lines += _table(["attack", "kind", "trigger and paper defaults"], method_rows("attack")) + [""]
    lines += _table(["defense", "kind", "what it does (paper defaults)"], method_rows("defense")) + [""]
    if DETECTORS.names():
        lines += _table(["detector", "task", "what it does (paper defaults)"], method_rows("detector")) + [""]
    lines += ["### Parameters: paper, reference, ours", ""]
    for family, title in (("attack", "Attacks"), ("defense", "Defenses"), ("detector", "Detectors")):
        if family == "detector" and not DETECTORS.names():
            continue
        lines += [{"attack": f"**{title}** (generic parameters `target`, `cap_ratio` left out)",
                   "defense": f"**{title}**",
                   "detector": f"**{title}** (paper: the detector's own paper; reference: the code the issue names, "
                               "BackdoorBench's or BackdoorBox's, else the authors')"}[family], ""]
        body = [[f"`{r['method']}.{r['parameter']}`", r["paper"], r["reference"], f"`{r['ours']}`", r["why"]]
                for r in rows if r["family"] == family]
        lines += _table(header, body) + [""]
    budget_rows = []
    for name in DEFENSES.names():
        for stage in budget_stages(DEFENSES.get(name)):
            shown = f"`{stage.budget}`" if stage.budget in ("defense_training", "retraining") else stage.budget
            budget_rows.append([f"`{name}`", stage.what, shown, stage.set_by])
    lines += textwrap.wrap(
        "**What each defense trains with**: `defense_training` is the matrix's defense budget (Table 2: SGD, "
        "momentum 0.9, weight decay 5e-4, batch 256, cosine, 100 epochs), `retraining` the attack's budget (the "
        "matrix's `training`), for training from scratch on the poisoned set; \"own parameters\" is a loop of "
        "the defense's own. The parameters listed override the budget's epochs, learning rate or batch size "
        "where they are set (None: the budget's).", width=110, break_on_hyphens=False) + [""]
    lines += _table(["defense", "stage", "trains with", "set by"], budget_rows)
    return "\n".join(lines) + "\n"


def readme_block(text: str) -> str | None:
    """The text between the page's markers (None when they are missing)."""
    start, end = text.find(START), text.find(END)
    if start < 0 or end < start:
        return None
    return text[start + len(START):end].strip("\n") + "\n"


def replace_block(text: str, table: str) -> str:
    start, end = text.find(START), text.find(END)
    if start < 0 or end < start:
        raise ValueError(f"no {START} ... {END} markers to write the table between")
    return text[:start + len(START)] + "\n" + table + text[end:]


def readme_difference(text: str, table: str | None = None) -> str | None:
    """None when the page's block equals the generated table, else what differs (a short unified diff)."""
    table = render_parameter_table() if table is None else table
    block = readme_block(text)
    if block is None:
        return f"no {START} ... {END} markers"
    if block == table:
        return None
    diff = list(difflib.unified_diff(block.splitlines(), table.splitlines(), "docs/methods.md", "generated", n=0,
                                     lineterm=""))
    shown = diff[:30] + ([f"... ({len(diff) - 30} more diff lines)"] if len(diff) > 30 else [])
    return "\n".join(shown)
