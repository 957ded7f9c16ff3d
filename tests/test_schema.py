"""The schema is defined once (sweep/store/schema.py); files of older versions upgrade in place, others are refused."""
from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from sweep import intervals, store
from sweep.errors import StoreError
from sweep.store import schema

V1_DUMP = Path(__file__).parent / "data" / "results-v1.sql"
V2_DUMP = Path(__file__).parent / "data" / "results-v2.sql"
V3_DUMP = Path(__file__).parent / "data" / "results-v3.sql"
V4_DUMP = Path(__file__).parent / "data" / "results-v4.sql"


def _load_dump(path: Path, dump: Path = V1_DUMP) -> Path:
    conn = sqlite3.connect(path)
    conn.executescript(dump.read_text())
    conn.close()
    return path


def _contents(path: Path) -> dict[str, list[tuple]]:
    """Every row of every table, sorted, read without sweep."""
    conn = sqlite3.connect(path)
    try:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        return {t: sorted(conn.execute(f'SELECT * FROM "{t}"').fetchall(), key=repr) for t in tables}
    finally:
        conn.close()


def test_a_version_1_file_upgrades_in_place_keeping_every_row(tmp_path):
    path = _load_dump(tmp_path / "v1.db")
    before = _contents(path)
    assert dict(before["meta"]) == {"schema_version": "1"}
    db = store.open_db(path)
    assert store.schema_version(db) == schema.SCHEMA_VERSION == 5
    after = _contents(path)
    for table, rows in before.items():
        if table == "meta":
            continue
        width = len(rows[0]) if rows else 0
        assert [row[:width] for row in after[table]] == rows, table  # nothing lost or changed
    assert [(v, d) for v, d, _ in after["schema_migrations"]] == [(v, schema.MIGRATIONS[v]) for v in (2, 3, 4, 5)]
    # version 3's latency columns exist, NULL in the old rows (their spread was never judged)
    assert all(r["latency_noisy"] is None and r["speed_interval_pct"] is None for r in store.read_view(db))
    # version 4's per-window columns too: old rows have no per-window losses, hence no interval
    assert all(r["n_windows"] is None and r["ppl_change_low_pct"] is None for r in store.read_view(db))
    assert after["window_losses"] == [] and after["ppl_intervals"] == []
    assert db.execute("PRAGMA application_id").fetchone()[0] == schema.APPLICATION_ID
    assert len(store.read_view(db)) == len(before["results"]) == 8
    assert store.read_greedy_steps(db, {"model_id": 1, "weights": "local:abc", "calib_fingerprint": "f00d"})


def test_a_version_2_file_upgrades_in_place_and_its_runs_gain_a_process_start(tmp_path):
    path = _load_dump(tmp_path / "v2.db", V2_DUMP)
    before = _contents(path)
    assert dict(before["meta"]) == {"schema_version": "2"} and len(before["results"]) == 8
    db = store.open_db(path)
    assert store.schema_version(db) == 5
    after = _contents(path)
    for table, rows in before.items():
        if table not in ("meta", "schema_migrations"):
            assert [row[: len(rows[0])] for row in after[table]] == rows, table
    assert [v for v, _, _ in after["schema_migrations"]] == [2, 3, 4, 5]
    run = db.execute("SELECT status, process_start FROM runs").fetchall()
    assert run == [("done", None)]  # unknown for runs of the older release
    assert len(store.read_view(db)) == 8


def test_a_version_3_file_upgrades_in_place_keeping_its_timings_and_takes_per_window_losses(tmp_path):
    path = _load_dump(tmp_path / "v3.db", V3_DUMP)
    before = _contents(path)
    assert dict(before["meta"]) == {"schema_version": "3"} and len(before["results"]) == 8
    assert "window_losses" not in before and "ppl_intervals" not in before
    db = store.open_db(path)
    assert store.schema_version(db) == schema.SCHEMA_VERSION == 5
    after = _contents(path)
    for table, rows in before.items():
        if table not in ("meta", "schema_migrations"):
            assert [row[: len(rows[0])] for row in after[table]] == rows, table  # nothing lost or changed
    assert [(v, d) for v, d, _ in after["schema_migrations"]][1:] == [(v, schema.MIGRATIONS[v]) for v in (4, 5)]
    assert after["schema_migrations"][0][:2] == (3, "created at schema version 3")
    assert all(process_start for *_, process_start in after["runs"])  # version 3's runs keep their process start
    view = {r["removed"]: r for r in store.read_view(db)}
    assert len(view) == 8
    # the timings of version 3 survive with their intervals; old rows have no per-window losses, hence no interval
    assert all(r["speed_ms"] > 0 and r["speed_interval_pct"] is not None and r["latency_noisy"] is not None
               and r["n_windows"] is None and r["ppl_change_low_pct"] is None for r in view.values())
    assert after["window_losses"] == [] and after["ppl_intervals"] == []
    # re-measured with per-window losses, the baseline and a variant get their paired interval in the old file
    setup = view[""]["setup"]
    for removed, scale in (("", 1.0), ("1", 1.001)):
        row = store.find_result(db, setup, removed)
        nll = [scale * row["nll_sum"] / 4 * w for w in (0.9, 1.1, 0.95, 1.05)]
        store.record_results(db, [{**row, store.WINDOW_NLL: nll, store.WINDOW_TOKENS: [31, 31, 31, 31]}])
    assert intervals.refresh_intervals(db, setup) == 2  # the baseline's own (zero) interval and the variant's
    view = {r["removed"]: r for r in store.read_view(db)}
    assert view["1"]["n_windows"] == 4 and view["1"]["ppl_change_low_pct"] < view["1"]["ppl_change_high_pct"]
    assert {k for k, r in view.items() if r["ppl_change_low_pct"] is not None} == {"", "1"}


