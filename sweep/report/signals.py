"""Report pieces for the similarity-guided and greedy strategies, from rows the report has already read (no SQL,
no torch).

- :func:`similarity_heatmaps`: d(l, n) (start layer x block size, last token and all tokens) and Block
  Influence per layer, one PNG per model; :func:`similarity_summary`: the same signals as numbers for a table
  (the lowest-distance block of each size, layers ranked by Block Influence).
- :func:`strategy_curve`: evaluation perplexity against the fraction of layers removed, one line per strategy
  (last-n, angular, block-influence, greedy, and the oracle = best measured variant per n).
- :func:`strategy_table`: markdown "strategy x number of layers removed" with the gap to the oracle.

The oracle for n removed layers exists only when the setup has every one of the C(L, n) variants of that size
(from ``exhaustive`` or ``combinations --k n``); a best-of-some would not be the best possible choice.
"""
from __future__ import annotations

import math
from math import comb

import numpy as np
from matplotlib.colors import LogNorm

from sweep.intervals import change_pct
from sweep.plan import STRATEGIES, PlanSpec, reported_strategies, variant_key
from sweep.ranking import Row
from sweep.report import plotting
from sweep.report.context import baseline_row
from sweep.report.format import format_pct, format_ppl

ORACLE = "oracle"
"""The line of the best measured variant of each size."""


def strategy_lines() -> tuple[str, ...]:
    """Order of lines and table rows: the strategies the registry reports (:attr:`sweep.plan.Strategy.reported`),
    then the oracle."""
    return (*reported_strategies(), ORACLE)


def _chosen() -> set[str]:
    """The strategies whose lines are their stored choices (the signal strategies); without one, no table."""
    return {n for n in reported_strategies() if STRATEGIES[n].reported == "choices"}


def _ok_ppl(row: Row | None) -> float | None:
    if row is None or row.get("status") != "ok" or row.get("ppl") is None or not math.isfinite(row["ppl"]):
        return None
    return row["ppl"]


# ---------------------------------------------------------------------------------------------- data


def strategy_points(rows: list[Row], choices: list[Row]) -> dict[str, dict[int, tuple[str, float]]]:
    """strategy -> n removed -> (removed key, evaluation perplexity), from one setup's view rows and the strategy
    choices stored for it (``store.read_strategy_choices``).

    Only variants measured with status ok appear. ``oracle`` is the best variant of size n when all C(L, n)
    variants of that size are measured; ``last-n`` is read from the results whether or not it was planned.

    Example: 4 layers, results for every variant of size 1 and the choices angular n=1 -> "2":
    ``{"oracle": {1: ("3", 41.2)}, "angular": {1: ("2", 45.0)}, "last-n": {1: ("3", 41.2)}, ...}``.
    """
    if not rows:
        return {}
    n_layers = rows[0]["model_layers"]
    by_key = {r["removed"]: r for r in rows}
    points: dict[str, dict[int, tuple[str, float]]] = {name: {} for name in strategy_lines()}
    for name, n, key in _planned_points(n_layers):
        if (ppl := _ok_ppl(by_key.get(key))) is not None:
            points[name][n] = (key, ppl)
    for choice in choices:
        if (ppl := _ok_ppl(by_key.get(choice["removed"]))) is not None:
            points.setdefault(choice["strategy"], {})[choice["n"]] = (choice["removed"], ppl)
    for n in range(1, n_layers + 1):
        size_n = [r for r in rows if r["n_removed"] == n and r["status"] in ("ok", "diverged")]
        finite = [r for r in size_n if _ok_ppl(r) is not None]
        if len(size_n) == comb(n_layers, n) and finite:
            best = min(finite, key=lambda r: r["ppl"])
            points[ORACLE][n] = (best["removed"], best["ppl"])
    return {name: p for name, p in points.items() if p}


def _planned_points(n_layers: int) -> list[tuple[str, int, str]]:
    """(strategy, n removed, key) of the strategies reported by their plan (``last-n``: the deepest n layers),
    planned again from the layer count for each n, so they are read from the results whether or not they ran."""
    return [(name, len(removed), variant_key(removed)) for name in reported_strategies()
            if STRATEGIES[name].reported == "plan" for n in range(1, n_layers + 1)
            for removed in STRATEGIES[name].plans(n_layers, PlanSpec(n=str(n)))]


def _baseline_ppl(rows: list[Row]) -> float | None:
    baseline = baseline_row(rows)
    return _ok_ppl(baseline) if baseline else None


# ---------------------------------------------------------------------------------------------- table


