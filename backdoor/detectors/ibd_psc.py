"""IBD-PSC (Linshan Hou, Ruili Feng, Zhongyun Hua, Wei Luo, Leo Yu Zhang and Yiming Li, "IBD-PSC: Input-level
Backdoor Detection via Parameter-oriented Scaling Consistency", ICML 2024, PMLR 235).

Input-level detector. The phenomenon it rests on, parameter-oriented scaling consistency: when the parameters of
a backdoored model's batch-norm layers are amplified, benign inputs lose the confidence of their predicted label
(the predictions drift to other classes) while triggered inputs keep theirs.

Mechanism, as the authors' code (BackdoorBox ``core/defenses/IBD_PSC.py``) defines it. The model's batch-norm
layers are numbered in module order, 1..L; "amplifying the last c layers" multiplies the weight (gamma) and the
bias (beta) of layers L-c+1..L by ``scale`` (running statistics untouched), on a copy of the model.

1. Adaptive layer selection, on the defender's clean data only: for c = 1, 2, ..., L-1 in turn, amplify the last
   c layers and measure the clean error rate (prediction != label); the start k is the first c at which that
   rate exceeds ``xi``.
2. n amplified models: the i-th (i = 1..n) amplifies the last k + i layers (capped at L: the reference slices
   the reversed layer list, so past L a model amplifies all of them).
3. PSC(x) = the mean over the n amplified models of the softmax probability they give to y', the label the
   ORIGINAL model predicts for x. PSC > ``T`` flags x as triggered; ``T`` is the paper's fixed threshold, not
   calibrated (so the screen's threshold is ``T``).

Cost: calibration, at most L-1 forward passes over the clean subset; scoring, 1 + (number of distinct
amplified models, at most n) forward passes per input. Each pass goes over the batch of images at once
(``predict_logits``, batches of 512); the amplified models are one private copy whose batch-norm parameters are
set to each model's values in turn and restored afterwards: the inspected model is never changed.

Departures, and why:
- No start found. When no c in 1..L-1 pushes the clean error above ``xi`` (or L = 1, where there is no c to try),
  the reference's selection returns None and its scoring fails. We take k = L - 1, so that every amplified
  model amplifies all L layers (the strongest amplification the rule considers), and record ``start_found``
  False in the screen's ``info``.
- Batch-norm layers: every ``_BatchNorm`` of the network (``roles.batchnorm_layers``: 1-d and 3-d ones too),
  where the reference counts ``BatchNorm2d`` only; layers without affine parameters are skipped (nothing to
  amplify; the reference would fail on them). A model with none left raises ``NotApplicable``.
- The models are built once per calibration and distinct amplified models are evaluated once each (with
  their multiplicity in the mean), where the reference deep-copies the model for every batch and every model;
  the scores are the same.
- Flag: PSC > T (the base screen's rule); the reference flags PSC >= T. The two differ only on ties.
- The reference's evaluation keeps only inputs the original model classifies as their label (benign) or as the
  target (poisoned); that filter needs labels the screen is not given, and is the harness's to apply.
- Parameter names and defaults are the reference's (n 5, xi 0.6, T 0.9, scale 1.5), the values the issue gives
  for the paper too; the paper's PDF was not reachable in this session to re-read them.
"""
from __future__ import annotations

import copy
from collections import Counter
from typing import Callable

import torch
from torch import nn

from backdoor._checks import check_int, check_number
from backdoor._registry import Param
from backdoor.defenses.base import DefenseInputs, NotApplicable
from backdoor.detectors import register_detector
from backdoor.detectors.base import InputDetector, InputScreen
from backdoor.models import roles
from backdoor.mutants import Mutant
from backdoor.training import predict_logits

BATCH = 512


