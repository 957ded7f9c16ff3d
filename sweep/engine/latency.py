"""Latency of a variant: prefill and greedy-decode timings at batch size 1, repeated until the median is stable.

Repeats of several variants are interleaved (repeat r of every variant before repeat r+1 of any), so thermal or
background drift is spread evenly and favours no variant. How many repeats: at least ``min_repeats``; then a
variant stops once the 95 % bootstrap interval of its median (prefill and decode) lies within ``precision`` of
the median, or at ``max_repeats``, or when a next round would overrun the phase's time ``budget``. A median whose
interval is still wider then is stored with its width and flagged noisy (``latency_noisy``): on a quiet machine a
few repeats suffice, on a busy one the timings say they are not to be trusted.
"""
from __future__ import annotations

import inspect
import math
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from torch import nn

from sweep.config import default
from sweep.engine.adapters import applied
from sweep.engine.device import free_memory
from sweep.plan import variant_key

WARMUP_DECODE_TOKENS = 2
"""Greedy steps of a warm-up round: enough to run the decode path once with a cache (its first-call costs), while
a full-length warm-up decode would cost as much as a timed round (at 1 thread, DistilGPT-2 spends ~90 % of a
round decoding)."""

BOOTSTRAP_RESAMPLES = 1000
"""Resamples of the median's bootstrap interval (a millisecond for 60 samples)."""


@dataclass(frozen=True)
class Timing:
    median_ms: float
    iqr_ms: float
    repeats: int
    interval_pct: float = math.nan
    """Half-width of the 95 % bootstrap interval of the median, in % of the median."""


def median_interval_pct(samples: Sequence[float], seed: int = 0, resamples: int = BOOTSTRAP_RESAMPLES) -> float:
    """Half-width of the 95 % percentile-bootstrap interval of the median, in percent of the median.

    Example: 20 samples of 10 ms with one outlier of 30 ms -> resampled medians are all 10 ms -> 0 %; samples
    spread evenly over 8..12 ms -> medians mostly within 9.3..10.7 -> about 7 %. Fewer than 2 samples: inf.
    """
    values = np.asarray(samples, dtype=np.float64)
    median = float(np.median(values)) if len(values) else math.nan
    if len(values) < 2 or not median > 0:
        return math.inf
    draws = np.random.default_rng(seed).integers(0, len(values), size=(resamples, len(values)))
    low, high = np.quantile(np.median(values[draws], axis=1), [0.025, 0.975])
    return float(100.0 * (high - low) / 2.0 / median)


def summarize(samples_ms: Sequence[float], seed: int = 0) -> Timing:
    """Median, inter-quartile range and the median's bootstrap interval (half-width, %) of timed repeats."""
    if len(samples_ms) >= 2:
        q1, _, q3 = statistics.quantiles(samples_ms, n=4, method="inclusive")
    else:
        q1 = q3 = samples_ms[0]
    return Timing(statistics.median(samples_ms), q3 - q1, len(samples_ms), median_interval_pct(samples_ms, seed))


class Timer(Protocol):
    """Milliseconds one call of ``fn`` takes on the device: the one device-specific part of the latency phase."""

    def __call__(self, fn: Callable[[], object]) -> float: ...


class WallTimer:
    """:class:`Timer` of a CPU: ``perf_counter`` around the call."""

    def __call__(self, fn: Callable[[], object]) -> float:
        begin = time.perf_counter()
        fn()
        return (time.perf_counter() - begin) * 1000.0


class CudaEventTimer:
    """:class:`Timer` of a CUDA device: events recorded on its stream around the call (device time), then a sync."""

    def __init__(self, device: torch.device):
        self.device = device

    def __call__(self, fn: Callable[[], object]) -> float:
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        torch.cuda.synchronize(self.device)
        return start.elapsed_time(stop)


def timer_for(device: torch.device) -> Timer:
    """CUDA events on a GPU, the wall clock elsewhere."""
    return CudaEventTimer(device) if device.type == "cuda" else WallTimer()


def time_once(fn: Callable[[], object], device: torch.device) -> float:
    """Milliseconds one call takes on ``device`` (:func:`timer_for`)."""
    return timer_for(device)(fn)


