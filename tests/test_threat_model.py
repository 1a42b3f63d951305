"""A defense can reach only what its threat model grants: never the test sets, the poison mask or the target.

Two guards: the defense modules' source names nothing that reaches test data (an AST check), and a spy defense,
run through the real pipeline, walks everything reachable from what it is given and finds none of the case's
objects.
"""
import ast
import collections
import dataclasses
import functools
import inspect
import json
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from backdoor.harness import runner as runner_module

from backdoor import training
from backdoor.attacks import Attack, AttackContext, PoisonedSet
from backdoor.harness.cache import ArtifactCache
from backdoor.data import Dataset, Split
from backdoor.defenses import DEFENSES, Defense, DefenseInputs, DefenseOutcome
from backdoor.detectors import DETECTORS, DataDetection, InputDetector, InputScreen, ModelVerdict
from backdoor.harness.matrix import load_matrix
from backdoor.models import create_model
from backdoor.harness.case import Case
from backdoor.harness.case_record import StageLog
from backdoor.harness.runner import Runner, derive_seed
from backdoor.training import TrainConfig
from backdoor.checkpoints.user_models import UserModel

GRANTED = {"model", "clean", "num_classes", "device", "seed", "training", "retraining", "new_model", "fit",
           "poisoned_train"}
DEFENSE_DIR = Path(__file__).resolve().parent.parent / "backdoor" / "defenses"
# Modules through which test data, masks or targets could be reached.
FORBIDDEN_IMPORTS = ("backdoor.harness", "backdoor.attacks", "backdoor.data.")  # backdoor.data itself: only for Split
FORBIDDEN_NAMES = {"load_dataset", "DATASETS", "poison_test", "PoisonedSet", "ArtifactCache", "Runner"}


def test_defense_inputs_carry_only_granted_fields():
    assert {f.name for f in dataclasses.fields(DefenseInputs)} == GRANTED
    assert DefenseInputs.__dataclass_params__.frozen


@pytest.mark.parametrize("name", [f"defense:{n}" for n in DEFENSES.names()]
                         + [f"detector:{n}" for n in DETECTORS.names()])
def test_defense_module_cannot_reach_test_data_or_masks(name):
    family, short = name.split(":")
    registry = DEFENSES if family == "defense" else DETECTORS
    source_file = Path(registry.get(short).__module__.replace(".", "/") + ".py")
    tree = ast.parse((DEFENSE_DIR.parent.parent / source_file).read_text())
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            for module in modules:
                assert not any(module == f or module.startswith(f) for f in FORBIDDEN_IMPORTS), \
                    f"{name} imports {module}"
            assert not {a.name for a in node.names} & FORBIDDEN_NAMES, f"{name} imports a data loader"
        if isinstance(node, ast.Name):
            assert node.id not in FORBIDDEN_NAMES, f"{name} uses {node.id}"
        if isinstance(node, ast.Attribute):
            assert node.attr not in {"test", "poison_test", "test_x", "test_y"}, f"{name} reads .{node.attr}"
            if isinstance(node.value, ast.Name) and node.value.id == "inputs":
                assert node.attr in GRANTED, f"{name} reads inputs.{node.attr}"


def test_pipeline_hands_data_side_defenses_no_mask():
    handed = inspect.getsource(Runner.defend).split("poisoned_train = ")[1].splitlines()[0]
    assert "poisoned.split" in handed and "mask" not in handed


# -- the spy: everything reachable from what a defense is given ------------------------------------------------

MAX_DEPTH = 100  # far beyond the walk's real depth (asserted: nothing is left unexpanded at the bound)
# Objects tied to the case: none may be reachable from a defense's inputs.
CASE_TYPES = (Case, Runner, StageLog, ArtifactCache, Dataset, Attack, AttackContext, PoisonedSet, UserModel)


class MarkedTarget(int):
    """A target class that is one object of its own, so that reaching it is told apart from any other 1."""


TARGET = MarkedTarget(1)


def is_library_code(obj) -> bool:
    """A function or class of the library: its globals or class attributes are walked. Third-party code's are
    not (it holds nothing the pipeline built), which keeps the walk to the library's own namespaces."""
    return (getattr(obj, "__module__", None) or "").startswith("backdoor")


def cell_contents(function: types.FunctionType) -> list:
    contents = []
    for cell in function.__closure__ or ():
        try:
            contents.append(cell.cell_contents)
        except ValueError:  # an empty cell
            pass
    return contents


