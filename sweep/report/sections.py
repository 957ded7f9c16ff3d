"""The report's sections: each a function ``(ReportContext) -> str | None`` listed in :data:`SECTIONS`.

A report holds, for one setup of one model: the baseline, findings written from the numbers, a table and bar
chart of single-layer removals, pair heatmaps, a table of combinatorial removals (long tables keep the best and
the worst rows), the best / median / worst variant per number of removed layers, the Pareto fronts, and a
footer saying how the numbers were produced; with similarity signals or signal-guided strategies in the DB, the
lowest-distance block per size and the layers ranked by Block Influence (with heatmaps of both when figures are
on) and each strategy against the oracle; with `--strategy search`, its trajectory, every strategy's choice per
size and whether the search's gain over the best heuristic is real (:mod:`sweep.report.search`); with task
results, the task table (its task settings named) and figure. A builder returns None (no data for it) to leave
its section out. Adding a section is one function plus one line in :data:`SECTIONS`, e.g.::

    def _heal_section(ctx: ReportContext) -> str | None:
        table = tasks.task_table(ctx.task_rows, ctx.heals, ctx.setup)
        return None if table is None else "## Healing\n\n" + table

    SECTIONS.insert(SECTIONS.index(_pareto_section) + 1, _heal_section)   # or edit the list literal

Builders read only the context (no SQL, no torch); numbers are written by :mod:`sweep.report.format`.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from pathlib import Path

import pandas as pd

from sweep.plan import parse_key
from sweep.ranking import Row
from sweep.report import analysis, edits, findings, noise, search, signals, tasks
from sweep.report.context import ReportContext, baseline_row, frame_of, setup_fields
from sweep.report.format import (MISSING, code, finite, format_change_interval, format_ms, format_params, format_pct,
                                 format_points, format_ppl, format_signal, format_timing, is_noisy, table, text)

Section = Callable[[ReportContext], "str | None"]

VARIANT_COLUMNS = (
    "layers removed", "layers", "perplexity (↓)", "speed (ms) ↓", "parameters (M)",
    "ppl change (%) [95 % interval]", "speed change (%)",
)
"""Columns of the single and combinatorial removal tables (``layers`` = number of layers kept)."""

PER_N_COLUMNS = ("layers removed (n)", "variants", "best", "best ppl", "worst", "worst ppl")
"""Columns of the best-and-worst-per-number-of-removed-layers table."""

LONG_TABLE = 50
"""A combinatorial table with more variants than this shows only the best and the worst ones."""
SHOW_BEST = 25
SHOW_WORST = 10
ERROR_CHARS = 60
"""Failed rows show at most this much of their error text; the full text is in results.db."""

def removed_label(row: Row) -> str:
    """The ``layers removed`` cell: the variant key (``"1,3"``), or ``none`` for the baseline."""
    return row["removed"] or "none"


def ppl_cell(row: Row) -> str:
    """The perplexity cell: the number, ``diverged``, or ``failed: <start of the error>``."""
    if row["status"] == "diverged":
        return "diverged"
    if row["status"] == "failed":
        error = " ".join(str(row.get("error") or "").split())
        if len(error) > ERROR_CHARS:
            error = error[: ERROR_CHARS - 1] + "…"
        return f"failed: {error}" if error else "failed"
    return format_ppl(row["ppl"])


def _variant_cells(row: Row) -> list[str]:
    n_kept = row.get("n_layers")
    return [
        removed_label(row),
        str(n_kept) if n_kept is not None else MISSING,
        ppl_cell(row),
        format_timing(row.get("speed_ms"), is_noisy(row), row.get("speed_interval_pct")),
        format_params(row.get("params")),
        format_change_interval(row.get("ppl_change_pct"), row.get("ppl_change_low_pct"),
                               row.get("ppl_change_high_pct")),
        format_pct(row.get("speed_change_pct")),
    ]


def rank_key(row: Row) -> tuple[int, float]:
    """Sort key from best to worst: measured rows by perplexity, then diverged, then failed."""
    if row["status"] == "ok" and row.get("ppl") is not None:
        return (0, row["ppl"])
    if row["status"] == "diverged":
        return (1, 0.0)  # NaN/inf perplexity: worse than any measured one
    return (2, 0.0)  # failed: no perplexity at all


# --- sections ----------------------------------------------------------------------------------


def _describe_setup(info: Row) -> str:
    max_tokens = info.get("max_tokens")
    parts = [
        f"data {code(info.get('data') or MISSING)}",
        f"max_length {info.get('max_length') or MISSING}",
        f"stride {info.get('stride') or MISSING}",
        f"max_tokens {f'{max_tokens:,}' if max_tokens else 'all'}",
        f"dtype {info.get('dtype') or MISSING}",
        f"device {text(info.get('device') or MISSING)}",
    ]
    if info.get("revision"):
        parts.insert(0, f"revision {code(info['revision'])}")
    if info.get("created_at"):
        parts.append(f"created {info['created_at']}")
    return f"**Setup** `{info.get('setup') or MISSING}`: " + ", ".join(parts) + "."


def _setup_choice(setup: str | None, other_setups: Iterable[str]) -> str:
    others = [s for s in other_setups if s != setup]
    if not others:
        return ""
    listed = ", ".join(f"`{s}`" for s in others)
    return (
        f"This model also has results for other setups: {listed}. This report uses setup `{setup}`; by default "
        "the newest setup is reported, pass `setup=<id>` (`--setup <id>`) to report another one."
    )


def _measured(value: float | None, unit: str, extra: str = "") -> str:
    """``"12.34 ms (IQR 0.5 ms)"``, or ``"—"`` when the value is missing."""
    return f"{format_ms(value)} {unit}{extra}" if finite(value) else MISSING


def _params_text(params: int | None, non_embedding: int | None) -> str:
    """``"124.440 M (85.056 M without embeddings)"``."""
    if not finite(params):
        return MISSING
    return f"{format_params(params)} M" + (
        f" ({format_params(non_embedding)} M without embeddings)" if finite(non_embedding) else "")


def _baseline_section(baseline: Row | None) -> str:
    lines = ["## Baseline", ""]
    if baseline is None:
        return "\n".join(lines + ["No baseline (no layer removed) was measured in this setup, so changes (%) "
                                  "are not available; run the sweep again to measure it."])
    if baseline["status"] != "ok":
        lines += [f"The baseline is **{ppl_cell(baseline)}**, so changes (%) are not available.", ""]
    iqr = baseline.get("speed_iqr_ms")
    iqr_text = f" (IQR {format_ms(iqr)} ms)" if finite(iqr) else ""
    if is_noisy(baseline):
        width = baseline.get("speed_interval_pct")
        iqr_text += (f", **noisy**: the median's 95 % interval is ±{width:,.0f} %" if finite(width)
                     else ", **noisy**") + ", not an exact figure"
    bpb = baseline.get("bpb")
    lines += [
        f"- perplexity: {format_ppl(baseline.get('ppl'))}",
        f"- bits per byte: {f'{bpb:.4f}' if finite(bpb) else MISSING}",
        f"- prefill speed: {_measured(baseline.get('speed_ms'), 'ms', iqr_text)}",
        f"- decode: {_measured(baseline.get('decode_ms_per_token'), 'ms/token')}",
        f"- parameters: {_params_text(baseline.get('params'), baseline.get('params_non_embedding'))}",
        f"- layers: {baseline.get('n_layers') if baseline.get('n_layers') is not None else MISSING}",
    ]
    return "\n".join(lines)


def _single_section(rows: list[Row], baseline: Row | None) -> str:
    singles = sorted((r for r in rows if r["n_removed"] == 1), key=lambda r: parse_key(r["removed"]))
    lines = ["## Single layer removal", ""]
    if not singles:
        return "\n".join(lines + ["No single-layer removals in this setup."])
    shown = ([baseline] if baseline else []) + singles
    return "\n".join(lines + [table(VARIANT_COLUMNS, (_variant_cells(r) for r in shown))])


def _combinatorial_section(rows: list[Row], baseline: Row | None, model: str, setup: str | None) -> str:
    combos = [r for r in rows if r["n_removed"] >= 2]
    lines = ["## Combinatorial removal", ""]
    if not combos:
        return "\n".join(lines + ["No removals of two or more layers in this setup."])
    head = [_variant_cells(baseline)] if baseline else []
    if len(combos) <= LONG_TABLE:
        ordered = sorted(combos, key=lambda r: (r["n_removed"], rank_key(r), parse_key(r["removed"])))
        return "\n".join(lines + [table(VARIANT_COLUMNS, head + [_variant_cells(r) for r in ordered])])
    ranked = sorted(combos, key=lambda r: (rank_key(r), r["n_removed"], parse_key(r["removed"])))
    measured = [r for r in ranked if r["status"] != "failed"]
    best, worst = measured[:SHOW_BEST], measured[SHOW_BEST:][-SHOW_WORST:]
    omitted = len(combos) - len(best) - len(worst)
    gap = [f"… {omitted:,} more …"] + [""] * (len(VARIANT_COLUMNS) - 1)
    body = head + [_variant_cells(r) for r in best] + [gap] + [_variant_cells(r) for r in worst]
    lines += [
        f"{len(combos):,} variants: the {len(best)} best and the {len(worst)} worst by perplexity are shown, "
        f"{omitted:,} are omitted (failed ones included). All of them:",
        "",
        "```sql",
        _example_query(model, setup, "n_removed >= 2"),
        "```",
        "",
        table(VARIANT_COLUMNS, body),
    ]
    return "\n".join(lines)


def best_and_worst(rows: list[Row]) -> dict[int, tuple[Row | None, Row | None]]:
    """Best and worst variant per number of removed layers (baseline excluded).

    Diverged variants count as worse than any measured one; failed variants are not ranked. ``None``
    where no variant of that size was measured.
    """
    by_n: dict[int, list[Row]] = {}
    for row in rows:
        if row["n_removed"] >= 1:
            by_n.setdefault(row["n_removed"], []).append(row)
    found = {}
    for n, group in sorted(by_n.items()):
        ranked = sorted((r for r in group if r["status"] != "failed"), key=lambda r: (rank_key(r), r["removed"]))
        found[n] = (ranked[0], ranked[-1]) if ranked else (None, None)
    return found


def _variants_count(group: list[Row]) -> str:
    statuses = [r["status"] for r in group]
    notes = [f"{statuses.count(s)} {s}" for s in ("diverged", "failed") if s in statuses]
    return f"{len(group):,}" + (f" ({', '.join(notes)})" if notes else "")


def _per_n_section(rows: list[Row]) -> str:
    lines = ["## Best and worst per number of removed layers", ""]
    extremes = best_and_worst(rows)
    if not extremes:
        return "\n".join(lines + ["No variants with removed layers in this setup."])
    table_rows = []
    for n, (best, worst) in extremes.items():
        group = [r for r in rows if r["n_removed"] == n]
        table_rows.append([
            str(n), _variants_count(group),
            best["removed"] if best else MISSING, ppl_cell(best) if best else MISSING,
            worst["removed"] if worst else MISSING, ppl_cell(worst) if worst else MISSING,
        ])
    return "\n".join(lines + [table(PER_N_COLUMNS, table_rows)])


def _example_query(model: str, setup: str | None, condition: str) -> str:
    quoted_model = model.replace("'", "''")
    where = f"model = '{quoted_model}'" + (f" AND setup = '{setup}'" if setup else "") + f" AND {condition}"
    return (
        "SELECT removed, n_layers, ppl, speed_ms, ppl_change_pct, speed_change_pct, status, error\n"
        f"FROM results_vs_baseline\nWHERE {where}\nORDER BY status != 'ok', ppl;"
    )


def _noisy_line(rows: list[Row]) -> str | None:
    """How many timings are noisy, or None when none is."""
    timed = {r.get("latency_from") or r["removed"]: r for r in rows if finite(r.get("speed_ms"))}
    noisy = [r for r in timed.values() if is_noisy(r)]
    if not noisy:
        return None
    return (f"- **noisy**: {len(noisy)} of {len(timed)} latency measurements stopped with their median's 95 % "
            "interval wider than the `latency_precision` setting (a busy machine, or too few repeats allowed): "
            "their speeds are marked *noisy* with the interval's half-width and drawn hollow with error bars in "
            "the figures. Compare them only where differences exceed that width, or measure again on a quiet "
            "machine (`latency_noisy` and `speed_interval_pct` in `results_vs_baseline`).")


def _footer(info: Row, rows: list[Row], model: str) -> str:
    scored = baseline_row(rows) or next((r for r in rows if r["status"] == "ok"), {})
    tokens = scored.get("n_tokens")
    measured_at = max((r["measured_at"] for r in rows if r.get("measured_at")), default=None)
    tokens_text = f" ({tokens:,} scored tokens)" if finite(tokens) else ""
    latency_seq = info.get("latency_seq")
    prompt = f"a {latency_seq}-token prompt" if latency_seq else "a fixed prompt"
    lines = [
        "## How these numbers were produced",
        "",
        f"- **perplexity** = exp(NLL sum / tokens) over the evaluation text{tokens_text}, scored in windows of "
        "`max_length` tokens that advance by `stride`; **bits per byte** = mean NLL per token / ln 2 × tokens per UTF-8 byte of the text.",
        f"- **speed** = median wall time (ms) of N timed prefill passes of {prompt} at batch size 1, after "
        "untimed warm-up passes. N is at least the `latency_repeats` setting and grows until the median's 95 % "
        "bootstrap interval lies within `latency_precision` of it (or the most repeats or the time budget are "
        "reached; `prefill_repeats` in the `results` table); IQR = 75th − 25th percentile. With the default "
        "`latency: shared`, variants of the same shape signature (usually: the same number of layers kept) share "
        "one measurement, so their speeds are equal.",
        "- **decode** = median ms per generated token, greedy with the KV cache.",
        *([line] if (line := _noisy_line(rows)) else []),
        "- **parameters** = all parameters of the model with the layers removed, embeddings included.",
        "- **ppl change** = 100 × (ppl / baseline ppl − 1); **speed change** likewise for the prefill median. "
        "Negative speed change = faster.",
        "- **layers** = number of decoder layers kept; layers are numbered from 0.",
        "- Diverged = NaN or infinite perplexity; failed = the measurement stopped on an error "
        "(the full text is in the `error` column).",
        "",
        "Rendered from the results database alone (no model was loaded)"
        + (f"; last measurement {measured_at}." if measured_at else "."),
        "Every number is in the view `results_vs_baseline`, for example:",
        "",
        "```sql",
        _example_query(model, info.get("setup"), "n_removed <= 2"),
        "```",
        "",
        BROWSE_LINE,
    ]
    return "\n".join(lines)


BROWSE_QUERIES = ("best-and-worst", "pareto-speed", "pareto-params", "pair-interactions", "strategies-vs-oracle",
                  "tasks-vs-perplexity", "variant", "compare-setups", "setups")
"""Names of the canned queries of `sweep browse` (the report cannot import the extra; a test keeps them equal)."""
BROWSE_LINE = ("In a browser: `sweep browse --db results.db` (`pip install 'sweep[browse]'`) serves the database "
               "read-only with sortable tables, interactive charts (`/-/dashboards/sweep`) and one-click queries: "
               + ", ".join(f"`{name}`" for name in BROWSE_QUERIES) + ".")


# --- sections as registered builders --------------------------------------------------------------


def _join(*parts: str | None) -> str:
    return "\n\n".join(p for p in parts if p)


def _baseline_part(ctx: ReportContext) -> str:
    return _baseline_section(ctx.baseline)


def _findings_section(ctx: ReportContext) -> str | None:
    notes = (findings.findings(ctx.frame) + edits.unit_findings(ctx.edit_rows, ctx.baseline, ctx.rows)
             + edits.order_findings(ctx.edit_rows, ctx.rows, ctx.baseline))
    if not notes:
        return None
    return _join("## Findings", "\n".join(f"- {note}" for note in notes))


def _edits_only(ctx: ReportContext) -> bool:
    """A setup of unit or layer-order variants alone: the whole-block sections have nothing to say."""
    return bool(ctx.edit_rows) and not any(r["n_removed"] for r in ctx.rows)


def _single_part(ctx: ReportContext) -> str | None:
    if _edits_only(ctx):
        return None
    return _join(_single_section(ctx.rows, ctx.baseline),
                 ctx.figure("single", "perplexity change per removed layer"))


INTERACTION_COLUMNS = ("layers removed", "ppl change (%)", "change i (%)", "change j (%)", "interaction (points)")
SHOW_INTERACTIONS = 5
"""The pair table shows this many of the strongest interactions of each sign."""


def _pairs_section(ctx: ReportContext) -> str | None:
    pairs = analysis.pair_interactions(ctx.frame).dropna(subset=["interaction"])
    image = ctx.figure("pairs", "pair removals and their interaction")
    if image is None and pairs.empty:
        return None
    explained = ("The interaction of a pair is change(i, j) − change(i) − change(j), in percentage points of "
                 "perplexity change: positive (red) = removing both hurts more than the two single removals "
                 "added up, negative (blue) = less." + (" Left: perplexity with both layers removed, relative "
                                                       "to the baseline." if image else ""))
    return _join("## Pair interactions", image, explained, _interaction_table(ctx, pairs))


def _interaction_table(ctx: ReportContext, pairs: pd.DataFrame) -> str | None:
    """The strongest interactions of each sign, strongest first."""
    if pairs.empty:
        return None
    singles = analysis.single_changes(ctx.frame)
    strongest = pd.concat([pairs[pairs.interaction > 0].nlargest(SHOW_INTERACTIONS, "interaction"),
                           pairs[pairs.interaction < 0].nsmallest(SHOW_INTERACTIONS, "interaction")])
    rows = [[key, format_pct(change), format_pct(singles[i]), format_pct(singles[j]), format_points(inter)]
            for key, change, i, j, inter in zip(strongest["removed"], strongest["change"], strongest["i"],
                                                 strongest["j"], strongest["interaction"])]
    return f"Strongest interactions ({len(pairs):,} pairs measured):\n\n" + table(INTERACTION_COLUMNS, rows)


def _combinatorial_part(ctx: ReportContext) -> str | None:
    if _edits_only(ctx):
        return None
    return _combinatorial_section(ctx.rows, ctx.baseline, ctx.model, ctx.setup)


def _per_n_part(ctx: ReportContext) -> str | None:
    if _edits_only(ctx):
        return None
    return _join(_per_n_section(ctx.rows),
                 ctx.figure("per-n", "best, median and worst perplexity per number of layers removed"))


def _pareto_section(ctx: ReportContext) -> str | None:
    front = analysis.pareto_front(ctx.frame, "speed_ms")
    image = ctx.figure("pareto", "Pareto front of perplexity against speed and parameters")
    if len(front) < 2 and image is None:
        return None
    lines = ["## Pareto front", ""]
    if image:
        lines += [image, ""]
    if len(front) >= 2:
        by_key = {r["removed"]: r for r in ctx.rows}
        lines += ["Variants that no other variant beats on both perplexity and prefill time, fastest first:", "",
                  table(VARIANT_COLUMNS, (_variant_cells(by_key[k]) for k in front["removed"]))]
    return "\n".join(lines).rstrip()


SIMILARITY_ROWS = 24
"""The similarity table shows at most this many block sizes (every k-th above); the BI line as many layers."""
SIGNAL_LABELS = {"angular-last": "last token", "angular-all": "all tokens"}


def _block_label(start: int, size: int) -> str:
    """``"layer 4"`` or ``"layers 2–4"`` (the layers a block of ``size`` starting at ``start`` removes)."""
    return f"layer {start}" if size == 1 else f"layers {start}–{start + size - 1}"


def _shown_sizes(n_layers: int) -> list[int]:
    """Block sizes 1 .. L − 1, every k-th when there are more than :data:`SIMILARITY_ROWS`."""
    return list(range(1, n_layers, max(1, math.ceil((n_layers - 1) / SIMILARITY_ROWS))))


def _block_table(summary: Row) -> str | None:
    """Markdown table: block size n, then the lowest-distance block and its d for each angular metric stored."""
    blocks, sizes = summary["blocks"], _shown_sizes(summary["n_layers"] or 0)
    if not blocks or not sizes:
        return None
    columns = ["block size n"]
    for metric in blocks:
        columns += [f"block ({SIGNAL_LABELS[metric]})", f"d ({SIGNAL_LABELS[metric]})"]
    rows = []
    for n in sizes:
        cells = [str(n)]
        for best in blocks.values():
            cells += [_block_label(best[n][0], n), format_signal(best[n][1])] if n in best else [MISSING, MISSING]
        rows.append(cells)
    every = "" if sizes == list(range(1, summary["n_layers"])) else f" (sizes in steps of {sizes[1] - sizes[0]})"
    all_tokens = " (`--angular-tokens all`: the all-tokens column)" if "angular-all" in blocks else ""
    return (f"The block of n layers with the lowest angular distance{every}, final layer kept: what "
            f"`--strategy angular --n <n>` removes{all_tokens}.\n\n" + table(columns, rows))


def _influence_line(summary: Row) -> str | None:
    """Layers by Block Influence, lowest first: the order in which `block-influence` removes them."""
    order = summary["influence"]
    if not order:
        return None
    shown = [f"layer {layer} ({format_signal(bi)})" for layer, bi in order[:SIMILARITY_ROWS]]
    rest = len(order) - len(shown)
    more = f" · … {rest} more, up to layer {order[-1][0]} ({format_signal(order[-1][1])})" if rest else ""
    return ("Block Influence per layer, lowest first (the layers that change the stream least; `block-influence` "
            "removes the first n): " + " · ".join(shown) + more + ".")


def _calibration_line(summary: Row) -> str:
    """One sentence naming the calibration pass the signals come from."""
    tokens = f"{summary['n_tokens']:,} tokens" if finite(summary["n_tokens"]) else "an unknown number of tokens"
    n_windows = summary["n_sequences"]
    windows = f" in {n_windows:,} window{'s' if n_windows != 1 else ''}" if finite(n_windows) else ""
    when = f", computed {summary['computed_at']}" if summary["computed_at"] else ""
    return f"Signals of the newest calibration pass: {code(summary['calib'])}, {tokens}{windows}{when}."


def _similarity_section(ctx: ReportContext) -> str | None:
    """Angular distance d(l, n) and Block Influence (`sweep similarity`) as text, with heatmaps when figures are on."""
    summary = signals.similarity_summary(ctx.signal_rows)
    if summary is None:
        return None
    image = ctx.figure("similarity", "angular distance and block influence",
                       lambda: signals.similarity_heatmaps(ctx.signal_rows, ctx.subtitle()))
    return _join("## Layer similarity",
                 "Angular distance d(l, n) = arccos(cos(h_l, h_{l+n})) / π between the residual stream entering "
                 "layer l and entering layer l + n (Gromov et al. 2024), and Block Influence 1 − cos(h_in, h_out) "
                 "per layer (ShortGPT), on the calibration text. Low values mark layers that change the stream "
                 "least.", image, _calibration_line(summary), _block_table(summary), _influence_line(summary))


def _strategies_section(ctx: ReportContext) -> str | None:
    """Each strategy's chosen variants against the oracle (best measured variant per number removed)."""
    comparison = signals.strategy_table(ctx.rows, ctx.strategy_choices)
    if comparison is None:
        return None
    image = ctx.figure("strategies", "perplexity against the fraction of layers removed, per strategy",
                       lambda: signals.strategy_curve(ctx.rows, ctx.strategy_choices, ctx.subtitle()))
    return _join("## Strategies", image, comparison)


