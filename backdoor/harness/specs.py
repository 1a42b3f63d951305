"""Cache-key specs: everything that determines a case's artifacts (dataset, clean or backdoored model, poisoned
set, defended model), the code that builds them included (``code_version``) and the CPU kernels in use."""
from __future__ import annotations

from functools import lru_cache

import torch

from backdoor.attacks import Attack
from backdoor.data import DATASETS
from backdoor.harness.case import Case
from backdoor.harness.case_record import numerics_env
from backdoor.harness.code_digest import code_digest
from backdoor.models import MODELS

RUNNER = "backdoor.harness.runner"  # the module that runs the builders: part of every key's code


@lru_cache(maxsize=None)
def code_version(module_name: str) -> str:
    """Digest of the source that builds an artifact: the module of a method (or dataset/model), the runner
    (which derives seeds, chooses the defender's clean subset and calls the builders; it imports this module) and
    every module of the package either imports, transitively (``backdoor.harness.code_digest``). Part of every
    cache key, so changing any code that decides an artifact's content never serves artifacts built by the old
    code."""
    return code_digest(module_name, RUNNER)


def numerics_key() -> dict[str, str]:
    return {"cpu_capability": torch.backends.cpu.get_cpu_capability(), **numerics_env()}


def dataset_spec(case: Case) -> dict:
    # Where the files live does not change the data, except for imagefolder, whose root *is* the data.
    params = {k: v for k, v in case.dataset_params.items() if k != "root" or case.dataset == "imagefolder"}
    # A dataset read from one file (npz) adds the file's content digest: a file replaced under its name is a miss.
    fingerprint = getattr(DATASETS.get(case.dataset), "fingerprint", None)
    if fingerprint is not None:
        params.update(fingerprint(case.dataset_params))
    # Every artifact's spec starts from this one, so the CPU kernels in use key them all: a cache filled on an
    # AVX2 machine (or under ATEN_CPU_CAPABILITY=avx2) never serves a native AVX-512 run, whose last bits differ.
    return {"dataset": case.dataset, "params": params, "code": code_version(DATASETS.get(case.dataset).__module__),
            "numerics": numerics_key()}


def model_spec(case: Case) -> dict:
    return {**dataset_spec(case), "model": case.model, "model_params": case.model_params,
            "training": case.training.to_dict(), "model_code": code_version(MODELS.get(case.model).__module__)}


def attack_spec(case: Case, attack: Attack) -> dict:
    return {**dataset_spec(case), "attack": case.attack, "attack_params": attack.params(),
            "ratio": case.ratio, "seed": case.seed, "attack_code": code_version(type(attack).__module__)}


def backdoor_spec(case: Case, attack: Attack) -> dict:
    return {**model_spec(case), **attack_spec(case, attack)}


def defense_spec(case: Case, upstream: dict, defense) -> dict:
    return {"upstream": upstream, "defense": case.defense, "defense_params": defense.params(),
            "defense_code": code_version(type(defense).__module__),
            "defense_training": case.defense_training.to_dict(), "clean_fraction": case.clean_fraction,
            "seed": case.seed}


def detector_spec(case: Case, upstream: dict, detector) -> dict:
    """A detection's key: the inspected model's spec, the detector, its parameters and code, and what it is given
    (the defender's clean subset and budgets)."""
    return {"upstream": upstream, "detector": case.detector, "detector_params": detector.params(),
            "detector_code": code_version(type(detector).__module__),
            "defense_training": case.defense_training.to_dict(), "clean_fraction": case.clean_fraction,
            "seed": case.seed}
