"""A drill of bad inputs (issue 18): each stops ``load_matrix`` before anything trains with ONE line that names the
file, the key, the bad value and what is allowed; the few good-but-unusual inputs at the end load, with the
outcome stated. The slowest rejection is printed (``-s``) and bounded by ``SECONDS``.
"""
from __future__ import annotations

import os
import struct
import textwrap
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from backdoor.data._files import read_images
from backdoor.harness.matrix import MAX_CASES, MatrixError, load_matrix
from backdoor.models import create_model

SECONDS = 10.0  # the longest a rejection may take (this machine is shared; a rejection takes well under 1 s alone)
TIMES: dict[str, float] = {}
BASE = """\
name: drill
datasets: [digits]
models: [cnn_small]
attacks: {badnets: {}}
defenses: {none: {}, ft: {epochs: 1}}
poison_ratios: [0.1]
seeds: [0]
training: {epochs: 1}
"""


def _with(**lines: str) -> str:
    """BASE with top-level keys replaced (or added): ``_with(training="{lr: .nan}")``."""
    out = {line.split(":", 1)[0]: line for line in BASE.splitlines()}
    for key, value in lines.items():
        out[key] = f"{key}: {value}"
    return "\n".join(out.values()) + "\n"


# (id, matrix text, key, value as the message shows it, what is allowed (a fragment of the message))
MATRIX_INPUTS = [
    # -- training budgets: NaN, infinity and ranges ------------------------------------------------------------
    ("lr-nan", _with(training="{epochs: 1, lr: .nan}"), "training.lr", "nan", "a finite number > 0"),
    ("lr-inf", _with(training="{epochs: 1, lr: .inf}"), "training.lr", "inf", "a finite number > 0"),
    ("lr-minus-inf", _with(training="{epochs: 1, lr: -.inf}"), "training.lr", "-inf", "a finite number > 0"),
    ("lr-zero", _with(training="{epochs: 1, lr: 0}"), "training.lr", "0", "a number > 0"),
    ("lr-negative", _with(training="{epochs: 1, lr: -1}"), "training.lr", "-1", "a number > 0"),
    ("lr-string", _with(training="{epochs: 1, lr: fast}"), "training.lr", "'fast'", "a number"),
    ("momentum-5", _with(training="{epochs: 1, momentum: 5}"), "training.momentum", "5", "a number in [0, 1)"),
    ("momentum-1", _with(training="{epochs: 1, momentum: 1}"), "training.momentum", "1", "a number in [0, 1)"),
    ("momentum-negative", _with(training="{epochs: 1, momentum: -0.1}"), "training.momentum", "-0.1", "in [0, 1)"),
    ("momentum-nan", _with(training="{epochs: 1, momentum: .nan}"), "training.momentum", "nan", "a finite number"),
    ("wd-inf", _with(training="{epochs: 1, weight_decay: .inf}"), "training.weight_decay", "inf", "a finite number >= 0"),
    ("wd-nan", _with(training="{epochs: 1, weight_decay: .nan}"), "training.weight_decay", "nan", "a finite number"),
    ("wd-negative", _with(training="{epochs: 1, weight_decay: -1}"), "training.weight_decay", "-1", "a number >= 0"),
    ("crop-5000", _with(training="{epochs: 1, crop_padding: 5000}"), "training.crop_padding", "5000",
     "an integer in [0, 32] (at most the image side of digits)"),
    ("crop-33", _with(training="{epochs: 1, crop_padding: 33}"), "training.crop_padding", "33", "in [0, 32]"),
    ("crop-negative", _with(training="{epochs: 1, crop_padding: -1}"), "training.crop_padding", "-1", "an integer >= 0"),
    ("crop-float", _with(training="{epochs: 1, crop_padding: 2.5}"), "training.crop_padding", "2.5", "an integer"),
    ("epochs-0", _with(training="{epochs: 0}"), "training.epochs", "0", "a positive integer"),
    ("epochs-float", _with(training="{epochs: 1.5}"), "training.epochs", "1.5", "an integer"),
    ("batch-0", _with(training="{epochs: 1, batch_size: 0}"), "training.batch_size", "0", "a positive integer"),
    ("batch-bool", _with(training="{epochs: 1, batch_size: true}"), "training.batch_size", "True", "an integer"),
    ("schedule", _with(training="{epochs: 1, schedule: linear}"), "training.schedule", "'linear'", "cosine or constant"),
    ("unknown-training-key", _with(training="{epochs: 1, lr_decay: 2}"), "training", "lr_decay", "allowed:"),
    ("d-lr-nan", _with(defense_training="{lr: .nan}"), "defense_training.lr", "nan", "a finite number > 0"),
    ("d-momentum-1", _with(defense_training="{momentum: 1.0}"), "defense_training.momentum", "1.0", "in [0, 1)"),
    ("d-crop-64", _with(defense_training="{crop_padding: 64}"), "defense_training.crop_padding", "64", "in [0, 32]"),
    ("clean-fraction-nan", _with(defense_training="{clean_fraction: .nan}"), "defense_training.clean_fraction", "nan",
     "a finite number in (0, 1]"),
    ("clean-fraction-inf", _with(defense_training="{clean_fraction: .inf}"), "defense_training.clean_fraction", "inf",
     "a finite number in (0, 1]"),
    ("clean-fraction-0", _with(defense_training="{clean_fraction: 0}"), "defense_training.clean_fraction", "0",
     "a number in (0, 1]"),
    ("clean-fraction-2", _with(defense_training="{clean_fraction: 2}"), "defense_training.clean_fraction", "2",
     "in (0, 1]"),
    ("attack-training-lr-inf", _with(attacks="{badnets: {training: {lr: .inf}}}"), "attacks.badnets.training.lr",
     "inf", "a finite number > 0"),
    ("attack-training-crop", _with(attacks="{badnets: {training: {crop_padding: 999}}}"),
     "attacks.badnets.training.crop_padding", "999", "in [0, 32]"),
    # -- method and dataset parameters: NaN and infinity ----------------------------------------------------------
    ("blended-alpha-nan", _with(attacks="{blended: {alpha: .nan}}"), "attacks.blended.alpha", "nan", "a finite number"),
    ("blended-alpha-inf", _with(attacks="{blended: {alpha: .inf}}"), "attacks.blended.alpha", "inf", "a finite number"),
    ("sig-delta-nan", _with(attacks="{sig: {delta: .nan}}"), "attacks.sig.delta", "nan", "a finite number"),
    ("sig-frequency-inf", _with(attacks="{sig: {frequency: .inf}}"), "attacks.sig.frequency", "inf", "a finite number"),
    ("ft-lr-nan", _with(defenses="{ft: {lr: .nan}}"), "defenses.ft.lr", "nan", "a finite number or null"),
    ("ft-lr-inf", _with(defenses="{ft: {lr: .inf}}"), "defenses.ft.lr", "inf", "a finite number or null"),
    ("nc-lr-nan", _with(defenses="{nc: {lr: .nan}}"), "defenses.nc.lr", "nan", "a finite number"),
    ("synthetic-noise-nan", _with(datasets="{synthetic: {noise: .nan}}"), "datasets.synthetic.noise", "nan",
     "a finite number"),
    ("digits-fraction-inf", _with(datasets="{digits: {test_fraction: .inf}}"), "datasets.digits.test_fraction", "inf",
     "a finite number"),
    ("synthetic-train-size-huge", _with(datasets="{synthetic: {train_size: 1000000000000}}"),
     "datasets.synthetic.train_size", "1000000000000", "sizes whose images fit in 4 GiB"),
    ("synthetic-image-1024-huge", _with(datasets="{synthetic: {train_size: 2000000, image_size: 64}}"),
     "datasets.synthetic.train_size", "2000000", "fit in 4 GiB"),
    ("synthetic-classes-1", _with(datasets="{synthetic: {num_classes: 1}}"), "datasets.synthetic.num_classes", "1",
     "an integer >= 2"),
    ("synthetic-2px", _with(datasets="{synthetic: {image_size: 2}}", attacks="{badnets: {size: 1}}"),
     "training.crop_padding", "4", "in [0, 2]"),
    # -- poison ratios and case ids --------------------------------------------------------------------------------
    ("ratio-collides", _with(poison_ratios="[0.1, 0.10000000001]"), "poison_ratios", "0.10000000001",
     "same case id (p0.1) as 0.1"),
    ("ratio-twice", _with(poison_ratios="[0.1, 0.1]"), "poison_ratios", "0.1", "it is listed twice"),
    ("ratio-nan", _with(poison_ratios="[.nan]"), "poison_ratios", "nan", "(0, 1]"),
    ("ratio-inf", _with(poison_ratios="[.inf]"), "poison_ratios", "inf", "(0, 1]"),
    ("ratio-zero", _with(poison_ratios="[0]"), "poison_ratios", "0", "(0, 1]"),
    ("ratio-above-1", _with(poison_ratios="[1.5]"), "poison_ratios", "1.5", "(0, 1]"),
    ("ratio-bool", _with(poison_ratios="[true]"), "poison_ratios", "True", "(0, 1]"),
    ("ratio-empty", _with(poison_ratios="[]"), "poison_ratios", "[]", "a non-empty list"),
    # -- seeds and case counts -------------------------------------------------------------------------------------
    ("seeds-1e8", _with(seeds="100000000"), "seeds", "100000000", "a seed count in [1, 1000]"),
    ("seeds-1001", _with(seeds="1001"), "seeds", "1001", "a seed count in [1, 1000]"),
    ("seeds-0", _with(seeds="0"), "seeds", "0", "a seed count in [1, 1000]"),
    ("seeds-twice", _with(seeds="[0, 0]"), "seeds", "[0, 0]", "a seed is listed twice"),
    ("seeds-float", _with(seeds="[1.5]"), "seeds", "[1.5]", "a non-empty list of integers"),
    ("seeds-bool", _with(seeds="[true]"), "seeds", "[True]", "a non-empty list of integers"),
    ("seeds-string", _with(seeds="many"), "seeds", "'many'", "a count n"),
    ("too-many-cases", _with(seeds="1000", poison_ratios=str([round(0.01 * i, 2) for i in range(1, 101)])), "seeds",
     "cases", f"at most {MAX_CASES}"),
    # -- names ------------------------------------------------------------------------------------------------------
    ("name-newline", _with(name='"a\\nb"'), "name", "'a\\nb'", "printable characters"),
    ("name-tilde", _with(name='"~x"'), "name", "'~x'", "none of"),
    ("name-colon", _with(name='"a:b"'), "name", "'a:b'", "none of"),
    ("name-star", _with(name='"a*b"'), "name", "'a*b'", "none of"),
    ("name-question", _with(name='"a?b"'), "name", "'a?b'", "none of"),
    ("name-angle", _with(name='"a<b>"'), "name", "'a<b>'", "none of"),
    ("name-pipe", _with(name='"a|b"'), "name", "'a|b'", "none of"),
    ("name-quote", _with(name="'a\"b'"), "name", "'a\"b'", "none of"),
    ("name-300", _with(name="a" * 300), "name", "a" * 300, "at most 100"),
    ("name-slash", _with(name="a/b"), "name", "'a/b'", "none of"),
    ("name-dotdot", _with(name='".."'), "name", "'..'", "plain folder name"),
    ("name-hidden", _with(name=".hidden"), "name", "'.hidden'", "leading '.'"),
    ("name-empty", _with(name='""'), "name", "''", "plain folder name"),
    ("name-number", _with(name="42"), "name", "42", "plain folder name"),
    # -- registry names and wildcards -------------------------------------------------------------------------------
    ("wildcard-overlap", _with(attacks="{blend*: {}, blended: {alpha: 0.2}}"), "attacks.blended", "'blended'",
     "expected each name once"),
    ("wildcard-overlap-defenses", _with(defenses="{'*': {}, ft: {epochs: 1}}"), "defenses.ft", "'ft'",
     "expected each name once"),
    ("unknown-attack", _with(attacks="{badnet: {}}"), "attacks", "'badnet'", "allowed:"),
    ("unknown-defense", _with(defenses="{none: {}, fine_tune: {}}"), "defenses", "'fine_tune'", "allowed:"),
    ("unknown-param", _with(attacks="{badnets: {colour: red}}"), "attacks.badnets", "['colour']", "allowed:"),
    ("unknown-dataset", _with(datasets="[mnist]"), "datasets", "'mnist'", "allowed:"),
    ("target-out-of-range", _with(target="10"), "target", "10", "0..9"),
    ("target-nan", _with(target=".nan"), "target", "nan", ""),
    # -- the YAML itself ---------------------------------------------------------------------------------------------
    ("yaml-duplicate-key", BASE + "seeds: [1]\n", "malformed YAML", "duplicate key 'seeds'", "first at line"),
    ("yaml-top-list", "- a\n- b\n", "the matrix must be a mapping", "['a', 'b']", "datasets"),
    ("yaml-unknown-top-key", BASE + "budget: 3\n", "budget", "unknown key", "allowed keys"),
    ("yaml-unclosed", BASE + "extra: [1, 2\n", "malformed YAML", "line", "column"),
    ("yaml-tab", BASE + "\tbad: 1\n", "malformed YAML", "line", "column"),
]


