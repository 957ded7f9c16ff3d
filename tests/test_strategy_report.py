"""Strategy report pieces on a hand-built DB: oracle, gap to it, figures. No model, no torch."""
from __future__ import annotations

import itertools
import re

import pytest

from sweep import store
from sweep.plan import variant_key
from sweep.report import plotting, report_filename
from sweep.report import signals as strategy_report
from sweep.report.format import format_pct

L = 4


def ppl_of(removed) -> float:
    """A made-up perplexity: removing later layers hurts less, with an interaction between 1 and 2."""
    return 10.0 * (1 + sum(0.1 * (L - i) for i in removed)) + (3.0 if {1, 2} <= set(removed) else 0.0)


def make_db(tmp_path, sizes=range(0, L + 1), choices=()):
    db = store.open_db(tmp_path / "r.db")
    model_id = store.upsert_model(db, "org/tiny", None, "float32", L, "GPT2LMHeadModel")
    setup = store.upsert_setup(db, model_id, {"data": "d", "weights": "w", "max_length": 8})
    for n in sizes:
        for removed in itertools.combinations(range(L), n):
            store.record_result(db, {"setup_id": setup, "removed": variant_key(removed), "n_removed": n,
                                     "n_layers": L - n, "ppl": ppl_of(removed), "status": "ok"})
    key = {"model_id": model_id, "weights": "w", "calib_fingerprint": "c"}
    store.record_strategy_choices(db, key, [{"strategy": s, "signal": "x", "n": n, "removed": r, "score": 0.0}
                                            for s, n, r in choices])
    return db, setup, key


def stored(db, setup):
    """(view rows, strategy choices) of ``setup``, as the report reads them."""
    return store.read_view(db, setup=setup), store.read_strategy_choices(db, setup)


CHOICES = [("angular", 1, "2"), ("angular", 2, "1,2"), ("greedy", 1, "3"), ("greedy", 2, "2,3")]


def test_oracle_is_the_best_variant_of_each_complete_size(tmp_path):
    db, setup, _ = make_db(tmp_path, choices=CHOICES)
    points = strategy_report.strategy_points(*stored(db, setup))
    for n in range(1, L + 1):
        best = min(itertools.combinations(range(L), n), key=ppl_of)
        assert points["oracle"][n] == (variant_key(best), ppl_of(best))
    assert points["angular"] == {1: ("2", ppl_of((2,))), 2: ("1,2", ppl_of((1, 2)))}
    assert points["last-n"][2] == ("2,3", ppl_of((2, 3)))


def test_no_oracle_for_a_size_that_is_not_fully_measured(tmp_path):
    db, setup, _ = make_db(tmp_path, sizes=[0, 1], choices=CHOICES)
    extra = {"setup_id": setup, "removed": "1,2", "n_removed": 2, "n_layers": 2, "ppl": 99.0, "status": "ok"}
    store.record_result(db, extra)
    points = strategy_report.strategy_points(*stored(db, setup))
    assert set(points["oracle"]) == {1}
    assert points["angular"][2] == ("1,2", 99.0)


def test_table_gives_the_gap_to_the_oracle(tmp_path):
    db, setup, _ = make_db(tmp_path, choices=CHOICES)
    table = strategy_report.strategy_table(*stored(db, setup))
    oracle_2 = min(ppl_of(r) for r in itertools.combinations(range(L), 2))
    angular_row = next(line for line in table.splitlines() if line.startswith("| angular"))
    gap = 100 * (ppl_of((1, 2)) / oracle_2 - 1)
    assert f"{format_pct(gap)} vs oracle" in angular_row
    assert re.search(r"\| greedy \| [\d.]+ \(3, \+0\.00 % vs oracle\)", table)  # removing 3 is the best single
    assert table.splitlines()[0] == "| strategy | 1 removed | 2 removed |"


def test_table_is_none_without_signal_strategies(tmp_path):
    db, setup, _ = make_db(tmp_path)
    assert strategy_report.strategy_table(*stored(db, setup)) is None


def test_table_without_oracle_says_how_to_get_one(tmp_path):
    db, setup, _ = make_db(tmp_path, sizes=[0], choices=[("greedy", 1, "3")])
    store.record_result(db, {"setup_id": setup, "removed": "3", "n_removed": 1, "n_layers": 3, "ppl": 5.0,
                             "status": "ok"})
    assert "No oracle" in strategy_report.strategy_table(*stored(db, setup))
    for removed in ("0", "1", "2"):  # now every single removal is measured: an oracle exists
        store.record_result(db, {"setup_id": setup, "removed": removed, "n_removed": 1, "n_layers": 3,
                                 "ppl": 6.0, "status": "ok"})
    assert "No oracle" not in strategy_report.strategy_table(*stored(db, setup))


