"""The report's ``## Search`` section: what ``--strategy search`` (:mod:`sweep.search`) found, beside the heuristics.

From rows the context has already read (no SQL, no torch):

- :func:`plot_search`: the best calibration score against calibration tokens spent, one panel per size, each
  heuristic's seed (the choice greedy, angular or Block Influence made for that size, raced as a seed of the same
  search) as a dashed reference line;
- :func:`choice_table`: every strategy's choice per size: its calibration score, test perplexity and the change
  against the baseline with its paired interval;
- :func:`verdict`: one sentence per size: is the search's test perplexity really lower than the best heuristic's
  (paired bootstrap over the test windows, :func:`sweep.intervals.difference_interval`), or within noise?

A search is named by its ``search`` id, ``<unit>/<fitness>/<size>/seed=<s>/level=<l>`` (``block/ppl/n=8/seed=0/
level=0.95``): searches that differ only in seed or level are lines of the same size's panel.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from sweep import intervals
from sweep import search as search_strategy
from sweep.plan import STRATEGIES
from sweep.ranking import Row
from sweep.report import plotting, signals
from sweep.report.context import ReportContext
from sweep.report.format import (MISSING, finite, format_change_interval, format_pct, format_ppl, format_signal,
                                 table)

UNITS = ("block", "attn", "mlp", "mix")
"""``--unit`` values, in the order the report lists their searches."""


# ---------------------------------------------------------------------------------------------- sizes


@dataclass(frozen=True)
class SearchSize:
    """One size a search ran at: unit, fitness (``ppl`` or ``kl``) and size label (``n=8`` or ``params>=0.158``).

    The strategy and signal of its choice in ``strategy_choices`` follow from it (as :func:`sweep.search.choose_search`
    writes them): ``mix/kl/params>=0.158`` -> strategy ``search-mix``, signal ``calib-kl@params>=0.158``.
    """

    unit: str
    fitness: str
    label: str

    @property
    def size(self) -> search_strategy.Size:
        """Raises ValueError for a label of another form (:meth:`sweep.search.Size.from_label`)."""
        return search_strategy.Size.from_label(self.label)

    @property
    def n(self) -> int | None:
        return self.size.n

    @property
    def budget(self) -> float | None:
        return self.size.budget

    @property
    def strategy(self) -> str:
        return search_strategy.strategy_name(self.unit)

    @property
    def signal(self) -> str:
        return search_strategy.signal_name(self.fitness, self.size)

    @property
    def title(self) -> str:
        """``n = 8``, ``n = 8 (mix units, kl fitness)``, ``params ≥ 0.158``."""
        size = f"n = {self.n}" if self.n is not None else f"params ≥ {self.budget:g}"
        extra = ([f"{self.unit} units"] if self.unit != "block" else []) + \
            ([f"{self.fitness} fitness"] if self.fitness != "ppl" else [])
        return size + (f" ({', '.join(extra)})" if extra else "")

    def sort_key(self) -> tuple:
        unit = UNITS.index(self.unit) if self.unit in UNITS else len(UNITS)
        return (unit, self.fitness, self.n is None, self.n if self.n is not None else self.budget)

    def is_choice(self, choice: Row) -> bool:
        """``choice`` (a ``strategy_choices`` row) is this size's search choice."""
        return (choice["strategy"] == self.strategy and choice["signal"] == self.signal
                and (self.n is None or choice["n"] == self.n))


def parse_search_id(search: str) -> SearchSize | None:
    """``"block/ppl/n=8/seed=0/level=0.95"`` -> ``SearchSize("block", "ppl", "n=8")``; None for another form
    (:func:`sweep.search.parse_search_id`)."""
    parsed = search_strategy.parse_search_id(search)
    return SearchSize(parsed[0], parsed[1], parsed[2].label) if parsed else None


def _checked(size: SearchSize) -> SearchSize | None:
    """``size``, or None when its label is neither ``n=<int>`` nor ``params>=<float>`` (a row of another tool)."""
    try:
        size.sort_key()
    except ValueError:
        return None
    return size


