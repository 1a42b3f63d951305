"""TeCo: test-time corruption consistency (Xiaogeng Liu, Minghui Li, Haoyu Wang, Shengshan Hu, Dengpan Ye, Hai Jin,
Libing Wu, Chaowei Xiao, "Detecting Backdoors During the Inference Stage Based on Corruption Robustness
Consistency", CVPR 2023, pp. 16363-16372).

Input-level detector. Each input is corrupted with every corruption type of the ImageNet-C set (Hendrycks &
Dietterich) at the five severities 1-5, and the model's hard label is read on the clean input and on each
corrupted version. For each corruption type the *transition severity* is the smallest severity whose label
differs from the label of the clean input; a type whose label never changes gets 6 (the maximum severity + 1, the
reference's ``max``). The score is the deviation (population standard deviation, the reference's ``np.std``) of
the transition severities over the corruption types: a clean image loses its label at similar severities under
every corruption, a triggered one keeps the target label under some corruptions (the trigger survives) and loses
it early under others (the trigger is destroyed), so a large deviation is suspicious.

Threshold: the paper and the reference report AUROC (the reference also sweeps every threshold for the best F1,
which needs the labels of the test set). Ours is fixed from the defender's clean subset alone: the ``1 - fpr``
quantile of the clean inputs' deviations (``fpr`` 0.05, ``quantile_threshold``). The deviations are discrete
(deviations of integers), so many clean inputs may tie at the threshold; ``>`` then flags fewer than ``fpr``.

Corruptions, written here in torch, vectorised over the batch, with the severity constants of ImageNet-C as the
``imagecorruptions`` package (which the reference calls) has them; every corrupted image is truncated to uint8
as ``imagecorruptions.corrupt`` does (``np.uint8``; here with a 1e-3 tolerance against float error) before the
model sees it. Random draws (noise, glass-blur offsets, motion angles, snow, elastic fields) come from a
``torch.Generator`` seeded with ``inputs.seed`` at each ``scores`` call, drawn in batch order on the device (so
the same images in the same order get the same draws; another order, or another device, other draws). The
model runs in float32 (no autocast), ``BATCH`` images at a time.

Cost: 1 + 5 x (number of types) forward passes per input (71 with the 14 default types), for the clean subset
at calibration and for every screened input; no training.

Departures, and why:
- Frost is left out (14 of the 15 types by default): it blends in photographs of frost that the package ships
  and we cannot. ``corruptions`` is a parameter validated against the implemented set.
- Each severity is applied to the input itself. Both reference codes (BackdoorBench ``detection_infer/teco.py``
  and the authors' ``BackdoorBench-v1.0-merge/defense/teco/teco.py``) write each corrupted image back into the
  list they corrupt next, so severity s is applied to the severity s-1 image and each type starts from the
  previous type's severity-5 image: compounding corruptions the paper does not describe.
- ImageNet-C's pixel constants are used as they are (as the reference does on 32 x 32 images; the package itself
  refuses images under 32 pixels). Where a filter is wider than the image (our 8-16 px test images, defocus
  disks of radius 3-10) the border is replicated instead of reflected, since reflection is undefined there.
- Glass blur: the package swaps each interior pixel with a random neighbour in a sequential loop (each swap sees
  the previous ones); here each interior pixel takes the value of a random neighbour at the same offset range,
  all at once (a gather, so not a permutation). skimage's Gaussian filters use replicated borders (its
  default, 'nearest') with radius ``int(4 sigma + 0.5)``.
- Pixelate: PIL's BOX downscale weighs fractional pixel coverage; ``F.interpolate(mode='area')`` averages whole
  pixel bins (the same where the ratio is an integer). The upscale is nearest (pixel-centre), as PIL's.
- JPEG: torchvision's libjpeg encoder (``encode_jpeg``) at the package's qualities instead of PIL's; both
  subsample chroma 4:2:0 by default.
- Elastic transform and snow's zoom: scipy's linear ``zoom``/``map_coordinates`` as ``F.interpolate(...,
  align_corners=True)`` / ``grid_sample`` (reflection padding); the smoothing of elastic's displacement fields
  (radius 1 at 32 px) replicates the border, which equals scipy's 'reflect' at radius 1.
- Elastic transform is the package's version (a Gaussian-smoothed random displacement field, sigma 1% of the
  side, alpha 250 x (0.05 ... 0.12)), not the original ImageNet-C one with an affine step; zoom blur keeps the
  package's ``np.arange`` factor lists (12 factors 1.00-1.11 at severity 1); motion blur's weights are not
  renormalised when a shift leaves the image, as there (a small image gets darker).
- Brightness raises HSV value by the constant with hue and saturation kept, written directly: each pixel is scaled
  by min(v + c, 1) / v (v its channel maximum), a black pixel becomes grey min(c, 1); that is what
  rgb2hsv -> clip(v + c) -> hsv2rgb computes.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torchvision.io import decode_jpeg, encode_jpeg

from backdoor._checks import ParameterError, check_number
from backdoor._registry import NONE, Param
from backdoor.defenses.base import DefenseInputs
from backdoor.detectors import register_detector
from backdoor.detectors.base import InputDetector, InputScreen, quantile_threshold
from backdoor.mutants import Mutant

SEVERITIES = 5
NEVER = SEVERITIES + 1  # the transition severity of a type whose label never changes (the reference's ``max``)
BATCH = 512

# ImageNet-C's severity constants (imagecorruptions.corruptions), severity 1..5.
GAUSSIAN_NOISE = (0.08, 0.12, 0.18, 0.26, 0.38)  # std
SHOT_NOISE = (60, 25, 12, 5, 3)  # Poisson rate per unit intensity
IMPULSE_NOISE = (0.03, 0.06, 0.09, 0.17, 0.27)  # share of values set to 0 or 1
DEFOCUS_BLUR = ((3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5))  # disk radius, anti-alias sigma
GLASS_BLUR = ((0.7, 1, 2), (0.9, 2, 1), (1, 2, 3), (1.1, 3, 2), (1.5, 4, 2))  # sigma, max delta, iterations
MOTION_BLUR = ((10, 3), (15, 5), (15, 8), (15, 12), (20, 15))  # radius, sigma
ZOOM_BLUR = ((0.01, 12), (0.01, 16), (0.02, 11), (0.02, 13), (0.03, 11))  # np.arange(1, stop, step): step, count
SNOW = ((0.1, 0.3, 3, 0.5, 10, 4, 0.8), (0.2, 0.3, 2, 0.5, 12, 4, 0.7), (0.55, 0.3, 4, 0.9, 12, 8, 0.7),
        (0.55, 0.3, 4.5, 0.85, 12, 8, 0.65), (0.55, 0.3, 2.5, 0.85, 12, 12, 0.55))
FOG = ((1.5, 2), (2.0, 2), (2.5, 1.7), (2.5, 1.5), (3.0, 1.4))  # amplitude, wibble decay
BRIGHTNESS = (0.1, 0.2, 0.3, 0.4, 0.5)
CONTRAST = (0.4, 0.3, 0.2, 0.1, 0.05)
ELASTIC = tuple(250 * a for a in (0.05, 0.065, 0.085, 0.1, 0.12))  # alpha
PIXELATE = (0.6, 0.5, 0.4, 0.3, 0.25)
JPEG_QUALITY = (25, 18, 15, 10, 7)

PAPER_CORRUPTIONS = ("gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur",
                     "zoom_blur", "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate",
                     "jpeg_compression")


# -- helpers ---------------------------------------------------------------------------------------------------

def _pad(x: torch.Tensor, r: int, mode: str = "reflect") -> torch.Tensor:
    """Pad the last two dims by r; reflection where the image is wide enough, else replication."""
    if r == 0:
        return x
    if mode == "reflect" and r >= min(x.shape[-2:]):
        mode = "replicate"
    return F.pad(x, (r, r, r, r), mode=mode)


def _depthwise(x: torch.Tensor, kernel: torch.Tensor, mode: str = "reflect") -> torch.Tensor:
    """Correlate every channel of x [N, C, H, W] with one 2-D kernel [k, k] (odd k), same size out."""
    c, k = x.shape[1], kernel.shape[-1]
    weight = kernel.to(x).expand(c, 1, k, k)
    return F.conv2d(_pad(x, k // 2, mode), weight, groups=c)


def _gauss1d(sigma: float, radius: int) -> torch.Tensor:
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-t ** 2 / (2 * sigma ** 2))
    return k / k.sum()


def _gaussian_blur(x: torch.Tensor, sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """skimage/scipy ``gaussian``: radius int(truncate sigma + 0.5), replicated borders ('nearest')."""
    k = _gauss1d(sigma, int(truncate * sigma + 0.5))
    return _depthwise(x, torch.outer(k, k), mode="replicate")


def _disk(radius: int, alias_blur: float) -> torch.Tensor:
    """imagecorruptions' anti-aliased disk: a 17 x 17 (or 2r+1) disk of sum 1, blurred by a 3 x 3 (5 x 5) Gaussian
    (cv2.GaussianBlur, reflect-101 borders)."""
    half, ksize = (8, 3) if radius <= 8 else (radius, 5)
    t = torch.arange(-half, half + 1, dtype=torch.float64)
    disk = ((t[:, None] ** 2 + t[None, :] ** 2) <= radius ** 2).double()
    disk /= disk.sum()
    g = _gauss1d(alias_blur, ksize // 2)
    return _depthwise(disk[None, None], torch.outer(g, g))[0, 0]


def _gray(x: torch.Tensor) -> torch.Tensor:
    """cv2's RGB -> gray (0.299, 0.587, 0.114); a one-channel image is its own gray."""
    if x.shape[1] == 3:
        return (x * torch.tensor([0.299, 0.587, 0.114]).to(x).view(1, 3, 1, 1)).sum(1, keepdim=True)
    return x


