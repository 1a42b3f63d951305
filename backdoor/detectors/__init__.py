"""Detector registry: one module per detector; each registers a ``Detector`` subclass under its name.

The names may repeat a defense's (``nc``, ``ac``): the registries are separate, and a method that both repairs
and detects appears in both roles."""
from backdoor._registry import Registry
from backdoor.detectors.base import (TASKS, DataDetection, DataDetector, Detector, InputDetector, InputScreen,
                                     ModelDetector, ModelVerdict)

DETECTORS: Registry[Detector] = Registry("detector", package="backdoor.detectors")
register_detector = DETECTORS.register


def create_detector(name: str, **params) -> Detector:
    return DETECTORS.create(name, **params)


__all__ = ["DETECTORS", "TASKS", "DataDetection", "DataDetector", "Detector", "InputDetector", "InputScreen",
           "ModelDetector", "ModelVerdict", "create_detector", "register_detector"]