def size_of_choice(choice: Row) -> SearchSize | None:
    """The size of a search's choice (strategy ``search``/``search-<unit>``), or None for another strategy."""
    strategy, signal = choice["strategy"], choice["signal"]
    unit = "block" if strategy == "search" else strategy.removeprefix("search-")
    if not strategy.startswith("search") or search_strategy.strategy_name(unit) != strategy:
        return None
    base, _, label = signal.partition("@")
    fitness = next((f for f, name in search_strategy.SIGNALS.items() if name == base), None)
    if fitness is None:
        return None
    return _checked(SearchSize(unit, fitness, label or f"n={choice['n']}"))


def is_search(strategy: str) -> bool:
    return strategy in {search_strategy.strategy_name(u) for u in UNITS}


def unit_of(strategy: str) -> str:
    """The unit a strategy's choices remove: ``greedy`` -> block, ``greedy-mix`` -> mix."""
    head, _, tail = strategy.rpartition("-")
    return tail if head and strategy not in STRATEGIES and tail in UNITS else "block"


# ---------------------------------------------------------------------------------------------- rows


SearchKey = tuple[int, str, str, str]
"""(model_id, weights, calib_fingerprint, search id): one search."""


def _calib_key(row: Row) -> tuple[int, str, str]:
    return row["model_id"], row["weights"], row["calib_fingerprint"]


def rows_of_setup(search_rows: list[Row], choices: list[Row]) -> list[Row]:
    """The model's search candidates (``store.search_overview``) of the setup's model row and weights: those of the
    strategy choices read for the setup; all of them when it has no choice yet (a search still running)."""
    weights = {(c["model_id"], c["weights"]) for c in choices}
    return [r for r in search_rows if not weights or (r["model_id"], r["weights"]) in weights]


def searches(rows: Iterable[Row]) -> dict[SearchKey, list[Row]]:
    """Candidates grouped by search (:data:`SearchKey`), in the order given (``search_overview``: by tokens spent)."""
    grouped: dict[SearchKey, list[Row]] = {}
    for row in rows:
        grouped.setdefault((*_calib_key(row), row["search"]), []).append(row)
    return grouped


def trajectory(rows: Sequence[Row]) -> list[tuple[int, float]]:
    """The running best fitness of one search: ``[(spent, fitness), ...]``, one point per improvement.

    The rule of :func:`sweep.search.trajectory`, on stored rows: candidates measured on every window (``n_windows``
    = the most of the search) and not dropped, in the order they completed (``spent``), keeping each fitness that
    beats all before it. There fitness is ``sum(values) / sum(tokens)``, which the row's ``fitness`` is once
    ``n_windows`` is complete. Candidates completed in the same slice share one ``spent``: they give one point, the
    lowest (:func:`sweep.search.trajectory` may list several at that ``spent``; the step line is the same).

    Example: completed rows (spent 100, fitness 3.1), (250, 3.3), (400, 2.9), (400, 2.8) and a dropped (300, 1.0)
    -> ``[(100, 3.1), (400, 2.8)]``.
    """
    full = max((r["n_windows"] for r in rows), default=0)
    done = sorted((r for r in rows if r["n_windows"] == full and r["status"] != "dropped" and finite(r["fitness"])),
                  key=lambda r: r["spent"])
    points: list[tuple[int, float]] = []
    for row in done:
        if not points or row["fitness"] < points[-1][1]:
            if points and points[-1][0] == row["spent"]:
                points.pop()
            points.append((row["spent"], row["fitness"]))
    return points


def shown(fitness: float | None, kind: str) -> float | None:
    """The score a reader compares: calibration perplexity exp(mean NLL) for ``ppl``, the mean KL as it is."""
    if not finite(fitness):
        return None
    return (math.exp(fitness) if fitness < 700 else math.inf) if kind == "ppl" else fitness


def format_score(value: float | None, kind: str) -> str:
    return format_ppl(value) if kind == "ppl" else format_signal(value)


