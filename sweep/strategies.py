"""Which layers the similarity-guided and greedy strategies remove, from precomputed signals. Pure Python.

The signals (angular distances, Block Influence, calibration perplexities) are measured by
:mod:`sweep.engine.similarity`; this module only chooses, so it imports no torch and is tested with plain lists.

- ``angular`` (Gromov et al. 2024, "The Unreasonable Ineffectiveness of the Deeper Layers"): for block size n,
  remove layers l..l+n-1 for the start l minimising d(l, n), the angular distance between the residual stream
  entering layer l and entering layer l+n.
- ``block-influence`` (ShortGPT, Men et al. 2024): remove the n layers with the lowest BI = 1 - cos(h_in, h_out).
- ``greedy`` (SLEB, Song et al. 2024): remove one layer at a time, each round the one whose removal gives the
  lowest calibration perplexity; the variant for n is the path's first n steps.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from sweep import steps
from sweep.errors import PlanError
from sweep.steps import normalized

Removal = steps.Variant
"""A variant: removed layers, or units (:data:`sweep.plan.Removal`)."""

Distances = Mapping[tuple[int, int], float]
"""(start l, block size n) -> d(l, n), defined for 0 <= l and l + n <= n_layers."""


def angular_choice(distances: Distances, n: int, n_layers: int, allow_last: bool = False) -> tuple[Removal, float]:
    """The block of ``n`` layers with minimal angular distance, and that distance.

    Removing the block starting at l removes layers l..l+n-1 and joins the residual stream entering l to the one
    entering l+n, so d(l, n) is what the model "skips". Unless ``allow_last``, the final layer is never removed
    (l + n <= n_layers - 1). Ties go to the lowest start.

    Example, 4 layers, n = 2, d(0,2)=.3, d(1,2)=.1, d(2,2)=.05: without allow_last the candidates are starts 0
    and 1 -> removes (1, 2); with allow_last start 2 is allowed too -> removes (2, 3).

    Raises:
        PlanError: no block of that size fits, or a needed distance is missing.
    """
    last_start = n_layers - n if allow_last else n_layers - n - 1
    if n < 1 or last_start < 0:
        hint = "" if allow_last else " without the final layer (add --allow-last to allow it)"
        raise PlanError(f"`--n` {n}: no block of {n} layers fits in {n_layers} layers{hint}")
    missing = [l for l in range(last_start + 1) if (l, n) not in distances]
    if missing:
        raise PlanError(f"angular distance d({missing[0]}, {n}) is missing; recompute with `sweep similarity`")
    # NaN distances (a diverged calibration pass) never win.
    best = min(range(last_start + 1), key=lambda l: (_finite_or_inf(distances[(l, n)]), l))
    return tuple(range(best, best + n)), distances[(best, n)]


def block_influence_choice(influence: Sequence[float], n: int) -> tuple[Removal, float]:
    """The ``n`` layers with the lowest Block Influence (ties: lower layer first), and the sum of their BI.

    Example: BI = [.5, .1, .3, .2], n = 2 -> removes (1, 3), score .3.

    Raises:
        PlanError: n is more than the number of layers.
    """
    if not 1 <= n <= len(influence):
        raise PlanError(f"`--n` {n}: block-influence can remove 1 to {len(influence)} layers")
    order = sorted(range(len(influence)), key=lambda i: (_finite_or_inf(influence[i]), i))
    chosen = tuple(sorted(order[:n]))
    return chosen, sum(influence[i] for i in chosen)


@dataclass(frozen=True)
class GreedyStep:
    """One round of the greedy search."""

    step: int
    """1 for the first layer removed."""
    layer: int
    """The layer removed in this round (or whose branch was removed, with --unit attn, mlp or mix)."""
    removed: Removal
    """Every layer (or unit) removed after this round (canonical: sorted, ``a3,m3`` written ``3``)."""
    calib_ppl: float
    """Calibration perplexity of ``removed``."""


CalibPerplexities = Callable[[list[Removal]], list[float]]
"""Candidate removals -> their calibration perplexities (NaN or inf for failed/diverged candidates)."""


def greedy_path(n_layers: int, n_steps: int, calib_ppl: CalibPerplexities,
                done: Sequence[GreedyStep] = (), on_step: Callable[[GreedyStep], None] = lambda s: None,
                units: Sequence[steps.Edit] | None = None) -> list[GreedyStep]:
    """SLEB's greedy search: each round removes the layer whose removal gives the lowest calibration perplexity.

    Rounds already in ``done`` (a stored path, for resuming) are not recomputed. Ties go to the lower layer;
    NaN counts as worse than any finite perplexity. With ``units`` (``--unit attn|mlp|mix``,
    :func:`sweep.steps.unit_edits`) each round removes one unit instead (FinerCut's search over attention and MLP
    branches); in mix, removing both branches of a layer makes the variant key name the block (``a3,m3 -> 3``).

    Example, 3 layers, 2 steps: round 1 scores (0,), (1,), (2,) -> say (1,) is lowest: step 1 removes 1;
    round 2 scores (0, 1), (1, 2) -> say (1, 2): step 2 removes 2, path = [1, 2].

    Args:
        calib_ppl: scores a list of candidate removals at once (so they can share a trie pass).
        on_step: called with each new step as soon as it is chosen (to store it).

    Raises:
        PlanError: more steps than units.
    """
    units = list(range(n_layers)) if units is None else list(units)
    if not 0 <= n_steps <= len(units):
        word = "layers" if all(isinstance(u, int) for u in units) else "units"
        raise PlanError(f"`--n` {n_steps}: greedy can remove 0 to {len(units)} {word}")
    path = list(done[:n_steps])
    chosen = units_in(path[-1].removed, units) if path else []
    while len(path) < n_steps:
        left = [u for u in units if u not in chosen]
        candidates = [normalized((*chosen, unit)) for unit in left]
        scores = calib_ppl(candidates)
        best = min(range(len(candidates)), key=lambda i: (_finite_or_inf(scores[i]), i))
        chosen = [*chosen, left[best]]
        step = GreedyStep(len(path) + 1, steps.unit_layer(left[best]), candidates[best], scores[best])
        on_step(step)
        path.append(step)
    return path


def units_in(removed: Removal, units: Sequence[steps.Edit]) -> list[steps.Edit]:
    """The units a canonical variant removes: a block ``3`` is ``a3, m3`` when the units are branches."""
    out = []
    for edit in removed:
        out += [edit] if edit in units else [u for u in (f"a{edit}", f"m{edit}") if u in units]
    return out


def _finite_or_inf(value: float | None) -> float:
    return value if value is not None and math.isfinite(value) else math.inf


@dataclass(frozen=True)
class Choice:
    """A variant a strategy chose, and why."""

    strategy: str
    n: int
    removed: Removal
    signal: str
    """What the score is: ``angular-last``, ``angular-all``, ``block-influence`` or ``calib-ppl``."""
    score: float


def choose(strategy: str, sizes: Sequence[int], n_layers: int, *, distances: Distances | None = None,
           angular_signal: str = "angular-last", influence: Sequence[float] | None = None,
           path: Sequence[GreedyStep] | None = None, allow_last: bool = False) -> list[Choice]:
    """The variants one signal strategy picks for every block size / number of removed layers in ``sizes``.

    Raises:
        PlanError: a size does not fit, or the needed signal was not given.
    """
    if strategy == "angular" and distances is not None:
        picks = [(n, *angular_choice(distances, n, n_layers, allow_last)) for n in sizes]
        return [Choice(strategy, n, removed, angular_signal, score) for n, removed, score in picks]
    if strategy == "block-influence" and influence is not None:
        picks = [(n, *block_influence_choice(influence, n)) for n in sizes]
        return [Choice(strategy, n, removed, "block-influence", score) for n, removed, score in picks]
    if strategy == "greedy" and path is not None:
        if len(path) < max(sizes):
            raise PlanError(f"the greedy path has {len(path)} steps; {max(sizes)} are needed")
        return [Choice(strategy, n, path[n - 1].removed, "calib-ppl", path[n - 1].calib_ppl) for n in sizes]
    raise PlanError(f"strategy {strategy!r}: its signal was not computed")


@dataclass(frozen=True)
class Calibrated:
    """What a signal strategy chooses from (its record's ``chooses``, :data:`sweep.plan.STRATEGIES`)."""

    n_layers: int
    settings: Any
    """The sweep's config: ``angular_tokens``, ``allow_last``, ``unit``."""
    signals: Any = None
    """The layer signals (``angular_last``, ``angular_all``, ``block_influence``) where a strategy needs "signals"."""
    path: Sequence[GreedyStep] | None = None
    """The greedy path, as long as the largest size, where a strategy needs "greedy-path"."""
    searcher: Any = None
    """Where a strategy needs "search": scores candidates on the calibration text and stores them
    (:class:`sweep.engine.search.Searcher`)."""


def choose_angular(sizes: Sequence[int], cal: Calibrated) -> list[Choice]:
    """``angular``: the block of minimal distance over the tokens of ``--angular-tokens`` for each size."""
    tokens, signals = cal.settings.angular_tokens, cal.signals
    distances = signals.angular_last if tokens == "last" else signals.angular_all
    return choose("angular", sizes, cal.n_layers, distances=distances, angular_signal=f"angular-{tokens}",
                  allow_last=cal.settings.allow_last)


def choose_block_influence(sizes: Sequence[int], cal: Calibrated) -> list[Choice]:
    """``block-influence``: the layers of lowest Block Influence for each size."""
    return choose("block-influence", sizes, cal.n_layers, influence=cal.signals.block_influence)


def choose_greedy(sizes: Sequence[int], cal: Calibrated) -> list[Choice]:
    """``greedy``: the path's first n steps; a search over branches is its own strategy beside the one over
    blocks (``greedy-attn``, ``greedy-mlp``, ``greedy-mix``)."""
    picks = choose("greedy", sizes, cal.n_layers, path=cal.path)
    unit = cal.settings.unit
    return picks if unit == "block" else [replace(c, strategy=f"greedy-{unit}") for c in picks]
