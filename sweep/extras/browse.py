"""`sweep browse`: results.db in a browser through Datasette, read-only, with the report's questions as canned
queries and interactive charts.

Nothing here imports torch or the engine, and nothing here runs SQL: the canned queries and chart queries below are
data handed to Datasette (https://datasette.io), which opens the file read-only (``?mode=ro``) and runs them. Not
in immutable mode: immutable tells SQLite the file never changes, and a sweep writing beside it then shows stale
pages, counts that go backwards, even "database disk image is malformed".

- :func:`metadata`: Datasette's metadata, generated from :mod:`sweep.store.schema` (every table, view and column
  with its unit and which way is better), the :data:`CANNED_QUERIES` and the dashboard of :data:`CHARTS`;
- :func:`serve`: starts the server and stops cleanly on Ctrl-C.

Every canned query reads one setup: ``setup`` when given, else the newest setup of ``model`` (of any model when
both are empty), as :func:`sweep.ranking.newest_setup` chooses it; ``n`` (number of layers removed) filters
where it applies, empty = every n.
"""
from __future__ import annotations

import asyncio
import contextlib
import html
import io
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sweep.errors import ConfigError, MissingExtraError, StoreError
from sweep.plan import reported_strategies
from sweep.store.schema import MODELS, RESULTS, RESULTS_VS_BASELINE, TABLES, VIEWS, Column, Table, View
from sweep.store.schema import SETUPS as SETUPS_TABLE

DASHBOARD = "sweep"
"""Slug of the charts page: ``/-/dashboards/sweep``."""

SETTINGS = {"sql_time_limit_ms": 5000, "max_returned_rows": 20_000, "facet_time_limit_ms": 500}
"""Datasette settings: chart queries return every variant of an exhaustive sweep of up to 14 layers at once."""

FINITE = "9e999"
"""SQLite reads ``9e999`` as +inf: ``abs(x) < 9e999`` is true exactly for finite x (NULL, i.e. NaN, is not)."""

# ---------------------------------------------------------------------------------------------- the setup read

SETUP_RANK = """setup_rank AS (
    SELECT s.id AS setup, m.name AS model, s.model_id, s.weights, m.n_layers AS model_layers,
           row_number() OVER (ORDER BY count(r.removed) > 0 DESC, coalesce(s.created_at, '') DESC,
                              coalesce(max(r.measured_at), '') DESC, s.id DESC) AS newness
    FROM setups s JOIN models m ON m.id = s.model_id LEFT JOIN results r ON r.setup_id = s.id
    WHERE :model = '' OR m.name = :model OR s.id IN ({ids})
    GROUP BY s.id
)"""
"""The setups of ``:model`` (every setup when empty) ranked as :func:`sweep.ranking.newest_setup` ranks them:
those with results first, then by creation time, last measurement and id, newest first (``newness`` 1)."""

CHOSEN = "chosen AS (SELECT * FROM setup_rank WHERE setup = :setup OR (:setup = '' AND newness = 1))"
"""The setup a query reads: ``:setup``, or the newest one."""

OTHER = """other AS (
    SELECT * FROM setup_rank WHERE setup = :other OR (:other = '' AND setup = (
        SELECT r.setup FROM setup_rank r JOIN chosen c ON r.model = c.model AND r.setup != c.setup
        ORDER BY r.newness LIMIT 1))
)"""
"""The second setup of a comparison: ``:other``, or the newest other setup of the same model."""


def _with(*ctes: str, other: bool = False) -> str:
    """``WITH RECURSIVE`` the chosen setup (and the other one), then ``ctes``."""
    ids = ":setup, :other" if other else ":setup"
    parts = [SETUP_RANK.format(ids=ids), CHOSEN, *([OTHER] if other else []), *ctes]
    return "WITH RECURSIVE " + ",\n".join(parts) + "\n"


ROWS = ("rows AS (SELECT v.* FROM results_vs_baseline v JOIN chosen c ON v.setup = c.setup "
        "WHERE v.removed NOT GLOB '*[a-z]*')")
"""Whole-block variants only (keys of digits and commas), as the report's block sections: unit removals and
order edits (``a3``, ``r3``) have their own report sections and would mix into the per-size queries."""
"""Every variant of the chosen setup: the view's rows."""
MEASURED = f"measured AS (SELECT * FROM rows WHERE status = 'ok' AND abs(ppl) < {FINITE})"
"""Status ok with a finite perplexity: :func:`sweep.ranking.is_measured`."""
N_FILTER = "(:n = '' OR {column} = cast(:n AS integer))"
VARIANT = "CASE WHEN {t}removed = '' THEN 'none (baseline)' ELSE {t}removed END AS variant"
PPL = "round({t}ppl, 3) AS ppl"
PCT = "round({t}{c}, 2) AS {c}"
"""Shown rounded (perplexity to 3 decimals, changes in % to 2); every choice is made on the stored numbers."""

