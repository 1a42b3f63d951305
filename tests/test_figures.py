"""``backdoor plot``: figures 2, 3, 5 and leaderboard.html from a small hand-made records file."""
import itertools
import json
import re

import matplotlib.colors
import numpy as np
from matplotlib.container import BarContainer
import pytest
from PIL import Image
from scipy import stats

from backdoor.harness.cli import main as cli_main
from backdoor.harness.report.figure_index import figure_links
from backdoor.harness.report.figures import _ok_cells, figure2, figure3, figure5, write_figures
from backdoor.harness.report.html import render_html
from backdoor.harness.records import read_records, upsert_records
from backdoor.harness.report.leaderboard import attack_title, defense_title

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
    assert re.search(r'<th colspan="5" class="group">FT</th>', page)  # grouped defense header: 3 metrics, DER, n
    assert re.search(r'<th colspan="4" class="group">No defense</th>', page)  # no DER without a defense
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


def by_hand(rows: list[dict], metric: str, **where) -> dict[tuple, list[float]]:
    """Per (model, ratio, attack, defense) of the attacked ok records matching ``where``: the metric's values
    over seeds (computed here from the records, not through the library's cells)."""
    out = {}
    for r in rows:
        if r["status"] == "ok" and r["attack"] != "clean" and all(r[k] == v for k, v in where.items()):
            out.setdefault((r["model"], r["poison_ratio"], r["attack"], r["defense"]), []).append(r[metric])
    return out


def interval(values: list[float]) -> tuple[float, float]:
    """(below, above) the mean, in %, of the 95% t-interval clipped to [0, 1]."""
    mean, half = np.mean(values), stats.t.ppf(0.975, len(values) - 1) * np.std(values, ddof=1) / np.sqrt(len(values))
    return 100 * (mean - max(0.0, mean - half)), 100 * (min(1.0, mean + half) - mean)


def all_rows() -> list[dict]:
    return [record(*k) for k in itertools.product(MODELS, RATIOS, ATTACKS, DEFENSES, SEEDS)]


def legend_keys(fig) -> tuple[dict, dict]:
    """Figure 2's legends read back: marker -> attack title, colour (RGB) -> defense title."""
    attacks, defenses = fig.legends
    markers = {h.get_marker(): t.get_text() for h, t in zip(attacks.legend_handles, attacks.get_texts())}
    colours = {matplotlib.colors.to_hex(h.get_color()): t.get_text()
               for h, t in zip(defenses.legend_handles, defenses.get_texts()) if h.get_marker() == "s"}
    return markers, colours


def test_figure2_points_are_the_seed_means_of_their_attack_and_defense(results):
    """Each point, identified by its marker (attack) and colour (defense) through the legends, sits at the mean
    over seeds of ASR and of C-Acc (left) or R-Acc (right) of that pair's records."""
    rows = all_rows()
    fig = figure2(_ok_cells(read_records(results)), "digits", "preact_resnet18", 0.1)
    markers, colours = legend_keys(fig)
    for ax, metric in zip(fig.axes, ("c_acc", "r_acc")):
        asr, values = by_hand(rows, "asr", model="preact_resnet18"), by_hand(rows, metric, model="preact_resnet18")
        expected = {(attack_title(k[2]), defense_title(k[3])): (100 * np.mean(asr[k]), 100 * np.mean(v))
                    for k, v in values.items() if k[1] == 0.1}
        points = {(markers[line.get_marker()], colours[matplotlib.colors.to_hex(line.get_color())]):
                  (line.get_xdata()[0], line.get_ydata()[0])
                  for line in ax.get_lines() if line.get_linestyle() == "None"}
        assert points.keys() == expected.keys() and len(points) == len(ATTACKS) * len(DEFENSES)
        for key, (x, y) in points.items():
            assert (x, y) == pytest.approx(expected[key])
    diagonal = [line for line in fig.axes[1].get_lines() if line.get_linestyle() == "--"]
    assert [list(diagonal[0].get_xdata()), list(diagonal[0].get_ydata())] == [[0, 100], [100, 0]]


def test_figure3_lines_and_error_bars_are_the_seed_means_and_t_intervals(results):
    """Per defense panel and attack line: at each ratio, the mean ASR over seeds and its clipped 95% t-interval
    (the records' two seeds differ by 0.05 in ASR); panels only for defenses with a result (no ANP on
    cnn_small)."""
    rows = all_rows()
    for model in MODELS:
        fig = figure3(_ok_cells(read_records(results)), "digits", model)
        asr = by_hand(rows, "asr", model=model)
        panels = [ax for ax in fig.axes if ax.get_visible()]
        defenses = [d for d in DEFENSES if any(k[3] == d for k in asr)]
        assert [ax.get_title() for ax in panels] == [defense_title(d) for d in defenses]
        for ax, defense in zip(panels, defenses):
            assert [t.get_text() for t in ax.get_xticklabels()] == [f"{100 * r:g}%" for r in RATIOS]
            lines = {c.get_label(): c for c in ax.containers}
            assert sorted(lines) == sorted(attack_title(a) for a in ATTACKS)
            for i, attack in enumerate(ATTACKS):
                data_line, _, (bars,) = lines[attack_title(attack)].lines
                values = [asr[(model, r, attack, defense)] for r in RATIOS]
                xs = np.asarray(data_line.get_xdata(), float)
                assert np.round(xs).tolist() == list(range(len(RATIOS)))  # the dodge is under 0.5
                np.testing.assert_allclose(np.asarray(data_line.get_ydata(), float), [100 * np.mean(v) for v in values])
                for segment, v in zip(bars.get_segments(), values):
                    below, above = interval(v)
                    mean = 100 * np.mean(v)
                    np.testing.assert_allclose(sorted(segment[:, 1]), [mean - below, mean + above])


def test_figure5_bars_are_the_seed_means_per_model(results):
    """Per defense panel: one bar per (attack, model) with the mean ASR over seeds and its clipped t-interval;
    the model of a bar read from its legend label, its attack from the tick under it."""
    rows = all_rows()
    fig = figure5(_ok_cells(read_records(results)), "digits", 0.05)
    asr = by_hand(rows, "asr", poison_ratio=0.05)
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in panels] == [defense_title(d) for d in DEFENSES]
    for ax, defense in zip(panels, DEFENSES):
        ticks = {round(t): label.get_text() for t, label in zip(ax.get_xticks(), ax.get_xticklabels())}
        seen = 0
        for bars in (c for c in ax.containers if isinstance(c, BarContainer)):
            model = bars.get_label()
            (errors,) = bars.errorbar.lines[2]
            for bar, segment in zip(bars, errors.get_segments()):
                attack = next(a for a in ATTACKS if attack_title(a) == ticks[round(bar.get_x() + bar.get_width() / 2)])
                values = asr[(model, 0.05, attack, defense)]
                assert bar.get_height() == pytest.approx(100 * np.mean(values))
                below, above = interval(values)
                np.testing.assert_allclose(sorted(segment[:, 1]), [bar.get_height() - below, bar.get_height() + above])
                seen += 1
        assert seen == sum(1 for k in asr if k[3] == defense)  # every record's cell drawn once (no ANP on cnn_small)
