"""Models, setups and result rows: the one writer of results (with its measurement log) and the readers."""
from __future__ import annotations

import hashlib
import json
import math
import os
import socket
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from sweep.errors import StoreError
from sweep.store.db import Database, as_db, now, writes
from sweep.store.schema import RESULT_COLUMNS, WINDOW_NLL, WINDOW_TOKENS

STATUSES = ("ok", "failed", "diverged", "racing", "eliminated")
"""ok: measured; failed: an error (e.g. out of memory) stopped the measurement; diverged: NaN/inf perplexity;
racing: measured on a first part of the windows, still in a race; eliminated: dropped by a race (partial numbers)."""

LATENCY_FAILED = "latency failed: "
"""Prefix of the error text of a row whose latency measurement failed (its perplexity stands)."""

LATENCY_COLUMNS = ("prefill_ms", "prefill_iqr_ms", "prefill_repeats", "prefill_interval_pct", "decode_ms_per_token",
                   "decode_iqr_ms", "decode_interval_pct", "latency_noisy", "latency_from")


def rows_of(cursor) -> list[dict[str, Any]]:
    """A cursor's rows as dicts keyed by column name."""
    names = [d[0] for d in cursor.description]
    return [dict(zip(names, r)) for r in cursor.fetchall()]


def select(db: Database, table: str, sql: str, params: list[Any] | tuple = ()) -> list[dict[str, Any]]:
    """Rows of ``sql`` as dicts; empty when ``table`` does not exist (a database written by another tool)."""
    if table not in db.table_names():
        return []
    return rows_of(db.execute(sql, list(params)))


# ---------------------------------------------------------------------------------------------- models, setups


@writes
def upsert_model(db: Database, name: str, revision: str | None, dtype: str, n_layers: int, model_class: str) -> int:
    """Return the id of the model row, creating it if needed."""
    with db.conn:  # INSERT OR IGNORE + SELECT: safe when two sweeps start at once
        db.execute("INSERT OR IGNORE INTO models (name, revision, dtype, n_layers, model_class) VALUES (?, ?, ?, ?, ?)",
                   [name, revision or "", dtype, n_layers, model_class])
    return find_model(db, name, revision, dtype)


def find_model(db: Database, name: str, revision: str | None, dtype: str) -> int | None:
    """Id of a model row, or None."""
    row = db.execute("SELECT id FROM models WHERE name = ? AND revision = ? AND dtype = ?",
                     [name, revision or "", dtype]).fetchone()
    return row[0] if row else None


def hashed_id(fields: dict[str, Any]) -> str:
    """A stable 12-hex-digit id of a JSON-serialisable dict (key order does not matter)."""
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]


def setup_id(model_id: int, fields: dict[str, Any]) -> str:
    """Stable id of an evaluation setup: a hash of the model row and everything that changes the numbers."""
    return hashed_id({"model_id": model_id, **fields})


@writes
def upsert_setup(db: Database, model_id: int, fields: dict[str, Any]) -> str:
    """Record an evaluation setup (data, fingerprint, windows, engine version); return its id."""
    sid = setup_id(model_id, fields)
    with db.conn:
        db["setups"].insert({"id": sid, "model_id": model_id, **fields, "created_at": now()}, ignore=True)
    return sid


def setups_overview(path_or_db: str | Path | Database) -> list[dict[str, Any]]:
    """One row per (model, setup) with its number of results and last measurement, newest setup first."""
    db = as_db(path_or_db)
    return rows_of(db.execute(
        "SELECT m.name AS model, s.id AS setup, s.data, s.max_length, s.stride, s.max_tokens, s.latency_seq, "
        "m.dtype, s.device, s.created_at, COUNT(r.removed) AS n_results, MAX(r.measured_at) AS last_measured_at "
        "FROM setups s JOIN models m ON m.id = s.model_id LEFT JOIN results r ON r.setup_id = s.id "
        "GROUP BY s.id ORDER BY s.created_at DESC, s.rowid DESC"
    ))


# ---------------------------------------------------------------------------------------------- results


def done_keys(db: Database, setup: str, statuses: Iterable[str] = ("ok", "diverged")) -> set[str]:
    """Variant keys already measured for ``setup`` (failed rows are retried on the next run)."""
    statuses = list(statuses)
    marks = ",".join("?" * len(statuses))
    rows = db.execute(f"SELECT removed FROM results WHERE setup_id = ? AND status IN ({marks})", [setup, *statuses])
    return {r[0] for r in rows}


def _prepared(row: dict[str, Any]) -> dict[str, Any]:
    """A result row checked against the schema, stamped, with NaN as NULL (SQLite would store NULL anyway; inf is
    kept; the status says why).

    Raises:
        StoreError: a column that is not a result column.
    """
    unknown = set(row) - set(RESULT_COLUMNS) - {WINDOW_NLL, WINDOW_TOKENS}
    if unknown:
        raise StoreError(f"unknown result columns: {sorted(unknown)}")
    row = {k: v for k, v in row.items() if k not in (WINDOW_NLL, WINDOW_TOKENS)}
    row["measured_at"] = row.get("measured_at") or now()
    for name in ("ppl", "bpb", "nll_sum"):
        value = row.get(name)
        if isinstance(value, float) and math.isnan(value):
            row[name] = None
    return row


