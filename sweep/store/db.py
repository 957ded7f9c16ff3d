"""Opening results.db: where it may live, whose file it is, which schema version it has, and upgrading it.

A file is opened for writing only after it has been recognised as a sweep database of a version this code
understands (or as an empty/new file): another application's SQLite file, or a newer sweep's, is refused before
anything in it changes (no table added, no switch to WAL).
"""
from __future__ import annotations

import functools
import os
import random
import sqlite3
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import TypeVar

import sqlite_utils

from sweep.errors import StoreError
from sweep.store import schema

BUSY_TIMEOUT_SECONDS = 30
"""How long a writer waits for another process's write lock before giving up."""

Database = sqlite_utils.Database


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def open_db(path: str | Path, create: bool = True) -> Database:
    """Open (with ``create``: create or upgrade) a results database; writers use WAL with full syncs.

    Raises:
        StoreError: unwritable path, not a SQLite file, another application's SQLite file, or a schema newer
            than this version of sweep.
    """
    path = Path(path)
    if not create and not path.exists():
        raise StoreError(f"no results database at {path}; run `sweep run` first")
    if create:
        check_writable(path)
    try:
        version = _recognise(path) if path.exists() else None
        conn = sqlite3.connect(str(path), timeout=BUSY_TIMEOUT_SECONDS)
        db = sqlite_utils.Database(conn)
        if create:
            _use_wal(conn)
            # FULL: a committed result survives power loss, not only a process crash (WAL's NORMAL default).
            db.execute("PRAGMA synchronous=FULL")
            _upgrade(db, version)
    except sqlite3.OperationalError as exc:  # locked beyond the timeout, disk full while creating the schema
        raise store_error(exc, path) from None
    except sqlite3.DatabaseError as exc:
        raise StoreError(f"{path} is not a usable SQLite database ({exc})") from None
    return db


def _is_locked(exc: sqlite3.Error) -> bool:
    return getattr(exc, "sqlite_errorcode", None) in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED) \
        or "locked" in str(exc)


def _use_wal(conn: sqlite3.Connection) -> None:
    """Switch the file to WAL, waiting out other processes doing the same.

    Changing the journal mode needs an exclusive lock, and SQLite answers "database is locked" at once (its busy
    handler is not called for this lock) while another process opening the same new file holds one: three sweeps
    started together on a new --db failed that way. So the switch is retried with jittered backoff for up to
    :data:`BUSY_TIMEOUT_SECONDS`; a file already in WAL is left as it is (no lock needed).
    """
    deadline, delay = time.monotonic() + BUSY_TIMEOUT_SECONDS, 0.005
    while True:
        try:
            if conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if not _is_locked(exc) or time.monotonic() > deadline:
                raise
            time.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 0.25)


def store_error(exc: sqlite3.Error, where: str | Path) -> StoreError:
    """A one-line :class:`StoreError` naming the cause of a failed SQLite write and the way out.

    Every result committed before the failure is kept (each chunk is one transaction), so the way out is always
    to remove the cause and run the same command again.
    """
    code = getattr(exc, "sqlite_errorcode", None)
    again = "then run the same command again: every result committed so far is kept and is not measured again"
    if code == sqlite3.SQLITE_FULL or "full" in str(exc):
        return StoreError(f"cannot write to {where}: the disk is full ({exc}); free space on it (or give another "
                          f"--db), {again}")
    if _is_locked(exc):
        return StoreError(f"{where} stayed locked by another process for more than {BUSY_TIMEOUT_SECONDS} s "
                          f"({exc}); {again} when that process is done")
    if code == sqlite3.SQLITE_READONLY or "readonly" in str(exc):
        return StoreError(f"cannot write to {where}: it became read-only ({exc}); make it writable, {again}")
    if code == sqlite3.SQLITE_IOERR or "disk I/O" in str(exc):
        return StoreError(f"cannot write to {where}: disk I/O error ({exc}); check the disk, {again}")
    return StoreError(f"cannot write to {where}: {exc}; {again}")


Write = TypeVar("Write", bound=Callable)


def writes(function: Write) -> Write:
    """Decorate a store function whose first argument is the open DB: SQLite's operational errors (disk full,
    locked beyond the busy timeout, I/O error) become one-line :class:`StoreError` s (:func:`store_error`).

    The failed transaction is rolled back first by the function itself, and only while SQLite has not already
    rolled it back (``conn.in_transaction``), so "cannot rollback - no transaction is active" never hides the cause.
    """
    @functools.wraps(function)
    def wrapper(db, *args, **kwargs):
        try:
            return function(db, *args, **kwargs)
        except sqlite3.OperationalError as exc:
            raise store_error(exc, filename(db)) from exc

    return wrapper  # type: ignore[return-value]


def filename(db: Database) -> str:
    """The file of an open DB (as SQLite names it), for messages."""
    try:
        return next((row[2] for row in db.conn.execute("PRAGMA database_list") if row[1] == "main"), "") \
            or "the results database"
    except sqlite3.Error:
        return "the results database"


def as_db(path_or_db: str | Path | Database) -> Database:
    """An open DB as is, or an existing DB file opened for reading results (never created)."""
    return path_or_db if isinstance(path_or_db, sqlite_utils.Database) else open_db(path_or_db, create=False)