def _tasks_section(ctx: ReportContext) -> str | None:
    """Downstream accuracy (`sweep tasks`) and LoRA healing (`sweep heal`) of this model, when the DB has them.

    Task setups have no link to a perplexity setup: each task shows its newest settings, named in one line.
    Heals belong to a perplexity setup: only those of the reported setup are shown.
    """
    accuracy = tasks.task_table(ctx.task_rows, ctx.heals, ctx.setup)
    settings = tasks.task_settings_text(ctx.task_rows, ctx.heals, ctx.setup)
    if accuracy is None and settings is None:
        return None
    image = ctx.figure("tasks", "task accuracy and perplexity against layers removed",
                       lambda: tasks.plot_tasks(ctx.task_rows, ctx.heals, ctx.rows, ctx.setup, ctx.subtitle())) \
        if accuracy is not None else None
    return _join("## Downstream tasks and healing", image,
                 "Accuracy in % ± standard error (lm-evaluation-harness); changes against the unpruned model in "
                 "points." if accuracy else None, settings, accuracy.rstrip() if accuracy else None)


def _units_section(ctx: ReportContext) -> str | None:
    """Attention-only and MLP-only removal (``--unit attn|mlp|mix``) per layer, and the best mix per size."""
    per_layer = edits.unit_table(ctx.edit_rows, ctx.baseline, ctx.rows)
    best = edits.best_units_table(ctx.edit_rows, ctx.baseline)
    if per_layer is None and best is None:
        return None
    image = ctx.figure("units", "perplexity change when one branch or the whole block is removed",
                       lambda: edits.plot_units(ctx.edit_rows, ctx.baseline, ctx.subtitle(), ctx.rows))
    return _join("## Attention and MLP removal", image,
                 "Removing a layer's attention (`a3`) or MLP (`m3`) drops that residual branch only; the layer's "
                 "input passes through its other branch. Perplexity change against the baseline, per layer:"
                 if per_layer else None, per_layer,
                 "The best variant per number of units removed (attention branches, MLP branches or both kinds; "
                 "`3` in a key is both branches of layer 3):" if best else None, best,
                 edits.greedy_line(ctx.strategy_choices))


