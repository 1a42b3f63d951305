"""The ETA a running grid prints: seconds left, from the stage times its finished records measured."""
from __future__ import annotations

import statistics

from backdoor.harness.case import case_defense, case_group


def eta_seconds(finished: list[dict], pending: list[str], workers: int) -> float | None:
    """Seconds a grid has left, from the stage times its finished records measured: each pending case costs
    its defense's time, plus the time of building its group's backdoored (or clean) model when no case of that
    group has built it yet, else the time of loading it. (An average over finished cases counts every first
    case's build again for each case that only loads it: the first ETAs were 2 to 10 times too long.)"""
    timed = [r for r in finished if isinstance(r.get("stage_seconds"), dict)]
    if not timed or not pending:
        return None if pending else 0.0
    defense_times: dict[str, list[float]] = {}
    built, loaded = [], []
    for r in timed:
        defense = r["stage_seconds"].get("defense", 0.0)
        defense_times.setdefault(case_defense(r["case_id"]), []).append(defense)
        upstream = max(0.0, r.get("total_seconds", 0.0) - defense)
        hits = r.get("cache_hits") or {}
        (loaded if hits.get("backdoor_model") or hits.get("clean_model") else built).append(upstream)
    every_defense = [t for times in defense_times.values() for t in times]
    build = statistics.median(built) if built else statistics.median(loaded)
    load = statistics.median(loaded) if loaded else min(built)
    started = {case_group(r["case_id"]) for r in finished}
    total = 0.0
    for case_id in pending:
        group = case_group(case_id)
        total += statistics.median(defense_times.get(case_defense(case_id), every_defense))
        total += load if group in started else build
        started.add(group)
    return total / max(1, workers)
