"""Checks of a matrix's user models (the pure-defense mode, ``backdoor.checkpoints.user_models``): the YAML entry
parsed and validated at matrix load (``parse_user_model``), then what needs the dataset (``check_user_model``):
the architecture builds, the checkpoint's tensors fit it, the target is a class, the trigger and the poisoned
training set are readable and fit the images. Every problem is raised through ``fail(key, detail)``."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import safe_open

from backdoor._checks import ParameterError, is_finite_number
from backdoor.attacks import ATTACKS
from backdoor.checkpoints import BACKDOORBENCH_ARCHS, CheckpointError, checkpoint_format, safetensors_shapes
from backdoor.checkpoints.export import read_export
from backdoor.checkpoints.user_models import (CHECKPOINT, UserModel, backdoorbench, classifier_parts,
                                              image_folder_problem, net_mapping, read_state, read_tensors)
from backdoor.models import create_model
from backdoor.targets import is_all_to_all, target_problem

KEYS = {
    "checkpoint": "the model's weights: .safetensors, a .pt/.pth state dict, a backdoor export folder, or "
                  "BackdoorBench's attack_result.pt",
    "arch": "the registered architecture",
    "arch_params": "the architecture's parameters",
    "normalize": "dataset, none, checkpoint, or {mean: [...], std: [...]}",
    "target": "the backdoor's target class, or all-to-all",
    "trigger": "{attack: NAME, params: {...}}, {images: FILE.safetensors or FOLDER}, checkpoint, or false",
    "poisoned_train": "FILE.safetensors (x, y, optional mask), checkpoint, or false",
    "dataset": "which of the matrix's datasets the model belongs to",
}


Fail = Callable[[str, str], Exception]


def _export_description(folder: Path) -> dict:
    return read_export(folder)


# -- parsing (matrix load) -------------------------------------------------------------------------------------------
def is_user_entry(params: Any) -> bool:
    return isinstance(params, dict) and "checkpoint" in params


def parse_user_model(base: Path, label: str, entry: dict, fail: Fail, registered: Callable[[str], bool],
                     default_target: Any, datasets: list[str]) -> UserModel:
    """Check a ``models.<label>`` entry with a ``checkpoint`` (keys, files, formats) and resolve it; ``fail(key,
    message)`` builds the error. Values that need the dataset or the architecture are checked by
    ``check_user_model``."""
    key = f"models.{label}"
    unknown = sorted(set(entry) - set(KEYS))
    if unknown:
        raise fail(key, f"unknown key(s) {unknown}; a user model takes: {', '.join(KEYS)}")
    checkpoint = _path(base, entry["checkpoint"], fail, f"{key}.checkpoint")
    try:
        fmt = checkpoint_format(checkpoint)
        if fmt.kind in ("safetensors", "export"):
            safetensors_shapes(fmt.weights)  # a truncated file or a forged header length stops here, in one line
    except CheckpointError as e:
        raise fail(f"{key}.checkpoint", str(e)) from None
    described = _export_description(checkpoint) if fmt.kind == "export" else None
    bb = None
    if fmt.kind == "backdoorbench":
        try:
            bb = backdoorbench(checkpoint)
        except CheckpointError as e:
            raise fail(f"{key}.checkpoint", str(e)) from None

    arch = entry.get("arch")
    arch_params = entry.get("arch_params")
    if arch is None:
        if described is not None:
            arch, arch_params = described["architecture"]["name"], arch_params or described["architecture"]["params"]
        elif bb is not None and bb.model_name in BACKDOORBENCH_ARCHS:
            arch = BACKDOORBENCH_ARCHS[bb.model_name]
        elif registered(label):
            arch = label
        else:
            raise fail(f"{key}.arch", "missing: name the registered architecture of the checkpoint"
                       + (f" (BackdoorBench's {bb.model_name!r} has no known counterpart)" if bb else ""))
    if not isinstance(arch, str) or not registered(arch):
        raise fail(f"{key}.arch", f"{arch!r} is not a registered model")
    arch_params = {} if arch_params is None else arch_params
    if not isinstance(arch_params, dict):
        raise fail(f"{key}.arch_params", f"{arch_params!r} is not allowed; expected a mapping of parameters")

    normalize = _normalize(checkpoint, fmt, entry.get("normalize"), fail, f"{key}.normalize")
    if "target" in entry:
        target = entry["target"]
    elif described is not None:
        target = described["target"]
    elif bb is not None and len(bb.test_y.unique()) == 1:  # all-to-one: every bd_test label is the target
        target = int(bb.test_y[0])
    else:
        target = default_target
    if target_problem(target) is not None:
        raise fail(f"{key}.target", target_problem(target))

    has_data = fmt.kind == "export" or bb is not None
    trigger = _trigger(base, entry.get("trigger", CHECKPOINT if has_data else None), fmt, bb, fail, f"{key}.trigger")
    default_train = CHECKPOINT if (fmt.kind == "export" and (checkpoint / "poisoned_train.safetensors").is_file()) or (
        bb is not None and bb.train_x is not None) else None
    poisoned = _poisoned_train(base, entry.get("poisoned_train", default_train), fmt, bb, fail, f"{key}.poisoned_train")

    dataset = entry.get("dataset")
    if dataset is None and len(datasets) > 1:
        raise fail(f"{key}.dataset", f"missing: the matrix has several datasets ({', '.join(datasets)}); name the "
                                     "one this model belongs to")
    if dataset is not None and dataset not in datasets:
        raise fail(f"{key}.dataset", f"{dataset!r} is not one of the matrix's datasets ({', '.join(datasets)})")
    return UserModel(label=label, checkpoint=checkpoint, format=fmt.kind, arch=arch, arch_params=dict(arch_params),
                     normalize=normalize, target=target if is_all_to_all(target) else int(target), trigger=trigger, poisoned_train=poisoned,
                     dataset=dataset or datasets[0])


def _path(base: Path, value: Any, fail: Fail, key: str) -> Path:
    if not isinstance(value, str) or not value:
        raise fail(key, f"{value!r} is not allowed; expected a path")
    path = Path(value).expanduser()
    path = path if path.is_absolute() else base / path
    if not path.exists():
        raise fail(key, f"{path} does not exist (a relative path is taken from the matrix file's folder)")
    return path.resolve()


def _normalize(checkpoint: Path, fmt, value: Any, fail: Fail, key: str):
    stats = _checkpoint_stats(checkpoint, fmt)
    if value is None:
        value = CHECKPOINT if stats is not None else "dataset"
    if value == "dataset":
        return "dataset"
    if value == "none":
        return ((0.0,), (1.0,))
    if value == CHECKPOINT:
        if stats is None:
            raise fail(key, "checkpoint: the checkpoint has no mean/std buffers (it is not a backdoor-bench "
                            "Classifier state dict); use dataset, none or {mean: [...], std: [...]}")
        if not all(math.isfinite(v) for v in stats[0] + stats[1]) or not all(v > 0 for v in stats[1]):
            raise fail(key, f"checkpoint: the checkpoint's buffers mean {list(stats[0])}, std {list(stats[1])} are "
                            "not allowed; expected finite values, std > 0")
        return stats
    if isinstance(value, dict) and set(value) == {"mean", "std"}:
        mean, std = value["mean"], value["std"]
        if not (isinstance(mean, list) and isinstance(std, list) and mean and len(mean) == len(std)
                and all(is_finite_number(v) for v in mean + std) and all(v > 0 for v in std)):
            raise fail(key, f"{value!r} is not allowed; expected mean and std as lists of the same length "
                            "(one finite number per channel), std > 0")
        return tuple(float(v) for v in mean), tuple(float(v) for v in std)
    raise fail(key, f"{value!r} is not allowed; expected dataset, none, checkpoint or {{mean: [...], std: [...]}}")


def _checkpoint_stats(checkpoint: Path, fmt) -> tuple | None:
    """The ``mean``/``std`` buffers of a Classifier state dict, as tuples of floats (None if absent)."""
    if fmt.kind in ("safetensors", "export"):
        with safe_open(str(fmt.weights), framework="pt") as f:
            if not {"mean", "std"} <= set(f.keys()):
                return None
            mean, std = f.get_tensor("mean"), f.get_tensor("std")
    else:
        state, _ = read_state(checkpoint)
        if not {"mean", "std"} <= set(state):
            return None
        mean, std = state["mean"], state["std"]
    return tuple(mean.flatten().tolist()), tuple(std.flatten().tolist())


def _trigger(base: Path, value: Any, fmt, bb, fail: Fail, key: str) -> tuple | None:
    if value is None or value is False:
        return None
    if value == CHECKPOINT:
        if fmt.kind == "export":
            if not (fmt.weights.parent / "poisoned_test.safetensors").is_file():
                raise fail(key, f"checkpoint: the export {fmt.weights.parent} has no poisoned_test.safetensors "
                                "(a clean model's export)")
            return ("images", fmt.weights.parent / "poisoned_test.safetensors")
        if bb is not None:
            return ("checkpoint",)
        raise fail(key, "checkpoint: only an export folder or BackdoorBench's attack_result.pt holds a triggered "
                        "test set; give {attack: NAME} or {images: PATH}")
    if not isinstance(value, dict) or len(set(value) & {"attack", "images"}) != 1:
        raise fail(key, f"{value!r} is not allowed; expected {KEYS['trigger']}")
    if "images" in value:
        if set(value) != {"images"}:
            raise fail(key, f"unknown key(s) {sorted(set(value) - {'images'})} beside images")
        path = _path(base, value["images"], fail, f"{key}.images")
        if path.is_file():
            _check_tensor_file(path, {"x": 4, "y": 1}, fail, f"{key}.images")
        return ("images", path)
    unknown = sorted(set(value) - {"attack", "params"})
    if unknown:
        raise fail(key, f"unknown key(s) {unknown}; allowed: attack, params")
    name, params = value["attack"], value.get("params") or {}
    if not isinstance(name, str) or name not in ATTACKS:
        raise fail(f"{key}.attack", f"{name!r} is not a registered attack; allowed: {', '.join(ATTACKS.names())}")
    if not isinstance(params, dict):
        raise fail(f"{key}.params", f"{params!r} is not allowed; expected a mapping of parameters")
    allowed = set(ATTACKS.get(name).param_names()) - {"target"}
    if set(params) - allowed:
        raise fail(f"{key}.params", f"unknown parameter(s) {sorted(set(params) - allowed)}; allowed: {sorted(allowed)}")
    return ("attack", name, dict(params))


def _poisoned_train(base: Path, value: Any, fmt, bb, fail: Fail, key: str):
    if value is None or value is False:
        return None
    if value == CHECKPOINT:
        if fmt.kind == "export" and (fmt.weights.parent / "poisoned_train.safetensors").is_file():
            return fmt.weights.parent / "poisoned_train.safetensors"
        if bb is not None and bb.train_x is not None:
            return CHECKPOINT
        raise fail(key, "checkpoint: the checkpoint holds no poisoned training set; give a .safetensors file")
    path = _path(base, value, fail, key)
    _check_tensor_file(path, {"x": 4, "y": 1}, fail, key)
    return path


def _check_tensor_file(path: Path, required: dict[str, int], fail: Fail, key: str) -> None:
    """A .safetensors file with ``required`` tensors (name -> number of axes), uint8 images and one label each."""
    if path.suffix != ".safetensors":
        raise fail(key, f"{path}: expected a .safetensors file (x uint8 [N, C, H, W], y [N]"
                        + (", optional mask [N])" if key.endswith("poisoned_train") else ")"))
    try:
        shapes = safetensors_shapes(path)
    except CheckpointError as e:
        raise fail(key, str(e)) from None
    for name, dims in required.items():
        if name not in shapes or len(shapes[name]) != dims:
            raise fail(key, f"{path}: needs a tensor {name!r} with {dims} axes; it holds "
                            f"{ {k: list(v) for k, v in shapes.items()} }")
    n = shapes["x"][0]
    for name in ("y", "mask"):
        if name in shapes and shapes[name] != (n,):
            raise fail(key, f"{path}: {name} has shape {list(shapes[name])}, expected [{n}] (one per image)")


def check_user_model(um: UserModel, num_classes: int | None, image_side: int | None, fail: Fail) -> None:
    """What needs the dataset: the architecture builds with the dataset's classes and its parameters, the
    checkpoint's tensors fit it, the target is a class, the trigger attack builds and fits the images."""
    key = f"models.{um.label}"
    classes = num_classes or 10
    try:
        model = create_model(um.arch, classes, **um.arch_params)
    except ParameterError as e:
        raise fail(f"{key}.arch_params.{e.param}", e.detail) from None
    except (ValueError, TypeError) as e:
        raise fail(f"{key}.arch_params", str(e).removeprefix(f"{um.arch}: ")) from None
    if target_problem(um.target, num_classes) is not None:
        raise fail(f"{key}.target", target_problem(um.target, num_classes))
    if um.format in ("safetensors", "export"):
        shapes = safetensors_shapes(um.weights_file)  # the header only
    else:
        shapes = {k: tuple(v.shape) for k, v in read_state(um.checkpoint)[0].items()}
    try:
        mapping = net_mapping(shapes, {k: tuple(v.shape) for k, v in model.net.state_dict().items()},
                              f"{um.checkpoint}")
    except CheckpointError as e:
        raise fail(f"{key}.checkpoint", str(e)) from None
    problem = weights_problem(classifier_parts(read_state(um.checkpoint)[0]), mapping, model.net.state_dict())
    if problem is not None:
        raise fail(f"{key}.checkpoint", f"{um.checkpoint}: {problem}")
    trigger_file = um.trigger[1] if um.trigger is not None and um.trigger[0] == "images" else None
    for part, file in (("poisoned_train", um.poisoned_train), ("trigger", trigger_file)):
        if isinstance(file, Path) and file.suffix == ".safetensors":
            problem = tensor_file_problem(file, num_classes, image_side, um.target if part == "trigger" else None)
            if problem is not None:
                raise fail(f"{key}.{part}", f"{file}: {problem}")
    if um.trigger is not None and um.trigger[0] == "images" and um.trigger[1].is_dir() and num_classes is not None:
        problem = image_folder_problem(um.trigger[1], num_classes)
        if problem is not None:
            raise fail(f"{key}.trigger.images", f"{um.trigger[1]}: {problem}")
    if um.trigger is not None and um.trigger[0] == "attack":
        try:
            attack = ATTACKS.create(um.trigger[1], target=um.target, **um.trigger[2])
            if image_side is not None:
                attack.check_image_shape((3, image_side, image_side))
        except ParameterError as e:
            raise fail(f"{key}.trigger.params.{e.param}", e.detail) from None
        except (ValueError, TypeError) as e:
            raise fail(f"{key}.trigger.params", str(e).removeprefix(f"{um.trigger[1]}: ")) from None