def prefill_call(model: nn.Module, prompt: torch.Tensor, new_cache: Callable[[], object] = lambda: None
                 ) -> Callable[[], object]:
    """A prefill: one forward over the prompt (1, T) that builds the KV cache and returns last-token logits.
    ``new_cache()`` gives the cache to fill (None: the model's default; a variant without some attentions or with
    repeated layers needs its own slot layout, :func:`sweep.engine.adapters.applied`)."""

    @torch.inference_mode()
    def run() -> object:
        cache = new_cache()
        if cache is None:
            return model(input_ids=prompt, use_cache=True, logits_to_keep=1)
        return model(input_ids=prompt, use_cache=True, logits_to_keep=1, **{cache_keyword(model): cache})

    return run


def cache_keyword(model: nn.Module) -> str:
    """The forward's name for the KV cache: ``cache`` since transformers 5.24 (the old ``past_key_values`` still
    works there, with a deprecation warning, until 5.40), ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def output_cache(output) -> object:
    """The KV cache a forward returned, under either name (reading ``past_key_values`` warns from 5.24 on)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


@torch.inference_mode()
def time_decode(model: nn.Module, prefilled, n_new: int, timer: Timer) -> float:
    """Milliseconds per token of greedy decoding with the KV cache, continuing from a prefill's output."""
    state = {"cache": output_cache(prefilled), "token": prefilled.logits[:, -1].argmax(-1, keepdim=True)}  # (1, 1)
    keyword = cache_keyword(model)

    def steps() -> None:
        for _ in range(n_new):
            step = model(input_ids=state["token"], use_cache=True, **{keyword: state["cache"]})
            state["cache"] = output_cache(step)
            state["token"] = step.logits[:, -1].argmax(-1, keepdim=True)

    return timer(steps) / n_new


@contextmanager
def cpu_threads(device: torch.device | str, threads: int) -> Iterator[None]:
    """Time on ``threads`` CPU threads (0: leave torch's count); restored afterwards. No effect on a GPU.

    Why one thread by default: batch-1 calls of a small model are short, and the wake-ups of a second thread make
    their timings jitter. Measured on an idle 2-core machine, 6 x 64 GPT-2, 7 shape signatures: two threads left
    every median's 95 % interval at 4-10 % after 26 rounds (the 30 s budget), one thread brought all within 3 %
    after 5-10 rounds (9 s), at the same medians within 5 %.
    """
    if torch.device(device).type != "cpu" or threads <= 0 or threads == torch.get_num_threads():
        yield
        return
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


@dataclass
class Repeats:
    """When the latency phase stops timing a variant (``--latency-repeats`` and the flags after it; their defaults)."""

    min_repeats: int = default("latency_repeats")
    max_repeats: int = default("latency_max_repeats")
    precision: float = default("latency_precision")
    """Target half-width of the median's 95 % interval, as a fraction of the median."""
    budget_s: float = default("latency_budget")
    """Seconds the whole phase may take: beyond ``min_repeats``, a round starts only if it would end within them
    (judged by the last round's time)."""
    warmup: int = default("latency_warmup")


def stable(samples: dict[str, list[float]], precision: float, seed: int = 0) -> bool:
    """Every timed series (prefill, decode when timed) has its median's interval within ``precision``."""
    series = [s for s in samples.values() if s and all(math.isfinite(x) for x in s)]
    return all(median_interval_pct(s, seed) <= 100.0 * precision for s in series)


