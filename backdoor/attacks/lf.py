"""Low Frequency attack, LF (Zeng, Park, Mao and Jia, "Rethinking the Backdoor Attacks' Triggers: A Frequency
Perspective", ICCV 2021).

Dirty label. The trigger is one universal, smooth additive perturbation ``delta`` (the same for every image):
x' = clip(x + delta), rounded to uint8, at training and test time. ``delta`` is a targeted universal
adversarial perturbation (UAP, Moosavi-Dezfooli et al. 2017) towards the target class, built with DeepFool on
the case's clean model (``ctx.clean_model()``), with a Gaussian low-pass filter applied after every update so
that it carries no high-frequency artifacts:

    v = 0
    repeat for at most ``max_passes`` passes over ``samples`` non-target training images (seeded draw and
    seeded order):
        for each chunk of ``deepfool_batch`` images whose clip(x + v) is not yet classified as the target:
            r_i = targeted DeepFool from clip(x_i + v) (<= ``max_iter`` iterations, ``overshoot``)
            v = clip(v + sum of r_i over the images of the chunk that reached the target, -bound, bound)
            v = lowpass(v)                     # Gaussian, ``kernel_size`` x ``kernel_size``, ``sigma``
        stop once the fooling rate (fraction of the samples classified as the target) reaches ``fooling_rate``
    delta = v * bound / max|v|                 # final: the largest |delta| is exactly ``bound``

The clip is UAP's projection onto the L-inf ball; the low-pass comes after it, so the kinks that clipping
creates are smoothed away, and since a normalised positive kernel never raises the largest magnitude, the
filtered v still satisfies |v| <= bound.

Targeted DeepFool: at each iteration, with k the currently predicted class and t the target, the step is the
linearised distance to the k/t boundary, r = (f_k - f_t) / ||grad(f_t - f_k)||^2 * grad(f_t - f_k); steps
accumulate until the class of clip(x + (1 + overshoot) * r_total) is t (the model sees the clipped image, as
the trigger is applied with clipping, so saturated pixels get no gradient). It runs batched: all images of a chunk at
once, one forward/backward per iteration (the model is in eval mode, so each image's gradient is its own),
with a per-image active mask that drops images once they reach the target.

Defaults (BackdoorBench supplementary Table 1): 100 samples, <= 50 passes, overshoot 0.02, DeepFool <= 200
iterations, stop at fooling rate 0.2, bound 0.2 of the pixel range, target class 0. Low-pass: the reference
filter. Table 1 gives none, but BackdoorBench's ``resource/lowFrequency/gauss_smooth.py``, which its
``universal_pert.py`` applies after every DeepFool update and to v, is a Gaussian of sigma 6 px with 30 taps
(``sig=6``, ``size_denom=5``). Ours: ``sigma`` 6 px with ``kernel_size`` 31 taps (+-15 px, +-2.5 sigma; an odd
length keeps the kernel centred, where 30 taps shift the image by half a pixel; the magnitude response is
the same). The response is exp(-2 pi^2 sigma^2 f^2): half the amplitude at f = 1/32 cycle per pixel (a period
of 32 px, one cycle across a 32x32 image) and under 7% at 2 cycles per image. ``low_frequency_share`` measures
the result, the share of the trigger's non-DC energy within 2 cycles per image, and the perturbation's
metadata records it (with our former sigma 1.5 / 7 taps, which passed about 4x higher frequencies, the smoke
grid's perturbations had 0.92-0.94).
Images of another size may scale ``sigma`` (and the kernel) with their width; the kernel must be shorter than
twice the image side (reflect padding).

Departures and choices:
- Bound: the original BackdoorBench ships precomputed perturbations rescaled to [0, 0.2] of the pixel range,
  i.e. a min-max rescale that makes the trigger non-negative and adds a constant brightness offset. We keep
  the perturbation's sign and zero offset: during the iterations |v| <= bound (UAP's clip, then the
  low-pass), and at the end one scale factor (>= 1) makes max |delta| = 0.2 * 255 grey levels exactly, so
  the peak-to-peak range can reach twice the original's 0.2. A uniform scale is linear, so unlike a final
  clip (or the min-max offset, a pure DC term) it leaves the spectrum's shape, hence the low-pass property,
  intact.
- Batching: the original UAP adds each image's DeepFool perturbation before computing the next one. We run
  ``deepfool_batch`` images at once from the same v and add the sum of their perturbations (a Jacobi-style
  update of the same algorithm); ``deepfool_batch: 1`` is exactly the sequential original.
- Stopping rule: the reference stops once the label-change rate on a held-out set (10 images per class)
  reaches the fooling rate. Our DeepFool is targeted (LF is an all-to-one attack), so we stop on the rate
  that matters for it: the share of the UAP's own ``samples`` that clip(x + v) sends to the target. A
  label-change rate counts images sent to any class; the targeted rate is the stricter of the two.
- The perturbation is generated, not downloaded (the original ships .npy files), and cached by spec (the
  case's dataset/model/training spec, every parameter that shapes it, and the seed).
"""
from __future__ import annotations

