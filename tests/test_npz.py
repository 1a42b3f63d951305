"""The ``npz`` reader, on small archives written under tmp_path: round trip, the data root, every error (at load
and at matrix load), and the content digest that keys its cache."""
from __future__ import annotations

import os
import re
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from backdoor._checks import ParameterError
from backdoor.data import (DATASETS, DatasetNotFoundError, channel_stats, check_dataset, dataset_from_tensors,
                           dataset_to_tensors, load_dataset, num_classes_of)
from backdoor.harness.matrix import MatrixError, load_matrix
from backdoor.harness.case import Case
from backdoor.harness import specs

NAMES = np.array(["stop", "yield", "priority"])


def arrays(n_train: int = 6, n_test: int = 3, side: int = 4) -> dict[str, np.ndarray]:
    """Images whose pixels encode (image, channel, row, column); labels cycle through 3 classes."""
    def images(n, offset):
        i, c, h, w = np.meshgrid(np.arange(n), np.arange(3), np.arange(side), np.arange(side), indexing="ij")
        return ((offset + 7 * i + 50 * c + 3 * h + w) % 256).astype(np.uint8)
    return {"x_train": images(n_train, 0), "y_train": np.arange(n_train) % 3,
            "x_test": images(n_test, 100), "y_test": (np.arange(n_test) + 1) % 3}


def write(path: Path, compressed: bool = False, drop: tuple[str, ...] = (), **changes) -> Path:
    entries = {**arrays(), **changes}
    entries = {k: v for k, v in entries.items() if k not in drop}
    path.parent.mkdir(parents=True, exist_ok=True)
    (np.savez_compressed if compressed else np.savez)(path, **entries)
    return path


# -- round trip -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("compressed", [False, True], ids=["savez", "savez_compressed"])
def test_round_trip(tmp_path, compressed):
    file = write(tmp_path / "d.npz", compressed, class_names=NAMES)
    data = load_dataset("npz", path=str(file))
    a = arrays()
    assert torch.equal(data.train.x, torch.from_numpy(a["x_train"])) and data.train.y.dtype == torch.int64
    assert data.train.y.tolist() == a["y_train"].tolist() and data.test.y.tolist() == a["y_test"].tolist()
    assert torch.equal(data.test.x, torch.from_numpy(a["x_test"]))
    assert data.num_classes == 3 and data.image_shape == (3, 4, 4)
    assert data.hflip is False  # the default: signs, digits and text must not be mirrored
    assert (data.mean, data.std) == channel_stats(data.train.x)
    assert data.params["class_names"] == ["stop", "yield", "priority"]
    assert data.params["sha256"] == DATASETS.get("npz").fingerprint({"path": str(file)})["sha256"]
    back = dataset_from_tensors(*dataset_to_tensors(data))
    assert torch.equal(back.train.x, data.train.x) and back.params == data.params and back.hflip is False


def test_options_and_label_dtypes(tmp_path):
    a = arrays()
    file = write(tmp_path / "d.npz", y_train=a["y_train"].astype(np.uint8), y_test=a["y_test"].astype(np.int32),
                 class_folder=np.array(["a", "b", "c", "d", "e"]))
    data = load_dataset("npz", path=str(file), num_classes=5, hflip=True, normalize=False)
    assert data.num_classes == 5 and data.hflip is True and data.train.y.dtype == torch.int64
    assert data.mean == (0.0, 0.0, 0.0) and data.std == (1.0, 1.0, 1.0)
    assert data.params["class_names"] == ["a", "b", "c", "d", "e"]  # class_folder, when class_names is absent
    assert num_classes_of("npz", {"path": str(file), "num_classes": 5}) == 5