def _clipped_zoom(x: torch.Tensor, factor: float, crop: bool = True) -> torch.Tensor:
    """Crop the centre ceil(side / factor), zoom it linearly (corners to corners, as scipy's ``zoom``) to
    round(crop * factor), keep the top-left side x side (all of it where not ``crop``)."""
    h, w = x.shape[-2:]
    ch, cw = math.ceil(h / factor), math.ceil(w / factor)
    top, left = (h - ch) // 2, (w - cw) // 2
    centre = x[..., top:top + ch, left:left + cw]
    out = F.interpolate(centre, size=(max(h, round(ch * factor)), max(w, round(cw * factor))), mode="bilinear",
                        align_corners=True)
    return out[..., :h, :w] if crop else out


def _motion_blur(x: torch.Tensor, radius: int, sigma: float, angle: torch.Tensor) -> torch.Tensor:
    """imagecorruptions' ``_motion_blur`` with one angle (degrees) per image: the sum over i < 2 radius + 1 of
    Gaussian weight i times the image shifted by i pixels along the angle (edges replicated), stopping for an
    image once a shift leaves it (the weights are not renormalised, as there)."""
    n, _, h, w = x.shape
    width = 2 * radius + 1
    weights = _gauss1d(sigma, width - 1)[width - 1:].to(x)  # exp(-i^2 / 2 sigma^2), i = 0..width-1
    weights = weights / weights.sum()
    sin, cos = torch.sin(torch.deg2rad(angle)), torch.cos(torch.deg2rad(angle))
    rows, cols = torch.arange(h, device=x.device), torch.arange(w, device=x.device)
    batch = torch.arange(n, device=x.device)[:, None, None]
    out = torch.zeros_like(x)
    active = torch.ones(n, dtype=torch.bool, device=x.device)
    for i in range(width):
        dy = -torch.ceil(i * sin - 0.5).long()
        dx = -torch.ceil(i * cos - 0.5).long()
        active &= (dy.abs() < h) & (dx.abs() < w)
        r = (rows[None] - dy[:, None]).clamp(0, h - 1)
        c = (cols[None] - dx[:, None]).clamp(0, w - 1)
        shifted = x.permute(0, 2, 3, 1)[batch, r[:, :, None], c[:, None, :]].permute(0, 3, 1, 2)
        out += weights[i] * shifted * active.to(x).view(n, 1, 1, 1)
    return out


