"""Read a user's checkpoint without running code from it (the pure-defense mode).

Accepted:

- ``.safetensors``: a state dict (no pickle at all);
- ``.pt`` / ``.pth`` / ``.bin``: a state dict saved with ``torch.save``, read with ``torch.load(weights_only=True)``
  (tensors, containers, numbers and strings only); a dict wrapping it under ``state_dict``,
  ``model_state_dict`` or ``model`` is unwrapped, and DataParallel's ``module.`` prefix is dropped;
- a ``backdoor export`` folder (``model.json`` + ``model.safetensors``);
- BackdoorBench's ``attack_result.pt`` (``read_backdoorbench``), read with ``weights_only=True`` and an
  allow-list of the numpy array types it holds (``NUMPY_SAFE_GLOBALS``).

A file that needs anything else to unpickle (a whole pickled ``nn.Module``, a custom class, a function: any of
which may run code) is refused with ``CheckpointError`` saying which global it needs and how to convert it.
"""
from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy._core.multiarray as _multiarray
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

PICKLE_SUFFIXES = (".pt", ".pth", ".bin")

# What a numpy array needs to unpickle, under the names numpy 2 and numpy 1 write: the reconstructor, the
# array and dtype types, scalars, and the dtype classes of the arrays BackdoorBench stores (indices, images).
NUMPY_SAFE_GLOBALS = [
    _multiarray._reconstruct, (_multiarray._reconstruct, "numpy.core.multiarray._reconstruct"),
    _multiarray.scalar, (_multiarray.scalar, "numpy.core.multiarray.scalar"),
    np.ndarray, np.dtype,
    *[type(np.dtype(code)) for code in ("b1", "u1", "i1", "i2", "i4", "i8", "u2", "u4", "u8", "f2", "f4", "f8")],
]

CONVERT_HINT = (
    "convert it where you trust its source, to a state dict of tensors: "
    "`python -c \"import torch; from safetensors.torch import save_file; m = torch.load('{path}', weights_only=False); "
    "m = getattr(m, 'state_dict', lambda: m)(); save_file({{k: v.contiguous() for k, v in m.items()}}, "
    "'{stem}.safetensors')\"` (or torch.save(model.state_dict(), '{stem}_state.pt'))")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read safely, or does not fit the architecture; the message says why and what to do."""


def torch_load_safely(path: str | Path, numpy: bool = False):
    """``torch.load(path, weights_only=True)`` on the CPU (with ``numpy``: numpy arrays allowed too); a file that
    needs any other global is refused, naming it, with the conversion to do."""
    path = Path(path)
    try:
        if numpy:
            with torch.serialization.safe_globals(NUMPY_SAFE_GLOBALS):
                return torch.load(path, map_location="cpu", weights_only=True)
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        needed = _unsafe_globals(path)
        what = f"it needs {', '.join(needed[:4])}" if needed else f"({str(e).splitlines()[0][:160]})"
        raise CheckpointError(
            f"{path}: refused: loading it would unpickle arbitrary objects, which can run code; {what}. "
            + CONVERT_HINT.format(path=path, stem=path.with_suffix(""))) from None
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"{path}: not a torch.save file that can be read ({str(e).splitlines()[0][:200]})") from None


def _unsafe_globals(path: Path) -> list[str]:
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # an old (non-zip) format or a damaged file: the error message says enough
        return []


def _is_state_dict(obj) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                      for k, v in obj.items())


def is_backdoorbench(obj) -> bool:
    """A BackdoorBench ``attack_result.pt`` dict: the model's state dict beside its name and the backdoor test set."""
    return isinstance(obj, dict) and {"model_name", "model", "bd_test"} <= set(obj)


def unwrap_state_dict(obj, path: Path) -> dict[str, torch.Tensor]:
    """The state dict inside a loaded object (itself, or under ``state_dict`` / ``model_state_dict`` / ``model``),
    without DataParallel's ``module.`` prefix."""
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(obj, dict) and not _is_state_dict(obj) and _is_state_dict(obj.get(key)):
            obj = obj[key]
            break
    if not _is_state_dict(obj):
        kind = type(obj).__name__
        keys = f" with keys {sorted(map(str, obj))[:8]}" if isinstance(obj, dict) else ""
        raise CheckpointError(f"{path}: holds a {kind}{keys}, not a state dict (names -> tensors, possibly under "
                              "'state_dict', 'model_state_dict' or 'model')")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


