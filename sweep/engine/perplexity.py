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
    """Sum of the guide's per-window ``loss * num_loss_tokens`` (nats): ``math.fsum(window_nll)`` when known."""
    n_tokens: int
    """Sum of the guide's ``num_loss_tokens``: predicted tokens, minus one per window."""
    window_nll: tuple[float, ...] | None = None
    """Each scored window's ``loss * num_loss_tokens`` (nats), in window order (:meth:`ScoredBatch.window_weighted`)."""
    window_tokens: tuple[int, ...] | None = None
    """Each scored window's ``num_loss_tokens``, in the same order (they add up to ``n_tokens``)."""

    @classmethod
    def of_windows(cls, window_nll: list[float], window_tokens: list[int]) -> Perplexity:
        """From per-window contributions: ``nll_sum`` is their exactly rounded sum (``math.fsum``), so it does not
        depend on how windows were batched or in which order their sums are added, and reading the stored
        per-window values back always gives the same ``nll_sum``."""
        return cls(math.fsum(window_nll), sum(window_tokens), tuple(window_nll), tuple(window_tokens))

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

    @property
    def name(self) -> str:
        return "compiled chunked" if self.compiled else "eager chunked"

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


BFLOAT16_PPL_BOUND = 0.01
"""Documented bound of |ppl(bfloat16) / ppl(float32) - 1| for one model and text (1 %): bfloat16 keeps 8 bits of
mantissa, so each weight and activation carries a relative error near 2^-9, which the loss averages over thousands
of tokens. Measured on CPU, tiny random-init GPT-2 and Llama, both heads, every variant: at most 3.1e-5
(tests/test_gpu_branches.py); trained weights have larger logits and drift more, so GPT-2 on a GPU is checked
against this bound by `make gpu-check`."""

VOCAB_TILE_BYTES = 16 << 20
"""Most bytes of the float32 logits tile (rows x vocabulary block) :class:`OnlineHeadLoss` holds at once: within
a server CPU's last-level cache, so the tile is written, reduced and overwritten without going to memory (and no
page is faulted)."""

VOCAB_BLOCK = 1024
"""Most vocabulary columns per tile. Narrow blocks make the product inefficient, wide ones push the tile out of
cache, which costs most when the product is cheap (a narrow model). Best of 5-15 runs over 2,040 rows (2-core Xeon,
AVX-512), blocks of 256 / 512 / 1,024 / 2,048 columns: DistilGPT-2's 768-wide head 0.81 / 0.73 / 0.73 / 0.71 s,
a 64-wide head 0.110 / 0.103 / 0.098 / 0.127 s."""


