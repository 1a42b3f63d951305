import pytest
import torch

from backdoor.attacks import create_attack
from backdoor.data import Split
from backdoor.metrics import attack_success_rate, backdoor_metrics, clean_accuracy, detection_metrics, robust_accuracy


def test_clean_accuracy_counts_every_test_sample():
    assert clean_accuracy(torch.tensor([0, 1, 2, 2]), torch.tensor([0, 1, 2, 3])) == 0.75


def test_asr_and_racc_on_known_predictions():
    y_true = torch.tensor([1, 2, 3, 4, 5])
    pred = torch.tensor([0, 0, 3, 4, 1])  # 2 to target 0, 2 correct, 1 neither
    assert attack_success_rate(pred, 0) == pytest.approx(0.4)
    assert robust_accuracy(pred, y_true) == pytest.approx(0.4)


def test_asr_plus_racc_never_exceeds_one():
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        y = torch.randint(1, 10, (40,), generator=g)  # non-target samples only
        pred = torch.randint(0, 10, (40,), generator=g)
        m = backdoor_metrics(pred, y, pred, y, target=0)
        assert 0 <= m.asr <= 1 and 0 <= m.r_acc <= 1 and m.asr + m.r_acc <= 1 + 1e-9


def test_metrics_reject_target_samples_in_poisoned_set():
    with pytest.raises(ValueError, match="exclude target-class"):
        backdoor_metrics(torch.tensor([0]), torch.tensor([0]), torch.tensor([0]), torch.tensor([0]), target=0)


def test_poisoned_test_set_excludes_target_class():
    x = torch.zeros(6, 3, 32, 32, dtype=torch.uint8)
    y = torch.tensor([0, 1, 2, 0, 3, 0])
    poisoned = create_attack("badnets", target=0).poison_test(Split(x, y))
    assert poisoned.y.tolist() == [1, 2, 3]  # true labels kept, target samples dropped
    assert (poisoned.x[:, :, -3:, -3:] == 255).all()
    other = create_attack("badnets", target=2).poison_test(Split(x, y))
    assert other.y.tolist() == [0, 1, 0, 3, 0]


def test_detection_metrics_known_answer():
    truth = torch.tensor([1, 1, 1, 1, 0, 0, 0, 0, 0, 0], dtype=torch.bool)
    flagged = torch.tensor([1, 1, 1, 0, 1, 0, 0, 0, 0, 0], dtype=torch.bool)
    scores = torch.tensor([9, 8, 7, 6, 5, 4, 3, 2, 1, 0], dtype=torch.float)
    d = detection_metrics(flagged, truth, scores)
    assert d["tpr"] == 0.75 and d["fpr"] == pytest.approx(1 / 6) and d["precision"] == 0.75
    assert d["auroc"] == 1.0 and d["flagged"] == 4
    assert detection_metrics(flagged, truth)["auroc"] is None