# ---------------------------------------------------------------------------------------------- canned queries


@dataclass(frozen=True)
class CannedQuery:
    """A question with its SQL. Output columns named like a view column are described by the schema; the
    others by ``columns`` (``name -> meaning``)."""

    name: str
    title: str
    doc: str
    ctes: str
    """The ``WITH`` clause."""
    select: str
    """The statement after it, whose output columns :func:`output_columns` reads."""
    columns: dict[str, str] = field(default_factory=dict)

    @property
    def sql(self) -> str:
        return self.ctes + self.select.strip()

    @property
    def params(self) -> list[str]:
        """The form fields: every ``:name`` of the SQL, in order of first use."""
        return list(dict.fromkeys(re.findall(r"(?<![:\w]):(\w+)", self.sql)))


def output_columns(select: str) -> list[str]:
    """Names of the columns a ``SELECT`` returns: each item's alias, or the column it names.

    Example: ``SELECT k.n_removed, b.removed AS best, (SELECT x FROM y) AS z FROM ...`` -> n_removed, best, z.
    """
    body, depth, items, item = select.strip()[len("SELECT"):], 0, [], ""
    for i, char in enumerate(body):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if depth == 0 and re.match(r"\sFROM\s", body[i:i + 6]):
            break
        if depth == 0 and char == ",":
            items.append(item)
            item = ""
        else:
            item += char
    items.append(item)
    return [re.search(r"(\w+)\s*$", it).group(1) for it in items]


VIEW_COLUMNS = {c.name: c for c in RESULTS_VS_BASELINE.columns}
"""The view's columns: the canned queries' output columns of the same name are described by them."""

EXTRA_COLUMNS = {
    "variant": "the removed layers, or none (baseline)",
    "params_millions": "parameters, embeddings included (unit: millions; lower is better)",
}
"""Columns the canned queries add to the view's, described once here."""

COLUMN_MEANINGS = {c.name: c.description for table in (MODELS, SETUPS_TABLE, RESULTS, RESULTS_VS_BASELINE)
                   for c in table.columns} | EXTRA_COLUMNS
"""What an output column of a canned query means, unless the query says otherwise: the schema's description of
the view's column of that name, else of the results, setups or models column."""


def _pareto_ctes(cost: str) -> str:
    """Variants ordered by (``cost``, ppl, removed) keep the ones whose perplexity is below every earlier one's:
    :func:`sweep.ranking.pareto_front`, as a running minimum over a window (``best_cheaper_ppl``)."""
    return _with(ROWS, MEASURED, f"""ordered AS (
    SELECT *, min(ppl) OVER (ORDER BY {cost}, ppl, removed ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING)
              AS best_cheaper_ppl
    FROM measured WHERE abs({cost}) < {FINITE}
)""")


ON_FRONT = "(ordered.best_cheaper_ppl IS NULL OR ordered.ppl < ordered.best_cheaper_ppl)"
PARETO_COLUMNS = (f"{VARIANT.format(t='')}, removed, n_removed, n_layers, {PPL.format(t='')}, "
                  f"{PCT.format(t='', c='ppl_change_pct')}, round(speed_ms, 3) AS speed_ms, "
                  f"{PCT.format(t='', c='speed_change_pct')}, round(params / 1e6, 3) AS params_millions, "
                  f"{PCT.format(t='', c='params_change_pct')}")


def _pareto_query(cost: str, name: str, title: str, what: str) -> CannedQuery:
    return CannedQuery(name, title, f"The measured variants that no other beats on both perplexity and {what}, "
                       "from the cheapest (sweep.ranking.pareto_front).", _pareto_ctes(cost),
                       f"SELECT {PARETO_COLUMNS}\nFROM ordered WHERE {ON_FRONT}\n"
                       f"ORDER BY ordered.{cost}, ordered.ppl, ordered.removed")


