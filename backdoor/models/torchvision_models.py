"""The paper's other four models, built by torchvision with ``num_classes`` (random init, no weights).

Layer roles are given per builder for 32x32 inputs; the chosen feature maps keep spatial extent there.
"""
from __future__ import annotations

from torchvision import models as tvm

from backdoor.models import LayerRoles, register_model


@register_model("vgg19")
def vgg19(num_classes: int):
    """VGG-19 without batch norm (Simonyan & Zisserman 2015), torchvision layout, as in the paper."""
    roles = LayerRoles(feature_maps=("features.9", "features.18", "features.27"),
                       last_conv="features.35", head="classifier.6")
    return tvm.vgg19(weights=None, num_classes=num_classes), roles


@register_model("efficientnet_b3")
def efficientnet_b3(num_classes: int):
    """EfficientNet-B3 (Tan & Le 2019), torchvision layout."""
    roles = LayerRoles(feature_maps=("features.2", "features.3", "features.4"),
                       last_conv="features.8", head="classifier.1")
    return tvm.efficientnet_b3(weights=None, num_classes=num_classes), roles


@register_model("mobilenet_v3_large")
def mobilenet_v3_large(num_classes: int):
    """MobileNetV3-Large (Howard et al. 2019), torchvision layout."""
    roles = LayerRoles(feature_maps=("features.3", "features.6", "features.12"),
                       last_conv="features.16", head="classifier.3")
    return tvm.mobilenet_v3_large(weights=None, num_classes=num_classes), roles


@register_model("densenet161")
def densenet161(num_classes: int):
    """DenseNet-161 (Huang et al. 2017), torchvision layout."""
    roles = LayerRoles(feature_maps=("features.denseblock1", "features.denseblock2", "features.denseblock3"),
                       last_conv="features.denseblock4", head="classifier")
    return tvm.densenet161(weights=None, num_classes=num_classes), roles