def _order_section(ctx: ReportContext) -> str | None:
    """Repeating, swapping, reversing and parallelising layers, beside removing them."""
    per_layer = edits.order_table(ctx.edit_rows, ctx.rows, ctx.baseline)
    others = edits.other_order_table(ctx.edit_rows, ctx.baseline)
    if per_layer is None and others is None:
        return None
    image = ctx.figure("order", "perplexity change when a layer is repeated, swapped or run in parallel",
                       lambda: edits.plot_order(ctx.edit_rows, ctx.rows, ctx.baseline, ctx.subtitle()))
    return _join("## Layer order", image,
                 "Perplexity change per layer of repeating it (`r3`), swapping it with the next layer (`s3`) and "
                 "running it in parallel with the next on the same input, their residual updates summed (`p3-4`), "
                 "beside removing it:" if per_layer else None, per_layer,
                 "Other order edits:" if others else None, others)


def _footer_part(ctx: ReportContext) -> str:
    return _footer(ctx.info, ctx.rows, ctx.model)


SECTIONS: list[Section] = [
    _baseline_part,
    _findings_section,
    _single_part,
    _pairs_section,
    _combinatorial_part,
    _per_n_part,
    noise.noise_section,
    _pareto_section,
    _units_section,
    _order_section,
    _similarity_section,
    _strategies_section,
    search.search_section,
    _tasks_section,
    _footer_part,
]
"""Section builders in report order. Each returns markdown starting with ``## Title``, or None to leave it out."""