def _alias_bomb(levels: int = 12) -> str:
    lines = ['a0: &a0 ["x", "x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, levels)]
    return BASE + "description:\n" + textwrap.indent("\n".join(lines), "  ") + "\n"


def write(tmp_path: Path, text: str | bytes, name: str = "m.yaml") -> Path:
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def one_line_rejection(path: Path, *fragments: str) -> str:
    """load_matrix(path) raises one MatrixError: one line, starting with the file, holding every fragment."""
    start = time.perf_counter()
    with pytest.raises(MatrixError) as e:
        load_matrix(path)
    TIMES[path.parent.name] = time.perf_counter() - start
    text = str(e.value)
    assert "\n" not in text, text
    assert text.startswith(f"{path}: "), text
    for fragment in fragments:
        assert fragment in text, (fragment, text)
    assert TIMES[path.parent.name] < SECONDS, f"took {TIMES[path.parent.name]:.1f} s"
    return text


@pytest.mark.parametrize("text,key,value,allowed", [p[1:] for p in MATRIX_INPUTS], ids=[p[0] for p in MATRIX_INPUTS])
def test_bad_matrix_value(tmp_path, text, key, value, allowed):
    one_line_rejection(write(tmp_path, text), f": {key}", value, allowed)


@pytest.mark.parametrize("text,fragments", [
    (_alias_bomb(), ("malformed YAML", "expands to more than 100000 values")),
    (BASE + "description: &r [*r]\n", ("malformed YAML",)),
    ("\ufeffname: x\n".encode("utf-16"), ("cannot read the matrix file", "not UTF-8", "expected UTF-8 text")),
    (b"\x89PNG\r\n\x1a\n\x00\x00binary", ("cannot read the matrix file", "expected UTF-8 text")),
    ("", ("the matrix must be a mapping",)),
], ids=["alias-bomb", "recursive-alias", "utf16", "binary", "empty"])
def test_bad_matrix_file(tmp_path, text, fragments):
    one_line_rejection(write(tmp_path, text), *fragments)


def test_a_directory_or_fifo_as_matrix(tmp_path):
    (tmp_path / "dir.yaml").mkdir()
    one_line_rejection(tmp_path / "dir.yaml", "not a regular file")
    os.mkfifo(tmp_path / "fifo.yaml")
    one_line_rejection(tmp_path / "fifo.yaml", "not a regular file")


def test_yaml_merge_keys_are_yaml(tmp_path):
    """``<<:`` merges a mapping; the entry's own keys win (not a duplicate key)."""
    text = BASE.replace("training: {epochs: 1}", "base: &b {epochs: 1, lr: 0.05}\ntraining: {<<: *b, lr: 0.02}")
    text = text.replace("base: &b", "description: &b")  # a key the matrix allows
    matrix = load_matrix(write(tmp_path, text))
    assert (matrix.training.epochs, matrix.training.lr) == (1, 0.02)


# -- data files -------------------------------------------------------------------------------------------------------
def _npz(tmp_path: Path, y_train=None, name="d.npz", **extra) -> Path:
    rng = np.random.default_rng(0)
    y = np.arange(40) % 4 if y_train is None else y_train
    arrays = dict(x_train=rng.integers(0, 256, (40, 3, 8, 8), dtype=np.uint8), y_train=np.asarray(y),
                  x_test=rng.integers(0, 256, (8, 3, 8, 8), dtype=np.uint8), y_test=np.arange(8) % 4)
    arrays.update(extra)
    np.savez(tmp_path / name, **arrays)
    return tmp_path / name


def _npz_matrix(tmp_path: Path, path: str, extra: str = "") -> Path:
    return write(tmp_path, _with(datasets=f"{{npz: {{path: '{path}'{extra}}}}}",
                                 training="{epochs: 1, crop_padding: 0}",
                                 attacks="{badnets: {size: 2}}"))


@pytest.mark.parametrize("label,fragment", [(10 ** 9, "the label 1000000000"), (2 ** 62, f"the label {2 ** 62}"),
                                            (-3, "negative label -3")], ids=["label-1e9", "label-2^62", "label-neg"])
def test_npz_stray_label(tmp_path, label, fragment):
    y = np.arange(40) % 4
    y[7] = label
    path = _npz(tmp_path, y.astype(np.int64))
    one_line_rejection(_npz_matrix(tmp_path, str(path)), "datasets.npz", fragment)


def test_npz_num_classes_beyond_the_data(tmp_path):
    path = _npz(tmp_path)
    one_line_rejection(_npz_matrix(tmp_path, str(path), ", num_classes: 1000000000"), "datasets.npz",
                       "num_classes 1000000000 is not allowed", "at most as many classes as the 40 training samples")


def test_npz_test_split_of_the_target_class_only(tmp_path):
    path = _npz(tmp_path, y_test=np.zeros(8, dtype=np.int64))
    one_line_rejection(_npz_matrix(tmp_path, str(path)), "target", "0", "no test image of another class")


@pytest.mark.parametrize("kind", ["symlink-loop", "fifo", "dev-zero"])
def test_npz_path_that_is_not_a_file(tmp_path, kind):
    target = tmp_path / "bad.npz"
    if kind == "symlink-loop":
        os.symlink(tmp_path / "loop2.npz", target)
        os.symlink(target, tmp_path / "loop2.npz")
    elif kind == "fifo":
        os.mkfifo(target)
    else:
        target = Path("/dev/zero")
    one_line_rejection(_npz_matrix(tmp_path, str(target)), "datasets.npz", str(target), "not a regular file")


def _tree(root: Path, save) -> Path:
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(2):
                Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / split / c / f"{i}.png")
    save(root / "train" / "a" / "odd.png")
    return root