def tensor_file_problem(path: Path, num_classes: int | None, image_side: int | None,
                        target: Any = None) -> str | None:
    """Why a supplied image file (``x`` uint8 [N, C, H, W], ``y`` [N]) cannot be used, or None: no images, images
    of another size than the dataset's, a label outside the classes, or (triggered test images, ``target`` given)
    only images of the all-to-one target class, which are dropped. Read whole at load (labels decide
    allocations and indexing later)."""
    tensors = read_tensors(path)
    x, y = tensors["x"], tensors["y"]
    if len(x) == 0:
        return "holds no images; expected at least one"
    if image_side is not None and tuple(x.shape[2:]) != (image_side, image_side):
        return f"images are {x.shape[2]}x{x.shape[3]} pixels; expected the dataset's {image_side}x{image_side}"
    if y.is_floating_point() or y.dtype == torch.bool:
        return f"labels y are {str(y.dtype).removeprefix('torch.')}; expected integer class indices"
    classes = num_classes or 10
    if int(y.min()) < 0 or int(y.max()) >= classes:
        bad = int(y.min()) if int(y.min()) < 0 else int(y.max())
        return f"label {bad} is not allowed; expected class indices 0..{classes - 1}"
    if target is not None and not is_all_to_all(target) and bool((y == int(target)).all()):
        return f"holds images of the target class {target} only (they are dropped); expected images of other classes"
    return None


def weights_problem(state: dict, mapping: dict[str, str], ours: dict) -> str | None:
    """Why the checkpoint's tensors cannot be the weights (None when they can): a floating-point weight stored as
    integers or booleans (a cast or a wrong file: all-zero int64 weights score as a model predicting one class),
    or a weight holding NaN or infinity."""
    for our_name, their_name in mapping.items():
        tensor, expected = state[their_name], ours[our_name]
        if expected.is_floating_point() and not tensor.is_floating_point():
            return (f"tensor {their_name!r} is {str(tensor.dtype).removeprefix('torch.')}; expected floating-point "
                    f"weights ({str(expected.dtype).removeprefix('torch.')})")
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return f"tensor {their_name!r} holds NaN or infinite values; expected finite weights"
    return None
