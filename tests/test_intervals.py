"""Paired bootstrap intervals (sweep/intervals.py) against a plain reference written here, window by window."""
from __future__ import annotations

import math

import numpy as np
import pytest

from sweep.errors import ConfigError, StoreError
from sweep.intervals import (RESAMPLES, SEED, Interval, change_intervals, compare_variants, difference_interval,
                             ranked_ties, refresh_intervals, resample_counts)


def reference_interval(nll_v, nll_b, tokens, counts, level=0.95) -> tuple[float, float, float]:
    """The percentile interval of ppl_v / ppl_b - 1 (%), one resample and one window at a time."""
    changes = []
    for row in counts:
        nll_sum_v = sum(c * x for c, x in zip(row, nll_v))
        nll_sum_b = sum(c * x for c, x in zip(row, nll_b))
        n_tokens = sum(c * t for c, t in zip(row, tokens))
        changes.append(100 * (math.exp(nll_sum_v / n_tokens) / math.exp(nll_sum_b / n_tokens) - 1))
    changes.sort()

    def quantile(q):  # linear interpolation between order statistics, as numpy's default
        position = q * (len(changes) - 1)
        low = math.floor(position)
        return changes[low] + (changes[min(low + 1, len(changes) - 1)] - changes[low]) * (position - low)

    full = 100 * (math.exp(sum(nll_v) / sum(tokens)) / math.exp(sum(nll_b) / sum(tokens)) - 1)
    return full, quantile((1 - level) / 2), quantile(1 - (1 - level) / 2)


@pytest.fixture
def windows():
    rng = np.random.default_rng(1)
    tokens = rng.integers(50, 120, size=30).astype(float)
    base = tokens * rng.uniform(2.5, 3.5, size=30)
    variants = np.stack([base * rng.uniform(0.97, 1.06, size=30) for _ in range(5)])
    return tokens, base, variants


def test_counts_draw_every_window_count_times_per_resample_and_are_seeded():
    counts = resample_counts(17, resamples=300, seed=4)
    assert counts.shape == (300, 17) and (counts.sum(axis=1) == 17).all()
    assert (counts == resample_counts(17, resamples=300, seed=4)).all()
    assert not (counts == resample_counts(17, resamples=300, seed=5)).all()
    assert abs(counts.mean() - 1.0) < 0.05  # each window drawn once per resample on average


def test_intervals_equal_the_window_by_window_reference(windows):
    tokens, base, variants = windows
    counts = resample_counts(len(tokens), resamples=400, seed=7)
    got = change_intervals(variants, tokens, base, resamples=400, seed=7)
    for row, interval in zip(variants, got):
        full, low, high = reference_interval(row, base, tokens, counts)
        assert interval.change == pytest.approx(full, rel=1e-9, abs=1e-9)
        assert (interval.low, interval.high) == pytest.approx((low, high), rel=1e-9, abs=1e-9)
        assert interval.low <= interval.change <= interval.high


def test_a_variant_worse_on_every_window_is_a_real_difference_and_itself_is_not():
    tokens = np.full(3, 100.0)
    base, worse = np.array([200.0, 260.0, 240.0]), np.array([210.0, 265.0, 250.0])
    interval = difference_interval(worse, base, tokens)
    assert interval.change == pytest.approx(100 * math.expm1(25 / 300))
    assert interval.excludes_zero and interval.low > 0
    same = difference_interval(base, base, tokens)
    assert same == Interval(0.0, 0.0, 0.0) and not same.excludes_zero


def test_pairing_makes_intervals_tighter_than_the_spread_of_windows():
    """Hard windows are hard for both variants: the paired interval is much narrower than an unpaired one."""
    rng = np.random.default_rng(0)
    tokens = np.full(200, 100.0)
    base = 300.0 * rng.lognormal(0, 0.3, size=200)  # windows differ a lot
    variant = base * 1.01 * rng.lognormal(0, 0.005, size=200)  # 1 % more NLL on every window, give or take
    paired = difference_interval(variant, base, tokens)
    # Unpaired: each perplexity resampled on its own windows, as two independent error bars would be.
    a, b = resample_counts(200, seed=1), resample_counts(200, seed=2)
    unpaired = 100 * np.expm1((a @ variant) / (a @ tokens) - (b @ base) / (b @ tokens))
    low, high = np.quantile(unpaired, [0.025, 0.975])
    assert paired.excludes_zero and not (low > 0 or high < 0)  # real when paired, lost in noise when not
    assert paired.high - paired.low < (high - low) / 10


def test_ranked_ties_names_neighbours_within_noise(windows):
    tokens, base, _ = windows
    rng = np.random.default_rng(3)
    close = base * rng.normal(1.0, 0.02, size=len(base))  # noisy, about the same as base
    far = base * 1.3
    ties = ranked_ties(["a", "b", "c"], np.stack([base, close, far]), tokens)
    assert [(better, worse) for better, worse, _ in ties] == [("a", "b")]


def test_a_diverged_variant_has_no_interval(windows):
    tokens, base, variants = windows
    broken = variants.copy()
    broken[1, 4] = np.nan
    got = change_intervals(broken, tokens, base, resamples=100)
    assert math.isnan(got[1].low) and math.isnan(got[1].high)
    assert not math.isnan(got[0].low)


