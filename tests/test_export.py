"""Pure attack: ``backdoor export`` writes what an attack made in open formats, and ``backdoor.load_model`` gives
the model back ready to use."""
import json

import pytest
import torch
from safetensors.torch import load_file

import backdoor
from backdoor.harness.cli import main as cli_main
from backdoor.checkpoints.export import ExportError, read_export
from backdoor.harness.export import export_case
from backdoor.harness.case import Case
from backdoor.harness.runner import Runner
from backdoor.harness.cache import ArtifactCache
from backdoor.harness.records import upsert_records
from backdoor.training import TrainConfig

TINY = dict(matrix="tiny", dataset="digits", model="cnn_small", ratio=0.1, seed=0,
            training=TrainConfig(epochs=2, batch_size=64, lr=0.05),
            defense_training=TrainConfig(epochs=1, batch_size=64), clean_fraction=0.05)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """BadNets (no defense, FT), WaNet (trigger material as learned state) and the clean reference, on digits."""
    tmp = tmp_path_factory.mktemp("export")
    cache, results = tmp / "cache", tmp / "results" / "tiny"
    runner = Runner(ArtifactCache(cache))
    cases = [Case(attack="badnets", defense="none", **TINY), Case(attack="badnets", defense="ft", **TINY),
             Case(attack="wanet", defense="none", **TINY), Case(attack="clean", defense="none", **{**TINY, "ratio": 0.0})]
    records = {c.case_id: runner.run(c) for c in cases}
    upsert_records(results, list(records.values()))
    return records, cache, results


def test_export_writes_model_data_and_description(finished, tmp_path):
    records, cache, results = finished
    case_id = "digits-cnn_small-badnets-p0.1-s0-none"
    report = export_case(results, case_id, tmp_path / "out", cache)
    assert report.rebuilt == [] and report.metrics_match
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["model.json", "model.safetensors", "poisoned_test.safetensors",
                                                     "poisoned_train.safetensors"]  # BadNets has no material
    description = read_export(out)
    record = records[case_id]
    assert description["architecture"] == {"name": "cnn_small", "params": {}, "num_classes": 10}
    assert description["dataset"]["name"] == "digits" and description["attack"]["name"] == "badnets"
    assert description["attack"]["params"] == record["attack_params"]
    assert (description["target"], description["poison_ratio"], description["seed"]) == (0, 0.1, 0)
    assert description["normalization"]["mean"] and description["training"] == record["training"]
    assert {k: description["metrics"][k] for k in ("c_acc", "asr", "r_acc")} == \
        {k: record[k] for k in ("c_acc", "asr", "r_acc")}
    assert description["code_version"]["attack_code"] and description["code_version"]["package_version"]

    train = load_file(str(out / "poisoned_train.safetensors"))
    assert train["x"].dtype == torch.uint8 and train["mask"].dtype == torch.bool
    assert int(train["mask"].sum()) == round(0.1 * len(train["y"])) and bool((train["y"][train["mask"]] == 0).all())
    test = load_file(str(out / "poisoned_test.safetensors"))
    assert bool((test["y"] != 0).all()) and len(test["index"]) == len(test["y"])

    model = backdoor.load_model(out)
    assert not model.training
    with torch.no_grad():
        pred = model(test["x"].float() / 255).argmax(1)
    assert float((pred == 0).float().mean()) == record["asr"]  # normalisation is inside the model


def test_defended_case_exports_the_backdoored_model(finished, tmp_path):
    records, cache, results = finished
    report = export_case(results.parent, "digits-cnn_small-badnets-p0.1-s0-ft", tmp_path / "ft", cache)  # results root
    assert report.record_metrics["asr"] == records["digits-cnn_small-badnets-p0.1-s0-ft"]["undefended"]["asr"]
    assert report.metrics_match


def test_learned_trigger_material_is_exported(finished, tmp_path):
    _, cache, results = finished
    export_case(results, "digits-cnn_small-wanet-p0.1-s0-none", tmp_path / "wanet", cache)
    material = load_file(str(tmp_path / "wanet" / "trigger.safetensors"))
    assert list(material) == ["state.field"] and material["state.field"].shape[-1] == 2
    assert read_export(tmp_path / "wanet")["trigger_material"] == {"kinds": ["state"], "tensors": 1}


def test_clean_reference_exports_its_model_only(finished, tmp_path):
    records, cache, results = finished
    export_case(results, "digits-cnn_small-clean-s0-none", tmp_path / "clean", cache)
    assert sorted(p.name for p in (tmp_path / "clean").iterdir()) == ["model.json", "model.safetensors"]
    assert read_export(tmp_path / "clean")["attack"] is None


def test_missing_artifacts_are_rebuilt_and_said(finished, tmp_path, capsys):
    records, _, results = finished
    argv = ["export", str(results), "--case", "digits-cnn_small-badnets-p0.1-s0-none", str(tmp_path / "out"),
            "--cache-dir", str(tmp_path / "empty")]
    assert cli_main(argv) == 0
    err = capsys.readouterr().err
    assert "not in the cache, rebuilt (and cached): backdoor_model, dataset, poisoned" in err
    assert "warning" not in err  # same machine, same code: the rebuilt model scores as its record
    assert json.loads((tmp_path / "out" / "model.json").read_text())["rebuilt"] == ["backdoor_model", "dataset",
                                                                                     "poisoned"]


def test_export_refuses_unknown_cases_foreign_folders_and_damaged_exports(finished, tmp_path, capsys):
    _, cache, results = finished
    assert cli_main(["export", str(results), "--case", "digits-cnn_small-badnets-p0.1-s9-none", str(tmp_path / "x"),
                     "--cache-dir", str(cache)]) == 1
    assert "no case" in capsys.readouterr().err
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match="not an export's"):
        export_case(results, "digits-cnn_small-badnets-p0.1-s0-none", busy, cache)
    out = tmp_path / "out"
    export_case(results, "digits-cnn_small-badnets-p0.1-s0-none", out, cache)
    export_case(results, "digits-cnn_small-badnets-p0.1-s0-none", out, cache)  # a previous export is replaced
    data = (out / "model.safetensors").read_bytes()
    (out / "model.safetensors").write_bytes(data[:-8] + bytes(8))
    with pytest.raises(ExportError, match="does not match its SHA-256"):
        backdoor.load_model(out)
