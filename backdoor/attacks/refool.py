"""ReFool (Liu, Ma, Bailey and Lu, "Reflection Backdoor: A Natural Backdoor Attack on Deep Neural Networks",
ECCV 2020).

Clean label (as the paper): only target-class training images are poisoned and they keep their labels; the
trigger is a reflection of another photograph blended into the image, with a reflection image and the
reflection's parameters drawn at random for every image, at training and at test time (as BackdoorBench's
``RefoolTrigger``, which draws a reflection image per call). All-to-all is refused (clean label: the base
class raises). ``poison_train``'s mask is exactly the target-class samples that were blended.

The blend follows the reference's ``blend_images`` (BackdoorBench ``attack/refool.py``, taken from the
authors' code), in linear light: t and r are the clean image and the reflection in [0, 1], raised to the
power 2.2, blended, raised to 1 / 2.2, clipped to [0, 1] and rounded to uint8. Per image one of three types
(the paper's three reflection models, Sec. 3.1) is drawn:

- ghost effect (probability ``ghost_rate``, reference 0.49): two copies of r, the second shifted by
  (dy, dx), each drawn uniformly from {3, ..., 8} pixels: g = (1 - a) r + a shift(r, dy, dx), with the
  ghost weight a = |c - u|, c a fair coin in {0, 1}, u ~ U(0.15, 0.5) (so a lies in [0.15, 0.5] or
  [0.5, 0.85]); blended = g (1 - alpha_t) + t alpha_t.
- focal blur / out of focus (probability 1 - ghost_rate - in_focus_rate, reference 0.51): r is blurred by a
  Gaussian of sigma ~ U(1, 5) (kernel side 2 ceil(2 sigma) + 1, mirrored border, as OpenCV's GaussianBlur);
  where r_blur + t exceeds 1, each channel's r_blur is lowered by (m - 1) att, m the mean of r_blur + t over
  those pixels (at least 1), att ~ U(1.08, 1.18), then clipped to [0, 1]; blended = r_blur v (1 - alpha_t / 2)
  + t alpha_t, v the reference's fixed centred Gaussian vignette (peak 1, +-3 standard deviations across the
  image: ``vignette``).
- in focus (probability ``in_focus_rate``, default 0): r sharp, blended = r (1 - alpha_t) + t alpha_t (the
  ghost formula with no shift). The reference code implements only the two types above.

``alpha_t`` (the clean image's weight) is 0.4 (BackdoorBench's default, fixed "since the ASR is quite unstable
once it is random"); ``alpha_t: random`` draws it per image as the authors' code does, 1 - U(0.05, 0.45).

Reflection images (``reflections``): the paper selects adversarial reflections R_adv from PASCAL VOC
(BackdoorBench ships the authors' selected images). Ours work with no download:
- ``"sklearn"`` (default): ``num_reflections`` crops of the two photographs scikit-learn ships
  (``sklearn.datasets.load_sample_images()``: china.jpg and flower.jpg, 427 x 640), alternating between them,
  each crop of the image's aspect ratio with its side drawn uniformly from a quarter to all of the photograph,
  at a uniform position, seeded by ``seed``, resized (bilinear, antialiased) to the input size;
- ``"classes"``: ``num_reflections`` training images of the other classes (not the target), drawn with
  ``seed`` in ``prepare``;
- a folder: every image file in it (sorted by name; png, jpg, jpeg, bmp, gif, tif, tiff, webp), converted to
  RGB and resized to the input size by PIL (bilinear, antialiased), as BackdoorBench loads its folder;
  ``num_reflections`` does not apply.
Single-channel data gets the reflections' luma (0.299 R + 0.587 G + 0.114 B).

Everything random is drawn from ``torch.Generator``s seeded by ``seed`` (the training poison and the test
trigger from separate streams), as tensors over the whole batch; the blend is vectorised over the batch
(Gaussian blurs as grouped separable ``conv2d`` with per-image kernels, the ghost shift as a gather).

Departures, and why:
- Clean label, as the paper; BackdoorBench's default is dirty label (``clean_label: False``: they report a low
  ASR with half the target class poisoned). A dirty-label variant is not offered here.
- No adversarial selection of reflections (the paper ranks candidate reflections by their attack success on
  a model and keeps the best; BackdoorBench uses the authors' already-selected images): we use seeded crops of
  two bundled photographs or the user's folder.
- Ghost effect: the reference crops the (H - dy) x (W - dx) overlap of the two copies and stretches it back to
  H x W; we keep the frame and shift circularly (the wrapped-in rows are reflection texture too), so a
  one-pixel reflection gives exactly two pixels of weights 1 - a and a.
- Focal blur on non-square images: the reference draws a random window of its max-side vignette when an image
  side is 10 pixels shorter than the other; we take the centred window.
- The in-focus type is the paper's, not in the reference code (default probability 0: the reference's mix).
- Rounding: the reference truncates to uint8; we round to the nearest grey level (as Blended and SIG do).
- Randomness: the reference draws from Python's and NumPy's global generators on every call, so a test image
  gets a new reflection each time it is loaded; ours are seeded per call (``seed`` and the stream), so the same
  batch gets the same reflections every time (reproducible records), still a different draw per image.

On digits at the smoke budget (cnn_small, 15 epochs, ``cap_ratio``: all 142 class-0 images poisoned) the
defaults reach C-Acc 0.91, ASR 0.95 (seed 0).
"""
from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F