# -- the corruptions: x float [N, C, H, W] in [0, 1] -> float, severity 1..5 -----------------------------------

def gaussian_noise(x, severity, g):
    return x + torch.randn(x.shape, generator=g, device=x.device, dtype=x.dtype) * GAUSSIAN_NOISE[severity - 1]


def shot_noise(x, severity, g):
    c = SHOT_NOISE[severity - 1]
    return torch.poisson(x * c, generator=g) / c


def impulse_noise(x, severity, g):
    flipped = torch.rand(x.shape, generator=g, device=x.device) < IMPULSE_NOISE[severity - 1]
    salted = torch.rand(x.shape, generator=g, device=x.device) < 0.5
    return torch.where(flipped, salted.to(x.dtype), x)


def defocus_blur(x, severity, g):
    return _depthwise(x, _disk(*DEFOCUS_BLUR[severity - 1]))


def glass_blur(x, severity, g):
    sigma, delta, iterations = GLASS_BLUR[severity - 1]
    x = torch.floor(_gaussian_blur(x, sigma) * 255 + 1e-3) / 255
    n, _, h, w = x.shape
    lo_h, lo_w = delta + 1, delta + 1  # the package's loop visits h in (delta, H - delta], w likewise
    if h - delta >= lo_h and w - delta >= lo_w:
        rows = torch.arange(h, device=x.device)[None, :, None].expand(n, h, w)
        cols = torch.arange(w, device=x.device)[None, None, :].expand(n, h, w)
        inside = (rows >= lo_h) & (rows <= h - delta) & (cols >= lo_w) & (cols <= w - delta)
        batch = torch.arange(n, device=x.device)[:, None, None]
        for _ in range(iterations):
            d = torch.randint(-delta, delta, (2, n, h, w), generator=g, device=x.device)
            r = torch.where(inside, rows + d[1], rows).clamp(0, h - 1)
            c = torch.where(inside, cols + d[0], cols).clamp(0, w - 1)
            x = x.permute(0, 2, 3, 1)[batch, r, c].permute(0, 3, 1, 2)
    return _gaussian_blur(x, sigma)


