"""Figures ASR must be read against: the clean base rate of target predictions, the target class's accuracy, the
share of the target class a clean-label attack poisoned; and the leaderboard's mark on degenerate defenses."""
import torch

from backdoor.data import Dataset, Split
from backdoor.attacks import PoisonedSet
from backdoor.metrics import target_class_figures
from backdoor.harness.case_record import target_class_poisoning
from backdoor.harness.report.leaderboard import render_markdown


def test_base_rate_and_target_accuracy():
    y = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    pred = torch.tensor([0, 1, 0, 1, 0, 0, 3, 3])  # non-target 1,1,2,2,3,3 -> 0 on three of six; target 0 right once
    assert target_class_figures(pred, y, 0) == {"target_base_rate": 0.5, "target_acc": 0.5}
    never = target_class_figures(torch.full_like(y, 1), y, 0)
    assert never == {"target_base_rate": 0.0, "target_acc": 0.0}


def test_clean_label_share_of_the_target_class_and_its_warning():
    y = torch.tensor([0] * 10 + [1] * 10)
    data = Dataset("t", Split(torch.zeros(20, 3, 4, 4, dtype=torch.uint8), y), Split(torch.zeros(2, 3, 4, 4,
                   dtype=torch.uint8), torch.tensor([0, 1])), 2, (0.0,) * 3, (1.0,) * 3, hflip=False)
    mask = torch.zeros(20, dtype=torch.bool)
    mask[:4] = True
    few = target_class_poisoning(PoisonedSet(data.train.x, y, mask, 0.2), data, 0)
    assert few == {"target_poisoned_share": 0.4}
    mask[:9] = True
    most = target_class_poisoning(PoisonedSet(data.train.x, y, mask, 0.45), data, 0)
    assert most["target_poisoned_share"] == 0.9 and "poisoned 90% of the target class" in most["warnings"][0]


def record(defense, c_acc, asr, target_acc, seed=0):
    return {"case_id": f"d-m-badnets-p0.1-s{seed}-{defense}", "dataset": "d", "model": "m", "attack": "badnets",
            "defense": defense, "poison_ratio": 0.1, "seed": seed, "status": "ok", "c_acc": c_acc, "asr": asr,
            "r_acc": 1 - asr, "target_base_rate": 0.01, "target_acc": target_acc}


def test_leaderboard_marks_a_defense_that_erased_the_target_or_lost_most_accuracy():
    records = [record("none", 0.99, 0.99, 0.99), record("ft", 0.97, 0.2, 0.95), record("abl", 0.9, 0.0, 0.0),
               record("dbd", 0.4, 0.05, 0.5)]
    md = render_markdown(records, "t")
    row = [c.strip() for c in next(line for line in md.splitlines() if line.startswith("| d ")).split("|")]
    assert "20.00" in row and "0.00 †" in row and "5.00 †" in row  # FT unmarked; ABL, DBD marked
    assert "target class erased (its clean accuracy 0.0%)" in md
    assert "most clean accuracy lost (C-Acc 40.0% against 99.0%)" in md


def test_leaderboard_marks_data_side_defenses_against_training_controllable_attacks():
    def rec(attack, kind, defense, defense_kind, asr):
        return {**record(defense, 0.95, asr, 0.9), "case_id": f"d-m-{attack}-p0.1-s0-{defense}", "attack": attack,
                "attack_kind": kind, "defense_kind": defense_kind}

    records = [rec("wanet", "training_controllable", "none", "none", 0.11),
               rec("wanet", "training_controllable", "ac", "data_side", 0.33),
               rec("wanet", "training_controllable", "ft", "post_training", 0.02),
               rec("badnets", "dirty_label", "none", "none", 0.99), rec("badnets", "dirty_label", "ac", "data_side", 0.5)]
    md = render_markdown(records, "t")
    leaderboard = md.split("\n\n")[2]  # title, legend, then the leaderboard table
    rows = {line.split("|")[4].strip(): [c.strip() for c in line.split("|")] for line in leaderboard.splitlines()
            if line.startswith("| d ")}
    assert "33.00 ‡" in rows["WaNet"] and "2.00" in rows["WaNet"] and "2.00 ‡" not in rows["WaNet"]
    assert not any("‡" in c for c in rows["BadNets"]), "a data-side defense against a data-poisoning attack is what it says"
    assert "data-poisoning version of the attack" in md