def _tree_matrix(tmp_path: Path, root: Path) -> Path:
    return write(tmp_path, _with(datasets=f"{{imagefolder: {{root: '{root}', image_size: 8}}}}",
                                 training="{epochs: 1, crop_padding: 0}", attacks="{badnets: {size: 2}}"))


def _png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG whose header says width x height (PIL reads the size without decoding)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) +
                     chunk(b"IEND", b""))


@pytest.mark.parametrize("width,fragment", [(10000, "10000x10000 pixels is not allowed"),
                                            (20000, "cannot decode image file")], ids=["1e8-pixels", "4e8-pixels"])
def test_huge_png(tmp_path, width, fragment):
    root = _tree(tmp_path / "tree", lambda p: _png_header_only(p, width, width))
    one_line_rejection(_tree_matrix(tmp_path, root), "datasets.imagefolder", "odd.png", fragment)


def test_transparent_png_is_refused_with_a_reason(tmp_path):
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[..., 3] = 255
    rgba[0, 0, 3] = 0
    root = _tree(tmp_path / "tree", lambda p: Image.fromarray(rgba, "RGBA").save(p))
    one_line_rejection(_tree_matrix(tmp_path, root), "datasets.imagefolder", "odd.png", "has transparent pixels",
                       "expected opaque images")


