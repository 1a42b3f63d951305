"""Trigger generalisation (BackdoorBench supplementary B.8, its Figure 7).

Blended backdoors are trained with each transparency alpha of ``--train-alphas`` (default 0.1, 0.2, 0.3) and each
backdoored model is tested with the trigger blended at each alpha of ``--test-alphas`` (same pattern, same seed):
the ASR matrix, rows = training alpha, columns = test alpha. The models are the grid's backdoored models (built
through the cache with the grid's specs, so a model the grid already trained is loaded, not retrained).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from torch import nn

from backdoor.attacks import Attack, create_attack
from backdoor.data import Dataset
from backdoor.metrics import backdoor_metrics
from backdoor.studies._setup import StudyCases, add_training_arguments, save_figure, write_json
from backdoor.training import predict

NAME = "trigger-generalisation"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_training_arguments(parser)
    parser.add_argument("--ratio", type=float, default=0.1, help="poison ratio (default 0.1)")
    parser.add_argument("--train-alphas", nargs="+", type=float, default=[0.1, 0.2, 0.3])
    parser.add_argument("--test-alphas", nargs="+", type=float, default=[0.1, 0.2, 0.3])


def backdoored_blended(args: argparse.Namespace, cases: StudyCases,
                       train_alpha: float) -> tuple[nn.Module, Attack, Dataset]:
    """The grid's Blended model trained with ``train_alpha`` (from the cache, or trained), its attack and data."""
    return cases.backdoored_model(cases.case("blended", args.ratio, {"alpha": train_alpha}))


def asr_row(model: nn.Module, attack: Attack, data: Dataset, test_alphas: list[float],
            device: torch.device) -> tuple[np.ndarray, float]:
    """ASR of ``model`` on the test set blended with ``attack``'s pattern at each of ``test_alphas`` (every other
    parameter the attack's own), and its C-Acc (which no test alpha changes)."""
    clean_pred = predict(model, data.test.x, device=device)
    asr = np.zeros(len(test_alphas))
    for j, test_alpha in enumerate(test_alphas):
        test = create_attack("blended", **{**attack.params(), "alpha": test_alpha}).poison_test(data.test)
        metrics = backdoor_metrics(clean_pred, data.test.y, predict(model, test.x, device=device), test.y,
                                   attack.target)
        asr[j] = metrics.asr
    return asr, metrics.c_acc


def asr_matrix(args: argparse.Namespace, cases: StudyCases) -> tuple[np.ndarray, np.ndarray, list[float]]:
    """ASR [train alphas, test alphas], C-Acc [train alphas], and the alpha each model's attack was trained with
    (read back from the attack, so the record shows what was trained, not what was asked)."""
    rows, c_acc, trained = [], [], []
    for train_alpha in args.train_alphas:
        model, attack, data = backdoored_blended(args, cases, train_alpha)
        row, acc = asr_row(model, attack, data, args.test_alphas, torch.device(args.device))
        rows.append(row), c_acc.append(acc), trained.append(attack.params()["alpha"])
    return np.stack(rows), np.array(c_acc), trained


def run(args: argparse.Namespace, folder: Path, cases: StudyCases) -> list[Path]:
    """The ASR matrix as trigger-generalisation.json and a heat map."""
    asr, c_acc, trained = asr_matrix(args, cases)
    payload = {"study": NAME, "dataset": args.dataset, "model": args.model, "seed": args.seed, "ratio": args.ratio,
               "training": {"epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size},
               "train_alphas": args.train_alphas, "trained_alphas": trained, "test_alphas": args.test_alphas,
               "asr": asr.tolist(), "c_acc": c_acc.tolist()}
    return [write_json(folder / f"{NAME}.json", payload), *save_figure(_figure(asr, c_acc, args), folder, NAME)]


def _figure(asr: np.ndarray, c_acc: np.ndarray, args: argparse.Namespace):
    from backdoor.analysis._common import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(1.6 * len(args.test_alphas) + 2.4, 1.3 * len(args.train_alphas) + 1.6))
    shown = ax.imshow(100 * asr, cmap="Reds", vmin=0, vmax=100)
    for i in range(asr.shape[0]):
        for j in range(asr.shape[1]):
            ax.text(j, i, f"{100 * asr[i, j]:.1f}", ha="center", va="center", fontsize=12,
                    color="white" if asr[i, j] > 0.6 else "black")
    ax.set_xticks(range(len(args.test_alphas)), [f"{a:g}" for a in args.test_alphas], fontsize=11)
    ax.set_yticks(range(len(args.train_alphas)),
                  [f"{a:g} (C-Acc {100 * c:.1f})" for a, c in zip(args.train_alphas, c_acc)], fontsize=10)
    ax.set_xlabel("test alpha", fontsize=11)
    ax.set_ylabel("training alpha", fontsize=11)
    fig.colorbar(shown, ax=ax, label="ASR (%)")
    ax.set_title(f"Blended trigger generalisation: ASR (%), ratio {args.ratio:g}", fontsize=11)
    fig.tight_layout()
    return fig