def module_namespace(module_globals: dict) -> dict:
    """A module's own names, without the import machinery's (``__loader__``, ``__spec__``, ``__builtins__``):
    under pytest the loader is its assertion-rewriting hook, through which the whole session (every collected
    grid case) is reachable, which no defense is handed."""
    return {k: v for k, v in module_globals.items() if not (k.startswith("__") and k.endswith("__"))}


def callable_links(obj) -> list:
    """What a function, method or other callable wrapper holds: closure cells, defaults, globals, ``__self__``."""
    if isinstance(obj, types.FunctionType):
        return [*cell_contents(obj), obj.__defaults__, obj.__kwdefaults__,
                *([module_namespace(obj.__globals__)] if is_library_code(obj) else [])]
    if isinstance(obj, types.MethodType):
        return [obj.__self__, obj.__func__]
    if isinstance(obj, (types.BuiltinMethodType, types.MethodWrapperType)):
        return [obj.__self__]
    if isinstance(obj, functools.partial):
        return [obj.func, obj.args, obj.keywords]
    if isinstance(obj, property):
        return [obj.fget, obj.fset, obj.fdel]
    if isinstance(obj, (staticmethod, classmethod)):
        return [obj.__func__]
    if isinstance(obj, functools.cached_property):
        return [obj.func]
    return []


def attributes(obj) -> list:
    """The instance's ``__dict__`` and ``__slots__`` values."""
    values = [obj.__dict__] if isinstance(getattr(obj, "__dict__", None), dict) else []
    for klass in type(obj).__mro__:
        slots = getattr(klass, "__slots__", ())
        for slot in (slots,) if isinstance(slots, str) else slots:
            if slot not in ("__dict__", "__weakref__") and hasattr(obj, slot):
                values.append(getattr(obj, slot))
    return values


def links(obj) -> list:
    """Everything one step from ``obj``. A module is a leaf: through it everything is reachable, as through an
    import, which the AST test above polices."""
    if isinstance(obj, types.ModuleType):
        return []
    out = callable_links(obj)
    if isinstance(obj, (dict, types.MappingProxyType)):
        out += [*obj.keys(), *obj.values()]
    elif isinstance(obj, (list, tuple, set, frozenset, collections.deque)):
        out += list(obj)
    if isinstance(obj, type):  # a class: its own and its library bases' attributes
        return out + [vars(k) for k in obj.__mro__ if is_library_code(k)] if is_library_code(obj) else out
    out += attributes(obj)
    if is_library_code(type(obj)):
        out.append(type(obj))
    return out


def reachable(root) -> dict[int, object]:
    """Every object reachable from ``root`` (by id), breadth first so each is expanded at its least depth."""
    seen, queue, cut = {id(root): root}, collections.deque([(root, 0)]), []
    while queue:
        obj, depth = queue.popleft()
        if depth == MAX_DEPTH:
            cut.append(obj)
            continue
        for child in links(obj):
            if child is not None and id(child) not in seen:
                seen[id(child)] = child
                queue.append((child, depth + 1))
    assert not cut, f"the walk stopped at depth {MAX_DEPTH} with {len(cut)} objects unexpanded"
    return seen


class Spy(Defense):
    """A data-side defense that calls what it is given (a fresh model, one epoch of ``fit``) and then walks
    everything reachable from its inputs."""

    name = "spy"
    kind = "data_side"

    def __init__(self):
        self.reached: dict[int, object] = {}
        self.inputs: DefenseInputs | None = None
        self.fresh: dict[str, torch.Tensor] = {}

    def run(self, inputs: DefenseInputs) -> DefenseOutcome:
        fresh = inputs.new_model()
        self.fresh = {k: v.clone() for k, v in fresh.state_dict().items()}
        inputs.fit(fresh, inputs.clean, inputs.training.with_(epochs=1), seed=inputs.seed, desc="spy")
        self.inputs, self.reached = inputs, reachable(inputs)
        return DefenseOutcome(model=inputs.model)


class RepairSpy(Spy):
    """The same spy as a model-repair defense: it must not get even the poisoned training set."""

    name = "repair_spy"
    kind = "model_repair"


