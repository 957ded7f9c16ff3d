"""`sweep report --format csv|json`: the view's rows that the reports would show, as files or on standard output."""
from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

from sweep.errors import SweepError, UnknownNameError
from sweep.report.context import INTEGER_COLUMNS, load_contexts


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
        frame = pd.concat([_typed(_all(ctx)) for ctx in contexts], ignore_index=True)
        sys.stdout.write(_serialise(frame, fmt))
        return []
    paths = []
    for ctx in contexts:
        path = Path(out) / f"{ctx.figure_stem}.{fmt}"
        paths.append(write_file(path, _serialise(_typed(_all(ctx)), fmt)))
    return paths


def _all(ctx) -> pd.DataFrame:
    """Every row of the context's setup: block removals, unit removals and order edits alike."""
    return ctx.all_frame if ctx.all_frame is not None else ctx.frame


def _typed(frame: pd.DataFrame) -> pd.DataFrame:
    """Integer columns as nullable integers, so a CSV says ``3``, not ``3.0``, when a value is missing."""
    return frame.astype({c: "Int64" for c in frame.columns if c in INTEGER_COLUMNS})


def _serialise(frame: pd.DataFrame, fmt: str) -> str:
    if fmt == "csv":
        return frame.to_csv(index=False)
    return frame.to_json(orient="records", indent=1) + "\n"


def write_file(path: Path, content: str) -> Path:
    """Write ``content`` (UTF-8) to ``path``, creating its folder: a report, an index or an export.

    Raises:
        SweepError: the file cannot be written (the path and the reason).
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content, encoding="utf-8")
    except OSError as exc:
        raise SweepError(f"cannot write {path}: {exc.strerror or exc}") from None
    return path
