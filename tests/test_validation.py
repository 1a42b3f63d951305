"""Values are checked at matrix load: every malformed input below stops ``load_matrix`` before anything trains,
within seconds, with one ``MatrixError`` naming the file, the key, the bad value and what is allowed."""
import json
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from backdoor._checks import ParameterError
from backdoor.attacks import ATTACKS
from backdoor.data import load_dataset
from backdoor.defenses import DEFENSES
from backdoor.harness.matrix import MatrixError, load_matrix
from backdoor.models import create_model

ROOT = Path(__file__).resolve().parent.parent
GOOD = """
name: v
datasets: [digits]
models: [cnn_small]
attacks: {badnets: {}, blended: {alpha: 0.1}, sig: {}}
defenses: {none: {}, ft: {epochs: 2}}
poison_ratios: [0.1]
seeds: [0]
training: {epochs: 2}
"""
SECONDS = 5.0  # the longest a rejection may take once the registries are imported


def write(tmp_path: Path, text: str, name: str = "m.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def rejects(path: Path, message: str) -> MatrixError:
    """load_matrix(path) raises one MatrixError starting with the file and containing ``message``, quickly."""
    start = time.perf_counter()
    with pytest.raises(MatrixError) as e:
        load_matrix(path)
    elapsed = time.perf_counter() - start
    text = str(e.value)
    assert text.startswith(f"{path}: "), text
    assert message in text, text
    assert elapsed < SECONDS, f"took {elapsed:.1f} s"
    return e.value


@pytest.fixture(scope="module", autouse=True)
def warm_registries(tmp_path_factory):
    """Import every registered module once, so the timings measure the checks, not torchvision's import."""
    load_matrix(write(tmp_path_factory.mktemp("good"), GOOD))


def test_the_good_matrix_loads(tmp_path):
    assert len(load_matrix(write(tmp_path, GOOD)).cases()) == 1 + 3 * 2


PARAMS = [  # (old, new, expected message)
    ("blended: {alpha: 0.1}", "blended: {alpha: 1.5}", "attacks.blended.alpha: 1.5 is not allowed; expected a number in (0, 1]"),
    ("blended: {alpha: 0.1}", "blended: {alpha: -0.1}", "attacks.blended.alpha: -0.1 is not allowed; expected a number in (0, 1]"),
    ("blended: {alpha: 0.1}", "blended: {alpha: '0.5'}", "attacks.blended.alpha: '0.5' is not allowed; expected a number"),
    ("blended: {alpha: 0.1}", "blended: {pattern: /no/such/kitty.png}",
     "attacks.blended.pattern: '/no/such/kitty.png' is not allowed; expected 'noise' or the path of an existing image file"),
    ("badnets: {}", "badnets: {size: 0}", "attacks.badnets.size: 0 is not allowed; expected an integer >= 1 or null"),
    ("badnets: {}", "badnets: {size: 32}", "attacks.badnets.size: 32 is not allowed; expected an integer in [1, 31] for 32x32 images"),
    ("badnets: {}", "badnets: {size: 100}", "attacks.badnets.size: 100 is not allowed; expected an integer in [1, 31]"),
    ("badnets: {}", "badnets: {size: 2.5}", "attacks.badnets.size: 2.5 is not allowed; expected an integer or null"),
    ("badnets: {}", "badnets: {value: 300}", "attacks.badnets.value: 300 is not allowed; expected an integer in [0, 255]"),
    ("sig: {}", "sig: {delta: -5}", "attacks.sig.delta: -5 is not allowed; expected a number in (0, 255]"),
    ("sig: {}", "sig: {frequency: true}", "attacks.sig.frequency: True is not allowed; expected a number"),
    ("sig: {}", "wanet: {k: x}", "attacks.wanet.k: 'x' is not allowed; expected an integer"),
    ("sig: {}", "lc: {eps: 300}", "attacks.lc.eps: 300 is not allowed; expected a value in [0, 255] grey levels"),
    ("sig: {}", "lc: {size: 17}", "attacks.lc.size: 17 is not allowed; expected an integer in [1, 16] for 32x32 images"),
    ("sig: {}", "inputaware: {channels: [16, x]}",
     "attacks.inputaware.channels: [16, 'x'] is not allowed; expected a non-empty list of positive integer widths"),
    ("ft: {epochs: 2}", "ft: {epochs: x}", "defenses.ft.epochs: 'x' is not allowed; expected an integer or null"),
    ("ft: {epochs: 2}", "ft: {lr: abc}", "defenses.ft.lr: 'abc' is not allowed; expected a number or null"),
    ("ft: {epochs: 2}", "ft: {epochs: -3}", "defenses.ft.epochs: -3 is not allowed; expected an integer >= 1 or null"),
    ("ft: {epochs: 2}", "ft: {lr: true}", "defenses.ft.lr: True is not allowed; expected a number or null"),
    ("ft: {epochs: 2}", "ft: {lr: 0}", "defenses.ft.lr: 0 is not allowed; expected a number > 0 or null"),
    ("ft: {epochs: 2}", "nc: {lr: true}", "defenses.nc.lr: True is not allowed; expected a number"),
    ("ft: {epochs: 2}", "abl: {isolation_ratio: 2}", "defenses.abl.isolation_ratio: 2 is not allowed; expected a value in (0, 1)"),
    ("ft: {epochs: 2}", "nad: {betas: [1, x, 2]}", "defenses.nad.betas: [1, 'x', 2] is not allowed; expected three non-negative"),
    ("ft: {epochs: 2}", "nc: {cost_up: 1}", "defenses.nc.cost_up: 1 is not allowed; expected a value > 1"),
    ("ft: {epochs: 2}", "dbd: {sce_alpha: 0, sce_beta: 0}",  # a plain ValueError: the key, then its text
     "defenses.dbd: sce_alpha and sce_beta cannot both be 0"),
    ("training: {epochs: 2}", "training: {lr: true}", "training.lr: True is not allowed; expected a number"),
    ("training: {epochs: 2}", "training: {epochs: x}", "training.epochs: 'x' is not allowed; expected an integer"),
    ("training: {epochs: 2}", "training: {amp: 1}", "training.amp: 1 is not allowed; expected true or false"),
    ("training: {epochs: 2}", "defense_training: {lr: abc}", "defense_training.lr: 'abc' is not allowed; expected a number"),
    ("models: [cnn_small]", "models: {cnn_small: {width: x}}", "models.cnn_small.width: 'x' is not allowed; expected an integer"),
    ("models: [cnn_small]", "models: {cnn_small: {hidden: 0}}", "models.cnn_small.hidden: 0 is not allowed; expected an integer >= 1"),
    ("datasets: [digits]", "datasets: {synthetic: {image_size: big}}",
     "datasets.synthetic.image_size: 'big' is not allowed; expected an integer"),
    ("datasets: [digits]", "datasets: {synthetic: {train_size: 0}}",
     "datasets.synthetic.train_size: 0 is not allowed; expected an integer >= 1"),
    ("datasets: [digits]", "datasets: {synthetic: {noise: -1}}", "datasets.synthetic.noise: -1 is not allowed; expected a number >= 0"),
    ("datasets: [digits]", "datasets: {digits: {test_fraction: 1.5}}",
     "datasets.digits.test_fraction: 1.5 is not allowed; expected a number in (0, 1)"),
    ("datasets: [digits]", "datasets: {synthetic: {image_size: 8}}",  # badnets' scaled 1x1 fits, size 8 does not
     "attacks.badnets.size: 8 is not allowed; expected an integer in [1, 7] for 8x8 images"),
]


@pytest.mark.parametrize("old,new,message", PARAMS, ids=[p[1] for p in PARAMS])
def test_bad_parameter_value_stops_at_load(tmp_path, old, new, message):
    text = GOOD.replace(old, new)
    if "image_size: 8" in new:
        text = text.replace("badnets: {}", "badnets: {size: 8}")
    assert text != GOOD
    rejects(write(tmp_path, text), message)


@pytest.mark.parametrize("text,message", [
    (GOOD + "seeds: [1]\n", "malformed YAML at line 10, column 1: duplicate key 'seeds' (first at line 8)"),
    (GOOD.replace("{alpha: 0.1}", "{alpha: 0.1, alpha: 0.3}"), "duplicate key 'alpha'"),
    (GOOD.replace("defenses: {none: {}, ft: {epochs: 2}}", "defenses:\n  ft: {}\n  ft: {epochs: 3}"),
     "malformed YAML at line 8, column 3: duplicate key 'ft' (first at line 7)"),
], ids=["top-level", "inline", "block"])
def test_duplicate_keys_are_rejected_with_the_line(tmp_path, text, message):
    rejects(write(tmp_path, text), message)


@pytest.mark.parametrize("name", ["..", ".", "a/b", "..\\up", ".hidden", "", "/abs"])
def test_name_must_be_a_plain_folder_name(tmp_path, name):
    rejects(write(tmp_path, GOOD.replace("name: v", f"name: {json.dumps(name)}")), f"name: {name!r} is not allowed")


def test_name_message_says_what_is_allowed(tmp_path):
    rejects(write(tmp_path, GOOD.replace("name: v", "name: '..'")),
            "name: '..' is not allowed; expected a plain folder name of at most 100 printable characters, none of "
            "/ \\ : * ? \" < > | ~ (and not a leading '.', '.' or '..')")


# -- imagefolder ------------------------------------------------------------------------------------------------

def image_tree(root: Path, layout: dict[str, dict[str, int]]) -> Path:
    from PIL import Image

    for split, classes in layout.items():
        for cls, count in classes.items():
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(count):
                Image.new("RGB", (8, 8), (40 * i % 255, 0, 0)).save(folder / f"{i}.png")
    return root


def imagefolder_matrix(tmp_path: Path, root: Path) -> Path:
    return write(tmp_path, GOOD.replace("datasets: [digits]", f"datasets: {{imagefolder: {{root: '{root}'}}}}"))


def test_imagefolder_good_tree_loads(tmp_path):
    root = image_tree(tmp_path / "data", {"train": {"a": 3, "b": 3}, "test": {"a": 2, "b": 2}})
    assert load_matrix(imagefolder_matrix(tmp_path, root)).datasets["imagefolder"] == {"root": str(root)}


@pytest.mark.parametrize("layout,message", [
    ({"train": {"a": 3, "b": 3}, "test": {"a": 2, "b": 0}}, "test class folder {root}/test/b holds no image files"),
    ({"train": {"a": 3, "b": 0}, "test": {"a": 2, "b": 2}}, "train class folder {root}/train/b holds no image files"),
    ({"train": {"a": 3, "b": 3, "c": 1}, "test": {"a": 2, "b": 2}},
     "train and test class folders differ under {root}: only in train/: ['c']; only in test/: none"),
], ids=["empty-test-class", "empty-train-class", "class-missing-in-test"])
def test_imagefolder_tree_problems_stop_at_load(tmp_path, layout, message):
    root = image_tree(tmp_path / "data", layout)
    rejects(imagefolder_matrix(tmp_path, root), "datasets.imagefolder: " + message.format(root=root))


@pytest.mark.parametrize("content", [b"not an image at all", None], ids=["garbage", "truncated-png"])
def test_imagefolder_corrupt_file_stops_at_load_with_one_line(tmp_path, content):
    root = image_tree(tmp_path / "data", {"train": {"a": 3, "b": 3}, "test": {"a": 2, "b": 2}})
    bad = root / "test" / "b" / "1.png"
    bad.write_bytes(content if content is not None else bad.read_bytes()[:40])
    error = rejects(imagefolder_matrix(tmp_path, root), f"datasets.imagefolder: cannot decode image file {bad}: ")
    assert "\n" not in str(error)


def test_imagefolder_corrupt_file_is_one_line_when_loading_too(tmp_path):
    root = image_tree(tmp_path / "data", {"train": {"a": 3, "b": 3}, "test": {"a": 2, "b": 2}})
    bad = root / "train" / "a" / "2.png"
    bad.write_bytes(bad.read_bytes()[:40])
    with pytest.raises(ValueError, match=re.escape(f"cannot decode image file {bad}: ")) as e:
        load_dataset("imagefolder", root=str(root))
    assert "\n" not in str(e.value) and e.value.__cause__ is None and e.value.__suppress_context__


# -- the same checks without a matrix ---------------------------------------------------------------------------

@pytest.mark.parametrize("build,param", [
    (lambda: ATTACKS.create("blended", alpha=1.5), "alpha"),
    (lambda: ATTACKS.create("badnets", value=300), "value"),
    (lambda: ATTACKS.create("badnets", cap_ratio="yes"), "cap_ratio"),
    (lambda: ATTACKS.create("sig", delta=-5), "delta"),
    (lambda: DEFENSES.create("ft", epochs="x"), "epochs"),
    (lambda: DEFENSES.create("ft", lr=True), "lr"),
    (lambda: create_model("cnn_small", 10, width="x"), "width"),
    (lambda: load_dataset("synthetic", train_size=0), "train_size"),
    (lambda: load_dataset("synthetic", image_size="big"), "image_size"),
], ids=["blended-alpha", "badnets-value", "cap_ratio", "sig-delta", "ft-epochs", "ft-lr", "cnn-width",
        "synthetic-train_size", "synthetic-image_size"])
def test_constructors_check_their_own_parameters(build, param):
    with pytest.raises(ParameterError) as e:
        build()
    assert e.value.param == param and "is not allowed; expected" in str(e.value)


def test_badnets_refuses_a_square_as_large_as_the_image():
    attack = ATTACKS.create("badnets", size=8)
    assert attack.apply_trigger(torch.zeros(1, 3, 9, 9, dtype=torch.uint8))[0, 0, 0, 0] == 0  # 8 < 9: fine
    with pytest.raises(ParameterError, match="size: 8 is not allowed; expected an integer in \\[1, 7\\] for 8x8"):
        attack.apply_trigger(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))


