"""results.db: the only module that touches SQLite. Must not import torch.

Schema (version 1)::

    meta(key PRIMARY KEY, value)                         -- schema_version
    models(id, name, revision, dtype, n_layers, model_class, UNIQUE(name, revision, dtype))
    setups(id PRIMARY KEY, model_id, data, data_fingerprint, data_tokens, max_length, stride,
           max_tokens, latency_seq, latency_settings, weights, device, engine_version, created_at)
    runs(id, setup_id, status, pid, host, command, planned, to_measure, measured, started_at, heartbeat_at, ended_at)
    results(setup_id, removed, ..., status, error, PRIMARY KEY(setup_id, removed))
    VIEW results_vs_baseline                              -- each variant against the baseline of its setup
    measurements(id, setup_id, removed, status, run_id, pid, host, measured_at)  -- audit log, one per commit

A result row is committed the moment it is measured, so an interrupted sweep loses at most the
variant in flight. Failures are rows too (``status`` = ``failed`` or ``diverged`` with ``error``), as in
optuna's trial states: a sweep never crashes on one bad variant and never silently skips it.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import socket
import sqlite3
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import sqlite_utils

from sweep.errors import StoreError

SCHEMA_VERSION = 1

BUSY_TIMEOUT_SECONDS = 30
"""How long a writer waits for another process's write lock before giving up."""

RUN_STALE_SECONDS = 180
"""A running sweep whose heartbeat is older than this (or whose process is gone) is considered abandoned."""

STATUSES = ("ok", "failed", "diverged")
"""ok: measured; failed: an error (e.g. out of memory) stopped the measurement; diverged: NaN/inf perplexity."""

RESULT_COLUMNS: dict[str, type] = {
    "setup_id": str,
    "removed": str,  # canonical key "1,3"; "" for the baseline
    "n_removed": int,
    "n_layers": int,  # layers kept
    "kept_layers": str,
    "params": int,
    "params_non_embedding": int,
    "nll_sum": float,
    "n_tokens": int,
    "n_bytes": int,
    "ppl": float,
    "bpb": float,
    "prefill_ms": float,  # median
    "prefill_iqr_ms": float,
    "prefill_repeats": int,
    "decode_ms_per_token": float,
    "decode_iqr_ms": float,
    "latency_signature": str,
    "latency_from": str,  # key of the variant whose latency measurement this row shares
    "status": str,
    "error": str,
    "eval_seconds": float,
    "latency_seconds": float,
    "device": str,
    "host": str,
    "measured_at": str,
}

