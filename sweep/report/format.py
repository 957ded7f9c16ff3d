"""How the report writes numbers and markdown: one formatter per kind of number, used by tables, findings and figures.

User text (model names, error messages, data paths) is never markup: :func:`text` escapes it for markdown and HTML,
and figures draw it with mathtext off (:mod:`sweep.report.plotting`).
"""
from __future__ import annotations

import html
import math
import re
from collections.abc import Iterable
from typing import Any

MISSING = "—"


def finite(value: Any) -> bool:
    """A real, finite number (not None, NaN or inf)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def format_ppl(value: float | None) -> str:
    """Perplexity with thousands separators: ``29.9412 -> "29.94"``, ``12345.61 -> "12,345.6"``, inf -> "∞"."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return MISSING
    if math.isinf(value):
        return "∞"
    if abs(value) >= 1e9:
        return f"{value:.3g}"
    return f"{value:,.2f}" if abs(value) < 100 else f"{value:,.1f}"


def format_ms(value: float | None) -> str:
    """Milliseconds with two decimals and thousands separators; ``None -> "—"``."""
    return f"{value:,.2f}" if finite(value) else MISSING


def is_noisy(row: Any) -> bool:
    """A row whose latency was flagged noisy (``latency_noisy`` = 1): its median timing is not to be read as exact."""
    value = row.get("latency_noisy") if hasattr(row, "get") else None
    return finite(value) and value >= 1


def format_timing(value: float | None, noisy: bool = False, interval_pct: float | None = None) -> str:
    """A median timing in ms; a noisy one says so, with the half-width of its 95 % interval when known:
    ``12.3456 -> "12.35"``, noisy ±9.12 % -> ``"12.35 (noisy, ±9 %)"``, noisy without width -> ``"12.35 (noisy)"``."""
    text = format_ms(value)
    if not noisy or not finite(value):
        return text
    return f"{text} (noisy, ±{interval_pct:,.0f} %)" if finite(interval_pct) else f"{text} (noisy)"


def format_params(value: int | None) -> str:
    """Parameters in millions: ``124439808 -> "124.440"``, ``6738415616 -> "6,738.42"``."""
    if not finite(value):
        return MISSING
    millions = value / 1e6
    return f"{millions:,.3f}" if abs(millions) < 1000 else f"{millions:,.2f}"


def pct_digits(value: float) -> int:
    """Decimals of a percentage: 2 below 1 % (small real effects must not all print as +0.0 %), 1 below 100 %,
    none above (``+2,504 %``: the decimals of a large change are noise to a reader)."""
    return 2 if abs(value) < 1 else 1 if abs(value) < 100 else 0


def format_pct(value: float | None) -> str:
    """A signed change: ``12.34 -> "+12.3 %"``, ``-4 -> "-4.0 %"``, ``0.042 -> "+0.04 %"``, ``2504.3 -> "+2,504 %"``;
    ``None -> "—"``."""
    if not finite(value):
        return MISSING
    digits = pct_digits(value)
    return f"{round(value, digits) + 0.0:+,.{digits}f} %"  # + 0.0 turns -0.0 into +0.0


def format_change_interval(change: float | None, low: float | None, high: float | None) -> str:
    """A change with its 95 % interval: ``(3.21, 2.1, 4.05) -> "+3.2 % [+2.1, +4.0]"``; without an interval only
    the change (``"+3.2 %"``)."""
    if not finite(change) or not finite(low) or not finite(high):
        return format_pct(change)
    return f"{format_pct(change)} [{format_pct(low).removesuffix(' %')}, {format_pct(high).removesuffix(' %')}]"


def format_points(value: float, signed: bool = True) -> str:
    """A difference of percentages in percentage points: ``12.34 -> "+12.3"``, ``-1234.5 -> "-1,234"``;
    ``signed=False`` drops the sign."""
    if not finite(value):
        return MISSING
    return f"{value if signed else abs(value):{'+' if signed else ''},.{1 if abs(value) < 100 else 0}f}"


def format_signal(value: float | None) -> str:
    """An angular distance or Block Influence with 4 decimals, as `sweep similarity` prints them: ``0.04512 ->
    "0.0451"``; below 0.0001, 2 significant digits: ``0.0000312 -> "3.1e-05"``; None -> "—"."""
    if not finite(value):
        return MISSING
    return f"{value:.4f}" if value == 0 or abs(value) >= 1e-4 else f"{value:.1e}"


def format_times(ratio: float) -> str:
    """``102.3 -> "102×"``, ``2.345 -> "2.3×"``."""
    return f"{ratio:,.0f}×" if ratio >= 10 else f"{ratio:,.1f}×"


_MARKDOWN_SPECIAL = re.compile(r"([\\`*_{}\[\]<>()#+!|$~])")


def text(value: Any) -> str:
    """User text made inert in markdown and HTML: one line, markup characters escaped.

    Example: ``m $\\frac{1}{$ <b>x</b> a_b`` -> ``m \\$\\\\frac\\{1\\}\\{\\$ &lt;b&gt;x&lt;/b&gt; a\\_b``, which renders as typed.
    """
    one_line = " ".join(str(value).split())
    return _MARKDOWN_SPECIAL.sub(r"\\\1", html.escape(one_line, quote=False))


def code(value: Any) -> str:
    """User text as inline code (shown verbatim): backticks in it are replaced, HTML cannot break out."""
    return "`" + " ".join(str(value).split()).replace("`", "'") + "`"


def cell(value: Any) -> str:
    """Text safe inside a markdown table cell (one line, no bare pipes)."""
    return " ".join(str(value).split()).replace("|", "\\|")


def table(columns: Iterable[str], rows: Iterable[Iterable[Any]]) -> str:
    """A markdown table; every cell goes through :func:`cell`."""
    columns = list(columns)
    lines = ["| " + " | ".join(columns) + " |", "| " + " | ".join("---" for _ in columns) + " |"]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
