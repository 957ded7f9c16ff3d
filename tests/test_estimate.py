"""`sweep plan`'s estimate: it counts the work the engine does, prices it, and uses what the DB measured.

Invariants only: how the estimate moves with the plan, the tokens and the DB, never how many seconds it says
(speed claims live in bench/, where the estimate is recorded next to the measured time).
"""
from __future__ import annotations

import itertools
import sqlite3

import pytest
import torch

from sweep import steps as variant_steps
from sweep.config import SweepConfig
from sweep.engine import estimate, perplexity, trie
from sweep.engine.runner import run_sweep
from sweep.engine.status import describe_plan
from sweep.plan import kept_layers, parse_key, variant_key
from sweep.store.throughput import MeasuredChunk
from tiny import tiny_model

PRICES = estimate.Prices(layer_s=1e-6, head_s=1e-5, forward_s=1e-7, prefill_s=(0.01, 0.002), decode_s=(0.001, 0.0005),
                         build_s=1.0)
EXHAUSTIVE_4 = [r for k in range(5) for r in itertools.combinations(range(4), k)]
SINGLE_4 = [(), (0,), (1,), (2,), (3,)]


def _steps(removals, n_layers=4):
    return [variant_steps.steps_of(r, n_layers) for r in removals]


def test_sub_trie_calls_are_what_the_trie_engine_counts():
    model = tiny_model("gpt2")
    ids = torch.randint(0, 96, (300,), generator=torch.Generator().manual_seed(0))
    for removals in (EXHAUSTIVE_4, SINGLE_4, EXHAUSTIVE_4[5:11]):
        counts = trie.CallCounts()
        kept = {variant_key(r): kept_layers(r, 4) for r in removals}
        trie.trie_perplexities(model, kept, model.get_output_embeddings(), ids, 64, 32, 4, counts=counts)
        layers, heads = estimate.sub_trie_calls(_steps(removals), 4)
        assert (counts.layer_calls, counts.head_calls) == (layers * counts.batches, heads * counts.batches)


def test_sub_trie_calls_of_a_kept_capture_are_what_the_trie_engine_counts():
    model = tiny_model("llama")
    ids = torch.randint(0, 96, (300,), generator=torch.Generator().manual_seed(0))
    cache = trie.CaptureCache(trie.CAPTURE_CACHE_BYTES)
    first = {variant_key(r): kept_layers(r, 4) for r in SINGLE_4[:2]}
    trie.trie_perplexities(model, first, model.get_output_embeddings(), ids, 64, 32, 4, captures=cache)
    for removals in (EXHAUSTIVE_4, SINGLE_4[2:], EXHAUSTIVE_4[5:11]):
        counts = trie.CallCounts()
        kept = {variant_key(r): kept_layers(r, 4) for r in removals}
        trie.trie_perplexities(model, kept, model.get_output_embeddings(), ids, 64, 32, 4, counts=counts,
                               captures=cache)
        layers, heads = estimate.sub_trie_calls(_steps(removals), 4, captured=True)
        assert (counts.layer_calls, counts.head_calls) == (layers * counts.batches, heads * counts.batches)
        assert layers == estimate.sub_trie_calls(_steps(removals), 4)[0] - 3  # the capture's L - 1 layers


def test_kept_captures_make_every_trie_chunk_after_the_first_cheaper():
    geo = estimate.geometry(4096, 64, 64, 8)
    singles = [(layer,) for layer in range(24)]
    paid = estimate.perplexity_seconds(singles, 24, geo, PRICES, shared=True)
    kept = estimate.perplexity_seconds(singles, 24, geo, PRICES, shared=True, keeps_captures=True)
    first_only = estimate.chunk_seconds(_steps(singles[:8], 24), 24, geo, PRICES)
    assert kept < paid
    assert kept == pytest.approx(first_only + sum(  # the later chunks without the capture forward
        estimate.chunk_seconds(_steps(c, 24), 24, geo, PRICES, captured=True) for c in _later_chunks(singles, geo)))
    # one chunk only: nothing to keep it for
    assert estimate.perplexity_seconds(singles[:8], 24, geo, PRICES, True, True) == pytest.approx(first_only)


