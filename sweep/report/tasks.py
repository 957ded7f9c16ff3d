"""Report pieces for downstream tasks and healing, from rows the report has already read (no SQL, no torch): the
task table and the accuracy/perplexity figure.

    | variant | task | base | pruned | pruned + healed |

as in published depth-pruning tables (accuracy in % ± stderr, change against the base in points), and a figure
of task accuracy and perplexity against the fraction of layers removed. Data come from ``store`` read functions.

Which rows: a task setup (``task_setups``: one task with its few-shot, limit and lm-eval settings) is another
kind of setup than a perplexity setup (data, windows, latency) and has no link to one, so task rows are chosen
per task (its newest settings), and :func:`task_settings_text` says which settings are shown and how many other
task setups exist. Heals do belong to a perplexity setup (``heals.setup_id``): given ``setup``, only its heals
(their perplexity rows and healed accuracies) are shown, so no perplexity of another setup enters the report.
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

from matplotlib.ticker import FuncFormatter, PercentFormatter

from sweep.intervals import change_pct
from sweep.ranking import Row
from sweep.report import plotting
from sweep.report.format import format_pct, format_ppl


def newest_task_rows(task_rows: Sequence[Row]) -> list[Row]:
    """Task rows (status ok) of the newest settings of each task (one setup per task), from one model's rows."""
    rows = [r for r in task_rows if r["status"] == "ok"]
    newest: dict[str, str] = {}
    for row in rows:  # read_task_results orders setups oldest first: the last one seen per task is the newest
        newest[row["task"]] = row["setup"]
    return [r for r in rows if newest[r["task"]] == r["setup"]]


def _pct(row: Row | None) -> str:
    if row is None or row["value"] is None:
        return "—"
    err = f" ± {100 * row['stderr']:.1f}" if row.get("stderr") is not None and math.isfinite(row["stderr"]) else ""
    return f"{100 * row['value']:.1f}{err}"


def _with_change(row: Row | None, base: Row | None) -> str:
    """``55.0 ± 1.6 (-6.2)``: the accuracy and its change against the base, in percentage points."""
    text = _pct(row)
    if row is not None and base is not None and row["value"] is not None and base["value"] is not None:
        text += f" ({100 * (row['value'] - base['value']):+.1f})"
    return text


def _variant_label(removed: str, n_removed: int, model_layers: int | None) -> str:
    of = f" of {model_layers}" if model_layers else ""
    return f"−[{removed}] ({n_removed}{of})"


def _rows_and_heals(task_rows: Sequence[Row], heals: Sequence[Row],
                    setup: str | None) -> tuple[list[Row], list[Row]]:
    """Newest task rows and the heals; with ``setup``, only heals of that perplexity setup and the task rows of
    those heals (unhealed task rows do not depend on the perplexity setup)."""
    rows, heals = newest_task_rows(task_rows), list(heals)
    if setup is None:
        return rows, heals
    heals = [h for h in heals if h["setup_id"] == setup]
    kept = {h["id"] for h in heals}
    return [r for r in rows if not r["heal_id"] or r["heal_id"] in kept], heals


def task_table(task_rows: Sequence[Row], heals: Sequence[Row], setup: str | None = None) -> str | None:
    """Markdown table ``variant | task | base | pruned | pruned + healed`` of one model, or None without task data.

    Accuracy (lm-eval's headline metric, usually ``acc``) in % ± stderr; changes against the unpruned model in
    points. Healed columns use the newest heal of the variant; healed perplexity rows come from table heals.
    With ``setup`` (a perplexity setup id), only heals of that setup are shown.
    """
    rows, heals = _rows_and_heals(task_rows, heals, setup)
    if not rows and not heals:
        return None
    lines = ["| variant | task | base | pruned | pruned + healed |", "| --- | --- | --- | --- | --- |"]
    lines += _task_lines(rows)
    lines += _perplexity_lines(heals)
    return "\n".join(lines) + "\n"


def _task_lines(rows: Sequence[Row]) -> list[str]:
    base = {r["task"]: r for r in rows if r["removed"] == "" and r["heal_id"] == ""}
    pruned = {(r["task"], r["removed"]): r for r in rows if r["removed"] != "" and r["heal_id"] == ""}
    healed: dict[tuple[str, str], Row] = {}
    for r in sorted((r for r in rows if r["heal_id"]), key=lambda r: r["measured_at"] or ""):
        healed[(r["task"], r["removed"])] = r  # the newest heal wins
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    variants = sorted({(r["n_removed"], r["removed"], r["model_layers"]) for r in pruned.values()},
                      key=lambda v: (v[0], [int(x) for x in v[1].split(",")]))
    lines = []
    for n_removed, removed, model_layers in variants:
        for task in tasks:
            if (task, removed) not in pruned:
                continue
            b = base.get(task)
            lines.append(f"| {_variant_label(removed, n_removed, model_layers)} | {task} | {_pct(b)} | "
                         f"{_with_change(pruned[(task, removed)], b)} | {_with_change(healed.get((task, removed)), b)} |")
    return lines


