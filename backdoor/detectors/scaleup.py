"""SCALE-UP (Junfeng Guo, Yiming Li, Xun Chen, Hanqing Guo, Lichao Sun and Cong Liu, "SCALE-UP: An Efficient
Black-box Input-level Backdoor Detection via Analyzing Scaled Prediction Consistency", ICLR 2023).

Input-level detector; it needs only the model's predicted labels. Each input x (pixel values on [0, 1]) is
amplified by every factor n of the scale set S: ``clip(n * x, 0, 1)``, and the model predicts the original and
every amplified image. The scaled prediction consistency is

    SPC(x) = #{n in S : C(clip(n x)) = C(x)} / |S|,

the share of amplified images whose predicted label is the original image's. The paper's observation: the
prediction of a triggered image survives amplification (the trigger, often saturated pixels, stays where it is
and dominates), a benign image's drifts, so a high SPC is suspicious.

Data-limited variant (``standardise``, on by default, since the defender's clean subset is always given): the
paper assumes the defender holds a few benign samples from each class and normalises an input's SPC by the
mean and standard deviation of those samples' SPC, since some benign images are themselves consistent under
amplification. We remove that benign consistency per class. The clean subset's SPC is measured the
same way; its samples are grouped by the model's prediction on the (unscaled) clean image, and each group gives
a mean mu_c and a sample standard deviation sigma_c (Bessel-corrected, as ``torch.std``). An input predicted as
class c scores ``(SPC(x) - mu_c) / sigma_c``. Where a class cannot give both (no clean sample predicted as c:
its mean; fewer than two, or all of them equally consistent, sigma_c = 0: its spread) the statistic pooled over
the whole clean subset stands in; a pooled spread of 0 is replaced by 1 (the score is then SPC - mu).

Decision. ``threshold`` defaults to BackdoorBox's fixed T = 0.5 on the score (on the standardised score: half a
clean standard deviation above the mean of the input's predicted class, which is a calibration on the clean
data; without standardisation: SPC above one half). With ``fpr`` set, the threshold is instead calibrated on
the clean subset's own scores: their (1 - fpr) quantile (``quantile_threshold``). The screen flags
``scores > threshold``.

Ties. SPC takes only |S| + 1 values (k / |S|), so the clean scores tie heavily, the standardised ones too (one
value per (class, k)). A fixed T = 0.5 is not a value raw SPC takes with an odd |S| (k/5), so ``>`` and
BackdoorBox's ``>=`` flag the same inputs; on standardised scores they differ only for an input exactly at T.
A calibrated threshold usually lands on a tied value: then ``scores > threshold`` flags only the scores strictly
above it, so the clean FPR is at most ``fpr`` and may be well below it (0 when the quantile is the largest clean
score), and every input tied at the threshold, triggered or not, is passed. We keep the strict rule (it is
``InputScreen.flag``'s): the stated FPR is then a bound the clean data guarantees, not a target met by chance.

Cost: 1 + |S| forward passes per input (6 with the defaults), for the clean subset once at calibration and for
every screened input; no gradient, nothing random (``inputs.seed`` is not needed). Inputs are scored in chunks
whose original and scaled images go through the model together (at most ``_IMAGES_PER_PASS`` images a pass).

Departures from BackdoorBox (THUYimingLi/BackdoorBox, core/defenses/SCALE_UP.py), and why:
- Standardisation per predicted class. BackdoorBox's ``init_spc_norm`` pools ONE mean and std over all the
  benign samples, and measures their SPC against their TRUE labels (the screened inputs' against the model's
  prediction). We group by the model's prediction and measure both against the prediction: benign
  consistency differs between classes (a bright class stays bright when amplified), the benign samples come
  from each class, the screened input has no label but its prediction, and the same statistic on both sides is
  what makes the standardisation remove that class's benign consistency (tests/test_detect_scaleup.py shows a
  raw-SPC tie between triggered inputs and a consistent benign class that the per-class scores break).
  ``standardise=False`` gives the raw SPC (BackdoorBox without ``valset``).
- The decision is ``>``, BackdoorBox's is ``>=`` (see Ties). BackdoorBox also sets T only when no threshold is
  passed (a given threshold is ignored there); ours is used as given.
- BackdoorBox's evaluation keeps only the inputs the model classifies as their label (a test-set metric that
  needs labels); a screen sees no labels and scores every input.
- The authors' own code (JunfengGo/SCALE-UP) scans the integer factors 1 to 11 and counts factor 1 (the image
  itself) in the share; we follow BackdoorBox's set {3, 5, 7, 9, 11}, excluding 1, which always agrees.
- Values outside [0, 1] never reach the model: our images are uint8, so ``x / 255`` is already on [0, 1] and the
  amplified image is clipped there before the model normalises it (BackdoorBox scales the unnormalised tensor
  too, with normalisation inside its model, as here).
"""
from __future__ import annotations

import torch