def test_opaque_rgba_and_16_bit_pngs_are_converted_correctly(tmp_path):
    """An opaque alpha channel is dropped; a 16-bit grey PNG keeps its levels (the high byte), not 2 values."""
    rgba = np.full((8, 8, 4), 255, dtype=np.uint8)
    rgba[..., 0] = 7
    Image.fromarray(rgba, "RGBA").save(tmp_path / "opaque.png")
    ramp = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1024).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "wide.png")
    x = read_images([tmp_path / "opaque.png", tmp_path / "wide.png"], 8)
    assert (x[0, 0] == 7).all() and (x[0, 1:] == 255).all()
    assert torch.equal(x[1, 0], torch.from_numpy((ramp >> 8).astype(np.uint8)))
    assert len(x[1].unique()) == 64


# -- user models --------------------------------------------------------------------------------------------------------
def _checkpoint(tmp_path: Path, change=None, name="m.safetensors") -> Path:
    state = {k: v.clone().contiguous() for k, v in create_model("cnn_small", num_classes=10).state_dict().items()}
    if change:
        change(state)
    save_file(state, str(tmp_path / name))
    return tmp_path / name


def _user_matrix(tmp_path: Path, entry: str) -> Path:
    body = textwrap.indent(textwrap.dedent(entry).strip(), "    ")
    return write(tmp_path, f"name: mine\ndatasets: [digits]\nmodels:\n  mine:\n{body}\ndefenses: [none]\n")