def strategy_table(rows: list[Row], choices: list[Row]) -> str | None:
    """Markdown table: one row per strategy, one column per number of removed layers, perplexity and gap to the
    oracle; None when the setup has no signal-strategy variant measured.

    Example::

        | strategy | 1 removed | 2 removed |
        | --- | --- | --- |
        | last-n | 41.20 (3, +0.00 % vs oracle) | 57.00 (2,3, +4.2 % vs oracle) |
        | angular | 45.00 (2, +9.2 % vs oracle) | 54.70 (1,2, +0.00 % vs oracle) |
        | oracle | 41.20 (3) | 54.70 (1,2) |
    """
    if not choices:  # no signal strategy ran for this model
        return None
    points = strategy_points(rows, choices)
    if not _chosen() & set(points):
        return None
    sizes = sorted({n for name, p in points.items() if name in _chosen() for n in p})
    oracle = points.get(ORACLE, {})
    lines = ["| strategy | " + " | ".join(f"{n} removed" for n in sizes) + " |",
             "| --- | " + " | ".join("---" for _ in sizes) + " |"]
    for name in strategy_lines():
        if name not in points:
            continue
        cells = []
        for n in sizes:
            if n not in points[name]:
                cells.append("—")
            elif name == ORACLE:
                cells.append(f"{format_ppl(points[name][n][1])} ({points[name][n][0]})")
            else:
                key, ppl = points[name][n]
                gap = f", {format_pct(change_pct(ppl, oracle[n][1]))} vs oracle" if n in oracle else ""
                cells.append(f"{format_ppl(ppl)} ({key}{gap})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    note = ("" if oracle else "\n\nNo oracle: measure every variant of a size (`--strategy exhaustive`, or "
            "`combinations --k N`) to see how far each strategy is from the best possible choice.")
    return "\n".join(lines) + note


# ---------------------------------------------------------------------------------------------- figures

ORACLE_STYLE = dict(color="black", linestyle="--", marker="")
"""The oracle's line; each strategy's record holds its own (distinct markers: strategies often choose the same
variants, and their lines then overlap)."""


@plotting.styled
def strategy_curve(rows: list[Row], choices: list[Row], subtitle: str):
    """Evaluation perplexity against the fraction of layers removed, one line per strategy; None without data."""
    points = strategy_points(rows, choices) if choices else {}
    if not points:
        return None
    n_layers = rows[0]["model_layers"]
    baseline = _baseline_ppl(rows)
    fig, ax = plotting.new_figure(0.9, 1.1)
    for name in strategy_lines():
        if name not in points:
            continue
        ns = sorted(points[name])
        xs = ([0.0] if baseline else []) + [n / n_layers for n in ns]
        ys = ([baseline] if baseline else []) + [points[name][n][1] for n in ns]
        ax.plot(xs, ys, label=name, **(ORACLE_STYLE if name == ORACLE else STRATEGIES[name].style))
    ax.set_yscale("log")
    ax.set_xlabel(f"fraction of layers removed (of {n_layers})")
    ax.set_ylabel("evaluation perplexity (log scale)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    plotting.titled(fig, "Layers chosen by each strategy", subtitle)
    return fig


def _newest_signals(rows: list[Row]) -> dict[str, list[Row]]:
    """model -> the signal rows of its newest calibration pass (rows come newest first)."""
    chosen: dict[str, tuple] = {}
    grouped: dict[str, list[Row]] = {}
    for row in rows:
        key = (row["weights"], row["calib_fingerprint"], row["model_id"])
        chosen.setdefault(row["model"], key)
        if chosen[row["model"]] == key:
            grouped.setdefault(row["model"], []).append(row)
    return grouped


def _distance_grid(rows: list[Row], metric: str, n_layers: int):
    """(n_layers, n_layers + 1) grid, row n-1 = block size n, column l = start; NaN where undefined."""
    grid = [[math.nan] * n_layers for _ in range(n_layers)]
    for row in rows:
        if row["metric"] == metric and row["value"] is not None:
            grid[row["size"] - 1][row["start"]] = row["value"]
    return grid


ANGULAR_METRICS = ("angular-last", "angular-all")


def lowest_distance_blocks(rows: list[Row], metric: str, n_layers: int) -> dict[int, tuple[int, float]]:
    """block size n -> (start l, d(l, n)) of the block with the lowest angular distance, final layer kept.

    The block the ``angular`` strategy removes without ``--allow-last`` (l + n <= L - 1; ties go to the lower
    start). Sizes whose distances are all missing (NaN is stored as NULL) are left out.

    Example, 4 layers, d(0,2)=.3, d(1,2)=.1, d(2,2)=.05: {2: (1, .1)} (start 2 would remove the final layer).
    """
    candidates = sorted((r["size"], r["value"], r["start"]) for r in rows
                        if r["metric"] == metric and r["value"] is not None and math.isfinite(r["value"])
                        and r["start"] + r["size"] <= n_layers - 1)
    best: dict[int, tuple[int, float]] = {}
    for n, distance, start in candidates:  # sorted by (n, d, l): the first of each n is its minimum
        best.setdefault(n, (start, distance))
    return best


def influence_ranking(rows: list[Row]) -> list[tuple[int, float | None]]:
    """(layer, Block Influence) from the lowest BI to the highest (ties: lower layer); missing values last."""
    influence = [(r["start"], r["value"]) for r in rows if r["metric"] == "block-influence"]
    return sorted(influence, key=lambda item: (item[1] if item[1] is not None else math.inf, item[0]))


def newest_calibration(signal_rows: list[Row]) -> list[Row]:
    """The rows of the newest calibration pass of one model (``store.similarity_overview`` rows, newest first)."""
    grouped = _newest_signals(signal_rows)
    return next(iter(grouped.values()), [])


def similarity_summary(signal_rows: list[Row]) -> Row | None:
    """The newest calibration pass of one model (as the heatmaps choose it) for a report table; None without one.

    Returns:
        ``calib``, ``n_tokens``, ``n_sequences``, ``computed_at``, ``n_layers``, ``blocks`` (metric ->
        :func:`lowest_distance_blocks`, for each angular metric stored) and ``influence``
        (:func:`influence_ranking`).
    """
    rows = newest_calibration(signal_rows)
    if not rows:
        return None
    n_layers, stored = rows[0]["model_layers"], {r["metric"] for r in rows}
    return {
        "calib": rows[0]["calib"], "n_tokens": rows[0]["n_tokens"], "n_sequences": rows[0]["n_sequences"],
        "computed_at": max(r["computed_at"] or "" for r in rows) or None, "n_layers": n_layers,
        "blocks": {m: lowest_distance_blocks(rows, m, n_layers) for m in ANGULAR_METRICS if m in stored},
        "influence": influence_ranking(rows),
    }


def _integer_ticks(axis, n_layers: int, first: int) -> None:
    """One tick per layer up to 28 layers, then every k-th: layers are integers, never 0.5."""
    step = max(1, math.ceil(n_layers / 28))
    axis.set_ticks(range(first, first + n_layers, step))


@plotting.styled
def similarity_heatmaps(signal_rows: list[Row], subtitle: str):
    """Heatmaps of d(l, n) (last token, all tokens) and Block Influence per layer, from the newest calibration pass
    of one model; None without signals."""
    rows = newest_calibration(signal_rows)
    if not rows:
        return None
    n_layers = rows[0]["model_layers"]
    fig, axes = plotting.new_figure(1.9, 1.1, 1, 3)
    for ax, metric, title in ((axes[0], "angular-last", "last token"), (axes[1], "angular-all", "all tokens")):
        grid = np.ma.masked_invalid(np.array(_distance_grid(rows, metric, n_layers), dtype=float))
        image = ax.imshow(grid, origin="lower", aspect="auto", cmap=plotting.colormap("viridis"),
                          extent=(-0.5, n_layers - 0.5, 0.5, n_layers + 0.5))
        _integer_ticks(ax.xaxis, n_layers, first=0)
        _integer_ticks(ax.yaxis, n_layers, first=1)
        ax.set_xlabel("start layer l (block removes l .. l+n-1)")
        ax.set_ylabel("block size n (layers)")
        ax.set_title(f"angular distance d(l, n), {title}")
        fig.colorbar(image, ax=ax, fraction=0.046)
    influence = [math.nan] * n_layers
    for row in rows:
        if row["metric"] == "block-influence" and row["value"] is not None:
            influence[row["start"]] = row["value"]
    strip = np.ma.masked_invalid(np.array([influence], dtype=float))  # (1, L): a one-row heatmap
    # Log colours when possible: the first layer's BI is often 10-100x the others' and would flatten them.
    positive = strip.count() and float(strip.min()) > 0
    image = axes[2].imshow(strip, aspect="auto", cmap=plotting.colormap("magma"), norm=LogNorm() if positive else None,
                           extent=(-0.5, n_layers - 0.5, 0, 1))
    axes[2].set_yticks([])
    _integer_ticks(axes[2].xaxis, n_layers, first=0)
    axes[2].set_xlabel("layer")
    axes[2].set_title("Block Influence 1 - cos(h_in, h_out) (ShortGPT)")
    fig.colorbar(image, ax=axes[2], fraction=0.046)
    plotting.titled(fig, "Angular distance and Block Influence", f"{subtitle} · calibration {rows[0]['calib']} "
                    f"({rows[0]['n_tokens']:,} tokens)")
    return fig
