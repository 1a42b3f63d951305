"""Detection as a task of its own: matrices with detectors (and a population), the harness's scoring of each
task against the truth, and the detection tables and figures rendered from records."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from sklearn.metrics import roc_auc_score

from backdoor.detectors import DETECTORS
from backdoor.harness.matrix import MatrixError, case_count, load_matrix
from backdoor.harness.report.figures import roc_figure
from backdoor.harness.report.detection import (data_frame, input_frame, model_breakdown_frame, model_frame,
                                               render_detection)
from backdoor.harness.report.leaderboard import leaderboard_frame, render_markdown
from backdoor.metrics import auroc, input_detection_metrics, roc_points
from backdoor.stats import auroc_interval

MATRIX = """
name: det
datasets:
  synthetic: {num_classes: 4, train_size: 160, test_size: 80, image_size: 16}
models: [cnn_small]
attacks: {badnets: {}, blended: {}}
defenses: [none]
detectors:
  nc: {epochs: 2, batch_size: 16}
  spectral: {against: [badnets]}
poison_ratios: [0.1]
seeds: [0, 1]
training: {epochs: 2, batch_size: 32, lr: 0.05}
defense_training: {epochs: 1, batch_size: 32, clean_fraction: 0.1}
"""


def write(tmp_path: Path, text: str, **changes) -> Path:
    """The matrix ``text`` with top-level keys replaced by (or added as) ``changes`` (YAML values)."""
    path = tmp_path / "m.yaml"
    raw = {**yaml.safe_load(text), **{k: yaml.safe_load(v) for k, v in changes.items()}}
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def test_detection_cases_of_a_matrix(tmp_path):
    matrix = load_matrix(write(tmp_path, MATRIX, population="{clean_seeds: 4}"))
    ids = [c.case_id for c in matrix.cases()]
    assert len(ids) == case_count(matrix) == len(set(ids))
    # per seed 0-1: clean none + clean nc + clean spectral (data-side: the benign condition), badnets none/nc/spectral,
    # blended none/nc (spectral runs against badnets only); seeds 2-3: the population's clean none + nc (model-level
    # detectors only)
    assert len(ids) == 2 * 8 + 2 * 2
    assert "synthetic-cnn_small-clean-s3-det_spectral" not in ids
    assert "synthetic-cnn_small-clean-s3-det_nc" in ids and "synthetic-cnn_small-badnets-p0.1-s1-det_spectral" in ids
    assert "synthetic-cnn_small-blended-p0.1-s0-det_spectral" not in ids
    assert "synthetic-cnn_small-badnets-p0.1-s3-none" not in ids  # the population's seeds are clean only
    case = next(c for c in matrix.cases() if c.case_id.endswith("s0-det_nc"))
    assert case.detector == "nc" and case.defense == "det_nc" and case.detector_params == {"epochs": 2, "batch_size": 16}


@pytest.mark.parametrize("change,message", [
    ({"detectors": "[strp]"}, "detectors: 'strp' is not a registered detector"),
    ({"detectors": "{nc: {epochs: 0}}"}, "detectors.nc"),
    ({"detectors": "{nc: {epoch: 3}}"}, "unknown parameter(s) ['epoch']"),
    ({"detectors": "{spectral: {against: [wanet]}}"}, "detectors.spectral.against: 'wanet' names none of the matrix's attacks"),
    ({"population": "{clean_seeds: 3}", "detectors": "[spectral]"}, "population: inspects models: name a model-level detector"),
    ({"population": "{seeds: 3}"}, "population: {'seeds': 3} is not allowed"),
    ({"population": "{clean_seeds: 0}"}, "population.clean_seeds: 0 is not allowed"),
])
def test_bad_detection_entries_name_file_key_and_what_is_allowed(tmp_path, change, message):
    path = write(tmp_path, MATRIX, **change)
    with pytest.raises(MatrixError) as error:
        load_matrix(path)
    assert str(path) in str(error.value) and message in str(error.value)


def test_input_detection_metrics_known_answer():
    # 4 clean inputs (scores 0.1 0.2 0.3 0.9) and 4 triggered ones (0.8 0.95 0.4 0.7), threshold 0.5
    clean, trig = torch.tensor([0.1, 0.2, 0.3, 0.9]), torch.tensor([0.8, 0.95, 0.4, 0.7])
    m = input_detection_metrics(clean, trig, 0.5, clean_pred=torch.tensor([0, 1, 2, 3]),
                                clean_y=torch.tensor([0, 1, 0, 3]), triggered_pred=torch.tensor([0, 0, 0, 2]),
                                triggered_y=torch.tensor([1, 2, 3, 2]), attack_label=0)
    assert m["tpr"] == 0.75 and m["fpr"] == 0.25 and m["clean_lost"] == 0.25
    assert m["residual_asr"] == 0.25  # only the third triggered input passes (0.4) and it hits the target
    assert m["asr_before"] == 0.75
    assert m["c_acc_kept"] == 0.5  # inputs 0 and 1 pass and are right; 2 passes and is wrong; 3 is flagged
    assert m["r_acc_kept"] == 0.0  # the fourth keeps its label but is flagged
    assert m["auroc"] == pytest.approx(roc_auc_score([0] * 4 + [1] * 4, [*clean.tolist(), *trig.tolist()]))
    assert m["positives"] == 4 and m["negatives"] == 4


def test_roc_points_keep_both_ends_and_thin_long_curves():
    g = torch.Generator().manual_seed(0)
    pos, neg = torch.rand(400, generator=g) + 0.3, torch.rand(500, generator=g)
    roc = roc_points(pos, neg, max_points=51)
    assert len(roc["fpr"]) <= 51 and roc["fpr"][0] == 0 and roc["tpr"][-1] == 1 and roc["fpr"][-1] == 1
    assert roc["fpr"] == sorted(roc["fpr"]) and roc["tpr"] == sorted(roc["tpr"])
    assert roc_points(pos, pos[:0]) is None and auroc(pos[:0], neg) is None


def test_auroc_interval_matches_sklearn_and_covers_it():
    pos, neg = [3, 4, 5, 2.5, 6, 7, 1, 8, 9, 10], [1, 2, 0, 0.5, 3]
    value, low, high = auroc_interval(pos, neg)
    assert value == pytest.approx(roc_auc_score([1] * 10 + [0] * 5, pos + neg))
    assert low < value <= high <= 1
    assert auroc_interval(pos, neg) == (value, low, high)  # seeded
    assert auroc_interval([2, 3], [0, 1]) == (1.0, 1.0, 1.0)  # perfectly separated: every resample too
    assert auroc_interval(pos, []) is None


def model_record(detector, attack, seed, score, flagged, kind="dirty_label", asr=1.0):
    return {"inspected": {"asr": None if attack == "clean" else asr}, "case_id": f"d-m-{attack}-s{seed}-det_{detector}", "dataset": "d", "model": "m", "attack": attack,
            "attack_kind": None if attack == "clean" else kind, "poison_ratio": 0.0 if attack == "clean" else 0.1,
            "seed": seed, "detector": detector, "task": "model", "status": "ok", "detection_seconds": 2.0,
            "detection": {"score": score, "flagged": flagged, "backdoored": attack != "clean"}}


def test_model_level_table_scores_the_population():
    records = ([model_record("nc", "clean", s, score, False) for s, score in enumerate([0.5, 1.0, 2.5])]
               + [model_record("nc", "badnets", s, score, score > 2) for s, score in enumerate([3.0, 4.0])]
               + [model_record("nc", "sig", s, score, score > 2, "clean_label", asr)
                  for s, (score, asr) in enumerate([(0.7, 0.3), (2.2, 0.5)])])
    row = model_frame(records).iloc[0]
    # 4 backdoored against 3 clean: pairs won 3+3 (badnets) + 1 (0.7 > 0.5) + 2 (2.2 > 0.5, 1.0) = 9 of 12
    assert row["AUROC"].startswith("75.00 [") and row["Clean models"] == 3 and row["Backdoored models"] == 4
    assert row["TPR"] == "75.00" and row["FPR"] == "0.00" and row["Seconds per model"] == "2.0"
    breakdown = model_breakdown_frame(records)
    by = dict(zip(breakdown["Backdoored by"], breakdown["AUROC"]))
    assert by["BadNets"].startswith("100.00") and by["family: clean label"].startswith("50.00")
    # the SIG model at ASR 0.3 is no effective backdoor: 3 left, pairs won 3+3+2 = 8 of 9
    effective = breakdown[breakdown["Backdoored by"] == "effective (ASR >= 50%)"].iloc[0]
    assert effective["AUROC"].startswith("88.89 [") and effective["Backdoored models"] == 3


def test_a_roc_figure_tells_every_attack_apart_and_keeps_its_legend_off_the_panels():
    attacks = ["badnets", "blended", "sig", "lc", "lf", "ssba", "inputaware", "wanet", "bpp", "trojannn", "ftrojan",
               "adap_patch", "ctrl"]
    roc = {"fpr": [0.0, 0.5, 1.0], "tpr": [0.0, 0.7, 1.0]}
    records = [{"dataset": "d", "model": "m", "attack": a, "detector": "spectral", "task": "data", "status": "ok",
                "detection": {"roc": roc}} for a in attacks]
    fig = roc_figure(records, "data", "d", "m")
    curves = [line for line in fig.axes[0].get_lines() if not line.get_label().startswith("_")]  # not the diagonal
    styles = {(line.get_color(), line.get_linestyle()) for line in curves}
    assert len(curves) == len(attacks) and len(styles) == len(attacks)  # 13 attacks: no two alike
    fig.canvas.draw()
    legend = fig.legends[0].get_window_extent()
    assert all(legend.y1 <= ax.get_window_extent().y0 for ax in fig.axes if ax.get_visible())
    assert all(legend.y1 <= ax.xaxis.label.get_window_extent().y0 for ax in fig.axes if ax.get_visible())


def test_detection_records_stay_out_of_the_defense_leaderboard():
    base = {"dataset": "d", "model": "m", "poison_ratio": 0.1, "seed": 0, "status": "ok", "target": 0,
            "attack": "badnets", "c_acc": 0.9, "asr": 1.0, "r_acc": 0.0}
    records = [{**base, "case_id": "d-m-badnets-p0.1-s0-none", "defense": "none"},
               {**base, "case_id": "d-m-badnets-p0.1-s0-det_strip", "defense": "det_strip", "detector": "strip",
                "task": "input", "c_acc": 0.8, "asr": 0.1, "r_acc": 0.0,
                "detection": {"auroc": 0.9, "tpr": 0.9, "fpr": 0.05, "residual_asr": 0.1, "asr_before": 1.0,
                              "clean_lost": 0.05}}]
    assert not any("strip" in str(c).lower() for c in leaderboard_frame(records).columns)
    assert "det_strip" not in render_markdown(records, "t") and "detection.md" in render_markdown(records, "t")
    table = input_frame(records)
    assert table.iloc[0]["Residual ASR"] == "10.00" and table.iloc[0]["Clean lost"] == "5.00"
    assert data_frame(records) is None and "Input-level detection" in render_detection(records, "t")


def test_a_detection_grid_end_to_end(tmp_path):
    """A tiny grid through ``backdoor run``: records of each detection case, detection.md and its csv, ROC
    figures, and the defense leaderboard without detection rows."""
    path = write(tmp_path, MATRIX, population="{clean_seeds: 3}")
    env_cmd = [sys.executable, "-m", "backdoor.harness.cli"]
    run = subprocess.run([*env_cmd, "run", str(path), "--results-dir", str(tmp_path / "r"), "--cache-dir",
                          str(tmp_path / "c"), "-q", "-p", "no:cacheprovider"], capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "r" / "det" / "records.jsonl").read_text().splitlines()]
    detections = [r for r in records if r.get("detector")]
    assert {r["detector"] for r in detections} == {"nc", "spectral"}
    nc = [r for r in detections if r["detector"] == "nc"]
    assert len(nc) == 7 and all(isinstance(r["detection"]["score"], float) for r in nc)
    assert sum(r["detection"]["backdoored"] for r in nc) == 4 and all(r["detection_seconds"] > 0 for r in nc)
    spectral = [r for r in detections if r["detector"] == "spectral" and r["attack"] == "badnets"]
    assert all(r["detection"]["flagged"] > 0 and 0 <= r["det_auroc"] <= 1 for r in spectral)
    benign = [r for r in detections if r["detector"] == "spectral" and r["attack"] == "clean"]
    assert len(benign) == 2 and all(r["detection"]["tpr"] is None and r["det_fpr"] > 0 for r in benign)
    folder = tmp_path / "r" / "det"
    assert "det_nc" not in (folder / "leaderboard.md").read_text()
    text = (folder / "detection.md").read_text()
    assert "## Model-level detection" in text and "## Data-side detection" in text
    assert (folder / "detection_model.csv").is_file() and (folder / "detection_data.csv").is_file()
    plot = subprocess.run([*env_cmd, "plot", str(folder)], capture_output=True, text=True, timeout=300)
    assert plot.returncode == 0, plot.stderr[-2000:]
    assert (folder / "figures" / "roc_model_synthetic_cnn_small.png").is_file()
    assert (folder / "figures" / "roc_data_synthetic_cnn_small.png").is_file()
    assert "Model-level detection" in (folder / "leaderboard.html").read_text()


def test_every_detector_declares_its_task():
    for name in DETECTORS.names():
        assert DETECTORS.get(name).task in ("input", "data", "model"), name
