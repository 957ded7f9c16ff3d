"""Which differences are real: paired bootstrap intervals over evaluation windows. Numpy, no torch, no SQL (stored
per-window losses are read, and intervals written, through :mod:`sweep.store`).

Every variant of a setup is measured on the same windows of the same text, so two variants' perplexities are
*paired*: a window that is hard for one is usually hard for the other. Resampling windows with replacement and
recomputing both perplexities on the same resample gives the distribution of their ratio, which is far tighter
than comparing two perplexities with independent error bars.

Inputs are per-window quantities (stored with each result in the table ``window_losses``): for window w, ``nll[w]``
is its contribution to the variant's NLL sum (the guide's weighting, so ``nll.sum() == nll_sum``) and
``tokens[w]`` its contribution to the token count (the same for every variant of a setup). A resample is a vector
of counts c (how often each window is drawn, summing to W), and on it::

    ppl(v) = exp((c · nll_v) / (c · tokens))
    change(v vs b) = ppl(v) / ppl(b) - 1 = exp((c · (nll_v - nll_b)) / (c · tokens)) - 1

Example, 3 windows of 100 tokens, nll_b = [200, 260, 240], nll_v = [210, 265, 250]: on the full text
change = exp((25) / 300) - 1 = +8.7 %; every resample has v worse on each window drawn, so the whole interval is
above 0 — a real difference even though v's windows vary far more (200-265) than the change itself.

The interval is the percentile interval of the change over :data:`RESAMPLES` seeded resamples: the same windows are
drawn for every variant of a setup, so intervals are reproducible and comparable.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from sweep import store
from sweep.errors import StoreError

RESAMPLES = 2000
"""Bootstrap resamples (the default of ``--resamples``). The 2.5 % and 97.5 % quantiles then rest on 50 resamples each side: their Monte Carlo
error is a few percent of the interval's width, well below what separates "real" from "within noise", while one
setup of 4,096 variants takes about a second."""
SEED = 0
"""Seed of the resampled windows (part of nothing: intervals are recomputed from the stored per-window losses)."""
LEVEL = 0.95
"""Coverage of the intervals."""
VARIANT_CHUNK = 1024
"""Variants per block when computing many intervals at once: bounds memory to RESAMPLES x VARIANT_CHUNK floats."""


def resample_counts(n_windows: int, resamples: int = RESAMPLES, seed: int = SEED) -> np.ndarray:
    """(resamples, n_windows) counts: how often each window is drawn in each bootstrap resample (rows sum to W)."""
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n_windows, size=(resamples, n_windows))
    counts = np.zeros((resamples, n_windows), dtype=np.float64)
    np.add.at(counts, (np.arange(resamples)[:, None], draws), 1.0)
    return counts


@dataclass(frozen=True)
class Interval:
    """A change in percent with its bootstrap interval: ``change`` on the full text, ``[low, high]`` around it."""

    change: float
    low: float
    high: float

    @property
    def excludes_zero(self) -> bool:
        """The difference is real at this level: the whole interval is on one side of 0."""
        return self.low > 0 or self.high < 0


def change_pct(value, base):
    """The change of ``value`` against ``base`` in percent: ``change_pct(12.0, 10.0) == 20.0`` (floats, arrays or
    Series alike). The point the intervals bracket; the view's ``*_change_pct`` columns state the same rule in SQL
    (``store/schema.py``; ``tests/test_runner.py`` checks that they agree)."""
    return 100.0 * (value / base - 1.0)


def _quantiles(samples: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray]:
    tail = (1.0 - level) / 2
    return np.quantile(samples, tail, axis=0), np.quantile(samples, 1.0 - tail, axis=0)


def change_intervals(nll: np.ndarray, tokens: np.ndarray, reference: np.ndarray, resamples: int = RESAMPLES,
                     seed: int = SEED, level: float = LEVEL) -> list[Interval]:
    """The change in perplexity (%) of each variant against ``reference``, with its paired bootstrap interval.

    Args:
        nll: (V, W) per-window NLL of V variants (rows may contain NaN for a diverged variant: its interval is NaN).
        tokens: (W,) per-window token counts.
        reference: (W,) per-window NLL of the variant compared against (the baseline).

    Returns:
        One :class:`Interval` per row of ``nll``, in percent.
    """
    nll = np.atleast_2d(np.asarray(nll, dtype=np.float64))
    tokens = np.asarray(tokens, dtype=np.float64)
    deltas = nll - np.asarray(reference, dtype=np.float64)[None, :]  # (V, W)
    counts = resample_counts(len(tokens), resamples, seed)  # (B, W)
    resampled_tokens = counts @ tokens  # (B,)
    full = 100.0 * np.expm1(deltas.sum(axis=1) / tokens.sum())  # (V,)
    intervals: list[Interval] = []
    for start in range(0, len(deltas), VARIANT_CHUNK):
        block = deltas[start : start + VARIANT_CHUNK]  # (v, W)
        samples = 100.0 * np.expm1((counts @ block.T) / resampled_tokens[:, None])  # (B, v)
        low, high = _quantiles(samples, level)
        intervals += [Interval(float(c), float(lo), float(hi)) for c, lo, hi in
                      zip(full[start : start + VARIANT_CHUNK], low, high)]
    return intervals


def difference_interval(nll_a: Sequence[float], nll_b: Sequence[float], tokens: Sequence[float],
                        resamples: int = RESAMPLES, seed: int = SEED, level: float = LEVEL) -> Interval:
    """How much higher variant a's perplexity is than b's (%), with its paired bootstrap interval.

    ``excludes_zero`` False means a and b are indistinguishable on this text at this level.
    """
    return change_intervals(np.asarray(nll_a)[None, :], tokens, np.asarray(nll_b), resamples, seed, level)[0]


def ranked_ties(keys: Sequence[str], nll: np.ndarray, tokens: np.ndarray, resamples: int = RESAMPLES,
                seed: int = SEED, level: float = LEVEL) -> list[tuple[str, str, Interval]]:
    """Neighbours in a ranking (best first) whose difference is within noise: (better, worse, their interval).

    Example: single removals ranked 3, 2, 1 by perplexity, where 3 and 2 differ by +0.4 % with interval
    [-0.2, +1.0] and 2 and 1 by +30 % with [+25, +35]: returns [("3", "2", Interval(0.4, -0.2, 1.0))].

    Args:
        keys: variant keys in ranking order; nll: (V, W) their per-window NLL in the same order.
    """
    ties = []
    for i in range(len(keys) - 1):
        interval = difference_interval(nll[i + 1], nll[i], tokens, resamples, seed, level)
        if not interval.excludes_zero and math.isfinite(interval.change):
            ties.append((keys[i], keys[i + 1], interval))
    return ties


def race_eliminated(groups: Sequence[Sequence[str]], nll: dict[str, np.ndarray], tokens: np.ndarray, keep: int,
                    level: float, resamples: int = RESAMPLES, seed: int = SEED) -> set[str]:
    """The variants a race drops: in each group (one number of removed layers), those that cannot still be among its
    ``keep`` best, judged on the windows measured so far.

    Rule: the ``keep`` variants with the lowest NLL so far lead; any other variant is dropped when its paired
    interval (at ``level``) against *each* leader lies entirely above 0, i.e. ``keep`` variants are each really
    better than it. A variant within noise of even one leader stays, so near-ties reach the whole text and are
    ranked by their exact perplexities. Groups of at most ``keep`` variants lose nothing.

    Example, keep 1, three variants of one size on 20 windows: a (leader), b +0.1 % [-0.2, +0.4] against a,
    c +5 % [+4.2, +5.9]: c is dropped, b stays (it may still beat a on the rest of the text).

    Args:
        groups: variant keys, one list per number of removed layers.
        nll: key -> (w,) per-window NLL on the same first w windows; tokens: (w,) their token counts.
    """
    dropped: set[str] = set()
    for keys in groups:
        if len(keys) <= keep:
            continue
        matrix = np.stack([nll[k] for k in keys])  # (V, w)
        leaders = sorted(range(len(keys)), key=lambda i: (matrix[i].sum(), keys[i]))[:keep]
        beaten = np.ones(len(keys), dtype=bool)
        for leader in leaders:
            lows = np.array([i.low for i in change_intervals(matrix, tokens, matrix[leader], resamples, seed, level)])
            beaten &= lows > 0  # NaN (never for measured rows) compares False: kept
        beaten[leaders] = False
        dropped |= {keys[i] for i in np.flatnonzero(beaten)}
    return dropped


# ---------------------------------------------------------------------------------------------- stored results


def refresh_intervals(db: store.Database, setup: str, resamples: int = RESAMPLES) -> int:
    """Give every ``ok`` variant of ``setup`` measured on the baseline's windows the interval of its perplexity
    change (table ``ppl_intervals``, shown by the view), where it is missing or stale; returns how many were
    computed. Nothing happens without an ``ok`` baseline with per-window losses."""
    baseline_at, missing = store.intervals_missing(db, setup, resamples)
    if baseline_at is None or not missing:
        return 0
    losses = store.read_window_losses(db, setup, [*missing, ""])
    if "" not in losses:
        return 0
    base_nll, tokens = losses[""]
    keys = [k for k in missing if k in losses and len(losses[k][0]) == len(base_nll)]
    if not keys:
        return 0
    found = change_intervals(np.stack([losses[k][0] for k in keys]), tokens, base_nll, resamples)
    store.record_intervals(db, setup, baseline_at, [
        {"removed": k, "change_pct": i.change, "low_pct": i.low, "high_pct": i.high, "level": LEVEL,
         "resamples": resamples, "seed": SEED, "measured_at": missing[k]} for k, i in zip(keys, found)])
    return len(keys)


def compare_variants(db: store.Database | str, setup: str, a: str, b: str) -> Interval:
    """How much higher variant ``a``'s perplexity is than ``b``'s in ``setup`` (%), with its paired bootstrap
    interval over the stored per-window losses (:func:`difference_interval`).

    Raises:
        StoreError: a variant without per-window losses, or the two measured on different windows.
    """
    losses = store.read_window_losses(db, setup, [a, b])
    for key in (a, b):
        if key not in losses:
            raise StoreError(f"variant {key!r} of setup {setup} has no per-window losses (not measured, failed, "
                             "or measured before schema version 4)")
    (nll_a, tokens), (nll_b, tokens_b) = losses[a], losses[b]
    if len(nll_a) != len(nll_b) or not np.array_equal(tokens, tokens_b):
        raise StoreError(f"variants {a!r} and {b!r} were not measured on the same windows")
    return difference_interval(nll_a, nll_b, tokens)
