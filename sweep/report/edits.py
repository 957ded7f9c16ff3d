"""Report parts for variants beyond whole-layer removal: attention-only / MLP-only removal ("units") and
layer-order edits (repeat, swap, reverse, parallel), beside the removal of the same layers.

Pure pandas and matplotlib over the view's rows (as dicts); the keys are read with :mod:`sweep.steps`. Tables,
figures and the findings sentences all come from :func:`unit_changes` and :func:`order_changes`, so a sentence
and the bar it describes cannot disagree.
"""
from __future__ import annotations

import math

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from sweep import steps
from sweep.intervals import change_pct
from sweep.ranking import Row
from sweep.report import plotting
from sweep.report.format import MISSING, finite, format_params, format_pct, format_ppl, table

UNIT_KINDS = ("attn", "mlp", "mix")
UNIT_LABELS = {"attn": "attention removed", "mlp": "MLP removed", "block": "block removed"}
"""The per-layer unit columns of the units figure."""
ORDER_LABELS = {"": "remove", "r": "repeat", "s": "swap with next", "p": "parallel with next"}
"""The per-layer order columns (span 1 for repeat, 2 for swap and parallel), beside removing the layer."""
CHEAP_PCT = 10.0


def _ok(row: Row | None) -> bool:
    return row is not None and row.get("status") == "ok" and finite(row.get("ppl"))


def _change(row: Row | None, baseline: Row | None) -> float | None:
    """Perplexity change (%) against the baseline, or None when either is not measured."""
    if not (_ok(row) and _ok(baseline)):
        return None
    return change_pct(row["ppl"], baseline["ppl"])


def split_rows(rows: list[Row]) -> tuple[list[Row], list[Row]]:
    """(whole-block rows with the baseline, unit and order rows): the report's block sections read the first."""
    blocks, edits = [], []
    for row in rows:
        (blocks if steps.is_block_variant(steps.parse_key(row["removed"])) else edits).append(row)
    return blocks, edits


def _kind(row: Row) -> str:
    return steps.variant_kind(steps.parse_key(row["removed"]))


# ---------------------------------------------------------------------------------------------- units


def unit_changes(rows: list[Row], baseline: Row | None,
                 block_rows: list[Row] = ()) -> dict[int, dict[str, float | None]]:
    """Layer -> perplexity change (%) of removing its attention (``attn``), its MLP (``mlp``) and the whole
    block (``block``, from ``block_rows``), from the single-unit variants measured; layers with no unit variant
    are left out."""
    by_key = {r["removed"]: r for r in [*rows, *block_rows]}
    layers = sorted({steps.unit_layer(steps.parse_key(r["removed"])[0]) for r in rows
                     if _kind(r) in ("attn", "mlp") and r.get("n_removed") == 1})
    return {layer: {"attn": _change(by_key.get(f"a{layer}"), baseline),
                    "mlp": _change(by_key.get(f"m{layer}"), baseline),
                    "block": _change(by_key.get(str(layer)), baseline)} for layer in layers}


def unit_table(rows: list[Row], baseline: Row | None, block_rows: list[Row] = ()) -> str | None:
    changes = unit_changes(rows, baseline, block_rows)
    if not changes:
        return None
    body = [[str(layer), format_pct(c["attn"]), format_pct(c["mlp"]), format_pct(c["block"])]
            for layer, c in changes.items()]
    return table(("layer", "attention removed (%)", "MLP removed (%)", "block removed (%)"), body)


def best_units_table(rows: list[Row], baseline: Row | None) -> str | None:
    """The best unit variant (attention, MLP or mix) per number of units removed, with its cost and size."""
    by_n: dict[int, list[Row]] = {}
    for row in rows:
        if _kind(row) in UNIT_KINDS and _ok(row):
            by_n.setdefault(int(row["n_removed"]), []).append(row)
    if not by_n:
        return None
    body = []
    for n in sorted(by_n):
        best = min(by_n[n], key=lambda r: (r["ppl"], r["removed"]))
        body.append([str(n), f"{len(by_n[n]):,}", f"`{best['removed']}`", format_ppl(best["ppl"]),
                     format_pct(_change(best, baseline)), format_params(best.get("params")),
                     format_pct(best.get("speed_change_pct"))])
    return table(("units removed", "variants", "best", "perplexity (↓)", "ppl change (%)", "parameters (M)",
                  "speed change (%)"), body)


