"""The regression checks catch broken code: four faults injected into the library, each run through the smoke
matrix's own cases, must drift outside the calibrated bands (and the same cases without a fault must not).

Each fault is a monkeypatch on the code path of one method; the cases are run with ``Runner`` on a private
cache (a fault's artifacts are cached under the healthy code's key, so a faulty run gets a copy of the cache).
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from backdoor.attacks.badnets import BadNets
from backdoor.attacks.base import Attack
from backdoor.harness.cache import ArtifactCache
from backdoor.data import Split
from backdoor.defenses import nc as nc_module
from backdoor.defenses.base import DefenseOutcome
from backdoor.defenses.ft import FineTuning
from backdoor.harness.expectations import case_key, drift, load_expected
from backdoor.harness.matrix import load_matrix
from backdoor.harness.runner import Runner

SMOKE = Path(__file__).resolve().parent.parent / "matrices" / "smoke.yaml"
NC_ATTACK = "lc"  # NC's flag on BadNets is a coin toss over seeds at the smoke budget; on LC it flags every seed


@pytest.fixture(scope="module")
def smoke():
    matrix = load_matrix(SMOKE)
    cases = {c.case_id: c for c in matrix.cases() if c.seed == 0}
    return matrix, cases, load_expected(matrix.expected_path)


@pytest.fixture(scope="module")
def healthy_cache(tmp_path_factory):
    """A cache that only healthy code writes to."""
    return tmp_path_factory.mktemp("healthy-cache")


def run(smoke, cache: Path, attack: str, defense: str) -> tuple[dict, list[str]]:
    matrix, cases, expected = smoke
    case = cases[f"digits-cnn_small-{attack}-p0.1-s0-{defense}"]
    record = Runner(ArtifactCache(cache)).run(case)
    return record, drift(record, expected[case_key(case.case_id)], matrix.regression)


def faulty_cache(healthy: Path, tmp_path: Path, drop: tuple[str, ...]) -> Path:
    """A copy of the healthy cache without the artifact kinds in ``drop`` (those the faulty code must rebuild)."""
    cache = tmp_path / "cache"
    shutil.copytree(healthy, cache, ignore=lambda folder, names: [n for n in names if Path(folder) == healthy
                                                                   and n in drop])
    return cache


def paints_nothing(self, x: torch.Tensor) -> torch.Tensor:
    return x.clone()


def zero_step_fine_tuning(self, inputs):
    return DefenseOutcome(model=inputs.model, info={"epochs": 0})


def never_flags(l1, reached, threshold=2.0):
    return torch.zeros(0, dtype=torch.long)


def poison_test_without_trigger(self, test: Split) -> Split:
    keep = test.y != self.target
    return Split(test.x[keep], test.y[keep])


DEFENDED = ("defended_model",)  # a faulty defense reuses the healthy backdoored model; its own output is rebuilt
FAULTS = {  # fault -> (attack, defense, artifact kinds rebuilt, the stage that shows it, injection)
    "badnets trigger paints nothing": ("badnets", "none", ("poisoned", "backdoor_model"), "backdoor_model",
                                       lambda mp: mp.setattr(BadNets, "apply_trigger", paints_nothing)),
    "ft takes zero steps": ("badnets", "ft", DEFENDED, "defense",
                            lambda mp: mp.setattr(FineTuning, "run", zero_step_fine_tuning)),
    "nc never flags": (NC_ATTACK, "nc", DEFENDED, "defense", lambda mp: mp.setattr(nc_module, "flag_classes", never_flags)),
    "asr on clean images": ("badnets", "none", (), None,
                            lambda mp: mp.setattr(Attack, "poison_test", poison_test_without_trigger)),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_checks_catch_the_fault(smoke, healthy_cache, fault, monkeypatch, tmp_path):
    attack, defense, drop, rebuilt, inject = FAULTS[fault]
    _, healthy = run(smoke, healthy_cache, attack, defense)  # also builds the healthy upstream artifacts
    assert healthy == [], f"{attack}/{defense} without a fault drifts: {healthy}"
    cache = faulty_cache(healthy_cache, tmp_path, drop)
    inject(monkeypatch)
    record, problems = run(smoke, cache, attack, defense)
    if rebuilt:
        assert record["cache_hits"][rebuilt] is False, "the faulty stage was built by the faulty code"
    caught = [p for p in problems if "outside its band" in p or "breaks the claim" in p]
    print(f"{fault}: {attack}/{defense}: " + "; ".join(caught))
    assert caught, f"{fault}: the {attack}/{defense} case still holds its bands ({problems})"
