"""Racing (--race): the same best-k per number of removed layers as the full exhaustive sweep, with survivors'
numbers bit for bit those of the full sweep, at a fraction of the layer and head calls; resumable."""
from __future__ import annotations

import sqlite3

import numpy as np
import pytest

from sweep import ranking, store
from sweep.config import SweepConfig, race_fractions
from sweep.engine import race
from sweep.engine.runner import run_sweep
from sweep.errors import ConfigError
from sweep.intervals import change_intervals, race_eliminated
from sweep.report import load_contexts

K = 3


def test_boundaries_round_fractions_up_to_the_floor_and_to_whole_batches():
    assert race.race_boundaries(128, [1 / 16, 1 / 8, 1 / 4, 1 / 2], 8) == [16, 32, 64, 128]
    assert race.race_boundaries(128, [1 / 16, 1 / 8, 1 / 4, 1 / 2], 12) == [24, 36, 72, 128]
    assert race.race_boundaries(20, [0.5], 12) == [20]  # the floor of 16 rounds up to 24, past the end: one slice
    assert race_fractions("1/16, 0.25,1/8") == [1 / 16, 1 / 8, 0.25]


@pytest.mark.parametrize("values,flag", [({"race_slices": "1/0"}, "--race-slices"), ({"race_slices": "2"}, "--race-slices"),
                                         ({"race_slices": " , "}, "--race-slices"),
                                         ({"race_k": 0}, "--race-k"), ({"race": True, "strategy": "single"}, "--race"),
                                         ({"race": True, "strategy": "exhaustive", "workers": 2}, "--race")])
def test_bad_race_settings_name_the_flag(values, flag):
    with pytest.raises(ConfigError, match=flag):
        SweepConfig(**values)


def test_a_text_without_windows_after_the_first_slice_cannot_race_and_says_why():
    slices = [1 / 16, 1 / 8, 1 / 4, 1 / 2]
    assert race.no_race_line(128, slices, 8, 256) is None and race.no_race_line(17, slices, 1, 256) is None
    line = race.no_race_line(16, slices, 8, 256)
    assert "the text has 16 windows and the first slice needs 16 with more after it" in line
    assert "all 256 variants on the whole text" in line
    assert "needs 24" in race.no_race_line(20, slices, 12, 5)  # the floor of 16 in whole batches of 12


def test_race_on_a_short_text_measures_every_variant_and_says_so_first(tiny_gpt2_dir, sample_text_file, tmp_path):
    lines = []
    db = tmp_path / "short.db"
    run_sweep(config(tiny_gpt2_dir, sample_text_file, db, tmp_path, max_tokens=512, race=True), log=lines.append,
              progress=False)
    said = [i for i, line in enumerate(lines) if line.startswith("race:")]
    assert len(said) == 1 and "the text has 16 windows and the first slice needs 16" in lines[said[0]]
    assert "all 16 variants on the whole text" in lines[said[0]]
    assert said[0] < next(i for i, line in enumerate(lines) if line.startswith("done:"))
    rows = view(db)
    assert len(rows) == 16 and all(r["status"] == "ok" and r["n_windows"] == 16 for r in rows.values())


def test_elimination_drops_only_variants_each_leader_really_beats():
    rng = np.random.default_rng(0)
    tokens = np.full(40, 50.0)
    base = 150.0 * rng.lognormal(0, 0.2, size=40)
    nll = {"a": base, "b": base * 1.002 * rng.lognormal(0, 0.003, 40), "c": base * 1.001 * rng.lognormal(0, 0.003, 40),
           "d": base * 1.003 * rng.lognormal(0, 0.003, 40), "far": base * 1.2, "tie": base * rng.lognormal(0, 0.02, 40)}
    groups = [["a", "b", "c", "d", "far", "tie"], ["a"]]
    dropped = race_eliminated(groups, nll, tokens, keep=2, level=0.99)
    # the rule, restated: outside the 2 lowest, a variant goes iff its 99 % interval is above 0 against both
    ranked = sorted(groups[0], key=lambda k: (nll[k].sum(), k))
    leaders = ranked[:2]
    want = {k for k in ranked[2:] if all(change_intervals(nll[k][None], tokens, nll[j], level=0.99)[0].low > 0
                                         for j in leaders)}
    assert dropped == want and "far" in dropped and "tie" not in dropped
    assert race_eliminated([["a", "far"]], nll, tokens, keep=2, level=0.99) == set()  # no more than k: all stay


@pytest.fixture(scope="module")
def eight_layer_dir(tmp_path_factory, byte_tokenizer_dir):
    from transformers import AutoTokenizer

    from tiny import tiny_model

    out = tmp_path_factory.mktemp("tiny-gpt2-8")
    tiny_model("gpt2", n_layers=8, vocab=256, seed=3).save_pretrained(out)
    AutoTokenizer.from_pretrained(byte_tokenizer_dir).save_pretrained(out)
    return out


