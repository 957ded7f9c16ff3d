"""Runs: who is measuring which setup, their progress, and runs left ``running`` by dead processes."""
from __future__ import annotations

import os
import socket
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sweep.errors import StoreError
from sweep.store.db import Database, as_db, now
from sweep.store.results import rows_of

RUN_STALE_SECONDS = 180
"""A running sweep whose heartbeat is older than this (or whose process is gone) is considered abandoned."""


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


def _in_write_transaction(db: Database, work) -> Any:
    """``work(conn)`` inside ``BEGIN IMMEDIATE`` ... ``COMMIT`` (rolled back on any error)."""
    conn = db.conn
    conn.execute("BEGIN IMMEDIATE")
    try:
        result = work(conn)
        conn.execute("COMMIT")
        return result
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def start_run(db: Database, setup: str, planned: int, to_measure: int, command: str) -> int:
    """Register a sweep of ``setup``; refuse if another live sweep is measuring the same setup.

    The check and the insert happen in one ``BEGIN IMMEDIATE`` transaction, so of two sweeps started at once
    exactly one gets the setup. Runs left ``running`` by a dead process are marked ``abandoned``.

    Raises:
        StoreError: another live sweep of this setup holds the DB.
    """
    def work(conn) -> int:
        for run in rows_of(conn.execute("SELECT * FROM runs WHERE setup_id = ? AND status = 'running'", [setup])):
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
        return cursor.lastrowid

    return _in_write_transaction(db, work)


def heartbeat(db: Database, run_id: int, measured: int) -> None:
    """Record progress of a running sweep (shown by ``sweep status``)."""
    with db.conn:
        db.execute("UPDATE runs SET measured = ?, heartbeat_at = ? WHERE id = ?", [measured, now(), run_id])


def finish_run(db: Database, run_id: int, status: str, measured: int) -> None:
    """Close a run: ``done``, ``interrupted`` or ``failed``."""
    stamp = now()
    with db.conn:
        db.execute("UPDATE runs SET status = ?, measured = ?, heartbeat_at = ?, ended_at = ? WHERE id = ?",
                   [status, measured, stamp, stamp, run_id])


def reap_dead_runs(db: Database, setup: str | None = None) -> int:
    """Mark ``running`` runs whose process is gone (or whose heartbeat is stale) ``abandoned``; return how many.

    Called at the start of every ``sweep run``, also when nothing is left to measure, so that no run stays
    ``running`` after a crash and a resume.
    """
    def work(conn) -> int:
        sql = "SELECT * FROM runs WHERE status = 'running'" + (" AND setup_id = ?" if setup else "")
        dead = [run["id"] for run in rows_of(conn.execute(sql, [setup] if setup else [])) if not _run_alive(run)]
        for run_id in dead:
            conn.execute("UPDATE runs SET status = 'abandoned', ended_at = ? WHERE id = ?", [now(), run_id])
        return len(dead)

    return _in_write_transaction(db, work)


def runs_overview(path_or_db: str | Path | Database, limit: int = 20) -> list[dict[str, Any]]:
    """The newest runs with their model, progress and liveness (``running`` runs of dead processes: ``abandoned``)."""
    db = as_db(path_or_db)
    runs = rows_of(db.execute(
        "SELECT r.*, m.name AS model FROM runs r JOIN setups s ON s.id = r.setup_id JOIN models m ON m.id = s.model_id "
        "ORDER BY r.id DESC LIMIT ?", [limit]))
    for run in runs:
        if run["status"] == "running" and not _run_alive(run):
            run["status"] = "abandoned"
    return runs