@dataclass(frozen=True)
class CheckpointFormat:
    kind: str  # "safetensors" | "state_dict" | "export" | "backdoorbench"
    weights: Path  # the file holding the weights


def checkpoint_format(path: str | Path) -> CheckpointFormat:
    """What ``path`` is, from its name and (for pickles) its content; raises ``CheckpointError``."""
    path = Path(path)
    if path.is_dir():
        if not (path / "model.json").is_file() or not (path / "model.safetensors").is_file():
            raise CheckpointError(f"{path}: a folder is accepted only as a backdoor export (model.json + "
                                  "model.safetensors)")
        return CheckpointFormat("export", path / "model.safetensors")
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist")
    if path.suffix == ".safetensors":
        return CheckpointFormat("safetensors", path)
    if path.suffix in PICKLE_SUFFIXES:
        obj = torch_load_safely(path, numpy=True)
        return CheckpointFormat("backdoorbench" if is_backdoorbench(obj) else "state_dict", path)
    raise CheckpointError(f"{path}: unknown checkpoint type {path.suffix!r}; expected .safetensors, "
                          f"{', '.join(PICKLE_SUFFIXES)}, a backdoor export folder or BackdoorBench's attack_result.pt")


def read_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], CheckpointFormat]:
    """The weights of any accepted checkpoint, as a state dict (unwrapped, ``module.`` dropped)."""
    fmt = checkpoint_format(path)
    if fmt.kind in ("safetensors", "export"):
        try:
            return load_file(str(fmt.weights)), fmt
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{fmt.weights}: not a readable safetensors file ({e})") from None
    obj = torch_load_safely(fmt.weights, numpy=True)
    return unwrap_state_dict(obj, fmt.weights), fmt


def safetensors_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Names and shapes of a safetensors file's tensors, from its header only."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None


def map_names(theirs: dict[str, tuple], ours: dict[str, tuple], where: str) -> dict[str, str]:
    """Map a checkpoint's tensors onto a model's, from their shapes (name -> shape, in state-dict order): returns
    our name -> theirs. Names that match are kept; otherwise, when both have as many tensors with the same shapes
    in the same order, names are mapped by position (as BackdoorBench's own loader does: its PreAct-ResNet18's
    ``shortcut.0.weight`` is our ``shortcut.weight``). Anything else is a ``CheckpointError`` naming the first
    differences."""
    if set(theirs) == set(ours):
        bad = [k for k in ours if tuple(theirs[k]) != tuple(ours[k])]
        if bad:
            k = bad[0]
            raise CheckpointError(f"{where}: {k} has shape {list(theirs[k])}, the architecture expects "
                                  f"{list(ours[k])} ({len(bad)} tensor(s) differ): check `arch`, `arch_params` and "
                                  "the dataset's class count")
        return {k: k for k in ours}
    a, b = list(ours), list(theirs)
    if len(a) == len(b) and all(tuple(theirs[t]) == tuple(ours[o]) for o, t in zip(a, b)):
        return dict(zip(a, b))
    missing = sorted(set(ours) - set(theirs))
    unexpected = sorted(set(theirs) - set(ours))
    raise CheckpointError(f"{where}: the checkpoint's tensors do not fit the architecture ({len(theirs)} tensors "
                          f"against {len(ours)}; missing {missing[:4]}{' ...' if len(missing) > 4 else ''}, "
                          f"unexpected {unexpected[:4]}{' ...' if len(unexpected) > 4 else ''}): check `arch` and "
                          "`arch_params`")


# -- BackdoorBench's attack_result.pt -----------------------------------------------------------------------------
BACKDOORBENCH_ARCHS = {"preactresnet18": "preact_resnet18", "vgg19": "vgg19", "efficientnet_b3": "efficientnet_b3",
                       "mobilenet_v3_large": "mobilenet_v3_large", "densenet161": "densenet161"}


@dataclass(frozen=True)
class BackdoorBenchResult:
    """The fields of an ``attack_result.pt`` this harness uses (see ``read_backdoorbench``)."""

    state_dict: dict[str, torch.Tensor]
    model_name: str
    num_classes: int | None
    clean_data: str | None
    img_size: tuple | None
    train_x: torch.Tensor | None  # uint8 [n, C, H, W]: the poisoned training images
    train_y: torch.Tensor | None  # their (attack's) labels
    train_index: torch.Tensor | None  # their positions in the clean training set
    test_x: torch.Tensor  # uint8 [m, C, H, W]: the backdoor test images
    test_y: torch.Tensor  # their labels as the attack assigns them (the target for all-to-one)