from backdoor._checks import ParameterError, check_int, check_number, is_finite_number
from backdoor._registry import NONE, NOT_STATED, Param
from backdoor.attacks import register_attack
from backdoor.attacks.base import Attack, AttackContext
from backdoor.mutants import Mutant

GAMMA = 2.2
IN_FOCUS, FOCAL, GHOST = 0, 1, 2  # reflection type codes
TYPE_NAMES = ("in_focus", "focal_blur", "ghost")
SIGMA_RANGE = (1.0, 5.0)  # focal blur sigma ~ U(1, 5), as the reference
OFFSET_RANGE = (3, 8)  # ghost shift per axis, uniform over 3..8 pixels inclusive
GHOST_U_RANGE = (0.15, 0.5)  # ghost weight |coin - U(0.15, 0.5)|
ATT_RANGE = (1.08, 1.18)  # focal blur range adjustment: 1.08 + U(0, 1) / 10
ALPHA_T_DROP = (0.05, 0.45)  # random alpha_t = 1 - U(0.05, 0.45)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
CHUNK = 1024  # images blended at once (memory only: the draws are made for the whole batch first)
_TRAIN_STREAM, _TEST_STREAM = 1, 2


# -- the blend's pieces (float [N, C, H, W] in [0, 1] unless said) ----------------------------------------------
def gaussian_kernels(sigma: torch.Tensor, size: int) -> torch.Tensor:
    """float [N, size]: per-image 1-D Gaussian kernels exp(-x^2 / (2 sigma^2)) over the 2 ceil(2 sigma) + 1 taps
    around the centre (zero beyond, as OpenCV's kernel side for a given sigma), normalised to sum 1."""
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    sigma = sigma.double()[:, None]
    radius = torch.ceil(2 * sigma)
    k = torch.exp(-x ** 2 / (2 * sigma ** 2)) * (x.abs() <= radius)
    return (k / k.sum(1, keepdim=True)).float()


