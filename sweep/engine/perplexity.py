"""Windowed perplexity, as the transformers guide "Perplexity of fixed-length models" computes it.

Nothing here knows about layers or the database: the windowing and weighting rule (:func:`scored_batches`,
:meth:`ScoredBatch.weighted`), the chunked LM head + loss (:class:`HeadLoss`, :func:`window_nll`), and the plain
per-variant evaluation (:func:`perplexity`). The trie engine (:mod:`sweep.engine.trie`) uses the same rule.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sweep.engine.device import is_device_error

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
                if is_device_error(exc):
                    raise  # a failing GPU, not a failing compiler: the caller's error handling decides
                warnings.warn(f"torch.compile of the LM head + loss failed ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0][:200] if str(exc) else ''}); using eager", stacklevel=2)
                self._compiled_nll, self.compiled = None, False
        return self._nll(hidden, labels)


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


@dataclass(frozen=True)
class ScoredBatch:
    """Equal-length windows evaluated together, and how much their loss weighs."""

    input_ids: torch.Tensor
    """(B, T) token ids of the windows."""
    n_targets: int
    """Trailing positions of each window whose labels are scored (the guide's ``trg_len``)."""
    n_loss: int
    """The guide's ``num_loss_tokens`` per window: ``n_targets - 1`` (it subtracts one for the label shift)."""

    def weighted(self, window_sums: torch.Tensor, n_scored: int) -> tuple[torch.Tensor, int]:
        """The guide's weighting of this batch: (NLL to add, tokens to add).

        Each window's mean loss (its NLL sum over the ``n_scored`` tokens it scores) is weighted by ``n_loss``.
        For the first window and whenever stride == max_length, ``n_loss`` equals the tokens scored; for later
        overlapping windows it is one fewer, which we reproduce so numbers match the guide and published tables.

        Example, stride 2, max_length 4: a later window scores its last 2 tokens with NLL sum 3.0 -> mean 1.5,
        weighted by n_loss = 1 -> adds 1.5 nats and 1 token.

        Args:
            window_sums: (B,) NLL sums of the windows (on the device; not read here, so no host sync).
        """
        return window_sums.sum() / n_scored * self.n_loss, self.n_loss * len(window_sums)


def scored_batches(token_ids: torch.Tensor, max_length: int, stride: int,
                   batch_size: int) -> Iterator[ScoredBatch]:
    """The guide's windows of ``token_ids`` (N,), batched by equal length, skipping those that weigh nothing.

    A 1-token last window has ``n_loss`` 0: the guide weights it by 0 (its loss is NaN there), so it is skipped.
    """
    for group in window_batches(windows(len(token_ids), max_length, stride), batch_size):
        n_loss = group[0].n_targets - 1
        if n_loss == 0:
            continue
        input_ids = torch.stack([token_ids[w.begin : w.end] for w in group])  # (B, T)
        yield ScoredBatch(input_ids, group[0].n_targets, n_loss)


@torch.no_grad()
def perplexity(hidden_fn: Callable[[torch.Tensor], torch.Tensor],
               head: Callable[[torch.Tensor], torch.Tensor] | HeadLoss,
               token_ids: torch.Tensor, max_length: int, stride: int, batch_size: int,
               device: torch.device) -> Perplexity:
    """Perplexity with semantics identical to the transformers guide's strided recipe (one variant, plain forward).

    Args:
        hidden_fn: input ids (B, T) -> final hidden states (B, T, H).
        head: a :class:`HeadLoss`, or a logits function hidden states -> logits.
        token_ids: (N,) the whole tokenized text (on any device).
        batch_size: windows per forward pass; windows of equal length are batched, so results do not depend on it
            beyond float rounding.
    """
    token_ids = token_ids.to(device)
    nll_sum, n_tokens = torch.zeros((), dtype=torch.float64, device=device), 0  # read once, at the end
    for batch in scored_batches(token_ids, max_length, stride, batch_size):
        sums, n_scored = window_nll(head, hidden_fn(batch.input_ids), batch.input_ids, batch.n_targets)
        nll, tokens = batch.weighted(sums, n_scored)
        nll_sum += nll
        n_tokens += tokens
    return Perplexity(float(nll_sum), n_tokens)


def bits_per_byte(nll_sum: float, n_tokens: int, tokens_per_byte: float) -> float:
    """Average NLL per token converted to bits per UTF-8 byte of the evaluated text."""
    if not n_tokens:
        return float("nan")
    return nll_sum / n_tokens * tokens_per_byte / math.log(2)
