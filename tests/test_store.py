"""The SQLite store: durability settings, runs and their liveness, bad files, the pandas API."""
from __future__ import annotations

import os
import sqlite3
import subprocess
import sys

import pytest

import sweep
from sweep import store
from sweep.errors import StoreError


def make_db(path):
    db = store.open_db(path)
    model_id = store.upsert_model(db, "org/tiny", None, "float32", 4, "GPT2LMHeadModel")
    setup = store.upsert_setup(db, model_id, {"data": "d", "data_fingerprint": "f", "data_tokens": 100,
                                              "max_length": 8, "stride": 8, "max_tokens": None, "latency_seq": 4,
                                              "device": "cpu", "engine_version": "1"})
    for key, ppl in (("", 10.0), ("0", 30.0), ("1", 12.0)):
        store.record_result(db, {"setup_id": setup, "removed": key, "n_removed": len(key.split(",")) if key else 0,
                                 "n_layers": 4 - (1 if key else 0), "ppl": ppl, "prefill_ms": 2.0, "params": 100,
                                 "status": "ok"})
    return db, setup


def test_db_is_wal_with_full_sync(tmp_path):
    db, _ = make_db(tmp_path / "r.db")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_second_live_run_of_the_same_setup_is_refused(tmp_path):
    db, setup = make_db(tmp_path / "r.db")
    run_id = store.start_run(db, setup, 10, 7, "sweep run")
    other = store.open_db(tmp_path / "r.db")  # another connection, as another process would have
    with pytest.raises(StoreError, match="another sweep"):
        store.start_run(other, setup, 10, 7, "sweep run")
    store.finish_run(db, run_id, "done", 7)
    assert store.start_run(other, setup, 10, 0, "sweep run") > run_id


def test_run_of_a_dead_process_is_abandoned_and_does_not_block(tmp_path):
    db, setup = make_db(tmp_path / "r.db")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    run_id = store.start_run(db, setup, 10, 7, "sweep run")
    with db.conn:
        db.execute("UPDATE runs SET pid = ? WHERE id = ?", [dead.pid, run_id])
    assert store.runs_overview(db)[0]["status"] == "abandoned"
    store.start_run(db, setup, 10, 7, "sweep run")
    statuses = dict(db.execute("SELECT id, status FROM runs"))
    assert statuses[run_id] == "abandoned"


def test_heartbeat_and_finish_record_progress(tmp_path):
    db, setup = make_db(tmp_path / "r.db")
    run_id = store.start_run(db, setup, 10, 7, "sweep run")
    store.heartbeat(db, run_id, 3)
    assert store.runs_overview(db)[0]["measured"] == 3
    store.finish_run(db, run_id, "interrupted", 4)
    run = store.runs_overview(db)[0]
    assert (run["status"], run["measured"], run["model"]) == ("interrupted", 4, "org/tiny")


def test_newer_schema_is_refused(tmp_path):
    db, _ = make_db(tmp_path / "r.db")
    with db.conn:
        db.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    with pytest.raises(StoreError, match="newer"):
        store.open_db(tmp_path / "r.db")


def test_corrupt_file_is_refused_with_a_clear_error(tmp_path):
    bad = tmp_path / "bad.db"
    bad.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError, match="not a usable SQLite database"):
        store.open_db(bad)


def test_read_only_db_is_refused(tmp_path):
    # Refused even for root, who could write it anyway: someone made it read-only on purpose.
    make_db(tmp_path / "r.db")
    os.chmod(tmp_path / "r.db", 0o400)
    with pytest.raises(StoreError, match="not writable"):
        store.open_db(tmp_path / "r.db")


def test_load_results_equals_the_view(tmp_path):
    make_db(tmp_path / "r.db")
    df = sweep.load_results(str(tmp_path / "r.db"), model="org/tiny")
    conn = sqlite3.connect(tmp_path / "r.db")
    cursor = conn.execute("SELECT * FROM results_vs_baseline WHERE model = 'org/tiny' ORDER BY n_removed, removed")
    assert list(df.columns) == [d[0] for d in cursor.description]
    assert [tuple(r) for r in df.itertuples(index=False)] == cursor.fetchall()
    assert sweep.load_results(str(tmp_path / "r.db"), model="nobody").empty


def test_status_command_shows_runs(tmp_path, capsys):
    from sweep.cli import main

    db, setup = make_db(tmp_path / "r.db")
    run_id = store.start_run(db, setup, 10, 7, "sweep run")
    store.heartbeat(db, run_id, 3)
    assert main(["status", "--db", str(tmp_path / "r.db")]) == 0
    out = capsys.readouterr().out
    assert "running" in out and "3/7 measured" in out and "org/tiny" in out
    assert main(["status", "--db", str(tmp_path / "missing.db")]) == 2