# ---------------------------------------------------------------------------------------------- stored results


def bootstrap_reference(nll_v, nll_b, tokens, resamples, seed, level=0.95) -> tuple[float, float]:
    """An independent percentile bootstrap: draw W window indices per resample, add up the drawn windows."""
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(tokens), size=(resamples, len(tokens)))
    changes = sorted(100 * math.expm1(sum(nll_v[w] - nll_b[w] for w in drawn) / sum(tokens[w] for w in drawn))
                     for drawn in draws.tolist())
    position = lambda q: q * (len(changes) - 1)  # noqa: E731 - numpy's default (linear) quantile
    ends = []
    for q in ((1 - level) / 2, 1 - (1 - level) / 2):
        low = math.floor(position(q))
        ends.append(changes[low] + (changes[min(low + 1, len(changes) - 1)] - changes[low]) * (position(q) - low))
    return ends[0], ends[1]


@pytest.fixture(scope="module")
def measured_db(tiny_gpt2_dir, sample_text_file, tmp_path_factory):
    from sweep.config import SweepConfig
    from sweep.engine.runner import run_sweep

    tmp = tmp_path_factory.mktemp("intervals")
    cfg = SweepConfig(model=str(tiny_gpt2_dir), data=str(sample_text_file), db=str(tmp / "r.db"),
                      cache_dir=str(tmp / "cache"), max_length=64, max_tokens=1024, latency="off", strategy="single")
    return cfg.db, run_sweep(cfg, log=lambda s: None, progress=False).setup


def test_the_view_and_load_results_give_each_variants_interval_against_the_baseline(measured_db):
    import sweep
    from sweep import store

    db, setup = measured_db
    frame = sweep.load_results(db, setup=setup)
    losses = store.read_window_losses(db, setup)
    base_nll, tokens = losses[""]
    assert len(frame) == 5 and (frame["n_windows"] == len(tokens)).all()
    for row in frame.to_dict("records"):
        low, high = bootstrap_reference(losses[row["removed"]][0], base_nll, tokens, RESAMPLES, SEED)
        assert (row["ppl_change_low_pct"], row["ppl_change_high_pct"]) == pytest.approx((low, high), rel=1e-9,
                                                                                         abs=1e-9)
        assert row["ppl_change_low_pct"] <= row["ppl_change_pct"] <= row["ppl_change_high_pct"]


def test_two_stored_variants_compare_with_their_paired_interval(measured_db):
    from sweep import store

    db, setup = measured_db
    losses = store.read_window_losses(db, setup)
    got = compare_variants(db, setup, "1", "2")
    nll_1, nll_2, tokens = losses["1"][0], losses["2"][0], losses["1"][1]
    assert got.change == pytest.approx(100 * math.expm1((nll_1.sum() - nll_2.sum()) / tokens.sum()), rel=1e-9)
    assert (got.low, got.high) == pytest.approx(bootstrap_reference(nll_1, nll_2, tokens, RESAMPLES, SEED), rel=1e-9)
    with pytest.raises(StoreError):
        compare_variants(db, setup, "1", "0,1")  # never measured


def test_a_remeasured_baseline_makes_stored_intervals_stale_until_refreshed(measured_db, tmp_path):
    import sqlite3

    import sweep
    from sweep import store

    db, setup = measured_db
    copy = tmp_path / "copy.db"
    with sqlite3.connect(db) as source, sqlite3.connect(copy) as target:
        source.backup(target)  # a file copy would miss what is still in the write-ahead log
    handle = store.open_db(copy)
    baseline = store.find_result(handle, setup, "")
    losses = store.read_window_losses(handle, setup, [""])[""]
    store.record_result(handle, {**baseline, "measured_at": "2099-01-01T00:00:00", "window_nll": list(losses[0]),
                                 "window_tokens": list(losses[1])})
    assert sweep.load_results(str(copy), setup=setup)["ppl_change_low_pct"].isna().all()
    assert refresh_intervals(handle, setup) == 5
    assert sweep.load_results(str(copy), setup=setup)["ppl_change_low_pct"].notna().all()
    assert refresh_intervals(handle, setup) == 0
    # another number of resamples (--resamples) recomputes them, and the view then shows those
    assert refresh_intervals(handle, setup, resamples=300) == 5
    base_nll, tokens = losses
    layer_1 = store.read_window_losses(handle, setup, ["1"])["1"][0]
    view = sweep.load_results(str(copy), setup=setup).set_index("removed")
    assert view.loc["1", "ppl_change_low_pct"] == pytest.approx(
        bootstrap_reference(layer_1, base_nll, tokens, 300, SEED)[0], rel=1e-9)


def test_the_resamples_flag_defaults_to_the_bootstrap_constant():
    from sweep.config import SweepConfig

    assert SweepConfig().resamples == RESAMPLES
    with pytest.raises(ConfigError, match="--resamples"):
        SweepConfig(resamples=10)


def test_sweep_compare_reads_the_newest_setup_of_a_model(measured_db):
    import sweep

    db, setup = measured_db
    got = sweep.compare(db, "1", "2")
    assert got == compare_variants(db, setup, "1", "2")
    assert sweep.compare(db, "2", "1").change == pytest.approx(100 * (1 / (1 + got.change / 100) - 1), rel=1e-9)