# -- through pytest ---------------------------------------------------------------------------------------------

def test_grid_with_a_bad_value_exits_4_quickly_with_one_line(tmp_path):
    path = write(tmp_path, GOOD.replace("blended: {alpha: 0.1}", "blended: {alpha: 1.5}"), name="bad.yaml")
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pytest", str(ROOT / "benchmarks"), "--matrix", str(path),
                           "--cache-dir", str(tmp_path / "cache"), "--results-dir", str(tmp_path / "res"), "-p",
                           "no:cacheprovider"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    elapsed = time.perf_counter() - start
    output = done.stdout + done.stderr
    assert done.returncode == 4, output
    lines = [line for line in output.splitlines() if "attacks.blended.alpha" in line]
    assert lines == [f"ERROR: {path}: attacks.blended.alpha: 1.5 is not allowed; expected a number in (0, 1]"], output
    assert "Traceback" not in output and len(output.strip().splitlines()) <= 3, output
    assert elapsed < 60, f"took {elapsed:.0f} s"  # imports torch and torchvision; nothing trains
    assert not (tmp_path / "cache").exists() and not (tmp_path / "res").exists()


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100"])
def test_missing_cifar_files_stop_at_load(tmp_path, dataset):
    text = GOOD.replace("datasets: [digits]", f"datasets: {{{dataset}: {{root: {tmp_path / 'nothing'}}}}}")
    rejects(write(tmp_path, text), f"datasets.{dataset}: dataset files not found")


