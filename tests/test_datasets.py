"""The on-disk dataset readers, on tiny fake trees written in the official formats under tmp_path."""
from __future__ import annotations

import inspect
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from backdoor.data import (DATASETS, DatasetNotFoundError, channel_stats, dataset_from_tensors, dataset_to_tensors,
                           load_dataset, num_classes_of)
from backdoor.data._files import chunked_channel_stats, read_images


# -- writers of the official formats ---------------------------------------------------------------------------
def cifar_images(n: int, offset: int) -> np.ndarray:
    """[N, 3072] uint8 rows: image i has R plane = offset+i, G plane = 100+i, B plane = 200+i (mod 256)."""
    planes = np.stack([np.full((n, 1024), v, dtype=np.int64) + np.arange(n)[:, None] for v in (offset, 100, 200)],
                      axis=1)
    return (planes % 256).astype(np.uint8).reshape(n, 3072)


def write_pickle(path: Path, entry: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(entry, f)


def write_cifar10(base: Path, per_batch: int = 3) -> Path:
    folder = base / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for b in range(1, 6):
        labels = [(b + i) % 10 for i in range(per_batch)]
        write_pickle(folder / f"data_batch_{b}", {"batch_label": f"training batch {b} of 5",
                                                  "data": cifar_images(per_batch, 10 * b), "labels": labels,
                                                  "filenames": [f"b{b}_{i}.png" for i in range(per_batch)]})
    write_pickle(folder / "test_batch", {"data": cifar_images(4, 0), "labels": [9, 8, 7, 6]})
    return folder


def write_cifar100(base: Path) -> Path:
    folder = base / "cifar-100-python"
    folder.mkdir(parents=True)
    write_pickle(folder / "train", {"data": cifar_images(5, 0), "fine_labels": [99, 0, 50, 1, 2],
                                    "coarse_labels": [19, 0, 10, 0, 1]})
    write_pickle(folder / "test", {"data": cifar_images(2, 7), "fine_labels": [42, 43], "coarse_labels": [5, 6]})
    return folder


def solid(size: tuple[int, int], colour: tuple[int, int, int]) -> Image.Image:
    return Image.new("RGB", size, colour)


def write_gtsrb_official(base: Path, test_csv_at: str = "root") -> dict:
    """Classes 0 and 2 (two training images each, odd sizes), three test images listed out of label order."""
    train = base / "GTSRB" / "Final_Training" / "Images"
    header = "Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId\n"
    colours = {0: (255, 0, 0), 2: (0, 0, 255)}
    for label, colour in colours.items():
        folder = train / f"{label:05d}"
        folder.mkdir(parents=True)
        rows = []
        for i, size in enumerate([(40, 30), (20, 25)]):
            name = f"{label:05d}_{i:05d}.ppm"
            solid(size, colour).save(folder / name)
            rows.append(f"{name};{size[0]};{size[1]};1;1;{size[0] - 2};{size[1] - 2};{label}\n")
        (folder / f"GT-{label:05d}.csv").write_text(header + "".join(rows))
    test = base / "GTSRB" / "Final_Test" / "Images"
    test.mkdir(parents=True)
    # 00001.ppm: sign region x 5..14, y 10..19 (inclusive) inside a white border: green, last column blue.
    img = solid((30, 40), (255, 255, 255))
    img.paste(solid((10, 10), (0, 255, 0)), (5, 10))
    img.paste(solid((1, 10), (0, 0, 255)), (14, 10))
    img.save(test / "00001.ppm")
    solid((50, 50), (0, 0, 255)).save(test / "00000.ppm")
    solid((32, 32), (255, 0, 0)).save(test / "00002.ppm")
    rows = ["00001.ppm;30;40;5;10;14;19;42\n", "00000.ppm;50;50;0;0;49;49;2\n", "00002.ppm;32;32;0;0;31;31;0\n"]
    csv_dir = {"root": base, "final_test": base / "GTSRB" / "Final_Test"}[test_csv_at]
    (csv_dir / "GT-final_test.csv").write_text(header + "".join(rows))
    # The unlabelled test annotation of GTSRB_Final_Test_Images.zip has no ClassId and must not be used.
    (test / "GT-final_test.test.csv").write_text("Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2\n")
    return colours


def write_tiny(base: Path) -> list[str]:
    folder = base / "tiny-imagenet-200"
    wnids = ["n09999999", "n01443537", "n05555555"]  # deliberately not sorted: the line number is the label
    (folder / "val" / "images").mkdir(parents=True)
    (folder / "wnids.txt").write_text("\n".join(wnids) + "\n")
    for c, wnid in enumerate(wnids):
        images = folder / "train" / wnid / "images"
        images.mkdir(parents=True)
        for i in (10, 2, 0):  # written out of order; read in numeric order 0, 2, 10
            solid((64, 64), (20 * i, 80 * c, 0)).save(images / f"{wnid}_{i}.JPEG", quality=95)
        (folder / "train" / wnid / f"{wnid}_boxes.txt").write_text("")
    Image.new("L", (64, 64), 128).save(folder / "val" / "images" / "val_0.JPEG", quality=95)  # grey-scale
    solid((64, 64), (0, 0, 250)).save(folder / "val" / "images" / "val_1.JPEG", quality=95)
    (folder / "val" / "val_annotations.txt").write_text(
        f"val_0.JPEG\t{wnids[2]}\t0\t0\t63\t63\nval_1.JPEG\t{wnids[0]}\t1\t2\t60\t61\n")
    return wnids


def write_imagefolder(base: Path, classes=("cat", "ant", "bee"), test_classes=None) -> None:
    for split, names in (("train", classes), ("test", test_classes or classes)):
        for c, name in enumerate(reversed(sorted(names))):  # created in reverse order
            folder = base / split / name
            (folder / "nested").mkdir(parents=True)
            colour = {"ant": (255, 0, 0), "bee": (0, 255, 0), "cat": (0, 0, 255)}.get(name, (9, 9, 9))
            solid((48, 20), colour).save(folder / "b.png")
            solid((10, 10), colour).convert("RGBA").save(folder / "nested" / "a.png")
            (folder / "notes.txt").write_text("not an image")
            (folder / ".hidden.png").write_bytes(b"not an image either")


# -- CIFAR -----------------------------------------------------------------------------------------------------
def test_cifar10_reads_the_official_pickles(tmp_path):
    write_cifar10(tmp_path)
    data = load_dataset("cifar10", root=str(tmp_path))
    assert data.train.x.shape == (15, 3, 32, 32) and data.test.x.shape == (4, 3, 32, 32)
    assert data.train.x.dtype == torch.uint8 and data.train.y.dtype == torch.int64
    # batches 1..5 concatenated in order; labels as stored
    assert data.train.y.tolist() == [(b + i) % 10 for b in range(1, 6) for i in range(3)]
    assert data.test.y.tolist() == [9, 8, 7, 6]
    # rows are R, G, B planes of 32x32 in row-major order
    assert (data.train.x[4, 0] == 21).all() and (data.train.x[4, 1] == 101).all() and (data.train.x[4, 2] == 201).all()
    assert data.num_classes == 10 and data.hflip
    assert data.mean == (0.4914, 0.4822, 0.4465) and data.std == (0.247, 0.243, 0.261)
    assert "root" not in data.params


def test_cifar100_uses_fine_labels_and_accepts_the_folder_itself(tmp_path):
    folder = write_cifar100(tmp_path)
    for root in (tmp_path, folder):
        data = load_dataset("cifar100", root=str(root))
        assert data.train.y.tolist() == [99, 0, 50, 1, 2] and data.test.y.tolist() == [42, 43]
        assert data.num_classes == 100 and data.std == (0.2673, 0.2564, 0.2762)
        assert (data.test.x[1, 0] == 8).all()


def test_cifar_default_root_comes_from_the_environment(tmp_path, monkeypatch):
    write_cifar10(tmp_path / "data")
    monkeypatch.setenv("BACKDOOR_DATA_ROOT", str(tmp_path / "data"))
    assert len(load_dataset("cifar10").train) == 15


def test_cifar_missing_or_bad_files(tmp_path):
    folder = write_cifar10(tmp_path)
    (folder / "data_batch_3").unlink()
    with pytest.raises(DatasetNotFoundError) as e:
        load_dataset("cifar10", root=str(tmp_path))
    message = str(e.value)
    assert str(folder / "data_batch_3") in message and "BACKDOOR_DATA_ROOT" in message and "`root`" in message
    assert "https://www.cs.toronto.edu/~kriz/cifar.html" in message
    write_pickle(folder / "data_batch_3", {"data": cifar_images(2, 0), "labels": [0, 10]})
    with pytest.raises(ValueError, match="0..9"):
        load_dataset("cifar10", root=str(tmp_path))



class RunsCode:
    """A pickle payload that would run a shell command when loaded by ``pickle.load``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("protocol", [0, 2, pickle.HIGHEST_PROTOCOL])
def test_cifar_pickle_that_would_run_code_is_refused_unexecuted(tmp_path, protocol):
    folder = write_cifar10(tmp_path)
    marker = tmp_path / "executed"
    with open(folder / "data_batch_2", "wb") as f:
        pickle.dump({"data": cifar_images(3, 0), "labels": [0, 1, 2], "x": RunsCode(marker)}, f, protocol=protocol)
    with pytest.raises(ValueError) as e:
        load_dataset("cifar10", root=str(tmp_path))
    message = str(e.value)
    assert str(folder / "data_batch_2") in message and "refused to load" in message and "system" in message
    assert "numpy.ndarray" in message, "the message says what is allowed"
    assert not marker.exists(), "the payload never ran"
    with open(folder / "data_batch_2", "rb") as f:  # the control: the plain unpickler would have run it
        pickle.load(f)
    assert marker.exists()


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_cifar_re_packed_with_any_protocol_still_loads(tmp_path, protocol):
    folder = write_cifar10(tmp_path)
    labels = [5, 6, 7]
    with open(folder / "data_batch_1", "wb") as f:
        pickle.dump({"batch_label": b"training batch 1 of 5", "data": cifar_images(3, 10), "labels": labels,
                     "filenames": [b"a.png", b"b.png", b"c.png"]}, f, protocol=protocol)
    data = load_dataset("cifar10", root=str(tmp_path))
    assert data.train.y[:3].tolist() == labels and (data.train.x[1, 0] == 11).all()


# -- GTSRB -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("test_csv_at", ["root", "final_test"])
def test_gtsrb_official_layout(tmp_path, test_csv_at):
    colours = write_gtsrb_official(tmp_path, test_csv_at)
    data = load_dataset("gtsrb", root=str(tmp_path))
    assert data.train.x.shape == (4, 3, 32, 32) and data.test.x.shape == (3, 3, 32, 32)
    assert data.train.y.tolist() == [0, 0, 2, 2]
    assert data.test.y.tolist() == [42, 2, 0]  # the annotation file's order and labels
    for x, y in zip(data.train.x, data.train.y.tolist()):  # a solid image stays solid after resizing
        assert (x == torch.tensor(colours[y], dtype=torch.uint8)[:, None, None]).all()
    assert data.num_classes == 43 and not data.hflip
    assert data.mean == (0.0, 0.0, 0.0) and data.std == (1.0, 1.0, 1.0)
    assert data.params == {"image_size": 32, "crop_roi": False}
    # the whole image is resized (border included), exactly as PIL's bilinear resize of the file
    expected = Image.open(tmp_path / "GTSRB" / "Final_Test" / "Images" / "00001.ppm").resize((32, 32), Image.BILINEAR)
    assert torch.equal(data.test.x[0], torch.from_numpy(np.asarray(expected).transpose(2, 0, 1).copy()))
    assert (data.test.x[0] == 255).all(dim=0).any()  # white border pixels remain


def test_gtsrb_crop_roi_and_image_size(tmp_path):
    write_gtsrb_official(tmp_path)
    data = load_dataset("gtsrb", root=str(tmp_path), image_size=10, crop_roi=True)
    assert data.test.x.shape == (3, 3, 10, 10)
    # exactly the annotated 10x10 region (Roi.X2/Y2 inclusive) is left, so no resizing happens
    assert (data.test.x[0, :, :, :9] == torch.tensor([0, 255, 0], dtype=torch.uint8)[:, None, None]).all()
    assert (data.test.x[0, :, :, 9] == torch.tensor([0, 0, 255], dtype=torch.uint8)[:, None]).all()
    assert load_dataset("gtsrb", root=str(tmp_path), image_size=16, crop_roi=True).train.x.shape == (4, 3, 16, 16)
    with pytest.raises(ValueError, match="image_size"):
        load_dataset("gtsrb", root=str(tmp_path), image_size=0)
    with pytest.raises(ValueError, match="crop_roi"):
        load_dataset("gtsrb", root=str(tmp_path), crop_roi="yes")


def test_gtsrb_torchvision_layout(tmp_path):
    base = tmp_path / "gtsrb"
    for label in (1, 5):
        folder = base / "GTSRB" / "Training" / f"{label:05d}"
        folder.mkdir(parents=True)
        for i in range(2):
            solid((33, 35), (label * 40, 0, 0)).save(folder / f"{label:05d}_{i:05d}.ppm")
    test = base / "GTSRB" / "Final_Test" / "Images"
    test.mkdir(parents=True)
    solid((40, 40), (0, 0, 0)).save(test / "00000.ppm")
    (base / "GT-final_test.csv").write_text("Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId\n"
                                            "00000.ppm;40;40;5;5;34;34;5\n")
    for root in (tmp_path, base):
        data = load_dataset("gtsrb", root=str(root))
        assert data.train.y.tolist() == [1, 1, 5, 5] and data.test.y.tolist() == [5]
        assert (data.train.x[2, 0] == 200).all()
    with pytest.raises(ValueError, match="crop_roi"):
        load_dataset("gtsrb", root=str(tmp_path), crop_roi=True)  # no training annotations to crop with


def test_gtsrb_missing_annotations_and_images(tmp_path):
    write_gtsrb_official(tmp_path)
    (tmp_path / "GT-final_test.csv").unlink()  # only the unlabelled .test.csv is left
    with pytest.raises(DatasetNotFoundError) as e:
        load_dataset("gtsrb", root=str(tmp_path))
    assert str(tmp_path / "GT-final_test.csv") in str(e.value) and "benchmark.ini.rub.de" in str(e.value)
    write_gtsrb_official(tmp_path / "again")
    (tmp_path / "again" / "GTSRB" / "Final_Training" / "Images" / "00002" / "00002_00001.ppm").unlink()
    with pytest.raises(DatasetNotFoundError, match="00002_00001.ppm"):
        load_dataset("gtsrb", root=str(tmp_path / "again"))


# -- Tiny ImageNet ---------------------------------------------------------------------------------------------
def test_tiny_imagenet_layout_labels_and_order(tmp_path):
    wnids = write_tiny(tmp_path)
    data = load_dataset("tiny_imagenet", root=str(tmp_path))
    assert data.train.x.shape == (9, 3, 64, 64) and data.test.x.shape == (2, 3, 64, 64)
    assert data.train.x.dtype == torch.uint8
    assert data.train.y.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]  # wnids.txt line order, not sorted wnids
    red = data.train.x[:3, 0].float().mean(dim=(1, 2))
    assert torch.allclose(red, torch.tensor([0.0, 40.0, 200.0]), atol=3)  # files _0, _2, _10 in numeric order
    assert data.test.y.tolist() == [2, 0]
    grey = data.test.x[0].float()
    assert (grey - 128).abs().max() <= 2 and torch.equal(data.test.x[0, 0], data.test.x[0, 2])  # L -> RGB
    assert data.num_classes == 200 and data.hflip and data.mean == (0.4802, 0.4481, 0.3975)
    small = load_dataset("tiny_imagenet", root=str(tmp_path / "tiny-imagenet-200"), image_size=32)
    assert small.train.x.shape == (9, 3, 32, 32) and small.params == {"image_size": 32}
    assert len(wnids) == 3


def test_tiny_imagenet_errors(tmp_path):
    with pytest.raises(DatasetNotFoundError) as e:
        load_dataset("tiny_imagenet", root=str(tmp_path))
    assert str(tmp_path / "tiny-imagenet-200" / "wnids.txt") in str(e.value)
    assert "tiny-imagenet-200.zip" in str(e.value)
    write_tiny(tmp_path)
    annotations = tmp_path / "tiny-imagenet-200" / "val" / "val_annotations.txt"
    annotations.write_text(annotations.read_text() + "val_2.JPEG\tn00000000\t0\t0\t1\t1\n")
    with pytest.raises(ValueError, match="line 3"):
        load_dataset("tiny_imagenet", root=str(tmp_path))


# -- imagefolder -----------------------------------------------------------------------------------------------
def test_imagefolder_classes_resizing_and_conversion(tmp_path):
    write_imagefolder(tmp_path)
    data = load_dataset("imagefolder", root=str(tmp_path), image_size=24, hflip=False)
    assert data.num_classes == 3 and not data.hflip
    assert data.train.x.shape == (6, 3, 24, 24) and data.test.x.shape == (6, 3, 24, 24)
    assert data.train.y.tolist() == [0, 0, 1, 1, 2, 2]  # ant, bee, cat: sorted names, not creation order
    expected = {0: (255, 0, 0), 1: (0, 255, 0), 2: (0, 0, 255)}
    for x, y in zip(data.train.x, data.train.y.tolist()):  # RGBA -> RGB, any size -> 24x24
        assert (x == torch.tensor(expected[y], dtype=torch.uint8)[:, None, None]).all()
    assert data.mean == channel_stats(data.train.x)[0] and data.std == channel_stats(data.train.x)[1]
    assert data.params == {"image_size": 24, "hflip": False}
    assert num_classes_of("imagefolder", {"root": str(tmp_path)}) == 3


def test_imagefolder_errors(tmp_path):
    with pytest.raises(ValueError, match="root"):
        load_dataset("imagefolder")
    with pytest.raises(DatasetNotFoundError) as e:
        load_dataset("imagefolder", root=str(tmp_path / "nowhere"))
    assert str(tmp_path / "nowhere" / "train") in str(e.value)
    write_imagefolder(tmp_path / "a", classes=("ant", "bee"), test_classes=("ant", "wasp"))
    with pytest.raises(ValueError, match=r"only in train/: \['bee'\]; only in test/: \['wasp'\]"):
        load_dataset("imagefolder", root=str(tmp_path / "a"))
    write_imagefolder(tmp_path / "b")
    with pytest.raises(ValueError, match="image_size"):
        load_dataset("imagefolder", root=str(tmp_path / "b"), image_size=2.5)
    (tmp_path / "b" / "train" / "bee" / "b.png").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="cannot decode"):
        load_dataset("imagefolder", root=str(tmp_path / "b"))


# -- shared machinery and the registry -------------------------------------------------------------------------
def test_read_images_is_independent_of_the_worker_count(tmp_path):
    g = np.random.default_rng(0)
    paths = []
    for i in range(7):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(g.integers(0, 256, (13 + i, 17, 3), dtype=np.uint8)).save(paths[-1])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = read_images(paths, 9)
        torch.set_num_threads(3)
        three = read_images(paths, 9)
    finally:
        torch.set_num_threads(threads)
    assert one.shape == (7, 3, 9, 9) and torch.equal(one, three)


def test_chunked_channel_stats_matches_channel_stats():
    x = torch.randint(0, 256, (23, 3, 5, 6), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    mean, std = chunked_channel_stats(x, chunk=4)
    ref_mean, ref_std = channel_stats(x)
    assert np.allclose(mean, ref_mean, atol=1e-4) and np.allclose(std, ref_std, atol=1e-4)


def test_cache_round_trip(tmp_path):
    write_gtsrb_official(tmp_path)
    data = load_dataset("gtsrb", root=str(tmp_path))
    back = dataset_from_tensors(*dataset_to_tensors(data))
    assert torch.equal(back.train.x, data.train.x) and back.params == data.params and back.hflip is False


@pytest.mark.parametrize("name", DATASETS.names())
def test_every_dataset_loads_or_says_where_its_files_belong(name, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    if "root" in inspect.signature(DATASETS.get(name)).parameters:
        with pytest.raises(DatasetNotFoundError) as e:
            load_dataset(name, root=str(empty))
        assert str(empty) in str(e.value) and "BACKDOOR_DATA_ROOT" in str(e.value) and "Get the files" in str(e.value)
    else:
        data = load_dataset(name)
        assert data.train.x.dtype == torch.uint8 and data.train.y.dtype == torch.int64
        assert int(data.train.y.max()) < data.num_classes and len(data.test) > 0
    declared = num_classes_of(name, {})
    assert declared is None or isinstance(declared, int)
