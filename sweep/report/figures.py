"""The report's figures: matplotlib PNGs drawn from one setup's ``results_vs_baseline`` DataFrame.

No torch and no SQL: data comes from :func:`sweep.load_results` (the same rows the report's tables show) and
the numbers from :mod:`sweep.report.analysis`; matplotlib is set up by :mod:`sweep.report.plotting`. Each ``plot_*`` function returns a matplotlib Figure, or None when its
data is absent (no single removals, no pairs, no latency...), so the report simply leaves that figure out;
:func:`draw` saves one as PNG. Diverged and failed variants are never plotted; captions count them.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.colors import LogNorm, SymLogNorm
from matplotlib.figure import Figure

from sweep.report import analysis, plotting
from sweep.report.format import format_pct
from sweep.report.plotting import CRITICAL, MUTED, NEUTRAL, SUBTLE

FRONT = CRITICAL
MAX_FRONT_LABELS = 14
"""Label at most this many Pareto-front variants per panel (evenly spread) so labels stay legible."""
SPAN_FOR_LOG = 30.0
"""Use a log-like axis when the largest change is this many times the median one (e.g. one critical layer)."""


def draw(plot: Callable[[pd.DataFrame, str], Figure | None], frame: pd.DataFrame, path: Path,
         subtitle: str) -> Path | None:
    """Save ``plot(frame, subtitle)`` as a PNG at ``path``; None (nothing written) when it has no data."""
    fig = plot(frame, subtitle)
    return None if fig is None else plotting.save(fig, path)


def _excluded_caption(counts: dict[str, int], what: str = "variants") -> str | None:
    """``"Not plotted: 1 diverged, 2 failed variants."`` or None."""
    if not counts:
        return None
    return "Not plotted: " + ", ".join(f"{n:,} {status}" for status, n in counts.items()) + f" {what}."


def _layer_ticks(ax: Axes, n_layers: int, axis: str = "x") -> None:
    """One tick per layer; smaller labels when there are many (12-28 layers stay readable)."""
    size = 9 if n_layers <= 16 else 7
    ticks = list(range(n_layers))
    if axis == "x":
        ax.set_xticks(ticks, [str(t) for t in ticks], fontsize=size)
    else:
        ax.set_yticks(ticks, [str(t) for t in ticks], fontsize=size)


def _n_layers(frame: pd.DataFrame) -> int:
    if "model_layers" in frame:
        total = pd.to_numeric(frame["model_layers"], errors="coerce").dropna()
        if not total.empty:
            return int(total.iloc[0])
    return int((frame["n_layers"] + frame["n_removed"]).max())


# --- single removals ---------------------------------------------------------------------------


@plotting.styled
def plot_single_removals(frame: pd.DataFrame, subtitle: str) -> Figure | None:
    """Bar chart: perplexity change (%) when each single layer is removed, over layer index.

    The critical layers (:func:`sweep.report.analysis.critical_layers`, the ones the findings name) are drawn in red. A symmetric-log y axis is used when that layer dwarfs
    the others (largest change > ``SPAN_FOR_LOG`` × the median), so the small bars stay visible.
    """
    changes = analysis.single_changes(frame)
    if changes.empty:
        return None
    n_layers = _n_layers(frame)
    fig, ax = plotting.new_figure()
    critical = set(analysis.critical_layers(frame))
    colors = [CRITICAL if layer in critical else NEUTRAL for layer in changes.index]
    bars = ax.bar(changes.index, changes.to_numpy(), color=colors, width=0.7)
    median = float(np.median(np.abs(changes.to_numpy()))) or 1e-9
    if float(changes.abs().max()) > SPAN_FOR_LOG * median:
        ax.set_yscale("symlog", linthresh=10 ** math.floor(math.log10(max(1.0, median))))
        ax.set_ylabel("perplexity change (%, symmetric log scale)")
    else:
        ax.set_ylabel("perplexity change (%)")
    if n_layers <= 16:  # value labels fit above the bars
        ax.bar_label(bars, labels=[format_pct(v) for v in changes], fontsize=7, padding=2)
        ax.margins(y=0.15)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xlabel("removed layer (index, from 0)")
    ax.set_xlim(-0.6, n_layers - 0.4)
    _layer_ticks(ax, n_layers)
    ax.grid(axis="y", alpha=0.3)
    caption = _excluded_caption(analysis.excluded_counts(frame, 1), "single removals")
    plotting.titled(fig, "Perplexity change when one layer is removed", subtitle, caption)
    return fig


# --- per number of removed layers --------------------------------------------------------------


@plotting.styled
def plot_per_n(frame: pd.DataFrame, subtitle: str) -> Figure | None:
    """Best, median and worst perplexity (log scale) per number of removed layers, the baseline at n = 0."""
    stats = analysis.per_n_stats(frame)
    stats = stats[stats["variants"] > 0]
    if len(stats[stats["n_removed"] >= 1]) == 0:
        return None
    fig, ax = plotting.new_figure()
    n = stats["n_removed"]
    ax.fill_between(n, stats["best"], stats["worst"], color=NEUTRAL, alpha=0.12, label="range of measured variants")
    ax.plot(n, stats["worst"], "v-", color=MUTED, label="worst")
    ax.plot(n, stats["median"], "o--", color=NEUTRAL, label="median")
    ax.plot(n, stats["best"], "^-", color=CRITICAL, label="best")
    base = analysis.baseline_ppl(frame)
    if base is not None:
        ax.axhline(base, color="black", linewidth=0.8, linestyle=":", label=f"baseline ({base:,.2f})")
    ax.set_yscale("log")
    ax.set_xlabel("number of layers removed")
    ax.set_ylabel("perplexity (log scale)")
    ax.set_xticks(list(n), [str(v) for v in n])
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="upper left")
    counts = analysis.excluded_counts(frame)
    plotting.titled(fig, "Perplexity by number of layers removed", subtitle, _excluded_caption(counts))
    return fig


# --- pairs -------------------------------------------------------------------------------------


def _pair_matrix(pairs: pd.DataFrame, column: str, n_layers: int) -> np.ndarray:
    """(n_layers, n_layers) symmetric matrix of ``column`` per pair; NaN where no pair was measured."""
    matrix = np.full((n_layers, n_layers), np.nan)
    for i, j, value in zip(pairs["i"], pairs["j"], pairs[column]):
        matrix[i, j] = matrix[j, i] = value
    return matrix


def _symlog_ticks(linthresh: float, bound: float) -> list[float]:
    """0 and ± each power of ten between the linear threshold and the bound: [-1000, -100, 0, 100, 1000]."""
    powers = [10.0 ** k for k in range(math.ceil(math.log10(linthresh)), math.floor(math.log10(bound)) + 1)]
    return [-p for p in reversed(powers)] + [0.0] + powers


def _heatmap(ax: Axes, matrix: np.ndarray, norm, cmap: str, label: str, cell_text: list[str] | None,
             ticks: list[float] | None = None) -> None:
    color_map = plotting.colormap(cmap)  # unmeasured pairs and the diagonal in grey
    image = ax.imshow(np.ma.masked_invalid(matrix), cmap=color_map, norm=norm, origin="upper")
    colorbar = ax.figure.colorbar(image, ax=ax, shrink=0.85, ticks=ticks)
    colorbar.set_label(label, fontsize=8)
    n_layers = matrix.shape[0]
    _layer_ticks(ax, n_layers, "x")
    _layer_ticks(ax, n_layers, "y")
    ax.set_xlabel("removed layer j")
    ax.set_ylabel("removed layer i")
    if cell_text is not None:
        for (i, j), text in zip(np.argwhere(np.isfinite(matrix)), cell_text):
            red, green, blue, _ = color_map(norm(matrix[i, j]))
            dark = 0.299 * red + 0.587 * green + 0.114 * blue < 0.5  # perceived brightness of the cell
            ax.text(j, i, text, ha="center", va="center", fontsize=8, color="white" if dark else "black")


def _cell_labels(matrix: np.ndarray, fmt) -> list[str] | None:
    """Per-cell labels (row-major over finite cells) when the grid is small enough to read them."""
    if matrix.shape[0] > 8:
        return None
    return [fmt(v) for v in matrix[np.isfinite(matrix)]]


@plotting.styled
def plot_pairs(frame: pd.DataFrame, subtitle: str) -> Figure | None:
    """Two heatmaps over pairs (i, j): perplexity ÷ baseline (log colour), and the interaction in points.

    The interaction is ``change(i, j) - change(i) - change(j)`` (see :func:`sweep.report.analysis.pair_interactions`);
    its panel uses a diverging colour scale centred on 0 and is left out when no single removals were measured.
    """
    pairs = analysis.pair_interactions(frame)
    base = analysis.baseline_ppl(frame)
    if pairs.empty or base is None:
        return None
    n_layers = _n_layers(frame)
    pairs = pairs.assign(ratio=pairs["ppl"] / base)
    has_interaction = bool(np.isfinite(pairs["interaction"]).any())
    fig, axes = plotting.new_figure(1.6 if has_interaction else 1, 1.45, 1, 2 if has_interaction else 1,
                                    squeeze=False)
    ratio = _pair_matrix(pairs, "ratio", n_layers)
    finite = ratio[np.isfinite(ratio)]
    _heatmap(axes[0, 0], ratio, LogNorm(vmin=min(finite.min(), 1.0), vmax=max(finite.max(), 1.0 + 1e-9)),
             "magma_r", "perplexity ÷ baseline (log scale)", _cell_labels(ratio, lambda v: f"{v:,.2g}×"))
    axes[0, 0].set_title("perplexity with both layers removed", fontsize=10)
    if has_interaction:
        inter = _pair_matrix(pairs, "interaction", n_layers)
        bound = float(np.nanmax(np.abs(inter))) or 1.0
        linthresh = max(1.0, bound / 100)
        _heatmap(axes[0, 1], inter, SymLogNorm(linthresh=linthresh, vmin=-bound, vmax=bound),
                 "RdBu_r", "interaction (percentage points)", _cell_labels(inter, lambda v: f"{v:+,.0f}"),
                 ticks=_symlog_ticks(linthresh, bound))
        axes[0, 1].set_title("interaction: change(i, j) − change(i) − change(j)", fontsize=10)
    caption = _excluded_caption(analysis.excluded_counts(frame, 2), "pairs")
    plotting.titled(fig, "Removing two layers: perplexity and interaction", subtitle, caption)
    return fig


# --- Pareto fronts -----------------------------------------------------------------------------


PARETO_AXES = (
    ("speed_ms", "prefill time (ms, median)", 1.0),
    ("params", "parameters (millions)", 1e-6),
)
"""(cost column, axis label, scale to the plotted unit) of the Pareto panels."""


MIN_LABEL_GAP_PX = 14
"""A front variant closer than this (in pixels) to an already labelled one is left unlabelled."""


def _label_front(ax: Axes, front: pd.DataFrame, cost: str, scale: float) -> None:
    """Label front variants from the costliest (the baseline) down, skipping ones that would overlap."""
    ax.autoscale_view()
    placed: list[np.ndarray] = []
    points = list(zip(front[cost] * scale, front["ppl"], front["removed"]))[::-1]
    for k, (x, y, removed) in enumerate(points):
        where = ax.transData.transform((x, y))  # pixels
        if len(placed) >= MAX_FRONT_LABELS or any(np.hypot(*(where - p)) < MIN_LABEL_GAP_PX for p in placed):
            continue
        placed.append(where)
        ax.annotate(removed or "none", (x, y), textcoords="offset points", xytext=(4, 4 if k % 2 else -10),
                    fontsize=7, color=FRONT)


@plotting.styled
def plot_pareto(frame: pd.DataFrame, subtitle: str) -> Figure | None:
    """Perplexity (log) against prefill time and against parameters; the Pareto front highlighted and labelled.

    Labels are the removed layers (``"1,3"``; ``"none"`` = baseline). A panel is left out when its cost was not
    measured (e.g. ``--latency off``); the figure, when neither was.
    """
    ok = analysis.measured(frame)
    panels = [(c, label, s) for c, label, s in PARETO_AXES
              if not ok.empty and np.isfinite(pd.to_numeric(ok[c], errors="coerce")).sum() >= 2]
    if not panels:
        return None
    fig, axes = plotting.new_figure(1.5 if len(panels) == 2 else 1, 1.2, 1, len(panels), squeeze=False,
                                    sharey=True)
    for ax, (cost, label, scale) in zip(axes[0], panels):
        front = analysis.pareto_front(frame, cost)
        exact, noisy = (_split_noisy(ok) if cost == "speed_ms" else (ok, ok.iloc[:0]))
        ax.scatter(exact[cost] * scale, exact["ppl"], s=12, color="#95a5a6", alpha=0.6, label="measured variants")
        if len(noisy):
            _draw_noisy(ax, noisy, cost, scale)
        ax.step(front[cost] * scale, front["ppl"], where="post", color=FRONT, linewidth=1.2, alpha=0.7)
        ax.scatter(front[cost] * scale, front["ppl"], s=28, color=FRONT, zorder=3, label="Pareto front")
        _label_front(ax, front, cost, scale)
        ax.set_yscale("log")
        ax.margins(x=0.08)
        ax.set_xlabel(label)
        ax.grid(alpha=0.3, which="both")
        ax.set_title(f"perplexity vs {label.split(' (')[0]}", fontsize=10)
    axes[0, 0].set_ylabel("perplexity (log scale)")
    axes[0, 0].legend(fontsize=8, loc="upper right")
    captions = [c for c in (_excluded_caption(analysis.excluded_counts(frame)), _noisy_caption(ok)) if c]
    plotting.titled(fig, "Pareto front: perplexity vs cost (lower-left is better)", subtitle,
                    " ".join(captions) or None)
    return fig


def _split_noisy(ok: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(rows with exact timings, rows whose timing is flagged noisy)."""
    flag = pd.to_numeric(ok.get("latency_noisy", pd.Series(0, index=ok.index)), errors="coerce").fillna(0) >= 1
    return ok[~flag], ok[flag]


NOISY = "#e67e22"


def _draw_noisy(ax: Axes, noisy: pd.DataFrame, cost: str, scale: float) -> None:
    """Noisy timings: hollow markers with the median's 95 % interval as a horizontal error bar (not exact points)."""
    x = noisy[cost] * scale
    width = pd.to_numeric(noisy.get("speed_interval_pct", pd.Series(float("nan"), index=noisy.index)),
                          errors="coerce")
    ax.errorbar(x, noisy["ppl"], xerr=(x * width / 100.0).fillna(0.0).to_numpy(), fmt="o", markersize=4,
                markerfacecolor="none", color=NOISY, elinewidth=0.8, capsize=2, alpha=0.8,
                label="noisy timing (95 % interval)")


def _noisy_caption(ok: pd.DataFrame) -> str | None:
    _, noisy = _split_noisy(ok)
    return (f"Hollow, with 95 % interval bars: {len(noisy)} noisy timings (not exact along the time axis)."
            if len(noisy) else None)


FIGURES = {
    "single": plot_single_removals,
    "pairs": plot_pairs,
    "per-n": plot_per_n,
    "pareto": plot_pareto,
}
"""Figure name (the PNG is ``<report stem>-<name>.png``) -> plotting function."""
