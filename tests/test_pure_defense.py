"""Pure defense: a model the user brings (a checkpoint, read without running code from it), defended by the grid.

The round trip: a joint-mode case is exported (pure attack), then the exported model is defended through the
pure-defense path, and its C-Acc, ASR, R-Acc (and detection figures) equal the joint path's bit for bit.
"""
import json
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import backdoor
from backdoor.harness.cache import ArtifactCache
from backdoor.checkpoints import CheckpointError, read_backdoorbench, torch_load_safely
from backdoor.harness.export import export_case
from backdoor.harness.matrix import MatrixError, load_matrix
from backdoor.harness.case import Case
from backdoor.harness.runner import Runner
from backdoor.harness.records import upsert_records
from backdoor.harness.report.leaderboard import render_markdown
from backdoor.training import TrainConfig

ROOT = Path(__file__).resolve().parent.parent
ENV = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")}
METRICS = ("c_acc", "asr", "r_acc")
# The joint grid's budgets, repeated in the pure-defense matrices (data-side defenses retrain with `training`).
TRAINING = {"epochs": 3, "batch_size": 64, "lr": 0.05}
DEFENSE_TRAINING = {"epochs": 2, "batch_size": 64, "lr": 0.01, "clean_fraction": 0.05}
JOINT = dict(matrix="joint", dataset="digits", model="cnn_small", attack="badnets", ratio=0.1, seed=0,
             training=TrainConfig(**TRAINING),
             defense_training=TrainConfig(**{k: v for k, v in DEFENSE_TRAINING.items() if k != "clean_fraction"}),
             clean_fraction=0.05)