BEST_AND_WORST = CannedQuery("best-and-worst", "Best and worst variant per number of layers removed", (
    "For each n, the lowest- and highest-perplexity variant; diverged variants rank below every measured one, "
    "failed ones are counted but not ranked (as in the report's table)."), _with(ROWS, f"""ranked AS (
    SELECT *, CASE WHEN status = 'ok' AND ppl IS NOT NULL THEN 0 WHEN status = 'diverged' THEN 1 ELSE 2 END AS grade
    FROM rows WHERE n_removed >= 1 AND {N_FILTER.format(column='n_removed')}
)""", """ordered AS (
    SELECT *, row_number() OVER (PARTITION BY n_removed ORDER BY grade, CASE WHEN grade = 0 THEN ppl ELSE 0 END,
                                 removed) AS from_best,
              row_number() OVER (PARTITION BY n_removed ORDER BY grade DESC,
                                 CASE WHEN grade = 0 THEN ppl ELSE 0 END DESC, removed DESC) AS from_worst
    FROM ranked WHERE status != 'failed'
)""", """sizes AS (
    SELECT n_removed, count(*) AS variants, sum(status = 'diverged') AS diverged, sum(status = 'failed') AS failed
    FROM ranked GROUP BY n_removed
)"""), """
SELECT k.n_removed, k.variants, k.diverged, k.failed,
       b.removed AS best, round(b.ppl, 3) AS best_ppl, round(b.ppl_change_pct, 2) AS best_ppl_change_pct,
       w.removed AS worst, round(w.ppl, 3) AS worst_ppl, round(w.ppl_change_pct, 2) AS worst_ppl_change_pct,
       w.status AS worst_status
FROM sizes k LEFT JOIN ordered b ON b.n_removed = k.n_removed AND b.from_best = 1
LEFT JOIN ordered w ON w.n_removed = k.n_removed AND w.from_worst = 1
ORDER BY k.n_removed""", {
    "variants": "variants of this size in the setup", "diverged": "of them diverged (NaN/inf perplexity)",
    "failed": "of them failed (an error stopped the measurement)", "best": "key of the best variant",
    "best_ppl": "its perplexity (lower is better)", "best_ppl_change_pct": "its perplexity change (unit: %)",
    "worst": "key of the worst variant", "worst_ppl": "its perplexity (inf when diverged)",
    "worst_ppl_change_pct": "its perplexity change (unit: %)", "worst_status": "its status"})

PARETO_SPEED = _pareto_query("speed_ms", "pareto-speed", "Pareto front: perplexity against prefill time",
                             "prefill time")
PARETO_PARAMS = _pareto_query("params", "pareto-params", "Pareto front: perplexity against parameters",
                              "parameter count")

PAIR_INTERACTIONS = CannedQuery("pair-interactions", "Strongest pair interactions", (
    "Each measured pair removal (i, j), strongest interaction first: interaction = change(i, j) − change(i) − "
    "change(j) in percentage points; positive = removing both hurts more than the two singles add up to, "
    "negative = less (the layers do redundant work)."), _with(ROWS, MEASURED, """pairs AS (
    SELECT *, cast(substr(removed, 1, instr(removed, ',') - 1) AS integer) AS i,
              cast(substr(removed, instr(removed, ',') + 1) AS integer) AS j
    FROM measured WHERE n_removed = 2 AND EXISTS (SELECT 1 FROM measured WHERE removed = '')
)"""), """
SELECT p.i, p.j, p.removed, round(p.ppl, 3) AS ppl, round(p.ppl_change_pct, 2) AS ppl_change_pct,
       round(a.ppl_change_pct, 2) AS change_i_pct, round(b.ppl_change_pct, 2) AS change_j_pct,
       round(p.ppl_change_pct - (a.ppl_change_pct + b.ppl_change_pct), 2) AS interaction_pp
FROM pairs p
LEFT JOIN measured a ON a.n_removed = 1 AND a.removed = cast(p.i AS text)
LEFT JOIN measured b ON b.n_removed = 1 AND b.removed = cast(p.j AS text)
ORDER BY interaction_pp IS NULL, abs(interaction_pp) DESC, p.i, p.j""", {
    "i": "first layer of the pair", "j": "second layer",
    "change_i_pct": "perplexity change without layer i alone (unit: %)",
    "change_j_pct": "perplexity change without layer j alone (unit: %)",
    "interaction_pp": "change(i, j) − change(i) − change(j) (unit: percentage points; NULL without both singles)"})

STRATEGY_LINES = (*reported_strategies(), "oracle")
"""The report's order of strategies (:func:`sweep.report.signals.strategy_lines`), from the strategy registry."""
STRATEGY_ORDER = ("CASE p.strategy " + " ".join(f"WHEN '{name}' THEN {rank}"
                                                 for rank, name in enumerate(STRATEGY_LINES))
                  + f" ELSE {len(STRATEGY_LINES)} END")
"""Orders the strategies-vs-oracle rows as the report does (generated from the registry)."""