class WatchedRunner(Runner):
    """The real runner, keeping the case's objects that a defense must not reach: the dataset (its test split),
    the attack and its poisoned test set, the poisoned training set (its mask), a user model's triggered test
    images."""

    def __init__(self, cache: ArtifactCache):
        super().__init__(cache)
        self.kept: list = []

    def attack(self, case, data, log_):
        attack = super().attack(case, data, log_)
        self.kept += [attack, attack.poison_test(data.test)]
        return attack

    def user_inputs(self, case, data, log_):
        model, poisoned, triggered, upstream = super().user_inputs(case, data, log_)
        self.kept += [case.user_model, triggered]
        return model, poisoned, triggered, upstream

    def defend(self, case, model, data, poisoned, upstream, log_):
        self.kept += [case, data, poisoned]
        return super().defend(case, model, data, poisoned, upstream, log_)

    def forbidden_tensors(self) -> list[torch.Tensor]:
        """The test images and labels (clean, poisoned, triggered) and the poison mask."""
        tensors = []
        for obj in self.kept:
            if isinstance(obj, Dataset):
                tensors += [obj.test.x, obj.test.y]
            elif isinstance(obj, Split):
                tensors += [obj.x, obj.y]
            elif isinstance(obj, PoisonedSet) and obj.mask is not None:
                tensors.append(obj.mask)
        return tensors


def storage(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().data_ptr()


def case_objects_reached(spy: Spy, runner: WatchedRunner) -> list[str]:
    """What the spy reached of the case: its objects by type, its test tensors and mask by storage (so a view
    of them counts), the target by identity."""
    forbidden = {storage(t) for t in runner.forbidden_tensors() if t.numel()}
    found = [type(obj).__name__ for obj in spy.reached.values() if isinstance(obj, CASE_TYPES)]
    found += [f"tensor {tuple(obj.shape)}" for obj in spy.reached.values()
              if isinstance(obj, torch.Tensor) and obj.numel() and storage(obj) in forbidden]
    found += ["the target"] * any(obj is TARGET for obj in spy.reached.values())
    return found


@pytest.fixture
def spies(monkeypatch) -> dict[str, Spy]:
    """The pipeline creates the spies for the defense names ``spy`` and ``repair_spy`` (the registry is left as it
    is); returns them by name once made."""
    made, create = {}, runner_module.create_defense

    def create_or_spy(name: str, **params):
        if name in (Spy.name, RepairSpy.name):
            made[name] = {Spy.name: Spy, RepairSpy.name: RepairSpy}[name]()
            return made[name]
        return create(name, **params)

    monkeypatch.setattr(runner_module, "create_defense", create_or_spy)
    return made


TINY = dict(matrix="threat", dataset="digits", model="cnn_small", seed=3, ratio=0.1, target=TARGET,
            model_params={"width": 8}, training=TrainConfig(epochs=1, batch_size=128, lr=0.05),
            defense_training=TrainConfig(epochs=1, batch_size=256, lr=0.01))


def user_model_case(folder: Path) -> Case:
    """A pure-defense case: a user's checkpoint with its own normalisation, triggered test images and a poisoned
    training set with its mask (the files are random images: only what reaches the defense matters)."""
    g = torch.Generator().manual_seed(0)
    model = create_model("cnn_small", 10, seed=0, width=8)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    images = lambda n: torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)  # noqa: E731
    labels = lambda n: torch.randint(0, 10, (n,), generator=g)  # noqa: E731
    save_file({"x": images(40), "y": labels(40)}, str(folder / "triggered.safetensors"))
    save_file({"x": images(300), "y": labels(300), "mask": torch.arange(300) < 30}, str(folder / "train.safetensors"))
    (folder / "user.yaml").write_text(json.dumps({
        "name": "threat-user", "datasets": ["digits"], "defenses": ["none"], "seeds": [3],
        "models": {"mine": {"checkpoint": "model.safetensors", "arch": "cnn_small", "arch_params": {"width": 8},
                            "normalize": {"mean": [0.25], "std": [0.5]}, "target": 1,
                            "trigger": {"images": "triggered.safetensors"}, "poisoned_train": "train.safetensors"}},
        "training": {"epochs": 1, "batch_size": 128, "lr": 0.05},
        "defense_training": {"epochs": 1, "batch_size": 256, "lr": 0.01, "clean_fraction": 0.05}}))
    return load_matrix(folder / "user.yaml").cases()[0]


def fresh_model_expected(case: Case, mean, std) -> dict[str, torch.Tensor]:
    """The case's untrained model as the grid defines it: its architecture and parameters, the init seed."""
    model = create_model(case.model, 10, mean, std, seed=derive_seed(case.seed, "init"), **case.model_params)
    return model.state_dict()


