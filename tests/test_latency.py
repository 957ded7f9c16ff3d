"""Adaptive latency repeats: stop when the median is stable, flag it when it is not, behind one timer interface."""
from __future__ import annotations

import itertools
import math
import random

import pytest
import torch

from sweep.config import SweepConfig
from sweep.engine import latency
from sweep.engine.worker import latency_repeats
from tiny import tiny_model


def test_the_default_repeats_are_the_rule_of_the_default_latency_flags():
    cfg = SweepConfig()
    assert latency.Repeats() == latency_repeats(cfg) == latency.Repeats(
        min_repeats=cfg.latency_repeats, max_repeats=cfg.latency_max_repeats, precision=cfg.latency_precision,
        budget_s=cfg.latency_budget, warmup=cfg.latency_warmup)


def test_median_interval_is_zero_for_constant_timings_and_grows_with_their_spread():
    assert latency.median_interval_pct([5.0] * 12) == 0.0
    narrow = latency.median_interval_pct([10 + 0.1 * (i % 5) for i in range(30)])
    wide = latency.median_interval_pct([10 + 3.0 * (i % 5) for i in range(30)])
    assert 0 < narrow < wide
    assert latency.median_interval_pct([3.0]) == math.inf  # one sample says nothing about its spread
    # a lone outlier does not move the median, so it barely widens its interval (unlike a mean's)
    assert latency.median_interval_pct([10.0] * 19 + [1000.0]) == 0.0


class FakeTimer:
    """A :class:`latency.Timer` returning scripted milliseconds (it still runs the call), recording who was timed."""

    def __init__(self, times_ms):
        self.times = iter(times_ms)
        self.calls = 0

    def __call__(self, fn) -> float:
        fn()
        self.calls += 1
        return next(self.times)


@pytest.fixture(scope="module")
def model():
    return tiny_model("gpt2", n_layers=2, vocab=96)


def measure(model, timer, repeats, clock=None, decode_tokens=2):
    kwargs = {"clock": clock} if clock else {}
    return latency.measure_latency(model, {"full": (), "half": (1,)}, seq=8, decode_tokens=decode_tokens,
                                   repeats=repeats, seed=0, timer=timer, **kwargs)


def test_stable_timings_stop_at_the_least_count_and_are_not_noisy(model):
    timer = FakeTimer(itertools.repeat(4.0))
    rows = measure(model, timer, latency.Repeats(min_repeats=6, max_repeats=50, precision=0.03, warmup=1))
    for columns in rows.values():
        assert columns["prefill_repeats"] == 6 and columns["latency_noisy"] == 0
        assert columns["prefill_ms"] == 4.0 and columns["prefill_interval_pct"] == 0.0
        assert columns["decode_ms_per_token"] == 2.0  # 4 ms for 2 decode steps
    assert timer.calls == 2 * 2 * (1 + 6)  # (prefill + decode) x 2 variants x (warm-up + 6 rounds)


def test_the_warm_up_round_decodes_only_a_few_tokens(model):
    decode_steps = []  # one entry per forward over a single new token

    def count(module, args, kwargs, output):
        if kwargs["input_ids"].shape[1] == 1:
            decode_steps.append(1)

    handle = model.register_forward_hook(count, with_kwargs=True)
    try:
        measure(model, FakeTimer(itertools.repeat(4.0)), latency.Repeats(min_repeats=5, warmup=1), decode_tokens=6)
    finally:
        handle.remove()
    # 2 variants x (warm-up: 2 steps + 5 timed rounds x 6 steps)
    assert latency.WARMUP_DECODE_TOKENS == 2 and len(decode_steps) == 2 * (2 + 5 * 6)


def test_spread_timings_run_to_the_most_repeats_and_are_flagged_noisy(model):
    rng = random.Random(0)
    timer = FakeTimer(rng.uniform(1.0, 100.0) for _ in itertools.count())
    rows = measure(model, timer, latency.Repeats(min_repeats=5, max_repeats=12, precision=0.03, warmup=0))
    for columns in rows.values():
        assert columns["prefill_repeats"] == 12 and columns["latency_noisy"] == 1
        assert columns["prefill_interval_pct"] > 3.0