def test_channels_last_is_transposed(tmp_path):
    a = arrays()
    first = load_dataset("npz", path=str(write(tmp_path / "first.npz")))
    last = write(tmp_path / "last.npz", x_train=a["x_train"].transpose(0, 2, 3, 1).copy(),
                 x_test=a["x_test"].transpose(0, 2, 3, 1).copy())
    data = load_dataset("npz", path=str(last))
    assert torch.equal(data.train.x, first.train.x) and torch.equal(data.test.x, first.test.x)
    assert data.train.x.is_contiguous() and check_dataset("npz", {"path": str(last)}) == 4


# -- the data root ----------------------------------------------------------------------------------------------
def test_relative_path_resolves_under_the_data_root(tmp_path, monkeypatch):
    write(tmp_path / "env" / "sub" / "d.npz")
    write(tmp_path / "given" / "d.npz", y_test=np.array([2, 2, 2]))
    monkeypatch.setenv("BACKDOOR_DATA_ROOT", str(tmp_path / "env"))
    assert load_dataset("npz", path="sub/d.npz").test.y.tolist() == [1, 2, 0]
    assert load_dataset("npz", path="d.npz", root=str(tmp_path / "given")).test.y.tolist() == [2, 2, 2]
    # an absolute path does not depend on the root
    absolute = str(tmp_path / "given" / "d.npz")
    assert load_dataset("npz", path=absolute, root=str(tmp_path / "nowhere")).test.y.tolist() == [2, 2, 2]
    assert check_dataset("npz", {"path": "sub/d.npz"}) == 4 and num_classes_of("npz", {"path": "sub/d.npz"}) == 3


def test_missing_file_names_the_resolved_path_and_the_data_root(tmp_path, monkeypatch):
    monkeypatch.setenv("BACKDOOR_DATA_ROOT", str(tmp_path / "root"))
    for call in (lambda: load_dataset("npz", path="gtsrb32.npz"),
                 lambda: check_dataset("npz", {"path": "gtsrb32.npz"})):
        with pytest.raises(DatasetNotFoundError) as e:
            call()
        message = str(e.value)
        assert f"dataset file {tmp_path / 'root' / 'gtsrb32.npz'} not found (data root {tmp_path / 'root'})" in message
        assert "BACKDOOR_DATA_ROOT" in message and "`root`" in message and "numpy.savez" in message
    assert num_classes_of("npz", {"path": "gtsrb32.npz"}) is None  # only the check tells what is wrong
    (tmp_path / "root" / "dir.npz").mkdir(parents=True)
    with pytest.raises(DatasetNotFoundError, match="dir.npz is a directory, not an .npz file"):
        load_dataset("npz", path="dir.npz")


def test_path_is_required(tmp_path):
    with pytest.raises(DatasetNotFoundError) as e:
        load_dataset("npz", root=str(tmp_path))
    assert f"no .npz file given: set the parameter `path` (a file name under the data root {tmp_path}," in str(e.value)
    with pytest.raises(ParameterError, match="npz: path: None is not allowed; expected an .npz file"):
        check_dataset("npz", {"root": str(tmp_path)})


