"""Mutants: deliberately broken versions of a method, declared in the method's own file.

A method (attack, defense or detector) lists, as its class attribute ``mutants``, versions of itself that break what
makes it the method (FP prunes no channel, SIG's amplitude is 0, ...). Each is a textual edit of the method's
source file: ``find`` must occur exactly once in that file and is replaced by ``replace``. Every method also
gets a do-nothing mutant from its family (``do_nothing``): a defense that returns the backdoored model
untouched and flags nothing; an attack whose trigger returns the images unchanged (and, for a
training-controllable attack, whose training hooks do nothing); a detector that scores everything 0 and flags
nothing.

The mutation runner (``backdoor mutate``) applies each mutant to a temporary copy of the checkout, runs the
tests that should catch it (``mutation_tests`` of the method; default ``tests/test_<name>.py``) and reports
which test failed. A method whose mutant survives is not done.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path

DO_NOTHING = "do-nothing"


@dataclass(frozen=True)
class Mutant:
    """One broken version of a method: replace ``find`` (exactly once in the method's file) by ``replace``,
    or, with ``find`` empty, append ``replace`` to the file. ``breaks`` says what it breaks, in words."""

    name: str
    breaks: str
    find: str
    replace: str

    def apply(self, source: str, path: str = "<source>") -> str:
        """The mutated source; raises ``ValueError`` when ``find`` does not occur exactly once."""
        if not self.find:
            return source.rstrip("\n") + "\n\n\n" + self.replace.strip("\n") + "\n"
        count = source.count(self.find)
        if count != 1:
            raise ValueError(f"mutant {self.name!r}: its find text occurs {count} times in {path} (must be once): "
                             f"{self.find!r}")
        return source.replace(self.find, self.replace)


_DEFENSE_DO_NOTHING = """
# -- mutant {name}: {breaks}
import torch as _mutant_torch
from backdoor.defenses.base import DefenseOutcome as _MutantOutcome


def _mutant_run(self, inputs):
    poisoned = inputs.poisoned_train
    flagged = None if poisoned is None else _mutant_torch.zeros(len(poisoned), dtype=_mutant_torch.bool)
    return _MutantOutcome(model=inputs.model, flagged=flagged)


{cls}.run = _mutant_run
"""

_DETECTOR_DO_NOTHING = """
# -- mutant {name}: {breaks}
import torch as _mutant_torch
from backdoor.detectors.base import DataDetection as _MutantDetection, InputScreen as _MutantScreen
from backdoor.detectors.base import ModelVerdict as _MutantVerdict


class _MutantBlindScreen(_MutantScreen):
    threshold = 0.0

    def scores(self, x):
        return _MutantTorch_zeros(len(x))


def _MutantTorch_zeros(n):
    return _mutant_torch.zeros(n, dtype=_mutant_torch.float32)


def _mutant_calibrate(self, inputs):
    return _MutantBlindScreen()


def _mutant_detect(self, inputs):
    n = len(inputs.poisoned_train)
    return _MutantDetection(_mutant_torch.zeros(n, dtype=_mutant_torch.bool), _MutantTorch_zeros(n))


def _mutant_inspect(self, inputs):
    return _MutantVerdict(0.0, False)


{cls}.calibrate = _mutant_calibrate
{cls}.detect = _mutant_detect
{cls}.inspect = _mutant_inspect
"""

_ATTACK_DO_NOTHING = """
# -- mutant {name}: {breaks}
def _mutant_identity(self, x, *args, **kwargs):
    return x.clone()


def _mutant_no_hooks(self, *args, **kwargs):
    return None


{cls}.apply_trigger = _mutant_identity
{cls}.poison_images = _mutant_identity
{cls}.train_hooks = _mutant_no_hooks
"""


def source_file(method: type) -> Path:
    return Path(inspect.getfile(method))


def family(method: type) -> str:
    """``attack``, ``defense`` or ``detector``, by the method's base class."""
    names = {klass.__name__ for klass in method.__mro__}
    if "Detector" in names:
        return "detector"
    if "Defense" in names:
        return "defense"
    if "Attack" in names:
        return "attack"
    raise TypeError(f"{method.__name__} is neither an Attack, a Defense nor a Detector")


def do_nothing(method: type) -> Mutant:
    """The family's do-nothing mutant of ``method``, appended to its file."""
    if family(method) == "defense":
        breaks = "returns the backdoored model untouched and flags nothing"
        template = _DEFENSE_DO_NOTHING
    elif family(method) == "detector":
        breaks = "scores every input, sample and model 0 and flags nothing"
        template = _DETECTOR_DO_NOTHING
    else:
        breaks = "the trigger returns the images unchanged; training hooks do nothing"
        template = _ATTACK_DO_NOTHING
    return Mutant(DO_NOTHING, breaks, "", template.format(name=DO_NOTHING, breaks=breaks, cls=method.__name__))


def mutants_of(method: type) -> tuple[Mutant, ...]:
    """The do-nothing mutant, then the method's own."""
    return (do_nothing(method), *getattr(method, "mutants", ()))


def tests_of(method: type) -> tuple[str, ...]:
    """The test files that should catch the method's mutants (paths relative to the checkout); a detector's
    default is ``tests/test_detect_<name>.py`` (its name may be a defense's too)."""
    default = f"tests/test_detect_{method.name}.py" if family(method) == "detector" else f"tests/test_{method.name}.py"
    return tuple(getattr(method, "mutation_tests", ()) or (default,))