def _nan_weight(state):
    first = next(k for k in state if k.startswith("net.") and state[k].is_floating_point())
    state[first][0] = float("nan")


def _int_weights(state):
    for k in list(state):
        if k.startswith("net.") and state[k].is_floating_point():
            state[k] = torch.zeros_like(state[k], dtype=torch.int64)


def _inf_std(state):
    state["std"][0] = float("inf")


def _nan_mean(state):
    state["mean"][0] = float("nan")


@pytest.mark.parametrize("change,extra,key,fragments", [
    (_nan_weight, "", "checkpoint", ("holds NaN or infinite values", "expected finite weights")),
    (_int_weights, "", "checkpoint", ("is int64", "expected floating-point weights")),
    (_inf_std, "normalize: checkpoint", "normalize", ("inf", "expected finite values, std > 0")),
    (_nan_mean, "normalize: checkpoint", "normalize", ("nan", "expected finite values, std > 0")),
    (None, "normalize: {mean: [.nan], std: [1]}", "normalize", ("nan", "one finite number per channel")),
    (None, "normalize: {mean: [0], std: [.inf]}", "normalize", ("inf", "one finite number per channel")),
    (None, "normalize: {mean: [0], std: [0]}", "normalize", ("std > 0",)),
], ids=["nan-weight", "int64-zero-weights", "inf-std-buffer", "nan-mean-buffer", "nan-mean", "inf-std", "zero-std"])
def test_user_checkpoint_values(tmp_path, change, extra, key, fragments):
    path = _checkpoint(tmp_path, change)
    matrix = _user_matrix(tmp_path, f"checkpoint: {path}\narch: cnn_small\n{extra}")
    one_line_rejection(matrix, f"models.mine.{key}", *fragments)