# -- every mistake at once ----------------------------------------------------------------------------------------

SEVERAL_MISTAKES = {  # (old, new) -> the line that must say it
    ("poison_ratios: [0.1]", "poison_ratio: [0.1]"):
        "poison_ratio: unknown key (did you mean 'poison_ratios'?)",
    ("badnets: {}", "badnet: {}"): "attacks: 'badnet' is not a registered attack (did you mean 'badnets'?)",
    ("blended: {alpha: 0.1}", "blended: {alpah: 0.1}"):
        "attacks.blended: unknown parameter(s) ['alpah'] ('alpah': did you mean 'alpha'?)",
    ("sig: {}", "sig: {delta: -5}"): "attacks.sig.delta: -5 is not allowed",
    ("none: {}", "nonee: {}"): "defenses: 'nonee' is not a registered defense (did you mean 'none'?)",
    ("ft: {epochs: 2}", "ft: {epochs: -3}"): "defenses.ft.epochs: -3 is not allowed",
    ("training: {epochs: 2}", "training: {epochs: 2, schedule: cosin, batchsize: 8, lr: true}"):
        "training.schedule: 'cosin' is not allowed (did you mean 'cosine'?)",
}
TRAINING_KEY = "training: unknown key(s) ['batchsize'] ('batchsize': did you mean 'batch_size'?)"
TRAINING_LR = "training.lr: True is not allowed; expected a number"
RATIOS_MISSING = "poison_ratios: missing"  # the misspelt key leaves the right one missing


