"""A small named registry shared by datasets, models, attacks and defenses (after timm's)."""
from __future__ import annotations

import fnmatch
import functools
import importlib
import inspect
import pkgutil
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Generic, TypeVar

from backdoor._checks import check_annotated

T = TypeVar("T")

NONE = "—"  # a source that gives no value
NOT_STATED = "not stated"  # a source whose value the docstrings do not quote
UNARGUED = inspect.Parameter.empty


@dataclass(frozen=True)
class Param:
    """What a method's file declares about one of its parameters (``backdoor params`` renders the table).

    paper: BackdoorBench's supplementary Tables 1-2; reference: the public BackdoorBench code; why: where our
    default differs, the reason, else where it comes from. ``argued``: the default the why argues for, where
    it argues for one, so that a changed default fails the tests until its why is revisited."""

    paper: str
    reference: str
    why: str
    argued: Any = UNARGUED


class UnknownNameError(KeyError):
    """Raised for a name that is not registered; the message lists what is allowed."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class Registry(Generic[T]):
    """Maps names to factories. ``create`` drops None keyword arguments so a gap never overrides a default."""

    def __init__(self, family: str, package: str | None = None):
        self.family = family
        self._package = package  # modules under it are imported on first use
        self._entries: dict[str, Callable[..., T]] = {}
        self._loaded = package is None

    def register(self, name: str | None = None) -> Callable[[Callable[..., T]], Callable[..., T]]:
        def decorator(factory: Callable[..., T]) -> Callable[..., T]:
            key = name or getattr(factory, "name", None) or factory.__name__
            if key in self._entries and self._entries[key] is not factory:
                raise ValueError(f"{self.family} {key!r} is registered twice")
            if isinstance(factory, type):
                factory.name = key  # the registered name is the class's name in messages and records
            self._entries[key] = factory
            return factory

        return decorator

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        package = importlib.import_module(self._package)
        for module in sorted(m.name for m in pkgutil.iter_modules(package.__path__)):
            if not module.startswith("_"):
                importlib.import_module(f"{self._package}.{module}")

    def names(self, pattern: str = "*") -> list[str]:
        """Sorted registered names matching a shell wildcard."""
        self._load()
        return sorted(n for n in self._entries if fnmatch.fnmatchcase(n, pattern))

    def get(self, name: str) -> Callable[..., T]:
        self._load()
        if name not in self._entries:
            raise UnknownNameError(
                f"unknown {self.family} {name!r}; registered: {', '.join(self.names())}"
            )
        return self._entries[name]

    def create(self, name: str, **kwargs: Any) -> T:
        """Call the factory; a function factory's simply-annotated arguments are type-checked first
        (``ParameterError``); classes check their own (``Method``)."""
        factory = self.get(name)
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        if not isinstance(factory, type):
            check_annotated(name, factory, kwargs=kwargs)
        return factory(**kwargs)

    def order(self) -> list[str]:
        """Registered names in display order: each class's ``order``, then its name (undeclared last)."""
        return sorted(self.names(), key=lambda n: (_display_order(self.get(n)), n))

    def title(self, name: str) -> str:
        """The name's title in tables; the raw name for a name that is not registered or declares none."""
        return (getattr(self.get(name), "title", None) or name) if name in self else name

    def __contains__(self, name: str) -> bool:
        self._load()
        return name in self._entries

    def expand(self, patterns: list[str]) -> list[str]:
        """Expand wildcard patterns into names, keeping first-seen order; an unmatched pattern is an error."""
        out: list[str] = []
        for pattern in patterns:
            matched = self.names(pattern)
            if not matched:
                raise UnknownNameError(
                    f"{self.family} {pattern!r} matches nothing; registered: {', '.join(self.names())}"
                )
            out.extend(m for m in matched if m not in out)
        return out


def _display_order(factory: Callable) -> float:
    order = getattr(factory, "order", None)
    return float("inf") if order is None else order


class Method:
    """What attacks and defenses share: a one-line summary (first docstring line) and their parameters,
    read from the keyword parameters of every ``__init__`` in the class hierarchy.

    Each method's file declares its metadata on the class: ``title`` (its name in tables), ``description``
    (what it does, with its paper defaults, for the methods table of docs/methods.md), ``order`` (its place in
    tables and figures) and ``parameters`` (a ``Param`` for every keyword parameter of its ``__init__``);
    ``backdoor params`` reports what is missing.

    Every ``__init__`` a subclass defines is wrapped to check its arguments against their simple annotations
    first (``int``, ``float``, ``str``, ``bool``, None; bools are not numbers), raising ``ParameterError``;
    range checks are each method's own.
    """

    title: ClassVar[str | None] = None
    description: ClassVar[str | None] = None
    order: ClassVar[int | None] = None
    parameters: ClassVar[dict[str, Param]] = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "__init__" in vars(cls):
            cls.__init__ = _type_checked(cls.__init__)

    @classmethod
    def summary(cls) -> str:
        return (cls.__doc__ or "").strip().splitlines()[0]

    @classmethod
    def param_names(cls) -> list[str]:
        names: list[str] = []
        for klass in reversed(cls.__mro__[:-1]):  # not object
            if "__init__" in vars(klass):
                names += [p.name for p in inspect.signature(klass.__init__).parameters.values()
                          if p.name != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        return list(dict.fromkeys(names))

    def params(self) -> dict[str, Any]:
        """The parameters that define this method (recorded, and part of every cache key)."""
        return {n: getattr(self, n) for n in self.param_names()}


def _type_checked(init: Callable) -> Callable:
    @functools.wraps(init)
    def checked(self, *args, **kwargs):
        check_annotated(getattr(type(self), "name", type(self).__name__), init, (self, *args), kwargs)
        init(self, *args, **kwargs)

    return checked