def measure_latency(model: nn.Module, representatives: dict[str, Sequence[int]], *, seq: int, decode_tokens: int,
                    repeats: Repeats, seed: int, timer: Timer | None = None,
                    progress: Callable[[int, int], None] | None = None, should_stop: Callable[[], bool] = lambda: False,
                    clock: Callable[[], float] = time.perf_counter) -> dict[str, dict]:
    """Prefill and decode latency of one variant per signature, with repeats interleaved across variants.

    Args:
        representatives: shape signature -> the removed layers of one variant with that signature.
        seq: prompt length (tokens, batch 1) of the prefill; decode_tokens: greedy steps timed (0: none).
        repeats: how many repeats (:class:`Repeats`); seed: of the random prompt and the bootstrap.
        timer: how a call is timed (default :func:`timer_for` the model's device); clock: of the time budget.

    Returns:
        signature -> latency columns of a result row (or ``{"latency_error": text}`` when timing failed), or
        nothing when ``should_stop()`` turns true between rounds (Ctrl-C).
    """
    device = next(model.parameters()).device
    timer = timer or timer_for(device)
    vocab = model.get_output_embeddings().weight.shape[0]
    prompt = torch.randint(0, vocab, (1, seq), generator=torch.Generator().manual_seed(seed)).to(device)  # (1, T)
    samples = {sig: {"prefill": [], "decode": []} for sig in representatives}
    failed: dict[str, str] = {}
    active = list(representatives)
    started, rounds = clock(), repeats.warmup + repeats.max_repeats
    for round_idx in range(rounds):
        if should_stop():
            return {}
        round_started = clock()
        warming_up = round_idx < repeats.warmup
        n_decode = min(decode_tokens, WARMUP_DECODE_TOKENS) if warming_up else decode_tokens
        for sig in active:
            try:
                prefill_ms, decode_ms = time_variant(model, representatives[sig], prompt, n_decode, timer)
            except Exception as exc:  # a latency failure is data: perplexity is still measured
                free_memory(device)
                failed[sig] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                continue
            if not warming_up:
                samples[sig]["prefill"].append(prefill_ms)
                samples[sig]["decode"].append(decode_ms)
        timed = round_idx + 1 - repeats.warmup
        if timed >= repeats.min_repeats:
            now = clock()  # a next round (at most this one's signatures) would take about as long as this one
            out_of_time = now - started + (now - round_started) > repeats.budget_s
            active = [] if out_of_time else [s for s in active if s not in failed
                                              and not stable(samples[s], repeats.precision, seed)]
        else:
            active = [s for s in active if s not in failed]
        if progress is not None:
            progress(round_idx + 1, rounds if active else round_idx + 1)
        if not active:
            break
    return {sig: ({"latency_error": failed[sig]} if sig in failed
                  else latency_columns(s, variant_key(representatives[sig]), repeats.precision, seed))
            for sig, s in samples.items()}


def time_variant(model: nn.Module, removed: Sequence[int], prompt: torch.Tensor, decode_tokens: int,
                  timer: Timer) -> tuple[float, float]:
    """One prefill and (if asked) one decode timing of a variant, in ms and ms per token; the decode continues
    from the timed prefill's KV cache (no second prefill)."""
    with applied(model, removed) as variant:
        result = {}
        call = prefill_call(model, prompt, variant.new_cache)
        prefill_ms = timer(lambda: result.setdefault("out", call()))
        decode_ms = time_decode(model, result["out"], decode_tokens, timer) if decode_tokens else math.nan
    return prefill_ms, decode_ms


def latency_columns(samples: dict[str, list[float]], source_key: str, precision: float = math.inf,
                    seed: int = 0) -> dict:
    """The latency columns of a result row from the timed samples of one variant (``source_key``).

    ``latency_noisy`` is 1 when the interval of a median (prefill or decode) is wider than ``precision``.
    """
    prefill = summarize(samples["prefill"], seed)
    columns = {"prefill_ms": prefill.median_ms, "prefill_iqr_ms": prefill.iqr_ms, "prefill_repeats": prefill.repeats,
               "prefill_interval_pct": _finite_or_none(prefill.interval_pct), "decode_ms_per_token": None,
               "decode_iqr_ms": None, "decode_interval_pct": None, "latency_from": source_key}
    widths = [prefill.interval_pct]
    if samples["decode"] and all(math.isfinite(x) for x in samples["decode"]):
        decode = summarize(samples["decode"], seed)
        columns.update(decode_ms_per_token=decode.median_ms, decode_iqr_ms=decode.iqr_ms,
                       decode_interval_pct=_finite_or_none(decode.interval_pct))
        widths.append(decode.interval_pct)
    columns["latency_noisy"] = int(max(widths) > 100.0 * precision)
    return columns


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None
