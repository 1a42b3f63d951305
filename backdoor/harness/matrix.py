"""Declarative grid matrices (YAML): load, validate, expand into cases.

A matrix names its axes (datasets, models, attacks, defenses, poison ratios, seeds), the training budgets
and, optionally, regression expectations. Everything is validated on load, before any training: an unknown
name, key or parameter, a ratio outside (0, 1], a target outside the dataset, malformed YAML or a key given twice
raises ``MatrixError`` naming the file, the key, the bad value and what is allowed. Every dataset, model, attack
and defense is also built at load, cheaply (``backdoor.harness._matrix_checks``), so a bad parameter value stops the
matrix there too. Expansion is deterministic
(axis order as written; no sets), so every pytest-xdist worker collects the same cases in the same order.
"""
from __future__ import annotations

import difflib
import fnmatch
import hashlib
import inspect
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from backdoor._checks import ParameterError, check_number, is_int
from backdoor.harness._matrix_checks import build_all, check_folder_name, check_train_types, load_yaml
from backdoor._registry import Registry, UnknownNameError
from backdoor.attacks import ATTACKS
from backdoor.data import DATASETS, num_classes_of, test_classes_of
from backdoor.harness.expectations import Regression, RegressionError, parse_regression
from backdoor.defenses import DEFENSES
from backdoor.models import MODELS
from backdoor.detectors import DETECTORS
from backdoor.harness.case import CLEAN, Case, detection_label
from backdoor.targets import is_all_to_all, target_problem
from backdoor.training import TrainConfig
from backdoor.checkpoints.user_models import UserModel
from backdoor.harness.user_model_checks import check_user_model, is_user_entry, parse_user_model

TOP_LEVEL_KEYS = {
    "name": "results folder name (default: the file's stem)",
    "description": "free text",
    "datasets": "dataset names, or name -> parameters",
    "models": "model names, or name -> parameters; or a label -> {checkpoint: ..., arch: ...} for a model you bring "
              "(backdoor.checkpoints.user_models)",
    "attacks": "attack names (wildcards allowed), or name -> parameter overrides (and an optional training budget "
               "`training: {...}` and poison ratios `poison_ratios: [...]` of its own)",
    "defenses": "defense names (wildcards allowed), or name -> parameter overrides; 'none' is no defense; an entry's "
                "`against: [attacks]` runs it against those of the matrix's attacks only (default: all)",
    "detectors": "detector names (wildcards allowed), or name -> parameter overrides, each run on the models of the "
                 "grid (input-level and data-side: every backdoored model; model-level and data-side also the clean "
                 "reference models); an entry's `against: [attacks]` as for defenses",
    "population": "model-level detection over a population: {clean_seeds: n or [seeds]}, further seeds on which only "
                  "the clean reference model is trained and inspected by the model-level detectors (the matrix's "
                  "seeds give the backdoored models)",
    "poison_ratios": "poison ratios in (0, 1] (an attack's own `poison_ratios` replaces them for that attack)",
    "seeds": "integer seeds, or a count n meaning seeds 0..n-1",
    "target": "target class (all-to-one), or all-to-all (y -> (y + 1) mod K); default 0",
    "cap_ratio": "clean-label attacks: cap an infeasible ratio to the largest feasible one (default false)",
    "reference": "add a clean reference model row per dataset/model/seed (default true)",
    "benign": "the benign condition: also run the defenses (true: all of them, or a list) on the clean reference "
              "model (default false)",
    "training": "attack training budget: " + ", ".join(f.name for f in fields(TrainConfig)),
    "defense_training": "defense budget: the training keys plus clean_fraction",
    "expected": "file (relative to the matrix) of calibrated regression bands (backdoor expect --calibrate)",
    "regression": "regression policy: calibrate (numerics variant -> seeds) and checks (attack/defense -> metric -> "
                  "band, off or a claim such as '<= 0.3')",
}


# training key -> (kind, low, low open, high, high open): the values a budget allows (integers: >= low)
TRAIN_RANGES = {"epochs": ("int", 1, False, None, False), "batch_size": ("int", 1, False, None, False),
                "crop_padding": ("int", 0, False, None, False),  # and at most the image side (_check_crop_padding)
                "lr": ("number", 0, True, None, False), "momentum": ("number", 0, False, 1, True),
                "weight_decay": ("number", 0, False, None, False), "clean_fraction": ("number", 0, True, 1, False)}


MAX_SEEDS = 1000  # seeds of one matrix (a count of 10^8 once built 3 x 10^8 cases before anything ran)
MAX_CASES = 100_000  # cases of one matrix, counted before they are built


