"""Measurements of one model variant: windowed perplexity, parameters, latency.

Nothing here knows about layers or the database: functions take a model (already pruned by the caller)
and return numbers.
"""
from __future__ import annotations

import math
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

HEAD_ROWS = 4096
"""Token rows (windows x positions) per LM-head chunk: the logits held at once are at most (HEAD_ROWS, vocab),
whatever the batch size (GPT-2 in bfloat16: 4,096 x 50,257 x 2 bytes = 0.4 GB)."""


def head_chunks(first: int, length: int, batch: int) -> list[tuple[int, int]]:
    """Position ranges [start, stop) covering first..length-1 for the LM head, at most ``HEAD_ROWS`` token rows
    each (``batch`` windows x positions) and of sizes differing by at most one.

    Balanced sizes matter to ``torch.compile``: a 1-position tail chunk would be a separate graph (dynamo
    specialises sizes 0 and 1), and a handful of such graphs exhausts its recompile limit, after which it runs
    eagerly. Example: positions 1..1023 of 16 windows -> 4 chunks of 256, 256, 256 and 255 positions.
    """
    positions = length - first
    n_chunks = max(1, math.ceil(positions / max(1, HEAD_ROWS // batch)))  # so no chunk exceeds the budget
    base, extra = divmod(positions, n_chunks)
    bounds, start = [], first
    for i in range(n_chunks):
        stop = start + base + (1 if i < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


@dataclass(frozen=True)
class Window:
    """One evaluation window of the transformers guide's sliding-window recipe."""

    begin: int
    """First token of the window (inclusive)."""
    end: int
    """Last token of the window (exclusive)."""
    n_targets: int
    """Trailing positions whose labels count (``trg_len`` in the guide); earlier positions are context only."""


def windows(n_tokens: int, max_length: int, stride: int) -> list[Window]:
    """The windows of the guide "Perplexity of fixed-length models", in order.

    Example, 10 tokens, max_length 4, stride 2::

        begin 0, end 4, n_targets 4   -> scores tokens 1,2,3   (token 0 has no context)
        begin 2, end 6, n_targets 2   -> scores tokens 4,5     (2,3 are context)
        begin 4, end 8, n_targets 2   -> scores tokens 6,7
        begin 6, end 10, n_targets 2  -> scores tokens 8,9     (end reached: stop)
    """
    result = []
    prev_end = 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + max_length, n_tokens)
        result.append(Window(begin, end, end - prev_end))
        prev_end = end
        if end == n_tokens:
            break
    return result


@dataclass(frozen=True)
class Perplexity:
    nll_sum: float
    """Sum of the guide's per-window ``loss * num_loss_tokens`` (nats)."""
    n_tokens: int
    """Sum of the guide's ``num_loss_tokens``: predicted tokens, minus one per window."""

    @property
    def ppl(self) -> float:
        return math.exp(self.nll_sum / self.n_tokens) if self.n_tokens else float("nan")


class HeadLoss:
    """LM head + cross-entropy for a chunk of positions, optionally through ``torch.compile``.

    Eager, the head writes (B, c, V) logits, ``.float()`` copies them to float32, and cross-entropy reads them
    twice more. Compiled (inductor), the upcast, log-sum-exp and label gather fuse into one pass over the head's
    output, so no float32 copy of the logits exists and the loss still accumulates in float32. On a GPU the head +
    loss is the largest single cost of a variant after its layers (GPT-2: 50,257-way head), so the trie engine
    compiles it there by default.

    A compilation failure (no C compiler, an unsupported op) falls back to eager with a warning: results are the
    same, only slower. Out-of-memory errors are raised as usual so callers can retry with a smaller batch.
    """

    def __init__(self, logits_fn: Callable[[torch.Tensor], torch.Tensor], compiled: bool = False):
        self.logits_fn = logits_fn
        self.compiled = compiled
        self._compiled_nll = torch.compile(self._nll, dynamic=True) if compiled else None

    def _nll(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """hidden (B, c, H) predicting labels (B, c) -> per-position NLL (B, c), float32."""
        logits = self.logits_fn(hidden).float()  # (B, c, V)
        # Flattened (B*c, V) rows: several times faster on CPU than class-dim-second (B, V, c).
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none")
        return nll.view(labels.shape)

    def __call__(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self._compiled_nll is not None:
            try:
                return self._compiled_nll(hidden, labels)
            except torch.OutOfMemoryError:
                raise
            except Exception as exc:  # noqa: BLE001 - any compiler failure: eager gives the same numbers
                if _is_device_error(exc):
                    raise  # a failing GPU, not a failing compiler: the caller's error handling decides
                warnings.warn(f"torch.compile of the LM head + loss failed ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0][:200] if str(exc) else ''}); using eager", stacklevel=2)
                self._compiled_nll, self.compiled = None, False
        return self._nll(hidden, labels)


STICKY_ERRORS = ("device-side assert", "illegal memory access", "unspecified launch failure",
                 "misaligned address", "CUDA error: an illegal instruction", "uncorrectable ECC error")
"""CUDA errors after which the process's CUDA context is unusable: only a new process recovers."""


def is_sticky_error(exc: BaseException) -> bool:
    """A sticky CUDA error (see ``STICKY_ERRORS``): the worker process must be replaced."""
    return isinstance(exc, RuntimeError) and any(s in str(exc) for s in STICKY_ERRORS)


def _is_device_error(exc: BaseException) -> bool:
    """A runtime error of the device itself (a sticky one, or any CUDA error), which eager would hit too."""
    accelerator_error = getattr(torch, "AcceleratorError", ())
    return isinstance(exc, accelerator_error) or is_sticky_error(exc) or "CUDA error" in str(exc)


def window_nll(head: Callable[[torch.Tensor], torch.Tensor] | HeadLoss, hidden: torch.Tensor,
               input_ids: torch.Tensor, n_targets: int) -> tuple[torch.Tensor, int]:
    """Summed NLL (float64, on the hidden states' device) of the scored tokens of a batch of equal-length windows.

    Args:
        head: a :class:`HeadLoss`, or a plain logits function hidden (B, t, H) -> logits (B, t, V) (run eagerly);
            applied to chunks of :func:`head_chunks` flattened to (rows, H), so the logits of the whole batch
            never exist at once.
        hidden: (B, T, H) final hidden states (after the final norm).
        input_ids: (B, T) token ids.
        n_targets: trailing positions of each window whose labels count.

    Returns:
        (per-window NLL sums of shape (B,), number of scored tokens per window). A label at position p is
        predicted by the logits at p-1, so position 0 is never scored. The sums stay on the device: reading
        them is a host-device sync, which callers do once per pass, not once per batch (the trie scores
        thousands of variants per batch).
    """
    head_loss = head if isinstance(head, HeadLoss) else HeadLoss(head)
    batch, length = input_ids.shape
    first = max(1, length - n_targets)  # first scored label position
    sums = torch.zeros(batch, dtype=torch.float64, device=hidden.device)
    for start, stop in head_chunks(first, length, batch):
        # positions start-1 .. stop-2 predict labels start .. stop-1; flattened to (B*c, H) rows so the compiled
        # head sees one dynamic size (rows), not two
        rows = hidden[:, start - 1 : stop - 1].reshape(-1, hidden.shape[-1])
        nll = head_loss(rows, input_ids[:, start:stop].reshape(-1))  # (B*c,)
        sums += nll.view(batch, stop - start).sum(dim=1, dtype=torch.float64)
    return sums, length - first


@torch.no_grad()
def perplexity(hidden_fn: Callable[[torch.Tensor], torch.Tensor],
               head: Callable[[torch.Tensor], torch.Tensor] | HeadLoss,
               token_ids: torch.Tensor, max_length: int, stride: int, batch_size: int,
               device: torch.device) -> Perplexity:
    """Perplexity with semantics identical to the transformers guide's strided recipe.

    The guide weights each window's mean loss by ``num_valid_tokens - 1`` (it subtracts one per window for the
    label shift). For the first window and whenever stride == max_length that is exactly the number of scored
    tokens; for later overlapping windows it is one fewer than the ``trg_len`` tokens actually scored. We
    reproduce that weighting so numbers match the guide (and published tables) exactly.

    Args:
        hidden_fn: input ids (B, T) -> final hidden states (B, T, H).
        head: a :class:`HeadLoss`, or a logits function hidden states -> logits.
        token_ids: (N,) the whole tokenized text (on any device).
        batch_size: windows per forward pass; windows of equal length are batched, so results do not depend on it
            beyond float rounding.
    """
    token_ids = token_ids.to(device)
    nll_sum, n_tokens = torch.zeros((), dtype=torch.float64, device=device), 0  # read once, at the end
    for group in window_batches(windows(len(token_ids), max_length, stride), batch_size):
        n_loss = group[0].n_targets - 1  # the guide's num_loss_tokens
        if n_loss == 0:
            continue  # a 1-token last window: the guide weights it by 0 (its loss is NaN there)
        input_ids = torch.stack([token_ids[w.begin : w.end] for w in group])  # (B, T)
        hidden = hidden_fn(input_ids)
        sums, n_scored = window_nll(head, hidden, input_ids, group[0].n_targets)
        nll_sum += sums.sum() / n_scored * n_loss
        n_tokens += n_loss * len(group)
    return Perplexity(float(nll_sum), n_tokens)


def window_batches(all_windows: list[Window], batch_size: int) -> list[list[Window]]:
    """Consecutive windows with the same length and target count, at most ``batch_size`` per group."""
    groups: list[list[Window]] = []
    for w in all_windows:
        last = groups[-1] if groups else None
        if last and len(last) < batch_size and (last[0].end - last[0].begin, last[0].n_targets) == (
            w.end - w.begin, w.n_targets
        ):
            last.append(w)
        else:
            groups.append([w])
    return groups


def bits_per_byte(nll_sum: float, n_tokens: int, tokens_per_byte: float) -> float:
    """Average NLL per token converted to bits per UTF-8 byte of the evaluated text."""
    if not n_tokens:
        return float("nan")
    return nll_sum / n_tokens * tokens_per_byte / math.log(2)


# ---------------------------------------------------------------------------------------------- latency


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


# ---------------------------------------------------------------------------------------------- batching

MEMORY_HEADROOM = 0.85
"""Fraction of free GPU memory a batch may plan to use (the allocator fragments; other tenants grow)."""
MAX_AUTO_BATCH = 64
"""Upper bound of an automatic batch: beyond it GPUs gain little and a failure loses more work."""


def batch_size_for(free_bytes: int, per_window_bytes: int, n_windows: int, cap: int = MAX_AUTO_BATCH) -> int:
    """Largest batch of windows whose planned memory fits in ``MEMORY_HEADROOM`` of the free memory.

    ``per_window_bytes`` is what one window costs at peak: its transient activations (measured) plus its share of
    the trie cache, (depth + 1) x T x H residual streams. Example: 40 GiB free, 1.5 GiB per window, 62 windows
    -> floor(0.85 * 40 / 1.5) = 22. Never below 1 (an OOM then becomes a failed row, not a crash), never above
    ``cap`` or the number of windows.
    """
    if per_window_bytes <= 0:
        return max(1, min(cap, n_windows))
    fits = int(MEMORY_HEADROOM * free_bytes // per_window_bytes)
    return max(1, min(fits, cap, max(n_windows, 1)))
