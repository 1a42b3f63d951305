"""Regression checks: claims on metrics and on record figures, the expectations header, and the CI grid's coverage:
every attacked cell of the smoke matrix checks its ASR (or the defense's change of it) by a band no wider than
0.25, or by stated claims that a method doing nothing breaks."""
from pathlib import Path

import pytest
import yaml

from backdoor.harness.expectations import (CHAOTIC_WIDTH, FLOOR, RegressionError, case_key, drift, load_expected,
                                           parse_regression, write_expected)
from backdoor.harness.matrix import load_matrix
from backdoor.harness.case import CLEAN
from backdoor.detectors import DETECTORS

SMOKE = Path(__file__).resolve().parent.parent / "matrices" / "smoke.yaml"
ASR_CHECKS = ("asr", "d_asr")


def _record(**fields) -> dict:
    return {"attack": "badnets", "defense": "nc", "status": "ok", "c_acc": 0.9, "asr": 0.5, "r_acc": 0.4, **fields}


def test_a_claim_on_a_record_figure_holds_or_names_the_figure():
    regression = parse_regression(Path("m.yaml"), {"checks": {"badnets/nc": {"defense_info.most_anomalous_class": "== 0",
                                                                             "detection.tpr": ">= 0.5"}}})
    assert drift(_record(defense_info={"most_anomalous_class": 0}, detection={"tpr": 0.75}), None, regression,
                 bands=False) == []
    problems = drift(_record(defense_info={}, detection={"tpr": 0.25}), None, regression, bands=False)
    assert problems == ["defense_info.most_anomalous_class = None breaks the claim defense_info.most_anomalous_class == 0",
                        "detection.tpr = 0.2500 breaks the claim detection.tpr >= 0.5"]
    # Another attack/defense pair is not concerned; a bool figure counts as 0/1.
    assert drift(_record(attack="blended"), None, regression, bands=False) == []
    flag = parse_regression(Path("m.yaml"), {"checks": {"*/nc": {"defense_info.detected": "== 1"}}})
    assert drift(_record(defense_info={"detected": True}), None, flag, bands=False) == []
    assert drift(_record(defense_info={"detected": False}), None, flag, bands=False) != []


@pytest.mark.parametrize("checks, message", [
    ({"badnets/nc": {"defense_info.x": "band"}}, "never by a band"),
    ({"badnets/nc": {"test.asr": "<= 0.1"}}, "is not a metric"),
    ({"badnets/nc": {"asr": "=< 0.1"}}, "operators"),
])
def test_bad_claims_are_refused_naming_the_key(checks, message):
    with pytest.raises(RegressionError, match=message):
        parse_regression(Path("m.yaml"), {"checks": checks})


def test_expectations_header_states_the_floors_in_force(tmp_path):
    path = tmp_path / "x.expected.yaml"
    write_expected(path, {}, {})
    header = path.read_text().split("calibration:")[0]
    for metric, floor in FLOOR.items():
        assert f"{floor:g} for" in header and metric in header


def _do_nothing_record(case, expected: dict) -> dict:
    """What a method that does nothing would record in this cell: a defense that returns the backdoored model
    (every metric as before the defense, nothing flagged, no figures), or an attack whose trigger changes nothing
    (ASR at the clean model's base rate, about 0 for digits)."""
    none = {m: expected[case_key(case.case_id.rsplit("-", 1)[0] + "-none")][m]["centre"]
            for m in ("c_acc", "asr", "r_acc")}
    if case.defense == "none":
        return {"attack": case.attack, "defense": "none", "status": "ok", **none, "asr": 0.0, "r_acc": none["c_acc"]}
    return {"attack": case.attack, "defense": case.defense, "status": "ok", **none, "undefended": dict(none),
            "detection": {"flagged": 0, "tpr": 0.0, "fpr": 0.0}, "defense_info": {}}


def _banded_width(regression, expected: dict, case, metric: str) -> float | None:
    band = expected.get(case_key(case.case_id), {}).get(metric)
    if regression.check_for(case.attack, case.defense, metric).kind != "band" or band is None:
        return None
    return band["high"] - band["low"]


def test_every_attacked_smoke_cell_checks_its_asr_or_a_claim_that_doing_nothing_breaks():
    matrix = load_matrix(SMOKE, check_data=False)
    expected = load_expected(matrix.expected_path)
    unchecked = []
    for case in matrix.cases():
        if case.attack == CLEAN or case.detector:  # detection cells: the test below
            continue
        widths = [_banded_width(matrix.regression, expected, case, m) for m in ASR_CHECKS]
        if any(w is not None and w <= CHAOTIC_WIDTH[m] for w, m in zip(widths, ASR_CHECKS)):
            continue
        claims = drift(_do_nothing_record(case, expected), None, matrix.regression, bands=False)
        if not claims:
            unchecked.append(f"{case.attack}/{case.defense} (ASR band widths {widths})")
    assert not unchecked, f"{len(unchecked)} cells check neither ASR by a narrow band nor a claim that doing " \
                          f"nothing breaks: {', '.join(unchecked)}"


