"""Findings written from the data: short sentences under the report's title, each carrying a number from the DB.

In the spirit of the notes under research tables ("removing layer 0 raises perplexity by +2,500 %, 20× more
than any other single layer"). Each note is one function ``(frame) -> str | None`` over one setup's
``results_vs_baseline`` rows (numbers from :mod:`sweep.report.analysis`); it returns None when its data is absent, and
:data:`NOTES` lists them in the order printed. Adding a note is one function plus one line in :data:`NOTES`.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pandas as pd

from sweep.intervals import change_pct
from sweep.report import analysis
from sweep.report.format import finite, format_pct, format_points, format_times

CHEAP_PCT = 10.0
"""A removal is "cheap" when it raises perplexity by at most this many percent."""
STRONG_PAIRS = 2
"""How many of the strongest pair interactions (each sign) the notes name."""


def _points(value: float) -> str:
    """``-140.2 -> "140 percentage points"`` (the sentence says which way)."""
    return f"{format_points(value, signed=False)} percentage points"


def _layers(keys: list) -> str:
    """``[3] -> "layer 3"``, ``[0, 5] -> "layers 0 and 5"``, ``[0, 1, 5] -> "layers 0, 1 and 5"``."""
    names = [str(k) for k in keys]
    if len(names) == 1:
        return f"layer {names[0]}"
    return f"layers {', '.join(names[:-1])} and {names[-1]}"


def _variant(key: str) -> str:
    """``"3" -> "layer 3"``, ``"1,3" -> "layers 1,3"``."""
    return f"layer {key}" if "," not in key else f"layers {key}"


def critical_layers(frame: pd.DataFrame) -> str | None:
    """Which single layers cannot go: the largest changes, and how far they stand above the rest.

    Critical: see :func:`sweep.report.analysis.critical_layers` (the same layers the bar chart draws in red); when no
    layer stands out, the most harmful one is named anyway, with its distance to the runner-up.
    """
    changes = analysis.single_changes(frame).sort_values(ascending=False)
    if len(changes) < 2:
        return None
    median = float(np.median(changes))
    critical = analysis.critical_layers(frame)
    rest = changes.drop(critical)
    costs = " and ".join(format_pct(changes[c]) for c in critical)
    if len(critical) == 1:
        text = f"**Critical layers.** Removing layer {critical[0]} raises perplexity by {costs}"
    else:
        text = f"**Critical layers.** Removing {_layers(critical).replace(' and ', ' or ')} raises perplexity " \
               f"by {costs} respectively"
    if not rest.empty and rest.iloc[0] > 0:
        weakest = changes[critical[-1]]
        text += (f", {'at least ' if len(critical) > 1 else ''}{format_times(weakest / rest.iloc[0])} more than any "
                 f"other single layer (layer {rest.index[0]}, {format_pct(rest.iloc[0])})")
    return text + f"; the median single removal costs {format_pct(median)}."


def cheapest_removals(frame: pd.DataFrame) -> str | None:
    """Which layers can go at the smallest cost: the cheapest single, and the most layers within ``CHEAP_PCT``."""
    changes = analysis.single_changes(frame).sort_values()
    if changes.empty:
        return None
    cheap = changes[changes <= CHEAP_PCT]
    text = f"**Cheapest removals.** Layer {changes.index[0]} is the cheapest to remove ({format_pct(changes.iloc[0])})"
    if len(cheap) > 1:
        text += f"; {len(cheap)} of {len(changes)} single layers cost at most {format_pct(CHEAP_PCT)}"
    largest = _largest_cheap_variant(frame)
    if largest is not None:
        text += (f"; the most layers removed within {format_pct(CHEAP_PCT)} is {int(largest['n_removed'])} "
                 f"(layers {largest['removed']}: {format_pct(largest['ppl_change_pct'])}")
        if finite(largest.get("speed_change_pct")):
            text += f", prefill {format_pct(largest['speed_change_pct'])}"
        text += ")"
    return text + "."


def _largest_cheap_variant(frame: pd.DataFrame) -> pd.Series | None:
    """The best variant of the largest size whose best variant stays within ``CHEAP_PCT``, if it has ≥ 2 removed."""
    ok = analysis.measured(frame)
    if ok.empty:
        return None
    ok = ok.assign(ppl_change_pct=analysis.change_pct(frame).loc[ok.index])
    cheap = ok[(ok["n_removed"] >= 2) & (ok["ppl_change_pct"] <= CHEAP_PCT)]
    if cheap.empty:
        return None
    return cheap.sort_values(["n_removed", "ppl"], ascending=[False, True]).iloc[0]


def strongest_interactions(frame: pd.DataFrame) -> str | None:
    """The pairs whose joint removal departs most from the sum of their single removals, each way."""
    pairs = analysis.pair_interactions(frame).dropna(subset=["interaction"])
    if pairs.empty:
        return None
    parts = []
    for sign, word in ((1, "more"), (-1, "less")):
        strongest = pairs[sign * pairs["interaction"] > 0].sort_values("interaction", ascending=sign < 0)
        for _, pair in strongest.head(STRONG_PAIRS).iterrows():
            parts.append(f"Layers {pair['i']} and {pair['j']} together cost {format_pct(pair['change'])}, "
                         f"{_points(pair['interaction'])} {word} than their two single removals added up")
    if not parts:
        return None
    return "**Pair interactions.** " + ". ".join(parts) + "."


def speed_knee(frame: pd.DataFrame) -> str | None:
    """Where speed gains stop paying: the last step along the speed Pareto front that costs less than it saves.

    Walk the front from the baseline towards faster variants. A step pays when the perplexity it adds is
    smaller, in log terms, than the time it saves: ``log(ppl_b / ppl_a) < log(ms_a / ms_b)``. Example: from
    (10 ms, ppl 25) to (7.5 ms, 27.5) pays (×1.10 perplexity for ×1.33 speed); the next step to (5 ms, 80)
    does not (×2.9 perplexity for ×1.5 speed), so the note names the 7.5 ms variant.
    """
    front = analysis.pareto_front(frame, "speed_ms").iloc[::-1]  # slowest (best perplexity) first
    if len(front) < 2 or front["removed"].iloc[0] != "":
        return None  # no baseline on the front: nothing to measure gains against
    ms, ppl, keys = front["speed_ms"].to_numpy(float), front["ppl"].to_numpy(float), list(front["removed"])
    knee = 0
    while knee + 1 < len(front) and math.log(ppl[knee + 1] / ppl[knee]) < math.log(ms[knee] / ms[knee + 1]):
        knee += 1
    if knee == 0:
        return (f"**Speed.** Even the cheapest speed-up on the Pareto front ({_variant(keys[1])}: prefill "
                f"{format_pct(change_pct(ms[1], ms[0]))}) costs more perplexity than it saves time "
                f"({format_pct(change_pct(ppl[1], ppl[0]))}).")
    text = (f"**Speed.** Speed gains pay up to removing {_variant(keys[knee])} (prefill "
            f"{format_pct(change_pct(ms[knee], ms[0]))}, perplexity {format_pct(change_pct(ppl[knee], ppl[0]))})")
    if knee + 1 < len(front):
        text += (f"; the next step on the Pareto front ({_variant(keys[knee + 1])}) saves another "
                 f"{-change_pct(ms[knee + 1], ms[knee]):,.0f} % of prefill time for "
                 f"{format_pct(change_pct(ppl[knee + 1], ppl[knee]))} perplexity")
    return text + "."


Note = Callable[[pd.DataFrame], "str | None"]

NOTES: list[Note] = [critical_layers, cheapest_removals, strongest_interactions, speed_knee]
"""The findings notes, in the order printed. Each returns one markdown paragraph, or None without its data."""


def findings(frame: pd.DataFrame) -> list[str]:
    """The notes that have data, as markdown paragraphs (empty when the setup has too few measurements)."""
    if frame.empty or analysis.baseline_ppl(frame) is None:
        return []
    return [text for note in NOTES if (text := note(frame))]
