"""Parameter checks shared by every method, model and dataset: one clear error per bad value.

``ParameterError`` (a ValueError) carries the owner (``blended``), the parameter (``alpha``), the bad value and
what is allowed, so the matrix loader can name the file and key in front of it. ``check_annotated`` checks
given keyword arguments against the simple annotations of a signature (int, float, str, bool, None and
unions of them; bools are not numbers); the range helpers check what a type cannot say. They only check:
a valid value is returned unchanged, never converted.
"""
from __future__ import annotations

import functools
import inspect
import math
import numbers
import os
import types
import typing
from typing import Any, Callable

_SIMPLE = (int, float, str, bool, type(None))
_DESCRIBE = {int: "an integer", float: "a number", str: "a string", bool: "true or false", type(None): "null"}


class ParameterError(ValueError):
    """A parameter value that is not allowed; ``str`` reads ``owner: param: value is not allowed; expected ...``."""

    def __init__(self, owner: str, param: str, value: Any, allowed: str):
        self.owner, self.param, self.value, self.allowed = owner, param, value, allowed
        super().__init__(f"{owner}: {param}: {self.detail}")

    @property
    def detail(self) -> str:
        return f"{self.value!r} is not allowed; expected {self.allowed}"


def is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def is_finite_number(value: Any) -> bool:
    """A number (not a bool) that is neither NaN nor infinite."""
    return is_number(value) and math.isfinite(value)


def _matches(value: Any, kind: type) -> bool:
    if kind is int:
        return is_int(value)
    if kind is float:
        return is_finite_number(value)
    if kind is bool:
        return isinstance(value, bool)
    if kind is str:
        return isinstance(value, (str, os.PathLike))  # a path is fine where a file name is meant
    return isinstance(value, kind)


def _simple_kinds(annotation: Any) -> tuple[type, ...] | None:
    """The simple types an annotation allows, or None when it is not made only of simple types."""
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    kinds = typing.get_args(annotation) if union else (annotation,)
    return tuple(kinds) if kinds and all(k in _SIMPLE for k in kinds) else None


@functools.lru_cache(maxsize=None)
def _hints(func: Callable) -> dict[str, Any]:
    try:
        return typing.get_type_hints(func)
    except Exception:  # an annotation that cannot be resolved is not checked
        return {}


def check_annotated(owner: str, func: Callable, args: tuple = (), kwargs: dict[str, Any] | None = None) -> None:
    """Check each given argument against ``func``'s annotation where it is made of simple types."""
    hints = _hints(func)
    try:
        bound = inspect.signature(func).bind_partial(*args, **(kwargs or {})).arguments
    except TypeError:
        return  # a wrong call is reported by the call itself
    for name, value in bound.items():
        kinds = _simple_kinds(hints.get(name))
        if kinds is not None and not any(_matches(value, k) for k in kinds):
            raise ParameterError(owner, name, value, " or ".join(_describe(k, value) for k in kinds))


def _describe(kind: type, value: Any) -> str:
    """What a simple type allows, in words; "a finite number" where the value is a number that is not."""
    return "a finite number" if kind is float and is_number(value) else _DESCRIBE[kind]


def check_int(owner: str, name: str, value: Any, minimum: int | None = None, optional: bool = False) -> None:
    """An integer (not a bool) >= ``minimum``; None too when ``optional``."""
    if optional and value is None:
        return
    if not is_int(value) or (minimum is not None and value < minimum):
        allowed = "an integer" + (f" >= {minimum}" if minimum is not None else "")
        raise ParameterError(owner, name, value, allowed + (" or null" if optional else ""))


def check_number(owner: str, name: str, value: Any, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False, optional: bool = False) -> None:
    """A finite number (not a bool, NaN or infinity) in the interval given by ``low``/``high`` (open ends where
    said)."""
    if optional and value is None:
        return
    ok = is_finite_number(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        number = "a finite number" if is_number(value) and not math.isfinite(value) else "a number"
        raise ParameterError(owner, name, value, number + _interval(low, high, low_open, high_open)
                             + (" or null" if optional else ""))


def _interval(low, high, low_open, high_open) -> str:
    if low is not None and high is not None:
        return f" in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if low is not None:
        return f" {'>' if low_open else '>='} {low:g}"
    if high is not None:
        return f" {'<' if high_open else '<='} {high:g}"
    return ""
