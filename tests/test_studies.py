"""Studies (supplementary B.6-B.8): forgetting counts and GSNR on hand-made inputs, hooks that only observe,
and each study end to end on a tiny synthetic dataset."""
import argparse
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from backdoor.attacks import create_attack
from backdoor.attacks.blended import blend_pattern
from backdoor.harness.cli import main as cli_main
from backdoor.data import Dataset, Split, load_dataset
from backdoor.models import create_model
from backdoor.studies import forgetting, quick_learning, trigger_generalisation
from backdoor.studies.forgetting import ForgettingHooks, ever_learned, forgetting_counts, summarise
from backdoor.studies.quick_learning import QuickLearningHooks, gradient_statistics, gsnr, per_sample_gradients
from backdoor.studies.trigger_generalisation import asr_row
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


HISTORY = np.array([[1, 1, 0, 0, 0, 0],   # epochs x samples; samples 0-2 clean, 3-5 poisoned
                    [1, 0, 0, 0, 0, 0],
                    [1, 1, 0, 0, 0, 0],
                    [1, 0, 0, 0, 0, 1]], bool)
POISONED = np.array([False, False, False, True, True, True])


def test_never_learned_samples_are_kept_apart_from_never_forgotten_ones():
    """Clean: 0 always right (never forgotten), 1 forgotten twice, 2 never right (never learned). Poisoned: 3 and
    4 never learned, 5 learned at the last epoch (never forgotten). Counting never-learned samples as never
    forgotten would give the poisoned group 100% never forgotten against 67% for the clean one: the backdoor
    would look better remembered though it implanted in one sample of three."""
    counts, learned = forgetting_counts(HISTORY), ever_learned(HISTORY)
    assert counts.tolist() == [0, 2, 0, 0, 0, 0] and learned.tolist() == [True, True, False, False, False, True]
    summary = summarise(counts, learned, POISONED)
    clean, poisoned = summary["clean"], summary["poisoned"]
    assert (clean["n"], clean["learned"], poisoned["n"], poisoned["learned"]) == (3, 2, 3, 1)
    assert clean["never_learned"] == {"count": 1, "share": 1 / 3}
    assert clean["never_forgotten"] == {"count": 1, "share": 1 / 3}
    assert clean["forgotten"] == {"count": 1, "share": 1 / 3}
    assert poisoned["never_learned"] == {"count": 2, "share": 2 / 3}
    assert poisoned["never_forgotten"] == {"count": 1, "share": 1 / 3}
    assert poisoned["forgotten"] == {"count": 0, "share": 0.0}
    assert clean["mean_events_of_learned"] == 1.0 and poisoned["mean_events_of_learned"] == 0.0
    assert clean["histogram_of_learned"] == [1, 0, 1] and poisoned["histogram_of_learned"] == [1]


def test_forgetting_figure_draws_never_learned_apart():
    counts, learned = forgetting_counts(HISTORY), ever_learned(HISTORY)
    runs = [{"attack": "badnets", "ratio": 0.5, "summary": summarise(counts, learned, POISONED)}]
    fig = forgetting._figure(runs, argparse.Namespace(epochs=4))
    ax = fig.axes[0]
    clean, poisoned = ax.containers  # bars at: never learned, 0, 1, 2 events
    np.testing.assert_allclose([b.get_height() for b in clean], [1 / 3, 1 / 3, 0, 1 / 3])
    np.testing.assert_allclose([b.get_height() for b in poisoned], [2 / 3, 1 / 3, 0, 0])
    assert [t.get_text() for t in ax.get_xticklabels()] == ["never\nlearned", "0", "1", "2"]
    assert [b.get_x() + b.get_width() / 2 for b in clean] == pytest.approx([-0.2, 0.8, 1.8, 2.8])


GREY = 100  # the test images' grey level (of 255)


class AlphaReader(nn.Module):
    """Estimates how much of the blend pattern t a grey image g holds: an image blended at alpha is
    x' = (1 - alpha) g + alpha t, so alpha = <x' - g, t - g> / <t - g, t - g> (exact up to the uint8 rounding);
    predicts the target 0 when the estimate is over 0.4, class 1 otherwise."""

    def __init__(self, pattern: torch.Tensor):
        super().__init__()
        self.register_buffer("away", pattern - GREY / 255)

    def forward(self, x):
        alpha = ((x - GREY / 255) * self.away).sum((1, 2, 3)) / (self.away ** 2).sum()
        over = (alpha > 0.4).float()
        return torch.stack([over, 1 - over, torch.zeros_like(over)], 1)


def test_asr_row_blends_the_test_set_at_each_test_alpha():
    """Grey test images of classes 0-2, blended at each test alpha: the reader's ASR is 0 for test alphas 0.1
    and 0.3 and 1 for 0.5 and 0.7, whatever alpha the attack was trained with (the test alpha ignored, or used
    as 1 - alpha, fails; so would a blend that keeps the image's full weight: it reads 0.3 as 0.43); its C-Acc
    is the share of class 1 (it predicts 1 on unblended images)."""
    y = torch.tensor([0, 1, 2, 1, 2, 1, 0, 1])
    grey = torch.full((8, 3, 8, 8), GREY, dtype=torch.uint8)
    data = Dataset("grey", Split(grey, y), Split(grey.clone(), y), 3, (0.0,) * 3, (1.0,) * 3, hflip=False)
    pattern = blend_pattern("noise", 0, (3, 8, 8))
    for trained_alpha in (0.1, 0.3, 0.5):
        attack = create_attack("blended", target=0, alpha=trained_alpha)
        asr, c_acc = asr_row(AlphaReader(pattern), attack, data, [0.1, 0.3, 0.5, 0.7], torch.device("cpu"))
        assert asr.tolist() == [0, 0, 1, 1]
        assert c_acc == 0.5


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


