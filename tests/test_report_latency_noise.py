"""Noisy latency timings (their median's interval wider than the precision asked for) are flagged, not drawn as
exact: in the tables, the baseline line, the footer and the Pareto figure."""
from __future__ import annotations

from pathlib import Path

import matplotlib.container
import pytest
from results_fixture import MODEL, N_LAYERS, make_results_db

import sweep
from sweep import store
from sweep.report import figures, write_reports
from sweep.report.format import format_timing

NOISY_KEPT = {N_LAYERS, N_LAYERS - 1}
"""The baseline's and the single removals' latency measurements are noisy (9.4 % wide); the others are exact."""


@pytest.fixture(scope="module")
def db(tmp_path_factory) -> Path:
    path = make_results_db(tmp_path_factory.mktemp("db") / "results.db")
    handle = store.open_db(path)
    with handle.conn:
        handle.conn.execute("UPDATE results SET latency_noisy = CASE WHEN n_layers IN (?, ?) THEN 1 ELSE 0 END, "
                            "prefill_interval_pct = CASE WHEN n_layers IN (?, ?) THEN 9.4 ELSE 1.2 END "
                            "WHERE prefill_ms IS NOT NULL", [*NOISY_KEPT, *NOISY_KEPT])
    handle.close()
    return path


def test_format_timing_marks_noisy_medians_with_their_interval():
    assert format_timing(12.3456) == "12.35"
    assert format_timing(12.3456, noisy=True, interval_pct=9.4) == "12.35 (noisy, ±9 %)"
    assert format_timing(12.3456, noisy=True) == "12.35 (noisy)"
    assert format_timing(None, noisy=True, interval_pct=9.4) == "—"


def test_report_tables_baseline_and_footer_flag_noisy_timings(db, tmp_path):
    (path,) = write_reports(db, tmp_path, figures=False)
    text = path.read_text()
    single = text.split("## Single layer removal")[1].split("##")[0]
    assert single.count("(noisy, ±9 %)") == 1 + N_LAYERS  # the baseline row and every single removal
    combinatorial = text.split("## Combinatorial removal")[1].split("##")[0]
    assert "(noisy" in combinatorial.splitlines()[4]  # the baseline row heads it; pairs are exact
    assert combinatorial.count("(noisy") == 1
    assert "**noisy**: the median's 95 % interval is ±9 %" in text.split("## Baseline")[1].split("##")[0]
    # the fixture's rows share no measurement (no latency_from): each timed row counts once
    frame = sweep.load_results(db, model=MODEL)
    timed = frame[frame.speed_ms.notna()]
    assert f"**noisy**: {int((timed.latency_noisy == 1).sum())} of {len(timed)} latency measurements" in text


def test_pareto_figure_draws_noisy_timings_hollow_with_interval_bars(db):
    frame = sweep.load_results(db, model=MODEL)
    fig = figures.plot_pareto(frame, "s")
    speed_axis = fig.axes[0]
    bars = [c for c in speed_axis.containers if isinstance(c, matplotlib.container.ErrorbarContainer)]
    assert len(bars) == 1
    noisy_points = bars[0].lines[0]
    n_noisy = int((frame.latency_noisy == 1).sum())
    assert len(noisy_points.get_xdata()) == n_noisy == 1 + N_LAYERS
    assert noisy_points.get_markerfacecolor() == "none"  # hollow: not an exact point
    assert any("noisy timings" in t.get_text() for t in fig.texts)
    exact = figures.plot_pareto(frame.assign(latency_noisy=0), "s").axes[0]
    assert not [c for c in exact.containers if isinstance(c, matplotlib.container.ErrorbarContainer)]