def heuristic_labels(rows: Sequence[Row], choices: list[Row]) -> dict[str, list[str]]:
    """Seeds (generation 0) of one search that are a heuristic's choice: removed key -> the strategies that chose
    it (the other seeds are random). Example: greedy and angular both chose ``5,6`` -> ``{"5,6": ["angular",
    "greedy"]}``."""
    seeds = {r["removed"] for r in rows if r["generation"] == 0}
    labels: dict[str, list[str]] = {}
    for choice in choices:
        if choice["removed"] in seeds and not is_search(choice["strategy"]):
            labels.setdefault(choice["removed"], []).append(choice["strategy"])
    return {key: sorted(set(names), key=_strategy_order) for key, names in labels.items()}


def _strategy_order(name: str) -> tuple[int, str]:
    """Registry order of the strategy lines (last-n, angular, ..., greedy, search, oracle); a unit's after."""
    lines = signals.strategy_lines()
    base = name if name in STRATEGIES or name == signals.ORACLE else name.rpartition("-")[0]
    return (lines.index(base) if base in lines else len(lines), name)


# ---------------------------------------------------------------------------------------------- the table


@dataclass
class Entry:
    """One table row: a strategy's choice of one size, with its calibration score and its test row."""

    strategy: str
    removed: str
    calibration: str
    """The calibration score cell."""
    test: Row | None
    """Its row of ``results_vs_baseline`` (None: not measured on the test text)."""


class SizeReport:
    """What the section says about one size: its searches, the choices and their scores."""

    def __init__(self, size: SearchSize, ctx: ReportContext, model_rows: list[Row]):
        self.size = size
        self.ctx = ctx
        self.searches = {k: rows for k, rows in searches(model_rows).items() if parse_search_id(k[3]) == size}
        self.choice = next((c for c in ctx.strategy_choices if size.is_choice(c)), None)
        key = _calib_key(self.choice) if self.choice else next((k[:3] for k in self.searches), None)
        self.calib_key = key
        same_text = [r for r in model_rows if _calib_key(r) == key
                     and getattr(parse_search_id(r["search"]), "fitness", None) == size.fitness]
        self.n_windows = max((r["n_windows"] for r in same_text), default=0)
        self.scored: dict[str, Row] = {}
        for row in same_text:  # the same calibration text and fitness: any search's row of a key is its score
            if row["removed"] not in self.scored or row["n_windows"] > self.scored[row["removed"]]["n_windows"]:
                self.scored[row["removed"]] = row

    def calibration_cell(self, removed: str, choice: Row | None) -> str:
        """The fitness of ``removed`` in the searches of this size's calibration text, else the choice's own
        score when it is a calibration perplexity of the same text, else ``—``."""
        kind, row = self.size.fitness, self.scored.get(removed)
        if row is not None and finite(row["fitness"]):
            partial = f" ({row['n_windows']} of {self.n_windows} windows)" if row["n_windows"] < self.n_windows else ""
            return format_score(shown(row["fitness"], kind), kind) + partial
        if (choice is not None and kind == "ppl" and choice["signal"] == "calib-ppl"
                and (self.calib_key is None or _calib_key(choice) == self.calib_key)):
            return format_ppl(choice.get("score"))
        return MISSING

    def _choices(self) -> list[Row]:
        """The heuristics' choices of this size (same unit and n; for a budget: those that seeded its searches),
        then the search's."""
        size, choices = self.size, self.ctx.strategy_choices
        if size.n is not None:
            heuristics = [c for c in choices if not is_search(c["strategy"]) and c["n"] == size.n
                          and unit_of(c["strategy"]) == size.unit]
        else:
            seeds = {r["removed"] for rows in self.searches.values() for r in rows if r["generation"] == 0}
            heuristics = [c for c in choices if not is_search(c["strategy"]) and c["removed"] in seeds]
        return heuristics + ([self.choice] if self.choice else [])

    def entries(self) -> list[Entry]:
        """Every strategy's choice of this size, in registry order (last-n and the oracle for block sizes, as the
        strategies table reads them from the results)."""
        tests = {r["removed"]: r for r in (*self.ctx.rows, *self.ctx.edit_rows)}
        found = [(c["strategy"], c["removed"], c) for c in self._choices()]
        if self.size.unit == "block" and self.size.n is not None:
            points = signals.strategy_points(self.ctx.rows, self.ctx.strategy_choices)
            found += [(name, points[name][self.size.n][0], None) for name in ("last-n", signals.ORACLE)
                      if self.size.n in points.get(name, {})]
        entries = [Entry(name, removed, self.calibration_cell(removed, choice), tests.get(removed))
                   for name, removed, choice in found]
        return sorted(entries, key=lambda e: _strategy_order(e.strategy))