def _later_chunks(todo, geo):
    """The runner's chunks after the first (as perplexity_seconds cuts them, the later ones priced captured)."""
    chunks, first, size, captured = [], 0, 8, False
    while first < len(todo):
        chunk = todo[first: first + size]
        seconds = estimate.chunk_seconds(_steps(chunk, 24), 24, geo, PRICES, captured)
        chunks.append(chunk)
        captured, first = True, first + len(chunk)
        size = estimate.next_chunk_size([{"eval_seconds": seconds / len(chunk)}], size)
    return chunks[1:]


def test_a_worker_keeps_captures_on_cpu_within_the_budget_only():
    assert trie.keeps_captures("cpu", 30, 4096, 576, 4)  # SmolLM2, 4,096 tokens: 0.28 GB
    assert not trie.keeps_captures("cpu", 30, 287_644, 576, 4)  # the whole WikiText test: 20 GB
    assert not trie.keeps_captures("cuda", 30, 4096, 576, 2)


def test_probe_timing_reads_the_steady_state_through_a_stall(monkeypatch):
    """A stall of several calls at 3x (what a fresh process on the shared VM sees about a second in) does not move
    the probe's price, where a median of the first calls would read the stall; a fake clock makes it exact."""
    clock = [0.0]
    monkeypatch.setattr(estimate.time, "perf_counter", lambda: clock[0])
    durations = iter([0.5] + [0.3, 0.3, 0.1, 0.1, 0.1, 0.1] + [0.1] * 10)  # warm-up, 2 stalled calls, steady
    calls = []

    def fn():
        calls.append(None)
        clock[0] += next(durations)

    assert estimate._typical_seconds(fn, torch.device("cpu")) == pytest.approx(0.1)  # their median: 0.3
    assert len(calls) == 1 + 3  # warm-up, then at least 3 timed calls, more only while under 0.6 s

    clock[0], durations, calls[:] = 0.0, iter([0.01] * 20), []
    estimate._typical_seconds(fn, torch.device("cpu"))
    assert len(calls) == 1 + 9  # cheap calls: at most nine timed


def test_geometry_counts_the_positions_and_scored_rows_of_the_engines_batches():
    ids = torch.arange(300)
    batches = list(perplexity.scored_batches(ids, 64, 32, 4))
    geo = estimate.geometry(300, 64, 32, 4)
    assert geo.batches == len(batches) and geo.window == 64
    assert geo.positions == sum(b.input_ids.numel() for b in batches)
    head = torch.nn.Linear(8, 96)
    scored = [perplexity.window_nll(head, torch.zeros(*b.input_ids.shape, 8), b.input_ids % 96, b.n_targets)[1]
              for b in batches]  # positions each window of the batch scores
    assert geo.rows == sum(len(b.input_ids) * n for b, n in zip(batches, scored))


def test_estimate_grows_with_variants_and_tokens():
    short, long = estimate.geometry(512, 64, 64, 8), estimate.geometry(2048, 64, 64, 8)
    single = estimate.perplexity_seconds(SINGLE_4, 4, short, PRICES, shared=True)
    exhaustive = estimate.perplexity_seconds(EXHAUSTIVE_4, 4, short, PRICES, shared=True)
    assert 0 < single < exhaustive < estimate.perplexity_seconds(EXHAUSTIVE_4, 4, long, PRICES, shared=True)
    # prefix sharing makes the same plan cheaper than one variant at a time
    assert exhaustive < estimate.perplexity_seconds(EXHAUSTIVE_4, 4, short, PRICES, shared=False)


