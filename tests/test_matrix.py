"""Matrix validation: every bad input stops before training with one message naming file, key, value, allowed."""
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from backdoor.harness.matrix import MatrixError, case_count, load_matrix

GOOD = """
name: t
datasets: [digits]
models: [cnn_small]
attacks: {badnets: {}, blended: {alpha: 0.1}}
defenses: [none, ft]
poison_ratios: [0.1, 0.05]
seeds: [0, 1]
training: {epochs: 2}
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "m.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def test_good_matrix_expands_deterministically(tmp_path):
    m = load_matrix(write(tmp_path, GOOD))
    ids = [c.case_id for c in m.cases()]
    assert len(ids) == 2 * (1 + 2 * 2 * 2)  # seeds x (reference + ratios x attacks x defenses)
    assert ids[:3] == ["digits-cnn_small-clean-s0-none", "digits-cnn_small-badnets-p0.1-s0-none",
                       "digits-cnn_small-badnets-p0.1-s0-ft"]
    assert ids == [c.case_id for c in load_matrix(write(tmp_path, GOOD)).cases()]
    assert len(set(ids)) == len(ids)
    blended = next(c for c in m.cases() if c.attack == "blended")
    assert blended.attack_params == {"alpha": 0.1} and blended.training.epochs == 2
    assert blended.group == "digits-cnn_small-blended-p0.1-s0"


def test_an_attack_may_carry_its_own_training_budget(tmp_path):
    m = load_matrix(write(tmp_path, GOOD.replace("blended: {alpha: 0.1}", "blended: {alpha: 0.1, training: {epochs: 7}}")))
    by_attack = {c.attack: c for c in m.cases()}
    assert by_attack["blended"].training.epochs == 7 and by_attack["blended"].attack_params == {"alpha": 0.1}
    assert by_attack["badnets"].training.epochs == 2 and by_attack["clean"].training.epochs == 2
    with pytest.raises(MatrixError, match=r"attacks.blended.training: unknown key\(s\) \['epoch'\]"):
        load_matrix(write(tmp_path, GOOD.replace("blended: {alpha: 0.1}", "blended: {training: {epoch: 7}}")))


def test_a_defense_may_run_against_some_attacks_only(tmp_path):
    m = load_matrix(write(tmp_path, GOOD.replace("defenses: [none, ft]",
                                                 "defenses: {none: {}, ft: {lr: 0.02, against: [blend*]}, fp: {}}")))
    pairs = {(c.attack, c.defense) for c in m.cases() if c.ratio == 0.1 and c.seed == 0}
    assert pairs == {("badnets", "none"), ("badnets", "fp"), ("blended", "none"), ("blended", "ft"),
                     ("blended", "fp")}
    ft = next(c for c in m.cases() if c.defense == "ft")
    assert ft.defense_params == {"lr": 0.02}  # `against` is the grid's, not the defense's parameter
    assert m.against == {"ft": ("blended",)} and not m.runs_against("ft", "badnets") and m.runs_against("fp", "badnets")


def test_an_attack_may_carry_its_own_poison_ratios(tmp_path):
    m = load_matrix(write(tmp_path, GOOD.replace("blended: {alpha: 0.1}",
                                                 "blended: {alpha: 0.1, poison_ratios: [0.003, 0.1]}")))
    pairs = {(c.attack, c.ratio) for c in m.cases() if c.seed == 0 and c.defense == "none" and c.attack != "clean"}
    assert pairs == {("badnets", 0.1), ("badnets", 0.05), ("blended", 0.003), ("blended", 0.1)}
    blended = next(c for c in m.cases() if c.attack == "blended")
    assert blended.attack_params == {"alpha": 0.1}  # the ratios are the grid's, not the attack's parameter
    assert case_count(m) == len(m.cases())
    with pytest.raises(MatrixError, match=r"attacks.blended.poison_ratios: 0.2 is not allowed; it is listed twice"):
        load_matrix(write(tmp_path, GOOD.replace("blended: {alpha: 0.1}", "blended: {poison_ratios: [0.2, 0.2]}")))
    with pytest.raises(MatrixError, match=r"attacks.blended.poison_ratios: 0 is outside the allowed range \(0, 1\]"):
        load_matrix(write(tmp_path, GOOD.replace("blended: {alpha: 0.1}", "blended: {poison_ratios: [0]}")))


@pytest.mark.parametrize("entry, message", [
    ("ft: {against: [badnet]}", r"defenses.ft.against: 'badnet' names none of the matrix's attacks \(did you mean "
                                r"'badnets'\?\); allowed: badnets, blended"),
    ("ft: {against: []}", r"defenses.ft.against: \[\] is not allowed; expected a non-empty list"),
    ("ft: {against: badnets}", r"defenses.ft.against: 'badnets' is not allowed; expected a non-empty list"),
    ("none: {against: [badnets]}, ft: {}", r"defenses.none.against: not allowed on 'none'"),
])
def test_a_bad_against_is_named(tmp_path, entry, message):
    entries = entry if entry.startswith("none") else "none: {}, " + entry
    with pytest.raises(MatrixError, match=message):
        load_matrix(write(tmp_path, GOOD.replace("defenses: [none, ft]", "defenses: {" + entries + "}")))


def test_wildcards_expand_over_the_registry(tmp_path):
    m = load_matrix(write(tmp_path, GOOD.replace("attacks: {badnets: {}, blended: {alpha: 0.1}}",
                                                 'attacks: ["blend*", "bad*"]')))
    assert list(m.attacks) == ["blended", "badnets"]


BAD = [
    ("datasets: [digits]", "datasets: [mnist]", r"datasets: 'mnist' is not a registered dataset; allowed: .*digits"),
    ("models: [cnn_small]", "models: [resnet50]", r"models: 'resnet50' is not a registered model; allowed: .*cnn_small"),
    ("attacks: {badnets: {}, blended: {alpha: 0.1}}", "attacks: {badnet: {}}", r"attacks: 'badnet' is not a registered attack \(did you mean 'badnets'\?\)"),
    ("defenses: [none, ft]", "defenses: [none, finetune]", r"defenses: 'finetune' is not a registered defense"),
    ("poison_ratios: [0.1, 0.05]", "poison_ratios: [0.1, 0]", r"poison_ratios: 0 is outside the allowed range \(0, 1\]"),
    ("poison_ratios: [0.1, 0.05]", "poison_ratios: [1.5]", r"poison_ratios: 1.5 is outside the allowed range \(0, 1\]"),
    ("poison_ratios: [0.1, 0.05]", "poison_ratios: [-0.1]", r"poison_ratios: -0.1 is outside"),
    ("seeds: [0, 1]", "seeds: [0, 1]\ntarget: 10", r"target: 10 is outside digits's classes; allowed: 0..9"),
    ("seeds: [0, 1]", "seeds: [0, 1]\ntargte: 1", r"targte: unknown key \(did you mean 'target'\?\); allowed keys: name, description"),
    ("training: {epochs: 2}", "training: {epochs: 2, epocs: 3}", r"training: unknown key\(s\) \['epocs'\] \('epocs': did you mean 'epochs'\?\); allowed: \[.*'epochs'"),
    ("training: {epochs: 2}", "training: {epochs: -2}", r"training.epochs: -2 is not allowed; expected a positive integer"),
    ("attacks: {badnets: {}, blended: {alpha: 0.1}}", "attacks: {blended: {alhpa: 0.1}}",
     r"attacks.blended: unknown parameter\(s\) \['alhpa'\] \('alhpa': did you mean 'alpha'\?\); allowed: \[.*'alpha'"),
    ("seeds: [0, 1]", "seeds: [0, 1]\ndefense_training: {clean_fraction: 2}", r"defense_training.clean_fraction: 2 is not allowed"),
]


@pytest.mark.parametrize("old,new,message", BAD, ids=[b[2][:30] for b in BAD])
def test_bad_input_names_file_key_value_and_allowed(tmp_path, old, new, message):
    path = write(tmp_path, GOOD.replace(old, new))
    with pytest.raises(MatrixError, match=message) as e:
        load_matrix(path)
    assert str(e.value).startswith(str(path))


def test_malformed_yaml(tmp_path):
    path = write(tmp_path, "datasets: [digits\nmodels: {")
    with pytest.raises(MatrixError, match=r"m.yaml: malformed YAML at line 2, column 7: expected ',' or ']'"):
        load_matrix(path)


def test_missing_axis_and_non_mapping(tmp_path):
    with pytest.raises(MatrixError, match="poison_ratios: missing"):
        load_matrix(write(tmp_path, GOOD.replace("poison_ratios: [0.1, 0.05]", "")))
    with pytest.raises(MatrixError, match="must be a mapping"):
        load_matrix(write(tmp_path, "- just\n- a list\n"))


def test_grid_stops_before_training_with_the_message(tmp_path):
    path = write(tmp_path, GOOD.replace("poison_ratios: [0.1, 0.05]", "poison_ratios: [2]"))
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "-m", "pytest", str(root / "benchmarks"), "--matrix", str(path),
                           "--cache-dir", str(tmp_path / "cache"), "--results-dir", str(tmp_path / "res")],
                          capture_output=True, text=True, cwd=root, timeout=120)
    assert done.returncode == 4, done.stdout + done.stderr
    assert "poison_ratios: 2 is outside the allowed range (0, 1]" in done.stderr
    assert not (tmp_path / "cache").exists() and not (tmp_path / "res").exists()


@pytest.mark.parametrize("matrix", sorted(p for p in (Path(__file__).resolve().parent.parent / "matrices").glob("*.yaml")
                                         if not p.name.endswith(".expected.yaml")), ids=lambda p: p.name)
def test_shipped_matrices_are_valid(matrix):
    m = load_matrix(matrix, check_data=False)  # real CIFAR files are the user's, not on a CI machine
    assert m.cases()
