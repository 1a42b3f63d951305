"""Small fast CNN for CPU matrices and tests (not from the paper)."""
from __future__ import annotations

from torch import nn

from backdoor._checks import check_int
from backdoor.models import LayerRoles, register_model


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class SmallCNN(nn.Module):
    def __init__(self, num_classes: int, width: int = 16, hidden: int = 128):
        super().__init__()
        self.block1 = nn.Sequential(_block(3, width), nn.MaxPool2d(2))
        self.block2 = nn.Sequential(_block(width, 2 * width), nn.MaxPool2d(2))
        self.block3 = _block(2 * width, 4 * width)
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(4 * width * 16, hidden), nn.ReLU(inplace=True))
        self.linear = nn.Linear(hidden, num_classes)

    def forward(self, x):
        return self.linear(self.fc(self.pool(self.block3(self.block2(self.block1(x))))))


@register_model("cnn_small")
def cnn_small(num_classes: int, width: int = 16, hidden: int = 128):
    """Three conv-BN-ReLU blocks (16-32-64 channels), 128-unit hidden layer: ~0.2M parameters, CPU-fast."""
    check_int("cnn_small", "width", width, minimum=1)
    check_int("cnn_small", "hidden", hidden, minimum=1)
    roles = LayerRoles(feature_maps=("block1", "block2", "block3"), last_conv="block3", head="linear")
    return SmallCNN(num_classes, width, hidden), roles
