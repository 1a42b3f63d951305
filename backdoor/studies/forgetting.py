"""Forgetting events of clean and poisoned training samples (BackdoorBench supplementary B.7, its Figure 6).

After Toneva et al. (ICLR 2019): a forgetting event is recorded for a training sample when it is predicted
correctly (as its training label: the target, for a poisoned sample) after epoch t and wrongly after epoch
t + 1. Predictions are taken on the whole poisoned training set after every epoch (eval mode, no augmentation);
the study compares the distribution of the counts for clean and poisoned samples at each poison ratio.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from backdoor.studies._setup import (EpochEndHooks, add_training_arguments, make_case, poisoned_data, runner_for,
                                     save_figure, train_observed, write_json)
from backdoor.training import predict

NAME = "forgetting"


def forgetting_counts(correct: np.ndarray) -> np.ndarray:
    """Per sample, how often it goes from correct to wrong between consecutive epochs: ``correct`` is bool
    [epochs, samples]."""
    correct = np.asarray(correct, bool)
    return (correct[:-1] & ~correct[1:]).sum(0)


class ForgettingHooks(EpochEndHooks):
    """Records, after every epoch, whether each training sample is predicted as its training label."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        super().__init__()
        self.x, self.y = x, y
        self.correct: list[np.ndarray] = []

    def measure(self, epoch: int) -> None:
        self.correct.append((predict(self.model, self.x, device=self.device) == self.y).numpy())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_training_arguments(parser, attacks=["badnets", "blended"], ratios=[0.005, 0.01, 0.05, 0.1])


def summarise(counts: np.ndarray, mask: np.ndarray) -> dict:
    """Mean, share never forgotten and histogram of the counts, for clean and poisoned samples."""
    out = {}
    for group, sel in (("clean", ~mask), ("poisoned", mask)):
        c = counts[sel]
        out[group] = {"n": int(sel.sum()), "mean": float(c.mean()) if len(c) else None,
                      "never_forgotten": float((c == 0).mean()) if len(c) else None,
                      "histogram": np.bincount(c, minlength=1).tolist() if len(c) else []}
    return out


def run(args: argparse.Namespace, folder: Path) -> list[Path]:
    """Train each attack at each ratio, count forgetting events; write forgetting.json and the figure."""
    runs = []
    for attack_name in args.attacks:
        for ratio in args.ratios:
            case = make_case(args, attack_name, ratio)
            runner = runner_for(args)
            data, attack, poisoned = poisoned_data(runner, case)
            hooks = ForgettingHooks(poisoned.x, poisoned.y)
            train_observed(runner, case, data, poisoned, hooks)
            counts = forgetting_counts(np.stack(hooks.correct))
            runs.append({"attack": attack_name, "ratio": ratio, "effective_ratio": poisoned.effective_ratio,
                         "case": case.case_id, "counts": counts.tolist(),
                         "poisoned_mask": poisoned.mask.numpy().tolist(),
                         "summary": summarise(counts, poisoned.mask.numpy())})
    payload = {"study": NAME, "dataset": args.dataset, "model": args.model, "seed": args.seed,
               "training": {"epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size}, "runs": runs}
    return [write_json(folder / f"{NAME}.json", payload), *save_figure(_figure(runs, args), folder, NAME)]


def _figure(runs: list[dict], args: argparse.Namespace):
    from backdoor.analysis._common import pyplot

    from matplotlib.ticker import MaxNLocator

    plt = pyplot()
    attacks, ratios = list(dict.fromkeys(r["attack"] for r in runs)), list(dict.fromkeys(r["ratio"] for r in runs))
    fig, axes = plt.subplots(len(attacks), len(ratios), figsize=(3.6 * len(ratios), 3.0 * len(attacks)),
                             squeeze=False, sharey=True)
    for run in runs:
        ax = axes[attacks.index(run["attack"]), ratios.index(run["ratio"])]
        counts, mask = np.array(run["counts"]), np.array(run["poisoned_mask"], bool)
        bins = np.arange(counts.max() + 2) - 0.5
        for group, sel, colour in (("clean", ~mask, "tab:blue"), ("poisoned", mask, "tab:red")):
            if sel.any():
                ax.hist(counts[sel], bins=bins, density=True, alpha=0.55, color=colour,
                        label=f"{group} (n={int(sel.sum())}, mean {counts[sel].mean():.2f})")
        ax.set_title(f"{run['attack']}, ratio {run['ratio']:g}", fontsize=10)
        ax.set_xlabel("forgetting events", fontsize=9)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=7.5)
        ax.tick_params(labelsize=8)
    for ax in axes[:, 0]:
        ax.set_ylabel("share of samples", fontsize=9)
    fig.suptitle(f"Forgetting events over {args.epochs} epochs (supplementary B.7)", fontsize=12)
    fig.tight_layout()
    return fig
