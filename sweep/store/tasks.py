"""Downstream task accuracy (`sweep tasks`) and LoRA-healed variants (`sweep heal`)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from sweep.errors import StoreError
from sweep.store.db import Database, as_db, now, writes
from sweep.store.results import hashed_id, rows_of, select
from sweep.store.schema import HEAL_COLUMNS, TASK_RESULT_COLUMNS


def _check_columns(row: dict[str, Any], columns: dict[str, type], what: str) -> None:
    unknown = set(row) - set(columns)
    if unknown:
        raise StoreError(f"unknown {what} columns: {sorted(unknown)}")


@writes
def upsert_task_setup(db: Database, model_id: int, fields: dict[str, Any]) -> str:
    """Record the settings of one task evaluation (task, few-shot, limit, lm-eval version, weights); return its id."""
    sid = hashed_id({"model_id": model_id, "kind": "task", **fields})
    with db.conn:
        db["task_setups"].insert({"id": sid, "model_id": model_id, **fields, "created_at": now()}, ignore=True)
    return sid


def done_task_keys(db: Database, task_setup: str, heal_id: str = "") -> set[str]:
    """Variant keys with a finished task result (``ok``) for ``task_setup``; failed rows are retried."""
    rows = db.execute("SELECT removed FROM task_results WHERE setup_id = ? AND heal_id = ? AND status = 'ok'",
                      [task_setup, heal_id])
    return {r[0] for r in rows}


@writes
def record_task_result(db: Database, row: dict[str, Any]) -> None:
    """Write one (task, variant) result and commit at once.

    Raises:
        StoreError: a column that is not a task result column.
    """
    _check_columns(row, TASK_RESULT_COLUMNS, "task result")
    row = {"heal_id": "", **row, "measured_at": row.get("measured_at") or now()}
    with db.conn:
        db["task_results"].upsert(row, pk=("setup_id", "removed", "heal_id"))


def heal_id(setup: str, removed: str, settings: dict[str, Any]) -> str:
    """Stable id of a heal: the unhealed variant plus every training setting."""
    return hashed_id({"setup": setup, "removed": removed, **settings})


@writes
def record_heal(db: Database, row: dict[str, Any]) -> None:
    """Write (or update) a healed variant's row and commit at once. NaN losses are stored as NULL.

    Raises:
        StoreError: a column that is not a heal column.
    """
    _check_columns(row, HEAL_COLUMNS, "heal")
    row = {**row, "measured_at": row.get("measured_at") or now()}
    row = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}
    with db.conn:
        db["heals"].upsert(row, pk="id")


def find_heal(db: Database, hid: str) -> dict[str, Any] | None:
    """The heal row with id ``hid``, or None."""
    rows = rows_of(db.execute("SELECT * FROM heals WHERE id = ?", [hid]))
    return rows[0] if rows else None


def read_task_results(path_or_db: str | Path | Database, model: str | None = None) -> list[dict[str, Any]]:
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
    return select(db, "task_results",
                  sql + " ORDER BY m.name, s.created_at, s.rowid, t.n_removed, t.removed, t.heal_id", params)


def read_heals(path_or_db: str | Path | Database, model: str | None = None) -> list[dict[str, Any]]:
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
    return select(db, "heals", sql + " ORDER BY m.name, h.n_removed, h.removed, h.measured_at", params)
