"""What a report is built from: one :class:`ReportContext` per model, read from results.db once.

The database is read here and nowhere else in the report: the view's rows come from :func:`sweep.load_results`
(the function users call, so reports and notebooks agree) and the rest (similarity signals, strategy choices,
task results, heals) from ``store`` read functions. Section builders only read the context.
"""
from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

import sweep
from sweep import ranking, store
from sweep.errors import SweepError, UnknownNameError
from sweep.ranking import Row
from sweep.report import edits
from sweep.report.format import MISSING


@dataclass
class ReportContext:
    """Everything a section builder may read: one setup of one model, and the model's other stored data.

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
    signal_rows: list[Row] = field(default_factory=list)
    """The model's calibration signals (``store.similarity_overview``), newest pass first."""
    strategy_choices: list[Row] = field(default_factory=list)
    """Which variant each signal strategy chose, for this setup's model and weights."""
    search_rows: list[Row] = field(default_factory=list)
    """The model's search candidates (``store.search_overview``, without per-window values), by search and tokens."""
    task_rows: list[Row] = field(default_factory=list)
    """The model's task results (``store.read_task_results``)."""
    heals: list[Row] = field(default_factory=list)
    """The model's heals (``store.read_heals``)."""
    edit_rows: list[Row] = field(default_factory=list)
    """Rows of unit removals and layer-order edits (``a3``, ``r3``...): ``rows`` and ``frame`` hold only whole-block
    removals and the baseline, which every block section reads (:func:`sweep.report.edits.split_rows`)."""
    all_frame: pd.DataFrame | None = None
    """Every row of the setup, unit and order variants included (what CSV / JSON export writes); None: ``frame``."""
    figures_written: list[Path] = field(default_factory=list)
    window_losses: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    """Variant key -> (per-window NLL, per-window tokens) arrays of this setup (``store.read_window_losses``)."""
    resamples: int | None = None
    """Bootstrap resamples of this setup's stored intervals (``--resamples`` of its runs); None: none stored."""
    eliminated: int = 0
    """Variants of this setup a race eliminated (or still racing): left out of ``rows`` and ``frame``."""

    @property
    def setup(self) -> str | None:
        return self.info.get("setup")

    @property
    def baseline(self) -> Row | None:
        return baseline_row(self.rows)

    def subtitle(self) -> str:
        """``"org/m · setup 1a2b3c · wikitext-2-raw-v1, 512-token windows (stride 512) · float32 on cpu"``."""
        info = self.info
        window = f"{info.get('max_length') or MISSING}-token windows (stride {info.get('stride') or MISSING})"
        tokens = f", first {info['max_tokens']:,} tokens" if info.get("max_tokens") else ""
        return (f"{self.model} · setup {self.setup or MISSING} · {info.get('data') or MISSING}, {window}{tokens} · "
                f"{info.get('dtype') or MISSING} on {info.get('device') or MISSING}")

    def figure(self, name: str, alt: str, draw: Callable[[], Any] | None = None) -> str | None:
        """Draw a figure to ``<figures_dir>/<stem>-<name>.png``; the markdown image line, or None.

        ``draw()`` returns a matplotlib Figure, or None without data; by default the figure ``name`` of
        :data:`sweep.report.figures.FIGURES` over this setup's rows. None when figures are off or there is no data
        (then no file is written).
        """
        if self.figures_dir is None:
            return None
        from sweep.report import figures, plotting  # deferred: matplotlib is slow to import, needed only for PNGs

        fig = draw() if draw is not None else figures.FIGURES[name](self.frame, self.subtitle())
        if fig is None:
            return None
        path = plotting.save(fig, self.figures_dir / f"{self.figure_stem}-{name}.png")
        self.figures_written.append(path)
        return f"![{alt}]({path.name})"


def baseline_row(rows: list[Row]) -> Row | None:
    """The unpruned variant's row (``removed == ""``), or None."""
    return next((r for r in rows if r["removed"] == ""), None)


# ---------------------------------------------------------------------------------------------- rows