@pytest.mark.parametrize("damage", ["truncated", "header-2^40", "empty"])
def test_damaged_safetensors(tmp_path, damage):
    path = _checkpoint(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncated" else
                     struct.pack("<Q", 2 ** 40) + data[8:] if damage == "header-2^40" else b"")
    one_line_rejection(_user_matrix(tmp_path, f"checkpoint: {path}\narch: cnn_small"), "models.mine.checkpoint",
                       str(path))


def _images_file(tmp_path: Path, n=4, side=32, labels=None, name="t.safetensors") -> Path:
    y = torch.tensor(labels if labels is not None else [1] * n, dtype=torch.int64)
    save_file({"x": torch.zeros(n, 3, side, side, dtype=torch.uint8), "y": y}, str(tmp_path / name))
    return tmp_path / name


@pytest.mark.parametrize("part,file_args,fragment", [
    ("poisoned_train", dict(labels=[1, 2, 99, 3]), "label 99 is not allowed; expected class indices 0..9"),
    ("poisoned_train", dict(labels=[1, -3, 2, 3]), "label -3 is not allowed; expected class indices 0..9"),
    ("poisoned_train", dict(side=16), "images are 16x16 pixels; expected the dataset's 32x32"),
    ("trigger", dict(n=0, labels=[]), "holds no images; expected at least one"),
    ("trigger", dict(labels=[1, 2, 3, 10]), "label 10 is not allowed"),
    ("trigger", dict(labels=[0, 0, 0, 0]), "holds images of the target class 0 only"),
], ids=["train-label-99", "train-label-minus-3", "train-16px", "empty-trigger", "trigger-label-10", "trigger-target-only"])
def test_user_tensor_files(tmp_path, part, file_args, fragment):
    path = _checkpoint(tmp_path)
    data = _images_file(tmp_path, **file_args)
    value = f"{{images: {data}}}" if part == "trigger" else str(data)
    one_line_rejection(_user_matrix(tmp_path, f"checkpoint: {path}\narch: cnn_small\n{part}: {value}"),
                       f"models.mine.{part}", str(data), fragment)


