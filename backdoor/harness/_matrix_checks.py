"""What ``backdoor.harness.matrix`` checks beyond names and keys: duplicate YAML keys, the results folder name, the
types of training budgets, and every value of every dataset, model, attack and defense.

The values are checked by building each object at load, cheaply: datasets run their ``check`` (parameters
and files, nothing decoded but small image trees), models are constructed (no training), attacks and
defenses are constructed (their constructors check their own parameters) and attacks see the image shape.
Every error becomes one message ``<file>: <key>: <bad value> ... <what is allowed>`` through ``fail``.
"""
from __future__ import annotations

from typing import Any, Callable

import yaml

from backdoor._checks import ParameterError, is_int, is_number
from backdoor.attacks import ATTACKS
from backdoor.data import DatasetNotFoundError, check_dataset, num_classes_of
from backdoor.defenses import DEFENSES
from backdoor.detectors import DETECTORS
from backdoor.models import create_model

Fail = Callable[[str, str], Exception]  # (key, message) -> the error to raise


MAX_YAML_NODES = 100_000  # values of a matrix once its aliases are expanded (an alias bomb asks for billions)
MERGE_TAG = "tag:yaml.org,2002:merge"


class UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader, except that a mapping naming one key twice is an error (not last-one-wins); keys
    merged in with ``<<:`` may be overridden, as YAML says."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            if key_node.tag == MERGE_TAG:
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: PyYAML's own error follows
                break
            if first is not None:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first at line {first.line + 1})", key_node.start_mark)
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


def expanded_size(node: yaml.Node, limit: int) -> int:
    """How many values ``node`` stands for once every alias is expanded (counted in linear time over the shared
    nodes; stops counting past ``limit``)."""
    sizes: dict[int, int] = {}

    def size(n: yaml.Node) -> int:
        if id(n) not in sizes:
            sizes[id(n)] = limit + 1  # a recursive alias is as bad as a bomb
            children = [c for pair in n.value for c in pair] if isinstance(n, yaml.MappingNode) else \
                n.value if isinstance(n, yaml.SequenceNode) else []
            total = 1
            for child in children:
                total += size(child)
                if total > limit:
                    break
            sizes[id(n)] = total
        return sizes[id(n)]

    return size(node)


def load_yaml(text: str):
    """The matrix's YAML through ``UniqueKeyLoader``, refusing before construction a document that stands for
    more than ``MAX_YAML_NODES`` values (an alias bomb would take minutes and all memory to expand)."""
    loader = UniqueKeyLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        count = expanded_size(node, MAX_YAML_NODES)
        if count > MAX_YAML_NODES:
            raise yaml.YAMLError(f"the document expands to more than {MAX_YAML_NODES} values (aliases included); "
                                 "expected a matrix of ordinary size")
        return loader.construct_document(node)
    finally:
        loader.dispose()


NAME_LENGTH = 100  # characters of a results folder or user model name (file systems allow 255 bytes)
NAME_FORBIDDEN = '/\\:*?"<>|~'


def check_folder_name(name: Any, fail: Fail, key: str = "name") -> str:
    """A results folder name: one plain path component that every file system accepts, so records stay inside
    the results root: printable, at most ``NAME_LENGTH`` characters, none of ``NAME_FORBIDDEN``."""
    plain = (isinstance(name, str) and name.strip() == name and name not in ("", ".", "..")
             and not name.startswith(".") and name.isprintable() and len(name) <= NAME_LENGTH
             and not any(c in name for c in NAME_FORBIDDEN))
    if not plain:
        raise fail(key, f"{name!r} is not allowed; expected a plain folder name of at most {NAME_LENGTH} printable "
                        f"characters, none of {' '.join(NAME_FORBIDDEN)} (and not a leading '.', '.' or '..')")
    return name


_KINDS = {"int": (is_int, "an integer"), "number": (is_number, "a number"),
          "str": (lambda v: isinstance(v, str), "a string"), "bool": (lambda v: isinstance(v, bool), "true or false")}
TRAIN_TYPES = {"epochs": "int", "batch_size": "int", "crop_padding": "int", "lr": "number", "momentum": "number",
               "weight_decay": "number", "schedule": "str", "hflip": "bool", "amp": "bool",
               "clean_fraction": "number"}


def check_train_types(key: str, value: dict, fail: Fail) -> None:
    """Types of a training budget's values (bools are not numbers); the matrix checks the ranges."""
    for name, v in value.items():
        if name in TRAIN_TYPES:
            ok, allowed = _KINDS[TRAIN_TYPES[name]]
            if not ok(v):
                raise fail(f"{key}.{name}", f"{v!r} is not allowed; expected {allowed}")


def _convert(fail: Fail, key: str, owner: str, build: Callable[[], Any]) -> Any:
    """Run ``build``; its ParameterError, ValueError, TypeError or OSError becomes one ``fail`` message."""
    try:
        return build()
    except ParameterError as e:
        raise fail(f"{key}.{e.param}", e.detail) from None
    except (ValueError, TypeError, OSError) as e:
        message = str(e).removeprefix(f"{owner}: ")
        raise fail(key, message) from None


def build_all(datasets: dict[str, dict], models: dict[str, dict], attacks: dict[str, dict],
              defenses: dict[str, dict], target: int, fail: Fail, check_data: bool = True,
              detectors: dict[str, dict] | None = None) -> dict[str, int | None]:
    """Check every dataset (its files too with ``check_data``), then build every model, attack (with the
    matrix's ``target``; ``attacks`` as the cases carry them) and defense. Returns each dataset's image side
    (None where only loading can tell)."""
    errors: list[Exception] = []

    def check(key: str, owner: str, build: Callable[[], Any]) -> Any:
        """``_convert``, keeping its error in ``errors`` (None then) so that every object is checked."""
        try:
            return _convert(fail, key, owner, build)
        except ValueError as e:  # what ``fail`` made: _convert turns every ValueError into one
            errors.append(e)
            return None

    shapes = {}
    for name, params in datasets.items():
        shapes[name] = check(f"datasets.{name}", name, lambda: _dataset_side(name, params, check_data))
    _raise_collected(errors)  # models are built for the datasets' class count, which a bad dataset cannot give
    classes = [num_classes_of(name, params) or 10 for name, params in datasets.items()]
    for name, params in models.items():
        check(f"models.{name}", name, lambda: create_model(name, num_classes=max(classes), **params))
    for name, params in attacks.items():
        attack = check(f"attacks.{name}", name, lambda: ATTACKS.create(name, target=target, **params))
        for side in shapes.values():
            if side is not None and attack is not None:
                check(f"attacks.{name}", name, lambda: attack.check_image_shape((3, side, side)))
    for name, params in defenses.items():
        check(f"defenses.{name}", name, lambda: DEFENSES.create(name, **params))
    for name, params in (detectors or {}).items():
        check(f"detectors.{name}", name, lambda: DETECTORS.create(name, **params))
    _raise_collected(errors)
    return shapes


def _raise_collected(errors: list[Exception]) -> None:
    """The errors ``fail`` made, raised as one of its kind, one per line (the matrix keeps each line)."""
    if errors:
        raise type(errors[0])("\n".join(str(e) for e in errors))


def _dataset_side(name: str, params: dict, check_data: bool) -> int | None:
    try:
        return check_dataset(name, params)
    except DatasetNotFoundError:
        if check_data:
            raise
        return None
