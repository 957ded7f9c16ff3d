"""Markdown reports from results.db: one file per model, built from the database alone (no model loaded).

Must not import torch and writes no SQL: rows come from :func:`sweep.load_results` (the ``results_vs_baseline``
view as a DataFrame, the same function users call) and setups from :func:`sweep.store.setups_overview`.

A report holds, for one setup of one model: the baseline, findings written from the numbers, a table and bar
chart of single-layer removals, pair heatmaps, a table of combinatorial removals (long tables keep the best and
the worst rows), the best / median / worst variant per number of removed layers, the Pareto fronts, and a
footer saying how the numbers were produced; with similarity signals or signal-guided strategies in the DB, the
lowest-distance block per size and the layers ranked by Block Influence (with heatmaps of both when figures are
on) and each strategy against the oracle; with task results, the task table (its task settings named) and
figure. Figures are PNGs next to the report (:mod:`sweep.figures`).

Sections are built by the functions in :data:`SECTIONS`, each ``(ReportContext) -> str | None``; None (no data
for it) leaves the section out. Adding a section is one function plus one line in that list, e.g.::

    def _heal_section(ctx: ReportContext) -> str | None:
        table = tasks_report.task_table(ctx.db_path, ctx.model, ctx.setup) if ctx.db_path else None
        return None if table is None else "## Healing\n\n" + table

    SECTIONS.insert(SECTIONS.index(_pareto_section) + 1, _heal_section)   # or edit the list literal

The similarity heatmaps and the strategy comparison (issue #5) come from :mod:`sweep.strategy_report`.
"""
from __future__ import annotations

import math
import re
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

import sweep
from sweep import analysis, findings, store, strategy_report, tasks_report
from sweep.errors import SweepError, UnknownNameError
from sweep.plan import parse_key

Row = dict[str, Any]

