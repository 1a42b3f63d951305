"""Studies (supplementary B.6-B.8): forgetting counts and GSNR on hand-made inputs, hooks that only observe,
and each study end to end on a tiny synthetic dataset."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from backdoor.cli import main as cli_main
from backdoor.data import load_dataset
from backdoor.models import create_model
from backdoor.studies.forgetting import ForgettingHooks, forgetting_counts
from backdoor.studies.quick_learning import QuickLearningHooks, gradient_statistics, gsnr, per_sample_gradients
from backdoor.training import TrainConfig, fit


pytestmark = pytest.mark.usefixtures("one_thread")


def test_forgetting_counts_on_a_hand_made_sequence():
    correct = np.array([[1, 1, 0, 1],   # epochs x samples
                        [0, 1, 0, 0],
                        [1, 1, 1, 1],
                        [0, 1, 0, 1]], bool)
    # sample 0: 1->0, 0->1, 1->0 (two events); 1: never wrong; 2: learnt then forgotten once; 3: 1->0 once
    assert forgetting_counts(correct).tolist() == [2, 0, 1, 1]
    assert forgetting_counts(correct[:1]).tolist() == [0, 0, 0, 0]


def test_gsnr_on_hand_made_gradients():
    g = torch.tensor([[1.0, 1.0, 0.0], [1.0, 3.0, 2.0], [1.0, 1.0, -2.0], [1.0, 3.0, 0.0]])  # 4 samples x 3 params
    # param 0 never varies (left out); param 1: mean 2, variance 1 -> 4; param 2: mean 0 -> 0
    assert gsnr(g.sum(0), (g ** 2).sum(0), 4) == pytest.approx(2.0)
    assert gsnr(torch.ones(3), torch.ones(3), 1) != gsnr(torch.ones(3), torch.ones(3), 1)  # nan: nothing varies


class Linear(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3 * 4 * 4, 3)

    def forward(self, x):
        return self.fc(x.flatten(1))


def test_gradient_statistics_match_per_sample_backward():
    torch.manual_seed(0)
    model = Linear().eval()
    x = torch.randint(0, 256, (10, 3, 4, 4), dtype=torch.uint8)
    y = torch.randint(0, 3, (10,))
    poisoned = torch.tensor([True, False] * 5)
    rows = []
    for i in range(10):  # the reference: one backward per sample
        model.zero_grad()
        F.cross_entropy(model(x[i:i + 1].float() / 255), y[i:i + 1]).backward()
        rows.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    ref = torch.stack(rows).double()
    torch.testing.assert_close(per_sample_gradients(model, x.float() / 255, y).double(), ref, rtol=1e-5, atol=1e-6)
    stats = gradient_statistics(model, x, y, poisoned, batch_size=4)
    for group, sel in (("poisoned", poisoned), ("clean", ~poisoned), ("all", torch.ones(10, dtype=torch.bool))):
        g = ref[sel]
        assert stats[f"grad_norm_{group}"] == pytest.approx(float(g.mean(0).norm()), rel=1e-5)
        assert stats[f"gsnr_{group}"] == pytest.approx(gsnr(g.sum(0), (g ** 2).sum(0), len(g)), rel=1e-5)
    cos = F.cosine_similarity(ref[~poisoned].mean(0)[None], ref[poisoned].mean(0)[None]).item()
    assert stats["cos_clean_poisoned"] == pytest.approx(cos, rel=1e-5)


def test_observing_hooks_leave_training_unchanged():
    data = load_dataset("synthetic", num_classes=3, train_size=60, test_size=30, image_size=16)
    config = TrainConfig(epochs=3, batch_size=16, lr=0.05)
    mask = torch.arange(60) % 5 == 0
    trained = []
    for hooks in (None, ForgettingHooks(data.train.x, data.train.y),
                  QuickLearningHooks(data.train.x, data.train.y, mask, {"clean_test": (data.test.x, data.test.y)})):
        model = create_model("cnn_small", 3, data.mean, data.std, seed=0)
        fit(model, data.train, config, device=torch.device("cpu"), seed=1, hooks=hooks)
        trained.append((model, hooks))
    reference = trained[0][0].state_dict()
    for model, hooks in trained[1:]:
        for key, value in model.state_dict().items():
            torch.testing.assert_close(value, reference[key], rtol=0, atol=0)
    assert len(trained[1][1].correct) == 3  # after each of the 3 epochs
    assert [r["epoch"] for r in trained[2][1].rows] == [0, 1, 2]


TINY = ["--dataset", "synthetic", "--dataset-params",
        '{"num_classes": 4, "train_size": 120, "test_size": 60, "image_size": 16}', "--epochs", "2",
        "--batch-size", "32"]


@pytest.mark.parametrize("name", ["quick-learning", "forgetting", "trigger-generalisation"])
def test_each_study_records_and_plots(name, tmp_path):
    extra = {"quick-learning": ["--attacks", "badnets"],
             "forgetting": ["--attacks", "badnets", "--ratios", "0.05", "0.1"],
             "trigger-generalisation": ["--train-alphas", "0.1", "0.3", "--test-alphas", "0.1", "0.2", "0.3"]}[name]
    argv = ["study", name, "--out", str(tmp_path), "--cache-dir", str(tmp_path / "cache"), *TINY, *extra]
    assert cli_main(argv) == 0
    for suffix in (".json", ".png", ".svg"):
        assert (tmp_path / f"{name}{suffix}").stat().st_size > 0
    payload = json.loads((tmp_path / f"{name}.json").read_text())
    if name == "quick-learning":
        rows = payload["runs"][0]["epochs"]
        assert len(rows) == 2
        for key in ("loss_poisoned", "acc_clean", "gsnr_all", "grad_norm_poisoned", "cos_all_poisoned",
                    "acc_poisoned_test"):
            assert np.isfinite(rows[-1][key])
    elif name == "forgetting":
        assert [r["ratio"] for r in payload["runs"]] == [0.05, 0.1]
        run = payload["runs"][1]
        assert len(run["counts"]) == 120 and sum(run["poisoned_mask"]) == 12
        assert run["summary"]["poisoned"]["n"] == 12 and run["summary"]["clean"]["n"] == 108
        assert sum(run["summary"]["clean"]["histogram"]) == 108
    else:
        asr = np.array(payload["asr"])
        assert asr.shape == (2, 3) and ((0 <= asr) & (asr <= 1)).all()