@writes
def record_results(db: Database, rows: list[dict[str, Any]], run_id: int | None = None) -> None:
    """Write result rows (one chunk) and their measurement-log entries in one ``BEGIN IMMEDIATE`` transaction.

    All rows of the chunk are committed together or not at all: a kill -9 between two rows leaves none of them
    half-written. IMMEDIATE takes the write lock up front, so two processes never deadlock upgrading a read.
    Non-finite perplexity is stored as data, not dropped.

    Raises:
        StoreError: a row has a column that is not a result column; or the DB cannot be written (disk full,
            locked beyond the busy timeout), with the chunk rolled back and every earlier chunk kept.
    """
    prepared = [_prepared(row) for row in rows]
    losses = [_window_losses(row) for row in rows]
    conn, host, pid = db.conn, socket.gethostname(), os.getpid()
    conn.execute("BEGIN IMMEDIATE")
    try:
        for row, loss in zip(prepared, losses):
            names = list(row)
            conn.execute(f"INSERT OR REPLACE INTO results ({', '.join(names)}) VALUES ({', '.join('?' * len(names))})",
                         [row[n] for n in names])
            conn.execute("DELETE FROM window_losses WHERE setup_id = ? AND removed = ?", [row["setup_id"], row["removed"]])
            if loss is not None:
                conn.execute("INSERT INTO window_losses (setup_id, removed, n_windows, nll, tokens) VALUES (?, ?, ?, ?, ?)",
                             [row["setup_id"], row["removed"], *loss])
            conn.execute("INSERT INTO measurements (setup_id, removed, status, run_id, pid, host, measured_at) "
                         "VALUES (?, ?, ?, ?, ?, ?, ?)",
                         [row["setup_id"], row["removed"], row.get("status"), run_id, pid, host, row["measured_at"]])
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def _window_losses(row: dict[str, Any]) -> tuple[int, bytes, bytes] | None:
    """(n_windows, nll BLOB, tokens BLOB) of a row that carries per-window losses, or None (a failed row)."""
    nll, tokens = row.get(WINDOW_NLL), row.get(WINDOW_TOKENS)
    if nll is None or tokens is None or len(nll) == 0:
        return None
    if len(nll) != len(tokens):
        raise StoreError(f"{len(nll)} per-window losses but {len(tokens)} per-window token counts")
    return len(nll), np.asarray(nll, dtype="<f8").tobytes(), np.asarray(tokens, dtype="<i4").tobytes()


def record_result(db: Database, row: dict[str, Any], run_id: int | None = None) -> None:
    """Write one variant's result at once: :func:`record_results` with one row."""
    record_results(db, [row], run_id)


def find_result(db: Database, setup: str, removed: str) -> dict[str, Any] | None:
    """The result row of one variant in a setup, or None."""
    rows = rows_of(db.execute("SELECT * FROM results WHERE setup_id = ? AND removed = ?", [setup, removed]))
    return rows[0] if rows else None