def test_curve_and_heatmaps_are_written_as_png(tmp_path):
    db, setup, key = make_db(tmp_path, choices=CHOICES)
    rows = [{"metric": m, "start": l, "size": n, "value": 0.1 * (l + n), "n_sequences": 2, "n_tokens": 10}
            for m in ("angular-last", "angular-all") for n in range(1, L + 1) for l in range(L - n + 1)]
    rows += [{"metric": "block-influence", "start": l, "size": 1, "value": 0.01 * (l + 1), "n_sequences": 2,
              "n_tokens": 10} for l in range(L)]
    store.record_layer_similarity(db, key, "calib.txt", rows)
    curve = strategy_report.strategy_curve(*stored(db, setup), "org/tiny · setup s")
    heatmaps = strategy_report.similarity_heatmaps(store.similarity_overview(db, "org/tiny"), "org/tiny")
    paths = [plotting.save(fig, tmp_path / "out" / f"{name}.png")
             for name, fig in (("curve", curve), ("heatmaps", heatmaps))]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths)


def test_no_signals_no_heatmap(tmp_path):
    db, _, _ = make_db(tmp_path)
    assert strategy_report.similarity_heatmaps(store.similarity_overview(db, "org/tiny"), "s") is None


def test_old_db_without_the_new_tables_reads_as_empty(tmp_path):
    db, setup, _ = make_db(tmp_path)
    assert "strategy_choices" in db.table_names()
    db.execute("DROP TABLE strategy_choices")
    assert store.read_strategy_choices(db, setup) == []
    assert store.similarity_overview(db) == []


@pytest.mark.parametrize("model,name", [("gpt2", "gpt2"), ("/a/b c", "a--b_c"), (".cache/demo/model", "demo--model")])
def test_model_names_become_safe_file_names(model, name):
    assert report_filename(model) == f"{name}.md"


def test_model_report_has_similarity_and_strategy_sections(tmp_path):
    from sweep.report import write_reports

    db, setup, key = make_db(tmp_path, choices=CHOICES)
    rows = [{"metric": m, "start": l, "size": n, "value": 0.1 * (l + n), "n_sequences": 2, "n_tokens": 10}
            for m in ("angular-last", "angular-all", "block-influence") for n in (1,) for l in range(L)]
    store.record_layer_similarity(db, key, "calib.txt", rows)
    out = tmp_path / "reports"
    [path] = write_reports(tmp_path / "r.db", out)
    text = path.read_text()
    assert "## Layer similarity" in text and "## Strategies" in text
    assert "![perplexity against the fraction of layers removed, per strategy](org--tiny-strategies.png)" \
        in text and (out / "org--tiny-strategies.png").exists()
    assert "(org--tiny-similarity.png)" in text and (out / "org--tiny-similarity.png").exists()
    assert text.index("## Strategies") < text.index("| angular |")


def test_model_report_without_strategies_has_no_such_sections(tmp_path):
    from sweep.report import write_reports

    make_db(tmp_path)
    [path] = write_reports(tmp_path / "r.db", tmp_path / "reports")
    text = path.read_text()
    assert "## Strategies" not in text and "## Layer similarity" not in text


# ---------------------------------------------------------------------------------------------- similarity table

SIM_LAYERS = 8
SIM_METRICS = ("angular-last", "angular-all")


def signals_db(tmp_path, n_layers=SIM_LAYERS, seed=0, metrics=SIM_METRICS):
    """A model with a baseline result and one calibration pass of seeded random signals; (db, key, signals).

    ``signals[metric][(l, n)]`` is d(l, n); ``signals["block-influence"][l]`` is BI(l). Blocks that include the
    final layer get the smallest distance of all, so a table that forgot to keep the final layer would pick them.
    """
    import random

    rng = random.Random(seed)
    db = store.open_db(tmp_path / "sim.db")
    model_id = store.upsert_model(db, "org/sim", None, "float32", n_layers, "GPT2LMHeadModel")
    setup = store.upsert_setup(db, model_id, {"data": "d", "weights": "w", "max_length": 8})
    store.record_result(db, {"setup_id": setup, "removed": "", "n_removed": 0, "n_layers": n_layers, "ppl": 10.0,
                             "status": "ok"})
    signals = {m: {(l, n): (0.001 if l + n == n_layers else 0.1 + rng.random())
                   for n in range(1, n_layers + 1) for l in range(n_layers - n + 1)} for m in SIM_METRICS}
    signals["block-influence"] = {l: rng.random() for l in range(n_layers)}
    rows = [{"metric": m, "start": l, "size": n, "value": d, "n_sequences": 3, "n_tokens": 12_345}
            for m in metrics for (l, n), d in signals[m].items()]
    rows += [{"metric": "block-influence", "start": l, "size": 1, "value": bi, "n_sequences": 3, "n_tokens": 12_345}
             for l, bi in signals["block-influence"].items()]
    key = {"model_id": model_id, "weights": "w", "calib_fingerprint": "c"}
    store.record_layer_similarity(db, key, "calib.txt", rows)
    return db, key, signals