STRATEGIES = CannedQuery("strategies-vs-oracle", "Strategies against the oracle", (
    "The variant each strategy chose for each n (last-n, and the signal strategies' stored choices) with its "
    "perplexity and its gap to the oracle: the best variant of that size, known only when every C(L, n) variant "
    "is measured (as in the report's strategy table)."), _with(ROWS, MEASURED, """layers AS (
    SELECT model_layers AS n_layers FROM chosen
)""", """sizes(n, variants) AS (
    SELECT 0, 1
    UNION ALL SELECT n + 1, variants * ((SELECT n_layers FROM layers) - n) / (n + 1) FROM sizes
    WHERE n < (SELECT n_layers FROM layers)
)""", """last_n(n, removed) AS (
    SELECT 1, cast((SELECT n_layers FROM layers) - 1 AS text) WHERE (SELECT n_layers FROM layers) >= 1
    UNION ALL SELECT n + 1, cast((SELECT n_layers FROM layers) - n - 1 AS text) || ',' || removed FROM last_n
    WHERE n < (SELECT n_layers FROM layers)
)""", """oracle AS (
    SELECT s.n, (SELECT o.removed FROM measured o WHERE o.n_removed = s.n ORDER BY o.ppl, o.removed LIMIT 1)
                AS removed
    FROM sizes s WHERE s.n >= 1 AND s.variants = (
        SELECT count(*) FROM rows r WHERE r.n_removed = s.n AND r.status IN ('ok', 'diverged'))
)""", """choices AS (
    SELECT x.strategy, x.n, x.removed,
           row_number() OVER (PARTITION BY x.strategy, x.n ORDER BY x.chosen_at DESC) AS newest
    FROM strategy_choices x JOIN chosen c ON c.model_id = x.model_id AND c.weights = x.weights
)""", """points AS (
    SELECT 'last-n' AS strategy, n, removed FROM last_n
    UNION ALL SELECT strategy, n, removed FROM choices WHERE newest = 1
    UNION ALL SELECT 'oracle', n, removed FROM oracle WHERE removed IS NOT NULL
)"""), f"""
SELECT p.n AS n_removed, p.strategy, p.removed, round(v.ppl, 3) AS ppl, round(v.ppl_change_pct, 2) AS ppl_change_pct,
       o.removed AS oracle_removed, round(ov.ppl, 3) AS oracle_ppl,
       round(100.0 * (v.ppl / ov.ppl - 1.0), 2) AS gap_to_oracle_pct
FROM points p JOIN measured v ON v.removed = p.removed
LEFT JOIN oracle o ON o.n = p.n LEFT JOIN measured ov ON ov.removed = o.removed
WHERE {N_FILTER.format(column='p.n')}
ORDER BY p.n, {STRATEGY_ORDER}, p.strategy""", {
    "strategy": f"{', '.join(STRATEGY_LINES[:-1])}, or oracle (the best variant of this size)",
    "oracle_removed": "the oracle's variant (NULL unless every variant of this size is measured)",
    "oracle_ppl": "its perplexity", "gap_to_oracle_pct": "100 (ppl / oracle ppl − 1) (unit: %; lower is better)"})

TASKS = CannedQuery("tasks-vs-perplexity", "Task accuracy against perplexity", (
    "Each variant's accuracy on every lm-eval task measured for the model (`sweep tasks`), with its perplexity "
    "in the chosen setup; healed rows (`sweep heal`) of that setup show the healed perplexity."), _with(ROWS), f"""
SELECT ts.task, ts.num_fewshot, ts.task_limit, t.removed, t.n_removed, t.heal_id, t.metric, t.value, t.stderr,
       t.value - base.value AS value_change, round(CASE WHEN t.heal_id = '' THEN v.ppl ELSE h.ppl END, 3) AS ppl,
       round(v.ppl_change_pct, 2) AS ppl_change_pct, t.n_samples, t.setup_id AS task_setup
FROM task_results t JOIN task_setups ts ON ts.id = t.setup_id JOIN chosen c ON c.model_id = ts.model_id
LEFT JOIN rows v ON v.removed = t.removed
LEFT JOIN heals h ON h.id = t.heal_id
LEFT JOIN task_results base ON base.setup_id = t.setup_id AND base.removed = '' AND base.heal_id = ''
    AND base.status = 'ok'
WHERE t.status = 'ok' AND (t.heal_id = '' OR h.setup_id = c.setup) AND {N_FILTER.format(column='t.n_removed')}
ORDER BY ts.task, ts.created_at, t.n_removed, t.removed, t.heal_id""", {
    "task": "lm-eval task", "num_fewshot": "few-shot examples", "task_limit": "examples evaluated (NULL = all)",
    "heal_id": "heals.id, or empty for the variant as pruned", "metric": "headline metric (acc, ...)",
    "value": "its value (a fraction for accuracies; higher is better)", "stderr": "its standard error",
    "value_change": "value − the unpruned model's value on the same task settings (higher is better)",
    "ppl": "perplexity of the variant (healed: after healing) in the chosen setup (lower is better)",
    "n_samples": "examples evaluated", "task_setup": "task_setups.id"})