DEFENSES = ("none", "ft", "spectral")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The joint path (BadNets on digits, no defense / FT / Spectral), and its export."""
    tmp = tmp_path_factory.mktemp("pure")
    cache, results = tmp / "cache", tmp / "results" / "joint"
    runner = Runner(ArtifactCache(cache))
    joint = {d: runner.run(Case(defense=d, **JOINT)) for d in DEFENSES}
    upsert_records(results, list(joint.values()))
    export_case(results, "digits-cnn_small-badnets-p0.1-s0-none", tmp / "export", cache)
    return tmp, joint


def matrix(tmp: Path, name: str, models: str, defenses=DEFENSES) -> Path:
    path = tmp / f"{name}.yaml"
    body = textwrap.indent(textwrap.dedent(models).strip(), "  ")
    path.write_text(f"name: {name}\ndatasets: [digits]\nmodels:\n{body}\ndefenses: [{', '.join(defenses)}]\n"
                    f"seeds: [0]\ntraining: {json.dumps(TRAINING)}\ndefense_training: {json.dumps(DEFENSE_TRAINING)}\n")
    return path


def same(record: dict, joint: dict) -> None:
    assert {m: record[m] for m in METRICS} == {m: joint[m] for m in METRICS}  # bit for bit: floats compared exactly
    assert record.get("detection") == joint.get("detection")


def test_round_trip_through_the_grid_equals_the_joint_path(exported):
    tmp, joint = exported
    path = matrix(tmp, "mine", """
        exported:                      # an export folder: arch, normalisation, trigger images, poisoned set from it
          checkpoint: export
        explicit:                      # the weights file, a registered attack as trigger, the poisoned set's file
          checkpoint: export/model.safetensors
          arch: cnn_small
          target: 0
          trigger: {attack: badnets, params: {}}
          poisoned_train: export/poisoned_train.safetensors
        """)
    done = subprocess.run([sys.executable, "-m", "backdoor.harness.cli", "run", str(path), "--cache-dir", str(tmp / "cache"),
                           "--results-dir", str(tmp / "results"), "-q"], capture_output=True, text=True, cwd=tmp,
                          timeout=600, env=ENV)
    assert done.returncode == 0, done.stdout + done.stderr
    records = {r["case_id"]: r for r in map(json.loads, (tmp / "results" / "mine" / "records.jsonl").read_text().splitlines())}
    assert sorted(records) == sorted(f"digits-{label}-{trigger}-s0-{d}" for label, trigger in
                                     (("exported", "images"), ("explicit", "badnets")) for d in DEFENSES)
    for d in DEFENSES:
        for label, trigger in (("exported", "images"), ("explicit", "badnets")):
            record = records[f"digits-{label}-{trigger}-s0-{d}"]
            same(record, joint[d])
            assert record["source"] == "user" and record["arch"] == "cnn_small" and record["model"] == label
            assert record["user_model"]["sha256"] and record["status"] == "ok"
    assert records["digits-exported-images-s0-spectral"]["detection"]["tpr"] is not None
    board = (tmp / "results" / "mine" / "leaderboard.md").read_text()
    assert "given triggered images" in board and "User models (pure defense" in board


def test_pt_state_dict_png_trigger_and_backdoorbench_file(exported):
    """A plain .pt state dict (bare network, names changed), triggered images as PNG files, and BackdoorBench's
    attack_result.pt written in its layout: the same numbers as the joint path."""
    tmp, joint = exported
    state = backdoor.load_model(tmp / "export").net.state_dict()  # in the model's order, as torch.save keeps it
    net = {f"layer{i}.{k.rsplit('.', 1)[1]}": v for i, (k, v) in enumerate(state.items())}
    torch.save(net, tmp / "state.pt")  # names differ from ours: mapped by position and shape
    test = load_file(str(tmp / "export" / "poisoned_test.safetensors"))
    for i, (x, y) in enumerate(zip(test["x"], test["y"])):
        folder = tmp / "pngs" / str(int(y))
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(x.permute(1, 2, 0).numpy()).save(folder / f"{i:04d}.png")
    train = load_file(str(tmp / "export" / "poisoned_train.safetensors"))
    index = np.nonzero(train["mask"].numpy())[0]  # numpy array: needs the allow-list
    torch.save({"model_name": "cnn_small", "num_classes": 10, "model": {f"module.{k}": v for k, v in net.items()},
                "data_path": "./data/digits", "img_size": [32, 32, 3], "clean_data": "digits",
                "bd_train": {"x": train["x"][index].float(), "y": train["y"][index], "original_index": index},
                "bd_test": {"x": test["x"].float(), "y": torch.zeros(len(test["y"]), dtype=torch.long)}},
               tmp / "attack_result.pt")
    bb = read_backdoorbench(tmp / "attack_result.pt")
    assert bb.test_x.dtype == torch.uint8 and torch.equal(bb.test_x, test["x"]) and list(bb.train_index) == list(index)

    path = matrix(tmp, "files", """
        pt:
          checkpoint: state.pt
          arch: cnn_small
          normalize: dataset
          trigger: {images: pngs}
        bb:
          checkpoint: attack_result.pt
          arch: cnn_small
        """, defenses=("none", "spectral"))
    m = load_matrix(path)
    assert m.user_models["bb"].target == 0 and m.user_models["bb"].poisoned_train == "checkpoint"
    runner = Runner(ArtifactCache(tmp / "cache"))
    records = {c.case_id: runner.run(c) for c in m.cases()}
    same(records["digits-pt-images-s0-none"], joint["none"])
    assert records["digits-pt-images-s0-spectral"]["status"] == "not_applicable"  # no training set given
    assert "poisoned_train" in records["digits-pt-images-s0-spectral"]["reason"]
    same(records["digits-bb-images-s0-none"], joint["none"])
    same(records["digits-bb-images-s0-spectral"], joint["spectral"])  # bd_train rebuilt from original_index


class RunsCode:
    """An object whose unpickling calls a function: what a malicious checkpoint does."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_pt_file_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "code-ran"
    bad = tmp_path / "model.pt"
    torch.save({"net.weight": torch.zeros(1), "payload": RunsCode(marker)}, bad)
    pickle.loads(pickle.dumps(RunsCode(tmp_path / "proof")))  # the payload does run when unpickled
    assert (tmp_path / "proof").exists()
    with pytest.raises(CheckpointError, match=r"refused: loading it would unpickle arbitrary objects.*pathlib.*"
                                              r"convert it where you trust its source.*save_file"):
        torch_load_safely(bad, numpy=True)
    assert not marker.exists()
    torch.save(torch.nn.Linear(2, 2), tmp_path / "whole.pt")  # a pickled nn.Module is refused the same way
    path = tmp_path / "m.yaml"
    path.write_text("datasets: [digits]\nmodels: {mine: {checkpoint: whole.pt, arch: cnn_small}}\ndefenses: [none]\n")
    with pytest.raises(MatrixError, match=r"models\.mine\.checkpoint: .*whole\.pt: refused.*torch\.nn\.modules"):
        load_matrix(path)