PARTIAL_STATUSES = ("racing", "eliminated")
"""Statuses of rows measured on part of the text only (a race): reports leave them out of tables and figures."""

VIEW_NUMBERS = ("n_removed", "n_layers", "ppl", "speed_ms", "params", "ppl_change_pct", "speed_change_pct",
                "speed_interval_pct", "latency_noisy")


def frame_of(rows: list[Row]) -> pd.DataFrame:
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


def setup_fields(rows: list[Row], setup_info: Row) -> Row:
    """Setup fields from the overview, completed from the rows (device and revision live only there)."""
    source = baseline_row(rows) or (rows[0] if rows else {})
    keys = ("model", "setup", "data", "max_length", "stride", "max_tokens", "dtype", "device", "revision")
    info = {k: source.get(k) for k in keys}
    info.update({k: v for k, v in setup_info.items() if v is not None})
    return info


# ---------------------------------------------------------------------------------------------- file names


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


def report_filenames(models: list[str]) -> dict[str, str]:
    """:func:`report_filename` of each model, made unique: models whose names give the same file (two local
    checkpoints ``/x/models/m`` and ``/y/models/m``) get a short hash of their full name appended.

    Example: ``["/x/ckpt/m", "/y/ckpt/m", "gpt2"]`` -> ``ckpt--m-<hash of /x/ckpt/m>.md``,
    ``ckpt--m-<hash of /y/ckpt/m>.md``, ``gpt2.md``.
    """
    plain = {m: report_filename(m) for m in models}
    taken = [name for name in plain.values()]
    return {m: (name if taken.count(name) == 1 else
                name.removesuffix(".md") + "-" + hashlib.sha256(m.encode()).hexdigest()[:6] + ".md")
            for m, name in plain.items()}


# ---------------------------------------------------------------------------------------------- loading


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


def load_contexts(db_path: str | Path, model: str | None = None, setup: str | None = None) -> list[ReportContext]:
    """One :class:`ReportContext` per reported model (its chosen setup), in model-name order, without figures.

    Each model is reported for ``setup`` if given, otherwise for its newest setup (:func:`sweep.ranking.newest_setup`).

    Raises:
        StoreError: no database at ``db_path``, or not a usable sweep database.
        UnknownNameError: ``model`` or ``setup`` is not in the database (the valid ones are listed).
        SweepError: the database has no models yet.
    """
    db = store.open_db(db_path, create=False)
    try:
        by_model = _select_setups(store.setups_overview(db), model, setup)
        stems = report_filenames(sorted(by_model))
        return [_model_context(db, name, setups, setup, stems[name].removesuffix(".md"))
                for name, setups in sorted(by_model.items())]
    finally:
        db.close()


def _model_context(db: store.Database, model: str, setups: list[Row], setup: str | None,
                   stem: str) -> ReportContext:
    chosen = next(s for s in setups if s["setup"] == setup) if setup else ranking.newest_setup(setups)
    frame = sweep.load_results(db, model=model, setup=chosen["setup"])  # as `sweep.load_results(...)` gives it
    partial = frame["status"].isin(PARTIAL_STATUSES)
    frame = frame[~partial].reset_index(drop=True)  # partial measurements never enter a ranking
    rows, edit_rows = edits.split_rows(records(frame))
    blocks = frame[frame["removed"].isin({r["removed"] for r in rows})] if edit_rows else frame
    return ReportContext(
        model=model, info=setup_fields(rows, chosen), rows=rows, frame=blocks, edit_rows=edit_rows, all_frame=frame,
        eliminated=int(partial.sum()), window_losses=store.read_window_losses(db, chosen["setup"]),
        resamples=store.interval_resamples(db, chosen["setup"]),
        other_setups=tuple(s["setup"] for s in setups if s is not chosen), figure_stem=stem,
        signal_rows=store.similarity_overview(db, model), strategy_choices=store.read_strategy_choices(db, chosen["setup"]),
        search_rows=store.search_overview(db, model),
        task_rows=store.read_task_results(db, model=model), heals=store.read_heals(db, model=model),
    )