VARIANT_EXTRA = ("ppl_change_pct", "speed_change_pct", "decode_change_pct", "params_change_pct")
"""The view's columns a variant's record adds to its results row."""


def _record_query() -> CannedQuery:
    """One row per column of the variant's results row and its changes: (column, value, meaning)."""
    columns = [*RESULTS.columns, *(VIEW_COLUMNS[name] for name in VARIANT_EXTRA)]
    picks = [f"SELECT {i} AS position, '{c.name}' AS column, {c.name} AS value, "
             f"'{c.description.replace(chr(39), chr(39) * 2)}' AS meaning FROM variant"
             for i, c in enumerate(columns, 1)]
    variant = ("variant AS (\n    SELECT r.*, " + ", ".join(f"v.{name}" for name in VARIANT_EXTRA) + "\n"
               "    FROM results r JOIN chosen c ON r.setup_id = c.setup\n"
               "    JOIN results_vs_baseline v ON v.setup = r.setup_id AND v.removed = r.removed\n"
               "    WHERE r.removed = :removed\n)")
    return CannedQuery("variant", "A variant's full record", (
        "Every stored column of one variant (removed = its key, e.g. 1,3; empty = the baseline) with its meaning."),
        _with(variant), "SELECT column, value, meaning FROM (\n" + "\nUNION ALL ".join(picks) + "\n) ORDER BY position",
        {"column": "column of table results (or a change of the view)", "value": "its value",
         "meaning": "what it holds"})


VARIANT_RECORD = _record_query()

COMPARE = CannedQuery("compare-setups", "Two setups side by side", (
    "Every variant of two setups, matched by key: setup (empty = the newest of model) against other (empty = "
    "the newest other setup of the same model)."), _with(
    "a AS (SELECT v.* FROM results_vs_baseline v JOIN chosen c ON v.setup = c.setup)",
    "b AS (SELECT v.* FROM results_vs_baseline v JOIN other o ON v.setup = o.setup)",
    "variants AS (SELECT removed, n_removed FROM a UNION SELECT removed, n_removed FROM b)", other=True), f"""
SELECT k.removed, k.n_removed, round(a.ppl, 3) AS ppl_a, round(b.ppl, 3) AS ppl_b,
       round(100.0 * (b.ppl / a.ppl - 1.0), 2) AS ppl_b_vs_a_pct,
       round(a.ppl_change_pct, 2) AS ppl_change_pct_a, round(b.ppl_change_pct, 2) AS ppl_change_pct_b,
       round(a.speed_ms, 3) AS speed_ms_a, round(b.speed_ms, 3) AS speed_ms_b,
       round(100.0 * (b.speed_ms / a.speed_ms - 1.0), 2) AS speed_b_vs_a_pct,
       a.status AS status_a, b.status AS status_b,
       (SELECT setup FROM chosen) AS setup_a, (SELECT setup FROM other) AS setup_b
FROM variants k LEFT JOIN a ON a.removed = k.removed LEFT JOIN b ON b.removed = k.removed
WHERE {N_FILTER.format(column='k.n_removed')}
ORDER BY k.n_removed, k.removed""", {
    "ppl_a": "perplexity in setup a", "ppl_b": "perplexity in setup b",
    "ppl_b_vs_a_pct": "100 (ppl_b / ppl_a − 1) (unit: %)",
    "ppl_change_pct_a": "change against a's baseline (unit: %)",
    "ppl_change_pct_b": "change against b's baseline (unit: %)", "speed_ms_a": "prefill time in a (unit: ms)",
    "speed_ms_b": "prefill time in b (unit: ms)", "speed_b_vs_a_pct": "100 (speed_ms_b / speed_ms_a − 1) (unit: %)",
    "status_a": "status in a", "status_b": "status in b", "setup_a": "setup a", "setup_b": "setup b"})