class MatrixError(ValueError):
    """An invalid matrix; the message names the file, the key, the bad value and what is allowed."""


@dataclass(frozen=True)
class Matrix:
    path: Path
    name: str
    description: str
    datasets: dict[str, dict]
    models: dict[str, dict]
    attacks: dict[str, dict]
    defenses: dict[str, dict]
    poison_ratios: list[float]
    seeds: list[int]
    target: int | str  # a class index, or "all-to-all"
    cap_ratio: bool
    reference: bool
    training: TrainConfig
    defense_training: TrainConfig
    clean_fraction: float
    attack_training: dict[str, TrainConfig]
    expected_path: Path | None
    digest: str = field(default="")
    regression: Regression = field(default_factory=Regression)
    user_models: dict[str, UserModel] = field(default_factory=dict)
    benign: tuple[str, ...] = ()  # defenses also run on the clean reference model (the benign condition)
    against: dict[str, tuple[str, ...]] = field(default_factory=dict)  # defense -> the attacks it runs against
    attack_ratios: dict[str, list[float]] = field(default_factory=dict)  # attack -> its own poison ratios
    detectors: dict[str, dict] = field(default_factory=dict)  # detector -> parameters
    detector_against: dict[str, tuple[str, ...]] = field(default_factory=dict)  # detector -> the attacks it runs against
    clean_seeds: tuple[int, ...] = ()  # population: seeds with only the clean reference model (and its detectors)

    def ratios_of(self, attack: str) -> list[float]:
        """The poison ratios this attack runs at: its own (``attacks.<name>.poison_ratios``) or the matrix's."""
        return self.attack_ratios.get(attack, self.poison_ratios)

    def all_ratios(self) -> list[float]:
        """Every ratio some attack runs at: the matrix's in order, then the attacks' own in order of first use."""
        out = list(self.poison_ratios)
        for attack in self.attacks:
            out += [r for r in self.ratios_of(attack) if r not in out]
        return out

    def runs_against(self, defense: str, attack: str) -> bool:
        """Whether the grid pairs this defense with this attack (an entry's ``against``; default every attack)."""
        return attack in self.against.get(defense, (attack,))

    def detects(self, detector: str, attack: str) -> bool:
        """Whether the grid runs this detector on this attack's models (``clean``: the reference models, which
        model-level and data-side detectors inspect as the negatives of their task)."""
        if attack == CLEAN:
            return DETECTORS.get(detector).task in ("model", "data")
        return attack in self.detector_against.get(detector, (attack,))

    def population_seeds(self) -> list[int]:
        """The population's further clean seeds: ``population.clean_seeds`` less the matrix's seeds (whose clean
        reference models are already in the grid)."""
        return [s for s in self.clean_seeds if s not in self.seeds]

    def _detection_cases(self, attack: str, tasks: tuple[str, ...] = ("input", "data", "model"),
                         **fields) -> list[Case]:
        return [Case(attack=attack, defense=detection_label(d), detector=d, detector_params=params, **fields)
                for d, params in self.detectors.items() if self.detects(d, attack) and DETECTORS.get(d).task in tasks]

    def cases(self) -> list[Case]:
        """Every case of the grid, reference rows first within each dataset/model/seed; then, per dataset, each
        user model's cases (seed x defense)."""
        out: list[Case] = []
        common = dict(matrix=self.name, target=self.target, defense_training=self.defense_training,
                      clean_fraction=self.clean_fraction, matrix_hash=self.digest)
        for dataset, dparams in self.datasets.items():
            for model, mparams in self.models.items():
                for seed in self.seeds:
                    base = dict(common, dataset=dataset, model=model, seed=seed, dataset_params=dparams,
                                model_params=mparams)
                    if self.reference:
                        out.append(Case(attack=CLEAN, defense="none", ratio=0.0, training=self.training, **base))
                        for defense in self.benign:  # the same clean model, defended: what a defense costs
                            out.append(Case(attack=CLEAN, defense=defense, ratio=0.0, training=self.training,
                                            defense_params=self.defenses[defense], **base))
                        out += self._detection_cases(CLEAN, ratio=0.0, training=self.training, **base)
                    for ratio in self.all_ratios():
                        for attack, aparams in self.attacks.items():
                            if ratio not in self.ratios_of(attack):
                                continue
                            aparams = self._attack_params(attack, aparams)
                            training = self.attack_training.get(attack, self.training)
                            for defense, fparams in self.defenses.items():
                                if self.runs_against(defense, attack):
                                    out.append(Case(attack=attack, defense=defense, ratio=ratio,
                                                    attack_params=aparams, defense_params=fparams,
                                                    training=training, **base))
                            out += self._detection_cases(attack, ratio=ratio, attack_params=aparams,
                                                         training=training, **base)
                for seed in self.population_seeds():  # the population's further clean models
                    base = dict(common, dataset=dataset, model=model, seed=seed, dataset_params=dparams,
                                model_params=mparams)
                    out.append(Case(attack=CLEAN, defense="none", ratio=0.0, training=self.training, **base))
                    out += self._detection_cases(CLEAN, ("model",), ratio=0.0, training=self.training, **base)
            for um in self.user_models.values():
                if um.dataset != dataset:
                    continue
                trigger = um.trigger if um.trigger is not None and um.trigger[0] == "attack" else None
                for seed in self.seeds:
                    for defense, fparams in self.defenses.items():
                        out.append(Case(**dict(common, target=um.target), dataset=dataset, model=um.arch, seed=seed,
                                        dataset_params=dparams, model_params=um.arch_params,
                                        attack=um.trigger_token, attack_params=dict(trigger[2]) if trigger else {},
                                        defense=defense, defense_params=fparams, ratio=0.0, training=self.training,
                                        user_model=um))
        return out

    def _attack_params(self, attack: str, params: dict) -> dict:
        if self.cap_ratio and "cap_ratio" not in params:
            return {**params, "cap_ratio": True}
        return params


