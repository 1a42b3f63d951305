"""Cache keys cover everything that builds an artifact: the code (derived from imports, never a hand list) and
the data's content (issue 18, point 1: a changed pipeline.py or an edited image tree once got cache hits)."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from backdoor.harness import code_digest as cd
from backdoor.harness import runner as runner_module
from backdoor.harness import specs
from backdoor.attacks import ATTACKS
from backdoor.harness.cache import ArtifactCache
from backdoor.data import DATASETS
from backdoor.defenses import DEFENSES
from backdoor.models import MODELS
from backdoor.harness.case import Case
from backdoor.harness.case_record import StageLog
from backdoor.harness.runner import Runner

PACKAGE = Path(cd.__file__).resolve().parents[1]


def builder_modules() -> list[str]:
    """The module of every registered dataset, model, attack and defense: what the pipeline keys by."""
    found = {DATASETS.get(n).__module__ for n in DATASETS.names()} | {MODELS.get(n).__module__ for n in MODELS.names()}
    found |= {ATTACKS.get(n).__module__ for n in ATTACKS.names()} | {DEFENSES.get(n).__module__ for n in DEFENSES.names()}
    return sorted(found)


@pytest.fixture(scope="module")
def package_copy(tmp_path_factory) -> Path:
    return Path(shutil.copytree(PACKAGE, tmp_path_factory.mktemp("pkg") / "backdoor",
                                ignore=shutil.ignore_patterns("__pycache__")))


def test_every_key_covers_the_pipeline_trainer_target_rule_and_the_builder_family():
    for module in builder_modules():
        closure = cd.source_closure(module, "backdoor.harness.runner")
        family = module.rsplit(".", 1)[0]
        assert {module, family, "backdoor.harness.runner", "backdoor.training", "backdoor.targets", "backdoor.data",
                "backdoor._checks", "backdoor._registry"} <= set(closure), module
        if family == "backdoor.attacks":
            assert "backdoor.attacks.base" in closure
        if family == "backdoor.defenses":
            assert "backdoor.defenses.base" in closure


def test_an_edit_of_any_module_a_builder_imports_changes_its_key_and_no_other(package_copy):
    """Every module in any builder's closure is edited once; the key of a builder that imports it moves, the key of
    one that does not (where there is one) stays."""
    roots = builder_modules()
    closures = {root: set(cd.source_closure(root, "backdoor.harness.runner", package_dir=package_copy)) for root in roots}
    edited_files = sorted(set().union(*closures.values()))
    assert len(edited_files) > 20
    for module in edited_files:
        inside = next(root for root in roots if module in closures[root])
        outside = [root for root in roots if module not in closures[root]][:1]
        before = {root: cd.code_digest(root, "backdoor.harness.runner", package_dir=package_copy) for root in [inside, *outside]}
        file = cd.module_file(module, package_copy)
        original = file.read_bytes()
        file.write_bytes(original + b"\n# an edit\n")
        try:
            after = {root: cd.code_digest(root, "backdoor.harness.runner", package_dir=package_copy) for root in before}
        finally:
            file.write_bytes(original)
        assert after[inside] != before[inside], (module, inside)
        assert all(after[root] == before[root] for root in outside), (module, outside)


def test_a_new_import_extends_the_key_by_itself(package_copy):
    """The closure is derived: a module a builder starts to import is digested from then on."""
    badnets = package_copy / "attacks" / "badnets.py"
    original = badnets.read_bytes()
    assert "backdoor.stats" not in cd.source_closure("backdoor.attacks.badnets", "backdoor.harness.runner",
                                                     package_dir=package_copy)
    try:
        badnets.write_bytes(original + b"\ndef _helper():\n    from backdoor import stats\n    return stats\n")
        closure = cd.source_closure("backdoor.attacks.badnets", "backdoor.harness.runner", package_dir=package_copy)
        assert "backdoor.stats" in closure
        before = cd.code_digest("backdoor.attacks.badnets", "backdoor.harness.runner", package_dir=package_copy)
        stats = package_copy / "stats.py"
        stats.write_bytes(stats.read_bytes() + b"\n# an edit\n")
        assert cd.code_digest("backdoor.attacks.badnets", "backdoor.harness.runner", package_dir=package_copy) != before
    finally:
        badnets.write_bytes(original)


def test_a_lazy_module_attribute_is_not_followed(package_copy):
    """``backdoor.load_model`` imports the export reader on first use only; no builder runs it."""
    checks = package_copy / "harness" / "user_model_checks.py"
    assert "backdoor.checkpoints.export" in cd.imported_modules("backdoor.harness.user_model_checks", checks)
    assert "backdoor.checkpoints.export" not in cd.imported_modules("backdoor", package_copy / "__init__.py")


def _case(**kw) -> Case:
    return Case(matrix="m", dataset="digits", model="cnn_small", attack="badnets", defense="ft", ratio=0.1, seed=0,
                **kw)


def test_an_edit_of_pipeline_py_is_a_miss_for_every_stage(monkeypatch, tmp_path):
    """The issue's case: a copy whose only change doubled the defender's clean subset got the other copy's FT and
    FP models. Every stage's key now moves with pipeline.py."""
    runner = Runner(ArtifactCache(tmp_path / "cache"))
    attack = ATTACKS.create("badnets")
    defense = DEFENSES.create("ft")
    case = _case()

    def keys() -> list[str]:
        specs.code_version.cache_clear()
        keyed = [("dataset", specs.dataset_spec(case)), ("clean_model", specs.model_spec(case)),
                 ("poisoned", specs.attack_spec(case, attack)), ("backdoor_model", specs.backdoor_spec(case, attack)),
                 ("defended_model", specs.defense_spec(case, specs.backdoor_spec(case, attack), defense))]
        return [str(runner.cache.path(kind, spec)) for kind, spec in keyed]

    copy = tmp_path / "runner.py"
    copy.write_text(Path(runner_module.__file__).read_text().replace(
        "case.clean_fraction * len(data.train)", "2 * case.clean_fraction * len(data.train)"))
    try:
        original = keys()
        monkeypatch.setattr(sys.modules["backdoor.harness.runner"], "__file__", str(copy))
        edited = keys()
    finally:
        monkeypatch.undo()
        specs.code_version.cache_clear()
    assert all(a != b for a, b in zip(original, edited))