SETUPS = CannedQuery("setups", "Setups", (
    "Every setup (of model, when given), the newest of each model first: the ids to type into the other queries' "
    "setup field."), "", """
SELECT m.name AS model, s.id AS setup,
       row_number() OVER (PARTITION BY m.name ORDER BY count(r.removed) > 0 DESC, coalesce(s.created_at, '') DESC,
                          coalesce(max(r.measured_at), '') DESC, s.id DESC) = 1 AS newest,
       s.data, s.max_length, s.stride, s.max_tokens, s.latency_seq, m.dtype, s.device, s.weights,
       s.engine_version, count(r.removed) AS variants, sum(r.status = 'ok') AS ok, s.created_at,
       max(r.measured_at) AS last_measured_at
FROM setups s JOIN models m ON m.id = s.model_id LEFT JOIN results r ON r.setup_id = s.id
WHERE :model = '' OR m.name = :model
GROUP BY s.id ORDER BY m.name, newest DESC, s.created_at DESC""", {
    "newest": "1 for the setup reported (and queried) by default", "variants": "variants stored",
    "ok": "of them measured", "last_measured_at": "last measurement (UTC)"})

CANNED_QUERIES: tuple[CannedQuery, ...] = (BEST_AND_WORST, PARETO_SPEED, PARETO_PARAMS, PAIR_INTERACTIONS,
                                           STRATEGIES, TASKS, VARIANT_RECORD, COMPARE, SETUPS)
"""The questions of the report, one click each (``/<db>/<name>``); `sweep report` names them in its footer."""

# ---------------------------------------------------------------------------------------------- charts


def _axis(name: str, log: bool = False) -> dict[str, Any]:
    """A quantitative axis titled from the schema: ``median prefill time at batch 1 (ms)``."""
    column = VIEW_COLUMNS[name]
    unit = f" ({column.unit})" if column.unit else ""
    axis = {"field": name, "type": "quantitative", "title": column.doc + unit + (" — log scale" if log else "")}
    axis["scale"] = {"type": "log", "nice": False} if log else {"zero": False}
    return axis


TOOLTIP = [{"field": "variant", "title": "layers removed"}, {"field": "n_removed", "title": "n removed"},
           {"field": "ppl", "title": "perplexity", "format": ",.2f"},
           {"field": "ppl_change_pct", "title": "ppl change (%)", "format": "+,.1f"},
           {"field": "speed_ms", "title": "prefill (ms)", "format": ",.2f"},
           {"field": "params_millions", "title": "params (M)", "format": ",.2f"}]
"""What hovering over a point shows."""


def _pareto_chart(cost: str, title: str) -> dict[str, Any]:
    """Every measured variant, the front in red and joined by a step line (it lists the front first: a capped
    result still shows the whole front)."""
    x = _axis("speed_ms") if cost == "speed_ms" else {
        "field": "params_millions", "type": "quantitative", "title": "parameters (millions)", "scale": {"zero": False}}
    query = (_pareto_ctes(cost) + f"SELECT {PARETO_COLUMNS}, {ON_FRONT} AS on_front\nFROM ordered\n"
             "ORDER BY on_front DESC, ppl")
    return {"title": title, "library": "vega-lite", "query": query, "display": {
        "layer": [  # the line first: a layer on top of the points would catch the pointer
            {"transform": [{"filter": "datum.on_front == 1"}],
             "mark": {"type": "line", "interpolate": "step-after", "color": "#d62728", "point": False},
             "encoding": {"x": x, "y": _axis("ppl", log=True)}},
            {"mark": {"type": "point", "filled": True, "size": 60},
             "encoding": {"x": x, "y": _axis("ppl", log=True), "tooltip": TOOLTIP,
                          "color": {"field": "on_front", "type": "nominal", "title": "on the front",
                                    "scale": {"domain": [1, 0], "range": ["#d62728", "#9e9e9e"]},
                                    "legend": {"labelExpr": "datum.value == 1 ? 'yes' : 'no'"}}}},
        ]}}


PER_N_SQL = _with(ROWS, MEASURED) + (
    f"SELECT {VARIANT.format(t='')}, removed, n_removed, ppl, ppl_change_pct, speed_ms, "
    "round(params / 1e6, 3) AS params_millions FROM measured ORDER BY ppl")
SINGLES_SQL = _with(ROWS, MEASURED) + (
    f"SELECT cast(removed AS integer) AS layer, {VARIANT.format(t='')}, n_removed, ppl, ppl_change_pct, speed_ms, "
    "round(params / 1e6, 3) AS params_millions FROM measured WHERE n_removed = 1 ORDER BY layer")
SETUP_SQL = _with() + (
    "SELECT c.model, c.setup, s.data, s.max_length, s.stride, s.device, count(r.removed) AS variants "
    "FROM chosen c JOIN setups s ON s.id = c.setup LEFT JOIN results r ON r.setup_id = c.setup GROUP BY c.setup")