VARIANT_COLUMNS = (
    "layers removed", "layers", "perplexity (↓)", "speed (ms) ↓", "parameters (M)", "ppl change (%)",
    "speed change (%)",
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
MISSING = "—"


# --- numbers -----------------------------------------------------------------------------------


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def format_ppl(value: float | None) -> str:
    """Perplexity with thousands separators: ``29.9412 -> "29.94"``, ``12345.61 -> "12,345.6"``."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return MISSING
    if math.isinf(value):
        return "∞"
    if abs(value) >= 1e9:
        return f"{value:.3g}"
    return f"{value:,.2f}" if abs(value) < 100 else f"{value:,.1f}"


def format_ms(value: float | None) -> str:
    """Milliseconds with two decimals and thousands separators; ``None -> "—"``."""
    return f"{value:,.2f}" if _finite(value) else MISSING


def format_params(value: int | None) -> str:
    """Parameters in millions: ``124439808 -> "124.440"``, ``6738415616 -> "6,738.42"``."""
    if not _finite(value):
        return MISSING
    millions = value / 1e6
    return f"{millions:,.3f}" if abs(millions) < 1000 else f"{millions:,.2f}"


def format_pct(value: float | None) -> str:
    """A signed change: ``12.34 -> "+12.3 %"``, ``-4 -> "-4.0 %"``, ``0.042 -> "+0.04 %"``; ``None -> "—"``.

    Changes under 1 % keep two decimals so small but real effects do not all print as ``+0.0 %``.
    """
    if not _finite(value):
        return MISSING
    digits = 2 if abs(value) < 1 else 1
    rounded = round(value, digits)
    return f"{rounded + 0.0:+,.{digits}f} %"  # + 0.0 turns -0.0 into +0.0


def _cell(text: Any) -> str:
    """Text safe inside a markdown table cell (one line, no bare pipes)."""
    return " ".join(str(text).split()).replace("|", "\\|")


def _table(columns: Iterable[str], rows: Iterable[Iterable[str]]) -> str:
    columns = list(columns)
    lines = ["| " + " | ".join(columns) + " |", "| " + " | ".join("---" for _ in columns) + " |"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


# --- variants ----------------------------------------------------------------------------------


def removed_label(row: Row) -> str:
    """The ``layers removed`` cell: the variant key (``"1,3"``), or ``none`` for the baseline."""
    return row["removed"] or "none"


def _ppl_cell(row: Row) -> str:
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
        _ppl_cell(row),
        format_ms(row.get("speed_ms")),
        format_params(row.get("params")),
        format_pct(row.get("ppl_change_pct")),
        format_pct(row.get("speed_change_pct")),
    ]


def rank_key(row: Row) -> tuple[int, float]:
    """Sort key from best to worst: measured rows by perplexity, then diverged, then failed."""
    if row["status"] == "ok" and row.get("ppl") is not None:
        return (0, row["ppl"])
    if row["status"] == "diverged":
        return (1, 0.0)  # NaN/inf perplexity: worse than any measured one
    return (2, 0.0)  # failed: no perplexity at all


def _baseline(rows: list[Row]) -> Row | None:
    return next((r for r in rows if r["removed"] == ""), None)


# --- sections ----------------------------------------------------------------------------------


def _describe_setup(info: Row) -> str:
    max_tokens = info.get("max_tokens")
    parts = [
        f"data `{info.get('data') or MISSING}`",
        f"max_length {info.get('max_length') or MISSING}",
        f"stride {info.get('stride') or MISSING}",
        f"max_tokens {f'{max_tokens:,}' if max_tokens else 'all'}",
        f"dtype {info.get('dtype') or MISSING}",
        f"device {info.get('device') or MISSING}",
    ]
    if info.get("revision"):
        parts.insert(0, f"revision `{info['revision']}`")
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
    return f"{format_ms(value)} {unit}{extra}" if _finite(value) else MISSING


def _params_text(params: int | None, non_embedding: int | None) -> str:
    """``"124.440 M (85.056 M without embeddings)"``."""
    if not _finite(params):
        return MISSING
    return f"{format_params(params)} M" + (
        f" ({format_params(non_embedding)} M without embeddings)" if _finite(non_embedding) else "")


def _baseline_section(baseline: Row | None) -> str:
    lines = ["## Baseline", ""]
    if baseline is None:
        return "\n".join(lines + ["No baseline (no layer removed) was measured in this setup, so changes (%) "
                                  "are not available; run the sweep again to measure it."])
    if baseline["status"] != "ok":
        lines += [f"The baseline is **{_ppl_cell(baseline)}**, so changes (%) are not available.", ""]
    iqr = baseline.get("speed_iqr_ms")
    iqr_text = f" (IQR {format_ms(iqr)} ms)" if _finite(iqr) else ""
    bpb = baseline.get("bpb")
    lines += [
        f"- perplexity: {format_ppl(baseline.get('ppl'))}",
        f"- bits per byte: {f'{bpb:.4f}' if _finite(bpb) else MISSING}",
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
    return "\n".join(lines + [_table(VARIANT_COLUMNS, (_variant_cells(r) for r in shown))])


def _combinatorial_section(rows: list[Row], baseline: Row | None, model: str, setup: str | None) -> str:
    combos = [r for r in rows if r["n_removed"] >= 2]
    lines = ["## Combinatorial removal", ""]
    if not combos:
        return "\n".join(lines + ["No removals of two or more layers in this setup."])
    head = [_variant_cells(baseline)] if baseline else []
    if len(combos) <= LONG_TABLE:
        ordered = sorted(combos, key=lambda r: (r["n_removed"], rank_key(r), parse_key(r["removed"])))
        return "\n".join(lines + [_table(VARIANT_COLUMNS, head + [_variant_cells(r) for r in ordered])])
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
        _table(VARIANT_COLUMNS, body),
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
            best["removed"] if best else MISSING, _ppl_cell(best) if best else MISSING,
            worst["removed"] if worst else MISSING, _ppl_cell(worst) if worst else MISSING,
        ])
    return "\n".join(lines + [_table(PER_N_COLUMNS, table_rows)])


def _example_query(model: str, setup: str | None, condition: str) -> str:
    quoted_model = model.replace("'", "''")
    where = f"model = '{quoted_model}'" + (f" AND setup = '{setup}'" if setup else "") + f" AND {condition}"
    return (
        "SELECT removed, n_layers, ppl, speed_ms, ppl_change_pct, speed_change_pct, status, error\n"
        f"FROM results_vs_baseline\nWHERE {where}\nORDER BY status != 'ok', ppl;"
    )


def _footer(info: Row, rows: list[Row], model: str) -> str:
    scored = _baseline(rows) or next((r for r in rows if r["status"] == "ok"), {})
    tokens = scored.get("n_tokens")
    measured_at = max((r["measured_at"] for r in rows if r.get("measured_at")), default=None)
    tokens_text = f" ({tokens:,} scored tokens)" if _finite(tokens) else ""
    latency_seq = info.get("latency_seq")
    prompt = f"a {latency_seq}-token prompt" if latency_seq else "a fixed prompt"
    lines = [
        "## How these numbers were produced",
        "",
        f"- **perplexity** = exp(NLL sum / tokens) over the evaluation text{tokens_text}, scored in windows of "
        "`max_length` tokens that advance by `stride`; **bits per byte** = mean NLL per token / ln 2 × tokens per UTF-8 byte of the text.",
        f"- **speed** = median wall time (ms) of N timed prefill passes of {prompt} at batch size 1, after "
        "untimed warm-up passes (N = the `latency_repeats` setting; `prefill_repeats` in the `results` table); "
        "IQR = 75th − 25th percentile. With the default `latency: shared`, variants of the same shape "
        "signature (usually: the same number of layers kept) share one measurement, so their speeds are equal.",
        "- **decode** = median ms per generated token, greedy with the KV cache.",
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
    ]
    return "\n".join(lines)


# --- sections as registered builders --------------------------------------------------------------


@dataclass
class ReportContext:
    """Everything a section builder may read: one setup of one model.

    ``rows`` (list of dicts) and ``frame`` (DataFrame, as returned by :func:`sweep.load_results`) hold the same
    rows of ``results_vs_baseline``. ``figure()`` draws a PNG next to the report when figures are enabled.
    """

    model: str
    info: Row
    rows: list[Row]
    frame: pd.DataFrame
    other_setups: tuple[str, ...] = ()
    figures_dir: Path | None = None
    """Directory of the report; figures are written there. None: no figures (e.g. ``render_markdown`` alone)."""
    figure_stem: str = "report"
    db_path: Path | None = None
    """The results database, for builders that read tables of their own through ``sweep.store`` functions."""
    figures_written: list[Path] = field(default_factory=list)

    @property
    def setup(self) -> str | None:
        return self.info.get("setup")

    @property
    def baseline(self) -> Row | None:
        return _baseline(self.rows)

    def subtitle(self) -> str:
        """``"org/m · setup 1a2b3c · wikitext-2-raw-v1, 512-token windows (stride 512) · float32 on cpu"``."""
        info = self.info
        window = f"{info.get('max_length') or MISSING}-token windows (stride {info.get('stride') or MISSING})"
        tokens = f", first {info['max_tokens']:,} tokens" if info.get("max_tokens") else ""
        return (f"{self.model} · setup {self.setup or MISSING} · {info.get('data') or MISSING}, {window}{tokens} · "
                f"{info.get('dtype') or MISSING} on {info.get('device') or MISSING}")

    def figure(self, name: str, alt: str, plot: Callable[[pd.DataFrame, str], Any] | None = None) -> str | None:
        """Draw ``plot(frame, subtitle)`` to ``<figures_dir>/<stem>-<name>.png``; the markdown image line, or None.

        ``plot`` returns a matplotlib Figure, or None without data; by default ``sweep.figures.FIGURES[name]``.
        None when figures are off or there is no data (then no file is written).
        """
        if self.figures_dir is None:
            return None
        figures = _figures()
        target = self.figures_dir / f"{self.figure_stem}-{name}.png"
        path = figures.draw(plot or figures.FIGURES[name], self.frame, target, self.subtitle())
        if path is None:
            return None
        self.figures_written.append(path)
        return f"![{alt}]({path.name})"


Section = Callable[[ReportContext], "str | None"]


def _join(*parts: str | None) -> str:
    return "\n\n".join(p for p in parts if p)


def _baseline_part(ctx: ReportContext) -> str:
    return _baseline_section(ctx.baseline)


def _findings_section(ctx: ReportContext) -> str | None:
    notes = findings.findings(ctx.frame)
    if not notes:
        return None
    return _join("## Findings", "\n".join(f"- {note}" for note in notes))


def _single_part(ctx: ReportContext) -> str:
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
    rows = [[key, format_pct(change), format_pct(singles[i]), format_pct(singles[j]), f"{inter:+,.1f}"]
            for key, change, i, j, inter in zip(strongest["removed"], strongest["change"], strongest["i"],
                                                 strongest["j"], strongest["interaction"])]
    return f"Strongest interactions ({len(pairs):,} pairs measured):\n\n" + _table(INTERACTION_COLUMNS, rows)


def _combinatorial_part(ctx: ReportContext) -> str:
    return _combinatorial_section(ctx.rows, ctx.baseline, ctx.model, ctx.setup)


def _per_n_part(ctx: ReportContext) -> str:
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
                  _table(VARIANT_COLUMNS, (_variant_cells(by_key[k]) for k in front["removed"]))]
    return "\n".join(lines).rstrip()


def _image_lines(ctx: ReportContext, paths: list[Path], alt: str) -> list[str]:
    ctx.figures_written.extend(paths)
    return [f"![{alt}]({path.name})" for path in paths]


SIMILARITY_ROWS = 24
"""The similarity table shows at most this many block sizes (every k-th above); the BI line as many layers."""
SIGNAL_LABELS = {"angular-last": "last token", "angular-all": "all tokens"}


def format_signal(value: float | None) -> str:
    """An angular distance or Block Influence with 4 decimals, as `sweep similarity` prints them: ``0.04512 ->
    "0.0451"``; below 0.0001, 2 significant digits: ``0.0000312 -> "3.1e-05"``; None -> "—"."""
    if not _finite(value):
        return MISSING
    return f"{value:.4f}" if value == 0 or abs(value) >= 1e-4 else f"{value:.1e}"


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
            f"`--strategy angular --n <n>` removes{all_tokens}.\n\n" + _table(columns, rows))


def _influence_line(summary: Row) -> str | None:
    """Layers by Block Influence, lowest first: the order in which `block-influence` removes them."""
    ranking = summary["influence"]
    if not ranking:
        return None
    shown = [f"layer {layer} ({format_signal(bi)})" for layer, bi in ranking[:SIMILARITY_ROWS]]
    rest = len(ranking) - len(shown)
    more = f" · … {rest} more, up to layer {ranking[-1][0]} ({format_signal(ranking[-1][1])})" if rest else ""
    return ("Block Influence per layer, lowest first (the layers that change the stream least; `block-influence` "
            "removes the first n): " + " · ".join(shown) + more + ".")


def _calibration_line(summary: Row) -> str:
    """One sentence naming the calibration pass the signals come from."""
    tokens = f"{summary['n_tokens']:,} tokens" if _finite(summary["n_tokens"]) else "an unknown number of tokens"
    n_windows = summary["n_sequences"]
    windows = f" in {n_windows:,} window{'s' if n_windows != 1 else ''}" if _finite(n_windows) else ""
    when = f", computed {summary['computed_at']}" if summary["computed_at"] else ""
    return f"Signals of the newest calibration pass: `{summary['calib']}`, {tokens}{windows}{when}."


def _similarity_section(ctx: ReportContext) -> str | None:
    """Angular distance d(l, n) and Block Influence (`sweep similarity`) as text, with heatmaps when figures are on."""
    if ctx.db_path is None:
        return None
    summary = strategy_report.similarity_summary(ctx.db_path, ctx.model)
    if summary is None:
        return None
    images = []
    if ctx.figures_dir is not None:
        images = _image_lines(ctx, strategy_report.similarity_heatmaps(ctx.db_path, ctx.figures_dir, model=ctx.model),
                              "angular distance and block influence")
    return _join("## Layer similarity",
                 "Angular distance d(l, n) = arccos(cos(h_l, h_{l+n})) / π between the residual stream entering "
                 "layer l and entering layer l + n (Gromov et al. 2024), and Block Influence 1 − cos(h_in, h_out) "
                 "per layer (ShortGPT), on the calibration text. Low values mark layers that change the stream "
                 "least.", *images, _calibration_line(summary), _block_table(summary), _influence_line(summary))


def _strategies_section(ctx: ReportContext) -> str | None:
    """Each strategy's chosen variants against the oracle (best measured variant per number removed)."""
    if ctx.db_path is None or ctx.setup is None:
        return None
    table = strategy_report.strategy_table(ctx.db_path, ctx.setup)
    if table is None:
        return None
    images = []
    if ctx.figures_dir is not None:
        images = _image_lines(ctx, strategy_report.strategy_curve(ctx.db_path, ctx.setup, ctx.figures_dir),
                              "perplexity against the fraction of layers removed, per strategy")
    return _join("## Strategies", *images, table)


def _tasks_section(ctx: ReportContext) -> str | None:
    """Downstream accuracy (`sweep tasks`) and LoRA healing (`sweep heal`) of this model, when the DB has them.

    Task setups have no link to a perplexity setup: each task shows its newest settings, named in one line.
    Heals belong to a perplexity setup: only those of the reported setup are shown.
    """
    if ctx.db_path is None:
        return None
    table = tasks_report.task_table(ctx.db_path, ctx.model, ctx.setup)
    settings = tasks_report.task_settings_text(ctx.db_path, ctx.model, ctx.setup)
    if table is None and settings is None:
        return None
    images = []
    if ctx.figures_dir is not None and table is not None:
        path = tasks_report.plot_tasks(ctx.db_path, ctx.model, ctx.figures_dir, ctx.setup)
        images = _image_lines(ctx, [path] if path else [], "task accuracy and perplexity against layers removed")
    return _join("## Downstream tasks and healing", *images,
                 "Accuracy in % ± standard error (lm-evaluation-harness); changes against the unpruned model in "
                 "points." if table else None, settings, table.rstrip() if table else None)


def _footer_part(ctx: ReportContext) -> str:
    return _footer(ctx.info, ctx.rows, ctx.model)


SECTIONS: list[Section] = [
    _baseline_part,
    _findings_section,
    _single_part,
    _pairs_section,
    _combinatorial_part,
    _per_n_part,
    _pareto_section,
    _similarity_section,
    _strategies_section,
    _tasks_section,
    _footer_part,
]
"""Section builders in report order. Each returns markdown starting with ``## Title``, or None to leave it out."""


def _figures():
    """:mod:`sweep.figures`, imported on first use: matplotlib is slow to import and only needed for PNGs."""
    from sweep import figures

    return figures


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
    rows = list(rows)
    info = _setup_fields(rows, setup_info or {})
    ctx = ReportContext(model=info.get("model") or "unknown model", info=info, rows=rows, frame=_frame(rows),
                        other_setups=tuple(other_setups), figure_stem=figure_stem,
                        figures_dir=Path(figures_dir) if figures_dir is not None else None)
    return render(ctx)


def render(ctx: ReportContext) -> str:
    """The markdown report of ``ctx``: title, setup line, then every section of :data:`SECTIONS` that has data."""
    sections = [f"# Layer removal: {ctx.model}", _describe_setup(ctx.info),
                _setup_choice(ctx.setup, ctx.other_setups)]
    if not ctx.rows:
        sections.append("No results for this setup yet: run `sweep run` to measure the baseline and variants.")
    else:
        sections += [build(ctx) for build in SECTIONS]
    return "\n\n".join(s for s in sections if s) + "\n"


VIEW_NUMBERS = ("n_removed", "n_layers", "ppl", "speed_ms", "params", "ppl_change_pct", "speed_change_pct")


def _frame(rows: list[Row]) -> pd.DataFrame:
    """Rows as a DataFrame with at least the columns the analysis reads (hand-made rows may lack some)."""
    frame = pd.DataFrame(rows)
    for column in ("removed", "status", *VIEW_NUMBERS):
        if column not in frame:
            frame[column] = pd.Series(dtype=object if column in ("removed", "status") else float)
    return frame


INTEGER_COLUMNS = frozenset(
    {name for name, kind in store.RESULT_COLUMNS.items() if kind is int}
    | {"model_layers", "max_length", "stride", "max_tokens"}
)
"""View columns holding integers (pandas turns an integer column with a missing value into floats)."""


def records(frame: pd.DataFrame) -> list[Row]:
    """DataFrame rows back as plain dicts: NaN -> None, integer columns as ``int`` (the view's own values)."""
    def plain(column: str, value: Any) -> Any:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return None
        if column in INTEGER_COLUMNS and isinstance(value, float):
            return int(value)
        return value.item() if hasattr(value, "item") else value

    return [{c: plain(c, v) for c, v in row.items()} for row in frame.astype(object).to_dict("records")]


def _setup_fields(rows: list[Row], setup_info: Row) -> Row:
    """Setup fields from the overview, completed from the rows (device and revision live only there)."""
    source = _baseline(rows) or (rows[0] if rows else {})
    keys = ("model", "setup", "data", "max_length", "stride", "max_tokens", "dtype", "device", "revision")
    info = {k: source.get(k) for k in keys}
    info.update({k: v for k, v in setup_info.items() if v is not None})
    return info


def report_filename(model: str) -> str:
    """A filesystem-safe file name for a model's report.

    Hub ids keep their organisation: ``"org/name" -> "org--name.md"``. Local paths keep their last two parts:
    ``".cache/demo/model" -> "demo--model.md"``, ``"/data/ckpt/llama-7b" -> "ckpt--llama-7b.md"``.
    """
    if model.startswith((".", "/", "~")):
        model = "/".join(p for p in model.split("/") if p not in ("", ".", "..", "~"))
        model = "/".join(model.split("/")[-2:])
    safe = model.strip("/").replace("/", "--")
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", safe).strip(".") or "model"
    return f"{safe}.md"


def _newest_setup(setups: list[Row], rows: list[Row]) -> Row:
    """The most recently created setup; ties (same second) go to the one measured last."""
    last_measured: dict[str, str] = {}
    for row in rows:
        last_measured[row["setup"]] = max(last_measured.get(row["setup"], ""), row.get("measured_at") or "")
    return max(setups, key=lambda s: (s.get("created_at") or "", last_measured.get(s["setup"], ""), s["setup"]))


def _select_setups(overview: list[Row], model: str | None, setup: str | None) -> dict[str, list[Row]]:
    """The overview rows to report, grouped by model name, after checking ``model`` and ``setup``."""
    if not overview:
        raise SweepError("the results database has no models yet; run `sweep run` first")
    if model is not None and model not in {s["model"] for s in overview}:
        raise UnknownNameError("model", model, sorted({s["model"] for s in overview}))
    if model is not None:
        overview = [s for s in overview if s["model"] == model]
    if setup is not None:
        if setup not in {s["setup"] for s in overview}:
            raise UnknownNameError("setup", setup, [s["setup"] for s in overview])
        chosen_model = next(s["model"] for s in overview if s["setup"] == setup)
        overview = [s for s in overview if s["model"] == chosen_model]
    by_model: dict[str, list[Row]] = {}
    for row in overview:
        by_model.setdefault(row["model"], []).append(row)
    return by_model


def write_reports(db_path: str | Path, out_dir: str | Path = "reports", model: str | None = None,
                  setup: str | None = None, figures: bool = True, index: bool | None = None) -> list[Path]:
    """Write ``<out_dir>/<model>.md`` (and its PNG figures) for every model in the database (or only ``model``).

    Each report covers one setup: ``setup`` if given, otherwise the model's newest setup. Rows come from
    :func:`sweep.load_results`, the function users call from Python, so reports and notebooks agree.

    Args:
        db_path: The results database.
        out_dir: Directory receiving the reports (created if needed).
        model: Report only this model name.
        setup: Report this setup id (of ``model``, or of whichever model owns it).
        figures: Draw the figures (``<model>-single.png``, ``-pairs``, ``-per-n``, ``-pareto``) next to each report.
        index: Also write ``<out_dir>/index.md`` listing the reports; default: when every model is reported
            (neither ``model`` nor ``setup`` given) and the database holds more than one.

    Returns:
        The report paths written, one per model in model-name order (``index.md`` and figures not included).

    Raises:
        StoreError: no database at ``db_path``, or it is not a usable sweep database.
        UnknownNameError: ``model`` or ``setup`` is not in the database (the valid ones are listed).
        SweepError: the database has no models yet, or a report cannot be written.
    """
    out_dir = Path(out_dir)
    contexts = load_contexts(db_path, model, setup)
    paths = []
    for ctx in contexts:
        ctx.figures_dir = out_dir if figures else None
        text = render(ctx)  # figures are drawn while rendering, before the markdown that embeds them is written
        paths.append(_write(out_dir / report_filename(ctx.model), text))
    if index if index is not None else (model is None and setup is None and len(contexts) > 1):
        _write(out_dir / INDEX_NAME, render_index(contexts))
    return paths


def load_contexts(db_path: str | Path, model: str | None = None, setup: str | None = None) -> list[ReportContext]:
    """One :class:`ReportContext` per reported model (its chosen setup), in model-name order, without figures.

    Raises:
        StoreError, UnknownNameError, SweepError: as :func:`write_reports`.
    """
    db = store.open_db(db_path, create=False)
    try:
        by_model = _select_setups(store.setups_overview(db), model, setup)
        return [_model_context(db, Path(db_path), name, setups, setup) for name, setups in sorted(by_model.items())]
    finally:
        db.close()


def _model_context(db: Any, db_path: Path, model: str, setups: list[Row], setup: str | None) -> ReportContext:
    frame = sweep.load_results(db, model=model)  # same path as `import sweep; sweep.load_results(...)`
    rows = records(frame)
    chosen = next(s for s in setups if s["setup"] == setup) if setup else _newest_setup(setups, rows)
    chosen_frame = frame[frame["setup"] == chosen["setup"]].reset_index(drop=True)
    chosen_rows = [r for r in rows if r["setup"] == chosen["setup"]]
    return ReportContext(
        model=model, info=_setup_fields(chosen_rows, chosen), rows=chosen_rows, frame=chosen_frame,
        other_setups=tuple(s["setup"] for s in setups if s is not chosen),
        figure_stem=report_filename(model).removesuffix(".md"), db_path=db_path,
    )


def _write(path: Path, text: str) -> Path:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise SweepError(f"cannot write report {path}: {exc.strerror or exc}") from None
    return path


def report_text(paths: Iterable[str | Path]) -> str:
    """The reports at ``paths`` concatenated, separated by a rule, for printing."""
    return "\n---\n\n".join(Path(p).read_text(encoding="utf-8") for p in paths)


# --- index page --------------------------------------------------------------------------------


INDEX_NAME = "index.md"
INDEX_COLUMNS = ("model", "setup", "layers", "baseline ppl", "variants", "best variant per layers removed",
                 "other setups")


def _best_per_n_text(ctx: ReportContext) -> str:
    """``"1: `2` (+10.0 %) · 2: `1,2` (+80.0 %)"`` from the measured variants; ``—`` when none."""
    stats = analysis.per_n_stats(ctx.frame)
    stats = stats[(stats["n_removed"] >= 1) & (stats["variants"] > 0)]
    by_key = {r["removed"]: r for r in ctx.rows}
    parts = [f"{n}: `{key}` ({format_pct(by_key[key].get('ppl_change_pct'))})"
             if _finite(by_key[key].get("ppl_change_pct")) else f"{n}: `{key}` ({format_ppl(by_key[key]['ppl'])})"
             for n, key in zip(stats["n_removed"], stats["best_removed"])]
    return " · ".join(parts) or MISSING


def _index_row(ctx: ReportContext) -> list[str]:
    baseline = ctx.baseline
    layers = ctx.info.get("model_layers") or (baseline or {}).get("n_layers")
    measured = len(analysis.measured(ctx.frame))
    return [
        f"[{ctx.model}]({report_filename(ctx.model)})",
        f"`{ctx.setup}`",
        str(layers) if layers is not None else MISSING,
        _ppl_cell(baseline) if baseline else MISSING,
        f"{measured:,} of {len(ctx.rows):,} measured",
        _best_per_n_text(ctx),
        ", ".join(f"`{s}`" for s in ctx.other_setups) or MISSING,
    ]


def render_index(contexts: Iterable[ReportContext]) -> str:
    """``index.md``: one row per report with its baseline and best variant per number of layers removed."""
    contexts = list(contexts)
    lines = [
        "# Layer removal reports", "",
        (f"{len(contexts)} model{'s' if len(contexts) != 1 else ''}, each reported for its newest setup (or the one "
         "given with `--setup`). Best variant per number of layers removed: `removed layers` (perplexity change)."),
        "",
        _table(INDEX_COLUMNS, (_index_row(ctx) for ctx in contexts)),
    ]
    if any(ctx.other_setups for ctx in contexts):
        lines += ["", "A model with other setups: `sweep report --setup <id>` reports one of them."]
    return "\n".join(lines) + "\n"


# --- csv / json export -------------------------------------------------------------------------


FORMATS = ("md", "csv", "json")
"""``sweep report --format``: markdown reports with figures, or the view's rows as CSV or JSON."""


def export_rows(db_path: str | Path, out: str | Path, fmt: str, model: str | None = None,
                setup: str | None = None) -> list[Path]:
    """Export the rows of ``results_vs_baseline`` that the reports would show, as CSV or JSON.

    One file per model (its chosen setup, as in :func:`write_reports`): ``<out>/<model>.csv`` or ``.json``.
    With ``out == "-"`` every selected row goes to standard output as one CSV table or one JSON array.
    JSON is an array of objects, one per row; non-finite perplexities are ``null`` (``status`` says why).

    Returns:
        The paths written (empty when printing to standard output).

    Raises:
        UnknownNameError: ``fmt`` is not csv or json, or an unknown model / setup.
        StoreError, SweepError: as :func:`write_reports`.
    """
    if fmt not in ("csv", "json"):
        raise UnknownNameError("export format", fmt, ["csv", "json"])
    contexts = load_contexts(db_path, model, setup)
    if str(out) == "-":
        frame = pd.concat([_typed(ctx.frame) for ctx in contexts], ignore_index=True)
        sys.stdout.write(_serialise(frame, fmt))
        return []
    paths = []
    for ctx in contexts:
        path = Path(out) / report_filename(ctx.model).replace(".md", f".{fmt}")
        paths.append(_write(path, _serialise(_typed(ctx.frame), fmt)))
    return paths


def _typed(frame: pd.DataFrame) -> pd.DataFrame:
    """Integer columns as nullable integers, so a CSV says ``3``, not ``3.0``, when a value is missing."""
    return frame.astype({c: "Int64" for c in frame.columns if c in INTEGER_COLUMNS})


def _serialise(frame: pd.DataFrame, fmt: str) -> str:
    if fmt == "csv":
        return frame.to_csv(index=False)
    return frame.to_json(orient="records", indent=1) + "\n"
