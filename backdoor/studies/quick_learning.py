"""Quick learning of the backdoor (BackdoorBench supplementary B.6, its Figure 5).

After every epoch of backdoor training, for the poisoned, the clean and all training samples: loss, accuracy,
the gradient signal-to-noise ratio (GSNR, Liu et al., ICLR 2020: per parameter j, GSNR_j = E[g_j]^2 / Var[g_j]
over the samples' gradients, averaged over parameters), the norm of the average gradient, and the pairwise cosine
similarities of the groups' average gradients; plus loss and accuracy on the clean test set and on the triggered
test set labelled with the target (its accuracy is the ASR). Per-sample gradients of the cross-entropy come from
``torch.func`` (``vmap`` of ``grad`` over ``functional_call``), in eval mode, without augmentation.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from backdoor.studies._setup import EpochEndHooks, StudyCases, add_training_arguments, save_figure, write_json

NAME = "quick-learning"
GROUPS = ("poisoned", "clean", "all")
PAIRS = (("all", "poisoned"), ("all", "clean"), ("clean", "poisoned"))


def gsnr(total: torch.Tensor, squares: torch.Tensor, n: int) -> float:
    """Mean over parameters of E[g]^2 / Var[g], from the per-parameter sum and sum of squares of n samples'
    gradients (population variance; parameters whose gradient never varies are left out)."""
    mean = total.double() / n
    var = squares.double() / n - mean ** 2
    keep = var > 1e-20 * (squares.double() / n).clamp_min(1e-30)
    return float((mean[keep] ** 2 / var[keep]).mean()) if keep.any() else float("nan")


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.double()[None], b.double()[None]).item())


def per_sample_gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """[n, P] flattened per-sample gradients of the cross-entropy (model in eval mode; float images)."""
    from torch.func import functional_call, grad, vmap

    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}

    def loss(p, b, xi, yi):
        return F.cross_entropy(functional_call(model, (p, b), (xi[None],)), yi[None])

    grads = vmap(grad(loss), in_dims=(None, None, 0, 0))(params, buffers, x, y)
    return torch.cat([grads[k].flatten(1) for k in params], 1)


def gradient_statistics(model: nn.Module, x: torch.Tensor, y: torch.Tensor, poisoned: torch.Tensor,
                        batch_size: int = 64) -> dict:
    """GSNR, average-gradient norm per group and cosine similarities between the groups' average gradients."""
    total = squares = None  # rows: poisoned, clean (float64 [2, P]); "all" is their sum
    for start in range(0, len(y), batch_size):
        g = per_sample_gradients(model, x[start:start + batch_size].float().div(255), y[start:start + batch_size])
        mask = poisoned[start:start + batch_size]
        weights = torch.stack([mask, ~mask]).to(g.dtype)
        t, q = (weights @ g).double(), (weights @ (g * g)).double()
        total, squares = (t, q) if total is None else (total + t, squares + q)
    sums = {"poisoned": (total[0], squares[0]), "clean": (total[1], squares[1]), "all": (total.sum(0), squares.sum(0))}
    counts = {"poisoned": int(poisoned.sum()), "clean": int((~poisoned).sum()), "all": len(y)}
    out, means = {}, {}
    for group in GROUPS:
        if counts[group] == 0:
            continue
        means[group] = sums[group][0] / counts[group]
        out[f"gsnr_{group}"] = gsnr(*sums[group], counts[group])
        out[f"grad_norm_{group}"] = float(means[group].norm())
    for a, b in PAIRS:
        if a in means and b in means:
            out[f"cos_{a}_{b}"] = cosine(means[a], means[b])
    return out


@torch.no_grad()
def loss_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> tuple[float, float]:
    losses, correct = [], []
    for start in range(0, len(y), batch_size):
        logits = model(x[start:start + batch_size].float().div(255))
        losses.append(F.cross_entropy(logits, y[start:start + batch_size], reduction="none"))
        correct.append(logits.argmax(1) == y[start:start + batch_size])
    return float(torch.cat(losses).mean()), float(torch.cat(correct).float().mean())