def test_calibration_is_measured_over_priced_seconds_of_earlier_chunks():
    geo = estimate.geometry(1024, 64, 64, 8)
    chunk_keys = [variant_key(r) for r in EXHAUSTIVE_4[:8]], [variant_key(r) for r in EXHAUSTIVE_4[8:]]
    priced = [estimate.chunk_seconds(_steps([parse_key(k) for k in keys]), 4, geo, PRICES) for keys in chunk_keys]
    as_priced = [MeasuredChunk(1024, tuple(keys), seconds) for keys, seconds in zip(chunk_keys, priced)]
    twice = [MeasuredChunk(c.n_tokens, c.keys, 2 * c.seconds) for c in as_priced]
    assert estimate.calibration(as_priced, 4, 64, 64, 8, PRICES) == pytest.approx(1.0)
    assert estimate.calibration(twice, 4, 64, 64, 8, PRICES) == pytest.approx(2.0)
    assert estimate.calibration([], 4, 64, 64, 8, PRICES) is None


def test_latency_phase_lies_between_the_least_rounds_and_the_budget():
    cfg = SweepConfig(latency_repeats=5, latency_max_repeats=50, latency_budget=2.0, decode_tokens=16)
    calls = [0, 1, 2, 3, 4]
    least, expected, most = estimate.latency_seconds(calls, cfg, PRICES)
    def round_s(n_decode):
        return sum(0.01 + 0.002 * k + n_decode * (0.001 + 0.0005 * k) for k in calls)

    assert least == pytest.approx(round_s(2) + 5 * round_s(16))  # a warm-up round decoding 2 tokens, then 5 rounds
    assert least <= expected <= most <= 2.0 + round_s(16)
    assert expected == most  # on a CPU without an earlier phase: the budget
    assert estimate.latency_seconds(calls, cfg, PRICES, on_gpu=True)[1] == least
    assert least <= estimate.latency_seconds(calls, cfg, PRICES, rounds=8)[1] <= most
    assert estimate.latency_seconds(calls, SweepConfig(latency="off"), PRICES) == (0.0, 0.0, 0.0)


def test_latency_times_only_signatures_not_stored_yet():
    assert sorted(estimate.signature_calls(EXHAUSTIVE_4, [], 4, None, False)) == [0, 1, 2, 3, 4]
    assert sorted(estimate.signature_calls(EXHAUSTIVE_4[1:], [()], 4, None, False)) == [0, 1, 2, 3]
    kinds = ["sliding", "full", "sliding", "full"]  # layer types tell signatures apart
    pairs = [(0, 1), (2, 3), (0, 3)]  # keep S F, S F and F S
    assert len(estimate.signature_calls(pairs, [], 4, kinds, False)) == 2
    assert len(estimate.signature_calls(pairs, [], 4, None, False)) == 1
    assert len(estimate.signature_calls(SINGLE_4, [], 4, None, True)) == 5  # --latency per-variant


def test_range_brackets_the_estimate_and_is_one_figure_when_calibrated():
    for calibrated in (False, True):
        result = estimate.Estimate(startup_s=8.0, perplexity_s=30.0, latency_s=(20.0, 20.0, 20.0),
                                   calibrated=calibrated, calibrated_on=64)
        assert result.low_s <= result.seconds <= result.high_s
        assert (result.low_s == result.high_s) == calibrated
        assert ("most likely" in result.line(64)) != calibrated
    wide = estimate.Estimate(8.0, 30.0, (3.0, 20.0, 20.0), calibrated=True)
    assert wide.low_s < wide.seconds == wide.high_s  # latency that may settle early still makes a range


def _cfg(model_dir, tmp_path, text, **overrides) -> SweepConfig:
    values = dict(model=str(model_dir), data=str(text), db=str(tmp_path / "r.db"), cache_dir=str(tmp_path / "cache"),
                  max_length=64, max_tokens=512, latency="off", strategy="single")
    return SweepConfig(**{**values, **overrides})


def test_plan_prices_from_the_probe_without_a_db_and_creates_none(tiny_gpt2_dir, sample_text_file, tmp_path):
    logs: list[str] = []
    info = describe_plan(_cfg(tiny_gpt2_dir, tmp_path, sample_text_file), log=logs.append)
    assert not (tmp_path / "r.db").exists()
    assert not info["estimate_calibrated"] and info["estimate_seconds"] > 0
    assert info["estimate_low_seconds"] <= info["estimate_seconds"] <= info["estimate_high_seconds"]
    assert any(line.startswith("estimate: ") and "probe" in line for line in logs)