CHOICE_COLUMNS = ("size", "strategy", "removed", "calibration score", "test perplexity (↓)",
                  "ppl change (%) [95 % interval]")


def _test_cells(row: Row | None) -> list[str]:
    if row is None:
        return ["not measured", MISSING]
    if row.get("status") != "ok":
        return [row.get("status") or MISSING, MISSING]
    return [format_ppl(row.get("ppl")), format_change_interval(row.get("ppl_change_pct"), row.get("ppl_change_low_pct"),
                                                               row.get("ppl_change_high_pct"))]


def choice_table(reports: Sequence[SizeReport]) -> str | None:
    """Markdown table: per size, every strategy's choice, its calibration score, test perplexity and change.

    Example::

        | size | strategy | removed | calibration score | test perplexity (↓) | ppl change (%) [95 % interval] |
        | --- | --- | --- | --- | --- | --- |
        | n = 2 | last-n | 2,3 | — | 57.00 | +90.0 % [+85.1, +95.3] |
        | n = 2 | greedy | 1,3 | 30.12 | 44.10 | +47.0 % [+43.2, +51.0] |
        | n = 2 | search | 0,3 | 29.41 | 42.90 | +43.0 % [+39.5, +46.8] |
    """
    rows = [[r.size.title, e.strategy, e.removed or "none", e.calibration, *_test_cells(e.test)]
            for r in reports for e in r.entries()]
    return table(CHOICE_COLUMNS, rows) if rows else None


# ---------------------------------------------------------------------------------------------- the verdict


def _measured(entry: Entry) -> bool:
    return entry.test is not None and entry.test.get("status") == "ok" and finite(entry.test.get("ppl"))


def _endpoints(interval: intervals.Interval) -> str:
    return f"[{format_pct(interval.low).removesuffix(' %')}, {format_pct(interval.high).removesuffix(' %')}]"


def verdict(size: SearchSize, entries: Sequence[Entry], window_losses: dict, resamples: int) -> str:
    """One sentence: the search's test perplexity against the best heuristic's (lowest test perplexity of the
    non-search strategies of the size, the oracle excepted), with their paired interval over the test windows.

    Example: greedy 45.20, search 43.10, search lower on every window ->
    ``"n = 8: the search's gain over greedy (45.20 → 43.10, -4.6 %, paired interval [-6.1, -3.2]) is real."``
    """
    found = next((e for e in entries if e.strategy == size.strategy), None)
    rivals = sorted((e for e in entries if not is_search(e.strategy) and e.strategy != signals.ORACLE
                     and _measured(e)), key=lambda e: e.test["ppl"])
    if found is None:
        return f"{size.title}: the search has chosen nothing yet."
    if not _measured(found):
        return f"{size.title}: the search's choice `{found.removed}` has no test perplexity yet."
    if not rivals:
        return f"{size.title}: no heuristic's choice of this size is measured on the test text to compare with."
    best = rivals[0]
    if best.removed == found.removed:
        return f"{size.title}: the search chose the same variant as {best.strategy} (`{found.removed}`)."
    mine, theirs = window_losses.get(found.removed), window_losses.get(best.removed)
    numbers = f"{format_ppl(best.test['ppl'])} → {format_ppl(found.test['ppl'])}"
    change = 100.0 * (found.test["ppl"] / best.test["ppl"] - 1.0)
    word = "gain over" if change <= 0 else "loss against"
    if mine is None or theirs is None or len(mine[0]) != len(theirs[0]):
        return (f"{size.title}: the search's {word} {best.strategy} ({numbers}, {format_pct(change)}) cannot be "
                "judged: the two have no per-window test losses on the same windows.")
    i = intervals.difference_interval(mine[0], theirs[0], mine[1], resamples)
    numbers += f", {format_pct(i.change)}, paired interval {_endpoints(i)}"
    if not i.excludes_zero:
        return f"{size.title}: the search's {word} {best.strategy} ({numbers}) is within noise."
    if i.change < 0:
        return f"{size.title}: the search's gain over {best.strategy} ({numbers}) is real."
    return f"{size.title}: the search is worse than {best.strategy} on the test text ({numbers}), beyond noise."


