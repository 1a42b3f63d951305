"""``backdoor run MATRIX --plan``: what a run would do, before it does it.

Lists the selected cases (pytest's own collection, so ``-k`` and ``--seeds`` select as in a run), which of each
case's artifacts (dataset, clean reference, poisoned set, backdoored model, defended model) the cache already
holds and which will be built, and an estimate of the time from stage timings recorded in the records of every
matrix under the results root (the same case with the same training budgets first, else the median of the same
attack or defense on the same dataset and model; build figures are preferred over a rerun's cache-hit
timings). A build no record has timed is counted as unknown and said so: the estimate is then a lower bound,
or unknown when no build is timed. Attack material built inside an attack's preparation (LC's, LF's, SSBA's) is
counted with the backdoored model's stage. Nothing is trained.
"""
from __future__ import annotations

import dataclasses
import json
import statistics
import subprocess
import sys
from pathlib import Path

from backdoor.checkpoints import user_models
from backdoor.attacks import create_attack
from backdoor.harness.cache import ArtifactCache
from backdoor.defenses import create_defense
from backdoor.detectors import create_detector
from backdoor.harness.launch import grid_command, workers_of
from backdoor.harness.matrix import MatrixError, load_matrix, parse_seeds
from backdoor.harness.case import CLEAN, Case
from backdoor.harness import specs
from backdoor.harness.runner import Runner
from backdoor.harness.records import RECORDS, read_records

STAGES = ("dataset", "clean_model", "poison", "backdoor_model", "defense", "detection")
STAGE_ARTIFACTS = {"dataset": "dataset", "clean_model": "clean_model", "poison": "poisoned",
                   "backdoor_model": "backdoor_model", "defense": "defended_model", "detection": "detection"}
OWN_STAGES = ("defense", "detection")  # stages timed by the case's defense (or detector), not its attack


def case_artifacts(runner: Runner, case: Case) -> dict[str, tuple[str, dict]]:
    """Stage -> (cache kind, spec) of every artifact the case needs; computed without building anything."""
    out = {"dataset": ("dataset", specs.dataset_spec(case))}
    if case.user_model is not None:  # pure defense: the checkpoint is read, not built
        out_upstream = user_models.upstream_spec(case.user_model, specs.dataset_spec(case), case.model_params)
    elif case.attack == CLEAN:
        upstream = {**specs.model_spec(case), "seed": case.seed}
        out["clean_model"] = ("clean_model", upstream)
        out_upstream = {"clean_model": upstream}
    else:
        attack = create_attack(case.attack, target=case.target, **case.attack_params)
        backdoor = specs.backdoor_spec(case, attack)
        poison = {"backdoor_model": backdoor} if attack.kind == "training_controllable" else specs.attack_spec(case, attack)
        out["poison"] = ("poisoned", poison)
        out["backdoor_model"] = ("backdoor_model", backdoor)
        out_upstream = backdoor
    if case.detector:
        detector = create_detector(case.detector, **case.detector_params)
        out["detection"] = ("detection", specs.detector_spec(case, out_upstream, detector))
        return out
    defense = create_defense(case.defense, **case.defense_params)
    if defense.kind != "none":
        out["defense"] = ("defended_model", specs.defense_spec(case, out_upstream, defense))
    return out


def cached(cache: ArtifactCache, kind: str, spec: dict) -> bool:
    return (cache.path(kind, spec) / "manifest.json").is_file()


def timing_records(results_root: Path, folder: Path) -> list[dict]:
    """The records of every matrix's folder under the results root, this matrix's last (they win)."""
    others = [f for f in sorted(results_root.glob(f"*/{RECORDS}")) if f.parent != folder]
    own = read_records(folder) if (folder / RECORDS).exists() else []
    return [r for path in others for r in _timed_lines(path)] + own


def _timed_lines(path: Path) -> list[dict]:
    """Another matrix's records, read only: a damaged line is skipped there, not moved aside (its run's job)."""
    out = []
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("case_id"), str):
            out.append(record)
    return out


def timing_key(case_id: str, stage: str, training: dict, defense_training: dict | None) -> tuple:
    """What makes two stages the same build: the case and its training budgets (the defense's too)."""
    budgets = (training, defense_training) if stage in OWN_STAGES else (training,)
    return case_id, stage, json.dumps(budgets, sort_keys=True, default=str)


def stage_estimates(records: list[dict]) -> tuple[dict, dict]:
    """Seconds per ``timing_key`` from records, and medians per (attack or defense, stage, dataset, model)."""
    by_case, by_method = {}, {}
    for r in records:
        if not all(isinstance(r.get(k) or {}, dict) for k in ("stage_seconds", "build_seconds", "cache_hits")):
            continue
        built = {**(r.get("stage_seconds") or {}), **(r.get("build_seconds") or {})}
        for stage, seconds in built.items():
            if not isinstance(seconds, (int, float)):
                continue
            if (r.get("build_seconds") or {}).get(stage) is None and (r.get("cache_hits") or {}).get(stage):
                continue  # a cache hit's time is not a build's
            by_case[timing_key(r["case_id"], stage, r.get("training"), r.get("defense_training"))] = seconds
            method = r.get("defense") if stage in OWN_STAGES else r.get("attack")
            by_method.setdefault((method, stage, r.get("dataset"), r.get("model")), []).append(seconds)
    return by_case, {k: statistics.median(v) for k, v in by_method.items()}