def motion_blur(x, severity, g):
    radius, sigma = MOTION_BLUR[severity - 1]
    angle = torch.rand(len(x), generator=g, device=x.device, dtype=x.dtype) * 90 - 45
    return _motion_blur(x, radius, sigma, angle)


def zoom_blur(x, severity, g):
    step, count = ZOOM_BLUR[severity - 1]
    out = x.clone()
    for i in range(count):
        out += _clipped_zoom(x, 1 + i * step)
    return out / (count + 1)


def snow(x, severity, g):
    loc, scale, zoom, cut, radius, sigma, keep = SNOW[severity - 1]
    n, _, h, w = x.shape
    layer = loc + scale * torch.randn((n, 1, h, w), generator=g, device=x.device, dtype=x.dtype)
    layer = _clipped_zoom(layer, zoom, crop=False)  # blurred whole, cropped after, as there
    layer = torch.where(layer < cut, torch.zeros_like(layer), layer).clamp(0, 1)
    angle = torch.rand(n, generator=g, device=x.device, dtype=x.dtype) * 90 - 135
    layer = torch.round(_motion_blur(layer, radius, sigma, angle) * 255)[..., :h, :w] / 255
    x = keep * x + (1 - keep) * torch.maximum(x, _gray(x) * 1.5 + 0.5)
    return x + layer + layer.flip(-1, -2)


def _plasma_fractal(n: int, size: int, decay: float, g: torch.Generator, device) -> torch.Tensor:
    """imagecorruptions' diamond-square height map, one per image: [n, size, size] in [0, 1] (min 0, max 1)."""
    m = torch.zeros((n, size, size), dtype=torch.float64, device=device)
    step, wibble = size, 100.0

    def wibbled_mean(a):
        return a / 4 + wibble * (torch.rand(a.shape, generator=g, device=device, dtype=a.dtype) * 2 - 1) * wibble

    while step >= 2:
        half = step // 2
        corners = m[:, 0::step, 0::step]  # squares: the centre of each square of corners
        square = corners + corners.roll(-1, 1)
        square = square + square.roll(-1, 2)
        m[:, half::step, half::step] = wibbled_mean(square)
        centres, corners = m[:, half::step, half::step], m[:, 0::step, 0::step]  # diamonds: the edge midpoints
        m[:, 0::step, half::step] = wibbled_mean(centres + centres.roll(1, 1) + corners + corners.roll(-1, 2))
        m[:, half::step, 0::step] = wibbled_mean(centres + centres.roll(1, 2) + corners + corners.roll(-1, 1))
        step //= 2
        wibble /= decay
    m = m - m.amin((1, 2), keepdim=True)
    return m / m.amax((1, 2), keepdim=True)


