"""The report's search section (sweep/report/search.py) on a hand-built DB: the trajectory's running-minimum rule
against an independent computation and against sweep.search.trajectory, the table of choices per size, the verdict
on constructed per-window losses, and the figure. No model, no torch."""
from __future__ import annotations

import math

import numpy as np
import pytest

from sweep import intervals, search, store
from sweep.report import load_contexts, write_reports
from sweep.report import search as search_report
from sweep.report.format import format_change_interval, format_ppl

L = 6
W = 20
"""Test windows; each weighs TOKENS tokens."""
TOKENS = 100
SEARCH = "block/ppl/n=2/seed=0/level=0.95"
KEY_FIELDS = {"weights": "w", "calib_fingerprint": "c"}

BASE = 300.0 + 3.0 * np.sin(np.arange(W))
"""Baseline NLL per window (nats over TOKENS tokens)."""
TEST_NLL = {
    "": BASE,
    "3,5": BASE + 40.0,  # greedy: the best heuristic on the test text
    "3,4": BASE + 60.0,  # angular
    "1,5": BASE + 80.0,  # block-influence
    "4,5": BASE + 50.0,  # last-n (the deepest two)
}
SEARCH_TEST_NLL = {
    "better": BASE + 40.0 - 5.0,  # lower than greedy on every window: a real gain
    "alternating": BASE + 40.0 + np.where(np.arange(W) % 2 == 0, 5.0, -6.0),  # lower on average, not on every window
}

# (removed, generation, status, n_windows, fitness, spent): one search of n = 2 on 8 calibration windows.
CANDIDATES = [
    ("3,5", 0, "leader", 8, 3.40, 800),    # greedy's seed leads first
    ("3,4", 0, "dropped", 4, 3.90, 1200),  # angular's seed, dropped after 4 windows
    ("0,1", 0, "dropped", 4, 5.00, 1200),  # a random seed
    ("1,5", 0, "scored", 8, 3.60, 1600),   # block-influence's seed
    ("0,4", 1, "scored", 8, 3.50, 2400),   # completes but does not beat the leader
    ("2,3", 1, "dropped", 4, 1.00, 2600),  # dropped: never on the trajectory, however low its partial fitness
    ("2,4", 1, "leader", 8, 3.30, 3000),   # two complete in the same slice: one point, the lower
    ("2,5", 1, "leader", 8, 3.20, 3000),
    ("1,2", 2, "racing", 4, 2.00, 3400),   # still racing: not complete
    ("0,5", 2, "scored", 8, 3.25, 3800),
]
CHOICES = [("greedy", "calib-ppl", 2, "3,5", math.exp(3.40)), ("angular", "angular-last", 2, "3,4", 0.1),
           ("block-influence", "block-influence", 2, "1,5", 0.02), ("greedy", "calib-ppl", 3, "3,4,5", 40.0)]


def ppl_of(nll: np.ndarray) -> float:
    return math.exp(float(nll.sum()) / (TOKENS * W))


def make_db(tmp_path, search_nll=SEARCH_TEST_NLL["better"], search_choice="2,5", with_search=True):
    """A 6-layer model: test results with per-window losses, the choices, and one stored search of n = 2."""
    db = store.open_db(tmp_path / "r.db")
    model_id = store.upsert_model(db, "org/tiny", None, "float32", L, "GPT2LMHeadModel")
    setup = store.upsert_setup(db, model_id, {"data": "d", "weights": "w", "max_length": 8})
    for removed, nll in {**TEST_NLL, "2,5": search_nll}.items():
        store.record_result(db, {"setup_id": setup, "removed": removed, "n_removed": len(removed.split(",")) if removed
                                 else 0, "n_layers": L - (2 if removed else 0), "ppl": ppl_of(nll),
                                 "nll_sum": float(nll.sum()), "n_tokens": TOKENS * W, "status": "ok",
                                 "window_nll": list(nll), "window_tokens": [TOKENS] * W})
    intervals.refresh_intervals(db, setup)
    key = {"model_id": model_id, **KEY_FIELDS}
    searched = [("search", "calib-ppl", 2, search_choice, math.exp(3.20)), ("search", "calib-ppl", 3, "2,4,5", 35.0)]
    choices = CHOICES + (searched if with_search else [])
    store.record_strategy_choices(db, key, [{"strategy": s, "signal": sig, "n": n, "removed": r, "score": score}
                                            for s, sig, n, r, score in choices])
    for removed, generation, status, n_windows, fitness, spent in CANDIDATES if with_search else ():
        store.record_search_candidate(db, key, SEARCH, {
            "removed": removed, "n_units": 2, "generation": generation, "status": status, "n_windows": n_windows,
            "fitness": fitness, "spent": spent, "window_values": np.full(n_windows, fitness * 16)})
    db.close()
    return tmp_path / "r.db", setup


def context(tmp_path, **kw):
    path, _ = make_db(tmp_path, **kw)
    return load_contexts(path)[0]


