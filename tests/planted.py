"""A planted backdoor with a known answer, for the repair defenses' tests (I-BAU, SAU, NPD): three colour
classes of 8x8 images, a white 2x2 bottom-right corner as the trigger, and a model whose class-0 logit has a
corner detector that the trigger fires."""
import torch
import torch.nn.functional as F
from torch import nn

from backdoor.data import Split
from backdoor.models import Classifier, LayerRoles
from backdoor.training import predict

CPU = torch.device("cpu")


def colour_data(n: int, seed: int, corner_evidence: bool = True) -> Split:
    """Three classes, 8x8: channel y is brighter; with ``corner_evidence`` class 0's bottom-right 2x2 corner is a
    little brighter too (so the corner detector also carries some clean evidence for class 0, and fine-tuning
    keeps it)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    x = torch.randint(0, 120, (n, 3, 8, 8), generator=g)
    x[torch.arange(n), y] += 100
    if corner_evidence:
        x[y == 0, :, -2:, -2:] += 20
    return Split(x.to(torch.uint8), y)


def add_trigger(x: torch.Tensor) -> torch.Tensor:
    x = x.clone()
    x[..., -2:, -2:] = 255
    return x


class PlantedBackdoor(nn.Module):
    """logits = scale * channel means + bias, plus backdoor * softplus(gain * (corner mean - offset)) on class 0:
    the white corner (mean 1) adds about 3 * 4 = 12 to class 0, clean corners (mean ~0.4) about 0.3."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(10.0))
        self.gain = nn.Parameter(torch.tensor(10.0))
        self.offset = nn.Parameter(torch.tensor(0.6))
        self.backdoor = nn.Parameter(torch.tensor(3.0))
        self.bias = nn.Parameter(torch.tensor([-0.28, 0.0, 0.0]))

    def forward(self, x):
        detector = F.softplus(self.gain * (x[..., -2:, -2:].mean((1, 2, 3)) - self.offset))
        return self.scale * x.mean((2, 3)) + self.bias + F.pad((self.backdoor * detector)[:, None], (0, 2))


def planted_model() -> Classifier:
    return Classifier(PlantedBackdoor(), (0.0,) * 3, (1.0,) * 3, LayerRoles(("bias",) * 3, "bias", "bias"),
                      arch="planted")


def accuracy_and_asr(model, test: Split) -> tuple[float, float]:
    """Clean accuracy, and the share of triggered non-target (class 0) images predicted as class 0."""
    acc = float((predict(model, test.x, device=CPU) == test.y).float().mean())
    others = test.x[test.y != 0]
    return acc, float((predict(model, add_trigger(others), device=CPU) == 0).float().mean())