def unit_findings(rows: list[Row], baseline: Row | None, block_rows: list[Row] = ()) -> list[str]:
    """Sentences comparing attention and MLP removal, with numbers from :func:`unit_changes`."""
    changes = unit_changes(rows, baseline, block_rows)
    notes, parts = [], []
    for kind, name in (("attn", "attention"), ("mlp", "MLP")):
        values = {layer: c[kind] for layer, c in changes.items() if c[kind] is not None}
        if len(values) < 2:
            continue
        cheapest = min(values, key=values.get)
        cheap = sum(v <= CHEAP_PCT for v in values.values())
        median = format_pct(float(np.median(list(values.values()))))
        parts.append(f"one {name} branch changes perplexity by {median} at the median (cheapest: layer "
                     f"{cheapest}, {format_pct(values[cheapest])}; {cheap} of {len(values)} cost at most "
                     f"{CHEAP_PCT:g} %)")
    if parts:
        notes.append("**Attention vs MLP.** Removing " + "; removing ".join(parts) + ".")
    both = [(layer, c) for layer, c in changes.items() if c["attn"] is not None and c["block"] is not None]
    if both:
        cheaper = sum(c["attn"] < c["block"] for _, c in both)
        notes.append(f"**Attention vs block.** Removing only the attention costs less than removing the whole block "
                     f"at {cheaper} of {len(both)} layers.")
    return notes


@plotting.styled
def plot_units(rows: list[Row], baseline: Row | None, subtitle: str, block_rows: list[Row] = ()) -> Figure | None:
    """Grouped bars per layer: perplexity change of removing its attention, its MLP and the whole block."""
    changes = unit_changes(rows, baseline, block_rows)
    if not changes:
        return None
    return _layer_bars(changes, UNIT_LABELS, "Perplexity change when one branch or the whole block is removed",
                       subtitle)


def _symlog_if_wide(ax, values: list[float]) -> None:
    """A symmetric-log y axis when one bar dwarfs the rest (as the single-removal chart does)."""
    finite_values = np.abs([v for v in values if finite(v)])
    if len(finite_values) and finite_values.max() > 20 * max(float(np.median(finite_values)), 1e-9):
        ax.set_yscale("symlog", linthresh=10 ** math.floor(math.log10(max(1.0, float(np.median(finite_values))))))
        # plain tick labels: mathtext is off in every figure (plotting.STYLE), so 10^3 would print as markup
        ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:,g}"))
        ax.set_ylabel("perplexity change (%, symmetric log scale)")
    else:
        ax.set_ylabel("perplexity change (%)")


# ---------------------------------------------------------------------------------------------- order edits


def order_changes(rows: list[Row], block_rows: list[Row], baseline: Row | None) -> dict[int, dict[str, float | None]]:
    """Layer -> perplexity change (%) of removing it (``""``), repeating it (``r``), swapping it with the next
    (``s``) and running it in parallel with the next (``p``); layers with no order edit measured are left out."""
    by_key = {r["removed"]: r for r in [*rows, *block_rows]}
    layers = sorted({steps.order_edit(steps.parse_key(r["removed"]))[1] for r in rows
                     if _kind(r) == "order" and steps.order_edit(steps.parse_key(r["removed"])) is not None})
    keys = {"": "{l}", "r": "r{l}", "s": "s{l}", "p": "p{l}-{n}"}
    return {layer: {op: _change(by_key.get(pattern.format(l=layer, n=layer + 1)), baseline)
                    for op, pattern in keys.items()} for layer in layers}


def order_table(rows: list[Row], block_rows: list[Row], baseline: Row | None) -> str | None:
    changes = order_changes(rows, block_rows, baseline)
    if not changes:
        return None
    body = [[str(layer)] + [format_pct(c[op]) for op in ORDER_LABELS] for layer, c in changes.items()]
    return table(["layer"] + [f"{label} (%)" for label in ORDER_LABELS.values()], body)