def _ppl_change(value: float | None, base: float | None) -> str:
    """``12.00 (+20.0 %)``: a perplexity and its change against the base."""
    if value is None:
        return "—"
    return format_ppl(value) + (f" ({format_pct(change_pct(value, base))})" if base else "")


def _perplexity_lines(heals: Sequence[Row]) -> list[str]:
    """One perplexity row per healed variant (newest heal): base, pruned and healed, change in %."""
    newest: dict[str, Row] = {}
    for h in sorted((h for h in heals if h["status"] == "ok"), key=lambda h: h["measured_at"] or ""):
        newest[h["removed"]] = h
    lines = []
    for h in sorted(newest.values(), key=lambda h: (h["n_removed"], h["removed"])):
        base = format_ppl(h["ppl_base"]) if h.get("ppl_base") else "—"
        lines.append(f"| {_variant_label(h['removed'], h['n_removed'], h['model_layers'])} | perplexity "
                     f"(heal {h['id']}: LoRA r={h['lora_r']}, {h['steps']} steps) | {base} | "
                     f"{_ppl_change(h['ppl_unhealed'], h.get('ppl_base'))} | {_ppl_change(h['ppl'], h.get('ppl_base'))} |")
    return lines


# ---------------------------------------------------------------------------------------------- settings

SHOW_OTHER_SETUPS = 5
"""The settings note names at most this many task setups that are not shown."""


def _settings(row: Row) -> str:
    """``"0-shot, limit 100, lm-eval 0.4.5, float32 on cpu"``: the task setup's settings that change the numbers."""
    parts = [f"{row['num_fewshot'] or 0}-shot", f"limit {row['task_limit']:,}" if row["task_limit"] else "all examples"]
    if row.get("lm_eval_version"):
        parts.append(f"lm-eval {row['lm_eval_version']}")
    if row.get("dtype") or row.get("device"):
        parts.append(f"{row.get('dtype') or '?'} on {row.get('device') or '?'}")
    return ", ".join(parts)


def task_settings_text(task_rows: Sequence[Row], heals: Sequence[Row], setup: str | None = None) -> str | None:
    """Which task setups the table shows (tasks grouped by identical settings), and what it leaves out.

    Example: ``"Task settings (the newest of each task): boolq, arc_easy: 0-shot, limit 100, lm-eval 0.4.5 (task
    setups `1a2b`, `3c4d`). Not shown: 1 other task setup of this model: `5e6f` (boolq: 5-shot, limit 100); its
    rows are in table `task_results`."``; None when there is nothing to say (no task rows, no heal left out).
    """
    rows, _ = _rows_and_heals(task_rows, heals, setup)
    shown: dict[str, Row] = {r["setup"]: r for r in rows}
    parts = (_shown_setups_text(shown), _other_setups_text(task_rows, shown), _other_heals_text(heals, setup))
    return " ".join(p for p in parts if p) or None


def _shown_setups_text(shown: dict[str, Row]) -> str:
    """``"Task settings (the newest of each task): boolq, arc_easy: 0-shot, ... (task setups `1a2b`, `3c4d`)."``"""
    groups: dict[str, list[Row]] = {}
    for row in shown.values():
        groups.setdefault(_settings(row), []).append(row)
    described = "; ".join(f"{', '.join(r['task'] for r in group)}: {settings} ({_setup_ids(group)})"
                          for settings, group in groups.items())
    return f"Task settings (the newest of each task): {described}." if groups else ""


def _setup_ids(group: list[Row]) -> str:
    """``"task setup `1a2b`"`` or ``"task setups `1a2b`, `3c4d`"``."""
    return f"task setup{'s' if len(group) > 1 else ''} " + ", ".join(f"`{r['setup']}`" for r in group)


def _other_setups_text(task_rows: Sequence[Row], shown: dict[str, Row]) -> str:
    """``"Not shown: 2 other task setups of this model: ..."``, or "" when every task setup is shown."""
    others: dict[str, Row] = {}
    for row in task_rows:
        if row["setup"] not in shown:
            others.setdefault(row["setup"], row)
    if not others:
        return ""
    named = [f"`{sid}` ({r['task']}: {_settings(r)})" for sid, r in list(others.items())[:SHOW_OTHER_SETUPS]]
    more = f", and {len(others) - len(named)} more" if len(others) > len(named) else ""
    many = len(others) > 1
    return (f"Not shown: {len(others)} other task setup{'s' if many else ''} of this model: {', '.join(named)}"
            f"{more}; {'their' if many else 'its'} rows are in table `task_results`.")


def _other_heals_text(heals: Sequence[Row], setup: str | None) -> str:
    """``"Not shown: 1 heal measured under other perplexity setups (`9f8e`); ..."``, or "" (none, or no ``setup``)."""
    if setup is None:
        return ""
    other = [h["setup_id"] for h in heals if h["setup_id"] != setup]
    if not other:
        return ""
    setups = ", ".join(f"`{s}`" for s in sorted(set(other)))
    return (f"Not shown: {len(other)} heal{'s' if len(other) > 1 else ''} measured under other perplexity setups "
            f"({setups}); `sweep report --setup <id>` reports one.")