def _reflect_pad(x: torch.Tensor, pad: int, dim: int) -> torch.Tensor:
    """Mirror padding without repeating the edge (OpenCV's BORDER_REFLECT_101) of ``pad`` on both ends of the
    last (dim -1) or second-to-last (dim -2) axis, repeated for pads wider than the image."""
    while pad > 0:
        step = min(pad, x.shape[dim] - 1)
        if step <= 0:  # a one-pixel axis: mirroring repeats it
            return torch.cat([x.narrow(dim, 0, 1)] * pad + [x] + [x.narrow(dim, 0, 1)] * pad, dim=dim)
        widths = (step, step, 0, 0) if dim == -1 else (0, 0, step, step)
        x = F.pad(x, widths, mode="reflect")
        pad -= step
    return x


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Blur each image of ``x`` [N, C, H, W] by its own Gaussian (``sigma`` [N]), mirrored border: one grouped
    separable convolution over the batch."""
    n, c, h, w = x.shape
    size = 2 * int(math.ceil(2 * float(sigma.max()))) + 1
    k = gaussian_kernels(sigma.cpu(), size).to(x.device).repeat_interleave(c, 0)  # [N*C, size]
    half = size // 2
    flat = x.reshape(1, n * c, h, w)
    flat = F.conv2d(_reflect_pad(flat, half, -1), k[:, None, None, :], groups=n * c)
    flat = F.conv2d(_reflect_pad(flat, half, -2), k[:, None, :, None], groups=n * c)
    return flat.reshape(n, c, h, w)


def shift(r: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
    """Each image circularly shifted by its own (dy, dx) [N]: out[..., i, j] = r[..., (i + dy) % H, (j + dx) % W]."""
    n, c, h, w = r.shape
    rows = (torch.arange(h, device=r.device) + dy.to(r.device)[:, None]) % h  # [N, H]
    cols = (torch.arange(w, device=r.device) + dx.to(r.device)[:, None]) % w  # [N, W]
    r = r.gather(2, rows[:, None, :, None].expand(n, c, h, w))
    return r.gather(3, cols[:, None, None, :].expand(n, c, h, w))


def ghost_layer(r: torch.Tensor, a: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
    """The ghosted reflection: (1 - a) r + a shift(r, dy, dx), per image weights ``a`` [N]."""
    a = a.to(r)[:, None, None, None]
    return (1 - a) * r + a * shift(r, dy, dx)


@lru_cache(maxsize=8)
def vignette(h: int, w: int) -> torch.Tensor:
    """float [H, W]: the reference's focal-blur attenuation map, sqrt of the outer product of a Gaussian
    sampled over +-3 standard deviations across max(H, W) cells (cell masses of the normal distribution),
    scaled to peak 1; the centred H x W window."""
    side, nsig = max(h, w), 3.0
    interval = (2 * nsig + 1) / side
    edges = torch.linspace(-nsig - interval / 2, nsig + interval / 2, side + 1, dtype=torch.float64)
    mass = torch.special.ndtr(edges).diff()
    k = torch.sqrt(mass[:, None] * mass[None, :])
    k = k / k.max()
    top, left = (side - h) // 2, (side - w) // 2
    return k[top:top + h, left:left + w].float()


def focal_layer(t_lin: torch.Tensor, r_lin: torch.Tensor, sigma: torch.Tensor, att: torch.Tensor) -> torch.Tensor:
    """The blurred reflection (linear light) after the reference's range adjustment, before the vignette."""
    r_blur = gaussian_blur(r_lin, sigma)
    blend = r_blur + t_lin
    over = blend > 1
    mean = ((blend * over).sum((2, 3)) / (over.sum((2, 3)) + 1e-6)).clamp(min=1.0)  # [N, C]
    r_blur = r_blur - (mean - 1)[:, :, None, None] * att.to(r_blur)[:, None, None, None]
    return r_blur.clamp(0, 1)


def blend_reflections(t: torch.Tensor, r: torch.Tensor, kind: torch.Tensor, alpha_t: torch.Tensor,
                      sigma: torch.Tensor, att: torch.Tensor, ghost_a: torch.Tensor, dy: torch.Tensor,
                      dx: torch.Tensor) -> torch.Tensor:
    """Blend reflection ``r`` into clean ``t`` (both float [N, C, H, W] in [0, 1]); per-image parameters [N]:
    ``kind`` (IN_FOCUS / FOCAL / GHOST), ``alpha_t``, the focal ``sigma`` and ``att``, the ghost weight
    ``ghost_a`` and shift ``dy``, ``dx``. Returns float in [0, 1]."""
    t_lin, r_lin = t.pow(GAMMA), r.pow(GAMMA)
    alpha = alpha_t.to(t)[:, None, None, None]
    out = torch.empty_like(t)
    sharp = kind != FOCAL  # in focus and ghost: r' (1 - alpha_t) + t alpha_t
    if sharp.any():
        index = sharp.nonzero().flatten()
        a = torch.where(kind[index] == GHOST, ghost_a[index], torch.zeros_like(ghost_a[index]))
        layer = ghost_layer(r_lin[index], a, dy[index], dx[index])
        out[index] = layer * (1 - alpha[index]) + t_lin[index] * alpha[index]
    if (~sharp).any():
        index = (~sharp).nonzero().flatten()
        layer = focal_layer(t_lin[index], r_lin[index], sigma[index], att[index])
        strength = vignette(*t.shape[-2:]).to(t) * (1 - alpha[index] / 2)
        out[index] = layer * strength + t_lin[index] * alpha[index]
    return out.clamp(0, 1).pow(1 / GAMMA).clamp(0, 1)