def _fail(path: Path, key: str, message: str) -> MatrixError:
    return MatrixError(f"{path}: {key}: {message}")


def did_you_mean(word: Any, choices) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``choices`` to a misspelt ``word``, else nothing."""
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _raise_all(messages: list[MatrixError], partial: Any = None) -> None:
    """Raise a section's problems together, one per line; ``partial`` is what of the section is valid, which
    ``Problems.attempt`` goes on with, so that the values of its valid entries are checked too."""
    if messages:
        error = MatrixError("\n".join(str(m) for m in messages))
        error.partial = partial
        raise error


def _allowed_params(factory, reserved: set[str]) -> set[str] | None:
    """Keyword parameters a factory or class accepts (None = anything), less those the harness sets."""
    if hasattr(factory, "param_names"):
        return set(factory.param_names()) - reserved
    params = inspect.signature(factory).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return None
    return set(params) - reserved


def _named_axis(path: Path, key: str, value: Any, registry: Registry, glob: bool,
                reserved: frozenset[str] = frozenset()) -> dict[str, dict]:
    if value is None or value == [] or value == {}:
        raise _fail(path, key, f"must name at least one of: {', '.join(registry.names())}")
    if isinstance(value, str):
        value = [value]
    if isinstance(value, list):
        value = {v: {} for v in value} if all(isinstance(v, str) for v in value) else value
    if not isinstance(value, dict):
        raise _fail(path, key, f"expected a list of names or a mapping name -> parameters, got {value!r}")
    out: dict[str, dict] = {}
    problems: list[MatrixError] = []
    for pattern, params in value.items():
        params = {} if params is None else params
        if not isinstance(params, dict):
            problems.append(_fail(path, f"{key}.{pattern}", f"parameters must be a mapping, got {params!r}"))
            continue
        try:
            names = registry.expand([str(pattern)]) if glob else [registry.get(str(pattern)) and str(pattern)]
        except UnknownNameError:
            problems.append(_fail(path, key, f"{pattern!r} is not a registered {registry.family}"
                                             f"{did_you_mean(pattern, registry.names())}; "
                                             f"allowed: {', '.join(registry.names())}"))
            continue
        for name in names:
            if name in out:
                problems.append(_fail(path, f"{key}.{pattern}", f"names {name!r} again (an earlier entry already "
                                                                "does); expected each name once, by one entry or one "
                                                                "wildcard"))
                continue
            allowed = _allowed_params(registry.get(name), set(reserved))
            unknown = sorted(set(params) - allowed) if allowed is not None else []
            if unknown:
                problems.append(_fail(path, f"{key}.{name}", f"unknown parameter(s) {unknown}"
                                                             f"{_hints(unknown, allowed)}; allowed: {sorted(allowed)}"))
                continue
            out[name] = dict(params)
    _raise_all(problems, partial=out)
    return out


def _hints(unknown: list[str], allowed) -> str:
    """Did-you-mean for each unknown name that resembles an allowed one."""
    return "".join(did_you_mean(u, allowed).replace(" (did", f" ({u!r}: did") for u in unknown
                   if did_you_mean(u, allowed))


def _train_config(path: Path, key: str, value: Any, base: TrainConfig, extra: set[str]) -> tuple[TrainConfig, dict]:
    value = value or {}
    if not isinstance(value, dict):
        raise _fail(path, key, f"expected a mapping, got {value!r}")
    allowed = {f.name for f in fields(TrainConfig)} | extra
    unknown = sorted(set(value) - allowed)
    problems = [_fail(path, key, f"unknown key(s) {unknown}{_hints(unknown, allowed)}; allowed: {sorted(allowed)}")
                ] if unknown else []
    for name in value:
        try:
            _check_train_value(path, key, name, value[name])
        except MatrixError as e:
            problems.append(e)
    _raise_all(problems)
    rest = {k: value[k] for k in extra if k in value}
    return base.with_(**{k: v for k, v in value.items() if k not in extra}), rest


def _check_train_value(path: Path, key: str, name: str, value: Any) -> None:
    """One value of a training budget: its type, then its range."""
    check_train_types(key, {name: value}, lambda k, message: _fail(path, k, message))
    if name in TRAIN_RANGES:
        kind, low, low_open, high, high_open = TRAIN_RANGES[name]
        if kind == "int" and (not is_int(value) or value < low):
            allowed = "a positive integer" if low == 1 else f"an integer >= {low}"
            raise _fail(path, f"{key}.{name}", f"{value!r} is not allowed; expected {allowed}")
        try:
            if kind == "number":
                check_number(key, name, value, low, low_open=low_open, high=high, high_open=high_open)
        except ParameterError as e:
            raise _fail(path, f"{key}.{name}", e.detail) from None
    if name == "schedule" and value not in SCHEDULES:
        raise _fail(path, f"{key}.schedule", f"{value!r} is not allowed{did_you_mean(value, SCHEDULES)}; expected "
                                             "cosine or constant")


SCHEDULES = ("cosine", "constant")


def _read_text(path: Path) -> str:
    """The matrix file's text: a regular file (a FIFO would block), UTF-8."""
    try:
        if not path.is_file():
            raise MatrixError(f"{path}: cannot read the matrix file (not a regular file); expected a YAML file")
        return path.read_text(encoding="utf-8")
    except OSError as e:
        raise MatrixError(f"{path}: cannot read the matrix file ({e.strerror}); expected a readable YAML file") from e
    except UnicodeDecodeError as e:
        raise MatrixError(f"{path}: cannot read the matrix file (byte {e.start} is not UTF-8: {e.reason}); expected "
                          "UTF-8 text") from None


