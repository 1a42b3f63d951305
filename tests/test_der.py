"""The defense effectiveness rate (DER): its sign and clips, a two-seed cell's mean and interval worked by hand,
and where it shows (leaderboard.md, leaderboard.csv, leaderboard.html, Figure 2)."""
import html

import numpy as np
import pytest

from backdoor.harness.records import read_records, upsert_records
from backdoor.harness.report.figures import _ok_cells, figure2
from backdoor.harness.report.html import render_html
from backdoor.harness.report.leaderboard import (cell_summaries, defense_effectiveness_rate, leaderboard_frame,
                                                 record_der, render_markdown, write_leaderboard)

T_975_1 = 12.706204736174698  # t(0.975, 1 degree of freedom), from a table


def record(defense, c_acc, asr, seed=0, attack="badnets", undefended=None, **fields):
    ratio = 0.0 if attack == "clean" else 0.1
    case_id = f"d-m-clean-s{seed}-{defense}" if attack == "clean" else f"d-m-{attack}-p0.1-s{seed}-{defense}"
    out = {"case_id": case_id, "dataset": "d", "model": "m", "attack": attack, "defense": defense,
           "poison_ratio": ratio, "seed": seed, "status": "ok", "c_acc": c_acc, "asr": asr,
           "r_acc": None if asr is None else 1 - asr, "reason": None, "detection": None, "defense_info": {}, **fields}
    if undefended is not None:
        out["undefended"] = undefended
    return out


def test_the_accuracy_drop_is_subtracted_not_added():
    """BackdoorBench's docstring, not its defense_effectiveness_rate: ASR 0.8 lower and C-Acc 0.1 lower is
    (0.8 - 0.1 + 1) / 2 = 0.85 (adding the drop would give 0.95)."""
    assert defense_effectiveness_rate(0.8, 0.1) == pytest.approx(0.85)
    assert defense_effectiveness_rate(0.0, 0.2) == pytest.approx(0.4)  # accuracy lost, backdoor kept: below 0.5
    assert defense_effectiveness_rate(0.0, 0.0) == 0.5 and defense_effectiveness_rate(1.0, 0.0) == 1.0
    r = record("ft", 0.85, 0.1, undefended={"c_acc": 0.95, "asr": 0.9, "r_acc": 0.1})
    assert record_der(r) == pytest.approx(0.85)


def test_rises_are_clipped_both_ways():
    """A defense that raises C-Acc earns no bonus; one that raises ASR is not charged below 0.5 for it."""
    assert defense_effectiveness_rate(0.8, -0.1) == pytest.approx(0.9)  # not 0.95
    assert defense_effectiveness_rate(-0.3, 0.0) == 0.5  # not 0.35
    assert defense_effectiveness_rate(-0.3, 0.1) == pytest.approx(0.45)
    assert defense_effectiveness_rate(-0.2, -0.2) == 0.5
    r = record("ft", 0.99, 0.97, undefended={"c_acc": 0.95, "asr": 0.9, "r_acc": 0.1})
    assert record_der(r) == 0.5


def two_seeds(stored: bool) -> list[dict]:
    """Seed 0: ASR 0.95 -> 0.15, C-Acc 0.97 -> 0.95: DER (0.80 - 0.02 + 1) / 2 = 0.89. Seed 1: ASR 0.90 -> 0.30,
    C-Acc 0.96 -> 0.97 (a rise, clipped): DER (0.60 + 1) / 2 = 0.80. ``stored``: the defense records carry their
    ``undefended`` metrics; else they come from the no-defense case of the same seed."""
    none = [record("none", 0.97, 0.95, 0), record("none", 0.96, 0.90, 1)]
    ft = [record("ft", 0.95, 0.15, 0), record("ft", 0.97, 0.30, 1)]
    if stored:
        ft = [{**r, "undefended": {k: n[k] for k in ("c_acc", "asr", "r_acc")}} for r, n in zip(ft, none)]
    clean = [record("none", 0.99, None, 0, attack="clean"),  # the clean reference and its benign condition
             record("ft", 0.98, None, 0, attack="clean", undefended={"c_acc": 0.99, "asr": None, "r_acc": None})]
    return none + ft + clean


# By hand: mean (0.89 + 0.80) / 2 = 0.845; s = 0.09 / sqrt(2); half-width t * s / sqrt(2) = t * 0.045.
MEAN, HALF = 0.845, T_975_1 * 0.045


@pytest.mark.parametrize("stored", [True, False])
def test_a_two_seed_cell_is_the_mean_of_its_seeds_ders_with_the_t_interval(stored):
    """Each seed paired with its own backdoored model (the DER of the seed means would be 0.8475)."""
    der = cell_summaries(two_seeds(stored))[("d", "m", 0.1, "badnets", "ft")]["der"]
    assert der.n == 2 and der.mean == pytest.approx(MEAN) and der.half_width == pytest.approx(HALF)
    assert der.low == pytest.approx(MEAN - HALF) and der.high == 1.0  # clipped to [0, 1] like the metrics
    assert round(HALF, 4) == 0.5718
    board = leaderboard_frame(two_seeds(stored))
    row = board[board[("", "Attack")] == "BadNets"].iloc[0]
    assert row[("FT", "DER")] == "84.50 ± 57.18"