# ---------------------------------------------------------------------------------------------- the figure


def run_of(search: str) -> str:
    """What follows the size in a search id: ``"block/ppl/n=8/seed=0/level=0.95"`` -> ``"seed=0/level=0.95"``."""
    return "/".join(search.split("/")[3:])


def _line_label(key: SearchKey, keys: Sequence[SearchKey]) -> str:
    """``search``, or what tells the searches of one panel apart: seed and level, and the calibration text."""
    if len(keys) == 1:
        return "search"
    text = f", calibration {key[2][:6]}" if len({k[2] for k in keys}) > 1 else ""
    return (run_of(key[3]) or "search") + text


def _draw_references(ax, rows: Sequence[Row], labels: dict[str, list[str]], kind: str) -> None:
    """A dashed line per heuristic seed of one search at its calibration score (dotted: dropped before the last
    window, its score on the windows it was measured on)."""
    full = max((r["n_windows"] for r in rows), default=0)
    for row in rows:
        names = labels.get(row["removed"])
        value = shown(row["fitness"], kind)
        if not names or row["generation"] != 0 or value is None:
            continue
        partial = row["n_windows"] < full
        color = plotting.SERIES[_strategy_order(names[0])[0] % len(plotting.SERIES)]
        dropped = f" (dropped after {row['n_windows']} of {full} windows)" if partial else ""
        ax.axhline(value, color=color, linestyle=":" if partial else "--", linewidth=1.0,
                   label=" + ".join(names) + dropped)


def tokens_label(tokens: float) -> str:
    """A tick label of tokens: ``800 -> "800"``, ``2000 -> "2k"``, ``1500000 -> "1.5M"``."""
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if tokens >= scale:
            return f"{tokens / scale:g}{suffix}"
    return f"{tokens:g}"


def _token_axis(axis) -> None:
    """A log axis labelled at 1, 2 and 5 of each decade in plain text (the report draws with mathtext off, so
    matplotlib's 10^k labels would show their markup)."""
    axis.axes.set_xscale("log")
    axis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda x, _: tokens_label(x)))
    axis.set_minor_formatter(NullFormatter())


def _draw_panel(ax, report: SizeReport) -> None:
    kind, keys = report.size.fitness, list(report.searches)
    for k, key in enumerate(keys):
        rows = report.searches[key]
        points = [(spent, shown(f, kind)) for spent, f in trajectory(rows)]
        if points:
            end = max(r["spent"] for r in rows)
            xs, ys = [p[0] for p in points] + [max(end, points[-1][0])], [p[1] for p in points] + [points[-1][1]]
            ax.step(xs, ys, where="post", color=plotting.NEUTRAL if len(keys) == 1 else plotting.SERIES[k % 10],
                    linewidth=1.6, label=_line_label(key, keys))
            ax.plot([p[0] for p in points], [p[1] for p in points], "o", markersize=3,
                    color=plotting.NEUTRAL if len(keys) == 1 else plotting.SERIES[k % 10])
        _draw_references(ax, rows, heuristic_labels(rows, report.ctx.strategy_choices), kind)
    _token_axis(ax.xaxis)
    ax.set_xlabel("calibration tokens spent (log scale)")
    if kind == "ppl":  # a poor seed's line (often angular's) sits many times above the search's: ratios read evenly
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda y, _: f"{y:g}" if str(f"{y:g}")[0] in "25" else ""))
        ax.set_ylabel("best calibration perplexity so far (log scale)")
    else:
        ax.set_ylabel("best mean KL to the full model so far")
        ax.ticklabel_format(axis="y", useOffset=False)  # scores read as they are, not as offsets from a constant
    ax.set_title(report.size.title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)