def _do_nothing_detection(case, expected: dict) -> dict:
    """What a detector that does nothing (scores 0, flags nothing) would record in this cell: AUROC 0.5, no
    flag, score 0; an input-level screen that lets every input through leaves the model's metrics as they were."""
    record = {"attack": case.attack, "defense": case.defense, "status": "ok", "det_auroc": 0.5, "det_tpr": 0.0,
              "det_fpr": 0.0, "det_score": 0.0, "c_acc": None, "asr": None, "r_acc": None,
              "detection": {"flagged": 0, "tpr": 0.0, "fpr": 0.0, "auroc": 0.5, "score": 0.0}}
    none = expected.get(case_key(case.case_id.rsplit("-", 1)[0] + "-none"), {})
    if DETECTORS.get(case.detector).task == "input" and none:
        metrics = {m: none[m]["centre"] for m in ("c_acc", "asr", "r_acc")}
        record.update(metrics, undefended=dict(metrics))
    if DETECTORS.get(case.detector).task != "data":
        record["det_tpr"] = record["det_fpr"] = None if DETECTORS.get(case.detector).task == "model" else 0.0
    if DETECTORS.get(case.detector).task != "model":
        record["det_score"] = None
    else:
        record["det_auroc"] = None
    return record


def test_every_smoke_detector_is_told_from_one_that_does_nothing():
    """For every detector of the smoke grid, some cell's calibrated bands or claims reject what a detector that
    does nothing would record: the grid catches its do-nothing version."""
    matrix = load_matrix(SMOKE, check_data=False)
    expected = load_expected(matrix.expected_path)
    caught = {d: [] for d in matrix.detectors}
    for case in (c for c in matrix.cases() if c.detector):
        problems = drift(_do_nothing_detection(case, expected), expected.get(case_key(case.case_id)), matrix.regression)
        if problems:
            caught[case.detector].append(case.case_id)
    assert all(caught.values()), f"no cell catches the do-nothing version of {[d for d, c in caught.items() if not c]}"


def test_the_smoke_expectations_cover_every_case():
    matrix = load_matrix(SMOKE, check_data=False)
    expected = yaml.safe_load(matrix.expected_path.read_text())["cases"]
    assert {case_key(c.case_id) for c in matrix.cases()} == set(expected)


def test_a_partial_calibration_selects_its_cells_at_every_seed_and_keeps_the_other_bands(tmp_path):
    from backdoor.harness.calibration import _keep_other_cells, selected_cases, selection_args

    for name in ("smoke.yaml", "smoke.expected.yaml"):
        (tmp_path / name).write_text((SMOKE.parent / name).read_text())
    matrix = load_matrix(tmp_path / "smoke.yaml", check_data=False)
    cases = selected_cases(matrix, ["*/nc", "lf/dbd"])
    assert sorted({(c.attack, c.defense) for c in cases}) == sorted(
        [(a, "nc") for a in matrix.attacks if matrix.runs_against("nc", a)] + [("lf", "dbd")])
    flag, expression = selection_args(cases, [0, 2])
    ids = expression.split(" or ")
    assert flag == "-k" and len(ids) == 2 * len(cases)
    assert "digits-cnn_small-lf-p0.1-s2-dbd" in ids and not any("-s1-" in i for i in ids)

    before = load_expected(matrix.expected_path)
    new = {case_key(c.case_id): {"asr": {"centre": 0.5, "low": 0.4, "high": 0.6, "n": 2}} for c in cases}
    previous = yaml.safe_load(matrix.expected_path.read_text())["calibration"]
    merged, summary = _keep_other_cells(matrix, new, {"runs": ["native/s0"], "chaotic": []}, ["*/nc", "lf/dbd"])
    # the matrix's order, nothing lost (a population's clean seeds share their cells' keys)
    assert list(merged) == list(dict.fromkeys(case_key(c.case_id) for c in matrix.cases()))
    for key, entry in merged.items():
        assert entry == (new[key] if key in new else before[key])
    assert summary["cells"] == ["*/nc", "lf/dbd"] and summary["earlier"][0]["runs"] == previous["runs"]
    assert not any(line.split()[0] in new for line in summary["chaotic"])
    # a calibration whose cells the new one recalibrates, every one of them, leaves the history: none of its bands
    # remains; an entry that a newer one supersedes goes too, and the full calibration stays
    previous_cells = previous["cells"]
    _, again = _keep_other_cells(matrix, new, {"runs": ["native/s0"], "chaotic": []}, [*previous_cells, "lf/dbd"])
    kept = [e.get("cells") for e in again["earlier"]]
    assert previous_cells not in kept and kept[-1] is None
    assert all(not set(a) <= set(b) for i, a in enumerate(kept) if a for b in kept[:i] if b)


def test_calibration_runs_add_to_the_earlier_calibrations_records(tmp_path, monkeypatch):
    """A partial recalibration reruns cells of an edited matrix (another matrix hash) into the folder of the
    earlier calibration: the grid's guard against mixing matrices must be told to add, or the run is refused."""
    from backdoor.harness import calibration

    seen = []
    monkeypatch.setattr(calibration.subprocess, "call", lambda command, env: seen.append((command, env)) or 0)
    matrix = load_matrix(Path(__file__).resolve().parent.parent / "matrices" / "smoke.yaml")
    assert calibration.run_variant(matrix, "avx2", [0, 1], tmp_path / "r", tmp_path / "c", workers=2) == 0
    (command, env), = seen
    assert command[command.index("--other-records") + 1] == "add"
    assert command[command.index("--seeds") + 1] == "0,1,"
    assert env["ATEN_CPU_CAPABILITY"] == "avx2"