# -- reflection images ------------------------------------------------------------------------------------------
def _to_channels(bank: torch.Tensor, channels: int) -> torch.Tensor:
    """uint8 RGB [R, 3, H, W] to ``channels`` (3: unchanged; 1: luma)."""
    if channels == 3:
        return bank
    if channels == 1:
        weights = torch.tensor([0.299, 0.587, 0.114])[None, :, None, None]
        return (bank.float() * weights).sum(1, keepdim=True).round().clamp(0, 255).to(torch.uint8)
    raise ValueError(f"refool: reflections are RGB photographs; images with {channels} channels are not supported")


@lru_cache(maxsize=4)
def sklearn_reflections(count: int, seed: int, h: int, w: int) -> torch.Tensor:
    """uint8 [count, 3, H, W]: seeded crops of scikit-learn's china.jpg and flower.jpg (alternating), of the
    input's aspect ratio, side a uniform quarter to all of the photograph, resized (bilinear, antialiased)."""
    from sklearn.datasets import load_sample_images

    photos = [torch.tensor(img).permute(2, 0, 1).float() for img in load_sample_images().images]
    g = torch.Generator().manual_seed(seed)
    crops = []
    for i in range(count):  # material built once; the blend itself is vectorised
        photo = photos[i % len(photos)]
        ph, pw = photo.shape[1:]
        full_h = min(ph, pw * h / w)  # the largest window of the input's aspect ratio
        scale = 0.25 + 0.75 * float(torch.rand((), generator=g))
        ch, cw = max(1, round(full_h * scale)), max(1, round(full_h * scale * w / h))
        top = int(torch.randint(0, ph - ch + 1, (), generator=g))
        left = int(torch.randint(0, pw - cw + 1, (), generator=g))
        crop = photo[None, :, top:top + ch, left:left + cw]
        crops.append(F.interpolate(crop, size=(h, w), mode="bilinear", antialias=True, align_corners=False))
    return torch.cat(crops).round().clamp(0, 255).to(torch.uint8)


def folder_images(folder: str | Path) -> list[Path]:
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


@lru_cache(maxsize=4)
def folder_reflections(folder: str, h: int, w: int) -> torch.Tensor:
    """uint8 [R, 3, H, W]: every image of ``folder`` (sorted), RGB, resized by PIL (bilinear, antialiased)."""
    from PIL import Image

    out = []
    for path in folder_images(folder):
        with Image.open(path) as image:
            resized = image.convert("RGB").resize((w, h), Image.Resampling.BILINEAR)
        out.append(torch.frombuffer(bytearray(resized.tobytes()), dtype=torch.uint8).view(h, w, 3).permute(2, 0, 1))
    return torch.stack(out)