@plotting.styled
def plot_search(reports: Sequence[SizeReport], subtitle: str) -> Figure | None:
    """The best calibration score against calibration tokens spent, one panel per size with its heuristics' seeds
    as reference lines; None without a search measured.

    Tokens are on a log axis: the leader improves mostly in the first generations, while the budget runs to
    hundreds of calibration passes; a linear axis would crowd every improvement against its left edge.
    """
    drawn = [r for r in reports if any(trajectory(rows) for rows in r.searches.values())]
    if not drawn:
        return None
    cols = min(3, len(drawn))
    nrows = math.ceil(len(drawn) / cols)
    fig, axes = plotting.new_figure(0.65 * cols if cols > 1 else 1.0, 1.1 * nrows, nrows, cols, squeeze=False)
    for ax, report in zip(axes.flat, drawn):
        _draw_panel(ax, report)
    for ax in list(axes.flat)[len(drawn):]:
        ax.set_visible(False)
    plotting.titled(fig, "Search: best calibration score against tokens spent", subtitle,
                    "Dashed: a heuristic's choice, raced as a seed of the same search (dotted: dropped by the race). "
                    "Random seeds are not drawn.")
    return fig


# ---------------------------------------------------------------------------------------------- the section


def size_reports(ctx: ReportContext) -> list[SizeReport]:
    """One :class:`SizeReport` per size with a stored search or a search choice, in unit, fitness, size order."""
    rows = rows_of_setup(ctx.search_rows, ctx.strategy_choices)
    sizes = {s for s in (parse_search_id(r["search"]) for r in rows) if s is not None}
    sizes |= {s for s in (size_of_choice(c) for c in ctx.strategy_choices) if s is not None}
    return [SizeReport(s, ctx, rows) for s in sorted(sizes, key=SearchSize.sort_key)]


def _summary(report: SizeReport) -> str:
    """``n = 8, seed=0/level=0.95: 143 candidates (25 on every window), 1,234,567 calibration tokens``."""
    parts = []
    for key, rows in report.searches.items():
        full = max(r["n_windows"] for r in rows)
        spent = max(r["spent"] for r in rows)
        run = run_of(key[3])
        parts.append(f"{report.size.title}{', ' + run if run else ''}: {len(rows):,} candidates "
                     f"({sum(r['n_windows'] == full for r in rows):,} on every window), {spent:,} calibration tokens")
    return "; ".join(parts)


INTRO = ("`--strategy search` starts from the heuristics' choices and random ones, races mutants of the best removal "
         "so far on the calibration text (a paired interval over its windows drops the clearly worse early) and keeps "
         "a mutant only when its score on all the windows is lower than the leader's. Calibration score: calibration "
         "perplexity (mean KL to the full model for `--fitness kl`) on the search's calibration text, on every window "
         "unless said; test perplexity and its change against the baseline on the evaluation text.")


def search_section(ctx: ReportContext) -> str | None:
    """``## Search``: the trajectory figure, the table of choices per size and a verdict per size; None when the
    database has no search for this setup's model."""
    reports = size_reports(ctx)
    if not reports:
        return None
    image = ctx.figure("search", "best calibration score against calibration tokens spent, per size",
                       lambda: plot_search(reports, ctx.subtitle()))
    resamples = ctx.resamples or intervals.RESAMPLES
    verdicts = [f"- {verdict(r.size, r.entries(), ctx.window_losses, resamples)}" for r in reports]
    summaries = [s for s in (_summary(r) for r in reports) if s]
    parts = ["## Search", INTRO, image, "Searches: " + "; ".join(summaries) + "." if summaries else None,
             choice_table(reports),
             f"Is the search's test perplexity really lower than the best heuristic's (the lowest of the other "
             f"strategies of the size, the oracle aside)? Paired bootstrap over the test windows ({resamples:,} "
             f"resamples, 95 %):", "\n".join(verdicts)]
    return "\n\n".join(p for p in parts if p)