def test_der_only_for_attacked_defended_cells():
    """No DER column under No defense; a dash on the clean reference row (its benign condition has no backdoor
    to remove); n/a where the defense does not apply; nothing where the cell is missing."""
    rows = two_seeds(True) + [{**record("anp", None, None, 0), "status": "not_applicable", "reason": "no batch norm"}]
    board = leaderboard_frame(rows)
    assert [b for a, b in board.columns if a == "FT"] == ["C-Acc", "ASR", "R-Acc", "DER", "n", "Time (s)"]
    assert [b for a, b in board.columns if a == "No defense"] == ["C-Acc", "ASR", "R-Acc", "n"]
    clean = board[board[("", "Attack")] == "clean (reference)"].iloc[0]
    assert clean[("FT", "C-Acc")] == "98.00" and clean[("FT", "DER")] == "-" and clean[("ANP", "DER")] == ""
    badnets = board[board[("", "Attack")] == "BadNets"].iloc[0]
    assert badnets[("ANP", "DER")] == "n/a"
    assert all(record_der(r) is None for r in rows if r["defense"] == "none" or r["attack"] == "clean")
    assert cell_summaries(rows)[("d", "m", 0.1, "badnets", "none")]["der"] is None


def test_csv_and_page_carry_der(tmp_path):
    upsert_records(tmp_path, two_seeds(False))
    md_path, csv_path = write_leaderboard(tmp_path)
    header, *lines = csv_path.read_text().splitlines()
    columns = header.split(",")
    assert "FT DER" in columns and "No defense DER" not in columns
    at = columns.index("FT DER")
    assert columns[at:at + 3] == ["FT DER", "FT DER CI low", "FT DER CI high"]
    cells = dict(zip(columns, next(line for line in lines if ",BadNets," in line).split(",")))
    assert float(cells["FT DER"]) == 84.5
    assert float(cells["FT DER CI low"]) == round(100 * (MEAN - HALF), 2) and float(cells["FT DER CI high"]) == 100.0
    clean = dict(zip(columns, next(line for line in lines if ",clean (reference)," in line).split(",")))
    assert clean["FT DER"] == "" and clean["FT C-Acc"] == "98.0"
    markdown = md_path.read_text()
    assert "FT DER" in markdown and "84.50 ± 57.18" in markdown and "DER: the defense effectiveness rate" in markdown
    page = render_html(tmp_path)
    assert "FT DER" in page and html.escape("84.50 ± 57.18") in page
    assert html.escape("DER: the defense effectiveness rate") in page
    top = page[:page.index("</table>")]  # the page's own leaderboard table, before the markdown's
    assert ">DER</th>" in top and "84.50 <small>± 57.18</small>" in top
    assert render_markdown(two_seeds(False), tmp_path.name, tmp_path) == markdown


def test_figure2_der_panel_is_the_cells_mean_der(tmp_path):
    """The third panel: attacks by defenses (no column for no defense), each square the mean DER in percent,
    blank where the pair has none."""
    rows = two_seeds(False) + [record("none", 0.98, 1.0, 0, attack="blended"),
                               record("ft", 0.90, 0.40, 0, attack="blended"),  # (0.60 - 0.08 + 1) / 2 = 0.76
                               record("nc", 0.97, 0.95, 0)]  # NC only on BadNets: no DER for Blended x NC
    upsert_records(tmp_path, rows)
    fig = figure2(_ok_cells(read_records(tmp_path)), "d", "m", 0.1)
    panel = fig.axes[2]
    assert [t.get_text() for t in panel.get_xticklabels()] == ["FT", "NC"]
    assert [t.get_text() for t in panel.get_yticklabels()] == ["BadNets", "Blended"]
    (image,) = panel.get_images()
    grid = np.ma.filled(image.get_array().astype(float), np.nan)
    # NC on BadNets seed 0: ASR 0.95 -> 0.95, C-Acc 0.97 -> 0.97: 0.5
    np.testing.assert_allclose(grid, [[100 * MEAN, 50.0], [76.0, np.nan]])
    assert sorted(t.get_text() for t in panel.texts) == ["50.0", "76.0", "84.5"]
    assert image.get_clim() == (0, 100)


def test_figure2_der_panel_without_defenses_says_so(tmp_path):
    upsert_records(tmp_path, [record("none", 0.97, 0.95, 0)])
    fig = figure2(_ok_cells(read_records(tmp_path)), "d", "m", 0.1)
    assert [t.get_text() for t in fig.axes[2].texts] == ["no defense in these records"]