def _parse_yaml(path: Path, text: str) -> dict:
    """The matrix as a mapping (bounded expansion, no duplicate keys: ``load_yaml``)."""
    try:
        raw = load_yaml(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise MatrixError(f"{path}: malformed YAML{where}: {problem}") from e
    if not isinstance(raw, dict):
        raise MatrixError(f"{path}: the matrix must be a mapping of keys ({', '.join(TOP_LEVEL_KEYS)}), got {raw!r}")
    return raw


def load_matrix(path: str | Path, check_data: bool = True) -> Matrix:
    """Load and validate a matrix; ``check_data=False`` skips only the check that datasets' files exist."""
    path = Path(path)
    text = _read_text(path)
    raw = _parse_yaml(path, text)
    problems = Problems()
    attempt = problems.attempt
    for key in sorted(set(raw) - set(TOP_LEVEL_KEYS), key=str):
        attempt(lambda: _raise(_fail(path, key, f"unknown key{did_you_mean(key, TOP_LEVEL_KEYS)}; allowed keys: "
                                                f"{', '.join(TOP_LEVEL_KEYS)}")))
    for required in ("datasets", "models", "defenses"):
        if required not in raw:
            attempt(lambda: _raise(_fail(path, required, f"missing ({TOP_LEVEL_KEYS[required]})")))
    missing = {k for k in ("datasets", "models", "defenses") if k not in raw}
    raw = {**raw, **{k: {} for k in missing}}  # the rest is still checked; a missing axis is said once
    datasets = {} if "datasets" in missing else attempt(
        lambda: _named_axis(path, "datasets", raw["datasets"], DATASETS, glob=False), {})
    registered_models, user_entries = _split_user_models(raw["models"])
    models = {} if registered_models is None or "models" in missing else attempt(lambda: _named_axis(
        path, "models", registered_models, MODELS, glob=False, reserved=frozenset({"num_classes", "seed"})), {})
    attempt(lambda: _attack_keys_fit_models(path, raw, grid=registered_models is not None))
    attack_entries, training_overrides = _split_attack_key(raw.get("attacks", {}), "training")
    attack_entries, ratio_overrides = _split_attack_key(attack_entries, "poison_ratios")
    attacks = attempt(lambda: _named_axis(path, "attacks", attack_entries, ATTACKS, glob=True,
                                          reserved=frozenset({"target"})), {}) if "attacks" in raw and models else {}
    defense_entries, against_entries = _split_defense_against(raw["defenses"])
    defenses = {} if "defenses" in missing else attempt(
        lambda: _named_axis(path, "defenses", defense_entries, DEFENSES, glob=True), {})
    against = attempt(lambda: _against(path, against_entries, defenses, attacks), {})
    detector_entries, detector_against_entries = _split_defense_against(raw.get("detectors", {}))
    detectors = attempt(lambda: _named_axis(path, "detectors", detector_entries, DETECTORS, glob=True),
                        {}) if "detectors" in raw else {}
    detector_against = attempt(lambda: _against(path, detector_against_entries, detectors, attacks,
                                                key="detectors"), {})
    clean_seeds = attempt(lambda: _population(path, raw, detectors), ())
    ratios = attempt(lambda: _ratios(path, raw["poison_ratios"]), []) if "poison_ratios" in raw and models else []
    seeds = attempt(lambda: parse_seeds(raw.get("seeds", [0]), lambda message: _fail(path, "seeds", message)), [0])
    target = raw.get("target", 0)
    target_ok = attempt(lambda: _check_target(path, datasets, target), False) is None
    attempt(lambda: _check_flags(path, raw))

    training = attempt(lambda: _train_config(path, "training", raw.get("training"), TrainConfig(), set())[0],
                       TrainConfig())
    attack_training = attempt(lambda: _attack_training(path, training_overrides, training), {})
    attack_ratios = attempt(lambda: _attack_ratios(path, ratio_overrides), {}) if models else {}
    defense_training, rest = attempt(lambda: _train_config(path, "defense_training", raw.get("defense_training"),
                                                           TrainConfig(batch_size=256), {"clean_fraction"}),
                                     (TrainConfig(batch_size=256), {}))
    clean_fraction = rest.get("clean_fraction", 0.05)
    benign = attempt(lambda: _benign(path, raw, defenses), ())
    expected = raw.get("expected")
    if expected is not None and not isinstance(expected, str):
        attempt(lambda: _raise(_fail(path, "expected", f"{expected!r} is not allowed; expected a file name")))
        expected = None
    name = attempt(lambda: check_folder_name(raw.get("name", path.stem), lambda k, message: _fail(path, k, message)),
                   "matrix")
    cap_ratio = bool(raw.get("cap_ratio", False))
    fail = lambda k, message: _fail(path, k, message)  # noqa: E731
    user_models = {}
    for label, entry in user_entries.items():
        um = attempt(lambda: check_folder_name(label, fail, f"models.{label}") and parse_user_model(
            path.parent, label, entry, fail, lambda name: name in MODELS, target, list(datasets)))
        if um is not None:
            user_models[label] = um
    sides = {}
    if target_ok and datasets:  # built with the target and the datasets: a bad one would be reported again
        sides = attempt(lambda: build_all(datasets, models, {a: _capped(p, cap_ratio) for a, p in attacks.items()},
                                          defenses, target, fail, check_data=check_data, detectors=detectors), {})
        attempt(lambda: _check_test_split(path, datasets, target))
    attempt(lambda: _check_crop_padding(path, sides, {"training": training, "defense_training": defense_training,
                                                      **{f"attacks.{a}.training": t for a, t in attack_training.items()}}))
    for um in user_models.values():
        if um.dataset in datasets:
            attempt(lambda: check_user_model(um, num_classes_of(um.dataset, datasets[um.dataset]),
                                             sides.get(um.dataset), fail))
    regression = attempt(lambda: _regression(path, raw.get("regression")), None)
    problems.raise_if_any()
    matrix = Matrix(
        path=path, name=name, description=str(raw.get("description", "")), datasets=datasets, models=models,
        attacks=attacks, defenses=defenses, poison_ratios=ratios, seeds=seeds, target=target,
        cap_ratio=cap_ratio, reference=bool(raw.get("reference", True)),
        training=training, defense_training=defense_training, clean_fraction=float(clean_fraction),
        attack_training=attack_training,
        attack_ratios=attack_ratios,
        expected_path=(path.parent / expected) if expected else None,
        digest=hashlib.sha256(text.encode()).hexdigest()[:16],
        regression=regression,
        user_models=user_models,
        benign=benign,
        against=against,
        detectors=detectors,
        detector_against=detector_against,
        clean_seeds=tuple(clean_seeds),
    )
    check_cases(matrix)
    return matrix


class Problems:
    """Every problem of a matrix, found in one pass: each check runs through ``attempt``, which keeps its
    ``MatrixError`` (one line) and goes on with a default; ``raise_if_any`` raises them together, one per line."""

    def __init__(self):
        self.lines: list[str] = []

    def attempt(self, check, default=None):
        try:
            return check()
        except MatrixError as e:
            self.lines += [line for line in str(e).splitlines() if line not in self.lines]
            return getattr(e, "partial", None) or default

    def raise_if_any(self) -> None:
        if self.lines:
            raise MatrixError("\n".join(self.lines))


def _raise(error: Exception):
    raise error


def _attack_keys_fit_models(path: Path, raw: dict, grid: bool) -> None:
    """The grid's own models need attacks and ratios; a matrix of user models only takes neither."""
    if grid:
        for required in ("attacks", "poison_ratios"):
            if required not in raw:
                raise _fail(path, required, f"missing ({TOP_LEVEL_KEYS[required]})")
        return
    for key in ("attacks", "poison_ratios"):
        if key in raw:
            raise _fail(path, key, f"not used: every model of this matrix is a user model (a checkpoint), which "
                                   "no attack trains; give each its trigger as models.<label>.trigger")


def _check_target(path: Path, datasets: dict[str, dict], target: Any) -> None:
    """The type first (no class count), then each dataset's classes."""
    for dataset, params in datasets.items():
        problem = target_problem(target) or target_problem(target, num_classes_of(dataset, params), dataset)
        if problem is not None:
            raise _fail(path, "target", problem)
    if not datasets and target_problem(target) is not None:
        raise _fail(path, "target", target_problem(target))


def _check_flags(path: Path, raw: dict) -> None:
    for flag in ("cap_ratio", "reference"):
        if flag in raw and not isinstance(raw[flag], bool):
            raise _fail(path, flag, f"{raw[flag]!r} is not allowed; expected true or false")


def _attack_training(path: Path, overrides: dict, training: TrainConfig) -> dict[str, TrainConfig]:
    """An attack's own training budget (``attacks.<name>.training``), over the matrix's."""
    out = {}
    for pattern, value in overrides.items():
        for name in ATTACKS.expand([str(pattern)]):
            out[name], _ = _train_config(path, f"attacks.{name}.training", value, training, set())
    return out


def _attack_ratios(path: Path, overrides: dict) -> dict[str, list[float]]:
    """An attack's own poison ratios (``attacks.<name>.poison_ratios``), replacing the matrix's for it."""
    out = {}
    for pattern, value in overrides.items():
        for name in ATTACKS.expand([str(pattern)]):
            out[name] = _ratios(path, value, key=f"attacks.{name}.poison_ratios")
    return out


def case_count(matrix: Matrix) -> int:
    """How many cases ``matrix.cases()`` builds, counted without building them."""
    clean_detections = sum(matrix.detects(d, CLEAN) for d in matrix.detectors)
    population_detections = sum(DETECTORS.get(d).task == "model" for d in matrix.detectors)
    per_seed = (1 + len(matrix.benign) + clean_detections) * matrix.reference + sum(
        len(matrix.ratios_of(a)) * (sum(matrix.runs_against(d, a) for d in matrix.defenses)
                                    + sum(matrix.detects(d, a) for d in matrix.detectors)) for a in matrix.attacks)
    per_clean_seed = (1 + population_detections) * len(matrix.population_seeds())
    grid = len(matrix.datasets) * len(matrix.models) * (len(matrix.seeds) * per_seed + per_clean_seed)
    return grid + len(matrix.user_models) * len(matrix.seeds) * len(matrix.defenses)


def check_cases(matrix: Matrix) -> None:
    """At most ``MAX_CASES`` cases, each with its own id (two cases with one id would keep one record)."""
    count = case_count(matrix)
    if count > MAX_CASES:
        raise _fail(matrix.path, "seeds" if len(matrix.seeds) > 1 else "poison_ratios",
                    f"the matrix has {count} cases; expected at most {MAX_CASES} (seeds x datasets x models x "
                    "ratios x attacks x defenses)")
    seen: set[str] = set()
    for case in matrix.cases():
        if case.case_id in seen:
            raise _fail(matrix.path, "models" if case.user_model else "poison_ratios",
                        f"two cases would share the id {case.case_id!r} (and one record); expected distinct names "
                        "and values")
        seen.add(case.case_id)


def _check_test_split(path: Path, datasets: dict[str, dict], target: Any) -> None:
    """An all-to-one target needs test images of other classes: the poisoned test set is made of them (an empty
    one once failed in training.py with an IndexError)."""
    if is_all_to_all(target):
        return
    for dataset, params in datasets.items():
        classes = test_classes_of(dataset, params)
        if classes is not None and classes <= {target}:
            raise _fail(path, "target", f"{target!r} is not allowed for {dataset}: its test split holds class "
                                        f"{target} only, so there is no test image of another class to trigger; "
                                        "expected a test split with other classes")


def _check_crop_padding(path: Path, sides: dict[str, int | None], budgets: dict[str, TrainConfig]) -> None:
    """A random crop pads each side by ``crop_padding`` pixels: more than the image side only allocates (a
    5000-pixel padding of 32x32 images asked for 154 GB) and crops windows of padding alone."""
    known = {name: side for name, side in sides.items() if side is not None}
    if not known:
        return
    dataset, side = min(known.items(), key=lambda item: item[1])
    for key, budget in budgets.items():
        if budget.crop_padding > side:
            raise _fail(path, f"{key}.crop_padding", f"{budget.crop_padding!r} is not allowed; expected an integer "
                                                     f"in [0, {side}] (at most the image side of {dataset})")


def _benign(path: Path, raw: dict, defenses: dict[str, dict]) -> tuple[str, ...]:
    """``benign``: true (every defense but none), false, or a list of the matrix's defenses (wildcards)."""
    value = raw.get("benign", False)
    if value is False:
        return ()
    if raw.get("reference", True) is False:
        raise _fail(path, "benign", "needs the clean reference model: remove `reference: false`")
    if value is True:
        return tuple(d for d in defenses if d != "none")
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise _fail(path, "benign", f"{value!r} is not allowed; expected true, false or a list of the matrix's defenses")
    chosen = []
    for pattern in value:
        matched = [d for d in defenses if fnmatch.fnmatchcase(d, pattern) and d != "none"]
        if not matched:
            raise _fail(path, "benign", f"{pattern!r} names none of the matrix's defenses ({', '.join(defenses)})")
        chosen += [d for d in matched if d not in chosen]
    return tuple(chosen)


def _split_defense_against(value: Any) -> tuple[Any, dict]:
    """Take a defense entry's ``against:`` (the attacks it runs against) out of its parameters, e.g.
    ``clp: {u: 3, against: [badnets, blended]}``."""
    if not isinstance(value, dict):
        return value, {}
    entries, against = {}, {}
    for pattern, params in value.items():
        if isinstance(params, dict) and "against" in params:
            params = dict(params)
            against[pattern] = params.pop("against")
        entries[pattern] = params
    return entries, against


def _against(path: Path, entries: dict, defenses: dict[str, dict], attacks: dict[str, dict],
             key: str = "defenses") -> dict:
    """defense (or detector) -> the matrix's attacks its entry's ``against`` names (wildcards allowed), in the
    matrix's order."""
    out, problems = {}, []
    section = key
    for pattern, value in entries.items():
        key = f"{section}.{pattern}.against"
        if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
            problems.append(_fail(path, key, f"{value!r} is not allowed; expected a non-empty list of the matrix's "
                                             f"attacks ({', '.join(attacks)})"))
            continue
        unknown = [v for v in value if not any(fnmatch.fnmatchcase(a, v) for a in attacks)]
        problems += [_fail(path, key, f"{v!r} names none of the matrix's attacks{did_you_mean(v, attacks)}; allowed: "
                                      f"{', '.join(attacks)}") for v in unknown]
        for defense in (d for d in defenses if fnmatch.fnmatchcase(d, str(pattern))):
            if defense == "none":
                problems.append(_fail(path, key, "not allowed on 'none': the undefended model is every attack's "
                                                 "baseline (each defense's change is measured against it)"))
                continue
            out[defense] = tuple(a for a in attacks if any(fnmatch.fnmatchcase(a, v) for v in value))
    _raise_all(problems, partial=out)
    return out


def _population(path: Path, raw: dict, detectors: dict[str, dict]) -> tuple[int, ...]:
    """``population: {clean_seeds: n or [seeds]}``: the further clean reference models of a model-level detection
    population (needs the reference rows and a model-level detector)."""
    if "population" not in raw:
        return ()
    value = raw["population"]
    if not isinstance(value, dict) or set(value) != {"clean_seeds"}:
        raise _fail(path, "population", f"{value!r} is not allowed; expected {{clean_seeds: n or [seeds]}}")
    if raw.get("reference", True) is False:
        raise _fail(path, "population", "needs the clean reference models: remove `reference: false`")
    if not any(DETECTORS.get(d).task == "model" for d in detectors):
        raise _fail(path, "population", "inspects models: name a model-level detector under `detectors` ("
                    + ", ".join(n for n in DETECTORS.names() if DETECTORS.get(n).task == "model") + ")")
    return tuple(parse_seeds(value["clean_seeds"], lambda m: _fail(path, "population.clean_seeds", m)))


def _split_user_models(value: Any) -> tuple[Any, dict[str, dict]]:
    """Take the models the user brings (entries with a ``checkpoint``) out of ``models``: (the registered models'
    entries, or None when there are none; label -> user-model entry)."""
    if not isinstance(value, dict):
        return value, {}
    users = {str(label): params for label, params in value.items() if is_user_entry(params)}
    rest = {label: params for label, params in value.items() if not is_user_entry(params)}
    return (rest or None) if users else value, users


def _capped(params: dict, cap_ratio: bool) -> dict:
    """An attack's parameters as its cases carry them (``Matrix._attack_params``)."""
    return {**params, "cap_ratio": True} if cap_ratio and "cap_ratio" not in params else params


def _regression(path: Path, value: Any) -> Regression:
    try:
        return parse_regression(path, value)
    except RegressionError as e:
        raise MatrixError(str(e)) from None


def parse_seeds(value: Any, fail=MatrixError) -> list[int]:
    """``5`` means seeds 0..4; a list names the seeds; on the command line ``"0,1,2"`` is a list too, and
    ``"7,"`` the single seed 7."""
    if isinstance(value, str):
        try:
            value = [int(v) for v in value.split(",") if v.strip()] if "," in value else int(value)
        except ValueError:
            raise fail(f"{value!r} is not allowed; expected a count n (seeds 0..n-1) or integers separated by commas") from None
    if isinstance(value, int) and not isinstance(value, bool):
        if not 1 <= value <= MAX_SEEDS:
            raise fail(f"{value!r} is not allowed; expected a seed count in [1, {MAX_SEEDS}]")
        return list(range(value))
    if not isinstance(value, list) or not value or not all(isinstance(s, int) and not isinstance(s, bool) for s in value):
        raise fail(f"{value!r} is not allowed; expected a count n (seeds 0..n-1) or a non-empty list of integers")
    if len(set(value)) != len(value):
        raise fail(f"{value!r} is not allowed; a seed is listed twice")
    if len(value) > MAX_SEEDS:
        raise fail(f"{len(value)} seeds are not allowed; expected at most {MAX_SEEDS}")
    return list(value)


def _split_attack_key(value: Any, key: str) -> tuple[Any, dict]:
    """Take an attack entry's grid key (``training:``, its own budget; ``poison_ratios:``, its own ratios) out of
    its parameters: e.g. ``wanet: {training: {epochs: 60}}``, ``adap_blend: {poison_ratios: [0.003]}``."""
    if not isinstance(value, dict):
        return value, {}
    entries, overrides = {}, {}
    for pattern, params in value.items():
        if isinstance(params, dict) and key in params:
            params = dict(params)
            overrides[pattern] = params.pop(key)
        entries[pattern] = params
    return entries, overrides


def _ratios(path: Path, value: Any, key: str = "poison_ratios") -> list[float]:
    """Ratios in (0, 1], each given once, and distinct as case ids show them (``p{ratio:g}``: 6 significant
    digits), so that two ratios never share one case id (and one record)."""
    if not isinstance(value, list) or not value:
        raise _fail(path, key, f"{value!r} is not allowed; expected a non-empty list of numbers in (0, 1]")
    seen: dict[str, float] = {}
    for r in value:
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 < r <= 1:
            raise _fail(path, key, f"{r!r} is outside the allowed range (0, 1]")
        if f"{r:g}" in seen:
            twin = seen[f"{r:g}"]
            raise _fail(path, key, f"{r!r} is not allowed; " + (
                "it is listed twice" if twin == r else f"it gives the same case id (p{r:g}) as {twin!r}")
                + "; expected distinct ratios that differ in their first 6 significant digits")
        seen[f"{r:g}"] = r
    return [float(r) for r in value]
