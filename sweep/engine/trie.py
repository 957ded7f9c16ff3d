"""Prefix sharing: evaluate many variants of one model as a trie over their kept-layer sequences.

Variants that keep the same leading layers compute the same residual stream up to the first difference, so
for each batch of windows the trie is walked depth-first, keeping the residual stream at each depth, and only
the layers below a branch are run again. Final norm + LM head + loss run once per variant (at its node).

Example, 3 layers, variants keeping [0,1,2] (baseline), [0,2], [1,2] and [0]::

    root (embeddings)
    ├── 0 ── 1 ── 2      baseline
    │    ├── 2           [0,2]   (shares layer 0 with the baseline)
    │    └── (end)       [0]     (its node is layer 0's output)
    └── 1 ── 2           [1,2]

Per-variant evaluation runs 3+2+2+1 = 8 layer calls; the trie runs 6. Exhaustive over L layers costs
2^L - 1 layer calls instead of L * 2^(L-1).

A sequence does not have to be increasing, and a step does not have to be a whole block (:mod:`sweep.steps`):
a repeated layer is a second node of the same layer, a swap a different order, a unit step (``3m``: layer 3
without its attention) a different child of the same depth, and a parallel group one node that adds its
members' updates (:class:`sweep.engine.adapters.StepRunner`).

Each layer is called exactly as the model calls it: its arguments are captured once per batch by
:func:`sweep.engine.adapters.capture_layer_calls` and replayed (see that function for why this is exact). The
capture forward runs layers 0..L-2 of the unpruned model anyway, so their outputs are kept and the trie's unpruned
path (0, 0-1, 0-1-2, ...) reuses them: exhaustive over L layers then costs 2^L - L layer calls plus the capture.

A sweep runs its variants as several tries (chunks committed as they finish; a search's generations; greedy's
rounds), each over the same windows. A :class:`CaptureCache` keeps each batch's capture for the next trie, so the
capture forward is paid once per batch of windows and not once per chunk: a single-layer sweep then costs the
same layer calls in six chunks as in one trie, since its variants share nothing but the unpruned prefix.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from sweep.engine import adapters
from sweep.engine.perplexity import Perplexity, scored_batches, scored_windows, window_nll
from sweep.steps import Par, Step, members


@dataclass
class Node:
    """A trie node: the variants whose step sequence ends here, and children by next step."""

    keys: list[str] = field(default_factory=list)
    children: dict[int | Step | Par, Node] = field(default_factory=dict)
    """Whole-block steps are keyed by their layer number (as kept-layer lists have them)."""


def _step(item: int | Step | Par) -> int | Step | Par:
    return item.layer if isinstance(item, Step) and item.branches == "am" else item


def _calls(step: int | Step | Par) -> int:
    return 1 if isinstance(step, int) else len(members(step))


def build_trie(kept_sequences: dict[str, Sequence[int | Step | Par]]) -> Node:
    """Trie over step sequences, e.g. ``{"": [0, 1, 2], "1": [0, 2], "r1": [0, 1, 1, 2]}``."""
    root = Node()
    for key, kept in kept_sequences.items():
        node = root
        for item in kept:
            node = node.children.setdefault(_step(item), Node())
        node.keys.append(key)
    return root


@dataclass
class CallCounts:
    """Work done, counted as it happens (the bench reports these): decoder layer calls (replays and the capture
    forward's layers) and LM head + loss calls (one per trie node holding variants, per batch of windows)."""

    layer_calls: int = 0
    head_calls: int = 0
    batches: int = 0

    def add(self, other: CallCounts) -> None:
        self.layer_calls += other.layer_calls
        self.head_calls += other.head_calls
        self.batches += other.batches


def layer_calls(root: Node) -> int:
    """Layer calls one batch costs (one per non-root node; a parallel group one per member)."""
    return sum(_calls(step) + layer_calls(child) for step, child in root.children.items())


def unpruned_prefix(root: Node, n_layers: int) -> int:
    """Nodes of the path 0, 0-1, 0-1-2, ... up to layer L-2: the layers the capture forward has run already."""
    depth, node = 0, root
    while depth < n_layers - 1 and depth in node.children:
        node, depth = node.children[depth], depth + 1
    return depth


CAPTURE_CACHE_BYTES = 1 << 30
"""What a CPU worker's :class:`CaptureCache` may hold (1 GiB: SmolLM2's 30-layer capture of 4,096 tokens is
0.28 GB). A GPU worker keeps none: its batch size is planned for one batch's trie cache in device memory, and
there the capture is a small share of a large chunk."""


def keeps_captures(device_type: str, n_layers: int, positions: int, hidden_size: int, element_size: int) -> bool:
    """Whether a worker keeps the capture of every batch of its text (what :class:`CaptureCache` holds: L - 1
    layer outputs and the embeddings, (B, T, H) each, per batch; ``positions`` is B x T summed over the batches),
    so that only its first trie pass pays the capture forward. :func:`sweep.engine.estimate` prices runs by it."""
    return n_layers * positions * hidden_size * element_size <= capture_budget(device_type)


def capture_budget(device_type: str) -> int:
    """Bytes of captures a worker on ``device_type`` keeps: :data:`CAPTURE_CACHE_BYTES` on CPU, none elsewhere."""
    return CAPTURE_CACHE_BYTES if device_type == "cpu" else 0


class CaptureCache:
    """Capture forwards (:func:`adapters.capture_layer_calls` with the outputs kept) of earlier trie passes, by
    batch of windows, least recently used first out once they pass ``budget_bytes``.

    Exact by construction: a capture is a function of the model (never mutated) and the batch's token ids, and a
    hit is checked against those ids. Example: chunks of 8, 6 and 17 single-layer variants over one batch of 8
    windows of a 30-layer model pay one capture (29 layer calls), not three (87).
    """

    def __init__(self, budget_bytes: int):
        self.budget_bytes = budget_bytes
        self.nbytes = 0
        self._entries: OrderedDict[tuple, tuple[torch.Tensor, adapters.LayerCalls, int]] = OrderedDict()

    def capture(self, model, input_ids: torch.Tensor, first_window: int) -> tuple[adapters.LayerCalls, bool]:
        """The capture of the batch ``input_ids`` (B, T) starting at scored window ``first_window``, and whether
        it was computed now (False: taken from the cache)."""
        key = (first_window, tuple(input_ids.shape))
        entry = self._entries.get(key)
        if entry is not None and torch.equal(entry[0], input_ids):
            self._entries.move_to_end(key)
            return entry[1], False
        calls = adapters.capture_layer_calls(model, input_ids, keep_outputs=True)
        self._keep(key, input_ids, calls)
        return calls, True

    def _keep(self, key: tuple, input_ids: torch.Tensor, calls: adapters.LayerCalls) -> None:
        self._drop(key)
        size = _nbytes(calls)
        if size > self.budget_bytes:
            return
        while self._entries and self.nbytes + size > self.budget_bytes:
            self._drop(next(iter(self._entries)))
        self._entries[key] = (input_ids, calls, size)
        self.nbytes += size

    def _drop(self, key: tuple) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.nbytes -= entry[2]

    def clear(self) -> None:
        """Free every capture (before an out-of-memory retry)."""
        self._entries.clear()
        self.nbytes = 0


def _tensors(value) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _tensors(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)


def _nbytes(calls: adapters.LayerCalls) -> int:
    """Bytes a capture holds: its tensors' storages, each counted once (layers share their masks and rotary
    tables)."""
    storages = {}
    for tensor in _tensors((calls.hidden, calls.outputs, calls.calls)):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


@torch.no_grad()
def trie_perplexities(model, kept_sequences: dict[str, Sequence[int]], head: Callable, token_ids: torch.Tensor,
                      max_length: int, stride: int, batch_size: int, window_range: tuple[int, int] | None = None,
                      counts: CallCounts | None = None,
                      captures: CaptureCache | None = None) -> dict[str, Perplexity]:
    """Perplexity of every variant, with the guide's windowing and weighting (as :func:`perplexity.perplexity`).

    Args:
        kept_sequences: variant key -> kept layers (ascending), or any step sequence (:func:`sweep.steps.steps_of`).
        head: a :class:`perplexity.HeadLoss`, or a logits function backbone output (B, t, H) -> logits (B, t, V).
        token_ids: (N,) tokens on the model's device.
        window_range: only these scored windows [first, stop) (default all): see :func:`perplexity.scored_batches`.
        counts: if given, layer and head calls are added to it.
        captures: if given, each batch's capture forward is taken from it when an earlier call made it, and kept
            there otherwise.

    Returns:
        Each variant's perplexity with its per-window losses.
    """
    root = build_trie(kept_sequences)
    run_step = adapters.StepRunner(model)
    finish = adapters.final_norm_fn(model)
    index = {key: i for i, key in enumerate(kept_sequences)}
    n_layers = len(adapters.decoder_layers(model))
    first, stop = window_range or (0, len(scored_windows(len(token_ids), max_length, stride)))
    # Per-window NLL stays on the device and is read once at the end: a read per leaf would stall the GPU
    # thousands of times per batch (one sync per variant per batch).
    nll = torch.zeros(len(index), max(stop - first, 0), dtype=torch.float64, device=token_ids.device)  # (V, W)
    window_tokens: list[int] = []
    counts = counts if counts is not None else CallCounts()
    for batch in scored_batches(token_ids, max_length, stride, batch_size, window_range):
        if captures is None:
            calls, computed = adapters.capture_layer_calls(model, batch.input_ids, keep_outputs=True), True
        else:
            calls, computed = captures.capture(model, batch.input_ids, batch.first_window)
        counts.batches += 1
        if computed:
            counts.layer_calls += n_layers - 1  # the capture forward runs every layer but the last
        columns = slice(batch.first_window - first, batch.first_window - first + len(batch.input_ids))
        window_tokens += [batch.n_loss] * len(batch.input_ids)

        def score(node: Node, hidden: torch.Tensor, depth: int = 0) -> None:
            """``depth``: this node is the unpruned prefix of layers 0..depth-1 (-1 once a layer was skipped)."""
            if node.keys:
                sums, n_scored = window_nll(head, finish(hidden), batch.input_ids, batch.n_targets,
                                            batch.first_window)
                counts.head_calls += 1
                weighted = batch.window_weighted(sums, n_scored)  # (B,)
                for key in node.keys:
                    nll[index[key], columns] = weighted
            for step, child in node.children.items():
                unpruned = depth >= 0 and step == depth
                if unpruned and depth < len(calls.outputs):  # the capture forward already ran layers 0..depth
                    score(child, calls.outputs[depth], depth + 1)
                else:
                    counts.layer_calls += _calls(step)
                    score(child, run_step(Step(step) if isinstance(step, int) else step, hidden, calls),
                          depth + 1 if unpruned else -1)

        score(root, calls.hidden)
    per_window = nll.tolist()
    return {key: Perplexity.of_windows(per_window[index[key]], window_tokens) for key in kept_sequences}