def seconds_per_variant(db: Database, setup: str) -> float | None:
    """Median measured evaluation time of one variant in a setup (for plan estimates), or None."""
    rows = sorted(r[0] for r in db.execute(
        "SELECT eval_seconds + COALESCE(latency_seconds, 0) FROM results WHERE setup_id = ? AND status = 'ok'",
        [setup]) if r[0] is not None)
    return rows[len(rows) // 2] if rows else None


# ---------------------------------------------------------------------------------------------- per-window losses


def read_window_losses(path_or_db: str | Path | Database, setup: str,
                       keys: Iterable[str] | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Variant key -> (per-window NLL (W,) float64, per-window tokens (W,) int) of a setup (all variants, or
    ``keys``). ``math.fsum`` of the NLL is the row's ``nll_sum``; W is the row's ``n_windows``."""
    db = as_db(path_or_db)
    sql = "SELECT removed, nll, tokens FROM window_losses WHERE setup_id = ?"
    if keys is None:
        rows = list(db.execute(sql, [setup]))
    else:
        wanted, rows = list(dict.fromkeys(keys)), []
        for start in range(0, len(wanted), KEYS_PER_QUERY):
            part = wanted[start : start + KEYS_PER_QUERY]
            rows += db.execute(f"{sql} AND removed IN ({', '.join('?' * len(part))})", [setup, *part]).fetchall()
    return {removed: (np.frombuffer(nll, dtype="<f8").astype(np.float64), np.frombuffer(tokens, dtype="<i4"))
            for removed, nll, tokens in rows}


KEYS_PER_QUERY = 500
"""Variant keys per ``IN (...)`` query (SQLite allows 32,766 parameters; smaller keeps each statement quick)."""


def race_progress(db: Database, setup: str) -> dict[str, tuple[str, int, float]]:
    """Variant key -> (status, windows measured (0 without per-window losses), eval_seconds) of a setup's results:
    where a race stands."""
    rows = db.execute("SELECT r.removed, r.status, COALESCE(w.n_windows, 0), COALESCE(r.eval_seconds, 0) "
                      "FROM results r LEFT JOIN window_losses w ON w.setup_id = r.setup_id AND w.removed = r.removed "
                      "WHERE r.setup_id = ?", [setup])
    return {removed: (status, n_windows, seconds) for removed, status, n_windows, seconds in rows}


def intervals_missing(db: Database, setup: str, resamples: int) -> tuple[str | None, dict[str, str]]:
    """What :func:`sweep.intervals.refresh_intervals` has to compute: (the ``ok`` baseline's ``measured_at``, or
    None without one; ``ok`` variant key -> ``measured_at`` for those whose stored interval is missing or stale,
    i.e. computed before either row was measured again, or with another number of resamples)."""
    stamps = {removed: (status, measured_at) for removed, status, measured_at in db.execute(
        "SELECT removed, status, measured_at FROM results WHERE setup_id = ?", [setup])}
    if stamps.get("", (None,))[0] != "ok":
        return None, {}
    baseline_at = stamps[""][1]
    current = {removed: at for removed, at in db.execute(
        "SELECT removed, measured_at FROM ppl_intervals WHERE setup_id = ? AND baseline_at = ? AND resamples = ?",
        [setup, baseline_at, resamples])}
    return baseline_at, {key: at for key, (status, at) in stamps.items() if status == "ok" and current.get(key) != at}


@writes
def record_intervals(db: Database, setup: str, baseline_at: str, found: list[dict[str, Any]]) -> None:
    """Store intervals of perplexity changes (rows with ``removed``, ``change_pct``, ``low_pct``, ``high_pct``,
    ``level``, ``resamples``, ``seed``, ``measured_at``) computed against the baseline measured at ``baseline_at``."""
    names = ("removed", "change_pct", "low_pct", "high_pct", "level", "resamples", "seed", "measured_at")
    with db.conn:
        db.conn.executemany(
            f"INSERT OR REPLACE INTO ppl_intervals (setup_id, baseline_at, {', '.join(names)}) "
            f"VALUES (?, ?, {', '.join('?' * len(names))})",
            [[setup, baseline_at, *(_finite(row[n]) for n in names)] for row in found])


def _finite(value: Any) -> Any:
    """NaN and inf as NULL (an interval of a diverged comparison is not known)."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def interval_resamples(db: Database, setup: str) -> int | None:
    """Bootstrap resamples of the intervals stored for ``setup`` (the most used), or None without any."""
    row = db.execute("SELECT resamples FROM ppl_intervals WHERE setup_id = ? GROUP BY resamples "
                     "ORDER BY COUNT(*) DESC LIMIT 1", [setup]).fetchone()
    return row[0] if row else None


@writes
def mark_eliminated(db: Database, setup: str, keys: Iterable[str], reason: str) -> None:
    """Turn racing rows of ``setup`` into ``eliminated`` ones (their partial numbers stay), saying why."""
    with db.conn:
        db.conn.executemany("UPDATE results SET status = 'eliminated', error = ? WHERE setup_id = ? AND removed = ? "
                            "AND status = 'racing'", [(reason, setup, key) for key in keys])


# ---------------------------------------------------------------------------------------------- latency


def latency_by_signature(db: Database, setup: str) -> dict[str, dict[str, Any]]:
    """Latency measurements already stored for a setup, keyed by shape signature (for reuse on resume)."""
    measured = [n for n in LATENCY_COLUMNS if n != "latency_from"]
    rows = db.execute(
        f"SELECT latency_signature, removed, latency_from, {', '.join(measured)} FROM results WHERE setup_id = ? "
        "AND status = 'ok' AND prefill_ms IS NOT NULL AND latency_signature IS NOT NULL",
        [setup],
    )
    found: dict[str, dict[str, Any]] = {}
    for sig, removed, source, *values in rows:
        found.setdefault(sig, {**dict(zip(measured, values)),
                               "latency_from": source if source is not None else removed})
    return found


def awaiting_latency(db: Database, setup: str) -> dict[str, str]:
    """Shape signature -> one variant key, for rows committed before their signature's latency was measured
    (perplexity comes first; a run stopped before its latency phase leaves such rows). Failed timings are not
    retried."""
    rows = db.execute(
        "SELECT latency_signature, MIN(removed) FROM results WHERE setup_id = ? AND latency_signature IS NOT NULL "
        "AND prefill_ms IS NULL AND (error IS NULL OR instr(error, ?) = 0) GROUP BY latency_signature",
        [setup, LATENCY_FAILED],
    )
    return {sig: removed for sig, removed in rows}


@writes
def fill_latency(db: Database, setup: str, signature: str, columns: dict[str, Any]) -> None:
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


# ---------------------------------------------------------------------------------------------- the view


def read_view(path_or_db: str | Path | Database, model: str | None = None,
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
    return rows_of(db.execute(sql + " ORDER BY model, setup, n_removed, removed", params))


def view_columns(path_or_db: str | Path | Database) -> list[str]:
    """Column names of ``results_vs_baseline``, in order."""
    db = as_db(path_or_db)
    return [d[0] for d in db.execute("SELECT * FROM results_vs_baseline LIMIT 0").description]