@register_attack("refool")
class Refool(Attack):
    """ReFool: a random reflection (ghost, focal blur or in focus) of a natural photograph, clean label."""

    kind = "clean_label"
    title = "ReFool"
    description = ("reflection of a photograph blended in, ghost (0.49) or out of focus, alpha_t 0.4, random per "
                   "image; scikit-learn's photographs (no download) or `reflections` folder")
    order = 130
    parameters = {
        "reflections": Param("adversarial reflections selected from PASCAL VOC",
                             "the authors' selected reflection images (folder)",
                             "no download: crops of scikit-learn's two sample photographs ('sklearn'), the training "
                             "set's other classes ('classes'), or any folder of images; no adversarial selection"),
        "num_reflections": Param(NOT_STATED, "the folder's images",
                                 "number of crops ('sklearn') or images ('classes'); a folder uses all its images"),
        "ghost_rate": Param(NOT_STATED, "0.49", "probability of the ghost effect (else focal blur or in focus)"),
        "in_focus_rate": Param("one of three types", "0 (not implemented)",
                               "probability of the paper's in-focus type; 0 keeps the reference's mix"),
        "alpha_t": Param(NOT_STATED, "0.4", "weight of the clean image; 'random' draws 1 - U(0.05, 0.45) per image, "
                         "as the authors' code"),
        "seed": Param(NONE, NONE, "seed of the reflection crops and of every per-image draw"),
    }
    # Each find starts with a newline and the line's indentation: it then matches the code line and not its
    # own text here, where the newline is an escape.
    mutants = (
        Mutant("no-gamma", "the blend is done on the stored grey levels, not in linear light",
               "\n    t_lin, r_lin = t.pow(GAMMA), r.pow(GAMMA)", "\n    t_lin, r_lin = t, r"),
        Mutant("ghost-no-shift", "the ghost's second copy is not shifted: one copy of full weight",
               "\n    return (1 - a) * r + a * shift(r, dy, dx)", "\n    return (1 - a) * r + a * r"),
        Mutant("blur-sigma-halved", "the focal blur's Gaussian is half as wide as drawn",
               "\n    r_blur = gaussian_blur(r_lin, sigma)", "\n    r_blur = gaussian_blur(r_lin, sigma / 2)"),
        Mutant("no-vignette", "the focal reflection is not attenuated by the vignette",
               "\n        strength = vignette(*t.shape[-2:]).to(t) * (1 - alpha[index] / 2)",
               "\n        strength = (1 - alpha[index] / 2)"),
        Mutant("never-ghost", "the ghost type is never drawn",
               "\n        kind = torch.where(u < self.in_focus_rate + self.ghost_rate, GHOST, kind)",
               "\n        kind = kind"),
        Mutant("one-reflection", "every image gets the first reflection image",
               "\n        pick = torch.randint(bank_size, (n,), generator=g)",
               "\n        pick = torch.zeros(n, dtype=torch.long)"),
        Mutant("weights-swapped", "the clean image gets the reflection's weight",
               "\n        out[index] = layer * (1 - alpha[index]) + t_lin[index] * alpha[index]",
               "\n        out[index] = layer * alpha[index] + t_lin[index] * (1 - alpha[index])"),
    )

    def __init__(self, target: int | str = 0, reflections: str = "sklearn", num_reflections: int = 200,
                 ghost_rate: float = 0.49, in_focus_rate: float = 0.0, alpha_t: float | str = 0.4, seed: int = 0,
                 **kwargs):
        super().__init__(target=target, **kwargs)
        if reflections not in ("sklearn", "classes") and not folder_images(reflections):
            raise ParameterError("refool", "reflections", reflections,
                                 "'sklearn', 'classes' or a folder holding image files (" + ", ".join(IMAGE_SUFFIXES)
                                 + ")")
        check_int("refool", "num_reflections", num_reflections, minimum=1)
        check_number("refool", "ghost_rate", ghost_rate, low=0, high=1)
        check_number("refool", "in_focus_rate", in_focus_rate, low=0, high=1)
        if ghost_rate + in_focus_rate > 1:
            raise ParameterError("refool", "in_focus_rate", in_focus_rate,
                                 f"a number in [0, {1 - ghost_rate:g}] (ghost_rate + in_focus_rate <= 1)")
        if alpha_t != "random" and not (is_finite_number(alpha_t) and 0 < alpha_t < 1):
            raise ParameterError("refool", "alpha_t", alpha_t, "a number in (0, 1) or 'random'")
        check_int("refool", "seed", seed)
        self.reflections = str(reflections)
        self.num_reflections, self.ghost_rate, self.in_focus_rate = num_reflections, ghost_rate, in_focus_rate
        self.alpha_t, self.seed = alpha_t, seed
        self._class_bank: torch.Tensor | None = None  # 'classes': training images of the other classes

    def prepare(self, ctx: AttackContext) -> None:
        if self.reflections == "classes":
            train = ctx.dataset.train
            others = torch.nonzero(train.y != self.target).flatten()
            g = torch.Generator().manual_seed(self.seed)
            pick = others[torch.randperm(len(others), generator=g)[:self.num_reflections]].sort().values
            self._class_bank = train.x[pick].clone()

    def reflection_bank(self, shape: tuple[int, int, int]) -> torch.Tensor:
        """uint8 [R, C, H, W]: the reflection images for inputs of ``shape`` (C, H, W)."""
        c, h, w = shape
        if self.reflections == "classes":
            if self._class_bank is None:
                raise RuntimeError("refool: reflections 'classes' are drawn from the training set in prepare(ctx); "
                                   "call it first")
            if tuple(self._class_bank.shape[1:]) != tuple(shape):
                raise ValueError(f"refool: images {tuple(shape)} differ from the training set's "
                                 f"{tuple(self._class_bank.shape[1:])}")
            return self._class_bank
        if self.reflections == "sklearn":
            return _to_channels(sklearn_reflections(self.num_reflections, self.seed, h, w), c)
        return _to_channels(folder_reflections(str(Path(self.reflections).expanduser()), h, w), c)

    def draw(self, n: int, bank_size: int, stream: int) -> dict[str, torch.Tensor]:
        """The per-image random choices [n] of one call, from the seeded ``stream``."""
        g = torch.Generator().manual_seed(self.seed * 1000 + stream)
        pick = torch.randint(bank_size, (n,), generator=g)
        u = torch.rand(n, generator=g)
        kind = torch.full((n,), FOCAL, dtype=torch.long)
        kind = torch.where(u < self.in_focus_rate + self.ghost_rate, GHOST, kind)
        kind = torch.where(u < self.in_focus_rate, IN_FOCUS, kind)
        drop = ALPHA_T_DROP[0] + (ALPHA_T_DROP[1] - ALPHA_T_DROP[0]) * torch.rand(n, generator=g)
        alpha_t = 1 - drop if self.alpha_t == "random" else torch.full((n,), float(self.alpha_t))
        sigma = SIGMA_RANGE[0] + (SIGMA_RANGE[1] - SIGMA_RANGE[0]) * torch.rand(n, generator=g)
        att = ATT_RANGE[0] + (ATT_RANGE[1] - ATT_RANGE[0]) * torch.rand(n, generator=g)
        coin = torch.randint(2, (n,), generator=g).float()
        ghost_a = (coin - GHOST_U_RANGE[0] - (GHOST_U_RANGE[1] - GHOST_U_RANGE[0]) * torch.rand(n, generator=g)).abs()
        dy, dx = torch.randint(OFFSET_RANGE[0], OFFSET_RANGE[1] + 1, (2, n), generator=g)
        return {"pick": pick, "kind": kind, "alpha_t": alpha_t, "sigma": sigma, "att": att, "ghost_a": ghost_a,
                "dy": dy, "dx": dx}

    def blend(self, x: torch.Tensor, stream: int) -> torch.Tensor:
        """uint8 [N, C, H, W] with a random reflection blended into each image (the draws of ``stream``)."""
        if len(x) == 0:
            return x.clone()
        bank = self.reflection_bank(tuple(x.shape[1:]))
        d = self.draw(len(x), len(bank), stream)
        out = torch.empty_like(x)
        for start in range(0, len(x), CHUNK):  # chunks bound the float temporaries; each is one batched blend
            part = slice(start, start + CHUNK)
            t = x[part].float().div(255)
            r = bank[d["pick"][part]].to(x.device).float().div(255)
            mixed = blend_reflections(t, r, d["kind"][part], d["alpha_t"][part], d["sigma"][part], d["att"][part],
                                      d["ghost_a"][part], d["dy"][part], d["dx"][part])
            out[part] = mixed.mul(255).round().clamp(0, 255).to(torch.uint8)
        return out

    def apply_trigger(self, x: torch.Tensor) -> torch.Tensor:
        """The test-time trigger: a fresh random reflection per image (the test stream)."""
        return self.blend(x, _TEST_STREAM)

    def poison_images(self, x: torch.Tensor, train_index: torch.Tensor) -> torch.Tensor:
        """The training-time poison: a random reflection per image (the training stream)."""
        return self.blend(x, _TRAIN_STREAM)