def selected_case_ids(matrix_path: Path, extra: list[str], forwarded: list[str]) -> list[str]:
    """Case ids pytest would run (its own collection, with -k / --seeds / -m applied)."""
    keep, skip = [], False
    for a in extra:  # drop xdist's options: collection needs no workers
        if skip:
            skip = False
        elif a in ("-n", "--numprocesses", "--dist"):
            skip = True
        elif a in ("-q", "--quiet", "-v", "--verbose") or (a.startswith("-") and set(a[1:]) <= {"q"}) \
                or (a.startswith("-") and set(a[1:]) <= {"v"}):
            continue  # the plan reads collect-only's one-line-per-case output
        elif not (a.startswith("-n") or a.startswith("--numprocesses=") or a.startswith("--dist=")):
            keep.append(a)
    command = grid_command(matrix_path, [*forwarded, *keep, "--collect-only", "-q", "--regression", "off"])
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode not in (0, 5):
        raise SystemExit(done.stdout + done.stderr)
    return [line.split("test_case[", 1)[1].rstrip("]") for line in done.stdout.splitlines() if "::test_case[" in line]


def print_plan(matrix_path: Path, args, extra: list[str]) -> int:
    try:
        matrix = load_matrix(matrix_path)
        if args.seeds:
            matrix = dataclasses.replace(matrix, seeds=parse_seeds(args.seeds, lambda m: MatrixError(f"--seeds: {m}")))
    except MatrixError as e:
        print(f"backdoor run: {e}", file=sys.stderr)
        return 4
    forwarded = ["--seeds", str(args.seeds)] if args.seeds else []
    ids = set(selected_case_ids(matrix_path, extra, forwarded))
    cases = [c for c in matrix.cases() if c.case_id in ids]
    cache = ArtifactCache(Path(args.cache_dir).resolve())
    runner = Runner(cache)
    folder = Path(args.results_dir).resolve() / matrix.name
    records = timing_records(folder.parent, folder)
    by_case, by_method = stage_estimates(records)
    planned: set[str] = set()  # artifacts an earlier case of the plan builds
    total, unknown = 0.0, 0
    print(f"plan for {matrix_path} ({len(cases)} case(s); cache {cache.root}; timings from {len(records)} record(s) "
          f"under {folder.parent})")
    for case in cases:
        parts = []
        artifacts = case_artifacts(runner, case)
        for stage, (kind, spec) in artifacts.items():
            key = str(cache.path(kind, spec))
            if cached(cache, kind, spec):
                parts.append(f"{stage}: cached")
                continue
            if key in planned:
                parts.append(f"{stage}: built above")
                continue
            planned.add(key)
            seconds = _recorded_seconds(case, stage, by_case, by_method)
            if seconds is None:
                unknown += 1
                parts.append(f"{stage}: build (time unknown)")
            else:
                if stage == "backdoor_model":  # the attack's material (LC, LF, SSBA) is prepared with it
                    seconds += _recorded_seconds(case, "attack_material", by_case, by_method) or 0.0
                total += seconds
                parts.append(f"{stage}: build ~{seconds:.1f} s" if seconds < 10 else f"{stage}: build ~{seconds:.0f} s")
        print(f"  {case.case_id}: " + ", ".join(parts))
    print(estimate_line(total, unknown, max(1, workers_of(extra))))
    return 0


def _recorded_seconds(case: Case, stage: str, by_case: dict, by_method: dict) -> float | None:
    key = timing_key(case.case_id, stage, case.training.to_dict(), case.defense_training.to_dict())
    method = case.defense if stage in OWN_STAGES else case.attack
    return by_case.get(key, by_method.get((method, stage, case.dataset, case.model)))


def estimate_line(total: float, unknown: int, workers: int) -> str:
    """The estimate, with builds of unknown time said as unknown (never counted as zero)."""
    if unknown and not total:
        return (f"estimate: unknown: no record times any of the {unknown} build(s) (no run of these cases or "
                "methods yet); a first run records them for the next plan")
    if total == 0:
        return "estimate: nothing to build (every artifact is cached)"
    known = f"~{_minutes(total)} of builds on one worker, ~{_minutes(total / workers)} with {workers} worker(s)"
    if unknown:
        return f"estimate: more than {known}: {unknown} build(s) have no recorded timing yet, not counted"
    return f"estimate: {known}"


def _minutes(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"