def _recognise(path: Path) -> int | None:
    """The schema version of an existing file, read without changing it; None for an empty file.

    Raises:
        StoreError: not a SQLite file, another application's database, or a version this sweep cannot read.
    """
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=BUSY_TIMEOUT_SECONDS)
    try:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        application_id = conn.execute("PRAGMA application_id").fetchone()[0]
        version = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() \
            if "meta" in tables else None
    finally:
        conn.close()
    if not tables and application_id in (0, schema.APPLICATION_ID):
        return None
    if application_id not in (0, schema.APPLICATION_ID) or version is None or "results" not in tables:
        raise StoreError(f"{path} is a SQLite database of another application (no sweep schema in it); "
                         "it was left untouched: give sweep its own file with --db")
    try:
        number = int(version[0])
    except (TypeError, ValueError):
        raise StoreError(f"{path} has an unreadable schema version {version[0]!r}; it was left untouched") from None
    if number > schema.SCHEMA_VERSION:
        raise StoreError(f"{path} has schema version {number}, newer than this sweep understands "
                         f"({schema.SCHEMA_VERSION}); upgrade sweep. The file was left untouched")
    return number


def _upgrade(db: Database, version: int | None) -> None:
    """Create the schema in a new file, or bring an older one to :data:`schema.SCHEMA_VERSION`, in one transaction.

    Idempotent and safe when several processes open the same new file at once: the first to take the write lock
    creates everything, the others find it done.
    """
    conn = db.conn
    if version == schema.SCHEMA_VERSION and _complete(db):
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        current = _stored_version(conn)
        for statement in schema.ddl():
            conn.execute(statement)
        _add_missing_columns(conn)
        if current is None:
            conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('schema_version', ?)",
                         [str(schema.SCHEMA_VERSION)])
            conn.execute("INSERT OR REPLACE INTO schema_migrations (version, description, applied_at) VALUES (?, ?, ?)",
                         [schema.SCHEMA_VERSION, f"created at schema version {schema.SCHEMA_VERSION}", now()])
        elif current < schema.SCHEMA_VERSION:
            _migrate(conn, current)
        conn.execute(f"PRAGMA application_id = {schema.APPLICATION_ID}")
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def _complete(db: Database) -> bool:
    names = set(db.table_names()) | set(db.view_names())
    return all(t.name in names for t in schema.TABLES) and all(v.name in names for v in schema.VIEWS)


def _stored_version(conn: sqlite3.Connection) -> int | None:
    row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() \
        if conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'meta'").fetchone() else None
    return int(row[0]) if row else None


def _add_missing_columns(conn: sqlite3.Connection) -> None:
    """Columns a newer schema added to an existing table (``ALTER TABLE ADD COLUMN``, NULL in old rows)."""
    for table in schema.TABLES:
        present = {r[1] for r in conn.execute(f'PRAGMA table_info("{table.name}")')}
        for column in table.columns:
            if column.name not in present:
                conn.execute(f'ALTER TABLE "{table.name}" ADD COLUMN "{column.name}" {schema.SQL_TYPES[column.type]}')


def _migrate(conn: sqlite3.Connection, current: int) -> None:
    """Record each upgrade from ``current`` to the current version; views are recreated from their new SQL."""
    for view in schema.VIEWS:
        conn.execute(f'DROP VIEW IF EXISTS "{view.name}"')
        conn.execute(schema.create_view_sql(view))
    for version in range(current + 1, schema.SCHEMA_VERSION + 1):
        conn.execute("INSERT OR REPLACE INTO schema_migrations (version, description, applied_at) VALUES (?, ?, ?)",
                     [version, schema.MIGRATIONS[version], now()])
    conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", [str(schema.SCHEMA_VERSION)])


def schema_version(db: Database) -> int | None:
    """The schema version stored in an open database."""
    return _stored_version(db.conn)


def integrity_ok(db: Database) -> bool:
    """``PRAGMA integrity_check`` says ok."""
    return db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


# ---------------------------------------------------------------------------------------------- where it lives

NETWORK_FILESYSTEMS = ("nfs", "nfs4", "cifs", "smb3", "smbfs", "fuse.sshfs", "sshfs", "9p", "lustre", "gpfs",
                       "ceph", "fuse.glusterfs", "glusterfs", "afs", "beegfs", "fuse.s3fs", "fuse.gcsfuse")
"""Filesystems whose POSIX locks SQLite cannot rely on (https://www.sqlite.org/wal.html#noshm): WAL breaks there."""


def check_writable(path: str | Path) -> None:
    """Fail early, before any model is loaded, if results cannot be written to ``path``. Reads, never writes.

    Raises:
        StoreError: the file or its directory is not writable, the path is a directory, or an existing file is not
            a sweep database of a version this sweep can write (:func:`_recognise`).
    """
    path = Path(path)
    if path.is_dir():
        raise StoreError(f"--db {path} is a directory; give a file path such as {path / 'results.db'}")
    if path.exists():
        if not os.access(path, os.W_OK):
            raise StoreError(f"--db {path} is not writable")
        check_local_and_writable(path)
        try:
            _recognise(path)  # another application's file, or a newer sweep's: refused before a model loads
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"{path} is not a usable SQLite database ({exc})") from None
        return
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise StoreError(f"--db {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise StoreError(f"--db {path}: directory {parent} is not writable")
    check_local_and_writable(path)


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
