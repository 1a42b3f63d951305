"""t-SNE of penultimate features of clean and triggered test samples, before and after the defense.

Paper section 3.2: t-SNE (van der Maaten & Hinton, JMLR 2008) gives a global view of a model's feature space
and shows whether the backdoor is formed: triggered samples gathering in a cluster of their own (paper Figure 4,
middle and bottom rows, before/after ABL and ANP). Features are the input of the model's declared head
(``roles.head``). The embedding is scikit-learn's Barnes-Hut ``TSNE`` (PCA init, seeded),
already a dependency of the project. How apart the triggered samples are is measured by their kNN purity: the
mean fraction of each triggered point's k nearest neighbours (in the embedding) that are triggered too.

Purity says whether triggered samples sit together, not whether they sit with the target class: it stayed at
0.99 after ANP removed Blended's backdoor and at 1.00 after ABL erased the target class. What tracks the backdoor
is the target-neighbour share: the share of triggered samples whose k nearest clean test samples in feature
space are mostly (more than half) of the target class, by their true labels. It is high when the trigger
carries samples into the target's cluster and low when they stay with their own class. The same share for
the clean non-target test samples (their k nearest other clean samples) is the level to read it against.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from backdoor.analysis._artifacts import CaseArtifacts
from backdoor.analysis._common import pyplot, save_figure, save_numbers
from backdoor.defenses._data_side import penultimate_features

NAME = "tsne"


def embed(features: np.ndarray, *, perplexity: float = 30.0, seed: int = 0) -> np.ndarray:
    """2-D t-SNE embedding of ``features`` [N, D] (PCA initialisation, seeded)."""
    from sklearn.manifold import TSNE

    perplexity = min(perplexity, max(1.0, (len(features) - 1) / 3))
    return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(
        np.asarray(features, dtype=np.float64))


def knn_purity(points: np.ndarray, marked: np.ndarray, k: int = 10) -> float:
    """Mean over the ``marked`` points of the fraction of their ``k`` nearest other points that are marked."""
    from sklearn.neighbors import NearestNeighbors

    marked = np.asarray(marked, bool)
    if marked.sum() == 0:
        return float("nan")
    _, index = NearestNeighbors(n_neighbors=k + 1).fit(points).kneighbors(points[marked])
    return float(marked[index[:, 1:]].mean())


def mostly_target(neighbour_labels: np.ndarray, target: int) -> np.ndarray:
    """Per row of neighbours' labels [n, k], whether more than half of them are ``target``."""
    return (neighbour_labels == target).mean(1) > 0.5


def target_neighbour_share(clean: np.ndarray, clean_labels: np.ndarray, triggered: np.ndarray, target: int,
                           k: int = 10) -> float:
    """Share of the ``triggered`` points [m, D] whose ``k`` nearest ``clean`` points [n, D] are mostly of class
    ``target`` (``clean_labels``: the clean points' true labels)."""
    from sklearn.neighbors import NearestNeighbors

    if len(triggered) == 0:
        return float("nan")
    _, index = NearestNeighbors(n_neighbors=k).fit(clean).kneighbors(triggered)
    return float(mostly_target(clean_labels[index], target).mean())


def clean_target_neighbour_share(clean: np.ndarray, clean_labels: np.ndarray, target: int, k: int = 10) -> float:
    """The same share for the clean non-target points, over their ``k`` nearest other clean points: the level
    a triggered sample's neighbourhood is read against."""
    from sklearn.neighbors import NearestNeighbors

    others = clean_labels != target
    if not others.any():
        return float("nan")
    _, index = NearestNeighbors(n_neighbors=k + 1).fit(clean).kneighbors(clean[others])
    return float(mostly_target(clean_labels[index[:, 1:]], target).mean())


def features_and_labels(model, artifacts: CaseArtifacts,
                        device: torch.device) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Penultimate features of the whole clean test set and the triggered test set; true labels; triggered flag."""
    test = artifacts.data.test
    triggered = artifacts.triggered_test()
    clean_f = penultimate_features(model, test.x, device=device)
    trig_f = penultimate_features(model, triggered.x, device=device)
    features = torch.cat([clean_f, trig_f]).numpy()
    labels = torch.cat([test.y, triggered.y]).numpy()
    flag = np.r_[np.zeros(len(clean_f), bool), np.ones(len(trig_f), bool)]
    return features, labels, flag


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--perplexity", type=float, default=30.0, help="t-SNE perplexity (default 30)")
    parser.add_argument("--k", type=int, default=10,
                        help="neighbours for the kNN purity and the target-neighbour share (default 10)")


def run(artifacts: CaseArtifacts, folder: Path, args: argparse.Namespace) -> list[Path]:
    """Embed clean + triggered test features under each model; figure, embeddings, kNN purities and
    target-neighbour shares."""
    target = artifacts.case.target
    arrays, summary, panels = {}, {"case": artifacts.case.case_id, "k": args.k, "perplexity": args.perplexity}, []
    for stage, model in artifacts.models().items():
        features, labels, flag = features_and_labels(model, artifacts, torch.device(args.device))
        points = embed(features, perplexity=args.perplexity, seed=args.seed)
        arrays.update({f"embedding_{stage}": points, "labels": labels, "triggered": flag})
        summary[f"knn_purity_{stage}"] = knn_purity(points, flag, args.k)
        summary[f"knn_purity_features_{stage}"] = knn_purity(features, flag, args.k)
        summary[f"target_neighbour_share_{stage}"] = target_neighbour_share(
            features[~flag], labels[~flag], features[flag], target, args.k)
        summary[f"clean_target_neighbour_share_{stage}"] = clean_target_neighbour_share(
            features[~flag], labels[~flag], target, args.k)
        panels.append((stage, points, labels, flag, summary[f"knn_purity_{stage}"],
                       summary[f"target_neighbour_share_{stage}"]))
    fig = _figure(panels, artifacts.case.case_id, artifacts.case.target, args.k)
    return [save_figure(fig, folder, NAME), *save_numbers(folder, NAME, arrays, summary)]


def _figure(panels: list, title: str, target: int, k: int):
    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels), 5.6), squeeze=False)
    cmap = plt.get_cmap("tab10")
    for ax, (stage, points, labels, flag, purity, share) in zip(axes[0], panels):
        for label in np.unique(labels):
            sel = (labels == label) & ~flag
            ax.scatter(points[sel, 0], points[sel, 1], s=9, color=cmap(int(label) % 10), label=f"class {label}")
        ax.scatter(points[flag, 0], points[flag, 1], s=16, marker="x", color="black", linewidths=0.8,
                   label=f"triggered (target {target})")
        ax.set_title(f"{'before' if stage == 'before' else 'after'} the defense: triggered {k}-NN purity {purity:.2f}\n"
                     f"with mostly target-class clean {k}-NN (features): {share:.2f}", fontsize=11)
        ax.set_xticks([]), ax.set_yticks([])
    axes[0, -1].legend(fontsize=9, loc="center left", bbox_to_anchor=(1.01, 0.5), markerscale=1.5)
    fig.suptitle(f"{title}: t-SNE of penultimate features (dots: clean test by class; x: triggered)", fontsize=12)
    fig.tight_layout()
    return fig