def other_order_table(rows: list[Row], baseline: Row | None) -> str | None:
    """Every order variant not in the per-layer table (longer repeats, reversals, wider parallel groups...)."""
    shown = []
    for row in rows:
        if _kind(row) != "order":
            continue
        edit = steps.order_edit(steps.parse_key(row["removed"]))
        simple = (edit is not None and len(steps.parse_key(row["removed"])) == 1
                  and ((edit[0] == "r" and edit[1] == edit[2]) or edit[0] == "s"
                       or (edit[0] == "p" and edit[2] == edit[1] + 1)))
        if not simple:
            shown.append(row)
    if not shown:
        return None
    n_layers = (baseline or {}).get("n_layers")
    body = [[f"`{r['removed']}`", _steps_cell(r["removed"], n_layers), format_ppl(r.get("ppl")),
             format_pct(_change(r, baseline)), format_params(r.get("params"))]
            for r in sorted(shown, key=lambda r: r["removed"])]
    return table(("variant", "layers run", "perplexity (↓)", "ppl change (%)", "parameters (M)"), body)


def _steps_cell(key: str, n_layers: int | None) -> str:
    """The layers a variant runs, in order (``0,1,2,1,2,3``), from its key and the model's layer count."""
    if not n_layers:
        return MISSING
    return f"`{steps.steps_text(steps.steps_of(steps.parse_key(key), int(n_layers)))}`"


def greedy_line(choices: list[Row]) -> str | None:
    """The greedy searches over units (``greedy-attn``, ``greedy-mlp``, ``greedy-mix``): their paths, one line each."""
    paths: dict[str, list[Row]] = {}
    for choice in choices:
        if str(choice.get("strategy", "")).startswith("greedy-"):
            paths.setdefault(choice["strategy"], []).append(choice)
    lines = [f"`{name}` (calibration perplexity after each round): " + " → ".join(
        f"`{c['removed']}` ({format_ppl(c.get('score'))})" for c in sorted(path, key=lambda c: c["n"]))
        for name, path in sorted(paths.items())]
    return "\n\n".join(lines) or None


def order_findings(rows: list[Row], block_rows: list[Row], baseline: Row | None) -> list[str]:
    """One sentence: the median effect of each order edit per layer, beside removing the same layers."""
    changes = order_changes(rows, block_rows, baseline)
    parts = []
    for op, label in ORDER_LABELS.items():
        values = [c[op] for c in changes.values() if c[op] is not None]
        if values:
            parts.append(f"{label} {format_pct(float(np.median(values)))} ({len(values)} "
                         f"layer{'s' if len(values) != 1 else ''})")
    if len(parts) < 2:
        return []
    return ["**Layer order.** Median perplexity change per layer: " + ", ".join(parts) + "."]


@plotting.styled
def plot_order(rows: list[Row], block_rows: list[Row], baseline: Row | None, subtitle: str) -> Figure | None:
    """Grouped bars per layer: removing, repeating, swapping and parallelising it."""
    changes = order_changes(rows, block_rows, baseline)
    if not changes:
        return None
    return _layer_bars(changes, ORDER_LABELS, "Perplexity change when a layer is repeated, swapped or run in parallel",
                       subtitle)


def _layer_bars(changes: dict[int, dict[str, float | None]], labels: dict[str, str], title: str,
                subtitle: str) -> Figure:
    """Grouped bars: per layer, one bar per kind of edit in ``labels`` that was measured (its change in %).

    ``changes``: layer -> kind -> perplexity change (None: not measured). A kind keeps its colour whether or not
    the others were measured; the bars of each layer are centred on its tick.
    """
    fig, ax = plotting.new_figure()
    layers = list(changes)
    x = np.arange(len(layers))
    shown = [kind for kind in labels if any(c.get(kind) is not None for c in changes.values())]
    width = 0.8 / max(len(shown), 1)
    for k, kind in enumerate(shown):
        values = [changes[layer][kind] if changes[layer].get(kind) is not None else math.nan for layer in layers]
        ax.bar(x + (k - (len(shown) - 1) / 2) * width, values, width=width, label=labels[kind],
               color=plotting.SERIES[list(labels).index(kind)])
    _symlog_if_wide(ax, [v for c in changes.values() for v in c.values() if v is not None])
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(x, [str(layer) for layer in layers])
    ax.set_xlabel("layer (index, from 0)")
    ax.legend(frameon=False, fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    plotting.titled(fig, title, subtitle)
    return fig