# -- every error names the file, the key and what is allowed -------------------------------------------------------
a = arrays()
BAD = {
    "missing-key": (dict(drop=("y_test",)),
                    "missing key(s) y_test; the file has: x_test, x_train, y_train; expected x_train, y_train, "
                    "x_test, y_test"),
    "float-images": (dict(x_train=a["x_train"].astype(np.float32) / 255),
                     "x_train has dtype float32; expected uint8 images [N, 3, H, W]"),
    "float-labels": (dict(y_test=a["y_test"].astype(np.float64)),
                     "y_test has dtype float64; expected integer labels [N]"),
    "bool-labels": (dict(y_test=a["y_test"] > 0), "y_test has dtype bool; expected integer labels [N]"),
    "grey-images": (dict(x_test=a["x_test"][:, 0]), "x_test has 3 axes (3, 4, 4); expected uint8 images [N, 3, H, W]"),
    "no-channel-axis": (dict(x_train=np.zeros((6, 4, 4, 4), np.uint8)),
                        "x_train has shape (6, 4, 4, 4), with no axis of 3 channels"),
    "ambiguous": (dict(x_train=np.zeros((6, 3, 4, 3), np.uint8)),
                  "x_train has shape (6, 3, 4, 3): ambiguous between channels first and channels last; "
                  "store it as [N, 3, H, W]"),
    "sizes-differ": (dict(x_test=np.zeros((3, 3, 5, 5), np.uint8)),
                     "x_train images are 4x4 but x_test images are 5x5; both splits need the same size"),
    "empty-split": (dict(x_test=np.zeros((0, 3, 4, 4), np.uint8), y_test=np.zeros(0, np.int64)),
                    "x_test has shape (0, 3, 4, 4), which holds no image"),
    "labels-2d": (dict(y_train=a["y_train"][:, None]), "y_train has shape (6, 1); expected integer labels [N]"),
    "lengths-differ": (dict(y_train=a["y_train"][:5]),
                       "y_train has 5 labels for the 6 images of x_train; expected one label per image"),
    "negative-label": (dict(y_test=np.array([0, -1, 2])),
                       "y_test holds the negative label -1; labels are class indices 0..num_classes-1"),
    "one-class": (dict(y_train=np.zeros(6, np.int64), y_test=np.zeros(3, np.int64)),
                  "every label is 0, so there is 1 class; a classifier needs at least 2"),
    "names-count": (dict(class_names=NAMES[:2]), "class_names has 2 names for 3 classes; expected one per class"),
    "names-numbers": (dict(class_names=np.arange(3)), "class_names is int64 (3,); expected one string per class"),
    "object-labels": (dict(y_train=np.array(list(range(6)), dtype=object)),
                      "y_train is an object array (stored with pickle), which is not loaded"),
}


@pytest.mark.parametrize("changes,message", BAD.values(), ids=BAD.keys())
def test_bad_arrays_are_named_at_load_and_at_check(tmp_path, changes, message):
    file = write(tmp_path / "d.npz", **changes)
    for call in (lambda: load_dataset("npz", path=str(file)), lambda: check_dataset("npz", {"path": str(file)})):
        with pytest.raises(ValueError) as e:
            call()
        assert str(e.value) == f"npz: {file}: {message}" or str(e.value).startswith(f"npz: {file}: {message}"), e.value


def test_label_outside_num_classes(tmp_path):
    file = write(tmp_path / "d.npz")
    with pytest.raises(ValueError, match=r"y_train holds the label 2, outside 0..1 \(num_classes 2\)"):
        load_dataset("npz", path=str(file), num_classes=2)
    with pytest.raises(ParameterError, match="npz: num_classes: 1 is not allowed; expected an integer >= 2"):
        check_dataset("npz", {"path": str(file), "num_classes": 1})
    with pytest.raises(ParameterError, match="npz: hflip: 'no' is not allowed; expected true or false"):
        check_dataset("npz", {"path": str(file), "hflip": "no"})


def test_files_that_are_not_npz_archives(tmp_path):
    text = tmp_path / "notes.npz"
    text.write_text("not an archive")
    with pytest.raises(ValueError, match=re.escape(f"npz: {text} is not an .npz archive (")):
        load_dataset("npz", path=str(text))
    single = tmp_path / "one.npy"
    np.save(single, np.zeros((2, 3), np.uint8))
    with pytest.raises(ValueError, match=re.escape(f"npz: {single} holds a single array uint8 (2, 3), not an .npz")):
        check_dataset("npz", {"path": str(single)})


def test_check_reads_headers_and_labels_not_images(tmp_path, monkeypatch):
    file = write(tmp_path / "d.npz", compressed=True)
    read = []
    original = np.lib.npyio.NpzFile.__getitem__
    monkeypatch.setattr(np.lib.npyio.NpzFile, "__getitem__", lambda self, key: read.append(key) or original(self, key))
    assert check_dataset("npz", {"path": str(file)}) == 4 and num_classes_of("npz", {"path": str(file)}) == 3
    assert set(read) == {"y_train", "y_test"}