def fog(x, severity, g):
    amplitude, decay = FOG[severity - 1]
    n, c, h, w = x.shape
    size = 1 << (max(h, w, c) - 1).bit_length()  # next power of 2 of the array's largest side, as there
    plasma = _plasma_fractal(n, size, decay, g, x.device)[:, None, :h, :w].to(x.dtype)
    top = x.amax((1, 2, 3), keepdim=True)
    return (x + amplitude * plasma) * top / (top + amplitude)


def brightness(x, severity, g):
    c = BRIGHTNESS[severity - 1]
    if x.shape[1] != 3:
        return x + c
    value = x.amax(1, keepdim=True)
    lifted = (value + c).clamp(max=1)
    return torch.where(value > 0, x * lifted / value.clamp(min=1e-12), lifted.expand_as(x))


def contrast(x, severity, g):
    means = x.mean((2, 3), keepdim=True)
    return (x - means) * CONTRAST[severity - 1] + means


def elastic_transform(x, severity, g):
    n, _, h, w = x.shape
    alpha = ELASTIC[severity - 1]
    sigma, max_d = h * 0.01, h * 0.005  # the package's sigma = shape * 0.01 (square images) and max_dx = H * 0.005
    noise = (torch.rand((2 * n, 1, h, w), generator=g, device=x.device, dtype=x.dtype) * 2 - 1) * max_d
    d = _gaussian_blur(noise, sigma, truncate=3.0) * alpha
    dx, dy = d[:n, 0], d[n:, 0]
    ys = torch.arange(h, device=x.device, dtype=x.dtype)[None, :, None] + dy
    xs = torch.arange(w, device=x.device, dtype=x.dtype)[None, None, :] + dx
    grid = torch.stack(((2 * xs + 1) / w - 1, (2 * ys + 1) / h - 1), dim=-1)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def pixelate(x, severity, g):
    c = PIXELATE[severity - 1]
    h, w = x.shape[-2:]
    small = F.interpolate(x, size=(max(1, int(h * c)), max(1, int(w * c))), mode="area")
    return F.interpolate(small, size=(h, w), mode="nearest-exact")


def jpeg_compression(x, severity, g):
    images = _to_uint8(x).cpu()
    encoded = encode_jpeg(list(images), quality=JPEG_QUALITY[severity - 1])
    return torch.stack(decode_jpeg(encoded)).to(x.device, x.dtype) / 255


CORRUPTIONS = {f.__name__: f for f in (gaussian_noise, shot_noise, impulse_noise, defocus_blur, glass_blur,
                                       motion_blur, zoom_blur, snow, fog, brightness, contrast, elastic_transform,
                                       pixelate, jpeg_compression)}
DEFAULT_CORRUPTIONS = tuple(n for n in PAPER_CORRUPTIONS if n in CORRUPTIONS)


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Clip to [0, 1] and truncate to uint8 as ``np.uint8`` does (1e-3 tolerance against float error)."""
    return torch.floor(x.clamp(0, 1) * 255 + 1e-3).to(torch.uint8)


def corrupt(x: torch.Tensor, name: str, severity: int, generator: torch.Generator) -> torch.Tensor:
    """``name`` at ``severity`` (1..5) on uint8 images [N, C, H, W]: uint8 images, same shape and device."""
    return _to_uint8(CORRUPTIONS[name](x.float() / 255, severity, generator))


# -- the detector ----------------------------------------------------------------------------------------------

@torch.no_grad()
def _labels(model, x: torch.Tensor) -> torch.Tensor:
    return model(x.float() / 255).argmax(1)


@torch.no_grad()
def transition_severities(model, x: torch.Tensor, corruptions, generator: torch.Generator,
                          device: torch.device) -> torch.Tensor:
    """[N, K] long: per image and corruption type, the first severity 1..5 whose label differs from the clean
    image's label; ``NEVER`` (6) where none does. Batched (``BATCH``), in order; random draws from ``generator``."""
    model.to(device).eval()
    out = []
    for start in range(0, len(x), BATCH):
        batch = x[start:start + BATCH].to(device)
        clean = _labels(model, batch)
        per_type = []
        for name in corruptions:
            labels = torch.stack([_labels(model, corrupt(batch, name, severity, generator))
                                  for severity in range(1, SEVERITIES + 1)], 1)  # [n, 5]
            reference = clean
            changed = labels != reference[:, None]
            first = changed.to(torch.uint8).argmax(1) + 1  # argmax: the first maximal index
            per_type.append(torch.where(changed.any(1), first, torch.full_like(first, NEVER)))
        out.append(torch.stack(per_type, 1).cpu())
    return torch.cat(out) if out else torch.zeros((0, len(corruptions)), dtype=torch.long)


