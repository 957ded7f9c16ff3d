"""The rankings shared by the report and `sweep tasks`: newest setup, best per size, Pareto front."""
from __future__ import annotations

import math
import random

from sweep.ranking import best_per_size, is_measured, newest_setup, pareto_front


def rows_of(spec: dict[str, tuple[int, int, float]], status: str = "ok") -> list[dict]:
    return [{"removed": k, "n_removed": n, "params": p, "ppl": ppl, "status": status}
            for k, (n, p, ppl) in spec.items()]


def test_best_per_size_keeps_the_lowest_perplexities_of_each_size():
    rows = rows_of({"": (0, 10, 5.0), "0": (1, 8, 9.0), "1": (1, 8, 7.0), "2": (1, 8, 8.0),
                    "0,1": (2, 6, 30.0), "1,2": (2, 6, 20.0), "0,2": (2, 6, float("nan"))})
    assert best_per_size(rows, 1) == ["1", "1,2"]
    assert best_per_size(rows, 2) == ["1", "2", "1,2", "0,1"]


def test_pareto_front_equals_brute_force_dominance():
    rng = random.Random(0)
    rows = rows_of({str(i): (0, rng.randint(1, 8), rng.choice([1.0, 2.0, 3.0, 4.0, 5.0])) for i in range(40)})

    def dominated(r):
        return any(o["params"] <= r["params"] and o["ppl"] <= r["ppl"] and
                   (o["params"] < r["params"] or o["ppl"] < r["ppl"]) for o in rows)

    front = [rows[i] for i in pareto_front(rows, "params")]
    undominated = {(r["params"], r["ppl"]) for r in rows if not dominated(r)}
    assert {(r["params"], r["ppl"]) for r in front} == undominated
    assert len(front) == len(undominated)  # one variant per front point
    assert [r["params"] for r in front] == sorted(r["params"] for r in front)  # cheapest first


def test_pareto_front_ignores_unmeasured_rows_and_missing_costs():
    rows = rows_of({"": (0, 10, 5.0), "1": (1, 8, 4.0)}) + [
        {"removed": "2", "n_removed": 1, "params": 1, "ppl": 1.0, "status": "failed"},
        {"removed": "3", "n_removed": 1, "params": None, "ppl": 1.0, "status": "ok"},
        {"removed": "0", "n_removed": 1, "params": 2, "ppl": math.inf, "status": "ok"},
    ]
    assert [rows[i]["removed"] for i in pareto_front(rows, "params")] == ["1"]
    assert not is_measured(rows[4])


def test_newest_setup_prefers_setups_with_results_then_the_last_measured():
    setups = [
        {"model": "m", "setup": "a", "created_at": "2026-01-01T10:00:00", "n_results": 5, "last_measured_at": "x1"},
        {"model": "m", "setup": "b", "created_at": "2026-01-01T10:05:00", "n_results": 0, "last_measured_at": None},
        {"model": "m", "setup": "c", "created_at": "2026-01-01T10:00:00", "n_results": 2, "last_measured_at": "x2"},
        {"model": "other", "setup": "d", "created_at": "2026-02-01T00:00:00", "n_results": 9, "last_measured_at": "z"},
    ]
    assert newest_setup(setups, "m")["setup"] == "c"  # a and c created together; c measured last; b has no rows
    assert newest_setup([setups[1]], "m")["setup"] == "b"  # no setup has results: the newest created
    assert newest_setup(setups, "nobody") is None