# -- in a matrix ----------------------------------------------------------------------------------------------------
MATRIX = """
name: m
datasets: {{npz: {{path: {path}}}}}
models: [cnn_small]
attacks: [badnets]
defenses: [none]
poison_ratios: [0.1]
target: {target}
training: {{epochs: 1}}
"""


def matrix(tmp_path: Path, path: str, target: int = 0) -> Path:
    file = tmp_path / "m.yaml"
    file.write_text(textwrap.dedent(MATRIX.format(path=path, target=target)))
    return file


def test_matrix_loads_through_the_data_root(tmp_path, monkeypatch):
    write(tmp_path / "root" / "d.npz", x_train=np.zeros((6, 3, 8, 8), np.uint8),
          x_test=np.zeros((3, 3, 8, 8), np.uint8))
    monkeypatch.setenv("BACKDOOR_DATA_ROOT", str(tmp_path / "root"))
    assert load_matrix(matrix(tmp_path, "d.npz")).datasets == {"npz": {"path": "d.npz"}}
    with pytest.raises(MatrixError, match="target: 3 is outside npz's classes; allowed: 0..2"):
        load_matrix(matrix(tmp_path, "d.npz", target=3))


def test_matrix_stops_at_load_on_a_bad_file(tmp_path, monkeypatch):
    monkeypatch.setenv("BACKDOOR_DATA_ROOT", str(tmp_path / "root"))
    path = matrix(tmp_path, "d.npz")
    file = tmp_path / "root" / "d.npz"
    with pytest.raises(MatrixError, match=re.escape(f"{path}: datasets.npz: dataset file {file} not found")):
        load_matrix(path)
    assert load_matrix(path, check_data=False).datasets == {"npz": {"path": "d.npz"}}  # only the files are skipped
    write(file, drop=("x_test",))
    with pytest.raises(MatrixError, match=re.escape(f"{path}: datasets.npz: {file}: missing key(s) x_test")):
        load_matrix(path, check_data=False)


# -- the cache key follows the file's content -------------------------------------------------------------------
def test_fingerprint_follows_the_content(tmp_path):
    fingerprint = DATASETS.get("npz").fingerprint
    params = {"path": "d.npz", "root": str(tmp_path)}
    assert fingerprint(params) == {"sha256": None}
    file = write(tmp_path / "d.npz")
    first = fingerprint(params)
    assert first["sha256"] is not None and fingerprint(params) == first
    # replaced (a new file moved over it), same size: another digest
    write(tmp_path / "new.npz", y_test=np.array([0, 0, 0]))
    os.replace(tmp_path / "new.npz", file)
    second = fingerprint(params)
    assert second != first and second["sha256"] == load_dataset("npz", **params).params["sha256"]
    # rewritten in place (same inode and size), with a later modification time: another digest
    write(file, y_test=np.array([1, 1, 1]))
    st = os.stat(file)
    os.utime(file, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert fingerprint(params) not in (first, second)
    # the same content elsewhere (another data root) has the same digest
    (tmp_path / "copy").mkdir()
    (tmp_path / "copy" / "d.npz").write_bytes(file.read_bytes())
    assert fingerprint({"path": "d.npz", "root": str(tmp_path / "copy")}) == fingerprint(params)


def test_dataset_cache_spec_changes_when_the_file_changes(tmp_path):
    file = write(tmp_path / "d.npz")
    case = Case(matrix="m", dataset="npz", model="cnn_small", attack="clean", defense="none", ratio=0.0, seed=0,
                dataset_params={"path": "d.npz", "root": str(tmp_path)})
    before = specs.dataset_spec(case)
    write(tmp_path / "new.npz", y_test=np.array([0, 0, 0]))
    os.replace(tmp_path / "new.npz", file)
    assert specs.dataset_spec(case) != before