def _images(x, where: str) -> torch.Tensor:
    """BackdoorBench stores images as float tensors of 0..255 grey levels, NCHW (``nHWC_to_nCHW(...).float()``),
    or as uint8 numpy arrays NHWC; returns uint8 NCHW."""
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
        if x.dim() == 4 and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
            x = x.permute(0, 3, 1, 2)
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise CheckpointError(f"{where}: expected images [N, C, H, W], got {type(x).__name__} "
                              f"{tuple(getattr(x, 'shape', ()))}")
    if x.dtype == torch.uint8:
        return x.contiguous()
    x = x.float()
    if x.numel() and float(x.max()) <= 1.0:  # stored in [0, 1]
        x = x * 255
    return x.round().clamp(0, 255).to(torch.uint8).contiguous()


def _labels(y, where: str) -> torch.Tensor:
    y = torch.from_numpy(np.asarray(y)) if isinstance(y, (np.ndarray, list)) else y
    if not isinstance(y, torch.Tensor) or y.dim() != 1:
        raise CheckpointError(f"{where}: expected labels [N], got {type(y).__name__}")
    return y.long()


def read_backdoorbench(path: str | Path) -> BackdoorBenchResult:
    """Read BackdoorBench's ``attack_result.pt`` (the layout of its ``utils/save_load_attack.py`` that stores the
    data as arrays: ``bd_train`` and ``bd_test`` as ``{"x", "y"}`` dicts, ``bd_train["original_index"]`` a
    numpy array) with ``weights_only=True`` and ``NUMPY_SAFE_GLOBALS``. Fields used: ``model`` (the state dict),
    ``model_name`` (the architecture, ``BACKDOORBENCH_ARCHS``), ``clean_data`` (recorded),
    ``bd_train.x``/``.y``/``.original_index`` (the poisoned samples and where they go in the clean training set),
    ``bd_test.x``/``.y``. ``num_classes`` and ``img_size`` are kept but not relied on (the harness checks the
    tensors' and images' shapes against the dataset); ``data_path`` is not used.

    The layout of its later ``prepro_cls_DatasetBD_v2.retrieve_state()`` keeps the poisoned images as PIL
    images inside ``bd_data_container``: PIL objects cannot be read without unpickling them, so such a file is
    refused with a message saying how to convert it."""
    path = Path(path)
    obj = torch_load_safely(path, numpy=True)
    if not is_backdoorbench(obj):
        raise CheckpointError(f"{path}: not a BackdoorBench attack_result.pt (needs model_name, model, bd_test)")
    state = unwrap_state_dict(obj["model"], path)
    test = obj["bd_test"]
    if not isinstance(test, dict) or not {"x", "y"} <= set(test):
        keys = sorted(test) if isinstance(test, dict) else type(test).__name__
        raise CheckpointError(
            f"{path}: bd_test holds {keys}, not the arrays x and y. A file of BackdoorBench's later layout "
            "(bd_data_container with PIL images) cannot be read safely; convert it in BackdoorBench's environment: "
            "load it with its load_attack_result, then torch.save({'model_name', 'num_classes', 'model', 'img_size', "
            "'clean_data', 'bd_train': {'x': uint8 NCHW tensor, 'y': labels, 'original_index': indices}, "
            "'bd_test': {'x': ..., 'y': ...}})")
    train = obj.get("bd_train")
    train_x = train_y = train_index = None
    if isinstance(train, dict) and train.get("x") is not None:
        train_x, train_y = _images(train["x"], f"{path}: bd_train.x"), _labels(train["y"], f"{path}: bd_train.y")
        index = train.get("original_index")
        train_index = None if index is None else torch.as_tensor(np.asarray(index)).long().flatten()
        if train_index is not None and len(train_index) != len(train_x):
            raise CheckpointError(f"{path}: bd_train.original_index has {len(train_index)} entries for "
                                  f"{len(train_x)} images")
    img_size = obj.get("img_size")
    return BackdoorBenchResult(
        state_dict=state, model_name=str(obj["model_name"]),
        num_classes=None if obj.get("num_classes") is None else int(obj["num_classes"]),
        clean_data=None if obj.get("clean_data") is None else str(obj["clean_data"]),
        img_size=None if img_size is None else tuple(int(v) for v in img_size),
        train_x=train_x, train_y=train_y, train_index=train_index,
        test_x=_images(test["x"], f"{path}: bd_test.x"), test_y=_labels(test["y"], f"{path}: bd_test.y"))
