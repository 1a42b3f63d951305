"""Forgetting events of clean and poisoned training samples (BackdoorBench supplementary B.7, its Figure 6).

After Toneva et al. (ICLR 2019): a forgetting event is recorded for a training sample when it is predicted
correctly (as its training label: the target, for a poisoned sample) after epoch t and wrongly after epoch
t + 1. Predictions are taken on the whole poisoned training set after every epoch (eval mode, no augmentation);
the study compares the distribution of the counts for clean and poisoned samples at each poison ratio.

A sample never predicted as its training label after any epoch was never learned: it has no forgetting event
either, but it is not "unforgettable". Toneva et al. keep such samples apart, and so does this study: per group
(clean, poisoned) it reports the never-learned samples, the never-forgotten ones (learned, no event) and the
event counts of the learned samples only. Counting never-learned poisoned samples as never forgotten reads a
backdoor that did not implant as one that is remembered well.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from backdoor.studies._setup import EpochEndHooks, StudyCases, add_training_arguments, save_figure, write_json
from backdoor.training import predict

NAME = "forgetting"


def forgetting_counts(correct: np.ndarray) -> np.ndarray:
    """Per sample, how often it goes from correct to wrong between consecutive epochs: ``correct`` is bool
    [epochs, samples]."""
    correct = np.asarray(correct, bool)
    return (correct[:-1] & ~correct[1:]).sum(0)


def ever_learned(correct: np.ndarray) -> np.ndarray:
    """Per sample, whether it was predicted correctly after at least one epoch (``correct``: bool [epochs,
    samples])."""
    return np.asarray(correct, bool).any(0)


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


def share(count: int, n: int) -> float | None:
    return count / n if n else None


def summarise_group(counts: np.ndarray, learned: np.ndarray) -> dict:
    """One group's samples: never learned, never forgotten (learned, no event), forgotten at least once (counts
    and shares of the group), and the learned samples' mean count and histogram of counts."""
    n, events = len(counts), counts[learned]
    tallies = {"never_learned": int((~learned).sum()), "never_forgotten": int((events == 0).sum()),
               "forgotten": int((events > 0).sum())}
    return {"n": n, "learned": int(learned.sum()),
            **{key: {"count": count, "share": share(count, n)} for key, count in tallies.items()},
            "mean_events_of_learned": float(events.mean()) if len(events) else None,
            "histogram_of_learned": np.bincount(events, minlength=1).tolist() if len(events) else []}


def summarise(counts: np.ndarray, learned: np.ndarray, mask: np.ndarray) -> dict:
    """``summarise_group`` for the clean and the poisoned samples (``mask``: poisoned)."""
    return {group: summarise_group(counts[sel], learned[sel]) for group, sel in (("clean", ~mask), ("poisoned", mask))}


def run(args: argparse.Namespace, folder: Path, cases: StudyCases) -> list[Path]:
    """Train each attack at each ratio, count forgetting events; write forgetting.json and the figure."""
    runs = []
    for attack_name in args.attacks:
        for ratio in args.ratios:
            case = cases.case(attack_name, ratio)
            data, attack, poisoned = cases.poisoned_data(case)
            hooks = ForgettingHooks(poisoned.x, poisoned.y)
            cases.train_observed(case, data, poisoned, hooks)
            correct = np.stack(hooks.correct)
            counts, learned = forgetting_counts(correct), ever_learned(correct)
            runs.append({"attack": attack_name, "ratio": ratio, "effective_ratio": poisoned.effective_ratio,
                         "case": case.case_id, "counts": counts.tolist(), "learned": learned.tolist(),
                         "poisoned_mask": poisoned.mask.numpy().tolist(),
                         "summary": summarise(counts, learned, poisoned.mask.numpy())})
    payload = {"study": NAME, "dataset": args.dataset, "model": args.model, "seed": args.seed,
               "training": {"epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size}, "runs": runs}
    return [write_json(folder / f"{NAME}.json", payload), *save_figure(_figure(runs, args), folder, NAME)]


GROUPS = (("clean", "tab:blue", -0.2), ("poisoned", "tab:red", 0.2))


def bar_heights(group: dict, slots: int) -> np.ndarray:
    """Shares of the group at the figure's positions: never learned, then 0, 1, ... forgetting events (learned)."""
    heights = np.zeros(slots)
    heights[0] = group["never_learned"]["share"]
    histogram = group["histogram_of_learned"]
    heights[1:1 + len(histogram)] = np.array(histogram) / group["n"]
    return heights


def _figure(runs: list[dict], args: argparse.Namespace):
    from backdoor.analysis._common import pyplot

    plt = pyplot()
    attacks, ratios = list(dict.fromkeys(r["attack"] for r in runs)), list(dict.fromkeys(r["ratio"] for r in runs))
    fig, axes = plt.subplots(len(attacks), len(ratios), figsize=(3.6 * len(ratios), 3.0 * len(attacks)),
                             squeeze=False, sharey=True)
    for run in runs:
        ax = axes[attacks.index(run["attack"]), ratios.index(run["ratio"])]
        slots = 1 + max(len(g["histogram_of_learned"]) for g in run["summary"].values())
        for group, colour, offset in GROUPS:
            summary = run["summary"][group]
            if summary["n"]:
                mean = summary["mean_events_of_learned"]
                ax.bar(np.arange(slots) + offset, bar_heights(summary, slots), width=0.4, color=colour, alpha=0.75,
                       label=f"{group} (n={summary['n']}, never learned {100 * summary['never_learned']['share']:.0f}%"
                             + (f", mean {mean:.2f})" if mean is not None else ")"))
        ax.set_xticks(range(slots), ["never\nlearned", *map(str, range(slots - 1))])
        ax.set_title(f"{run['attack']}, ratio {run['ratio']:g}", fontsize=10)
        ax.set_xlabel("forgetting events (learned samples)", fontsize=9)
        ax.legend(fontsize=7)
        ax.tick_params(labelsize=8)
    for ax in axes[:, 0]:
        ax.set_ylabel("share of the group", fontsize=9)
    fig.suptitle(f"Forgetting events over {args.epochs} epochs (supplementary B.7); never-learned samples apart",
                 fontsize=12)
    fig.tight_layout()
    return fig