def affine_batchnorms(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's batch-norm layers that have a weight and a bias to amplify, in module order."""
    return [(name, m) for name, m in roles.batchnorm_layers(model) if m.weight is not None and m.bias is not None]


def select_start(error_rate: Callable[[int], float], num_layers: int, xi: float) -> tuple[int, bool, list[float]]:
    """The first c in 1..num_layers-1 whose ``error_rate(c)`` (clean error with the last c layers amplified)
    exceeds ``xi``: (c, True, rates tried); none: (num_layers - 1, False, rates)."""
    rates: list[float] = []
    for count in range(1, num_layers):
        rates.append(float(error_rate(count)))
        if rates[-1] > xi:
            return count, True, rates
    return num_layers - 1, False, rates


def amplified_counts(start: int, n: int, num_layers: int) -> list[int]:
    """How many of the last layers each of the n amplified models amplifies: start + 1, ..., start + n, capped."""
    return [min(start + i + 1, num_layers) for i in range(n)]


class _Amplifier:
    """A private copy of a model whose last ``count`` affine batch-norm layers can be amplified by ``scale``
    (``set(count)``; ``set(0)`` restores the original parameters)."""

    def __init__(self, model: nn.Module, scale: float, device: torch.device):
        self.model = copy.deepcopy(model).to(device).eval()
        self.scale = scale
        self.layers = [m for _, m in affine_batchnorms(self.model)]
        self.original = [(m.weight.detach().clone(), m.bias.detach().clone()) for m in self.layers]

    @torch.no_grad()
    def set(self, count: int) -> nn.Module:
        first = len(self.layers) - count  # the last ``count`` layers are amplified
        for index, (layer, (weight, bias)) in enumerate(zip(self.layers, self.original)):
            factor = self.scale if index >= first else 1.0
            layer.weight.copy_(weight * factor)
            layer.bias.copy_(bias * factor)
        return self.model


class PSCScreen(InputScreen):
    """Scores = PSC; threshold = T. ``info``: the selection's figures (JSON-serialisable)."""

    def __init__(self, amplifier: _Amplifier, counts: list[int], threshold: float, device: torch.device,
                 info: dict):
        self.amplifier, self.counts, self.threshold, self.device, self.info = amplifier, counts, threshold, device, info

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        amp = self.amplifier
        if len(x) == 0:
            return torch.zeros(0)
        try:
            original = predict_logits(amp.set(0), x, device=self.device, batch_size=BATCH).argmax(1)
            rows = torch.arange(len(x))
            psc = torch.zeros(len(x), dtype=torch.float64)
            for count, times in sorted(Counter(self.counts).items()):
                probs = predict_logits(amp.set(count), x, device=self.device, batch_size=BATCH).softmax(1)
                psc += times * probs[rows, original].double()
            psc /= len(self.counts)
        finally:
            amp.set(0)
        return psc.float()


@register_detector("ibd_psc")
class IBDPSC(InputDetector):
    """IBD-PSC: flag inputs whose predicted label stays confident when the last batch-norm layers are amplified."""

    title = "IBD-PSC"
    description = ("mean confidence of the original prediction over n models whose last BN layers (from a start chosen "
                   "on clean data: first error > xi) are scaled up; flags PSC > T (n 5, xi 0.6, T 0.9, scale 1.5)")
    order = 40
    parameters = {
        "n": Param("5", "5", "the paper's and the reference's number of amplified models"),
        "xi": Param("0.6", "0.6", "the paper's and the reference's clean error rate that sets the start layer"),
        "T": Param("0.9", "0.9", "the paper's fixed threshold on PSC, as the reference (flags PSC > T; the "
                   "reference >= T)"),
        "scale": Param("1.5", "1.5", "the paper's and the reference's amplification of BN weight and bias"),
    }
    # Each find starts with a newline and the line's indentation, so that it matches the code line, not its
    # own text here.
    mutants = (
        Mutant("no-amplification", "the batch-norm parameters are multiplied by 1 (no amplified model differs)",
               "\n            factor = self.scale if index >= first else 1.0", "\n            factor = 1.0"),
        Mutant("first-layers", "amplifies the first layers instead of the last ones",
               "\n            factor = self.scale if index >= first else 1.0",
               "\n            factor = self.scale if index < count else 1.0"),
        Mutant("weight-only", "amplifies the BN weight but not its bias",
               "\n            layer.bias.copy_(bias * factor)", "\n            layer.bias.copy_(bias)"),
        Mutant("amplified-label", "PSC takes the amplified model's own predicted label, not the original's",
               "\n                psc += times * probs[rows, original].double()",
               "\n                psc += times * probs.max(1).values.double()"),
        Mutant("one-model", "PSC is the first amplified model's confidence, not the mean over the n models",
               "\n        counts = amplified_counts(start, self.n, len(layers))",
               "\n        counts = amplified_counts(start, 1, len(layers))"),
        Mutant("selection-inverted", "the start layer is the first whose clean error is at most xi",
               "\n        if rates[-1] > xi:", "\n        if rates[-1] <= xi:"),
        Mutant("inverted-score", "scores 1 - PSC: a confident input looks benign",
               "\n        return psc.float()", "\n        return (1 - psc).float()"),
    )

    def __init__(self, n: int = 5, xi: float = 0.6, T: float = 0.9, scale: float = 1.5):
        check_int("ibd_psc", "n", n, minimum=1)
        check_number("ibd_psc", "xi", xi, low=0, high=1, low_open=True, high_open=True)
        check_number("ibd_psc", "T", T, low=0, high=1, low_open=True, high_open=True)
        check_number("ibd_psc", "scale", scale, low=1, low_open=True)
        self.n, self.xi, self.T, self.scale = n, xi, T, scale

    def calibrate(self, inputs: DefenseInputs) -> PSCScreen:
        layers = affine_batchnorms(inputs.model)
        if not layers:
            raise NotApplicable("ibd_psc: the model has no batch-norm layers with parameters to amplify "
                                "(e.g. VGG-19 without BN)")
        amp = _Amplifier(inputs.model, self.scale, inputs.device)
        clean = inputs.clean

        def error_rate(count: int) -> float:
            pred = predict_logits(amp.set(count), clean.x, device=inputs.device, batch_size=BATCH).argmax(1)
            return float((pred != clean.y.cpu()).float().mean())

        try:
            start, found, rates = select_start(error_rate, len(layers), self.xi)
        finally:
            amp.set(0)
        counts = amplified_counts(start, self.n, len(layers))
        info = {"bn_layers": len(layers), "start": start, "start_found": found, "clean_error_rates": rates,
                "amplified_counts": counts, "amplified_layers": [name for name, _ in layers[len(layers) - max(counts):]]}
        return PSCScreen(amp, counts, self.T, inputs.device, info)
