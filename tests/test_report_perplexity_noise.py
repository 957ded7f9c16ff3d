"""Perplexity differences within noise: the report's "Which differences are real" section against an independent
paired bootstrap (test_intervals). Noisy latency timings: test_report_latency_noise."""
from __future__ import annotations

from sweep import store
from sweep.intervals import RESAMPLES, SEED
from sweep.report import load_contexts, render
from sweep.report.noise import best_versus_runner_up, single_ties
from test_intervals import bootstrap_reference, measured_db  # noqa: F401 - the fixture is shared


def test_single_ranking_ties_are_exactly_the_neighbours_whose_reference_interval_contains_zero(measured_db):  # noqa: F811
    db, setup = measured_db
    ctx = load_contexts(db, setup=setup)[0]
    singles = sorted((r for r in ctx.rows if r["n_removed"] == 1), key=lambda r: (r["ppl"], r["removed"]))
    losses = store.read_window_losses(db, setup)
    want = []
    for better, worse in zip(singles, singles[1:]):
        low, high = bootstrap_reference(losses[worse["removed"]][0], losses[better["removed"]][0],
                                        losses[""][1], RESAMPLES, SEED)
        if low <= 0 <= high:
            want.append(f"layers {better['removed']} and {worse['removed']}: indistinguishable on this text")
    got = single_ties(ctx)
    assert [line.split(" (")[0] for line in got if "indistinguishable" in line] == want
    assert any("differs beyond noise" in line for line in got) == (not want)


def test_best_per_n_is_compared_with_its_runner_up_and_the_section_is_in_the_report(measured_db):  # noqa: F811
    db, setup = measured_db
    ctx = load_contexts(db, setup=setup)[0]
    lines = best_versus_runner_up(ctx)
    ranked = sorted((r for r in ctx.rows if r["n_removed"] == 1), key=lambda r: (r["ppl"], r["removed"]))
    best, second = ranked[0]["removed"], ranked[1]["removed"]
    losses = store.read_window_losses(db, setup)
    low, high = bootstrap_reference(losses[second][0], losses[best][0], losses[""][1], RESAMPLES, SEED)
    assert len(lines) == 1 and lines[0].startswith(f"1 removed: layer {best} ")
    assert ("indistinguishable" in lines[0]) == (low <= 0 <= high)
    text = render(ctx)
    assert "## Which differences are real" in text and lines[0] in text
    assert "ppl change (%) [95 % interval]" in text


def test_change_cells_show_the_interval(measured_db):  # noqa: F811
    from sweep.report.format import format_change_interval

    assert format_change_interval(3.21, 2.1, 4.05) == "+3.2 % [+2.1, +4.0]"  # the float 4.05 is 4.0499...
    assert format_change_interval(3.21, None, 4.05) == "+3.2 %"
    db, setup = measured_db
    text = render(load_contexts(db, setup=setup)[0])
    row = store.read_view(db, setup=setup)[1]
    assert format_change_interval(row["ppl_change_pct"], row["ppl_change_low_pct"], row["ppl_change_high_pct"]) in text
