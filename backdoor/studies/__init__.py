"""The paper's three training-dynamics studies (supplementary B.6-B.8), one per module.

Each module has ``NAME``, ``add_arguments(parser)`` and ``run(args, folder)``, which trains through the one
trainer (``backdoor.training.fit``) with observing ``TrainHooks``, writes ``<name>.json`` and a figure (PNG +
SVG) and returns the paths.
"""
from __future__ import annotations

import importlib

STUDIES = {"quick-learning": "quick_learning", "forgetting": "forgetting",
           "trigger-generalisation": "trigger_generalisation"}
STUDY_SUMMARIES = {
    "quick-learning": "B.6: per-epoch loss, accuracy, gradient SNR, gradient norm and cosine similarity "
                      "for poisoned, clean and all training samples",
    "forgetting": "B.7: forgetting events per training sample, clean vs poisoned, per poison ratio",
    "trigger-generalisation": "B.8: Blended trained with each alpha, tested with each: the ASR matrix",
}


def study(name: str):
    """The module of study ``name``."""
    if name not in STUDIES:
        raise KeyError(f"unknown study {name!r}; available: {', '.join(STUDIES)}")
    return importlib.import_module(f"backdoor.studies.{STUDIES[name]}")
