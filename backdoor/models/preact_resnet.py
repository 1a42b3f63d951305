"""PreAct-ResNet18 (He et al., "Identity Mappings in Deep Residual Networks", ECCV 2016), CIFAR variant.

The layout of the paper's footnote 2 (the WaNet release's ``preact_resnet.py``): 3x3 stem, four stages of two
pre-activation basic blocks (64-128-256-512), global average pool, linear head (no BN before the pool,
as in that file).
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from backdoor._checks import check_int
from backdoor.models import LayerRoles, register_model


class PreActBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride=1, padding=1, bias=False)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Conv2d(cin, cout, 1, stride=stride, bias=False)

    def forward(self, x):
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet(nn.Module):
    def __init__(self, blocks_per_stage: tuple[int, ...], num_classes: int, width: int = 64):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1, bias=False)
        stages, cin = [], width
        for i, n in enumerate(blocks_per_stage):
            cout = width * 2**i
            blocks = [PreActBlock(cin, cout, 1 if i == 0 else 2)] + [PreActBlock(cout, cout, 1) for _ in range(n - 1)]
            stages.append(nn.Sequential(*blocks))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(cin, num_classes)

    def forward(self, x):
        out = self.layer4(self.layer3(self.layer2(self.layer1(self.conv1(x)))))
        out = self.avgpool(out)
        return self.linear(out.flatten(1))


@register_model("preact_resnet18")
def preact_resnet18(num_classes: int, width: int = 64):
    """PreAct-ResNet18 (He et al. 2016), the paper's main model; 11.2M parameters at width 64."""
    check_int("preact_resnet18", "width", width, minimum=1)
    roles = LayerRoles(feature_maps=("layer2", "layer3", "layer4"), last_conv="layer4", head="linear")
    return PreActResNet((2, 2, 2, 2), num_classes, width), roles
