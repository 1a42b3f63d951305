"""A defense can reach only what its threat model grants: never the test sets, the poison mask or the target."""
import ast
import dataclasses
from pathlib import Path

import pytest

from backdoor.defenses import DEFENSES, DefenseInputs

GRANTED = {"model", "clean", "num_classes", "device", "seed", "training", "retraining", "new_model", "fit",
           "poisoned_train"}
DEFENSE_DIR = Path(__file__).resolve().parent.parent / "backdoor" / "defenses"
# Modules through which test data, masks or targets could be reached.
FORBIDDEN_IMPORTS = ("backdoor.pipeline", "backdoor.cache", "backdoor.attacks", "backdoor.matrix",
                     "backdoor.results", "backdoor.data.")  # backdoor.data itself: only for the Split type
FORBIDDEN_NAMES = {"load_dataset", "DATASETS", "poison_test", "PoisonedSet", "ArtifactCache", "Runner"}


def test_defense_inputs_carry_only_granted_fields():
    assert {f.name for f in dataclasses.fields(DefenseInputs)} == GRANTED
    assert DefenseInputs.__dataclass_params__.frozen


@pytest.mark.parametrize("name", DEFENSES.names())
def test_defense_module_cannot_reach_test_data_or_masks(name):
    source_file = Path(DEFENSES.get(name).__module__.replace(".", "/") + ".py")
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
    import inspect

    from backdoor.pipeline import Runner

    handed = inspect.getsource(Runner.defend).split("poisoned_train = ")[1].splitlines()[0]
    assert "poisoned.split" in handed and "mask" not in handed