STUDY_MODULES = {"quick-learning": quick_learning, "forgetting": forgetting,
                 "trigger-generalisation": trigger_generalisation}


@pytest.mark.parametrize("name", ["quick-learning", "forgetting", "trigger-generalisation"])
def test_each_study_records_and_plots(name, tmp_path, monkeypatch):
    """Each study end to end; the figure's plotted values are read back and compared with the JSON record."""
    extra = {"quick-learning": ["--attacks", "badnets"],
             "forgetting": ["--attacks", "badnets", "--ratios", "0.05", "0.1"],
             "trigger-generalisation": ["--train-alphas", "0.1", "0.3", "--test-alphas", "0.1", "0.2", "0.3"]}[name]
    module, figures = STUDY_MODULES[name], []
    save = module.save_figure
    monkeypatch.setattr(module, "save_figure", lambda fig, *a: figures.append(fig) or save(fig, *a))
    argv = ["study", name, "--out", str(tmp_path), "--cache-dir", str(tmp_path / "cache"), *TINY, *extra]
    assert cli_main(argv) == 0
    for suffix in (".json", ".png", ".svg"):
        assert (tmp_path / f"{name}{suffix}").stat().st_size > 0
    payload = json.loads((tmp_path / f"{name}.json").read_text())
    CHECKS[name](payload, figures[0])


def check_quick_learning(payload: dict, fig) -> None:
    rows = payload["runs"][0]["epochs"]
    assert len(rows) == 2
    for key in ("loss_poisoned", "acc_clean", "gsnr_all", "grad_norm_poisoned", "cos_all_poisoned",
                "acc_poisoned_test"):
        assert np.isfinite(rows[-1][key])
    panels = fig.axes[:5]
    for ax, (key, _) in zip(panels, quick_learning.COLUMNS):
        lines = {line.get_label(): line for line in ax.get_lines()}
        for group in ("poisoned", "clean", "all"):
            assert lines[group].get_xdata().tolist() == [1, 2]
            np.testing.assert_allclose(lines[group].get_ydata(), [r[f"{key}_{group}"] for r in rows])
    cosines = {line.get_label(): line.get_ydata() for line in panels[4].get_lines()}
    np.testing.assert_allclose(cosines["clean vs poisoned"], [r["cos_clean_poisoned"] for r in rows])


def check_forgetting(payload: dict, fig) -> None:
    assert [r["ratio"] for r in payload["runs"]] == [0.05, 0.1]
    run = payload["runs"][1]
    assert len(run["counts"]) == 120 and sum(run["poisoned_mask"]) == 12
    summary = run["summary"]
    assert summary["poisoned"]["n"] == 12 and summary["clean"]["n"] == 108
    counts, learned, mask = (np.array(run[k]) for k in ("counts", "learned", "poisoned_mask"))
    for group, sel in (("clean", ~mask.astype(bool)), ("poisoned", mask.astype(bool))):
        tallies = summary[group]
        assert tallies["never_learned"]["count"] == int((~learned[sel]).sum())
        assert sum(tallies["histogram_of_learned"]) == tallies["learned"] == int(learned[sel].sum())
        assert tallies["never_learned"]["count"] + tallies["never_forgotten"]["count"] + \
            tallies["forgotten"]["count"] == tallies["n"]
    for ax, run in zip(fig.axes, payload["runs"]):
        for bars, group in zip(ax.containers, ("clean", "poisoned")):
            g = run["summary"][group]
            heights = [b.get_height() for b in bars]
            assert heights[0] == pytest.approx(g["never_learned"]["share"])
            histogram = np.array(g["histogram_of_learned"]) / g["n"]
            np.testing.assert_allclose(heights[1:1 + len(histogram)], histogram)
            assert not any(heights[1 + len(histogram):])


def check_trigger_generalisation(payload: dict, fig) -> None:
    asr = np.array(payload["asr"])
    assert asr.shape == (2, 3) and ((0 <= asr) & (asr <= 1)).all()
    assert payload["trained_alphas"] == [0.1, 0.3]  # the models' attacks were built with the asked alphas
    ax = fig.axes[0]
    np.testing.assert_allclose(ax.images[0].get_array(), 100 * asr)
    assert [t.get_text() for t in ax.texts] == [f"{100 * v:.1f}" for v in asr.flat]
    assert [t.get_text() for t in ax.get_yticklabels()] == [
        f"{a:g} (C-Acc {100 * c:.1f})" for a, c in zip(payload["train_alphas"], payload["c_acc"])]


CHECKS = {"quick-learning": check_quick_learning, "forgetting": check_forgetting,
          "trigger-generalisation": check_trigger_generalisation}
