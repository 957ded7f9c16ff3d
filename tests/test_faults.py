"""Fault injection (bounded CI version of `make reliability`): kills, Ctrl-C, worker deaths, OOM, NaN, races, bad files.

Each scenario runs real ``python -m sweep run`` processes on a 6-layer tiny model (64 variants) and audits the DB:
nothing lost, no duplicate row, no completed variant measured twice, no run left ``running``, integrity ok.
"""
from __future__ import annotations

import sqlite3
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import reliability


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("faults")
    reliability.make_fixture(out)
    return out


def statuses(db: Path) -> dict[str, str]:
    return dict(sqlite3.connect(db).execute("SELECT removed, status FROM results"))


def assert_clean(figures: reliability.Figures) -> None:
    assert (figures.lost, figures.duplicates, figures.remeasured, figures.running) == (0, 0, 0, 0), figures
    assert figures.integrity == "ok", figures


def test_kill_9_of_the_coordinator_loses_nothing_and_measures_nothing_twice(work):
    figures = reliability.coordinator_kills(work, kills=3, seed=1)
    assert_clean(figures)
    assert figures.kills >= 1 and figures.variants == reliability.N_VARIANTS
    assert set(statuses(work / "kills-w1.db").values()) == {"ok"}


def test_sigint_mid_sweep_then_resume(work):
    figures = reliability.sigint_midway(work)
    assert_clean(figures)
    assert figures.variants == reliability.N_VARIANTS
    assert "resume exit 0" in figures.notes


def test_killed_worker_and_sticky_error_are_requeued_once_and_the_others_continue(work):
    figures = reliability.worker_faults(work)
    assert_clean(figures)
    assert "exit 0" in figures.notes
    assert set(statuses(work / "worker-faults.db").values()) == {"ok"} and figures.variants == reliability.N_VARIANTS


def test_injected_oom_and_nan_are_rows_with_a_status(work):
    assert_clean(reliability.oom_and_nan(work))
    conn = sqlite3.connect(work / "oom-nan.db")
    rows = {k: (s, e) for k, s, e in conn.execute("SELECT removed, status, error FROM results")}
    assert rows["0,1"][0] == "failed" and "out of memory at batch size 4" in rows["0,1"][1]  # after the retry
    assert rows["2"] == ("ok", None)  # the half-batch retry succeeded
    assert rows["3"][0] == "diverged" and "nan" in rows["3"][1]
    assert len(rows) == reliability.N_VARIANTS


def test_two_sweeps_started_at_once_never_measure_a_variant_twice(work):
    figures = reliability.concurrent_sweeps(work)
    assert_clean(figures)
    assert figures.variants == reliability.N_VARIANTS


def test_every_bad_db_file_gets_a_one_line_error(work):
    cases = reliability.bad_files(work)
    assert len(cases) == 6
    for name, code, message in cases:
        assert code == 2 and message.startswith("sweep: error:"), (name, message)
