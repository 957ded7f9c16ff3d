"""Markdown reports from results.db: one file per model, built from the database alone (no model loaded). No torch,
no SQL: :mod:`~sweep.report.context` reads the database once per model; :mod:`~sweep.report.sections` writes the
sections; :mod:`~sweep.report.analysis`, :mod:`~sweep.report.findings` and :mod:`~sweep.report.figures` turn rows
into numbers, sentences and PNGs; :mod:`~sweep.report.export` writes CSV and JSON.
"""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from sweep.report import analysis
from sweep.report.context import ReportContext, load_contexts, records, report_filename, report_filenames
from sweep.report.export import FORMATS, export_rows, write_file
from sweep.report.format import MISSING, finite, format_pct, format_ppl, table, text
from sweep.report.sections import SECTIONS, ppl_cell, render, render_markdown


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
        markdown = render(ctx)  # figures are drawn while rendering, before the markdown that embeds them is written
        paths.append(write_file(out_dir / f"{ctx.figure_stem}.md", markdown))
    if index if index is not None else (model is None and setup is None and len(contexts) > 1):
        write_file(out_dir / INDEX_NAME, render_index(contexts))
    return paths


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
             if finite(by_key[key].get("ppl_change_pct")) else f"{n}: `{key}` ({format_ppl(by_key[key]['ppl'])})"
             for n, key in zip(stats["n_removed"], stats["best_removed"])]
    return " · ".join(parts) or MISSING


def _index_row(ctx: ReportContext) -> list[str]:
    baseline = ctx.baseline
    layers = ctx.info.get("model_layers") or (baseline or {}).get("n_layers")
    measured = len(analysis.measured(ctx.frame))
    return [
        f"[{text(ctx.model)}]({ctx.figure_stem}.md)",
        f"`{ctx.setup}`",
        str(layers) if layers is not None else MISSING,
        ppl_cell(baseline) if baseline else MISSING,
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
        table(INDEX_COLUMNS, (_index_row(ctx) for ctx in contexts)),
    ]
    if any(ctx.other_setups for ctx in contexts):
        lines += ["", "A model with other setups: `sweep report --setup <id>` reports one of them."]
    return "\n".join(lines) + "\n"


__all__ = ["FORMATS", "INDEX_NAME", "SECTIONS", "ReportContext", "export_rows", "load_contexts", "records",
           "render", "render_index", "render_markdown", "report_filename", "report_filenames", "report_text",
           "write_reports"]