def reports_by_title(ctx) -> dict[str, search_report.SizeReport]:
    return {r.size.title: r for r in search_report.size_reports(ctx)}


# ---------------------------------------------------------------------------------------------- trajectory


def reference_trajectory(rows) -> list[tuple[int, float]]:
    """Independently: at each tokens-spent value, the lowest fitness of the complete, undropped candidates done by
    then; a point wherever that best goes down."""
    full = max(r["n_windows"] for r in rows)
    done = [r for r in rows if r["n_windows"] == full and r["status"] != "dropped"]
    points, last = [], math.inf
    for spent in sorted({r["spent"] for r in done}):
        best = min(r["fitness"] for r in done if r["spent"] <= spent)
        if best < last:
            points.append((spent, best))
            last = best
    return points


def test_trajectory_is_the_running_minimum_of_complete_undropped_candidates(tmp_path):
    ctx = context(tmp_path)
    [rows] = search_report.searches(ctx.search_rows).values()
    got = search_report.trajectory(rows)
    assert got == reference_trajectory(rows)
    assert got == [(800, 3.40), (3000, 3.20)]  # the dropped 1.00 and the racing 2.00 never count


def test_trajectory_on_stored_rows_follows_the_rule_of_the_search_itself():
    tokens = np.array([100.0, 120.0, 80.0, 100.0])
    rng = np.random.default_rng(0)
    candidates = [search.Scored((i,), rng.normal(300, 20, 4 if i % 3 else 2), 0, "dropped" if i % 5 == 4 else
                                "scored", spent=100 * (i // 2 + 1)) for i in range(12)]
    rows = [{"n_windows": len(c.values), "status": c.status, "spent": c.spent, "removed": str(c.units),
             "fitness": float(np.sum(c.values)) / float(tokens[: len(c.values)].sum())} for c in candidates]
    collapsed = dict(search.trajectory(candidates, tokens))  # one point per spent: the last (lowest) there
    got = search_report.trajectory(rows)
    assert len(got) >= 2 and dict(got) == pytest.approx(collapsed) and [s for s, _ in got] == list(collapsed)


# ---------------------------------------------------------------------------------------------- the table


def table_row(table: str, size: str, strategy: str) -> list[str]:
    line = next(line for line in table.splitlines() if line.startswith(f"| {size} | {strategy} |"))
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_table_gives_each_choice_its_calibration_score_test_perplexity_and_interval(tmp_path):
    ctx = context(tmp_path)
    table = search_report.choice_table(search_report.size_reports(ctx))
    view = {r["removed"]: r for r in ctx.rows}

    def change(key):
        row = view[key]
        return format_change_interval(row["ppl_change_pct"], row["ppl_change_low_pct"], row["ppl_change_high_pct"])

    assert table_row(table, "n = 2", "greedy") == ["n = 2", "greedy", "3,5", format_ppl(math.exp(3.40)),
                                                   format_ppl(ppl_of(TEST_NLL["3,5"])), change("3,5")]
    assert table_row(table, "n = 2", "angular")[2:4] == ["3,4", f"{format_ppl(math.exp(3.90))} (4 of 8 windows)"]
    assert table_row(table, "n = 2", "search")[2:5] == ["2,5", format_ppl(math.exp(3.20)),
                                                        format_ppl(ppl_of(SEARCH_TEST_NLL["better"]))]
    assert table_row(table, "n = 2", "last-n")[2:4] == ["4,5", "—"]  # no calibration score: not a seed
    assert "[" in change("2,5")  # the view carries the paired interval against the baseline
    # n = 3: a search choice with no stored candidates; greedy's own calibration perplexity is its score
    assert table_row(table, "n = 3", "greedy")[2:5] == ["3,4,5", format_ppl(40.0), "not measured"]
    assert table_row(table, "n = 3", "search")[3] == format_ppl(35.0)
    strategies = [line.split("|")[2].strip() for line in table.splitlines()[2:] if line.startswith("| n = 2 ")]
    assert strategies == ["last-n", "angular", "block-influence", "greedy", "search"]


def test_seeds_are_labelled_by_the_heuristics_that_chose_them(tmp_path):
    ctx = context(tmp_path)
    [rows] = search_report.searches(ctx.search_rows).values()
    assert search_report.heuristic_labels(rows, ctx.strategy_choices) == {
        "3,5": ["greedy"], "3,4": ["angular"], "1,5": ["block-influence"]}  # 0,1 is a random seed


# ---------------------------------------------------------------------------------------------- the verdict


def verdict_of(ctx, title="n = 2") -> str:
    report = reports_by_title(ctx)[title]
    return search_report.verdict(report.size, report.entries(), ctx.window_losses, intervals.RESAMPLES)


def test_lower_on_every_window_is_a_real_gain(tmp_path):
    ctx = context(tmp_path)
    got = verdict_of(ctx)
    want = intervals.difference_interval(SEARCH_TEST_NLL["better"], TEST_NLL["3,5"], [TOKENS] * W)
    assert want.high < 0
    assert got.startswith("n = 2: the search's gain over greedy (") and got.endswith(") is real.")
    assert f"{format_ppl(ppl_of(TEST_NLL['3,5']))} → {format_ppl(ppl_of(SEARCH_TEST_NLL['better']))}" in got


def test_alternating_windows_are_within_noise(tmp_path):
    ctx = context(tmp_path, search_nll=SEARCH_TEST_NLL["alternating"])
    want = intervals.difference_interval(SEARCH_TEST_NLL["alternating"], TEST_NLL["3,5"], [TOKENS] * W)
    assert want.low < 0 < want.high and want.change < 0
    assert verdict_of(ctx).startswith("n = 2: the search's gain over greedy (")
    assert verdict_of(ctx).endswith(") is within noise.")


def test_the_same_variant_as_the_best_heuristic_is_said_so(tmp_path):
    ctx = context(tmp_path, search_choice="3,5")
    assert verdict_of(ctx) == "n = 2: the search chose the same variant as greedy (`3,5`)."


def test_an_unmeasured_search_choice_is_not_judged(tmp_path):
    ctx = context(tmp_path)
    assert verdict_of(ctx, "n = 3") == "n = 3: the search's choice `2,4,5` has no test perplexity yet."


# ---------------------------------------------------------------------------------------------- sizes


def test_search_ids_and_choices_name_the_same_size():
    budget = search_report.parse_search_id("mix/kl/params>=0.158/seed=0/level=0.95")
    assert budget == search_report.size_of_choice({"strategy": "search-mix", "signal": "calib-kl@params>=0.158",
                                                   "n": 7})
    assert (budget.strategy, budget.signal, budget.budget) == ("search-mix", "calib-kl@params>=0.158", 0.158)
    assert budget.title == "params ≥ 0.158 (mix units, kl fitness)"
    assert budget.is_choice({"strategy": "search-mix", "signal": "calib-kl@params>=0.158", "n": 7})
    assert search_report.size_of_choice({"strategy": "greedy-mix", "signal": "calib-ppl", "n": 2}) is None
    assert search_report.unit_of("block-influence") == "block" and search_report.unit_of("greedy-attn") == "attn"


# ---------------------------------------------------------------------------------------------- the report


def test_report_has_the_search_section_and_figure(tmp_path):
    path, _ = make_db(tmp_path)
    out = tmp_path / "reports"
    [report] = write_reports(path, out)
    text = report.read_text()
    assert "## Search" in text and text.index("## Strategies") < text.index("## Search")
    assert "(org--tiny-search.png)" in text
    assert (out / "org--tiny-search.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "- n = 2: the search's gain over greedy (" in text


def test_report_without_a_search_has_no_search_section(tmp_path):
    path, _ = make_db(tmp_path, with_search=False)
    [report] = write_reports(path, tmp_path / "reports")
    text = report.read_text()
    assert "## Strategies" in text and "## Search" not in text
    assert not (tmp_path / "reports" / "org--tiny-search.png").exists()


def test_ids_of_another_form_are_not_sizes():
    assert search_report.parse_search_id("block/ppl/size=8/seed=0") is None
    assert search_report.parse_search_id("block/ppl/params>=x/seed=0") is None
    assert search_report.parse_search_id("n=8") is None


def test_a_budget_search_lists_the_heuristic_choices_that_seeded_it(tmp_path):
    path, setup = make_db(tmp_path)
    db = store.open_db(path)
    key = {"model_id": store.read_strategy_choices(db, setup)[0]["model_id"], **KEY_FIELDS}
    budget = "mix/ppl/params>=0.3/seed=0/level=0.95"
    stored = (("a3,4,5", 0, 3.5, 800), ("0,1", 0, 3.9, 1600), ("a2,4,5", 1, 3.3, 2400))
    for removed, generation, fitness, spent in stored:
        store.record_search_candidate(db, key, budget, {
            "removed": removed, "n_units": 5, "generation": generation, "status": "scored", "n_windows": 8,
            "fitness": fitness, "spent": spent, "window_values": np.full(8, fitness * 16)})
    store.record_strategy_choices(db, key, [
        {"strategy": "greedy-mix", "signal": "calib-ppl", "n": 5, "removed": "a3,4,5", "score": math.exp(3.5)},
        {"strategy": "search-mix", "signal": "calib-ppl@params>=0.3", "n": 5, "removed": "a2,4,5",
         "score": math.exp(3.3)}])
    db.close()
    ctx = load_contexts(path)[0]
    table = search_report.choice_table(search_report.size_reports(ctx))
    size = "params ≥ 0.3 (mix units)"
    assert table_row(table, size, "greedy-mix")[2:4] == ["a3,4,5", format_ppl(math.exp(3.5))]
    assert table_row(table, size, "search-mix")[2:5] == ["a2,4,5", format_ppl(math.exp(3.3)), "not measured"]
    assert not any(line.startswith(f"| {size} | last-n") for line in table.splitlines())
    assert search_report.plot_search(search_report.size_reports(ctx), "s") is not None  # two panels
