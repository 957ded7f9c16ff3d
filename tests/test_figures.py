"""Figures are drawn from a fixture DB: files written and embedded, the expected panels present, absent data
leaves its figure out. No pixel comparisons: the checks read the matplotlib objects the PNGs are saved from."""
from __future__ import annotations

from pathlib import Path

import matplotlib.image
import pandas as pd
import pytest
from results_fixture import DIVERGED, FAILED, MODEL, N_LAYERS, make_results_db

import sweep
from sweep.report import analysis, figures
from sweep.report import write_reports

STEM = "org--critical-6"


@pytest.fixture(scope="module")
def db(tmp_path_factory) -> Path:
    return make_results_db(tmp_path_factory.mktemp("db") / "results.db")


@pytest.fixture(scope="module")
def report(db, tmp_path_factory) -> Path:
    (path,) = write_reports(db, tmp_path_factory.mktemp("reports"))
    return path


@pytest.fixture(scope="module")
def frame(db) -> pd.DataFrame:
    return sweep.load_results(db, model=MODEL)


def _texts(fig) -> list[str]:
    return [t.get_text() for t in fig.texts]


def test_every_figure_is_written_next_to_the_report_and_embedded(report):
    text = report.read_text()
    for name in figures.FIGURES:
        png = report.parent / f"{STEM}-{name}.png"
        assert png.stat().st_size > 10_000, png
        height, width, _ = matplotlib.image.imread(png).shape
        assert width > 600 and height > 300
        assert f"]({png.name})" in text


def test_figures_have_title_subtitle_with_model_and_setup(frame):
    setup = frame.setup.iloc[0]
    for name, plot in figures.FIGURES.items():
        fig = plot(frame, f"{MODEL} · setup {setup}")
        assert fig._suptitle.get_text(), name
        assert f"{MODEL} · setup {setup}" in _texts(fig), name
        assert all(ax.get_xlabel() for ax in fig.axes if ax.get_label() != "<colorbar>"), name


def test_single_removal_bars_cover_every_layer_and_mark_the_critical_one(frame):
    fig = figures.plot_single_removals(frame, "s")
    ax = fig.axes[0]
    bars = ax.patches
    assert len(bars) == N_LAYERS
    heights = [b.get_height() for b in bars]
    assert heights == pytest.approx(list(analysis.single_changes(frame)))
    assert bars[2].get_facecolor() != bars[0].get_facecolor()  # layer 2 stands out
    assert ax.get_yscale() == "symlog" and "%" in ax.get_ylabel()


def test_pair_figure_has_a_heatmap_and_an_interaction_panel_and_counts_exclusions(frame):
    fig = figures.plot_pairs(frame, "s")
    panels = [ax for ax in fig.axes if ax.images]
    assert len(panels) == 2
    assert "interaction" in panels[1].get_title()
    image = panels[0].images[0].get_array()
    assert image.shape == (N_LAYERS, N_LAYERS)
    i, j = map(int, DIVERGED.split(","))
    assert image.mask[i, j] and image.mask[j, i] and image.mask[0, 0]  # diverged pair and diagonal not coloured
    assert "Not plotted: 1 diverged, 1 failed pairs." in _texts(fig)


def test_per_n_figure_plots_best_median_worst_on_a_log_scale(frame):
    fig = figures.plot_per_n(frame, "s")
    ax = fig.axes[0]
    assert ax.get_yscale() == "log"
    labels = {line.get_label() for line in ax.get_lines()}
    assert {"best", "median", "worst"} <= labels
    best = next(line for line in ax.get_lines() if line.get_label() == "best")
    assert list(best.get_ydata()) == pytest.approx(list(analysis.per_n_stats(frame)["best"]))


def test_pareto_figure_labels_the_front_against_speed_and_parameters(frame):
    fig = figures.plot_pareto(frame, "s")
    assert [ax.get_xlabel() for ax in fig.axes] == ["prefill time (ms, median)", "parameters (millions)"]
    for ax, cost in zip(fig.axes, ("speed_ms", "params")):
        front = analysis.pareto_front(frame, cost)
        labels = [t.get_text() for t in ax.texts]
        assert labels == [k or "none" for k in front["removed"]][::-1]  # from the baseline down; none overlap


def test_many_layers_keep_one_readable_tick_per_layer():
    n_layers = 28
    rows = [{"removed": "", "n_removed": 0, "n_layers": n_layers, "status": "ok", "ppl": 10.0}]
    rows += [{"removed": str(i), "n_removed": 1, "n_layers": n_layers - 1, "status": "ok", "ppl": 11.0 + i}
             for i in range(n_layers)]
    fig = figures.plot_single_removals(pd.DataFrame(rows), "s")
    ticks = fig.axes[0].get_xticklabels()
    assert [t.get_text() for t in ticks] == [str(i) for i in range(n_layers)]
    assert ticks[0].get_fontsize() < 9


def test_absent_data_leaves_figures_and_sections_out(tmp_path):
    db = make_results_db(tmp_path / "singles.db", max_removed=1)
    (path,) = write_reports(db, tmp_path / "reports")
    text = path.read_text()
    assert "## Pair interactions" not in text and not (path.parent / f"{STEM}-pairs.png").exists()
    assert (path.parent / f"{STEM}-single.png").exists()
    assert "Pair interactions" not in text.split("## Findings")[1].split("\n## ")[0]


def test_failed_and_diverged_variants_are_never_plotted(frame):
    fig = figures.plot_pareto(frame, "s")
    plotted = sum(len(c.get_offsets()) for c in fig.axes[1].collections if c.get_label() == "measured variants")
    assert plotted == len(frame) - 2  # DIVERGED and FAILED left out
    assert {DIVERGED, FAILED} <= set(frame.removed)


def test_pair_section_tables_the_strongest_interactions_first(report):
    section = report.read_text().split("## Pair interactions\n")[1].split("\n## ")[0]
    rows = [line.split(" | ") for line in section.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert rows[0][0] == "| 0,2"  # 100 × (1.3 − 1)(40 − 1) = +1,170 points, the fixture's strongest
    assert rows[0][-1] == "+1,170 |"


def test_crowded_front_labels_do_not_overlap():
    # 40 front variants 0.01 ms apart: most would print on top of each other
    rows = [{"removed": str(i) if i else "", "n_removed": int(i > 0), "status": "ok", "ppl": 10.0 + i,
             "speed_ms": 5.0 - 0.01 * i, "params": None} for i in range(40)]
    fig = figures.plot_pareto(pd.DataFrame(rows), "s")
    labels = [t.get_text() for t in fig.axes[0].texts]
    assert labels[0] == "none" and 2 <= len(labels) < 40
