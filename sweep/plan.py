"""Which layers to remove: strategies -> variants. Pure Python; must not import torch.

A *variant* is the set of removed layers (numbered from 0). Its canonical key is the sorted layer list
joined with commas: ``(1, 3) -> "1,3"``; the unpruned baseline is ``()`` -> ``""`` and is part of every plan.
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from sweep.errors import PlanError, UnknownNameError

EXHAUSTIVE_LIMIT = 16
"""Exhaustive plans over more layers than this need --force (2^17 - 1 = 131,071 variants)."""

Removal = tuple[int, ...]


def variant_key(removed: Iterable[int]) -> str:
    """Canonical key of a variant: ``variant_key([3, 1]) == "1,3"``, baseline ``""``."""
    return ",".join(str(i) for i in sorted(removed))


def parse_key(key: str) -> Removal:
    """Inverse of :func:`variant_key`: ``"1,3" -> (1, 3)``."""
    return tuple(int(x) for x in key.split(",")) if key else ()


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
    """Parse ``--remove "1,3;2,3,4"`` into removals, checking every index.

    Raises:
        PlanError: empty group, non-integer, out-of-range or repeated layer.
    """
    removals = []
    for group in str(text).split(";"):
        group = group.strip()
        if not group:
            continue
        try:
            layers = [int(x) for x in group.split(",")]
        except ValueError:
            raise PlanError(f"`--remove` groups are comma-separated layer numbers; got {group!r}") from None
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


@dataclass(frozen=True)
class PlanSpec:
    """The plan-related settings (a view of SweepConfig, so that plan stays torch- and config-free)."""

    strategy: str = "single"
    k: str = "2"
    n: str = "1-4"
    remove: str | None = None
    force: bool = False
    allow_last: bool = False
    """angular only: a removed block may include the final layer."""


def _single(n_layers: int, spec: PlanSpec) -> Iterator[Removal]:
    return ((i,) for i in range(n_layers))


def _combinations(n_layers: int, spec: PlanSpec) -> Iterator[Removal]:
    for k in parse_range(spec.k, "--k"):
        if k > n_layers:
            raise PlanError(f"`--k` {k} is more than the model's {n_layers} layers")
        yield from itertools.combinations(range(n_layers), k)


def _check_exhaustive(n_layers: int, spec: PlanSpec) -> None:
    if n_layers > EXHAUSTIVE_LIMIT and not spec.force:
        raise PlanError(
            f"exhaustive on {n_layers} layers is {2**n_layers - 1:,} variants; "
            f"add --force to run it, or use --strategy combinations --k 1-3"
        )


def _exhaustive(n_layers: int, spec: PlanSpec) -> Iterator[Removal]:
    _check_exhaustive(n_layers, spec)
    for k in range(1, n_layers + 1):
        yield from itertools.combinations(range(n_layers), k)


def _sizes_within(spec_n: str, n_layers: int) -> list[int]:
    sizes = parse_range(spec_n, "--n")
    if sizes[-1] > n_layers:
        raise PlanError(f"`--n` {sizes[-1]} is more than the model's {n_layers} layers")
    return sizes


def _last_n(n_layers: int, spec: PlanSpec) -> Iterator[Removal]:
    for n in _sizes_within(spec.n, n_layers):
        yield tuple(range(n_layers - n, n_layers))


def _blocks(n_layers: int, spec: PlanSpec) -> Iterator[Removal]:
    for n in _sizes_within(spec.n, n_layers):
        for start in range(n_layers - n + 1):
            yield tuple(range(start, start + n))


def _explicit(n_layers: int, spec: PlanSpec) -> Iterator[Removal]:
    if not spec.remove:
        raise PlanError("strategy `explicit` needs --remove, e.g. --remove \"1,3;2,3,4\"")
    return iter(parse_remove(spec.remove, n_layers))


def _from_signals(n_layers: int, spec: PlanSpec) -> Iterator[Removal]:
    """angular, block-influence, greedy: their removals need a model and calibration text, so the runner adds
    them (:func:`sweep.engine.similarity.signal_removals`); here only ``--n`` is checked, before anything is loaded."""
    sizes = _sizes_within(spec.n, n_layers)
    if "angular" in spec.strategy.split(",") and not spec.allow_last and sizes[-1] > n_layers - 1:
        raise PlanError(f"`--strategy angular` with `--n` {sizes[-1]} would remove the final layer of "
                        f"{n_layers}; the final layer is never a candidate unless --allow-last")
    return iter(())


STRATEGIES: dict[str, Callable[[int, PlanSpec], Iterable[Removal]]] = {
    "single": _single,
    "combinations": _combinations,
    "exhaustive": _exhaustive,
    "last-n": _last_n,
    "blocks": _blocks,
    "explicit": _explicit,
    "angular": _from_signals,
    "block-influence": _from_signals,
    "greedy": _from_signals,
}

SIGNAL_STRATEGIES = ("angular", "block-influence", "greedy")
"""Strategies whose removals are chosen from calibration signals of the loaded model."""


def strategy_names(text: str) -> list[str]:
    """Split ``--strategy`` and check every name.

    Raises:
        UnknownNameError: listing the valid strategies.
    """
    names = [s.strip() for s in str(text).split(",") if s.strip()]
    if not names:
        raise PlanError("`--strategy` is empty; valid: " + ", ".join(STRATEGIES))
    for name in names:
        if name not in STRATEGIES:
            raise UnknownNameError("strategy", name, list(STRATEGIES))
    return names


def _check_remove_is_used(names: list[str], spec: PlanSpec) -> None:
    """``--remove`` is read only by ``explicit``: given with other strategies alone it would be silently ignored.

    Refused rather than taken to imply ``explicit``: the strategy may come from a preset or the default, and
    guessing which plan was meant could measure variants nobody asked for.
    """
    if spec.remove and "explicit" not in names:
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
    for name in names:  # exhaustive contains every other plan, but their parameters must still be valid
        if name != "exhaustive":
            for _ in STRATEGIES[name](n_layers, spec):
                break
    return 2**n_layers


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
    names = strategy_names(spec.strategy)
    _check_remove_is_used(names, spec)
    removals: set[Removal] = {()}
    for name in names:
        removals.update(tuple(sorted(r)) for r in STRATEGIES[name](n_layers, spec))
    return sorted(removals, key=lambda r: (len(r), r))


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
