"""Reading an export of the pure-attack mode (``backdoor export``): ``read_export(folder)`` checks its
``model.json`` and files, ``load_model(folder)`` returns the exported model ready to use."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from backdoor._storage import file_sha256
from backdoor.models import Classifier, create_model

FORMAT = "backdoor-bench-export"
FORMAT_VERSION = 1


class ExportError(ValueError):
    """A case that cannot be exported, or a folder that is not an export; the message says why."""


def read_export(folder: str | Path) -> dict:
    """An export folder's ``model.json``, checked: its format and that every listed file matches its SHA-256."""
    folder = Path(folder)
    path = folder / "model.json"
    try:
        description = json.loads(path.read_text())
    except FileNotFoundError:
        raise ExportError(f"{folder} is not a backdoor-bench export (no model.json)") from None
    except ValueError as e:
        raise ExportError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(description, dict) or description.get("format") != FORMAT:
        raise ExportError(f"{path} is not a backdoor-bench export's description (format {FORMAT!r})")
    if description.get("format_version") != FORMAT_VERSION:
        raise ExportError(f"{path}: format version {description.get('format_version')!r}; this version reads "
                          f"{FORMAT_VERSION}")
    for name, digest in (description.get("files") or {}).items():
        file = folder / name
        if not file.is_file():
            raise ExportError(f"{folder}: {name} is missing (listed in model.json)")
        if file_sha256(file) != digest:
            raise ExportError(f"{folder}: {name} does not match its SHA-256 in model.json (changed or damaged)")
    return description


def load_model(folder: str | Path, device: str | torch.device = "cpu") -> Classifier:
    """The exported model, ready to use: a ``Classifier`` in eval mode on ``device`` that takes float RGB
    images in [0, 1] ``[N, C, H, W]`` and normalises inside (its ``mean``/``std`` are in the state dict)."""
    folder = Path(folder)
    description = read_export(folder)
    arch = description["architecture"]
    norm = description["normalization"]
    model = create_model(arch["name"], arch["num_classes"], norm["mean"], norm["std"], **(arch.get("params") or {}))
    model.load_state_dict(load_file(str(folder / "model.safetensors")))
    return model.to(device).eval()