def test_a_version_4_file_upgrades_in_place_and_a_search_resumes_from_nothing_in_it(tmp_path):
    path = _load_dump(tmp_path / "v4.db", V4_DUMP)
    before = _contents(path)
    assert dict(before["meta"]) == {"schema_version": "4"} and "search_candidates" not in before
    db = store.open_db(path)
    assert store.schema_version(db) == schema.SCHEMA_VERSION == 5
    after = _contents(path)
    for table, rows in before.items():
        if table not in ("meta", "schema_migrations"):
            assert after[table] == rows, table  # nothing lost or changed, per-window losses included
    assert [(v, d) for v, d, _ in after["schema_migrations"]][-1] == (5, schema.MIGRATIONS[5])
    assert after["search_candidates"] == []
    key = {"model_id": 1, "weights": before["setups"][0][10], "calib_fingerprint": before["greedy_steps"][0][2]}
    assert store.read_search_candidates(db, key) == [] and len(store.read_greedy_steps(db, key)) == 2
    import numpy as np

    store.record_search_candidate(db, key, "block/ppl/n=1/seed=0/level=0.95", {
        "removed": "1", "n_units": 1, "generation": 0, "status": "leader", "n_windows": 3, "fitness": 5.5,
        "spent": 93, "window_values": np.array([170.0, 171.5, 169.0])})
    (row,) = store.read_search_candidates(db, key)
    assert row["window_values"].tolist() == [170.0, 171.5, 169.0] and row["status"] == "leader"


def test_an_upgraded_file_is_left_alone_on_the_next_open(tmp_path):
    path = _load_dump(tmp_path / "v1.db")
    store.open_db(path).close()
    upgraded = _contents(path)
    store.open_db(path).close()
    assert _contents(path) == upgraded


def test_a_new_file_has_exactly_the_schema(tmp_path):
    db = store.open_db(tmp_path / "new.db")
    assert set(db.table_names()) == {t.name for t in schema.TABLES}
    assert set(db.view_names()) == {v.name for v in schema.VIEWS}
    for table in schema.TABLES:
        columns = [(r[1], r[2]) for r in db.execute(f'PRAGMA table_info("{table.name}")')]
        assert columns == [(c.name, schema.SQL_TYPES[c.type]) for c in table.columns], table.name
    view_columns = [d[0] for d in db.execute("SELECT * FROM results_vs_baseline LIMIT 0").description]
    assert view_columns == [c.name for c in schema.RESULTS_VS_BASELINE.columns]
    assert [(v, d) for v, d, _ in db.execute("SELECT * FROM schema_migrations")] == [
        (5, "created at schema version 5")]


def test_every_column_is_documented_with_a_type_and_measurements_say_which_way_is_better():
    for item in (*schema.TABLES, *schema.VIEWS):
        assert item.doc, item.name
        for column in item.columns:
            assert column.doc and column.type in schema.SQL_TYPES, (item.name, column.name)
            assert column.better in (None, "lower", "higher"), (item.name, column.name)
    assert {c.name: c.better for c in schema.RESULTS.columns}["ppl"] == "lower"
    assert {c.name: c.unit for c in schema.RESULTS.columns}["prefill_ms"] == "ms"


def _foreign_file(path: Path) -> bytes:
    conn = sqlite3.connect(path)
    conn.executescript("CREATE TABLE results (id INTEGER PRIMARY KEY, score REAL); INSERT INTO results VALUES (1, 2.5);")
    conn.close()
    return path.read_bytes()


def test_another_applications_sqlite_file_is_refused_untouched(tmp_path):
    path = tmp_path / "theirs.db"
    original = _foreign_file(path)
    with pytest.raises(StoreError, match="another application"):
        store.open_db(path)
    assert path.read_bytes() == original  # no table added, still in rollback-journal mode
    assert not Path(f"{path}-wal").exists()


@pytest.mark.parametrize("version", [str(schema.SCHEMA_VERSION + 1), "1a"])
def test_a_newer_or_unreadable_schema_version_is_refused_untouched(tmp_path, version):
    path = tmp_path / "r.db"
    store.open_db(path).close()
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA journal_mode=DELETE")  # a plain file, so any change to it would show in its bytes
    conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", [version])
    conn.commit()
    conn.close()
    original = path.read_bytes()
    with pytest.raises(StoreError, match="newer than this sweep" if version.isdigit() else "unreadable schema version"):
        store.open_db(path)
    assert path.read_bytes() == original


def test_schema_page_is_generated_from_the_schema():
    page = schema.schema_markdown()
    for item in (*schema.TABLES, *schema.VIEWS):
        assert f"`{item.name}`" in page
        assert all(f"| `{c.name}` |" in page for c in item.columns)