import copy
import time

import torch
import torch.nn.functional as F
from torch import nn

from backdoor._checks import ParameterError
from backdoor._registry import NONE, NOT_STATED, Param
from backdoor.attacks import register_attack
from backdoor.attacks.base import Attack, AttackContext
from backdoor.mutants import Mutant


def gaussian_lowpass(v: torch.Tensor, kernel_size: int, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of each channel of ``v`` [C, H, W] (reflect padding)."""
    radius = (kernel_size - 1) // 2
    t = torch.arange(-radius, radius + 1, dtype=v.dtype, device=v.device)
    g = torch.exp(-t ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    c = v.shape[0]
    x = F.pad(v[None], (radius, radius, radius, radius), mode="reflect")
    x = F.conv2d(x, g.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    x = F.conv2d(x, g.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    return x[0]


def low_frequency_share(delta: torch.Tensor, radius: float = 2.0) -> float:
    """Share of the non-DC energy of ``delta`` [C, H, W] within ``radius`` cycles per image.

    The image is mirrored to twice its size first (the DCT-II view), so its periodic extension has no jump
    at the borders: a plain FFT would count that artificial edge as high-frequency energy. A frequency of k
    cycles on the mirrored image is k / 2 cycles per image.
    """
    mirrored = torch.cat([delta, delta.flip(-1)], -1)
    mirrored = torch.cat([mirrored, mirrored.flip(-2)], -2).double()
    power = torch.fft.fft2(mirrored).abs() ** 2
    h, w = mirrored.shape[-2:]
    ky = torch.fft.fftfreq(h, d=1 / h).abs() / 2  # cycles per (original) image
    kx = torch.fft.fftfreq(w, d=1 / w).abs() / 2
    k = torch.sqrt(ky[:, None] ** 2 + kx[None, :] ** 2)
    non_dc = k > 0
    total = float(power[:, non_dc].sum())
    return float(power[:, non_dc & (k <= radius)].sum()) / total if total > 0 else 1.0


def deepfool_to_target(model: nn.Module, x: torch.Tensor, target: int, overshoot: float,
                       max_iter: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched targeted DeepFool on float images [B, C, H, W] in [0, 1].

    The model sees clip(x + r) (the trigger is applied with clipping too), so pixels pushed out of [0, 1] get
    no gradient and the next linearisation works with the pixels that can still move. Returns the
    perturbations ``(1 + overshoot) * r_total`` [B, C, H, W] and a bool [B] mask of the images that reached
    the target class within ``max_iter`` iterations.
    """
    r_total = torch.zeros_like(x)
    reached = torch.zeros(len(x), dtype=torch.bool, device=x.device)
    for iteration in range(max_iter + 1):
        active = torch.nonzero(~reached).flatten()
        if len(active) == 0:
            break
        x_adv = (x[active] + (1 + overshoot) * r_total[active]).requires_grad_(True)
        logits = model(x_adv.clamp(0, 1))  # box-aware: saturated pixels get no gradient
        current = logits.argmax(1)
        done = current == target
        reached[active[done]] = True
        if bool(done.all()) or iteration == max_iter:
            break
        gap = logits[:, target] - logits.gather(1, current[:, None]).squeeze(1)  # < 0 while not reached
        (w,) = torch.autograd.grad(gap.sum(), x_adv)
        w_norm2 = w.flatten(1).pow(2).sum(1).clamp_min(1e-12)
        step = ((gap.detach().abs() + 1e-4) / w_norm2).view(-1, 1, 1, 1) * w
        keep = ~done
        r_total[active[keep]] += step[keep]
    return (1 + overshoot) * r_total, reached


@register_attack("lf")
class LowFrequency(Attack):
    """LF: low-pass-filtered targeted universal adversarial perturbation (|delta| <= 0.2), dirty label."""

    kind = "dirty_label"
    title = "LF"
    description = ("targeted DeepFool universal perturbation (100 samples, <= 50 passes, overshoot 0.02, stop at fooling"
                   " rate 0.2), Gaussian low-pass (sigma 6 px, BackdoorBench's filter) after every update, max |delta| ="
                   " 0.2")
    order = 50
    parameters = {
        "samples": Param("100", NOT_STATED, "Table 1 (N_sample)"),
        "max_passes": Param("50", NOT_STATED, "Table 1 (T_ter)"),
        "overshoot": Param("0.02", NOT_STATED, "Table 1"),
        "max_iter": Param("200", NOT_STATED, "Table 1 (T_df)"),
        "fooling_rate": Param("0.2", "label-change rate on a held-out set (10 images per class)",
                              "Table 1's value on the targeted rate (share of the UAP's samples sent to the target), "
                              "the stricter rate for an all-to-one attack"),
        "bound": Param(NONE, "min-max rescale to [0, 0.2] of the pixel range",
                       "max |delta| = 0.2 of the range, sign kept and no brightness offset (a uniform scale keeps "
                       "the spectrum's shape)"),
        "kernel_size": Param(NONE, "30 taps (gauss_smooth.py)", "an odd length keeps the kernel centred (30 taps "
                             "shift the image by half a pixel); same magnitude response", argued=31),
        "sigma": Param(NONE, "6 px (gauss_smooth.py sig=6)", "the reference filter", argued=6.0),
        "deepfool_batch": Param(NONE, "1 (sequential)", "DeepFool on 10 images at once from the same v (a "
                                "Jacobi-style update); 1 is the sequential original"),
    }
    # Each find starts with a newline and the line's indentation: it then matches the code line and not its
    # own text here, where the newline is an escape.
    mutants = (
        Mutant("no-lowpass", "the universal perturbation is never low-pass filtered",
               "\n                    v = gaussian_lowpass(v, self.kernel_size, self.sigma)",
               "\n                    v = v"),
        Mutant("away-from-target", "the DeepFool steps are subtracted: the perturbation leads away from the target",
               "\n                    v = (v + r[reached].sum(0)).clamp(-self.bound, self.bound)",
               "\n                    v = (v - r[reached].sum(0)).clamp(-self.bound, self.bound)"),
        Mutant("unscaled", "the perturbation is not scaled up to the bound (its peak stays below 0.2)",
               "\n        delta = v * (self.bound / peak) if peak > 0 else v", "\n        delta = v"),
    )

    def __init__(self, target: int | str = 0, samples: int = 100, max_passes: int = 50, overshoot: float = 0.02,
                 max_iter: int = 200, fooling_rate: float = 0.2, bound: float = 0.2, kernel_size: int = 31,
                 sigma: float = 6.0, deepfool_batch: int = 10, **kwargs):
        super().__init__(target=target, **kwargs)
        if self.all_to_all:
            raise ParameterError("lf", "target", target, "a class index: LF's trigger is a universal adversarial "
                                 "perturbation towards one target class, and all-to-all has none")
        checks = [
            ("samples", samples, samples >= 1, ">= 1"), ("max_passes", max_passes, max_passes >= 1, ">= 1"),
            ("overshoot", overshoot, overshoot >= 0, ">= 0"), ("max_iter", max_iter, max_iter >= 1, ">= 1"),
            ("fooling_rate", fooling_rate, 0 < fooling_rate <= 1, "in (0, 1]"),
            ("bound", bound, 0 < bound <= 1, "in (0, 1] (fraction of the pixel range)"),
            ("kernel_size", kernel_size, kernel_size >= 1 and kernel_size % 2 == 1, "an odd integer >= 1"),
            ("sigma", sigma, sigma > 0, "> 0 (pixels)"),
            ("deepfool_batch", deepfool_batch, deepfool_batch >= 1, ">= 1"),
        ]
        for name, value, ok, allowed in checks:
            if not ok:
                raise ParameterError("lf", name, value, allowed if allowed.startswith("an ") else f"a value {allowed}")
        self.samples, self.max_passes, self.overshoot = int(samples), int(max_passes), float(overshoot)
        self.max_iter, self.fooling_rate, self.bound = int(max_iter), float(fooling_rate), float(bound)
        self.kernel_size, self.sigma, self.deepfool_batch = int(kernel_size), float(sigma), int(deepfool_batch)
        self._delta: torch.Tensor | None = None  # float [C, H, W] in [0, 1] units
        self.material_info: dict = {}

    # -- material -----------------------------------------------------------------------------------------
    def prepare(self, ctx: AttackContext) -> None:
        params = {k: v for k, v in self.params().items() if k != "cap_ratio"}
        spec = {"model_spec": ctx.spec, "attack": "lf", "params": params, "seed": ctx.seed}
        tensors, meta = ctx.cached("lf_perturbation", spec, lambda: self._build(ctx))
        self._delta, self.material_info = tensors["delta"], meta

    def uap_samples(self, ctx: AttackContext) -> torch.Tensor:
        """Seeded draw of the non-target training images the perturbation is built on (indices)."""
        pool = torch.nonzero(ctx.dataset.train.y != self.target).flatten()
        g = torch.Generator().manual_seed(ctx.seed)
        return pool[torch.randperm(len(pool), generator=g)[:self.samples]].sort().values

    def _build(self, ctx: AttackContext) -> tuple[dict, dict]:
        height, width = ctx.dataset.image_shape[1:]
        if self.kernel_size // 2 >= min(height, width):
            raise ValueError(f"lf: kernel_size {self.kernel_size} is too large for {height}x{width} images "
                             f"(allowed: at most {2 * min(height, width) - 1})")
        model = copy.deepcopy(ctx.clean_model()).to(ctx.device).eval().requires_grad_(False)
        x = ctx.dataset.train.x[self.uap_samples(ctx)].to(ctx.device).float() / 255
        started = time.perf_counter()  # the perturbation's own cost, not the clean model's training
        g = torch.Generator().manual_seed(ctx.seed + 1)

        def fooled(v: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return model((x + v).clamp(0, 1)).argmax(1) == self.target

        v = torch.zeros(x.shape[1:], device=ctx.device)
        rates, deepfool_runs = [], 0
        for _ in range(self.max_passes):
            for chunk in torch.randperm(len(x), generator=g).split(self.deepfool_batch):
                chunk = chunk.to(ctx.device)
                chunk = chunk[~fooled(v)[chunk]]
                if len(chunk) == 0:
                    continue
                r, reached = deepfool_to_target(model, (x[chunk] + v).clamp(0, 1), self.target, self.overshoot,
                                                self.max_iter)
                deepfool_runs += len(chunk)
                if reached.any():
                    v = (v + r[reached].sum(0)).clamp(-self.bound, self.bound)
                    v = gaussian_lowpass(v, self.kernel_size, self.sigma)
            rates.append(float(fooled(v).float().mean()))
            if rates[-1] >= self.fooling_rate:
                break
        peak = float(v.abs().max())
        delta = v * (self.bound / peak) if peak > 0 else v
        meta = {"passes": len(rates), "fooling_rate_per_pass": rates,
                "fooling_rate_final": float(fooled(delta).float().mean()), "deepfool_runs": deepfool_runs,
                "low_frequency_share": round(low_frequency_share(delta.cpu()), 4),
                "samples": len(x), "seconds": round(time.perf_counter() - started, 3)}
        return {"delta": delta.cpu()}, meta

    @property
    def delta(self) -> torch.Tensor:
        if self._delta is None:
            raise RuntimeError("lf: call prepare(ctx) first (it builds the universal perturbation)")
        return self._delta

    # -- poisoning ----------------------------------------------------------------------------------------
    def apply_trigger(self, x: torch.Tensor) -> torch.Tensor:
        delta = self.delta
        if tuple(delta.shape) != tuple(x.shape[1:]):
            raise ValueError(f"lf: the perturbation has shape {tuple(delta.shape)} but the images are "
                             f"{tuple(x.shape[1:])}")
        return (x.float() + 255 * delta.to(x.device)).round().clamp(0, 255).to(torch.uint8)
