"""Calibration signals (angular distance, Block Influence), the greedy path, the search's candidates, and which
strategy chose what.

Rows are stored under a *calibration key* (model_id, weights, calib_fingerprint): the model row, its weights
fingerprint (as in setups) and the hash of the calibration tokens and window settings.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from sweep.store.db import Database, as_db, now, writes
from sweep.store.results import select

CALIB_KEY = ("model_id", "weights", "calib_fingerprint")


def _key_values(key: dict[str, Any]) -> list[Any]:
    return [key[name] for name in CALIB_KEY]


def _finite_or_none(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


@writes
def _insert(db: Database, table: str, rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    names = list(rows[0])
    sql = f"INSERT OR REPLACE INTO {table} ({', '.join(names)}) VALUES ({', '.join('?' * len(names))})"
    with db.conn:
        db.conn.executemany(sql, [[row[n] for n in names] for row in rows])


def record_layer_similarity(db: Database, key: dict[str, Any], calib: str, rows: Iterable[dict[str, Any]]) -> None:
    """Store one calibration pass's signals (rows with metric, start, size, value, n_sequences, n_tokens)."""
    stamp = now()
    _insert(db, "layer_similarity", [{**{n: key[n] for n in CALIB_KEY}, "calib": calib, "metric": r["metric"],
                                      "start": r["start"], "size": r["size"], "value": _finite_or_none(r["value"]),
                                      "n_sequences": r["n_sequences"], "n_tokens": r["n_tokens"],
                                      "computed_at": stamp} for r in rows])


def read_layer_similarity(db: Database, key: dict[str, Any]) -> list[dict[str, Any]]:
    """The stored signals of one calibration key (empty when not computed)."""
    return select(db, "layer_similarity", "SELECT * FROM layer_similarity WHERE model_id = ? AND weights = ? "
                  "AND calib_fingerprint = ? ORDER BY metric, size, start", _key_values(key))


def similarity_overview(path_or_db: str | Path | Database, model: str | None = None) -> list[dict[str, Any]]:
    """Every stored signal row with its model name (for reports), newest calibration pass first."""
    db = as_db(path_or_db)
    where, params = ("WHERE m.name = ?", [model]) if model is not None else ("", [])
    return select(db, "layer_similarity",
                  "SELECT m.name AS model, m.n_layers AS model_layers, ls.* FROM layer_similarity ls "
                  f"JOIN models m ON m.id = ls.model_id {where} "
                  "ORDER BY ls.computed_at DESC, m.name, ls.metric, ls.size, ls.start", params)


def record_greedy_step(db: Database, key: dict[str, Any], step: int, layer: int, removed: str,
                       calib_ppl: float) -> None:
    """Store one round of the greedy search at once (an interrupted search resumes from the last round)."""
    _insert(db, "greedy_steps", [{**{n: key[n] for n in CALIB_KEY}, "step": step, "layer": layer,
                                  "removed": removed, "calib_ppl": _finite_or_none(calib_ppl), "computed_at": now()}])


def read_greedy_steps(db: Database, key: dict[str, Any]) -> list[dict[str, Any]]:
    """The stored greedy path of a calibration key, by step."""
    return select(db, "greedy_steps", "SELECT * FROM greedy_steps WHERE model_id = ? AND weights = ? "
                  "AND calib_fingerprint = ? ORDER BY step", _key_values(key))


def record_strategy_choices(db: Database, key: dict[str, Any], choices: Iterable[dict[str, Any]]) -> None:
    """Which variant each signal strategy chose for each n (rows with strategy, signal, n, removed, score)."""
    stamp = now()
    _insert(db, "strategy_choices", [{**{n: key[n] for n in CALIB_KEY}, "strategy": c["strategy"],
                                      "signal": c["signal"], "n": c["n"], "removed": c["removed"],
                                      "score": _finite_or_none(c["score"]), "chosen_at": stamp} for c in choices])


def read_strategy_choices(path_or_db: str | Path | Database, setup: str) -> list[dict[str, Any]]:
    """The newest choice per (strategy, n) for the model and weights of ``setup``."""
    db = as_db(path_or_db)
    rows = select(db, "strategy_choices",
                  "SELECT c.* FROM strategy_choices c JOIN setups s ON s.model_id = c.model_id "
                  "AND s.weights = c.weights WHERE s.id = ? ORDER BY c.chosen_at DESC, c.strategy, c.n", [setup])
    newest: dict[tuple[str, int], dict[str, Any]] = {}
    for row in rows:
        newest.setdefault((row["strategy"], row["n"]), row)
    return sorted(newest.values(), key=lambda r: (r["strategy"], r["n"]))


def record_search_candidate(db: Database, key: dict[str, Any], search: str, candidate: dict[str, Any]) -> None:
    """Store (or update) one candidate of a search as soon as it is measured further (removed, n_units, generation,
    status, n_windows, fitness, spent, window_values: a float64 numpy array)."""
    values = candidate["window_values"]
    _insert(db, "search_candidates", [{**{n: key[n] for n in CALIB_KEY}, "search": search,
                                       **{k: v for k, v in candidate.items() if k != "window_values"},
                                       "fitness": _finite_or_none(candidate["fitness"]),
                                       "window_values": np.asarray(values, dtype="<f8").tobytes(), "scored_at": now()}])


def read_search_candidates(db: Database, key: dict[str, Any], search: str | None = None) -> list[dict[str, Any]]:
    """The stored candidates of one search (every search of the key when ``search`` is None), in the order they were
    measured; ``window_values`` as a float64 numpy array."""
    where, params = ("AND search = ?", [search]) if search is not None else ("", [])
    rows = select(db, "search_candidates", "SELECT * FROM search_candidates WHERE model_id = ? AND weights = ? "
                  f"AND calib_fingerprint = ? {where} ORDER BY spent, removed", [*_key_values(key), *params])
    for row in rows:
        row["window_values"] = np.frombuffer(row["window_values"] or b"", dtype="<f8").copy()
    return rows


def search_overview(path_or_db: str | Path | Database, model: str | None = None) -> list[dict[str, Any]]:
    """Every stored search candidate with its model name (the report's trajectory), without the per-window values."""
    db = as_db(path_or_db)
    where, params = ("WHERE m.name = ?", [model]) if model is not None else ("", [])
    columns = ", ".join(f"sc.{c}" for c in ("model_id", "weights", "calib_fingerprint", "search", "removed",
                                            "n_units", "generation", "status", "n_windows", "fitness", "spent"))
    return select(db, "search_candidates", f"SELECT m.name AS model, {columns} FROM search_candidates sc "
                  f"JOIN models m ON m.id = sc.model_id {where} ORDER BY sc.search, sc.spent, sc.removed", params)