def _tree(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in ("cat", "dog"):
            (root / split / c).mkdir(parents=True)
            for i in range(3):
                Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / split / c / f"{i}.png")
    return root


def test_an_edited_image_of_an_imagefolder_tree_is_a_miss(tmp_path):
    """The issue's case: every image inverted, the rerun still hit the cache for dataset, poisoned set and model."""
    root = _tree(tmp_path / "tree")
    runner = Runner(ArtifactCache(tmp_path / "cache"))
    case = Case(matrix="m", dataset="imagefolder", model="cnn_small", attack="clean", defense="none", ratio=0.0,
                seed=0, dataset_params={"root": str(root), "image_size": 8})
    first, second, after_edit = StageLog(), StageLog(), StageLog()
    data = runner.dataset(case, first)
    runner.dataset(case, second)
    image = root / "train" / "dog" / "1.png"
    Image.fromarray(255 - np.asarray(Image.open(image))).save(image)
    edited = runner.dataset(case, after_edit)
    assert (first.hits["dataset"], second.hits["dataset"], after_edit.hits["dataset"]) == (False, True, False)
    assert not (edited.train.x == data.train.x).all()


def test_a_renamed_class_folder_is_a_miss(tmp_path):
    """Paths carry the labels: moving an image to the other class changes the data without changing a byte."""
    root = _tree(tmp_path / "tree")
    fingerprint = DATASETS.get("imagefolder").fingerprint
    before = fingerprint({"root": str(root)})
    (root / "train" / "cat" / "0.png").rename(root / "train" / "dog" / "9.png")
    assert fingerprint({"root": str(root)}) != before and before["files"] is not None


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "gtsrb", "tiny_imagenet", "npz", "imagefolder"])
def test_every_dataset_read_from_files_declares_a_content_fingerprint(name):
    assert callable(getattr(DATASETS.get(name), "fingerprint", None))