# ---------------------------------------------------------------------------------------------- figure


def best_by_fraction(points: Sequence[tuple[float, float]], higher_is_better: bool = True) -> list[tuple[float, float]]:
    """The best value at each x, sorted by x: the curve through the best variant of each size.

    Example: [(0.25, 0.6), (0.25, 0.7), (0, 0.8)] -> [(0, 0.8), (0.25, 0.7)].
    """
    best: dict[float, float] = {}
    for x, y in points:
        if y is None or not math.isfinite(y):
            continue
        if x not in best or (y > best[x] if higher_is_better else y < best[x]):
            best[x] = y
    return sorted(best.items())


def steepest_drop(curve: Sequence[tuple[float, float]]) -> tuple[float, float, float] | None:
    """(x before, x after, drop) of the largest fall between consecutive points of a curve, or None.

    Example: [(0, 80), (0.25, 76), (0.5, 30), (0.75, 28)] -> (0.25, 0.5, 46).
    """
    drops = [(a[0], b[0], a[1] - b[1]) for a, b in itertools.pairwise(curve)]
    return max(drops, key=lambda d: d[2]) if drops and max(d[2] for d in drops) > 0 else None


@plotting.styled
def plot_tasks(task_rows: Sequence[Row], heals: Sequence[Row], ppl_rows: Sequence[Row], setup: str | None,
               subtitle: str):
    """Task accuracy (top) and perplexity (bottom) against the fraction of layers removed; None without task rows.

    Filled markers: pruned variants; lines: the best variant of each size; hollow markers: healed variants.
    The dotted vertical line of each task spans its steepest drop, where accuracy collapses. ``ppl_rows`` are the
    reported setup's view rows; heals are those of ``setup``, as in :func:`task_table`.
    """
    rows, heals = _rows_and_heals(task_rows, heals, setup)
    if not rows:
        return None
    fig, (acc_ax, ppl_ax) = plotting.new_figure(1.0, 1.7, 2, 1, sharex=True, height_ratios=(3, 2))
    _draw_accuracy(acc_ax, rows)
    _draw_perplexity(ppl_ax, [r for r in ppl_rows if r["status"] == "ok"], heals)
    ppl_ax.set_xlabel("fraction of decoder layers removed")
    ppl_ax.xaxis.set_major_formatter(PercentFormatter(xmax=1.0))
    plotting.titled(fig, "Downstream accuracy and perplexity against depth pruning", subtitle)
    return fig


def _fraction(row: Row) -> float:
    return row["n_removed"] / row["model_layers"] if row.get("model_layers") else float(row["n_removed"])


def _draw_accuracy(ax, rows: Sequence[Row]) -> None:
    colors = itertools.cycle(plotting.SERIES)
    for task in dict.fromkeys(r["task"] for r in rows):
        color = next(colors)
        plain = [(_fraction(r), 100 * r["value"]) for r in rows if r["task"] == task and not r["heal_id"]]
        healed = [(_fraction(r), 100 * r["value"]) for r in rows if r["task"] == task and r["heal_id"]]
        curve = best_by_fraction(plain)
        if plain:  # a task may have only healed rows (its pre-heal rows failed)
            ax.scatter(*zip(*plain), color=color, s=14, alpha=0.5)
        if curve:
            ax.plot(*zip(*curve), color=color, marker="o", label=task)
        if healed:
            ax.scatter(*zip(*healed), facecolors="none", edgecolors=color, s=60, linewidths=1.5)
        drop = steepest_drop(curve)
        if drop:
            ax.axvline((drop[0] + drop[1]) / 2, color=color, linestyle=":", linewidth=1)
    ax.set_ylabel("accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, title="task (hollow: healed; dotted: steepest drop)", title_fontsize=8)


def _draw_perplexity(ax, ppl_rows: Sequence[Row], heals: Sequence[Row]) -> None:
    points = [(r["n_removed"] / r["model_layers"], r["ppl"]) for r in ppl_rows if r.get("model_layers")]
    if points:
        ax.scatter(*zip(*points), color="0.5", s=10, alpha=0.5)
        ax.plot(*zip(*best_by_fraction(points, higher_is_better=False)), color="black", marker="o",
                label="perplexity (best variant per size)")
    healed = [(_fraction(h), h["ppl"]) for h in heals if h["status"] == "ok" and h["ppl"]]
    if healed:
        ax.scatter(*zip(*healed), facecolors="none", edgecolors="black", s=60, linewidths=1.5, label="healed")
    if points or healed:
        ax.set_yscale("log")
        plain = FuncFormatter(lambda value, _: f"{value:g}")  # 40, not 4x10^1
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain)
        ax.legend(fontsize=8)
    ax.set_ylabel("perplexity (log)")
    ax.grid(alpha=0.3, which="both")