CHARTS: dict[str, dict[str, Any]] = {
    "setup": {"title": "Setup shown", "library": "table", "query": SETUP_SQL},
    "pareto-speed": _pareto_chart("speed_ms", "Pareto front: perplexity against prefill time"),
    "pareto-params": _pareto_chart("params", "Pareto front: perplexity against parameters"),
    "per-n": {"title": "Perplexity per number of layers removed", "library": "vega-lite", "query": PER_N_SQL,
              "display": {"layer": [
                  {"mark": {"type": "line", "color": "#d62728", "point": False},
                   "encoding": {"x": {"field": "n_removed", "type": "quantitative"},
                                "y": {"aggregate": "min", "field": "ppl", "type": "quantitative"}}},
                  {"mark": {"type": "point", "opacity": 0.6},
                   "encoding": {"x": {"field": "n_removed", "type": "quantitative", "title": "layers removed",
                                      "axis": {"tickMinStep": 1}},
                                "y": _axis("ppl", log=True), "tooltip": TOOLTIP}}]}},
    "singles": {"title": "Removing one layer: perplexity change", "library": "vega-lite", "query": SINGLES_SQL,
                "display": {"mark": {"type": "bar"},
                            "encoding": {"x": {"field": "layer", "type": "ordinal", "title": "layer removed",
                                               "axis": {"labelAngle": 0}},
                                         "y": {**_axis("ppl_change_pct"), "scale": {"zero": True},
                                               "title": "perplexity change against the baseline (%)"},
                                         "tooltip": TOOLTIP}}},
}
"""The charts page: Pareto fronts, perplexity per n and the single-removal bars (Vega-Lite, served locally by
datasette-dashboards); hovering a point shows its variant."""

LAYOUT = [["setup", "setup"], ["pareto-speed", "pareto-params"], ["per-n", "singles"]]


def dashboard(db_name: str) -> dict[str, Any]:
    """The ``datasette-dashboards`` configuration of the charts page, reading database ``db_name``."""
    return {
        "title": "sweep: layer removal",
        "description": "One setup of one model: choose them above (empty = the newest setup). "
                       "Hover over a point to see its variant.",
        "layout": LAYOUT,
        "filters": {
            "model": {"name": "model", "type": "select", "db": db_name,
                      "query": "SELECT name FROM models ORDER BY name"},
            "setup": {"name": "setup", "type": "select", "db": db_name,
                      "query": "SELECT s.id FROM setups s JOIN models m ON m.id = s.model_id "
                               "WHERE TRUE [[ AND m.name = :model ]] ORDER BY s.created_at DESC"},
        },
        "charts": {slug: {**chart, "db": db_name} for slug, chart in CHARTS.items()},
    }

# ---------------------------------------------------------------------------------------------- metadata


def database_name(path: Path) -> str:
    """The name Datasette gives a file: its stem (``results.db`` -> ``results``)."""
    return path.stem


def database_route(name: str) -> str:
    """The name as it appears in URLs, tilde-encoded as Datasette does: ``demo.v2`` -> ``demo~2Ev2``."""
    return "".join(c if c.isascii() and (c.isalnum() or c in "_-") else "+" if c == " "
                   else "".join(f"~{b:02X}" for b in c.encode()) for c in name)


def _columns(columns: tuple[Column, ...]) -> dict[str, str]:
    return {c.name: c.description for c in columns}


def table_metadata(item: Table | View) -> dict[str, Any]:
    """Datasette's description of a table or view and of each of its columns, from the schema."""
    described = {"description": item.doc, "columns": _columns(item.columns)}
    if item.name in ("results", "results_vs_baseline"):
        described["facets"] = (["model"] if item.name == "results_vs_baseline" else []) + ["n_removed", "status"]
    return described


def query_metadata(query: CannedQuery) -> dict[str, Any]:
    """Datasette's canned query: title, SQL, form fields, and the meaning of each output column."""
    meanings = {**COLUMN_MEANINGS, **query.columns}
    items = "".join(f"<li><code>{name}</code>: {html.escape(meanings[name])}</li>"
                    for name in output_columns(query.select) if name in meanings)
    fields = ", ".join(f"<code>{name}</code>" for name in query.params)
    empty = [text for name, text in FIELD_DEFAULTS.items() if name in query.params]
    if "setup" not in query.params:
        empty.insert(0, "model: every model")
    return {"title": query.title, "sql": query.sql, "params": query.params, "hide_sql": True,
            "description_html": f"<p>{html.escape(query.doc)}</p><p>Fields: {fields}. Empty "
                                + "; empty ".join(empty) + f".</p><ul>{items}</ul>"}


