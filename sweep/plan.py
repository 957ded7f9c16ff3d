"""Which layers to remove: strategies -> variants. Pure Python; must not import torch.

A *variant* is the set of removed layers (numbered from 0). Its canonical key is the sorted layer list
joined with commas: ``(1, 3) -> "1,3"``; the unpruned baseline is ``()`` -> ``""`` and is part of every plan.
With ``--unit attn|mlp|mix`` the removal strategies remove residual branches instead (``"a3"``, ``"m5"``), and the
order strategies (repeat, swap, reverse, parallel) plan layer-order edits (``"r3"``, ``"s3"``, ``"v2-4"``,
``"p2-3"``): a variant is then a tuple of edits, ints for whole blocks and tokens for the rest (the grammar and
the step sequences they denote are in :mod:`sweep.steps`).
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from sweep import search, steps, strategies
from sweep.config import PlanSpec
from sweep.errors import PlanError, UnknownNameError
from sweep.steps import normalized

EXHAUSTIVE_LIMIT = 16
"""Exhaustive plans over more units than this need --force (2^17 - 1 = 131,071 variants)."""

Removal = tuple[int, ...]
"""A variant: removed layers, or (with units and order edits) the edits of :mod:`sweep.steps`."""


def variant_key(removed: Iterable[steps.Edit]) -> str:
    """Canonical key of a variant: ``variant_key([3, 1]) == "1,3"``, baseline ``""``; ``[1, "a3"] -> "1,a3"``."""
    removed = tuple(removed)
    if steps.is_block_variant(removed):
        return ",".join(str(i) for i in sorted(removed))
    return steps.variant_key(removed)


def parse_key(key: str) -> Removal:
    """Inverse of :func:`variant_key`: ``"1,3" -> (1, 3)``, ``"1,a3" -> (1, "a3")``."""
    return steps.parse_key(key) if key else ()


def variant_order(removed: Removal) -> tuple:
    """How plans list variants: by units removed, then edit by edit (``(len, removed)`` for block variants)."""
    return len(removed), [steps.edit_order(e) for e in removed]


def kept_layers(removed: Iterable[int], n_layers: int) -> list[int]:
    gone = set(removed)
    return [i for i in range(n_layers) if i not in gone]


def parse_range(text: str, flag: str) -> list[int]:
    """Parse sizes like ``"2"``, ``"1-3"`` or ``"1-3,6"`` into a sorted list of positive ints.

    Raises:
        PlanError: malformed text, naming ``flag``.
    """
    sizes: set[int] = set()
    try:
        for part in str(text).split(","):
            part = part.strip()
            if "-" in part:
                lo, hi = (int(x) for x in part.split("-", 1))
                if lo > hi:
                    raise ValueError
                sizes.update(range(lo, hi + 1))
            else:
                sizes.add(int(part))
    except ValueError:
        raise PlanError(f"`{flag}` must look like 2, 1-3 or 1-3,6; got {text!r}") from None
    if min(sizes) < 1:
        raise PlanError(f"`{flag}` sizes must be at least 1; got {text!r}")
    return sorted(sizes)


def parse_remove(text: str, n_layers: int) -> list[Removal]:
    """Parse ``--remove "1,3;2,3,4"`` into removals, checking every index. A group may be any variant key
    (``"a3,m5;r2"``, :mod:`sweep.steps`).

    Raises:
        PlanError: empty group, non-integer, out-of-range or repeated layer; VariantKeyError for a bad key.
    """
    removals = []
    for group in str(text).split(";"):
        group = group.strip()
        if not group:
            continue
        if any(c.isalpha() for c in group):
            try:
                removals.append(_checked(steps.parse_key(group), n_layers))
            except PlanError as exc:
                raise PlanError(f"`--remove` group {group!r}: {exc}") from None
            continue
        try:
            layers = [int(x) for x in group.split(",")]
        except ValueError:
            raise PlanError(f"`--remove` groups are comma-separated layer numbers or variant keys; got {group!r}") from None
        bad = [i for i in layers if not 0 <= i < n_layers]
        if bad:
            raise PlanError(f"`--remove` layer {bad[0]} is out of range: the model has layers 0-{n_layers - 1}")
        repeated = sorted({i for i in layers if layers.count(i) > 1})
        if repeated:
            raise PlanError(f"`--remove` group {group!r} repeats layer {repeated[0]}")
        removals.append(tuple(sorted(layers)))
    if not removals:
        raise PlanError("`--remove` is empty; give layers like \"1,3;2,3,4\"")
    return removals


def _checked(variant: Removal, n_layers: int) -> Removal:
    """``variant`` after checking that its edits fit a model of ``n_layers`` layers (:func:`steps.steps_of`)."""
    steps.steps_of(variant, n_layers)
    return variant


def units_of(n_layers: int, spec: PlanSpec) -> list[steps.Edit]:
    """The removable units of ``spec.unit`` (:func:`steps.unit_edits`)."""
    return steps.unit_edits(spec.unit, n_layers)


def _single(n_layers: int, spec: PlanSpec) -> Iterator[Removal]:
    return ((u,) for u in units_of(n_layers, spec))


def _unit_word(spec: PlanSpec) -> str:
    return "layers" if spec.unit == "block" else "units"


def _combinations(n_layers: int, spec: PlanSpec) -> Iterator[Removal]:
    units = units_of(n_layers, spec)
    for k in parse_range(spec.k, "--k"):
        if k > len(units):
            raise PlanError(f"`--k` {k} is more than the model's {len(units)} {_unit_word(spec)}")
        yield from itertools.combinations(units, k)


def _check_exhaustive(n_layers: int, spec: PlanSpec) -> None:
    n_units = len(units_of(n_layers, spec))
    if n_units > EXHAUSTIVE_LIMIT and not spec.force:
        raise PlanError(
            f"exhaustive on {n_units} {_unit_word(spec)} is {2**n_units - 1:,} variants; "
            f"add --force to run it, or use --strategy combinations --k 1-3"
        )


def _exhaustive(n_layers: int, spec: PlanSpec) -> Iterator[Removal]:
    _check_exhaustive(n_layers, spec)
    units = units_of(n_layers, spec)
    for k in range(1, len(units) + 1):
        yield from itertools.combinations(units, k)


def _sizes_within(spec_n: str, n_layers: int, spec: PlanSpec | None = None) -> list[int]:
    sizes = parse_range(spec_n, "--n")
    n_units = len(units_of(n_layers, spec)) if spec is not None else n_layers
    if sizes[-1] > n_units:
        what = _unit_word(spec) if spec is not None else "layers"
        raise PlanError(f"`--n` {sizes[-1]} is more than the model's {n_units} {what}")
    return sizes


def _last_n(n_layers: int, spec: PlanSpec) -> Iterator[Removal]:
    units = units_of(n_layers, spec)
    for n in _sizes_within(spec.n, n_layers, spec):
        yield tuple(units[len(units) - n:])


def _blocks(n_layers: int, spec: PlanSpec) -> Iterator[Removal]:
    """Contiguous runs of units (mix: a0, m0, a1, m1, ... so a run may start or end inside a block)."""
    units = units_of(n_layers, spec)
    for n in _sizes_within(spec.n, n_layers, spec):
        for start in range(len(units) - n + 1):
            yield tuple(units[start:start + n])


_ORDER_EDITS = {  # name: (edit op of sweep.steps, default --span, summary of its record)
    "repeat": ("r", "1", "each block of the middle layers run twice"),
    "swap": ("s", "2", "each pair of adjacent middle layers exchanged"),
    "reverse": ("v", "3", "each block of the middle layers run backwards"),
    "parallel": ("p", "2", "each block of adjacent middle layers run side by side on the same input"),
}
ORDER_SPANS = {name: span for name, (_, span, _) in _ORDER_EDITS.items()}
"""Default block lengths of the order strategies (``--span``)."""


def _order(name: str) -> Callable[[int, PlanSpec], Iterator[Removal]]:
    """An order strategy: one edit per (first layer, block length), e.g. repeat -> r3, r3-4, ...

    By default every block lies among the middle layers 1..L-2 (Sun et al. 2024, "Transformer Layers as
    Painters": the first and last layers behave differently); ``--positions`` gives the first layers instead
    (any layer, as long as the block fits in the model). Example, 6 layers, ``repeat --span 1-2``:
    r1, r2, r3, r4, r1-2, r2-3, r3-4.
    """
    op = _ORDER_EDITS[name][0]

    def strategy(n_layers: int, spec: PlanSpec) -> Iterator[Removal]:
        spans = [2] if name == "swap" else parse_range(spec.span or ORDER_SPANS[name], "--span")
        if name == "swap" and spec.span not in (None, "2"):
            raise PlanError("`--span`: swap always exchanges two adjacent layers; leave --span out")
        if spec.positions:
            starts, last = sorted({int(x) for x in _split(spec.positions)}), n_layers - 1
            if starts[-1] > last:
                raise PlanError(f"`--positions` layer {starts[-1]} is out of range: the model has layers 0-{last}")
        else:
            starts, last = list(range(1, n_layers - 1)), n_layers - 2
        for span in spans:
            for lo in starts:
                hi = lo + span - 1
                if hi <= last:
                    yield (steps.format_edit(op, lo, hi),)

    return strategy


def _split(text: str) -> list[str]:
    """``--positions "1,3-5"`` -> ["1", "3", "4", "5"] (layer numbers start at 0)."""
    out = []
    try:
        for part in str(text).split(","):
            lo, _, hi = part.strip().partition("-")
            out += [str(i) for i in range(int(lo), int(hi or lo) + 1)]
    except ValueError:
        raise PlanError(f"`--positions` must look like 3, 1-4 or 1-4,8; got {text!r}") from None
    return out


def _explicit(n_layers: int, spec: PlanSpec) -> Iterator[Removal]:
    if not spec.remove:
        raise PlanError("strategy `explicit` needs --remove, e.g. --remove \"1,3;2,3,4\"")
    return iter(parse_remove(spec.remove, n_layers))


def _from_signals(n_layers: int, spec: PlanSpec) -> Iterator[Removal]:
    """block-influence, greedy: their removals need a model and calibration text, so the runner adds them
    (:func:`sweep.engine.similarity.signal_choices`); here only ``--n`` is checked, before anything is loaded."""
    _sizes_within(spec.n, n_layers, spec)
    return iter(())


def _angular_sizes(n_layers: int, spec: PlanSpec) -> Iterator[Removal]:
    """angular: as :func:`_from_signals`, and the final layer is no candidate unless ``--allow-last``."""
    sizes = _sizes_within(spec.n, n_layers, spec)
    if not spec.allow_last and sizes[-1] > n_layers - 1:
        raise PlanError(f"`--strategy angular` with `--n` {sizes[-1]} would remove the final layer of "
                        f"{n_layers}; the final layer is never a candidate unless --allow-last")
    return iter(())


def _search_sizes(n_layers: int, spec: PlanSpec) -> Iterator[Removal]:
    """search: as :func:`_from_signals`; with ``--budget-params`` its fractions are checked instead of ``--n``."""
    if not search.parse_budgets(spec.budget_params):
        sizes = _sizes_within(spec.n, n_layers, spec)
        if sizes[-1] >= len(units_of(n_layers, spec)):
            raise PlanError(f"`--strategy search` with `--n` {sizes[-1]}: it removes at most "
                            f"{len(units_of(n_layers, spec)) - 1} of the model's {len(units_of(n_layers, spec))} "
                            f"{_unit_word(spec)}")
    return iter(())


Planner = Callable[[int, PlanSpec], Iterable[Removal]]
"""(number of layers, plan settings) -> the variants of a strategy; raises PlanError for bad settings."""
Chooser = Callable[[Sequence[int], strategies.Calibrated], list[strategies.Choice]]
"""(sizes in ``--n``, the calibration signals) -> the variant a signal strategy chooses for each size."""
KINDS = ("plan", "signal", "order")
"""plan: enumerated from the layer count; signal: chosen on calibration text with the loaded model; order:
layer-order edits (:mod:`sweep.steps`)."""


@dataclass(frozen=True)
class Strategy:
    """One strategy: what it is, what it needs, how it plans or chooses, and how the report shows it. Adding a
    strategy is its module (planner or chooser) and one record in :data:`STRATEGIES`."""

    name: str
    """What ``--strategy`` calls it."""
    summary: str
    """One line: which variants it gives."""
    kind: str
    """One of :data:`KINDS`."""
    plans: Planner
    """Its variants from the layer count; a signal strategy's only checks ``--n`` (it plans none by itself)."""
    flags: tuple[str, ...] = ()
    """The flags it reads besides ``--strategy`` (``--remove`` is refused without a strategy that reads it)."""
    units: bool = False
    """Works over the units of ``--unit`` (attention and MLP branches) as well as whole blocks."""
    needs: tuple[str, ...] = ()
    """Calibration signals it needs: "signals" (angular distances and Block Influence, one pass), "greedy-path"
    (calibration perplexities of candidates, through the trie)."""
    chooses: Chooser | None = None
    """A signal strategy's choice for each size, from the signals of :attr:`needs`."""
    races: bool = False
    """``--race`` can race its plan (many variants of each size)."""
    reported: str | None = None
    """Its line in the report's strategies-against-the-oracle table, figure and browse query: "choices" (its stored
    choices), "plan" (its one planned variant per size, planned again from the layer count), None (no line)."""
    style: dict[str, Any] = field(default_factory=dict)
    """Its line's matplotlib style in the strategy figure (distinct markers: lines often overlap)."""


_CALIBRATION = ("--calib-data", "--calib-data-config", "--calib-split", "--calib-max-tokens")
_RECORDS = (
    Strategy("single", "each layer (unit) alone", "plan", _single, units=True),
    Strategy("combinations", "every subset of size k", "plan", _combinations, ("--k",), units=True, races=True),
    Strategy("exhaustive", "every subset", "plan", _exhaustive, ("--force",), units=True, races=True),
    Strategy("last-n", "the deepest n layers (units)", "plan", _last_n, ("--n",), units=True, reported="plan",
             style=dict(marker="s", markersize=8)),
    Strategy("blocks", "every contiguous block of n layers (units)", "plan", _blocks, ("--n",), units=True),
    Strategy("explicit", "the variants listed", "plan", _explicit, ("--remove",), units=True),
    Strategy("angular", "for each n, the block of n layers of closest input and output residual streams", "signal",
             _angular_sizes, ("--n", "--angular-tokens", "--allow-last", *_CALIBRATION), needs=("signals",),
             chooses=strategies.choose_angular, reported="choices", style=dict(marker="o")),
    Strategy("block-influence", "for each n, the n layers of lowest Block Influence", "signal", _from_signals,
             ("--n", *_CALIBRATION), needs=("signals",), chooses=strategies.choose_block_influence,
             reported="choices", style=dict(marker="^")),
    Strategy("greedy", "for each n, the first n steps of a greedy path by calibration perplexity", "signal",
             _from_signals, ("--n", *_CALIBRATION), units=True, needs=("greedy-path",),
             chooses=strategies.choose_greedy, reported="choices", style=dict(marker="v", markersize=5)),
    Strategy("search", "for each n (or --budget-params fraction), an evolutionary search from the heuristics' "
             "choices, scored in the trie and selected by paired intervals on the calibration text", "signal",
             _search_sizes, ("--n", "--budget-params", "--fitness", "--search-budget", "--search-level",
                             *_CALIBRATION), units=True, needs=("signals", "search"), chooses=search.choose_search,
             reported="choices", style=dict(marker="*", markersize=9)),
    *(Strategy(name, summary, "order", _order(name), ("--span", "--positions"))
      for name, (_, _, summary) in _ORDER_EDITS.items()),
)

STRATEGIES: dict[str, Strategy] = {s.name: s for s in _RECORDS}
"""Every strategy, by name, in the order of ``--help`` and the docs: the one place that lists them."""


def strategy(name: str) -> Strategy:
    """The record of strategy ``name``.

    Raises:
        UnknownNameError: listing the valid strategies.
    """
    if name not in STRATEGIES:
        raise UnknownNameError("strategy", name, list(STRATEGIES))
    return STRATEGIES[name]


def names_where(keep: Callable[[Strategy], bool]) -> tuple[str, ...]:
    """The registered strategies that ``keep`` accepts, in registry order, read when called (so a record added to
    :data:`STRATEGIES`, as tests do, is seen): ``names_where(lambda s: s.kind == "order")`` -> repeat, swap, ..."""
    return tuple(s.name for s in STRATEGIES.values() if keep(s))


def signal_strategies() -> tuple[str, ...]:
    """Strategies whose removals are chosen from calibration signals of the loaded model."""
    return names_where(lambda s: s.kind == "signal")


def order_strategies() -> tuple[str, ...]:
    """Strategies that plan layer-order edits (repeat, swap, reverse, parallel); ``--unit`` does not apply to them."""
    return names_where(lambda s: s.kind == "order")


def unit_strategies() -> tuple[str, ...]:
    """Strategies that work over the units of ``--unit`` (explicit: its keys name their units themselves)."""
    return names_where(lambda s: s.units)


def race_strategies() -> tuple[str, ...]:
    """Strategies whose plans ``--race`` races (:data:`sweep.config.RACE_STRATEGIES` restates them below the plan)."""
    return names_where(lambda s: s.races)


def reported_strategies() -> tuple[str, ...]:
    """The strategies with a line in the report's strategy table and figure, in that order (then the oracle)."""
    return names_where(lambda s: s.reported is not None)


def needing(signal: str) -> tuple[str, ...]:
    """The strategies whose :attr:`Strategy.needs` include ``signal`` ("signals" or "greedy-path")."""
    return names_where(lambda s: signal in s.needs)


def strategy_help() -> str:
    """The ``--strategy`` help: every name, order edits last."""
    return (f"Comma-separated: {', '.join(names_where(lambda s: s.kind != 'order'))}; "
            f"order edits: {', '.join(order_strategies())}.")


def strategy_names(text: str) -> list[str]:
    """Split ``--strategy`` and check every name.

    Raises:
        UnknownNameError: listing the valid strategies.
    """
    names = [s.strip() for s in str(text).split(",") if s.strip()]
    if not names:
        raise PlanError("`--strategy` is empty; valid: " + ", ".join(STRATEGIES))
    for name in names:
        strategy(name)
    return names


def _check_remove_is_used(names: list[str], spec: PlanSpec) -> None:
    """``--remove`` is read only by ``explicit``: given with other strategies alone it would be silently ignored.

    Refused rather than taken to imply ``explicit``: the strategy may come from a preset or the default, and
    guessing which plan was meant could measure variants nobody asked for.
    """
    if spec.remove and not any("--remove" in STRATEGIES[n].flags for n in names):
        raise PlanError(f"`--remove` is only used by `--strategy explicit`, and the strategy is "
                        f"`{','.join(names)}`; add `--strategy explicit` (or `--strategy {','.join(names)},explicit` "
                        "for both), or drop --remove")


def count_variants(n_layers: int, spec: PlanSpec) -> int:
    """Number of variants of a plan, computed without enumerating it (for huge exhaustive plans)."""
    names = strategy_names(spec.strategy)
    _check_remove_is_used(names, spec)
    if "exhaustive" not in names:
        return len(plan_variants(n_layers, spec))
    _check_exhaustive(n_layers, spec)
    others = set()
    for name in names:  # exhaustive contains every other removal plan, but their parameters must still be valid
        if name in order_strategies() or name == "explicit":
            others.update(variant_key(r) for r in STRATEGIES[name].plans(n_layers, spec)
                          if not _within_units(r, units_of(n_layers, spec)))
        elif name != "exhaustive":
            for _ in STRATEGIES[name].plans(n_layers, spec):
                break
    return 2 ** len(units_of(n_layers, spec)) + len(others)


def _within_units(variant: Removal, units: list[steps.Edit]) -> bool:
    """A variant the exhaustive plan over ``units`` holds already (mix holds block ``3`` as ``a3,m3``)."""
    return all(e in units or (isinstance(e, int) and f"a{e}" in units and f"m{e}" in units)
               for e in steps.normalize(variant))


def plan_variants(n_layers: int, spec: PlanSpec) -> list[Removal]:
    """The baseline plus the union of the strategies' removals, de-duplicated.

    Ordered by number of removed layers, then lexicographically, so the baseline comes first and
    results that matter most (single removals) arrive early.

    Example:
        >>> plan_variants(3, PlanSpec(strategy="single,last-n", n="1-2"))
        [(), (0,), (1,), (2,), (1, 2)]

    Raises:
        PlanError / UnknownNameError: bad strategy or parameters (``--remove`` without ``explicit`` included).
    """
    if n_layers < 1:
        raise PlanError(f"the model has {n_layers} decoder layers; nothing to remove")
    if spec.unit not in steps.UNITS:
        raise UnknownNameError("--unit", spec.unit, list(steps.UNITS))
    names = strategy_names(spec.strategy)
    _check_remove_is_used(names, spec)
    _check_unit_is_used(names, spec)
    removals: set[Removal] = {()}
    for name in names:
        removals.update(normalized(r) for r in STRATEGIES[name].plans(n_layers, spec))
    return sorted(removals, key=variant_order)


def _check_unit_is_used(names: list[str], spec: PlanSpec) -> None:
    """``--unit`` other than block with only strategies it does not apply to would be silently ignored."""
    if spec.unit != "block" and not set(names) & set(unit_strategies()):
        raise PlanError(f"`--unit {spec.unit}` applies to the strategies {', '.join(unit_strategies())}; "
                        f"`{','.join(names)}` {'does' if len(names) == 1 else 'do'} not use it")
    whole = names_where(lambda s: s.kind == "signal" and not s.units)
    if spec.unit != "block" and set(names) & set(whole):
        any_unit = ", ".join(n for n in signal_strategies() if n not in whole)
        raise PlanError(f"`--strategy {'` and `'.join(whole)}` choose whole blocks; use --unit block with them "
                        f"({any_unit} works over any unit)")


def format_duration(seconds: float) -> str:
    """``3725 -> "1 h 2 min"``, ``75 -> "1 min 15 s"``, ``4.2 -> "4.2 s"``."""
    if not math.isfinite(seconds):
        return "unknown"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes} min {secs} s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours} h {minutes} min"
    return f"{hours / 24:.1f} days"
