"""Runs: who is measuring which setup, their progress, and runs left ``running`` by dead processes.

Liveness: a run on this host is alive exactly while its process is (the pid exists, is not a zombie, and started
when the run's process started: a reused pid is another process). A run on another host is alive while its
heartbeat is fresh; a background thread (:func:`beating`) refreshes it every few seconds whatever the run is doing
(a long chunk, the latency phase), so slow work never makes a live run look abandoned.
"""
from __future__ import annotations

import contextlib
import os
import socket
import sqlite3
import threading
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sweep.errors import StoreError
from sweep.store.db import BUSY_TIMEOUT_SECONDS, Database, as_db, filename, now, writes
from sweep.store.results import rows_of

RUN_STALE_SECONDS = 180
"""A running sweep on another host whose heartbeat is older than this is considered abandoned."""
STALE_ENV = "SWEEP_RUN_STALE_SECONDS"
"""Environment variable overriding :data:`RUN_STALE_SECONDS` (fault tests shorten it); read only by
:func:`stale_seconds`."""


def stale_seconds() -> float:
    """The heartbeat window: ``$SWEEP_RUN_STALE_SECONDS`` when set, else :data:`RUN_STALE_SECONDS`."""
    return float(os.environ.get(STALE_ENV) or RUN_STALE_SECONDS)


def heartbeat_seconds() -> float:
    """How often the background heartbeat beats: a sixth of the window, so several beats fit in it."""
    return min(30.0, stale_seconds() / 6)


# ---------------------------------------------------------------------------------------------- liveness


def process_start(pid: int) -> str | None:
    """When process ``pid`` started, as ``"<boot id>:<start time in clock ticks>"`` (Linux ``/proc``); None when
    unknown (no such process, not Linux). Two processes that reuse one pid have different values.

    Example: a ``/proc/4242/stat`` of ``4242 (python) S 1 ... 7265 ...`` (start time, field 22) on boot
    ``3f1c...`` -> ``"3f1c...:7265"``.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) ": field 3 (state) onwards
    return f"{boot}:{fields[19]}" if len(fields) > 19 else None


def _process_state(pid: int) -> str | None:
    """Field 3 of ``/proc/<pid>/stat`` (``R``, ``S``, ``Z`` for a zombie...); None when unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2 :].split()[0]


def process_alive(pid: int, started: str | None) -> bool:
    """Whether the process of a run on this host still runs: the pid exists, is not a zombie (killed, not yet
    reaped), and, where the run recorded its process start, started then (otherwise the pid was reused)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        pass
    if _process_state(pid) == "Z":
        return False
    now_started = process_start(pid)
    return started is None or now_started is None or now_started == started


def _heartbeat_age(run: dict[str, Any]) -> float:
    return (datetime.now(timezone.utc) - datetime.fromisoformat(run["heartbeat_at"])).total_seconds()


def _run_alive(run: dict[str, Any]) -> bool:
    """A run on this host is alive while its process is (whatever its heartbeat says: slow work is not death);
    on another host, while its heartbeat is fresher than :func:`stale_seconds`."""
    if run["host"] == socket.gethostname():
        return process_alive(run["pid"], run.get("process_start"))
    return _heartbeat_age(run) <= stale_seconds()


# ---------------------------------------------------------------------------------------------- runs


def _in_write_transaction(db: Database, work) -> Any:
    """``work(conn)`` inside ``BEGIN IMMEDIATE`` ... ``COMMIT`` (rolled back on any error, unless SQLite already
    rolled it back)."""
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


@writes
def start_run(db: Database, setup: str, planned: int, to_measure: int, command: str) -> int:
    """Register a sweep of ``setup``; refuse if another live sweep is measuring the same setup.

    The check and the insert happen in one ``BEGIN IMMEDIATE`` transaction, so of two sweeps started at once
    exactly one gets the setup. Runs left ``running`` by a dead process are marked ``abandoned``.

    Raises:
        StoreError: another live sweep of this setup holds the DB; or the DB cannot be written.
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
            "heartbeat_at, process_start) VALUES (?, 'running', ?, ?, ?, ?, ?, 0, ?, ?, ?)",
            [setup, os.getpid(), socket.gethostname(), command, planned, to_measure, stamp, stamp,
             process_start(os.getpid())],
        )
        return cursor.lastrowid

    return _in_write_transaction(db, work)


@writes
def heartbeat(db: Database, run_id: int, measured: int) -> None:
    """Record progress of a running sweep (shown by ``sweep status``)."""
    with db.conn:
        db.execute("UPDATE runs SET measured = ?, heartbeat_at = ? WHERE id = ?", [measured, now(), run_id])


@contextlib.contextmanager
def beating(db: Database, run_id: int) -> Iterator[None]:
    """Refresh the run's heartbeat from a background thread (its own connection) while the block runs, every
    :func:`heartbeat_seconds`, however long one chunk or the latency phase takes.

    A beat that fails (the DB locked for long, the disk full) is skipped: the next one tries again, and on this
    host liveness does not depend on it.
    """
    path, stop = filename(db), threading.Event()

    def beat() -> None:
        while not stop.wait(heartbeat_seconds()):
            with contextlib.suppress(sqlite3.Error):
                # mode=rw: never create a file (the DB moved or deleted while the run went on)
                conn = sqlite3.connect(f"file:{path}?mode=rw", uri=True, timeout=BUSY_TIMEOUT_SECONDS)
                try:
                    with conn:
                        conn.execute("UPDATE runs SET heartbeat_at = ? WHERE id = ? AND status = 'running'",
                                     [now(), run_id])
                finally:
                    conn.close()

    thread = threading.Thread(target=beat, name=f"sweep-heartbeat-{run_id}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5.0)  # a beat still waiting for the lock cannot touch a finished run (status check)


@writes
def finish_run(db: Database, run_id: int, status: str, measured: int) -> None:
    """Close a run: ``done``, ``interrupted`` or ``failed``."""
    stamp = now()
    with db.conn:
        db.execute("UPDATE runs SET status = ?, measured = ?, heartbeat_at = ?, ended_at = ? WHERE id = ?",
                   [status, measured, stamp, stamp, run_id])


@writes
def reap_dead_runs(db: Database, setup: str | None = None) -> int:
    """Mark ``running`` runs whose process is gone (or, on another host, whose heartbeat is stale) ``abandoned``;
    return how many.

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
