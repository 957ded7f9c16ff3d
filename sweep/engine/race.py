"""Racing (``--race``): exhaustive or combinatorial search that stops measuring hopeless variants early.

Every variant is measured on a first slice of the windows; then, per number of removed layers, the variants that
can no longer be among the ``--race-k`` best are eliminated (:func:`sweep.intervals.race_eliminated`: worse than
each of the k leaders of their size by a paired bootstrap interval at ``--race-level``), and the survivors go on to
the next slice, until they have seen the whole text. Each slice is one prefix-sharing trie pass over the survivors.

Example, 128 windows, batches of 8, ``--race-slices 1/16,1/8,1/4,1/2``: boundaries 16 (1/16 of 128 is 8, raised to
the 16-window floor), 32, 64, 128. Everything is measured on windows 0-15; survivors on 16-31, then 32-63, then
64-127. A slice starts at a multiple of the batch size, so its batches are exactly those of a full sweep and a
survivor's per-window losses, hence its perplexity, are bit for bit those of the full sweep.

Why paired intervals and not successive halving: halving drops a fixed fraction whatever the evidence, so two
variants within noise of each other are split by chance; the interval rule drops only variants that k others
beat on every resample of the windows seen, so near-ties survive to the end and are ranked by exact numbers. The
guarantee is statistical (a loss has no bound, so no finite slice rules out a comeback): a true top-k variant is
dropped only when it looks worse than *each* leader at 99 % on a sample of windows.

Every variant ends in the DB: survivors ``ok`` with their full-text numbers, dropped ones ``eliminated`` with the
numbers of the windows they saw (``n_windows``), rows between slices ``racing``. A stopped race resumes from the
stored per-window losses: each variant continues from the windows it has.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from sweep import Log, intervals, store
from sweep.config import SweepConfig, race_fractions
from sweep.plan import Removal, kept_layers, variant_key
from sweep.steps import n_removed

RACE_MIN_WINDOWS = 16
"""Fewest windows of the first slice: a bootstrap over fewer windows says little about the rest of the text."""
CHUNK_SECONDS = 30.0
"""Target evaluation time of one chunk (sub-trie) of a slice: rows reach the DB at least this often (roughly)."""
MAX_CHUNK = 4096
"""Most variants per chunk (a slice of few windows is quick per variant; the trie keeps W floats per variant)."""

Record = Callable[[list[Removal], list[dict]], None]


def race_boundaries(n_windows: int, fractions: Sequence[float], batch_size: int,
                    min_windows: int = RACE_MIN_WINDOWS) -> list[int]:
    """Window counts after which the race eliminates, ascending, the last being ``n_windows``.

    Each fraction of the windows is raised to ``min_windows`` and rounded up to a multiple of ``batch_size`` (so a
    slice's batches are those of the whole text); those reaching ``n_windows`` merge into the end.

    Example: 128 windows, [1/16, 1/8, 1/4, 1/2], batch 8 -> [16, 32, 64, 128].
    """
    counts = {_slice_windows(fraction, n_windows, batch_size, min_windows) for fraction in fractions}
    return sorted(c for c in counts if c < n_windows) + [n_windows]


def _slice_windows(fraction: float, n_windows: int, batch_size: int, min_windows: int = RACE_MIN_WINDOWS) -> int:
    """Windows of the slice ending at ``fraction`` of the text: at least ``min_windows``, in whole batches."""
    count = max(min_windows, math.ceil(fraction * n_windows))
    return math.ceil(count / batch_size) * batch_size


def no_race_line(n_windows: int, fractions: Sequence[float], batch_size: int, n_variants: int) -> str | None:
    """The line that says a race cannot eliminate anything, because the text is too short for a first slice with
    windows left after it; None when it can race.

    Example: 12 windows, [1/16, ...], batch 8: the first slice needs 16 windows, so all variants see the whole text.
    """
    first = _slice_windows(min(fractions), n_windows, batch_size)
    if first < n_windows:
        return None
    return (f"race: no racing: the text has {n_windows:,} windows and the first slice needs {first:,} with more after "
            f"it (at least {RACE_MIN_WINDOWS}, in whole batches of {batch_size}); measuring all {n_variants:,} "
            "variants on the whole text (more windows: a larger --max-tokens or a smaller --max-length)")


@dataclass
class Racer:
    """One race over ``todo``: what each variant has seen, its per-window losses, and who is still in."""

    cfg: SweepConfig
    worker: object
    db: store.Database
    setup: str
    record: Record
    log: Log = print
    seen: dict[str, int] = field(default_factory=dict)
    losses: dict[str, tuple[list[float], list[int]]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    alive: dict[str, Removal] = field(default_factory=dict)
    finished: int = 0
    """Variants that reached a final status (ok, diverged, eliminated, failed) in this run."""

    def load(self, todo: Sequence[Removal]) -> None:
        """Where each variant stands (resume): racing rows go on from their stored windows."""
        progress = store.race_progress(self.db, self.setup)
        for removed in todo:
            key = variant_key(removed)
            status, n_windows, seconds = progress.get(key, ("", 0, 0.0))
            if status in ("ok", "diverged", "eliminated"):
                continue
            self.alive[key] = removed
            self.seen[key] = n_windows if status == "racing" else 0
            self.seconds[key] = seconds if status == "racing" else 0.0
        racing = [k for k in self.alive if self.seen[k]]
        for key, (nll, tokens) in store.read_window_losses(self.db, self.setup, racing).items():
            self.losses[key] = (nll.tolist(), tokens.tolist())

    def run(self, todo: Sequence[Removal], should_stop: Callable[[], bool]) -> bool:
        """Race ``todo`` to the end, or until ``should_stop()``; True when every variant reached a final status."""
        self.load(todo)
        n_windows, fractions = self.worker.n_windows(), race_fractions(self.cfg.race_slices)
        bounds = race_boundaries(n_windows, fractions, self.worker.batch_size)
        cannot = no_race_line(n_windows, fractions, self.worker.batch_size, len(self.alive))
        if cannot:
            self.log(cannot)
        for stage, bound in enumerate(bounds, 1):
            if not self.measure_to(bound, n_windows, should_stop):
                return False
            if bound < n_windows:
                dropped = self.eliminate(bound, n_windows)
                self.log(f"race: {bound:,} of {n_windows:,} windows: {len(dropped):,} eliminated, "
                         f"{len(self.alive):,} still in (stage {stage} of {len(bounds)})")
        return True

    def measure_to(self, bound: int, n_windows: int, should_stop: Callable[[], bool]) -> bool:
        """Bring every variant still in to ``bound`` windows, a trie pass per chunk; False if stopped."""
        behind: dict[int, list[Removal]] = {}
        for key, removed in self.alive.items():
            if self.seen[key] < bound:
                behind.setdefault(self.seen[key], []).append(removed)
        n_layers = self.worker.n_layers
        for start, group in sorted(behind.items()):
            order = sorted(group, key=lambda removed: kept_layers(removed, n_layers))  # sub-tries share prefixes
            size, first = 8, 0
            while first < len(order):
                if should_stop():
                    return False
                stop = first + size if len(order) - (first + size) > 1 else len(order)  # no chunk of one: trie
                chunk = order[first:stop]
                begin = time.perf_counter()
                rows = self.worker.evaluate_many(chunk, (start, bound))
                per_variant = (time.perf_counter() - begin) / len(chunk)
                self.record(chunk, [self.merged(r, row, start, bound, n_windows) for r, row in zip(chunk, rows)])
                first = stop
                size = max(2, min(MAX_CHUNK, int(CHUNK_SECONDS / max(per_variant, 1e-4))))
        return True

    def merged(self, removed: Removal, row: dict, start: int, bound: int, n_windows: int) -> dict:
        """The row of a variant after windows 0..bound-1: its earlier windows' losses joined with this slice's."""
        key = variant_key(removed)
        if row["status"] == "failed":  # starts over on the next run
            self.alive.pop(key)
            self.finished += 1
            return row
        before_nll, before_tokens = self.losses.get(key, ([], []))
        nll = before_nll[:start] + list(row[store.WINDOW_NLL])
        tokens = before_tokens[:start] + list(row[store.WINDOW_TOKENS])
        self.seconds[key] = self.seconds.get(key, 0.0) + (row.get("eval_seconds") or 0.0)
        merged = self.worker.row_of_windows(removed, nll, tokens, self.seconds[key])
        self.seen[key] = bound
        if merged["status"] != "ok" or bound == n_windows:  # diverged or done: out of the race
            self.alive.pop(key)
            self.losses.pop(key, None)
            self.finished += 1
            return merged
        self.losses[key] = (nll, tokens)
        return {**merged, "status": "racing"}

    def eliminate(self, bound: int, n_windows: int) -> set[str]:
        """Drop the variants that can no longer be among the best k of their size (on windows 0..bound-1)."""
        groups: dict[int, list[str]] = {}
        for key, removed in self.alive.items():
            groups.setdefault(n_removed(removed), []).append(key)  # the n_removed column's size
        nll = {key: np.asarray(self.losses[key][0][:bound]) for key in self.alive}
        tokens = np.asarray(self.losses[next(iter(self.alive))][1][:bound]) if self.alive else np.zeros(0)
        dropped = intervals.race_eliminated(list(groups.values()), nll, tokens, self.cfg.race_k,
                                            self.cfg.race_level, self.cfg.resamples)
        reason = (f"eliminated by the race after {bound:,} of {n_windows:,} windows: worse than each of the "
                  f"{self.cfg.race_k} leaders of its size ({self.cfg.race_level:.0%} paired interval)")
        store.mark_eliminated(self.db, self.setup, sorted(dropped), reason)
        for key in dropped:
            self.alive.pop(key)
            self.losses.pop(key, None)
        self.finished += len(dropped)
        return dropped
