"""The paper's five analysis tools (section 3.2), one per module, run on a finished case's cached artifacts.

Each module has ``NAME``, ``add_arguments(parser)`` for its options and ``run(artifacts, folder, args)``, which
writes a PNG plus the raw numbers (``.npz`` and a ``.json`` summary) and returns the paths.
"""
from __future__ import annotations

import importlib

TOOLS = {"tsne": "tsne", "gradcam": "gradcam", "shapley": "shapley", "frequency": "frequency",
         "activation": "activation"}
TOOL_SUMMARIES = {
    "tsne": "t-SNE of penultimate features, clean vs triggered test samples, before/after the defense",
    "gradcam": "Grad-CAM and FullGrad maps of clean/triggered pairs, before/after the defense",
    "shapley": "Shapley value maps (superpixels, sampled permutations) of clean/triggered pairs",
    "frequency": "frequency saliency maps (supplementary formulas (1)-(4)) of clean/triggered pairs",
    "activation": "mean activation per channel of a declared-role layer, clean vs triggered, before/after",
}


def tool(name: str):
    """The module of analysis tool ``name``."""
    if name not in TOOLS:
        raise KeyError(f"unknown analysis tool {name!r}; available: {', '.join(TOOLS)}")
    return importlib.import_module(f"backdoor.analysis.{TOOLS[name]}")