@pytest.mark.parametrize("label", ["my~model", "a:b", "x" * 120])
def test_user_model_label(tmp_path, label):
    path = _checkpoint(tmp_path)
    text = f"name: mine\ndatasets: [digits]\nmodels:\n  '{label}':\n    checkpoint: {path}\n    arch: cnn_small\n" \
           "defenses: [none]\n"
    one_line_rejection(write(tmp_path, text), f"models.{label}", "is not allowed")


def test_every_problem_of_a_matrix_is_reported_in_one_pass(tmp_path):
    """Four independent problems: four lines, each naming the file, its key, its value and what is allowed."""
    path = write(tmp_path, _with(name='"a:b"', seeds="0", poison_ratios="[0.1, 0.1]",
                                 training="{epochs: 1, lr: .nan}"))
    with pytest.raises(MatrixError) as e:
        load_matrix(path)
    lines = str(e.value).splitlines()
    assert len(lines) == 4, lines
    assert all(line.startswith(f"{path}: ") for line in lines)
    for key, value in (("poison_ratios", "0.1"), ("seeds", "0"), ("training.lr", "nan"), ("name", "'a:b'")):
        assert any(f": {key}: {value}" in line and "expected" in line for line in lines), (key, lines)


@pytest.mark.parametrize("subfolders,found", [(["0", "42"], "['42']"), (["0", "cat"], "['cat']"), ([], "found none")],
                         ids=["class-42", "class-name", "no-classes"])
def test_trigger_image_folder_classes_are_checked_at_load(tmp_path, subfolders, found):
    """A folder of triggered images holds one sub-folder per true class, named by its index: a sub-folder 42 of a
    10-class dataset once failed only at run time (even the none case)."""
    path = _checkpoint(tmp_path)
    folder = tmp_path / "triggered"
    folder.mkdir()
    for name in subfolders:
        (folder / name).mkdir()
    one_line_rejection(_user_matrix(tmp_path, f"checkpoint: {path}\narch: cnn_small\ntrigger: {{images: {folder}}}"),
                       "models.mine.trigger.images", str(folder), "named by its index 0..9", found)
