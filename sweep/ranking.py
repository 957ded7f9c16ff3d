"""Choosing among measured results, defined once for the report, `sweep tasks` and `sweep report --format`:
which setup of a model is "the newest", which variants are best per number of removed layers, and which lie on a
Pareto front. Pure Python over plain rows (dicts of the ``results_vs_baseline`` view or ``setups_overview``).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

Row = Mapping[str, Any]
"""A row of the view or of an overview, by column name (the report reads rows as these too)."""


def is_measured(row: Row) -> bool:
    """``status == "ok"`` with a finite perplexity: the rows every ranking considers."""
    ppl = row.get("ppl")
    return row.get("status") == "ok" and isinstance(ppl, (int, float)) and math.isfinite(ppl)


def newest_setup(setups: Sequence[Row], model: str | None = None) -> Row | None:
    """The setup a model is reported for by default (rows of ``store.setups_overview``).

    The most recently created setup that has results; ties (created in the same second) go to the one measured
    last, then to the larger id. A setup without results (a run stopped before its first commit) is chosen only
    when no setup of the model has any.

    Example: A (created 10:00, 5 results), B (10:05, 0 results) -> A; A and C (both 10:00, C measured later) -> C.
    """
    candidates = [s for s in setups if model is None or s["model"] == model]
    if not candidates:
        return None
    with_results = [s for s in candidates if s.get("n_results")] or candidates
    return max(with_results, key=lambda s: (s.get("created_at") or "", s.get("last_measured_at") or "", s["setup"]))


def pareto_front(rows: Sequence[Row], cost: str) -> list[int]:
    """Positions in ``rows`` of the measured variants that no other beats on both perplexity and ``cost``.

    Sort by (cost, ppl, removed) and keep each row whose perplexity is strictly below every cheaper one's: a row
    is dominated exactly when a row at most as costly has a perplexity at most as high, and among equal rows the
    first is kept. Rows without a finite ``cost`` are left out.

    Example with (cost, ppl) = A (10, 25), B (7, 30), C (7, 45), D (5, 90), E (5, 200): the front is D, B, A
    (C is beaten by B, E by D).

    Returns:
        Positions from the cheapest to the costliest (perplexity falls along the front).
    """
    def finite_cost(row: Row) -> bool:
        value = row.get(cost)
        return isinstance(value, (int, float)) and math.isfinite(value)

    candidates = [i for i, row in enumerate(rows) if is_measured(row) and finite_cost(row)]
    ordered = sorted(candidates, key=lambda i: (rows[i][cost], rows[i]["ppl"], rows[i]["removed"]))
    front, best_ppl = [], math.inf
    for i in ordered:
        if rows[i]["ppl"] < best_ppl:
            front.append(i)
            best_ppl = rows[i]["ppl"]
    return front


def best_per_size(rows: Sequence[Row], k: int) -> list[str]:
    """Keys of the ``k`` lowest-perplexity measured variants for each number of removed layers (baseline excluded).

    Example: rows (removed, n_removed, ppl) = ("0",1,9), ("1",1,7), ("2",1,8), ("0,1",2,30), ("1,2",2,20)
    and k=1 give ["1", "1,2"].
    """
    by_size: dict[int, list[Row]] = {}
    for row in rows:
        if is_measured(row) and row["n_removed"] > 0:
            by_size.setdefault(row["n_removed"], []).append(row)
    return [r["removed"] for size in sorted(by_size)
            for r in sorted(by_size[size], key=lambda r: (r["ppl"], r["removed"]))[:k]]