# --- public API --------------------------------------------------------------------------------


def render_markdown(rows: list[Row], setup_info: Row | None = None, other_setups: Iterable[str] = (),
                    figures_dir: str | Path | None = None, figure_stem: str = "report") -> str:
    """Render the report of one model and one setup.

    Args:
        rows: Rows of ``results_vs_baseline`` for one model and one setup (from :func:`sweep.store.read_view`);
            may be empty, and may lack the baseline.
        setup_info: The setup's row from :func:`sweep.store.setups_overview` (model, setup, data, max_length,
            stride, max_tokens, latency_seq, dtype, ...); gives the title and setup line when ``rows`` is empty.
        other_setups: Ids of the model's other setups, listed so the reader knows they exist.
        figures_dir: Write the figures (PNG) here and embed them; None = no figures.
        figure_stem: File name prefix of the figures (``<stem>-single.png``, ...).

    Returns:
        The markdown text, ending with a newline.
    """
    rows, edit_rows = edits.split_rows(list(rows))
    info = setup_fields(rows, setup_info or {})
    ctx = ReportContext(model=info.get("model") or "unknown model", info=info, rows=rows, frame=frame_of(rows),
                        edit_rows=edit_rows,
                        other_setups=tuple(other_setups), figure_stem=figure_stem,
                        figures_dir=Path(figures_dir) if figures_dir is not None else None)
    return render(ctx)


def render(ctx: ReportContext) -> str:
    """The markdown report of ``ctx``: title, setup line, then every section of :data:`SECTIONS` that has data."""
    sections = [f"# Layer removal: {text(ctx.model)}", _describe_setup(ctx.info),
                _setup_choice(ctx.setup, ctx.other_setups)]
    if not ctx.rows:
        sections.append("No results for this setup yet: run `sweep run` to measure the baseline and variants.")
    else:
        sections += [build(ctx) for build in SECTIONS]
    return "\n\n".join(s for s in sections if s) + "\n"