def config(model_dir, data, db, tmp, **overrides) -> SweepConfig:
    values = dict(model=str(model_dir), data=str(data), db=str(db), cache_dir=str(tmp / "cache"), max_length=32,
                  max_tokens=4096, batch_size=8, latency="off", strategy="exhaustive", device="cpu", race_k=K)
    return SweepConfig(**{**values, **overrides})


def view(db) -> dict[str, dict]:
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    return {r["removed"]: dict(r) for r in conn.execute("SELECT * FROM results_vs_baseline")}


@pytest.fixture(scope="module")
def full_and_raced(eight_layer_dir, sample_text_file, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("race")
    quiet = dict(log=lambda s: None, progress=False)
    full = run_sweep(config(eight_layer_dir, sample_text_file, tmp / "full.db", tmp), **quiet)
    raced = run_sweep(config(eight_layer_dir, sample_text_file, tmp / "race.db", tmp, race=True), **quiet)
    return tmp, full, raced


@pytest.mark.slow
def test_race_finds_the_full_sweeps_best_k_per_size_with_its_exact_numbers(full_and_raced):
    tmp, full, raced = full_and_raced
    assert full.setup == raced.setup and not raced.interrupted
    whole, racing = view(tmp / "full.db"), view(tmp / "race.db")
    assert whole.keys() == racing.keys() and len(whole) == 256  # every variant ends in the DB
    assert ranking.best_per_size(list(racing.values()), K) == ranking.best_per_size(list(whole.values()), K)
    survivors = [r for r in racing.values() if r["status"] == "ok"]
    eliminated = [r for r in racing.values() if r["status"] == "eliminated"]
    assert survivors and eliminated and len(survivors) + len(eliminated) == 256
    n_windows = whole[""]["n_windows"]
    for row in survivors:  # bit for bit: a slice's batches are the full sweep's batches
        assert (row["ppl"], row["nll_sum"], row["n_tokens"]) == (whole[row["removed"]]["ppl"],
                                                                 whole[row["removed"]]["nll_sum"], n_windows * 31)
        assert row["n_windows"] == n_windows
    for row in eliminated:
        assert row["n_windows"] < n_windows and "eliminated by the race" in row["error"]
        # partial numbers are not compared with the full text's baseline: no change, no interval
        assert row["ppl_change_pct"] is None and row["ppl_change_low_pct"] is None
        assert row["ppl"] is not None and row["nll_sum"] is not None


@pytest.mark.slow
def test_race_costs_a_fraction_of_the_layer_and_head_calls(full_and_raced):
    _, full, raced = full_and_raced
    assert 0 < raced.head_calls < full.head_calls and 0 < raced.layer_calls < full.layer_calls
    print(f"race / full: layer calls {raced.layer_calls / full.layer_calls:.2f}, "
          f"head calls {raced.head_calls / full.head_calls:.2f}")


@pytest.mark.slow
def test_reports_leave_eliminated_variants_out_of_rankings(full_and_raced):
    tmp, _, _ = full_and_raced
    ctx = load_contexts(tmp / "race.db")[0]
    assert all(r["status"] == "ok" for r in ctx.rows) and ctx.eliminated > 0
    assert f"{ctx.eliminated:,} variants were eliminated by a race" in load_contexts_text(tmp / "race.db")


def load_contexts_text(db) -> str:
    from sweep.report import render

    return render(load_contexts(db)[0])


@pytest.mark.slow
def test_a_stopped_race_resumes_from_its_stored_windows_to_the_same_result(full_and_raced, eight_layer_dir,
                                                                            sample_text_file, monkeypatch):
    tmp, _, raced = full_and_raced
    cfg = config(eight_layer_dir, sample_text_file, tmp / "resumed.db", tmp, race=True)
    original = race.Racer.eliminate
    calls = []

    def stop_after_second_slice(self, bound, n_windows):
        dropped = original(self, bound, n_windows)
        calls.append(bound)
        if len(calls) == 2:
            raise KeyboardInterrupt  # as a second Ctrl-C would, right after the eliminations are committed
        return dropped

    monkeypatch.setattr(race.Racer, "eliminate", stop_after_second_slice)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(cfg, log=lambda s: None, progress=False)
    statuses = {r["status"] for r in view(tmp / "resumed.db").values()}
    assert statuses == {"racing", "eliminated"}
    monkeypatch.setattr(race.Racer, "eliminate", original)
    resumed = run_sweep(cfg, log=lambda s: None, progress=False)
    assert not resumed.interrupted and resumed.layer_calls < raced.layer_calls  # the first slices are not redone
    want, got = view(tmp / "race.db"), view(tmp / "resumed.db")
    assert {k: (r["status"], r["ppl"], r["n_windows"]) for k, r in got.items()} == \
        {k: (r["status"], r["ppl"], r["n_windows"]) for k, r in want.items()}
    assert store.read_window_losses(str(tmp / "resumed.db"), raced.setup, [""])[""][0].tolist() == \
        store.read_window_losses(str(tmp / "race.db"), raced.setup, [""])[""][0].tolist()