def test_plan_uses_what_the_db_measured_for_the_same_shape(tiny_gpt2_dir, sample_text_file, tmp_path):
    run_sweep(_cfg(tiny_gpt2_dir, tmp_path, sample_text_file), log=lambda s: None, progress=False)
    # Another plan and another prefix of the text: a new setup, the same shape.
    cfg = _cfg(tiny_gpt2_dir, tmp_path, sample_text_file, strategy="exhaustive", max_tokens=384)
    logs: list[str] = []
    first = describe_plan(cfg, log=logs.append)
    assert first["measured"] == 0 and first["estimate_calibrated"]
    assert any("measured earlier here" in line for line in logs)
    assert first["estimate_low_seconds"] == first["estimate_high_seconds"] == first["estimate_seconds"]
    # Chunks recorded as ten times slower make the perplexity estimate ten times larger (the probe's prices cancel
    # up to the share of layers and head in each plan, which one probe to the next leaves about the same).
    with sqlite3.connect(tmp_path / "r.db") as conn:
        conn.execute("UPDATE results SET eval_seconds = eval_seconds * 10")
    slower = describe_plan(cfg, log=lambda s: None)
    assert slower["estimate_perplexity_seconds"] > 3 * first["estimate_perplexity_seconds"]


def test_plan_of_a_measured_plan_has_nothing_to_estimate(tiny_gpt2_dir, sample_text_file, tmp_path):
    cfg = _cfg(tiny_gpt2_dir, tmp_path, sample_text_file)
    run_sweep(cfg, log=lambda s: None, progress=False)
    logs: list[str] = []
    info = describe_plan(cfg, log=logs.append)
    assert info["todo"] == 0 and "estimate: nothing to measure" in logs


def test_calibration_work_grows_with_greedy_rounds_and_the_search_budget_and_bounds_the_range():
    work = estimate.CalibrationWork(1024, signals=True)
    base, _ = estimate.calibration_seconds(work, 4, 64, 8, PRICES)
    one_pass = estimate.chunk_seconds(_steps([()]), 4, estimate.geometry(1024, 64, 64, 8), PRICES)
    assert base == pytest.approx(one_pass)  # the signals: one forward of the full model
    greedy, _ = estimate.calibration_seconds(estimate.CalibrationWork(1024, True, (4, 3, 2)), 4, 64, 8, PRICES)
    assert greedy > base
    searched, search_s = estimate.calibration_seconds(
        estimate.CalibrationWork(1024, True, (4, 3, 2), ((10.0, 2),)), 4, 64, 8, PRICES)
    assert search_s == pytest.approx(searched - greedy) and search_s == pytest.approx(
        10 * estimate.chunk_seconds(_steps([(0, 1)]), 4, estimate.geometry(1024, 64, 64, 8), PRICES))
    # the search's budget is the most it can take: the range's low end leaves it out
    est = estimate.Estimate(startup_s=1.0, perplexity_s=2.0, latency_s=(0.0, 0.0, 0.0), calibrated=True,
                            calibration_s=searched, search_s=search_s)
    assert est.low_s == pytest.approx(3.0 + greedy) and est.seconds == est.high_s == pytest.approx(3.0 + searched)


def test_plan_prices_the_signal_strategies_calibration_work(tiny_gpt2_dir, sample_text_file, tmp_path):
    for strategy in ("single", "single,greedy", "single,greedy,search"):
        logs: list[str] = []
        info = describe_plan(_cfg(tiny_gpt2_dir, tmp_path, sample_text_file, strategy=strategy, n="1-2",
                                  calib_data=str(sample_text_file), calib_max_tokens=512), log=logs.append)
        line = next(line for line in logs if line.startswith("estimate: "))
        assert ("calibration" in line) == (strategy != "single"), line
        assert ("the search at most" in line) == strategy.endswith("search"), line
        assert (info["estimate_calibration_seconds"] > 0) == (strategy != "single")
        assert info["estimate_calibration_seconds"] < info["estimate_seconds"]
