"""What earlier evaluations of a shape took on this host: the measurements `sweep plan` calibrates its estimate on.

Nothing new is stored for this: the rows of one chunk (one sub-trie, or one variant with ``--engine per-variant``)
are committed together with the same ``measured_at`` and the same ``eval_seconds`` (the chunk's time divided by its
variants), so a chunk is recovered from ``results`` as the rows sharing both.
"""
from __future__ import annotations

from dataclasses import dataclass

from sweep.store.db import Database


@dataclass(frozen=True)
class MeasuredChunk:
    """Variants evaluated together in one earlier run, and how long that took."""

    n_tokens: int
    """Tokens evaluated (the setup's ``--max-tokens`` prefix of its text)."""
    keys: tuple[str, ...]
    """Variant keys of the chunk."""
    seconds: float
    """Evaluation time of the whole chunk."""


def measured_chunks(db: Database, model_id: int, max_length: int, stride: int, device: str, host: str,
                    limit: int = 5000) -> list[MeasuredChunk]:
    """The chunks of every setup of ``model_id`` with this window and device that ``host`` measured (``ok`` rows,
    newest ``limit`` rows), oldest first."""
    rows = db.execute(
        "SELECT r.setup_id, MIN(s.data_tokens, COALESCE(s.max_tokens, s.data_tokens)), r.measured_at, "
        "r.eval_seconds, r.removed FROM results r JOIN setups s ON s.id = r.setup_id "
        "WHERE s.model_id = ? AND s.max_length = ? AND s.stride = ? AND s.device = ? AND r.host = ? "
        "AND r.status = 'ok' AND r.eval_seconds > 0 ORDER BY r.measured_at DESC LIMIT ?",
        [model_id, max_length, stride, device, host, limit]).fetchall()
    chunks: dict[tuple, list[str]] = {}
    for setup_id, n_tokens, measured_at, seconds, removed in reversed(rows):
        chunks.setdefault((setup_id, n_tokens, measured_at, seconds), []).append(removed)
    return [MeasuredChunk(n_tokens, tuple(keys), seconds * len(keys))
            for (_, n_tokens, _, seconds), keys in chunks.items()]


def latency_rounds(db: Database, model_id: int, device: str, host: str, latency_settings: str) -> int | None:
    """Timed rounds the latency phase of the newest setup of ``model_id`` with these latency settings took on
    ``host`` (the most repeats of its signatures), or None when none was timed."""
    row = db.execute(
        "SELECT MAX(r.prefill_repeats) FROM results r JOIN setups s ON s.id = r.setup_id "
        "WHERE s.model_id = ? AND s.device = ? AND s.latency_settings = ? AND r.host = ? "
        "AND r.prefill_repeats IS NOT NULL GROUP BY s.id ORDER BY MAX(s.created_at) DESC LIMIT 1",
        [model_id, device, latency_settings, host]).fetchone()
    return row[0] if row else None
