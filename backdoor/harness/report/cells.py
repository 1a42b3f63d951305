"""What every results table shares: the attacks' and defenses' display order and titles, and how a cell over
seeds is written (percent, mean ± the interval's half-width)."""
from __future__ import annotations

import math

from backdoor.attacks import ATTACKS
from backdoor.defenses import DEFENSES
from backdoor.harness.records import METRICS
from backdoor.stats import Summary
from backdoor.targets import ALL_TO_ALL

# Attack names of rows that no registered attack makes: the clean reference and a user's own model's trigger.
UNREGISTERED_ATTACK_TITLES = {"clean": "clean (reference)", "images": "given triggered images",
                              "notrigger": "no trigger given"}
METRIC_TITLES = dict(zip(METRICS, ("C-Acc", "ASR", "R-Acc")))
DER_TITLE = "DER"
ALL_TO_ALL_MARK = " (all-to-all)"


def attack_order() -> list[str]:
    """Attacks in display order: the clean reference, then the registered ones by their files' ``order``."""
    return ["clean", *ATTACKS.order()]


def defense_order() -> list[str]:
    return DEFENSES.order()


def attack_title(name: str) -> str:
    """An attack's title in tables and figures: its file's ``title`` (its name where it is not registered)."""
    return UNREGISTERED_ATTACK_TITLES.get(name) or ATTACKS.title(name)


def defense_title(name: str) -> str:
    return DEFENSES.title(name)


def attack_titles(records: list[dict]) -> dict[str, str]:
    """Each attack's title in tables; an attack whose records have ``target: all-to-all`` is marked as such (not
    the clean reference, which no trigger reaches)."""
    all_to_all = {r["attack"] for r in records if r.get("target") == ALL_TO_ALL and r["attack"] != "clean"}
    return {r["attack"]: attack_title(r["attack"]) + (ALL_TO_ALL_MARK if r["attack"] in all_to_all else "")
            for r in records}


def _order(values, preferred: list[str]) -> list:
    rank = {name: i for i, name in enumerate(preferred)}
    return sorted(set(values), key=lambda v: (rank.get(v, len(rank)), v))


def _ratio_text(ratio: float) -> str:
    """A poison ratio as tables show it: ``-`` for no poisoning (the clean reference, a user's model)."""
    return "-" if ratio == 0 else f"{ratio:g}"


def _percent(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{100 * value:.2f}"


def _cell_text(summary: Summary | None) -> str:
    if summary is None:
        return "-"
    if summary.n == 1:
        return _percent(summary.mean)
    return f"{_percent(summary.mean)} ± {100 * summary.half_width:.2f}"