VIEW_SQL = """
CREATE VIEW IF NOT EXISTS results_vs_baseline AS
SELECT
    m.name AS model,
    r.setup_id AS setup,
    r.removed,
    r.n_removed,
    r.n_layers,
    r.ppl,
    r.prefill_ms AS speed_ms,
    r.params,
    100.0 * (r.ppl / b.ppl - 1.0) AS ppl_change_pct,
    100.0 * (r.prefill_ms / b.prefill_ms - 1.0) AS speed_change_pct,
    r.status,
    r.error,
    r.bpb,
    r.decode_ms_per_token,
    100.0 * (r.decode_ms_per_token / b.decode_ms_per_token - 1.0) AS decode_change_pct,
    r.params_non_embedding,
    100.0 * (1.0 * r.params / b.params - 1.0) AS params_change_pct,
    r.nll_sum,
    r.n_tokens,
    r.prefill_iqr_ms AS speed_iqr_ms,
    r.prefill_repeats,
    r.latency_from,
    m.revision,
    m.dtype,
    m.n_layers AS model_layers,
    s.data,
    s.max_length,
    s.stride,
    s.max_tokens,
    r.device,
    r.measured_at
FROM results r
JOIN setups s ON s.id = r.setup_id
JOIN models m ON m.id = s.model_id
LEFT JOIN results b ON b.setup_id = r.setup_id AND b.removed = '' AND b.status = 'ok'
"""


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def check_writable(path: str | Path) -> None:
    """Fail early, before any model is loaded, if results cannot be written to ``path``.

    Raises:
        StoreError: the file or its directory is not writable, or the path is a directory.
    """
    path = Path(path)
    if path.is_dir():
        raise StoreError(f"--db {path} is a directory; give a file path such as {path / 'results.db'}")
    if path.exists():
        if not os.access(path, os.W_OK):
            raise StoreError(f"--db {path} is not writable")
        check_local_and_writable(path)
        return
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise StoreError(f"--db {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise StoreError(f"--db {path}: directory {parent} is not writable")
    check_local_and_writable(path)


def open_db(path: str | Path, create: bool = True) -> sqlite_utils.Database:
    """Open (and with ``create``, initialise) a results database in WAL mode.

    Raises:
        StoreError: unwritable path, not a SQLite file, or a schema newer than this version of sweep.
    """
    path = Path(path)
    if not create and not path.exists():
        raise StoreError(f"no results database at {path}; run `sweep run` first")
    if create:
        check_writable(path)
    try:
        conn = sqlite3.connect(str(path), timeout=BUSY_TIMEOUT_SECONDS)
        db = sqlite_utils.Database(conn)
        if create:
            db.execute("PRAGMA journal_mode=WAL")
            # FULL: a committed result survives power loss, not only a process crash (WAL's NORMAL default).
            db.execute("PRAGMA synchronous=FULL")
        _check_version(db, path)
        if create:
            _create_schema(db)
    except sqlite3.DatabaseError as exc:
        raise StoreError(f"{path} is not a usable SQLite database ({exc})") from None
    return db


def _check_version(db: sqlite_utils.Database, path: Path) -> None:
    if "meta" not in db.table_names():
        return
    row = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    if row and int(row[0]) > SCHEMA_VERSION:
        raise StoreError(
            f"{path} has schema version {row[0]}, newer than this sweep understands ({SCHEMA_VERSION}); upgrade sweep"
        )


def _create_schema(db: sqlite_utils.Database) -> None:
    with db.conn:
        if "meta" not in db.table_names():
            db["meta"].create({"key": str, "value": str}, pk="key")
            db["meta"].insert({"key": "schema_version", "value": str(SCHEMA_VERSION)})
        if "models" not in db.table_names():
            db["models"].create(
                {"id": int, "name": str, "revision": str, "dtype": str, "n_layers": int, "model_class": str},
                pk="id",
            )
            db["models"].create_index(["name", "revision", "dtype"], unique=True)
        if "setups" not in db.table_names():
            db["setups"].create(
                {
                    "id": str, "model_id": int, "data": str, "data_fingerprint": str, "data_tokens": int,
                    "max_length": int, "stride": int, "max_tokens": int, "latency_seq": int,
                    "latency_settings": str, "weights": str, "device": str, "engine_version": str,
                    "created_at": str,
                },
                pk="id",
                foreign_keys=[("model_id", "models", "id")],
            )
        if "results" not in db.table_names():
            db["results"].create(RESULT_COLUMNS, pk=("setup_id", "removed"),
                                 foreign_keys=[("setup_id", "setups", "id")])
        if "runs" not in db.table_names():
            db["runs"].create(
                {"id": int, "setup_id": str, "status": str, "pid": int, "host": str, "command": str,
                 "planned": int, "to_measure": int, "measured": int, "started_at": str, "heartbeat_at": str,
                 "ended_at": str},
                pk="id",
            )
        db.execute(VIEW_SQL)
        _create_tasks_and_heal_schema(db)
    _create_measurement_log(db)


def upsert_model(db: sqlite_utils.Database, name: str, revision: str | None, dtype: str, n_layers: int,
                 model_class: str) -> int:
    """Return the id of the model row, creating it if needed."""
    revision = revision or ""
    with db.conn:  # INSERT OR IGNORE + SELECT: safe when two sweeps start at once
        db.execute("INSERT OR IGNORE INTO models (name, revision, dtype, n_layers, model_class) VALUES (?, ?, ?, ?, ?)",
                   [name, revision, dtype, n_layers, model_class])
    return find_model(db, name, revision, dtype)


def find_model(db: sqlite_utils.Database, name: str, revision: str | None, dtype: str) -> int | None:
    """Id of a model row, or None."""
    row = db.execute("SELECT id FROM models WHERE name = ? AND revision = ? AND dtype = ?",
                     [name, revision or "", dtype]).fetchone()
    return row[0] if row else None


def setup_id(model_id: int, fields: dict[str, Any]) -> str:
    """Stable id of an evaluation setup: a hash of everything that changes the numbers."""
    blob = json.dumps({"model_id": model_id, **fields}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def upsert_setup(db: sqlite_utils.Database, model_id: int, fields: dict[str, Any]) -> str:
    """Record an evaluation setup (data, fingerprint, windows, engine version); return its id."""
    sid = setup_id(model_id, fields)
    with db.conn:
        db["setups"].insert({"id": sid, "model_id": model_id, **fields, "created_at": now()}, ignore=True)
    return sid


def as_db(path_or_db: str | Path | sqlite_utils.Database) -> sqlite_utils.Database:
    """An open DB as is, or an existing DB file opened for reading results (never created)."""
    return path_or_db if isinstance(path_or_db, sqlite_utils.Database) else open_db(path_or_db, create=False)


def done_keys(db: sqlite_utils.Database, setup: str, statuses: Iterable[str] = ("ok", "diverged")) -> set[str]:
    """Variant keys already measured for ``setup`` (failed rows are retried on the next run)."""
    statuses = list(statuses)
    marks = ",".join("?" * len(statuses))
    rows = db.execute(f"SELECT removed FROM results WHERE setup_id = ? AND status IN ({marks})", [setup, *statuses])
    return {r[0] for r in rows}


def record_result(db: sqlite_utils.Database, row: dict[str, Any]) -> None:
    """Write one variant's result and commit at once. Non-finite perplexity is stored as data, not dropped."""
    unknown = set(row) - set(RESULT_COLUMNS)
    if unknown:
        raise StoreError(f"unknown result columns: {sorted(unknown)}")
    row = {**row, "measured_at": row.get("measured_at") or now()}
    for name in ("ppl", "bpb", "nll_sum"):
        value = row.get(name)
        if isinstance(value, float) and not math.isfinite(value):
            # SQLite turns NaN into NULL; keep inf as is. The status says why.
            row[name] = None if math.isnan(value) else value
    with db.conn:
        db["results"].upsert(row, pk=("setup_id", "removed"))


def latency_by_signature(db: sqlite_utils.Database, setup: str) -> dict[str, dict[str, Any]]:
    """Latency measurements already stored for a setup, keyed by shape signature (for reuse on resume)."""
    rows = db.execute(
        "SELECT latency_signature, prefill_ms, prefill_iqr_ms, prefill_repeats, decode_ms_per_token, decode_iqr_ms, "
        "removed, latency_from FROM results WHERE setup_id = ? AND status = 'ok' AND prefill_ms IS NOT NULL "
        "AND latency_signature IS NOT NULL",
        [setup],
    )
    found: dict[str, dict[str, Any]] = {}
    for sig, pre, iqr, reps, dec, dec_iqr, removed, src in rows:
        found.setdefault(sig, {"prefill_ms": pre, "prefill_iqr_ms": iqr, "prefill_repeats": reps,
                               "decode_ms_per_token": dec, "decode_iqr_ms": dec_iqr,
                               "latency_from": src if src is not None else removed})
    return found


LATENCY_FAILED = "latency failed: "
"""Prefix of the error text of a row whose latency measurement failed (its perplexity stands)."""

LATENCY_COLUMNS = ("prefill_ms", "prefill_iqr_ms", "prefill_repeats", "decode_ms_per_token", "decode_iqr_ms",
                   "latency_from")


def awaiting_latency(db: sqlite_utils.Database, setup: str) -> dict[str, str]:
    """Shape signature -> one variant key, for rows committed before their signature's latency was measured
    (perplexity comes first; a run stopped before its latency phase leaves such rows). Failed timings are not
    retried."""
    rows = db.execute(
        "SELECT latency_signature, MIN(removed) FROM results WHERE setup_id = ? AND latency_signature IS NOT NULL "
        "AND prefill_ms IS NULL AND (error IS NULL OR instr(error, ?) = 0) GROUP BY latency_signature",
        [setup, LATENCY_FAILED],
    )
    return {sig: removed for sig, removed in rows}


def fill_latency(db: sqlite_utils.Database, setup: str, signature: str, columns: dict[str, Any]) -> None:
    """Give the rows of ``signature`` still awaiting latency their columns, or (``latency_error``) the reason why
    they stay empty, in one transaction."""
    where = "WHERE setup_id = ? AND latency_signature = ? AND prefill_ms IS NULL"
    with db.conn:
        if "latency_error" in columns:
            message = LATENCY_FAILED + columns["latency_error"]
            db.conn.execute("UPDATE results SET error = CASE WHEN error IS NULL OR error = '' THEN ? "
                            f"ELSE error || '; ' || ? END {where} AND (error IS NULL OR instr(error, ?) = 0)",
                            [message, message, setup, signature, LATENCY_FAILED])
            return
        names = [n for n in LATENCY_COLUMNS if n in columns]
        db.conn.execute(f"UPDATE results SET {', '.join(f'{n} = ?' for n in names)} {where}",
                        [columns[n] for n in names] + [setup, signature])


def seconds_per_variant(db: sqlite_utils.Database, setup: str) -> float | None:
    """Median measured evaluation time of one variant in a setup (for plan estimates), or None."""
    rows = [r[0] for r in db.execute(
        "SELECT eval_seconds + COALESCE(latency_seconds, 0) FROM results WHERE setup_id = ? AND status = 'ok'",
        [setup],
    ) if r[0] is not None]
    if not rows:
        return None
    rows.sort()
    return rows[len(rows) // 2]


def read_view(path_or_db: str | Path | sqlite_utils.Database, model: str | None = None,
              setup: str | None = None) -> list[dict[str, Any]]:
    """Rows of ``results_vs_baseline`` as dicts, optionally filtered by model name and setup id."""
    db = as_db(path_or_db)
    where, params = [], []
    if model is not None:
        where.append("model = ?")
        params.append(model)
    if setup is not None:
        where.append("setup = ?")
        params.append(setup)
    sql = "SELECT * FROM results_vs_baseline" + (" WHERE " + " AND ".join(where) if where else "")
    sql += " ORDER BY model, setup, n_removed, removed"
    cursor = db.execute(sql, params)
    names = [d[0] for d in cursor.description]
    return [dict(zip(names, r)) for r in cursor.fetchall()]


def view_columns(path_or_db: str | Path | sqlite_utils.Database) -> list[str]:
    """Column names of ``results_vs_baseline``, in order."""
    db = as_db(path_or_db)
    return [d[0] for d in db.execute("SELECT * FROM results_vs_baseline LIMIT 0").description]


def setups_overview(path_or_db: str | Path | sqlite_utils.Database) -> list[dict[str, Any]]:
    """One row per (model, setup) with the number of results, newest first."""
    db = as_db(path_or_db)
    cursor = db.execute(
        "SELECT m.name AS model, s.id AS setup, s.data, s.max_length, s.stride, s.max_tokens, s.latency_seq, "
        "m.dtype, s.device, s.created_at, COUNT(r.removed) AS n_results "
        "FROM setups s JOIN models m ON m.id = s.model_id LEFT JOIN results r ON r.setup_id = s.id "
        "GROUP BY s.id ORDER BY s.created_at DESC"
    )
    names = [d[0] for d in cursor.description]
    return [dict(zip(names, r)) for r in cursor.fetchall()]


# ---------------------------------------------------------------------------------------------- runs


def _run_alive(run: dict[str, Any]) -> bool:
    """A run is alive when its heartbeat is fresh and, on this host, its process still exists."""
    age = (datetime.now(timezone.utc) - datetime.fromisoformat(run["heartbeat_at"])).total_seconds()
    if age > RUN_STALE_SECONDS:
        return False
    if run["host"] == socket.gethostname():
        try:
            os.kill(run["pid"], 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
    return True


def start_run(db: sqlite_utils.Database, setup: str, planned: int, to_measure: int, command: str) -> int:
    """Register a sweep of ``setup``; refuse if another live sweep is measuring the same setup.

    The check and the insert happen in one ``BEGIN IMMEDIATE`` transaction, so of two sweeps started at once
    exactly one gets the setup. Runs left ``running`` by a dead process are marked ``abandoned``.

    Raises:
        StoreError: another live sweep of this setup holds the DB.
    """
    conn = db.conn
    conn.execute("BEGIN IMMEDIATE")
    try:
        cursor = conn.execute("SELECT * FROM runs WHERE setup_id = ? AND status = 'running'", [setup])
        names = [d[0] for d in cursor.description]
        for run in (dict(zip(names, r)) for r in cursor.fetchall()):
            if _run_alive(run):
                raise StoreError(
                    f"another sweep (pid {run['pid']} on {run['host']}, run {run['id']}) is measuring this setup "
                    f"in this DB; wait for it (`sweep status`), or use another --db"
                )
            conn.execute("UPDATE runs SET status = 'abandoned', ended_at = ? WHERE id = ?", [now(), run["id"]])
        stamp = now()
        cursor = conn.execute(
            "INSERT INTO runs (setup_id, status, pid, host, command, planned, to_measure, measured, started_at, "
            "heartbeat_at) VALUES (?, 'running', ?, ?, ?, ?, ?, 0, ?, ?)",
            [setup, os.getpid(), socket.gethostname(), command, planned, to_measure, stamp, stamp],
        )
        conn.execute("COMMIT")
        return cursor.lastrowid
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def heartbeat(db: sqlite_utils.Database, run_id: int, measured: int) -> None:
    """Record progress of a running sweep (shown by ``sweep status``)."""
    with db.conn:
        db.execute("UPDATE runs SET measured = ?, heartbeat_at = ? WHERE id = ?", [measured, now(), run_id])


def finish_run(db: sqlite_utils.Database, run_id: int, status: str, measured: int) -> None:
    """Close a run: ``done``, ``interrupted`` or ``failed``."""
    stamp = now()
    with db.conn:
        db.execute("UPDATE runs SET status = ?, measured = ?, heartbeat_at = ?, ended_at = ? WHERE id = ?",
                   [status, measured, stamp, stamp, run_id])


def runs_overview(path_or_db: str | Path | sqlite_utils.Database, limit: int = 20) -> list[dict[str, Any]]:
    """The newest runs with their model, progress and liveness (``running`` runs of dead processes: ``abandoned``)."""
    db = as_db(path_or_db)
    if "runs" not in db.table_names():
        return []
    cursor = db.execute(
        "SELECT r.*, m.name AS model FROM runs r JOIN setups s ON s.id = r.setup_id JOIN models m ON m.id = s.model_id "
        "ORDER BY r.id DESC LIMIT ?", [limit])
    names = [d[0] for d in cursor.description]
    runs = [dict(zip(names, r)) for r in cursor.fetchall()]
    for run in runs:
        if run["status"] == "running" and not _run_alive(run):
            run["status"] = "abandoned"
    return runs


# ---------------------------------------------------------------------------------------------- layer similarity
# Issue #5: calibration signals (angular distance, Block Influence), the greedy (SLEB) path, and which strategy
# chose which variant. Tables are created on first use with IF NOT EXISTS, so older DBs upgrade in place and
# SCHEMA_VERSION is unchanged. A "calibration key" is (model_id, weights, calib_fingerprint): the model row,
# its weights fingerprint (as in setups) and the hash of calibration tokens + window settings.

SIMILARITY_SQL = """
CREATE TABLE IF NOT EXISTS layer_similarity (
    model_id INTEGER REFERENCES models(id), weights TEXT, calib_fingerprint TEXT, calib TEXT,
    metric TEXT,        -- angular-last | angular-all | block-influence
    start INTEGER,      -- layer l
    size INTEGER,       -- block size n (1 for block-influence)
    value REAL, n_sequences INTEGER, n_tokens INTEGER, computed_at TEXT,
    PRIMARY KEY (model_id, weights, calib_fingerprint, metric, start, size));
CREATE TABLE IF NOT EXISTS greedy_steps (
    model_id INTEGER REFERENCES models(id), weights TEXT, calib_fingerprint TEXT,
    step INTEGER, layer INTEGER, removed TEXT, calib_ppl REAL, computed_at TEXT,
    PRIMARY KEY (model_id, weights, calib_fingerprint, step));
CREATE TABLE IF NOT EXISTS strategy_choices (
    model_id INTEGER REFERENCES models(id), weights TEXT, calib_fingerprint TEXT,
    strategy TEXT, signal TEXT, n INTEGER, removed TEXT, score REAL, chosen_at TEXT,
    PRIMARY KEY (model_id, weights, calib_fingerprint, strategy, signal, n));
"""

CALIB_KEY = ("model_id", "weights", "calib_fingerprint")


def _create_similarity_schema(db: sqlite_utils.Database) -> None:
    with db.conn:
        db.conn.executescript(SIMILARITY_SQL)


def _key_values(key: dict[str, Any]) -> list[Any]:
    return [key[name] for name in CALIB_KEY]


def record_layer_similarity(db: sqlite_utils.Database, key: dict[str, Any], calib: str,
                            rows: Iterable[dict[str, Any]]) -> None:
    """Store one calibration pass's signals (rows with metric, start, size, value, n_sequences, n_tokens)."""
    _create_similarity_schema(db)
    stamp = now()
    values = [[*_key_values(key), calib, r["metric"], r["start"], r["size"],
               None if not math.isfinite(r["value"]) else r["value"], r["n_sequences"], r["n_tokens"], stamp]
              for r in rows]
    with db.conn:
        db.conn.executemany("INSERT OR REPLACE INTO layer_similarity VALUES (?,?,?,?,?,?,?,?,?,?,?)", values)


def _select(db: sqlite_utils.Database, table: str, sql: str, params: list[Any]) -> list[dict[str, Any]]:
    if table not in db.table_names():
        return []
    cursor = db.execute(sql, params)
    names = [d[0] for d in cursor.description]
    return [dict(zip(names, r)) for r in cursor.fetchall()]


def read_layer_similarity(db: sqlite_utils.Database, key: dict[str, Any]) -> list[dict[str, Any]]:
    """The stored signals of one calibration key (empty when not computed)."""
    return _select(db, "layer_similarity", "SELECT * FROM layer_similarity WHERE model_id = ? AND weights = ? "
                   "AND calib_fingerprint = ? ORDER BY metric, size, start", _key_values(key))


def similarity_overview(path_or_db: str | Path | sqlite_utils.Database,
                        model: str | None = None) -> list[dict[str, Any]]:
    """Every stored signal row with its model name (for reports), newest calibration pass first."""
    db = as_db(path_or_db)
    where, params = ("WHERE m.name = ?", [model]) if model is not None else ("", [])
    return _select(db, "layer_similarity",
                   "SELECT m.name AS model, m.n_layers AS model_layers, ls.* FROM layer_similarity ls "
                   f"JOIN models m ON m.id = ls.model_id {where} "
                   "ORDER BY ls.computed_at DESC, m.name, ls.metric, ls.size, ls.start", params)


def record_greedy_step(db: sqlite_utils.Database, key: dict[str, Any], step: int, layer: int, removed: str,
                       calib_ppl: float) -> None:
    """Store one round of the greedy search at once (an interrupted search resumes from the last round)."""
    _create_similarity_schema(db)
    ppl = calib_ppl if calib_ppl is not None and math.isfinite(calib_ppl) else None
    with db.conn:
        db.execute("INSERT OR REPLACE INTO greedy_steps VALUES (?,?,?,?,?,?,?,?)",
                   [*_key_values(key), step, layer, removed, ppl, now()])


def read_greedy_steps(db: sqlite_utils.Database, key: dict[str, Any]) -> list[dict[str, Any]]:
    """The stored greedy path of a calibration key, by step."""
    return _select(db, "greedy_steps", "SELECT * FROM greedy_steps WHERE model_id = ? AND weights = ? "
                   "AND calib_fingerprint = ? ORDER BY step", _key_values(key))


def record_strategy_choices(db: sqlite_utils.Database, key: dict[str, Any],
                            choices: Iterable[dict[str, Any]]) -> None:
    """Which variant each signal strategy chose for each n (rows with strategy, signal, n, removed, score)."""
    _create_similarity_schema(db)
    stamp = now()
    values = [[*_key_values(key), c["strategy"], c["signal"], c["n"], c["removed"],
               c["score"] if c["score"] is not None and math.isfinite(c["score"]) else None, stamp] for c in choices]
    with db.conn:
        db.conn.executemany("INSERT OR REPLACE INTO strategy_choices VALUES (?,?,?,?,?,?,?,?,?)", values)


def read_strategy_choices(path_or_db: str | Path | sqlite_utils.Database, setup: str) -> list[dict[str, Any]]:
    """The newest choice per (strategy, n) for the model and weights of ``setup``."""
    db = as_db(path_or_db)
    rows = _select(db, "strategy_choices",
                   "SELECT c.* FROM strategy_choices c JOIN setups s ON s.model_id = c.model_id "
                   "AND s.weights = c.weights WHERE s.id = ? ORDER BY c.chosen_at DESC, c.strategy, c.n", [setup])
    newest: dict[tuple[str, int], dict[str, Any]] = {}
    for row in rows:
        newest.setdefault((row["strategy"], row["n"]), row)
    return sorted(newest.values(), key=lambda r: (r["strategy"], r["n"]))


# ---------------------------------------------------------------------------------------------- tasks and heals
# Downstream task accuracy (`sweep tasks`, lm-evaluation-harness) and LoRA-healed variants (`sweep heal`).
# Created with IF NOT EXISTS semantics inside the version-1 schema, so older databases gain them in place.
#
#   task_setups(id, model_id, task, task_version, num_fewshot, task_limit, lm_eval_version, weights, dtype,
#               device, engine_version, created_at)        -- one per task and settings, like setups
#   task_results(setup_id, removed, heal_id, ..., metric, value, stderr, metrics, status, error,
#                PRIMARY KEY(setup_id, removed, heal_id)) -- heal_id '' = the variant as pruned, unhealed
#   heals(id, model_id, setup_id, removed, <training settings>, <losses>, ppl, ..., status, error)
#                                                           -- (setup_id, removed) links to the unhealed row in results

TASK_RESULT_COLUMNS: dict[str, type] = {
    "setup_id": str,  # task_setups.id
    "removed": str,  # variant key, as in results
    "heal_id": str,  # heals.id, or "" for the pruned variant without healing
    "n_removed": int,
    "n_layers": int,  # layers kept
    "metric": str,  # the headline metric: acc (acc_norm, perplexity, ... in `metrics`)
    "value": float,
    "stderr": float,
    "metrics": str,  # JSON of every metric lm-eval reported for the task
    "n_samples": int,
    "status": str,
    "error": str,
    "eval_seconds": float,
    "device": str,
    "host": str,
    "measured_at": str,
}

HEAL_COLUMNS: dict[str, type] = {
    "id": str,
    "model_id": int,
    "setup_id": str,  # perplexity setup of the unhealed variant (results.setup_id)
    "removed": str,  # the unhealed variant (results.removed)
    "n_removed": int,
    "n_layers": int,
    "method": str,  # lora or qlora
    "lora_r": int,
    "lora_alpha": int,
    "lora_dropout": float,
    "lora_targets": str,
    "steps": int,
    "lr": float,
    "batch_size": int,
    "seq": int,
    "data": str,
    "data_fingerprint": str,
    "eval_data": str,
    "seed": int,
    "trainable_params": int,
    "heal_loss_before": float,  # mean loss on a fixed sample of the healing data
    "heal_loss_after": float,
    "eval_loss_before": float,  # mean loss on held-out text
    "eval_loss_after": float,
    "ppl_unhealed": float,  # same evaluation protocol as results.ppl
    "nll_sum": float,
    "n_tokens": int,
    "ppl": float,
    "bpb": float,
    "status": str,
    "error": str,
    "train_seconds": float,
    "export_dir": str,
    "settings": str,  # JSON of every training setting (what the id hashes)
    "device": str,
    "host": str,
    "measured_at": str,
}


def _create_tasks_and_heal_schema(db: sqlite_utils.Database) -> None:
    """Tables of `sweep tasks` and `sweep heal`; only missing ones are created (old DBs upgrade in place)."""
    names = db.table_names()
    if "task_setups" not in names:
        db["task_setups"].create(
            {"id": str, "model_id": int, "task": str, "task_version": str, "num_fewshot": int, "task_limit": int,
             "lm_eval_version": str, "weights": str, "dtype": str, "device": str, "engine_version": str,
             "created_at": str},
            pk="id", foreign_keys=[("model_id", "models", "id")],
        )
    if "task_results" not in names:
        db["task_results"].create(TASK_RESULT_COLUMNS, pk=("setup_id", "removed", "heal_id"),
                                  foreign_keys=[("setup_id", "task_setups", "id")])
    if "heals" not in names:
        db["heals"].create(HEAL_COLUMNS, pk="id", foreign_keys=[("model_id", "models", "id")])


def upsert_task_setup(db: sqlite_utils.Database, model_id: int, fields: dict[str, Any]) -> str:
    """Record the settings of one task evaluation (task, few-shot, limit, lm-eval version, weights); return its id."""
    sid = setup_id(model_id, {"kind": "task", **fields})
    with db.conn:
        db["task_setups"].insert({"id": sid, "model_id": model_id, **fields, "created_at": now()}, ignore=True)
    return sid


def done_task_keys(db: sqlite_utils.Database, task_setup: str, heal_id: str = "") -> set[str]:
    """Variant keys with a finished task result (``ok``) for ``task_setup``; failed rows are retried."""
    rows = db.execute("SELECT removed FROM task_results WHERE setup_id = ? AND heal_id = ? AND status = 'ok'",
                      [task_setup, heal_id])
    return {r[0] for r in rows}


def record_task_result(db: sqlite_utils.Database, row: dict[str, Any]) -> None:
    """Write one (task, variant) result and commit at once."""
    unknown = set(row) - set(TASK_RESULT_COLUMNS)
    if unknown:
        raise StoreError(f"unknown task result columns: {sorted(unknown)}")
    row = {"heal_id": "", **row, "measured_at": row.get("measured_at") or now()}
    with db.conn:
        db["task_results"].upsert(row, pk=("setup_id", "removed", "heal_id"))


def heal_id(setup: str, removed: str, settings: dict[str, Any]) -> str:
    """Stable id of a heal: the unhealed variant plus every training setting."""
    blob = json.dumps({"setup": setup, "removed": removed, **settings}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def record_heal(db: sqlite_utils.Database, row: dict[str, Any]) -> None:
    """Write (or update) a healed variant's row and commit at once. NaN losses are stored as NULL."""
    unknown = set(row) - set(HEAL_COLUMNS)
    if unknown:
        raise StoreError(f"unknown heal columns: {sorted(unknown)}")
    row = {**row, "measured_at": row.get("measured_at") or now()}
    row = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}
    with db.conn:
        db["heals"].upsert(row, pk="id")


def find_heal(db: sqlite_utils.Database, hid: str) -> dict[str, Any] | None:
    """The heal row with id ``hid``, or None."""
    if "heals" not in db.table_names():
        return None
    rows = list(db["heals"].rows_where("id = ?", [hid]))
    return rows[0] if rows else None


def find_result(db: sqlite_utils.Database, setup: str, removed: str) -> dict[str, Any] | None:
    """The perplexity result row of one variant in a setup, or None."""
    rows = list(db["results"].rows_where("setup_id = ? AND removed = ?", [setup, removed]))
    return rows[0] if rows else None


def read_task_results(path_or_db: str | Path | sqlite_utils.Database,
                      model: str | None = None) -> list[dict[str, Any]]:
    """Task results with their model, task settings and (for healed rows) the heal, oldest setups first.

    Columns: model, model_layers, task, num_fewshot, task_limit, lm_eval_version, dtype, device (of the task
    setup), setup, removed, heal_id, n_removed, n_layers, metric, value, stderr, n_samples, status, error, measured_at.
    """
    db = as_db(path_or_db)
    sql = ("SELECT m.name AS model, m.n_layers AS model_layers, s.task, s.num_fewshot, s.task_limit, "
           "s.lm_eval_version, s.dtype, s.device, "
           "t.setup_id AS setup, t.removed, t.heal_id, t.n_removed, t.n_layers, t.metric, t.value, t.stderr, "
           "t.n_samples, t.status, t.error, t.measured_at "
           "FROM task_results t JOIN task_setups s ON s.id = t.setup_id JOIN models m ON m.id = s.model_id")
    params: list[Any] = []
    if model is not None:
        sql += " WHERE m.name = ?"
        params.append(model)
    return _select(db, "task_results",
                   sql + " ORDER BY m.name, s.created_at, s.rowid, t.n_removed, t.removed, t.heal_id", params)


def read_heals(path_or_db: str | Path | sqlite_utils.Database, model: str | None = None) -> list[dict[str, Any]]:
    """Heal rows with their model name and layer count, the unhealed variant's stored perplexity (``ppl_pruned``)
    and the baseline's (``ppl_base``) in the same setup."""
    db = as_db(path_or_db)
    sql = ("SELECT m.name AS model, m.n_layers AS model_layers, h.*, r.ppl AS ppl_pruned, b.ppl AS ppl_base "
           "FROM heals h JOIN models m ON m.id = h.model_id "
           "LEFT JOIN results r ON r.setup_id = h.setup_id AND r.removed = h.removed "
           "LEFT JOIN results b ON b.setup_id = h.setup_id AND b.removed = '' AND b.status = 'ok'")
    params: list[Any] = []
    if model is not None:
        sql += " WHERE m.name = ?"
        params.append(model)
    return _select(db, "heals", sql + " ORDER BY m.name, h.n_removed, h.removed, h.measured_at", params)


# ---------------------------------------------------------------------------------------------- safety
# Store safety for long multi-process sweeps (issue #4): where the file lives, atomic chunk writes, a log of
# every committed measurement (so "nothing measured twice" can be checked), and runs left by dead processes.

NETWORK_FILESYSTEMS = ("nfs", "nfs4", "cifs", "smb3", "smbfs", "fuse.sshfs", "sshfs", "9p", "lustre", "gpfs",
                       "ceph", "fuse.glusterfs", "glusterfs", "afs", "beegfs", "fuse.s3fs", "fuse.gcsfuse")
"""Filesystems whose POSIX locks SQLite cannot rely on (https://www.sqlite.org/wal.html#noshm): WAL breaks there."""


def filesystem_type(path: str | Path) -> str | None:
    """Type of the filesystem holding ``path`` (``ext4``, ``nfs4``...), from /proc/self/mountinfo; None if unknown.

    Example: a mountinfo line ``36 35 0:32 / /data rw,relatime shared:1 - nfs4 srv:/x rw`` -> ``nfs4`` for
    any path under /data (the longest matching mount point wins).
    """
    target = Path(path).resolve()
    while not target.exists() and target != target.parent:
        target = target.parent
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:  # not Linux
        return None
    return fstype_from_mountinfo(lines, target)


def fstype_from_mountinfo(lines: list[str], target: Path) -> str | None:
    """The filesystem type of the longest mount point containing ``target`` (an absolute path)."""
    best, fstype = -1, None
    for line in lines:
        before, _, after = line.partition(" - ")
        fields_before, fields_after = before.split(), after.split()
        if len(fields_before) < 5 or not fields_after:
            continue
        mount_point = fields_before[4].replace("\\040", " ")
        if (str(target) == mount_point or str(target).startswith(mount_point.rstrip("/") + "/")) \
                and len(mount_point) > best:
            best, fstype = len(mount_point), fields_after[0]
    return fstype


def _read_only_filesystem(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def check_local_and_writable(path: str | Path) -> None:
    """Refuse paths SQLite cannot safely write: network filesystems, read-only mounts, files chmod'ed read-only.

    A file without any write permission bit is refused even for root (who could write it anyway): someone
    made it read-only on purpose.

    Raises:
        StoreError: naming the reason and what to do.
    """
    path = Path(path)
    where = path if path.exists() else (path.parent if str(path.parent) else Path("."))
    fstype = filesystem_type(where)
    if fstype in NETWORK_FILESYSTEMS:
        raise StoreError(f"--db {path} is on a network filesystem ({fstype}): SQLite's locks are unreliable there "
                         f"and results could be corrupted; use a local disk and copy the file afterwards")
    if _read_only_filesystem(where):
        raise StoreError(f"--db {path} is on a read-only filesystem")
    if path.exists() and not path.stat().st_mode & 0o222:
        raise StoreError(f"--db {path} is not writable (read-only file; chmod u+w to allow sweeps to add rows)")


def _create_measurement_log(db: sqlite_utils.Database) -> None:
    """``measurements``: one row per committed measurement of a variant (a re-measurement shows as a second row)."""
    with db.conn:
        db.execute("CREATE TABLE IF NOT EXISTS measurements (id INTEGER PRIMARY KEY, setup_id TEXT, removed TEXT, "
                   "status TEXT, run_id INTEGER, pid INTEGER, host TEXT, measured_at TEXT)")
        db.execute("CREATE INDEX IF NOT EXISTS measurements_variant ON measurements (setup_id, removed)")


def record_results(db: sqlite_utils.Database, rows: list[dict[str, Any]], run_id: int | None = None) -> None:
    """Write several result rows (one chunk) and their measurement-log entries in one ``BEGIN IMMEDIATE`` transaction.

    All rows of the chunk are committed together or not at all: a kill -9 between two rows leaves none of them
    half-written. IMMEDIATE takes the write lock up front, so two processes never deadlock upgrading a read.

    Raises:
        StoreError: a row has a column that is not a result column.
    """
    prepared = []
    for row in rows:
        unknown = set(row) - set(RESULT_COLUMNS)
        if unknown:
            raise StoreError(f"unknown result columns: {sorted(unknown)}")
        row = {**row, "measured_at": row.get("measured_at") or now()}
        for name in ("ppl", "bpb", "nll_sum"):
            value = row.get(name)
            if isinstance(value, float) and math.isnan(value):
                row[name] = None  # SQLite turns NaN into NULL anyway; inf is kept. The status says why.
        prepared.append(row)
    conn, host, pid = db.conn, socket.gethostname(), os.getpid()
    conn.execute("BEGIN IMMEDIATE")
    try:
        for row in prepared:
            names = list(row)
            conn.execute(f"INSERT OR REPLACE INTO results ({', '.join(names)}) VALUES ({', '.join('?' * len(names))})",
                         [row[n] for n in names])
            conn.execute("INSERT INTO measurements (setup_id, removed, status, run_id, pid, host, measured_at) "
                         "VALUES (?, ?, ?, ?, ?, ?, ?)",
                         [row["setup_id"], row["removed"], row.get("status"), run_id, pid, host, row["measured_at"]])
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def reap_dead_runs(db: sqlite_utils.Database, setup: str | None = None) -> int:
    """Mark ``running`` runs whose process is gone (or whose heartbeat is stale) ``abandoned``; return how many.

    Called at the start of every ``sweep run``, also when nothing is left to measure, so that no run stays
    ``running`` after a crash and a resume.
    """
    conn = db.conn
    conn.execute("BEGIN IMMEDIATE")
    try:
        sql = "SELECT * FROM runs WHERE status = 'running'" + (" AND setup_id = ?" if setup else "")
        cursor = conn.execute(sql, [setup] if setup else [])
        names = [d[0] for d in cursor.description]
        dead = [run["id"] for run in (dict(zip(names, r)) for r in cursor.fetchall()) if not _run_alive(run)]
        for run_id in dead:
            conn.execute("UPDATE runs SET status = 'abandoned', ended_at = ? WHERE id = ?", [now(), run_id])
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return len(dead)


def integrity_ok(db: sqlite_utils.Database) -> bool:
    """``PRAGMA integrity_check`` says ok."""
    return db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