def deviation(severities: torch.Tensor) -> torch.Tensor:
    """The score: the population standard deviation of each row of transition severities (``np.std``)."""
    return severities.double().std(1, correction=0).float()


class TeCoScreen(InputScreen):
    def __init__(self, model, corruptions: tuple[str, ...], seed: int, device: torch.device):
        self.model, self.corruptions, self.seed, self.device = model, corruptions, seed, device
        self.threshold = float("inf")

    def generator(self) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(self.seed)

    def severities(self, x: torch.Tensor) -> torch.Tensor:
        return transition_severities(self.model, x, self.corruptions, self.generator(), self.device)

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        return deviation(self.severities(x))


@register_detector("teco")
class TeCo(InputDetector):
    """TeCo: the deviation over corruption types of the severity at which the model's label first changes."""

    title = "TeCo"
    description = ("per input, the standard deviation over ImageNet-C corruption types of the first severity (1-5, "
                   "never = 6) that changes the label; threshold at 5% clean FPR")
    order = 30
    parameters = {
        "corruptions": Param("the 15 ImageNet-C types", "the same 15 (imagecorruptions)",
                             "frost left out (it needs the package's photographs): the other 14, in torch"),
        "fpr": Param(NONE, NONE, "the paper and the reference report AUROC (the reference also the best F1 over "
                     "thresholds, which needs test labels); 5% FPR on the defender's clean subset fixes one"),
    }
    # Each find starts with a newline and the line's indentation: it then matches the code line and not its own
    # text here, where the newline is an escape.
    mutants = (
        Mutant("severity-always-1", "every severity step applies severity 1",
               "\n            labels = torch.stack([_labels(model, corrupt(batch, name, severity, generator))",
               "\n            labels = torch.stack([_labels(model, corrupt(batch, name, 1, generator))"),
        Mutant("mean-not-deviation", "scores the mean transition severity instead of its deviation",
               "\n    return severities.double().std(1, correction=0).float()",
               "\n    return severities.double().mean(1).float()"),
        Mutant("reference-severity-1", "compares each label with the severity-1 label instead of the clean one",
               "\n            reference = clean", "\n            reference = labels[:, 0]"),
        Mutant("no-corruption", "the corruption returns the image unchanged",
               "\n    return _to_uint8(CORRUPTIONS[name](x.float() / 255, severity, generator))", "\n    return x.clone()"),
        Mutant("threshold-not-calibrated", "the threshold ignores fpr (the clean median)",
               "\n        screen.threshold = quantile_threshold(clean, self.fpr)",
               "\n        screen.threshold = quantile_threshold(clean, 0.5)"),
    )

    def __init__(self, corruptions: tuple[str, ...] | list[str] = DEFAULT_CORRUPTIONS, fpr: float = 0.05):
        if (not isinstance(corruptions, (list, tuple)) or not corruptions
                or any(not isinstance(c, str) or c not in CORRUPTIONS for c in corruptions)
                or len(set(corruptions)) != len(corruptions)):
            raise ParameterError("teco", "corruptions", corruptions,
                                 f"a non-empty list of distinct names among {', '.join(CORRUPTIONS)}")
        check_number("teco", "fpr", fpr, 0, 1, high_open=True)
        self.corruptions, self.fpr = tuple(corruptions), fpr

    def params(self) -> dict:
        out = super().params()
        out["corruptions"] = list(self.corruptions)  # JSON-stable whether given as a list or a tuple
        return out

    def calibrate(self, inputs: DefenseInputs) -> InputScreen:
        screen = TeCoScreen(inputs.model, self.corruptions, inputs.seed, inputs.device)
        clean = screen.scores(inputs.clean.x)
        screen.threshold = quantile_threshold(clean, self.fpr)
        return screen