FIELD_DEFAULTS = {"setup": "model and setup: the newest setup (of every model when model is empty too)",
                  "other": "other: the newest other setup of the same model", "n": "n: every n",
                  "removed": "removed: the baseline"}
"""What an empty form field means, said under each canned query that has it."""


def metadata(db_name: str, title: str) -> dict[str, Any]:
    """Datasette's metadata for a results database opened as ``db_name``: generated from the schema, the canned
    queries and the charts, so no description is written twice."""
    route = html.escape(database_route(db_name))
    links = "".join(f'<li><a href="/{route}/{q.name}">{html.escape(q.title)}</a></li>' for q in CANNED_QUERIES)
    return {
        "title": title,
        "description_html": (
            "<p>Every variant sweep measured, read-only. Start with the view "
            f'<a href="/{route}/results_vs_baseline">results_vs_baseline</a> (sort, filter by n_removed), the '
            f'<a href="/-/dashboards/{DASHBOARD}">charts</a>, or a question:</p><ul>{links}</ul>'),
        "databases": {db_name: {
            "description": "A sweep results database: " + ", ".join(t.name for t in TABLES) + "; view "
                           + ", ".join(v.name for v in VIEWS) + ".",
            "tables": {item.name: table_metadata(item) for item in (*VIEWS, *TABLES)},
            "queries": {q.name: query_metadata(q) for q in CANNED_QUERIES},
        }},
        "plugins": {"datasette-dashboards": {DASHBOARD: dashboard(db_name)}},
    }

# ---------------------------------------------------------------------------------------------- server


def require_datasette() -> tuple[Any, Any]:
    """Import Datasette (with datasette-dashboards) and uvicorn, or say which extra installs them.

    Raises:
        MissingExtraError: one of them is not installed.
    """
    try:
        import datasette.app
        import datasette_dashboards  # noqa: F401  (registers the charts page as a plugin)
        import uvicorn
    except ImportError:
        raise MissingExtraError("`sweep browse` needs datasette and datasette-dashboards: "
                                "pip install 'sweep[browse]'") from None
    return datasette.app, uvicorn




def open_datasette(path: str | Path) -> Any:
    """A Datasette on ``path`` (read-only, not immutable) with the generated metadata, started and checked.

    Raises:
        MissingExtraError: Datasette is not installed.
        StoreError: no such file, or SQLite cannot read it (e.g. a WAL database in a directory this user cannot
            write, with no ``-shm`` file beside it).
    """
    app, _ = require_datasette()
    path = Path(path)
    if not path.is_file():
        raise StoreError(f"no results database at {path}; run `sweep run` first")
    datasette = app.Datasette(files=[str(path)], metadata=metadata(database_name(path), f"sweep: {path.name}"),
                              settings=SETTINGS)
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # Datasette prints the failed SQL too: one line is enough
            asyncio.run(datasette.invoke_startup())
            asyncio.run(datasette.refresh_schemas())  # the first read: fails here, not on the first page
    except Exception as exc:  # sqlite3.OperationalError, seen without importing sqlite3 outside the store
        raise StoreError(_read_error(path, exc)) from None
    return datasette


def _read_error(path: Path, exc: Exception) -> str:
    if "readonly" in str(exc):
        return (f"cannot read {path} read-only: SQLite must create {path.name}-shm beside a WAL database and "
                f"{path.parent.resolve()} is not writable for this user; browse a copy in a writable directory")
    return f"cannot read {path}: {exc}"


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port``.

    Raises:
        ConfigError: the port is taken or the host cannot be bound.
    """
    sock = None
    try:
        family, kind, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        if sock is not None:
            sock.close()
        raise ConfigError(f"--host {host} --port {port}: cannot listen there ({exc.strerror or exc}); "
                          "choose another --port") from None
    sock.listen(128)
    return sock


def serve(db: str | Path, host: str = "127.0.0.1", port: int = 8001, log: Callable[[str], None] = print) -> None:
    """Serve ``db`` read-only until Ctrl-C.

    Raises:
        MissingExtraError, StoreError, ConfigError.
    """
    datasette = open_datasette(db)
    _, uvicorn = require_datasette()
    sock = bind(host, port)
    shown_host = f"[{host}]" if ":" in host else host
    url = f"http://{shown_host}:{sock.getsockname()[1]}"
    log(f"browsing {db} read-only at {url}/  (charts: {url}/-/dashboards/{DASHBOARD}); Ctrl-C stops")
    server = uvicorn.Server(uvicorn.Config(datasette.app(), lifespan="on", log_level="warning", access_log=False))
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn shuts down gracefully, then re-raises the Ctrl-C it caught
        pass
    finally:
        sock.close()
    log("sweep browse: stopped")