def _report(tmp_path, figures=False, out="reports"):
    from sweep.report import write_reports

    [path] = write_reports(tmp_path / "sim.db", tmp_path / out, figures=figures)
    text = path.read_text()
    return text.split("## Layer similarity\n", 1)[1].split("\n## ", 1)[0]


def _rows_of(section):
    lines = [line for line in section.splitlines() if line.startswith("| ")]
    return [[c.strip() for c in line.strip("|").split(" | ")] for line in lines[2:]]


def _expected_block(distances, n, n_layers):
    """The argmin over starts that keep the final layer (l + n <= L - 1), by brute force; ties to the lower l."""
    start = min(range(n_layers - n), key=lambda l: (distances[(l, n)], l))
    label = f"layer {start}" if n == 1 else f"layers {start}–{start + n - 1}"
    return label, f"{distances[(start, n)]:.4f}"


def test_similarity_table_gives_the_lowest_distance_block_of_each_size(tmp_path):
    _, _, signals = signals_db(tmp_path)
    rows = _rows_of(_report(tmp_path))
    assert [r[0] for r in rows] == [str(n) for n in range(1, SIM_LAYERS)]
    for n, row in zip(range(1, SIM_LAYERS), rows):
        last, all_tokens = (_expected_block(signals[m], n, SIM_LAYERS) for m in SIM_METRICS)
        assert row == [str(n), *last, *all_tokens]


def test_similarity_section_is_kept_without_figures_and_figures_go_above_the_table(tmp_path):
    signals_db(tmp_path)
    plain = _report(tmp_path, figures=False)
    assert "![" not in plain and "| block size n |" in plain
    assert "`calib.txt`, 12,345 tokens in 3 windows" in plain
    with_figures = _report(tmp_path, figures=True, out="with-figures")
    assert with_figures.index("(org--sim-similarity.png)") < with_figures.index("| block size n |")
    assert (tmp_path / "with-figures" / "org--sim-similarity.png").exists()


def test_block_influence_is_ranked_lowest_first(tmp_path):
    _, _, signals = signals_db(tmp_path)
    line = next(line for line in _report(tmp_path).splitlines() if line.startswith("Block Influence per layer"))
    ranked = [int(layer) for layer in re.findall(r"layer (\d+) \(", line)]
    influence = signals["block-influence"]
    assert ranked == sorted(influence, key=lambda l: influence[l])


def test_similarity_table_uses_the_newest_calibration_pass(tmp_path):
    db, key, signals = signals_db(tmp_path)
    db.execute("UPDATE layer_similarity SET computed_at = '2020-01-01T00:00:00+00:00'")  # the first pass: older
    db.conn.commit()
    newer = [{"metric": m, "start": l, "size": n, "value": 1.0 - d, "n_sequences": 1, "n_tokens": 999}
             for m in SIM_METRICS for (l, n), d in signals[m].items()]
    store.record_layer_similarity(db, {**key, "calib_fingerprint": "c2"}, "newer.txt", newer)
    section = _report(tmp_path)
    assert "`newer.txt`, 999 tokens in 1 window" in section and "calib.txt" not in section
    inverted = {(l, n): 1.0 - d for (l, n), d in signals["angular-last"].items()}
    assert _rows_of(section)[0][1:3] == list(_expected_block(inverted, 1, SIM_LAYERS))


def test_similarity_table_of_a_deep_model_shows_a_readable_number_of_sizes(tmp_path):
    from sweep.report.sections import SIMILARITY_ROWS

    _, _, signals = signals_db(tmp_path, n_layers=40)
    section = _report(tmp_path)
    rows = _rows_of(section)
    assert len(rows) <= SIMILARITY_ROWS and rows[0][0] == "1" and "sizes in steps of 2" in section
    for row in rows:
        n = int(row[0])
        assert row[1:3] == list(_expected_block(signals["angular-last"], n, 40))


def test_similarity_table_has_only_the_angular_metrics_stored(tmp_path):
    signals_db(tmp_path, metrics=("angular-last",))
    section = _report(tmp_path)
    assert "| block size n | block (last token) | d (last token) |" in section and "all tokens)" not in section
