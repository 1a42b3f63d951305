"""Load what a finished case cached (dataset, trigger, backdoored and defended model), never training.

The analysis tools of BackdoorBench (paper section 3.2) work on a case's saved outputs. Here a case is rebuilt
from the fields of its record in ``records.jsonl`` and its specs are computed by ``backdoor.harness.runner.Runner``,
so the cache keys are the ones the run used. The cache is wrapped so that every build function raises
``NotCachedError``: a missing artifact is an error telling to run the case first, never a silent retrain.
"""
from __future__ import annotations

import os
from pathlib import Path

from backdoor.analysis._artifacts import CaseArtifacts
from backdoor.harness.cache import ArtifactCache
from backdoor.harness.case import CLEAN, Case, case_group
from backdoor.harness.case_record import StageLog
from backdoor.harness.records import read_records
from backdoor.harness import specs
from backdoor.harness.runner import Runner
from backdoor.training import TrainConfig


class NotCachedError(RuntimeError):
    """An artifact of the case is not in the cache (the case was not run with this cache and this code)."""


class CaseNotFoundError(LookupError):
    """No record of that case id in the results folder."""


class CachedOnly(ArtifactCache):
    """An ``ArtifactCache`` whose builds raise ``NotCachedError`` instead of training."""

    def __init__(self, root: str | os.PathLike, case_id: str):
        super().__init__(root)
        self.case_id = case_id

    def get_or_build(self, kind, spec, build):
        def refuse():
            raise NotCachedError(
                f"{self.case_id}: the {kind} artifact is not cached under {self.path(kind, spec)}: run the case "
                f"first (backdoor run <matrix> -k {self.case_id!r}) with this cache (--cache-dir {self.root}) and "
                "this code (editing a method's source changes its cache keys)")

        if not self.path(kind, spec).is_dir():  # absent: refuse before the cache creates a lock file for it
            refuse()
        return super().get_or_build(kind, spec, refuse)


def find_record(results_dir: str | Path, case_id: str) -> dict:
    """The record of ``case_id`` in ``results_dir/records.jsonl`` (a clear error naming close ids if absent)."""
    records = read_records(results_dir)
    for record in records:
        if record["case_id"] == case_id:
            return record
    prefix = case_group(case_id)
    close = sorted(r["case_id"] for r in records if r["case_id"].startswith(prefix))[:5]
    raise CaseNotFoundError(f"no case {case_id!r} in {Path(results_dir) / 'records.jsonl'}"
                   + (f"; cases of that model: {', '.join(close)}" if close else ""))


def case_from_record(record: dict) -> Case:
    """Rebuild the ``Case`` a record was made from (its parameters are the resolved ones the run used)."""
    if record.get("detector"):
        raise ValueError(f"{record['case_id']} is a detection case: analyse the model it inspected, the case "
                         f"{record['case_id'].rsplit('-', 1)[0]}-none")
    if record.get("source") == "user":
        raise ValueError(f"{record['case_id']} is a user-model case (pure defense): its model is the checkpoint "
                         f"{(record.get('user_model') or {}).get('checkpoint')}, not an artifact of the cache")
    attack_params = {k: v for k, v in (record.get("attack_params") or {}).items() if k != "target"}
    return Case(matrix=record["matrix"], dataset=record["dataset"], model=record["model"], attack=record["attack"],
                defense=record["defense"], ratio=record["poison_ratio"], seed=record["seed"],
                target=record.get("target", 0), dataset_params=record.get("dataset_params") or {},
                model_params=record.get("model_params") or {}, attack_params=attack_params,
                defense_params=record.get("defense_params") or {},
                training=TrainConfig.from_dict(record["training"]),
                defense_training=TrainConfig.from_dict(record["defense_training"]),
                clean_fraction=record.get("clean_fraction", 0.05))


def load_case(results_dir: str | Path, case_id: str, cache_dir: str | Path | None = None,
              device: str = "cpu") -> CaseArtifacts:
    """Load a finished case's artifacts from the cache; raises ``NotCachedError`` rather than train."""
    record = find_record(results_dir, case_id)
    if record.get("status") != "ok":
        raise ValueError(f"{case_id} did not produce a model: status {record.get('status')} ({record.get('reason')})")
    case = case_from_record(record)
    cache_dir = cache_dir or os.environ.get("BACKDOOR_CACHE", ".backdoor-cache")
    runner = Runner(CachedOnly(cache_dir, case_id), device)
    log_ = StageLog()
    data = runner.dataset(case, log_)
    attack, poisoned = None, None
    if case.attack == CLEAN:
        model = runner.clean_model(case, data, log_)
        upstream = {"clean_model": {**specs.model_spec(case), "seed": case.seed}}
    else:
        attack = runner.attack(case, data, log_)
        model, poisoned = runner.backdoored_model(case, attack, data, log_)
        upstream = specs.backdoor_spec(case, attack)
    defended = None
    if case.defense != "none":
        defended, _ = runner.defend(case, model, data, poisoned, upstream, log_)
    return CaseArtifacts(case, data, attack, model, defended, poisoned.x if poisoned is not None else None,
                         poisoned.mask if poisoned is not None else None)


def output_dir(results_dir: str | Path, case_id: str) -> Path:
    """``RESULTS_DIR/analysis/<case>/``, created."""
    folder = Path(results_dir) / "analysis" / case_id
    folder.mkdir(parents=True, exist_ok=True)
    return folder