class QuickLearningHooks(EpochEndHooks):
    """Per epoch: loss/accuracy of every group and test set, gradient statistics of the training groups."""

    def __init__(self, train_x, train_y, mask, test_sets: dict[str, tuple[torch.Tensor, torch.Tensor]]):
        super().__init__()
        self.train_x, self.train_y, self.mask, self.test_sets = train_x, train_y, mask, test_sets
        self.rows: list[dict] = []

    def measure(self, epoch: int) -> None:
        row = {"epoch": epoch}
        for group, sel in (("poisoned", self.mask), ("clean", ~self.mask), ("all", torch.ones_like(self.mask))):
            if sel.any():
                loss, acc = loss_accuracy(self.model, self.train_x[sel], self.train_y[sel])
                row[f"loss_{group}"], row[f"acc_{group}"] = loss, acc
        for name, (x, y) in self.test_sets.items():
            row[f"loss_{name}"], row[f"acc_{name}"] = loss_accuracy(self.model, x, y)
        row.update(gradient_statistics(self.model, self.train_x, self.train_y, self.mask))
        self.rows.append(row)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_training_arguments(parser, attacks=["badnets", "blended"], ratios=[0.1])
    parser.add_argument("--max-samples", type=int, default=None,
                        help="measure gradients on a seeded subset of this many training samples (default: all)")


def run(args: argparse.Namespace, folder: Path, cases: StudyCases) -> list[Path]:
    """Train each attack at each ratio with the hooks; write quick-learning.json and the figure."""
    runs = []
    for attack_name in args.attacks:
        for ratio in args.ratios:
            case = cases.case(attack_name, ratio)
            data, attack, poisoned = cases.poisoned_data(case)
            index = torch.arange(len(poisoned.y))
            if args.max_samples is not None and args.max_samples < len(index):
                g = torch.Generator().manual_seed(args.seed)
                index = torch.randperm(len(index), generator=g)[:args.max_samples].sort().values
            triggered = attack.poison_test(data.test)
            tests = {"clean_test": (data.test.x, data.test.y),
                     "poisoned_test": (triggered.x, torch.full_like(triggered.y, case.target))}
            hooks = QuickLearningHooks(poisoned.x[index], poisoned.y[index], poisoned.mask[index], tests)
            cases.train_observed(case, data, poisoned, hooks)
            runs.append({"attack": attack_name, "ratio": ratio, "case": case.case_id, "epochs": hooks.rows,
                         "measured_samples": len(index), "poisoned_samples": int(poisoned.mask[index].sum())})
    payload = {"study": NAME, "dataset": args.dataset, "model": args.model, "seed": args.seed,
               "training": {"epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size}, "runs": runs}
    return [write_json(folder / f"{NAME}.json", payload), *save_figure(_figure(runs), folder, NAME)]


COLUMNS = (("loss", "loss"), ("acc", "accuracy"), ("gsnr", "GSNR"), ("grad_norm", "norm of mean gradient"))
COLOURS = {"poisoned": "tab:red", "clean": "tab:blue", "all": "black", "clean_test": "tab:cyan",
           "poisoned_test": "tab:orange"}


def _figure(runs: list[dict]):
    from backdoor.analysis._common import pyplot

    plt = pyplot()
    fig, axes = plt.subplots(len(runs), 5, figsize=(19, 3.3 * len(runs)), squeeze=False)
    for row, run in zip(axes, runs):
        epochs = [r["epoch"] + 1 for r in run["epochs"]]
        for ax, (key, title) in zip(row, COLUMNS):
            groups = GROUPS + (("clean_test", "poisoned_test") if key in ("loss", "acc") else ())
            for group in groups:
                values = [r.get(f"{key}_{group}", np.nan) for r in run["epochs"]]
                ax.plot(epochs, values, color=COLOURS[group], label=group.replace("_", " "), linewidth=1.5)
            ax.set_title(f"{run['attack']} p={run['ratio']:g}: {title}", fontsize=10)
            if key in ("gsnr", "grad_norm"):
                ax.set_yscale("log")
        for a, b in PAIRS:
            values = [r.get(f"cos_{a}_{b}", np.nan) for r in run["epochs"]]
            row[4].plot(epochs, values, label=f"{a} vs {b}", linewidth=1.5)
        row[4].set_title(f"{run['attack']} p={run['ratio']:g}: cosine of mean gradients", fontsize=10)
        for ax in row:
            ax.set_xlabel("epoch", fontsize=9)
            ax.tick_params(labelsize=8)
            ax.grid(alpha=0.3)
    axes[0, 1].legend(fontsize=8)
    axes[0, 4].legend(fontsize=8)
    fig.suptitle("Quick learning of the backdoor (supplementary B.6): training groups and test sets per epoch",
                 fontsize=12)
    fig.tight_layout()
    return fig
