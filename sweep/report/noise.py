"""Which differences are real: the report's sentences on the rankings it states, from paired bootstrap intervals
over the evaluation windows (:mod:`sweep.intervals`).

The report ranks single-layer removals and names the best variant per number of removed layers. Two variants
measured on the same windows are compared window by window: when the 95 % interval of their difference contains
0, the ranking between them is within noise on this text ("layers 2 and 3: indistinguishable on this text").
Reads the per-window losses the context loaded; no SQL, no torch.
"""
from __future__ import annotations

import math

import numpy as np

from sweep import intervals
from sweep.ranking import Row
from sweep.report.context import ReportContext
from sweep.report.format import format_change_interval, format_pct

SHOW_TIES = 12
"""At most this many within-noise neighbours of the single-layer ranking are named (the rest are counted)."""


def _comparable(ctx: ReportContext, rows: list[Row]) -> list[Row]:
    """Measured rows (ok, finite perplexity) whose per-window losses cover the baseline's windows, best first."""
    base = ctx.window_losses.get("")
    n_windows = len(base[0]) if base is not None else None
    usable = [r for r in rows if r.get("status") == "ok" and isinstance(r.get("ppl"), (int, float))
              and math.isfinite(r["ppl"]) and r["removed"] in ctx.window_losses
              and (n_windows is None or len(ctx.window_losses[r["removed"]][0]) == n_windows)]
    return sorted(usable, key=lambda r: (r["ppl"], r["removed"]))


def _resamples(ctx: ReportContext) -> int:
    """The resamples the setup's stored intervals used (``--resamples``), so sentences and tables agree."""
    return ctx.resamples or intervals.RESAMPLES


def _label(key: str) -> str:
    return f"layer {key}" if "," not in key else f"layers {key}"


def single_ties(ctx: ReportContext) -> list[str]:
    """Neighbours in the single-removal ranking whose difference is within noise, one sentence each."""
    singles = _comparable(ctx, [r for r in ctx.rows if r.get("n_removed") == 1])
    if len(singles) < 2:
        return []
    keys = [r["removed"] for r in singles]
    nll = np.stack([ctx.window_losses[k][0] for k in keys])
    tokens = ctx.window_losses[keys[0]][1]
    ties = intervals.ranked_ties(keys, nll, tokens, _resamples(ctx))
    lines = [f"layers {better} and {worse}: indistinguishable on this text ({worse} vs {better}: "
             f"{format_change_interval(i.change, i.low, i.high)})" for better, worse, i in ties[:SHOW_TIES]]
    if len(ties) > SHOW_TIES:
        lines.append(f"… and {len(ties) - SHOW_TIES} more neighbouring pairs of single removals")
    if not ties:
        lines.append(f"every neighbouring pair of the {len(keys)} single removals ranked by perplexity differs "
                     "beyond noise")
    return lines


def best_versus_runner_up(ctx: ReportContext) -> list[str]:
    """Per number of removed layers (2 or more variants): is the best variant really better than the runner-up?"""
    lines = []
    sizes = sorted({r["n_removed"] for r in ctx.rows if r.get("n_removed")})
    for n in sizes:
        ranked = _comparable(ctx, [r for r in ctx.rows if r.get("n_removed") == n])
        if len(ranked) < 2:
            continue
        best, second = ranked[0]["removed"], ranked[1]["removed"]
        i = intervals.difference_interval(ctx.window_losses[second][0], ctx.window_losses[best][0],
                                          ctx.window_losses[best][1], _resamples(ctx))
        verdict = f"is really the best, ahead of {_label(second)}" if i.excludes_zero \
            else f"and {_label(second)}: indistinguishable on this text"
        lines.append(f"{n} removed: {_label(best)} {verdict} "
                     f"({second} vs {best}: {format_change_interval(i.change, i.low, i.high)})")
    return lines


def _against_baseline(ctx: ReportContext) -> str | None:
    with_interval = [r for r in ctx.rows if r.get("removed") and r.get("ppl_change_low_pct") is not None
                     and r.get("ppl_change_high_pct") is not None]
    if not with_interval:
        return None
    within = [r for r in with_interval if r["ppl_change_low_pct"] <= 0 <= r["ppl_change_high_pct"]]
    example = f" (e.g. {_label(within[0]['removed'])}: {format_pct(within[0]['ppl_change_pct'])})" if within else ""
    return (f"{len(within):,} of {len(with_interval):,} variants change perplexity by an amount within noise "
            f"(their interval contains 0){example}.")


def noise_section(ctx: ReportContext) -> str | None:
    """``## Which differences are real``: changes within noise, ties in the single-removal ranking, and whether
    each best-per-n variant beats its runner-up; a note on variants a race eliminated. None without per-window
    losses (results measured before schema version 4)."""
    eliminated = ctx.eliminated
    if not eliminated and (not ctx.window_losses or not any(r["n_removed"] for r in ctx.rows)):
        return None  # nothing measured per window, or no whole-block variant (units have their own section)
    lines = ["## Which differences are real", ""]
    if ctx.window_losses:
        lines += ["Every variant is measured on the same windows of the text, so two variants are compared window by "
                  f"window: a paired bootstrap over windows ({_resamples(ctx):,} resamples, seed {intervals.SEED}) "
                  "gives the 95 % interval of their difference (shown as `change [low, high]`). When it contains 0 "
                  "the order of the two is noise on this text.", ""]
        baseline_line = _against_baseline(ctx)
        lines += [baseline_line, ""] if baseline_line else []
        ties = single_ties(ctx)
        lines += ["Single-layer ranking:", "", *(f"- {t}" for t in ties), ""] if ties else []
        best = best_versus_runner_up(ctx)
        lines += ["Best per number of removed layers against the runner-up:", "", *(f"- {b}" for b in best), ""] \
            if best else []
    if eliminated:
        lines += [f"{eliminated:,} variants were eliminated by a race (`--race`) after part of the text: their partial "
                  "numbers are left out of every table and figure here (`status = 'eliminated'` in "
                  "`results_vs_baseline`, `n_windows` says how many windows they saw)."]
    return "\n".join(lines).rstrip()
