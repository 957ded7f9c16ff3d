"""The numbers behind figures and findings, checked against brute-force references written here."""
from __future__ import annotations

import math

import pandas as pd
import pytest
from results_fixture import BASE_PPL, DIVERGED, FACTORS, FAILED, MODEL, N_LAYERS, fixture_ppl, make_results_db

import sweep
from sweep.report import analysis
from sweep.plan import parse_key


@pytest.fixture(scope="module")
def frame(tmp_path_factory) -> pd.DataFrame:
    return sweep.load_results(make_results_db(tmp_path_factory.mktemp("db") / "results.db"), model=MODEL)


def _change(removed: tuple[int, ...]) -> float:
    return 100 * (fixture_ppl(removed) / BASE_PPL - 1)


def test_single_changes_are_in_layer_order_and_match_the_fixture(frame):
    changes = analysis.single_changes(frame)
    assert list(changes.index) == list(range(N_LAYERS))
    for layer, change in changes.items():
        assert change == pytest.approx(100 * (FACTORS[layer] - 1))


def test_pair_interaction_is_joint_change_minus_both_single_changes(frame):
    pairs = analysis.pair_interactions(frame)
    measured = {(i, j) for i in range(N_LAYERS) for j in range(i + 1, N_LAYERS)} - {parse_key(DIVERGED),
                                                                                       parse_key(FAILED)}
    assert set(zip(pairs["i"], pairs["j"])) == measured
    for i, j, interaction in zip(pairs["i"], pairs["j"], pairs["interaction"]):
        assert interaction == pytest.approx(_change((i, j)) - _change((i,)) - _change((j,)))


def test_per_n_stats_match_a_reference_and_count_exclusions(frame):
    stats = analysis.per_n_stats(frame).set_index("n_removed")
    for n in range(4):
        ppl = frame[(frame.n_removed == n) & (frame.status == "ok")].ppl
        assert stats.loc[n, "best"] == pytest.approx(ppl.min())
        assert stats.loc[n, "worst"] == pytest.approx(ppl.max())
        assert stats.loc[n, "median"] == pytest.approx(ppl.median())
    assert stats.loc[2, "excluded"] == 2 and stats.loc[1, "excluded"] == 0
    assert analysis.excluded_counts(frame) == {"diverged": 1, "failed": 1}


@pytest.mark.parametrize("cost", ["speed_ms", "params"])
def test_pareto_front_equals_brute_force_non_dominated_set(frame, cost):
    ok = frame[(frame.status == "ok") & frame.ppl.map(math.isfinite)]
    points = list(zip(ok["removed"], ok[cost], ok["ppl"]))

    def dominated(a):
        return any(c <= a[1] and p <= a[2] and (c < a[1] or p < a[2]) for _, c, p in points)

    expected = {key for key, c, p in points if not dominated((key, c, p))}
    front = analysis.pareto_front(frame, cost)
    assert set(front["removed"]) == expected
    assert list(front[cost]) == sorted(front[cost]) and list(front["ppl"]) == sorted(front["ppl"], reverse=True)


def test_pareto_front_keeps_one_of_exact_ties():
    rows = pd.DataFrame({"removed": ["", "0", "1"], "n_removed": [0, 1, 1], "status": ["ok"] * 3,
                         "ppl": [10.0, 12.0, 12.0], "speed_ms": [2.0, 1.0, 1.0]})
    assert list(analysis.pareto_front(rows, "speed_ms")["removed"]) == ["0", ""]


def test_no_baseline_means_no_changes():
    rows = pd.DataFrame({"removed": ["0", "0,1"], "n_removed": [1, 2], "status": ["ok", "ok"], "ppl": [3.0, 4.0]})
    assert analysis.single_changes(rows).empty and analysis.pair_interactions(rows).empty


@pytest.mark.parametrize(("changes", "critical"), [
    ({0: 2900.0, 1: 20.0, 2: 25.0, 3: 150.0, 4: 18.0}, [0, 3]),  # median 20: threshold 100
    ({0: 3.0, 1: -1.0, 2: 0.0, 3: -2.0}, [0]),  # nothing stands out: the most harmful layer alone
    ({0: 12.0, 1: -1.0, 2: -0.5, 3: 11.0, 4: -2.0}, [0, 3]),  # median < 0: the 10 % floor decides
])
def test_critical_layers_stand_out_from_the_median(changes, critical):
    rows = [{"removed": "", "n_removed": 0, "status": "ok", "ppl": 10.0}]
    rows += [{"removed": str(i), "n_removed": 1, "status": "ok", "ppl": 10.0 * (1 + c / 100)} for i, c in changes.items()]
    assert analysis.critical_layers(pd.DataFrame(rows)) == critical
