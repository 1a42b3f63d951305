"""matrices/smoke_full.yaml is the smoke grid's full cross: smoke.yaml with every defense and every detector against
every attack (no `against`), nothing else changed, and no regression checks (it is not calibrated)."""
from pathlib import Path

import yaml

from backdoor.harness.matrix import load_matrix

MATRICES = Path(__file__).resolve().parents[1] / "matrices"
OWN_KEYS = ("name", "description", "expected", "regression")  # what the full cross may say differently


def _without_own_keys(raw: dict) -> dict:
    return {k: v for k, v in raw.items() if k not in OWN_KEYS}


def test_the_full_cross_is_smoke_without_against():
    smoke = yaml.safe_load((MATRICES / "smoke.yaml").read_text())
    full = yaml.safe_load((MATRICES / "smoke_full.yaml").read_text())
    assert any("against" in (params or {}) for params in smoke["defenses"].values())
    for axis in ("defenses", "detectors"):
        smoke[axis] = {name: {k: v for k, v in (params or {}).items() if k != "against"}
                       for name, params in smoke[axis].items()}
        full[axis] = {name: params or {} for name, params in full[axis].items()}
    assert _without_own_keys(full) == _without_own_keys(smoke)
    assert "expected" not in full and "regression" not in full


def test_the_full_cross_pairs_every_defense_with_every_attack():
    matrix = load_matrix(MATRICES / "smoke_full.yaml", check_data=False)
    pairs = {(c.attack, c.defense) for c in matrix.cases() if c.attack != "clean" and not c.detector}
    assert pairs == {(a, d) for a in matrix.attacks for d in matrix.defenses}
    detected = {(c.attack, c.detector) for c in matrix.cases() if c.attack != "clean" and c.detector}
    assert detected == {(a, d) for a in matrix.attacks for d in matrix.detectors}
    assert len(matrix.cases()) > len(load_matrix(MATRICES / "smoke.yaml", check_data=False).cases())