def several_mistakes_matrix(tmp_path: Path) -> Path:
    text = GOOD
    for old, new in SEVERAL_MISTAKES:
        text = text.replace(old, new, 1)
    return write(tmp_path, text, name="several.yaml")


def test_every_mistake_of_a_matrix_is_reported_at_once(tmp_path):
    path = several_mistakes_matrix(tmp_path)
    error = rejects(path, "poison_ratio: unknown key")
    lines = str(error).splitlines()
    for message in [*SEVERAL_MISTAKES.values(), TRAINING_KEY, TRAINING_LR, RATIOS_MISSING]:
        assert sum(message in line for line in lines) == 1, (message, lines)
    assert all(line.startswith(f"{path}: ") for line in lines), lines
    assert len(lines) == len(set(lines)) == len(SEVERAL_MISTAKES) + 3


def test_a_missing_axis_is_said_once_and_the_rest_still_checked(tmp_path):
    text = GOOD.replace("defenses: {none: {}, ft: {epochs: 2}}\n", "").replace("sig: {}", "sig: {delta: -5}")
    lines = str(rejects(write(tmp_path, text), "defenses: missing")).splitlines()
    assert [line.split(": ")[1] for line in lines] == ["defenses", "attacks.sig.delta"], lines


def test_grid_reports_every_mistake_before_anything_runs(tmp_path):
    path = several_mistakes_matrix(tmp_path)
    done = subprocess.run([sys.executable, "-m", "pytest", str(ROOT / "benchmarks"), "--matrix", str(path),
                           "--cache-dir", str(tmp_path / "cache"), "--results-dir", str(tmp_path / "res"), "-p",
                           "no:cacheprovider"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    output = done.stdout + done.stderr
    assert done.returncode == 4, output
    for message in [*SEVERAL_MISTAKES.values(), TRAINING_KEY, TRAINING_LR, RATIOS_MISSING]:
        assert message in output, output
    assert "Traceback" not in output, output
    assert not (tmp_path / "cache").exists() and not (tmp_path / "res").exists()