@pytest.mark.parametrize("kind", ["badnets", "clean", "user", "repair"])
def test_a_spy_defense_reaches_nothing_of_the_case(kind, spies, tmp_path):
    if kind == "user":
        case = dataclasses.replace(user_model_case(tmp_path), defense=Spy.name)
        mean, std = (0.25,) * 3, (0.5,) * 3
    else:
        case = Case(attack="clean" if kind == "clean" else "badnets",
                    defense=RepairSpy.name if kind == "repair" else Spy.name, **TINY)
        mean, std = (0.3057,) * 3, (0.3237,) * 3  # digits' statistics
    runner = WatchedRunner(ArtifactCache(tmp_path / "cache"))
    record = runner.run(case)
    spy = spies[case.defense]
    assert record["status"] == "ok" and spy.reached, "the spy ran inside the pipeline"
    assert (spy.inputs.poisoned_train is None) == (kind == "repair")
    # The walk went through the callables' code: it reached the trainer and the model factory they call.
    assert {id(training.fit), id(create_model)} <= spy.reached.keys()
    reached = case_objects_reached(spy, runner)
    assert not reached, f"the defense reaches the case's {dict(collections.Counter(reached))}"
    expected = fresh_model_expected(case, mean, std)
    assert spy.fresh.keys() == expected.keys() and all(torch.equal(spy.fresh[k], expected[k]) for k in expected)


# -- the same spy as a detector of each task ------------------------------------------------------------------

class SpyScreen(InputScreen):
    """An input screen that records what it is shown: images only, never labels."""

    threshold = 0.5

    def __init__(self):
        self.shown: list = []

    def scores(self, x):
        self.shown.append(x)
        return torch.zeros(len(x))


class SpyDetector(InputDetector):
    """A detector of any task that walks everything reachable from its inputs."""

    name = "spy_detector"

    def __init__(self, task: str, data_free: bool = False):
        self.task, self.data_free = task, data_free
        self.reached: dict[int, object] = {}
        self.inputs: DefenseInputs | None = None
        self.screen = SpyScreen()

    def _walk(self, inputs):
        self.inputs, self.reached = inputs, reachable(inputs)

    def calibrate(self, inputs):
        self._walk(inputs)
        return self.screen

    def detect(self, inputs):
        self._walk(inputs)
        n = len(inputs.poisoned_train)
        return DataDetection(torch.zeros(n, dtype=torch.bool), torch.zeros(n))

    def inspect(self, inputs):
        self._walk(inputs)
        return ModelVerdict(0.0, False)


class WatchedDetectionRunner(WatchedRunner):
    def detect(self, case, model, data, attack, poisoned, upstream, log_):
        self.kept += [case, data, poisoned]
        return super().detect(case, model, data, attack, poisoned, upstream, log_)


@pytest.mark.parametrize("task,data_free", [("input", False), ("data", False), ("model", False), ("model", True)])
def test_a_spy_detector_reaches_nothing_of_the_case(task, data_free, monkeypatch, tmp_path):
    spy = SpyDetector(task, data_free)
    monkeypatch.setattr(runner_module, "create_detector", lambda name, **params: spy)
    case = Case(attack="badnets", defense="det_spy_detector", detector="spy_detector", **TINY)
    runner = WatchedDetectionRunner(ArtifactCache(tmp_path / "cache"))
    record = runner.run(case)
    assert record["status"] == "ok" and spy.reached and record["task"] == task
    assert (spy.inputs.poisoned_train is None) == (task != "data")
    assert (len(spy.inputs.clean) == 0) == data_free  # a data-free detector is given no clean image
    assert spy.inputs.clean.x.shape[1:] == (3, 32, 32)  # but the image shape
    reached = case_objects_reached(spy, runner)
    assert not reached, f"the detector reaches the case's {dict(collections.Counter(reached))}"
    if task == "input":  # the screen is shown the clean and the triggered test images, never their labels
        data = next(obj for obj in runner.kept if isinstance(obj, Dataset))
        assert [tuple(x.shape) for x in spy.screen.shown] == [(len(data.test), 3, 32, 32),
                                                             (record["detection"]["positives"], 3, 32, 32)]
        assert all(x.dtype == torch.uint8 for x in spy.screen.shown)
