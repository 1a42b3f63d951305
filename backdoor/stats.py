"""Statistics over seeds: the mean with a two-sided 95% Student-t confidence interval.

A matrix's seeds are repeated, independent runs of the same case (BackdoorBench supplementary B.4.1 repeats
evaluations over 5 seeds). Over n values with sample standard deviation s, the interval is
mean +- t(0.975, n - 1) * s / sqrt(n). It is clipped to [0, 1] when the values are fractions; with n = 1 there
is no interval.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
INTERVAL_KIND = "two-sided 95% Student-t interval of the mean over seeds"


@dataclass(frozen=True)
class Summary:
    mean: float
    n: int
    half_width: float | None  # None when n == 1
    low: float | None
    high: float | None


def summarize(values: Iterable[float], bounds: tuple[float, float] | None = (0.0, 1.0)) -> Summary | None:
    """Mean, n and the 95% t-interval of ``values`` (None values are skipped; None when nothing is left)."""
    xs = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not xs:
        return None
    n = len(xs)
    mean = sum(xs) / n
    if n == 1:
        return Summary(mean, 1, None, None, None)
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    half = float(stats.t.ppf(0.5 + CONFIDENCE / 2, n - 1)) * sd / math.sqrt(n)
    low, high = mean - half, mean + half
    if bounds is not None:
        low, high = max(bounds[0], low), min(bounds[1], high)
    return Summary(mean, n, half, low, high)


BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_KIND = ("95% percentile bootstrap interval over models (2,000 resamples, positives and negatives resampled "
                  "separately, seed 0)")


def auroc_interval(positives: Iterable[float], negatives: Iterable[float], resamples: int = BOOTSTRAP_RESAMPLES,
                   seed: int = 0) -> tuple[float, float, float] | None:
    """AUROC of scores (higher = positive; ties count one half) with its 95% percentile bootstrap interval:
    (auroc, low, high), resampling the positives and the negatives separately (a population's clean and backdoored
    models are drawn as two groups); None without at least one of each."""
    pos, neg = np.asarray(list(positives), float), np.asarray(list(negatives), float)
    if len(pos) == 0 or len(neg) == 0:
        return None
    rng = np.random.default_rng(seed)
    boot = _auroc_rows(pos[rng.integers(0, len(pos), (resamples, len(pos)))],
                       neg[rng.integers(0, len(neg), (resamples, len(neg)))])
    low, high = np.percentile(boot, [2.5, 97.5])
    return float(_auroc_rows(pos[None], neg[None])[0]), float(low), float(high)


def _auroc_rows(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """The Mann-Whitney AUROC of each row pair: P(positive > negative) + P(tie) / 2."""
    greater = (pos[:, :, None] > neg[:, None, :]).mean(axis=(1, 2))
    ties = (pos[:, :, None] == neg[:, None, :]).mean(axis=(1, 2))
    return greater + ties / 2