@pytest.mark.parametrize("entry, extra, message", [
    ("{checkpoint: nowhere.safetensors, arch: cnn_small}", "", r"models\.mine\.checkpoint: .*nowhere\.safetensors does "
     r"not exist \(a relative path is taken from the matrix file's folder\)"),
    ("{checkpoint: export/model.safetensors}", "", r"models\.mine\.arch: missing"),
    ("{checkpoint: export/model.safetensors, arch: resnet9}", "", r"models\.mine\.arch: 'resnet9' is not a registered"),
    ("{checkpoint: export/model.safetensors, arch: cnn_small, arch_params: {width: 8}}", "",
     r"models\.mine\.checkpoint: .*has shape .*the architecture expects"),
    ("{checkpoint: export, colour: red}", "", r"models\.mine: unknown key\(s\) \['colour'\]"),
    ("{checkpoint: export, trigger: {attack: badnetz}}", "", r"models\.mine\.trigger\.attack: 'badnetz' is not a "
     r"registered attack"),
    ("{checkpoint: export, trigger: {attack: blended, params: {alpha: 3}}}", "",
     r"models\.mine\.trigger\.params\.alpha: 3 is not allowed"),
    ("{checkpoint: export, target: 12}", "", r"models\.mine\.target: 12 is outside the dataset's classes"),
    ("{checkpoint: export, normalize: {mean: [0.5], std: [0]}}", "", r"models\.mine\.normalize: .*std > 0"),
    ("{checkpoint: export}", "poison_ratios: [0.1]\n", r"poison_ratios: not used: every model of this matrix is a "
     r"user model"),
    ("{checkpoint: export/model.safetensors, arch: cnn_small, poisoned_train: export/model.safetensors}", "",
     r"models\.mine\.poisoned_train: .*needs a tensor 'x'"),
])
def test_user_models_are_validated_at_load(exported, entry, extra, message):
    tmp, _ = exported
    path = tmp / "bad.yaml"
    path.write_text(f"datasets: [digits]\nmodels: {{mine: {entry}}}\ndefenses: [none]\n{extra}")
    with pytest.raises(MatrixError, match=message):
        load_matrix(path)


def test_a_user_model_beside_the_grid_and_its_records_render(exported):
    tmp, joint = exported
    path = tmp / "mixed.yaml"
    path.write_text("datasets: [digits]\nmodels: {cnn_small: {}, mine: {checkpoint: export}}\nattacks: [badnets]\n"
                    "poison_ratios: [0.1]\ndefenses: [none]\n")
    ids = [c.case_id for c in load_matrix(path).cases()]
    assert ids == ["digits-cnn_small-clean-s0-none", "digits-cnn_small-badnets-p0.1-s0-none", "digits-mine-images-s0-none"]
    board = render_markdown([dict(joint["none"], case_id="x", model="mine", poison_ratio=0.0, attack="images",
                                  source="user", user_model={"arch": "cnn_small", "checkpoint": "export"})], "t")
    assert "| digits    | mine    | -       | given triggered images |" in board
