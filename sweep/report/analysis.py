"""Numbers behind the report's figures and findings, computed from one setup's ``results_vs_baseline`` rows.

Pure pandas over the DataFrame that :func:`sweep.load_results` returns: no torch, no SQL, no plotting. The
figures (:mod:`sweep.report.figures`) and the findings notes (:mod:`sweep.report.findings`) both read these
tables, so a sentence in the notes and the bar it describes can never disagree.

"Measured" below means ``status == "ok"`` with a finite perplexity; diverged (NaN/inf) and failed variants are
left out of every table here and counted by :func:`excluded_counts` so captions can say how many were dropped.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from sweep import intervals, ranking
from sweep.plan import parse_key


def measured(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows with ``status == "ok"`` and a finite perplexity."""
    if frame.empty:
        return frame
    ppl = pd.to_numeric(frame["ppl"], errors="coerce")
    return frame[(frame["status"] == "ok") & np.isfinite(ppl)]


def excluded_counts(frame: pd.DataFrame, n_removed: int | None = None) -> dict[str, int]:
    """How many variants (of size ``n_removed``, or all but the baseline) are diverged or failed.

    ``{"diverged": 1, "failed": 2}``; statuses with no variant are left out.
    """
    if frame.empty:
        return {}
    rows = frame[frame["n_removed"] == n_removed] if n_removed is not None else frame[frame["n_removed"] >= 1]
    unmeasured = rows.drop(measured(rows).index)
    statuses = unmeasured["status"].where(unmeasured["status"] != "ok", "diverged")  # ok but NaN ppl: diverged
    return {s: int(n) for s, n in statuses.value_counts().sort_index().items()}


def baseline_ppl(frame: pd.DataFrame) -> float | None:
    """Perplexity of the measured baseline (``removed == ""``), or None."""
    base = measured(frame)
    base = base[base["removed"] == ""] if not base.empty else base
    return float(base["ppl"].iloc[0]) if not base.empty else None


def change_pct(frame: pd.DataFrame) -> pd.Series:
    """Perplexity change (%) of each row against the measured baseline: ``100 * (ppl / baseline - 1)``.

    The view's ``ppl_change_pct``, recomputed so that hand-made rows without it work too. NaN without a baseline.
    """
    base = baseline_ppl(frame)
    ppl = pd.to_numeric(frame["ppl"], errors="coerce").astype(float)
    return intervals.change_pct(ppl, base) if base is not None else ppl * math.nan


def single_changes(frame: pd.DataFrame) -> pd.Series:
    """Perplexity change (%) of every measured single-layer removal, indexed by layer, in layer order."""
    singles = measured(frame)
    singles = singles[singles["n_removed"] == 1] if not singles.empty else singles
    if singles.empty or baseline_ppl(frame) is None:
        return pd.Series(dtype=float, name="ppl_change_pct")
    layers = [parse_key(k)[0] for k in singles["removed"]]
    return pd.Series(change_pct(frame).loc[singles.index].to_numpy(), index=layers,
                     name="ppl_change_pct").sort_index()


CRITICAL_FACTOR = 5.0
"""A single layer is critical when its change is at least this many times the median single change..."""
CRITICAL_MIN_PCT = 10.0
"""... and at least this many percent (when most removals are free, a +2 % layer is not critical)."""


def critical_layers(frame: pd.DataFrame, most: int = 3) -> list[int]:
    """The layers whose single removal costs at least ``CRITICAL_FACTOR`` × the median single change.

    At most ``most``, largest change first; when none stands out that much, the most harmful layer alone.
    The threshold is ``max(CRITICAL_FACTOR × median, CRITICAL_MIN_PCT)``.
    Example: changes {0: +2,900 %, 1: +20 %, 2: +25 %, 3: +150 %, 4: +18 %}: median 20 %, threshold 100 %,
    critical = [0, 3].
    """
    changes = single_changes(frame).sort_values(ascending=False, kind="mergesort")
    if changes.empty:
        return []
    threshold = max(CRITICAL_FACTOR * float(np.median(changes)), CRITICAL_MIN_PCT)
    critical = [int(layer) for layer, change in changes.items() if change >= threshold]
    return critical[:most] or [int(changes.index[0])]


def pair_interactions(frame: pd.DataFrame) -> pd.DataFrame:
    """Each measured pair removal (i, j) with its change and its interaction with the two single removals.

    ``interaction = change(i, j) - (change(i) + change(j))`` in percentage points: 0 when the two removals add
    up, positive when removing both hurts more than the sum (the layers back each other up), negative when it
    hurts less (they do redundant work). Pairs whose singles were not both measured get NaN.

    Example: baseline ppl 25, ppl without layer 1 is 30 (+20 %), without layer 3 is 40 (+60 %), without both
    is 80 (+220 %): interaction = 220 - (20 + 60) = +140 percentage points.

    Returns:
        Columns ``i, j, removed, ppl, change, interaction`` (``i < j``), ordered by (i, j).
    """
    columns = ["i", "j", "removed", "ppl", "change", "interaction"]
    pairs = measured(frame)
    pairs = pairs[pairs["n_removed"] == 2] if not pairs.empty else pairs
    if pairs.empty or baseline_ppl(frame) is None:
        return pd.DataFrame(columns=columns)
    singles = single_changes(frame)
    records = []
    for removed, ppl, change in zip(pairs["removed"], pairs["ppl"], change_pct(frame).loc[pairs.index]):
        i, j = parse_key(removed)
        expected = singles.get(i, math.nan) + singles.get(j, math.nan)
        records.append((i, j, removed, float(ppl), float(change), float(change) - expected))
    return pd.DataFrame(records, columns=columns).sort_values(["i", "j"], ignore_index=True)


def per_n_stats(frame: pd.DataFrame) -> pd.DataFrame:
    """Best, median and worst measured perplexity per number of removed layers (0 = the baseline).

    Returns:
        Columns ``n_removed, variants, best, median, worst, best_removed, worst_removed, excluded`` where
        ``variants`` counts measured variants and ``excluded`` the diverged + failed ones of that size.
    """
    ok = measured(frame)
    records = []
    for n in sorted(frame["n_removed"].unique()) if not frame.empty else []:
        group = ok[ok["n_removed"] == n].sort_values(["ppl", "removed"])
        excluded = sum(excluded_counts(frame, int(n)).values())
        if group.empty:
            records.append((int(n), 0, math.nan, math.nan, math.nan, None, None, excluded))
            continue
        ppl = group["ppl"].astype(float)
        records.append((int(n), len(group), ppl.iloc[0], float(ppl.median()), ppl.iloc[-1],
                        group["removed"].iloc[0], group["removed"].iloc[-1], excluded))
    return pd.DataFrame(records, columns=["n_removed", "variants", "best", "median", "worst", "best_removed",
                                          "worst_removed", "excluded"])


def pareto_front(frame: pd.DataFrame, cost: str) -> pd.DataFrame:
    """The measured variants that no other variant beats on both perplexity and ``cost`` (lower is better), from
    the cheapest to the costliest: :func:`sweep.ranking.pareto_front` (the one definition) over the frame's rows.

    Args:
        frame: One setup's rows of ``results_vs_baseline``.
        cost: ``"speed_ms"`` or ``"params"``.
    """
    if frame.empty:
        return frame
    rows = frame.astype(object).where(frame.notna(), None).to_dict("records")
    return frame.iloc[ranking.pareto_front(rows, cost)]