from backdoor._checks import ParameterError, check_number, is_finite_number
from backdoor._registry import NONE, NOT_STATED, Param
from backdoor.defenses.base import DefenseInputs
from backdoor.detectors import register_detector
from backdoor.detectors.base import InputDetector, InputScreen, quantile_threshold
from backdoor.mutants import Mutant

_IMAGES_PER_PASS = 512  # original + scaled images per forward pass
_TINY = 1e-9  # a spread at or below this is 0 (float sums of equal SPCs need not cancel exactly)
_DEFAULT_THRESHOLD = 0.5


def scaled_prediction_consistency(model: torch.nn.Module, x: torch.Tensor, scales: list[float],
                                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(SPC [N] float64, prediction on the original image [N] long), both on the CPU, for uint8 images x
    [N, C, H, W]: the share of the factors in ``scales`` whose amplified image ``clip(n x / 255, 0, 1)`` the
    model predicts as it predicts x. Vectorised over each chunk of inputs and over the factors."""
    factors = torch.tensor([1.0, *scales], dtype=torch.float32, device=device).view(-1, 1, 1, 1, 1)
    chunk = max(1, _IMAGES_PER_PASS // len(factors))
    spcs, preds = [], []
    with torch.no_grad():
        for start in range(0, len(x), chunk):
            batch = x[start:start + chunk].to(device).float().div(255)
            stack = (factors * batch.unsqueeze(0)).clamp(0, 1)  # [1 + |S|, B, C, H, W]; factor 1 is x itself
            labels = model(stack.flatten(0, 1)).argmax(1).view(len(factors), len(batch))
            original, scaled = labels[0], labels[1:]
            consistent = scaled == original
            spcs.append(consistent.double().mean(0).cpu())
            preds.append(original.cpu())
    if not spcs:
        return torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.long)
    return torch.cat(spcs), torch.cat(preds)


def class_statistics(spc: torch.Tensor, pred: torch.Tensor, num_classes: int) -> dict:
    """Per predicted class: the clean SPCs' mean and sample standard deviation (float64 [K] each), with the
    pooled statistic standing in where a class has no sample (mean) or no spread (std: fewer than two samples
    or all equal); a pooled spread of 0 becomes 1. Also the counts and the pooled figures."""
    spc, pred = spc.double(), pred.long()
    counts = torch.bincount(pred, minlength=num_classes)
    pooled_mean = float(spc.mean())
    pooled_std = float(spc.std()) if len(spc) >= 2 else 0.0
    if not pooled_std > _TINY:
        pooled_std = 1.0
    sums = torch.zeros(num_classes, dtype=torch.float64).index_add_(0, pred, spc)
    mean = torch.where(counts > 0, sums / counts.clamp(min=1), torch.full_like(sums, pooled_mean))
    squares = torch.zeros(num_classes, dtype=torch.float64).index_add_(0, pred, (spc - mean[pred]) ** 2)
    var = squares / (counts - 1).clamp(min=1)
    std = var.sqrt()
    std = torch.where((counts >= 2) & (std > _TINY), std, torch.full_like(std, pooled_std))
    return {"mean": mean, "std": std, "counts": counts, "pooled_mean": pooled_mean, "pooled_std": pooled_std}


class ScaleUpScreen(InputScreen):
    """SCALE-UP's calibrated screen: ``scores(x)`` is the SPC of each image, standardised by the clean statistics
    of its predicted class where they were computed; ``threshold`` as calibrated."""

    def __init__(self, model: torch.nn.Module, device: torch.device, scales: list[float], threshold: float,
                 mean: torch.Tensor | None = None, std: torch.Tensor | None = None, info: dict | None = None):
        self.model, self.device, self.scales = model, device, list(scales)
        self.threshold = float(threshold)
        self.mean, self.std = mean, std  # float64 [K] per predicted class, or None: raw SPC
        self.info = info or {}

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        spc, pred = scaled_prediction_consistency(self.model, x, self.scales, self.device)
        if self.mean is not None:
            spc = (spc - self.mean[pred]) / self.std[pred]
        return spc.float()


@register_detector("scaleup")
class ScaleUp(InputDetector):
    """SCALE-UP: an input whose prediction survives amplifying its pixels (x 3, 5, 7, 9, 11) is flagged."""

    title = "SCALE-UP"
    description = ("share of amplified copies (pixels x 3, 5, 7, 9, 11, clipped) predicted as the input, standardised "
                   "by the clean subset's mean/std of its predicted class; flags above 0.5")
    order = 20
    parameters = {
        "scales": Param(NOT_STATED, "3, 5, 7, 9, 11 (`scale_set`)",
                        "BackdoorBox's default; the authors' code (JunfengGo/SCALE-UP) scans 1 to 11, factor 1 "
                        "counted"),
        "standardise": Param("data-limited variant: SPC normalised by a few benign samples' mean/std",
                             "with `valset`: one mean/std pooled over all benign samples, their SPC against true "
                             "labels",
                             "on (the clean subset is always given); per predicted class, clean SPC against the "
                             "prediction, as the screened inputs' (see the docstring)"),
        "threshold": Param("defender-specified T", "0.5 (`T`, flags score >= T)",
                           "BackdoorBox's fixed T; flags score > T (the same inputs unless one sits exactly at T)"),
        "fpr": Param(NONE, NONE, "None: the fixed threshold; a number calibrates the threshold instead, at that FPR on "
                     "the clean subset's scores (their 1 - fpr quantile)"),
    }
    # Each find starts with a newline and the line's indentation: it then matches the code line and not its own
    # text here, where the newline is an escape.
    mutants = (
        Mutant("no-scaling", "every 'amplified' image is the input itself (factor 1): every SPC is 1",
               "\n            stack = (factors * batch.unsqueeze(0)).clamp(0, 1)",
               "\n            stack = batch.unsqueeze(0).expand(len(factors), *batch.shape)"),
        Mutant("no-clipping", "amplified pixel values are not clipped to [0, 1]",
               "\n            stack = (factors * batch.unsqueeze(0)).clamp(0, 1)",
               "\n            stack = factors * batch.unsqueeze(0)"),
        Mutant("wrong-label", "consistency is counted against the prediction at the first factor, not the input's",
               "\n            consistent = scaled == original", "\n            consistent = scaled == scaled[0]"),
        Mutant("variance-not-std", "standardises with the class's variance instead of its standard deviation",
               "\n    std = var.sqrt()", "\n    std = var"),
        Mutant("pooled-mean", "every class is centred on the pooled clean mean instead of its own",
               "\n    mean = torch.where(counts > 0, sums / counts.clamp(min=1), torch.full_like(sums, pooled_mean))",
               "\n    mean = torch.full_like(sums, pooled_mean)"),
        Mutant("grouped-by-label", "the clean statistics are grouped by the clean samples' labels, not the predictions",
               "\n            spc, pred = scaled_prediction_consistency(model, clean.x, self.scales, device)",
               "\n            spc, pred = scaled_prediction_consistency(model, clean.x, self.scales, device)"
               "\n            pred = clean.y.long()"),
        Mutant("no-standardisation", "the score is the raw SPC even when standardisation is on",
               "\n            if self.standardise:", "\n            if False:"),
        Mutant("threshold-not-calibrated", "with fpr set, the threshold stays the fixed 0.5",
               "\n            threshold = quantile_threshold(clean_scores, self.fpr)",
               "\n            threshold = self.threshold"),
    )

    def __init__(self, scales: tuple[float, ...] | list[float] = (3, 5, 7, 9, 11), standardise: bool = True,
                 threshold: float = _DEFAULT_THRESHOLD, fpr: float | None = None):
        if (not isinstance(scales, (list, tuple)) or not scales
                or not all(is_finite_number(n) and n > 1 for n in scales)):
            raise ParameterError("scaleup", "scales", scales, "a non-empty list of finite numbers > 1")
        check_number("scaleup", "threshold", threshold)
        check_number("scaleup", "fpr", fpr, low=0, high=1, high_open=True, optional=True)
        if fpr is not None and threshold != _DEFAULT_THRESHOLD:
            raise ParameterError("scaleup", "threshold", threshold,
                                 f"its default {_DEFAULT_THRESHOLD} when fpr is given (fpr calibrates the threshold)")
        self.scales = list(scales)
        self.standardise, self.threshold, self.fpr = standardise, threshold, fpr

    def calibrate(self, inputs: DefenseInputs) -> ScaleUpScreen:
        device = inputs.device
        model = inputs.model.to(device).eval()
        clean = inputs.clean
        if len(clean) == 0 and (self.standardise or self.fpr is not None):
            raise ValueError("scaleup: the defender's clean subset is empty; standardise=False with the fixed "
                             "threshold is the only setting that needs none")
        info: dict = {"scales": list(self.scales), "standardise": self.standardise, "fpr": self.fpr,
                      "forward_passes_per_input": 1 + len(self.scales)}
        screen = ScaleUpScreen(model, device, self.scales, self.threshold, info=info)
        if len(clean):
            spc, pred = scaled_prediction_consistency(model, clean.x, self.scales, device)
            info["clean_spc_mean"] = float(spc.mean())
            if self.standardise:
                stats = class_statistics(spc, pred, inputs.num_classes)
                screen.mean, screen.std = stats["mean"], stats["std"]
                info.update(class_mean=[float(v) for v in stats["mean"]], class_std=[float(v) for v in stats["std"]],
                            class_counts=[int(v) for v in stats["counts"]], pooled_mean=stats["pooled_mean"],
                            pooled_std=stats["pooled_std"])
                spc = (spc - screen.mean[pred]) / screen.std[pred]
            clean_scores = spc.float()
        if self.fpr is not None:
            threshold = quantile_threshold(clean_scores, self.fpr)
            screen.threshold = threshold
        if len(clean):
            info["clean_flagged_share"] = float((clean_scores > screen.threshold).float().mean())
        info["threshold"] = screen.threshold
        return screen
