"""Latency of a variant: prefill and greedy-decode timings at batch size 1, repeated and summarised.

Repeats of several variants are interleaved (repeat r of every variant before repeat r+1 of any), so thermal or
background drift is spread evenly and favours no variant.
"""
from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from sweep.engine.adapters import pruned
from sweep.engine.device import free_memory
from sweep.plan import variant_key


@dataclass(frozen=True)
class Timing:
    median_ms: float
    iqr_ms: float
    repeats: int


def summarize(samples_ms: Sequence[float]) -> Timing:
    """Median and inter-quartile range of timed repeats."""
    if len(samples_ms) >= 2:
        q1, _, q3 = statistics.quantiles(samples_ms, n=4, method="inclusive")
    else:
        q1 = q3 = samples_ms[0]
    return Timing(statistics.median(samples_ms), q3 - q1, len(samples_ms))


def time_once(fn: Callable[[], object], device: torch.device) -> float:
    """Milliseconds one call takes: CUDA events on GPU (device time), perf_counter on CPU."""
    if device.type == "cuda":
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(stop)
    begin = time.perf_counter()
    fn()
    return (time.perf_counter() - begin) * 1000.0


def prefill_call(model: nn.Module, prompt: torch.Tensor) -> Callable[[], object]:
    """A prefill: one forward over the prompt (1, T) that builds the KV cache and returns last-token logits."""

    @torch.inference_mode()
    def run() -> object:
        return model(input_ids=prompt, use_cache=True, logits_to_keep=1)

    return run


@torch.no_grad()
def time_decode(model: nn.Module, prompt: torch.Tensor, n_new: int, device: torch.device) -> float:
    """Milliseconds per token of greedy decoding with the KV cache, after an untimed prefill of ``prompt``.

    The prefill is repeated (untimed) for every measurement so each repeat starts from the same cache state,
    without relying on cache cropping, whose semantics differ between transformers versions.
    """
    out = model(input_ids=prompt, use_cache=True, logits_to_keep=1)
    state = {"cache": out.past_key_values, "token": out.logits[:, -1].argmax(-1, keepdim=True)}  # token: (1, 1)

    def steps() -> None:
        for _ in range(n_new):
            step = model(input_ids=state["token"], past_key_values=state["cache"], use_cache=True)
            state["cache"] = step.past_key_values
            state["token"] = step.logits[:, -1].argmax(-1, keepdim=True)

    return time_once(steps, device) / n_new


def measure_latency(model: nn.Module, representatives: dict[str, Sequence[int]], *, seq: int, decode_tokens: int,
                    repeats: int, warmup: int, seed: int, progress: Callable[[int, int], None] | None = None,
                    should_stop: Callable[[], bool] = lambda: False) -> dict[str, dict]:
    """Prefill and decode latency of one variant per signature, with repeats interleaved across variants.

    Args:
        representatives: shape signature -> the removed layers of one variant with that signature.
        seq: prompt length (tokens, batch 1) of the prefill; decode_tokens: greedy steps timed (0: none).
        repeats, warmup: timed and untimed rounds; seed: of the random prompt.

    Returns:
        signature -> latency columns of a result row (or ``{"latency_error": text}`` when timing failed), or
        nothing when ``should_stop()`` turns true between rounds (Ctrl-C).
    """
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    vocab = model.get_output_embeddings().weight.shape[0]
    prompt = torch.randint(0, vocab, (1, seq), generator=gen).to(device)  # (1, T)
    samples = {sig: {"prefill": [], "decode": []} for sig in representatives}
    failed: dict[str, str] = {}
    rounds = warmup + repeats
    for round_idx in range(rounds):
        if should_stop():
            return {}
        for sig, removed in representatives.items():
            if sig in failed:
                continue
            try:
                prefill_ms, decode_ms = _time_variant(model, removed, prompt, decode_tokens)
            except Exception as exc:  # a latency failure is data: perplexity is still measured
                free_memory(device)
                failed[sig] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                continue
            if round_idx >= warmup:
                samples[sig]["prefill"].append(prefill_ms)
                samples[sig]["decode"].append(decode_ms)
        if progress is not None:
            progress(round_idx + 1, rounds)
    return {sig: ({"latency_error": failed[sig]} if sig in failed
                  else latency_columns(s, variant_key(representatives[sig]))) for sig, s in samples.items()}


def _time_variant(model: nn.Module, removed: Sequence[int], prompt: torch.Tensor,
                  decode_tokens: int) -> tuple[float, float]:
    """One prefill and (if asked) one decode timing of a variant, in ms and ms per token."""
    device = prompt.device
    with pruned(model, removed):
        prefill_ms = time_once(prefill_call(model, prompt), device)
        decode_ms = math.nan
        if decode_tokens:
            decode_ms = time_decode(model, prompt, decode_tokens, device)
    return prefill_ms, decode_ms


def latency_columns(samples: dict[str, list[float]], source_key: str) -> dict:
    """The latency columns of a result row from the timed samples of one variant (``source_key``)."""
    prefill = summarize(samples["prefill"])
    columns = {"prefill_ms": prefill.median_ms, "prefill_iqr_ms": prefill.iqr_ms, "prefill_repeats": prefill.repeats,
               "decode_ms_per_token": None, "decode_iqr_ms": None, "latency_from": source_key}
    if samples["decode"] and all(math.isfinite(x) for x in samples["decode"]):
        decode = summarize(samples["decode"])
        columns.update(decode_ms_per_token=decode.median_ms, decode_iqr_ms=decode.iqr_ms)
    return columns
