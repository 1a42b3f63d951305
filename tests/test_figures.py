"""``backdoor plot``: figures 2, 3, 5 and leaderboard.html from a small hand-made records file."""
import itertools
import json
import re

import pytest
from PIL import Image

from backdoor.cli import main as cli_main
from backdoor.figures import figure_links, write_figures
from backdoor.report_html import render_html
from backdoor.results import upsert_records

MODELS, RATIOS, ATTACKS, DEFENSES, SEEDS = ["cnn_small", "preact_resnet18"], [0.05, 0.1], ["badnets", "blended"], \
    ["none", "ft", "anp"], [0, 1]


def record(model, ratio, attack, defense, seed):
    """A record with made-up but consistent metrics (ASR + R-Acc <= 1); ANP is n/a on cnn_small."""
    case_id = f"digits-{model}-{attack}-p{ratio:g}-s{seed}-{defense}"
    if attack == "clean":
        case_id = f"digits-{model}-clean-s{seed}-{defense}"
    base = {"case_id": case_id, "dataset": "digits", "model": model, "attack": attack, "defense": defense,
            "poison_ratio": 0.0 if attack == "clean" else ratio, "seed": seed, "status": "ok", "reason": None,
            "detection": None, "defense_info": {}}
    if defense == "anp" and model == "cnn_small":
        return {**base, "status": "not_applicable", "reason": "no batch norm", "c_acc": None, "asr": None,
                "r_acc": None}
    asr = None if attack == "clean" else min(1.0, 0.4 + 5 * ratio - 0.3 * DEFENSES.index(defense) + 0.05 * seed)
    return {**base, "c_acc": 0.95 - 0.01 * seed, "asr": asr, "r_acc": None if asr is None else 0.9 * (1 - asr)}


@pytest.fixture
def results(tmp_path):
    rows = [record(*k) for k in itertools.product(MODELS, RATIOS, ATTACKS, DEFENSES, SEEDS)]
    rows += [record(m, 0.0, "clean", "none", s) for m in MODELS for s in SEEDS]
    upsert_records(tmp_path, rows)
    return tmp_path


def test_plot_writes_every_figure_and_the_page(results, capsys):
    assert cli_main(["plot", str(results)]) == 0
    figures = results / "figures"
    stems = [f"fig2_digits_{m}_p{r:g}" for m in MODELS for r in RATIOS] + [f"fig3_digits_{m}" for m in MODELS] + \
            [f"fig5_digits_p{r:g}" for r in RATIOS]
    for stem in stems:
        with Image.open(figures / f"{stem}.png") as png:
            assert png.width >= 900 and png.height >= 400  # 150 dpi: readable at the size written
        assert (figures / f"{stem}.svg").read_text().lstrip().startswith("<?xml")
    manifest = json.loads((figures / "figures.json").read_text())
    assert sorted(e["stem"] for e in manifest["figures"]) == sorted(stems) and manifest["skipped"] == []
    page = (results / "leaderboard.html").read_text()
    assert page.count("data:image/png;base64,") == len(stems)
    assert "<script" not in page and "http" not in page.replace("http-equiv", "")  # self-contained
    assert re.search(r'<th colspan="4" class="group">FT</th>', page)  # grouped defense header: 3 metrics + n
    assert "<small>± " in page  # two seeds: intervals in the cells
    assert "rgb(255," in page  # ASR shading
    assert "n/a" in page  # ANP without batch norm


def test_figure_links_point_at_the_written_files(results):
    assert figure_links(results) == []  # nothing plotted yet: no section
    write_figures(results)
    lines = figure_links(results)
    assert lines[0] == "## Figures"
    targets = re.findall(r"\]\((figures/[^)]+)\)", "\n".join(lines))
    assert len(targets) == 2 * 8 and all((results / t).is_file() for t in targets)


def test_one_model_skips_figure_5_and_says_why(tmp_path):
    upsert_records(tmp_path, [record("cnn_small", 0.1, "badnets", d, 0) for d in DEFENSES])
    written, skipped = write_figures(tmp_path)
    assert {p.stem for p in written} == {"fig2_digits_cnn_small_p0.1", "fig3_digits_cnn_small"}
    assert skipped and "one model" in skipped[0]
    assert "<small>±" not in render_html(tmp_path)  # one seed: no interval


def test_plot_without_results_fails_cleanly(tmp_path, capsys):
    assert cli_main(["plot", str(tmp_path)]) == 1
    assert "records.jsonl" in capsys.readouterr().err


def test_page_carries_the_detection_table(tmp_path):
    rows = [record("cnn_small", 0.1, "badnets", "none", 0),
            {**record("cnn_small", 0.1, "badnets", "ft", 0), "defense": "ac",
             "case_id": "digits-cnn_small-badnets-p0.1-s0-ac",
             "detection": {"tpr": 0.9, "fpr": 0.05, "precision": 0.7, "auroc": 0.95, "flagged": 130}}]
    upsert_records(tmp_path, rows)
    page = render_html(tmp_path)
    assert "Poison detection" in page and "AUROC" in page and "95.00" in page