class OnlineHeadLoss:
    """Exact LM head + cross-entropy that never holds more than one (rows, vocabulary block) tile of logits.

    For each block of the vocabulary the tile ``hidden @ W_block.T`` (+ bias, soft-capping) is written into one
    reused float32 buffer, and three numbers per row are kept: the tile's maximum, the sum of ``exp(logit - max)``
    and the logit at the row's label column (gathered from that tile: the very float the plain head produces).
    After the last block the per-block maxima and sums combine into the log-sum-exp, and the label logit is taken
    from the block that owns the label. No (rows, vocab) tensor exists, so on CPU the tile stays in cache and no
    fresh memory is page-faulted per chunk (a (4,096, 50,257) float32 logits tensor is 0.8 GB).

    Example, vocab 5 in blocks of 2, one row with logits [1, 3 | 2, 0 | 5] and label 2::

        block 0: max 3, sum e^-2 + e^0 = 1.135    block 1: max 2, sum 1 + e^-2 = 1.135 (label: 2)
        block 2: max 5, sum 1
        log-sum-exp = 5 + log(1.135 e^-2 + 1.135 e^-3 + 1) = 5.1907;  NLL = 5.1907 - 2 = 3.1907

    Equal to ``F.cross_entropy`` of the full logits up to float rounding of the sums (tested in float32 and
    float64). Half-precision weights compute each tile in their dtype and upcast it to float32, like the chunked
    head; float64 weights keep everything in float64.
    """

    compiled = False
    name = "online log-sum-exp"

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, softcap: float | None = None,
                 tile_bytes: int = VOCAB_TILE_BYTES, max_block: int = VOCAB_BLOCK):
        self.weight, self.bias, self.softcap, self.tile_bytes = weight, bias, softcap, tile_bytes
        self.max_block = max_block
        self._buffers: tuple | None = None
        self._augmented: torch.Tensor | None = None

    def block_size(self, rows: int) -> int:
        """Vocabulary columns per tile: at most ``max_block``, and ``tile_bytes`` of float32 for ``rows`` rows; a
        multiple of 64 (>= 64). Example: 2,046 rows -> 1,024 columns (8 MB), 8,184 rows -> 512."""
        vocab = self.weight.shape[0]
        return max(64, min(vocab, self.max_block, self.tile_bytes // (4 * max(rows, 1)) // 64 * 64))

    @property
    def dtype(self) -> torch.dtype:
        """Of the tile and the statistics: float64 for float64 weights, else float32 (half precision upcast)."""
        return torch.float64 if self.weight.dtype == torch.float64 else torch.float32

    def _scratch(self, rows: int, block: int, n_blocks: int, device: torch.device):
        """The tile and the per-block statistics, reused across calls of one size (freed when the size changes)."""
        key = (rows, block, device)
        if self._buffers is None or self._buffers[0] != key:
            self._buffers = None  # free the old ones first
            self._buffers = (key, torch.empty(rows * block, dtype=self.dtype, device=device),
                             torch.empty(3, n_blocks, rows, dtype=self.dtype, device=device))
        return self._buffers[1], self._buffers[2]

    def _augmented_weight(self) -> torch.Tensor:
        """(V, H + 1 [+ 1]): the head's weight, its bias as a column, and a column of ones, made once. With hidden
        states augmented by [1, -shift], one product gives ``logits - shift``: see :meth:`__call__`."""
        if self._augmented is None:
            columns = [self.weight] + ([self.bias[:, None]] if self.bias is not None else [])
            self._augmented = torch.cat(columns + [torch.ones_like(self.weight[:, :1])], dim=1)
        return self._augmented

    def __call__(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """hidden (n, H) predicting labels (n,) -> per-position NLL (n,), float32 (float64 for float64 weights).

        Block 0 is reduced as described above. In float32 and float64 without soft-capping, every later block
        skips its maximum: it is shifted by block 0's maximum instead, folded into the product (hidden states
        [h, 1, -shift] against [W, b, 1]), so a block costs its product, one ``exp`` and one sum. A block whose
        exponentials overflow (a logit more than ~88 above that shift) is redone exactly; ones that underflow
        contribute less than 1e-38 of the sum, as in any log-sum-exp.
        """
        rows, vocab = hidden.shape[0], self.weight.shape[0]
        block = self.block_size(rows)
        n_blocks = -(-vocab // block)
        flat, stats = self._scratch(rows, block, n_blocks, hidden.device)
        maxes, sums, picked = stats[0], stats[1], stats[2]  # each (n_blocks, n)
        owner = torch.div(labels, block, rounding_mode="floor")  # (n,) block holding each label
        column = (labels - owner * block).unsqueeze(1)  # (n, 1) its column in that block
        native = hidden.dtype == self.weight.dtype == self.dtype  # products can be written into the tile
        folded = native and not self.softcap and n_blocks > 1
        for j, low in enumerate(range(0, vocab, block)):
            tile = flat[: rows * min(block, vocab - low)].view(rows, -1)  # (n, w) logits of this block
            if j == 0 or not folded:
                self._exact_block(hidden, low, tile, column, maxes[j], sums[j], picked[j], native, block)
                if folded:
                    shift = maxes[0].clone()  # (n,)
                    shifted_hidden = torch.cat([hidden] + ([torch.ones_like(hidden[:, :1])] if self.bias is not None
                                                           else []) + [-shift[:, None]], dim=1)  # (n, H + 1 [+ 1])
                continue
            torch.mm(shifted_hidden, self._augmented_weight()[low : low + tile.shape[1]].t(), out=tile)
            _label_logits(tile, column, picked[j], block)
            maxes[j].copy_(shift)
            torch.sum(tile.exp_(), 1, out=sums[j])
        if folded:
            picked[1:] += shift  # the label logits of shifted blocks, unshifted
            for j in torch.isinf(sums).any(dim=1).nonzero().flatten().tolist():  # overflowed: redo exactly
                low = j * block
                tile = flat[: rows * min(block, vocab - low)].view(rows, -1)
                self._exact_block(hidden, low, tile, column, maxes[j], sums[j], picked[j], native, block)
        top = maxes.amax(0)  # (n,)
        log_sum_exp = (sums * (maxes - top).exp()).sum(0).log() + top
        return log_sum_exp - picked.gather(0, owner.unsqueeze(0)).squeeze(0)

    def _exact_block(self, hidden: torch.Tensor, low: int, tile: torch.Tensor, column: torch.Tensor,
                     block_max: torch.Tensor, block_sum: torch.Tensor, label_logit: torch.Tensor,
                     native: bool, column_block: int) -> None:
        """Logits of the block starting at vocabulary entry ``low`` into ``tile`` (n, w), then its maximum, sum of
        exp(logit - maximum) and label logits (n,) each."""
        weight = self.weight[low : low + tile.shape[1]]  # (w, H)
        if native:
            torch.mm(hidden, weight.t(), out=tile)
        else:
            tile.copy_(hidden @ weight.t())
        if self.bias is not None:
            tile.add_(self.bias[low : low + tile.shape[1]])
        if self.softcap:
            tile.div_(self.softcap).tanh_().mul_(self.softcap)
        _label_logits(tile, column, label_logit, column_block)
        torch.amax(tile, 1, out=block_max)
        torch.sum(tile.sub_(block_max.unsqueeze(1)).exp_(), 1, out=block_sum)


def _label_logits(tile: torch.Tensor, column: torch.Tensor, out: torch.Tensor, block: int) -> None:
    """Each row's value at its label's column in this block (clamped into a narrower last block: rows whose label
    lies elsewhere are never read)."""
    width = tile.shape[1]
    torch.gather(tile, 1, column if width == block else column.clamp(max=width - 1), out=out.unsqueeze(1))


class FusedHeadLoss:
    """liger-kernel's fused linear + cross-entropy (Triton, CUDA only): the head + loss as one maintained kernel that
    never writes the whole logits either (``--head fused``, a GPU lever compared by ``make gpu-check``)."""

    compiled = False
    name = "fused (liger-kernel)"

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, loss_fn: Callable):
        self.weight, self.bias, self.loss_fn = weight, bias, loss_fn

    def __call__(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """hidden (n, H) predicting labels (n,) -> per-position NLL (n,), float32."""
        return self.loss_fn(self.weight, hidden, labels, self.bias).float()


def fused_head_loss(weight: torch.Tensor, bias: torch.Tensor | None) -> FusedHeadLoss | None:
    """A :class:`FusedHeadLoss` when liger-kernel is installed and the weights are on a CUDA device; else None."""
    if weight.device.type != "cuda":
        return None
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss  # optional: CUDA only
    except ImportError:
        return None
    return FusedHeadLoss(weight, bias, LigerFusedLinearCrossEntropyLoss(reduction="none"))


Head = Callable[[torch.Tensor], torch.Tensor] | HeadLoss | OnlineHeadLoss | FusedHeadLoss
"""What evaluation accepts as the head: a head + loss object, or a plain logits function (run eagerly)."""


class KLHeadLoss:
    """KL divergence to a reference model's next-token distribution, in place of the NLL (``--fitness kl``).

    Per position: ``KL(p_ref || q) = sum_v p_ref(v) (log p_ref(v) - log q(v))``, q the variant's softmax. The
    reference's log-probabilities are computed once per window (:func:`reference_log_probs`, the full model) and
    kept; :func:`window_nll` tells this head which window and positions each chunk of rows comes from (:meth:`at`),
    so the same per-window machinery (trie, slices, weighting) scores KL instead of NLL. Labels are ignored.
    """

    def __init__(self, logits_fn: Callable[[torch.Tensor], torch.Tensor], reference: dict[int, torch.Tensor]):
        self.logits_fn = logits_fn
        self.reference = reference
        """window index -> (T - 1, V) float32 log-probabilities at positions 0..T-2 (predicting labels 1..T-1)."""
        self._rows: tuple[int, int, int] | None = None

    name = "kl"

    def at(self, first_window: int, start: int, stop: int) -> None:
        """The next call's rows are positions start-1 .. stop-2 of the windows first_window, first_window + 1, ..."""
        self._rows = (first_window, start, stop)

    def __call__(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """hidden (B*c, H) -> per-row KL (B*c,), float32."""
        first, start, stop = self._rows
        n_windows = labels.numel() // (stop - start)
        ref = torch.cat([self.reference[first + i][start - 1 : stop - 1] for i in range(n_windows)])  # (B*c, V)
        log_q = F.log_softmax(self.logits_fn(hidden).float(), dim=-1)  # (B*c, V)
        return (ref.exp() * (ref - log_q)).sum(dim=-1)


@torch.no_grad()
def reference_log_probs(hidden_fn: Callable[[torch.Tensor], torch.Tensor],
                        logits_fn: Callable[[torch.Tensor], torch.Tensor], token_ids: torch.Tensor, max_length: int,
                        batch_size: int) -> dict[int, torch.Tensor]:
    """Each scored window's (T - 1, V) float32 log-probabilities under the model as it is now (the full model):
    the reference of :class:`KLHeadLoss`. Non-overlapping windows (the calibration's)."""
    reference = {}
    for batch in scored_batches(token_ids, max_length, max_length, batch_size):
        log_p = F.log_softmax(logits_fn(hidden_fn(batch.input_ids)[:, :-1]).float(), dim=-1)  # (B, T-1, V)
        for i in range(len(batch.input_ids)):
            reference[batch.first_window + i] = log_p[i].clone()
    return reference


def as_head_loss(head: Head) -> HeadLoss | OnlineHeadLoss | FusedHeadLoss:
    """A head + loss object: given ones as they are, a logits function wrapped in an eager :class:`HeadLoss`."""
    return head if isinstance(head, (HeadLoss, OnlineHeadLoss, FusedHeadLoss, KLHeadLoss)) else HeadLoss(head)


def window_nll(head: Head, hidden: torch.Tensor, input_ids: torch.Tensor, n_targets: int,
               first_window: int = 0) -> tuple[torch.Tensor, int]:
    """Summed NLL (float64, on the hidden states' device) of the scored tokens of a batch of equal-length windows.

    Args:
        head: a :class:`HeadLoss`, or a plain logits function hidden (B, t, H) -> logits (B, t, V) (run eagerly);
            applied to chunks of :func:`head_chunks` flattened to (rows, H), so the logits of the whole batch
            never exist at once.
        hidden: (B, T, H) final hidden states (after the final norm).
        input_ids: (B, T) token ids.
        n_targets: trailing positions of each window whose labels count.
        first_window: index of the batch's first window (a head that needs to know, :class:`KLHeadLoss`, is told).

    Returns:
        (per-window NLL sums of shape (B,), number of scored tokens per window). A label at position p is
        predicted by the logits at p-1, so position 0 is never scored. The sums stay on the device: reading
        them is a host-device sync, which callers do once per pass, not once per batch (the trie scores
        thousands of variants per batch).
    """
    head_loss = as_head_loss(head)
    batch, length = input_ids.shape
    first = max(1, length - n_targets)  # first scored label position
    sums = torch.zeros(batch, dtype=torch.float64, device=hidden.device)
    at = getattr(head_loss, "at", None)
    for start, stop in head_chunks(first, length, batch):
        if at is not None:
            at(first_window, start, stop)
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
    first_window: int
    """Index of the batch's first window among the scored windows of the text (:func:`scored_windows`)."""
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
        return self.window_weighted(window_sums, n_scored).sum(), self.n_loss * len(window_sums)

    def window_weighted(self, window_sums: torch.Tensor, n_scored: int) -> torch.Tensor:
        """Each window's share of :meth:`weighted`: (B,) ``window_sums / n_scored * n_loss``, weighing ``n_loss``
        tokens each. Per-window losses (stored with every result) are these values, so they add up to the NLL."""
        return window_sums / n_scored * self.n_loss


def scored_windows(n_tokens: int, max_length: int, stride: int) -> list[Window]:
    """The guide's windows that weigh something, in order: their index is the window index of per-window losses.

    A 1-token last window has ``n_loss`` 0: the guide weights it by 0 (its loss is NaN there), so it is skipped.
    """
    return [w for w in windows(n_tokens, max_length, stride) if w.n_targets > 1]


def scored_batches(token_ids: torch.Tensor, max_length: int, stride: int, batch_size: int,
                   window_range: tuple[int, int] | None = None) -> Iterator[ScoredBatch]:
    """The scored windows of ``token_ids`` (N,) (:func:`scored_windows`), batched by equal length.

    Args:
        window_range: [first, stop) window indices to evaluate (default: all). Batches are cut from ``first`` on,
            so a range starting at a multiple of ``batch_size`` gives exactly the batches of the whole text that
            fall in it, and the very same per-window numbers (racing measures the text in such slices).
    """
    scored = scored_windows(len(token_ids), max_length, stride)
    first, stop = window_range or (0, len(scored))
    for group in window_batches(scored[first:stop], batch_size):
        input_ids = torch.stack([token_ids[w.begin : w.end] for w in group])  # (B, T)
        yield ScoredBatch(input_ids, first, group[0].n_targets, group[0].n_targets - 1)
        first += len(group)


@torch.no_grad()
def perplexity(hidden_fn: Callable[[torch.Tensor], torch.Tensor],
               head: Head,
               token_ids: torch.Tensor, max_length: int, stride: int, batch_size: int,
               device: torch.device, window_range: tuple[int, int] | None = None) -> Perplexity:
    """Perplexity with semantics identical to the transformers guide's strided recipe (one variant, plain forward).

    Args:
        hidden_fn: input ids (B, T) -> final hidden states (B, T, H).
        head: a :class:`HeadLoss`, or a logits function hidden states -> logits.
        token_ids: (N,) the whole tokenized text (on any device).
        batch_size: windows per forward pass; windows of equal length are batched, so results do not depend on it
            beyond float rounding.
        window_range: only these scored windows (:func:`scored_batches`); default all.

    Returns:
        The perplexity with its per-window losses.
    """
    token_ids = token_ids.to(device)
    per_window, window_tokens = [], []  # device tensors, read once at the end
    for batch in scored_batches(token_ids, max_length, stride, batch_size, window_range):
        sums, n_scored = window_nll(head, hidden_fn(batch.input_ids), batch.input_ids, batch.n_targets,
                                    batch.first_window)
        per_window.append(batch.window_weighted(sums, n_scored))
        window_tokens += [batch.n_loss] * len(sums)
    nll = torch.cat(per_window).tolist() if per_window else []
    return Perplexity.of_windows(nll, window_tokens)


def bits_per_byte(nll_sum: float, n_tokens: int, tokens_per_byte: float) -> float:
    """Average NLL per token converted to bits per UTF-8 byte of the evaluated text."""
    if not n_tokens:
        return float("nan")
    return nll_sum / n_tokens * tokens_per_byte / math.log(2)