def test_a_spent_time_budget_stops_after_the_least_count_and_flags_what_is_unstable(model):
    rng = random.Random(1)
    timer = FakeTimer(rng.uniform(1.0, 100.0) for _ in itertools.count())
    ticks = itertools.count(0.0, 10.0)  # every look at the clock: 10 s later
    rows = measure(model, timer, latency.Repeats(min_repeats=5, max_repeats=50, budget_s=1.0, warmup=0),
                   clock=lambda: next(ticks))
    assert all(c["prefill_repeats"] == 5 and c["latency_noisy"] == 1 for c in rows.values())


def test_no_round_starts_that_would_end_past_the_budget(model):
    now = [0.0]

    class SlowTimer(FakeTimer):  # every timed call takes 0.75 s of the fake clock: a round (2 variants x 2) 3 s
        def __call__(self, fn) -> float:
            now[0] += 0.75
            return super().__call__(fn)

    rng = random.Random(3)  # spread timings: never stable, so only the budget stops the phase
    rows = measure(model, SlowTimer(rng.uniform(1.0, 100.0) for _ in itertools.count()),
                   latency.Repeats(min_repeats=5, max_repeats=50, budget_s=20.0, warmup=0), clock=lambda: now[0])
    # rounds end at 3, 6, ..., 18 s: after the sixth a seventh would end at 21 s, past the 20 s budget
    assert all(c["prefill_repeats"] == 6 and c["latency_noisy"] == 1 for c in rows.values())
    assert now[0] <= 20.0


def test_only_unstable_variants_get_more_repeats(model):
    # Calls alternate full (prefill, decode), half (prefill, decode) while both are timed: full is stable, half not
    # (once full stops, the script's order drifts, but every later timing of half is still drawn from it spread).
    rng = random.Random(2)

    def scripted():
        while True:
            yield 5.0
            yield 5.0
            yield rng.uniform(1.0, 100.0)
            yield rng.uniform(1.0, 100.0)

    timer = FakeTimer(scripted())
    rows = measure(model, timer, latency.Repeats(min_repeats=5, max_repeats=9, warmup=0))
    assert rows["full"]["prefill_repeats"] == 5 and rows["full"]["latency_noisy"] == 0
    assert rows["half"]["prefill_repeats"] == 9 and rows["half"]["latency_noisy"] == 1


def test_without_decode_only_the_prefill_is_judged(model):
    rows = measure(model, FakeTimer(itertools.repeat(3.0)), latency.Repeats(min_repeats=5, warmup=0),
                   decode_tokens=0)
    assert all(c["decode_ms_per_token"] is None and c["latency_noisy"] == 0 for c in rows.values())


def test_the_cpu_timer_is_the_wall_clock_and_times_the_call():
    timer = latency.timer_for(torch.device("cpu"))
    assert isinstance(timer, latency.WallTimer)
    calls = []
    assert timer(lambda: calls.append(1)) >= 0.0 and calls == [1]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_cuda_timer_measures_device_time():
    device = torch.device("cuda")
    timer = latency.timer_for(device)
    assert isinstance(timer, latency.CudaEventTimer)
    a = torch.randn(2048, 2048, device=device)
    small, large = timer(lambda: a @ a), timer(lambda: [a @ a for _ in range(20)])
    assert 0 < small < large


def test_latency_is_timed_on_the_configured_cpu_threads_and_the_count_restored(model):
    """The worker times on --latency-threads threads (1 by default) and leaves torch's count as it was."""
    from sweep.config import SweepConfig
    from sweep.engine.worker import Worker

    seen = []

    class ThreadCountingTimer:
        def __call__(self, fn) -> float:
            seen.append(torch.get_num_threads())
            fn()
            return 1.0

    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for threads, expected in ((1, 1), (0, 2)):
            seen.clear()
            worker = Worker.__new__(Worker)  # only what measure_latency reads
            worker.model, worker.device = model, torch.device("cpu")
            worker.cfg = SweepConfig(latency_seq=8, decode_tokens=2, latency_repeats=5, latency_max_repeats=5,
                                     latency_threads=threads)
            worker.measure_latency({"full": ()}, timer=ThreadCountingTimer())
            assert seen and set(seen) == {expected}
            assert torch.get_num_threads() == 2
        with latency.cpu_threads("cuda", 1):  # no effect on a GPU's timings
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(saved)
