"""The one place the report sets up matplotlib: figures, style, colours, DPI and saving.

Figures are ``matplotlib.figure.Figure`` objects drawn on the Agg canvas and written to PNG; pyplot is never
imported, so the user's backend (a notebook's inline one, an interactive window) is never switched and no global
figure list grows. Text is drawn with mathtext off: model names and paths are user text, and a ``$`` in one must
not be parsed as a formula.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import matplotlib
from matplotlib.figure import Figure

DPI = 110
"""Resolution of every PNG."""
WIDE = (8.0, 4.2)
"""Size in inches of one-panel figures; wider figures scale it."""
STYLE = {
    "text.parse_math": False,  # user text ($ in a model name) is never mathtext
    "axes.titlesize": 10,
    "axes.labelsize": 9,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "legend.fontsize": 8,
}
"""rcParams every report figure is drawn with (applied per figure, never globally)."""

CRITICAL = "#c0392b"
"""Colour of what the findings single out: critical layers, the Pareto front."""
NEUTRAL = "#3b6ea5"
"""Colour of ordinary bars and lines."""
MUTED = "#7f8c8d"
"""Colour of secondary marks (worst lines, measured points off the front)."""
SUBTLE = "#555555"
"""Colour of subtitles and captions."""
SERIES = tuple(f"C{i}" for i in range(10))
"""Colours of one line per task or strategy, in order."""


F = TypeVar("F", bound=Callable)


def styled(draw: F) -> F:
    """Run a drawing function with :data:`STYLE` in effect: text created inside it (titles, labels, names) takes
    the style when it is created, so every report figure is built inside this context."""
    @functools.wraps(draw)
    def wrapper(*args, **kwargs):
        with matplotlib.rc_context(STYLE):
            return draw(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def new_figure(width: float = 1.0, height: float = 1.0, nrows: int = 1, ncols: int = 1, **subplots) -> tuple:
    """A Figure of ``width`` x ``height`` times :data:`WIDE`, with constrained layout and its axes (call it from a
    :func:`styled` function).

    Returns:
        (figure, axes) as ``Figure.subplots`` returns them (``squeeze`` and the rest are passed through).
    """
    fig = Figure(figsize=(WIDE[0] * width, WIDE[1] * height), layout="constrained")
    return fig, fig.subplots(nrows, ncols, **subplots)


def save(fig: Figure, path: Path) -> Path:
    """Write ``fig`` as a PNG at ``path`` (parents created) with the report's DPI."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with matplotlib.rc_context(STYLE):
        fig.savefig(path, dpi=DPI)
    return path


def colormap(name: str):
    """A registered colormap with unmeasured cells (NaN) drawn light grey."""
    return matplotlib.colormaps[name].with_extremes(bad="#eeeeee")


def titled(fig: Figure, title: str, subtitle: str, caption: str | None = None) -> None:
    """Title and a smaller subtitle (model + setup) on top, an optional caption (exclusions) at the bottom."""
    height = fig.get_figheight()
    top = 1 - 0.75 / height  # title and subtitle take about 0.75 inch whatever the figure's height
    fig.suptitle(title, fontsize=12, fontweight="bold", y=1 - 0.08 / height, va="top")
    fig.text(0.5, 1 - 0.4 / height, subtitle, ha="center", va="top", fontsize=8.5, color=SUBTLE)
    if caption:
        fig.text(0.5, 0.08 / height, caption, ha="center", va="bottom", fontsize=8, color=SUBTLE, style="italic")
    bottom = (0.3 if caption else 0.08) / height
    fig.get_layout_engine().set(rect=(0, bottom, 1, top - bottom))
