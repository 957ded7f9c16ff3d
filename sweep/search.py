"""``--strategy search``: an evolutionary search over which units to remove, selected by paired per-window
intervals. Pure Python and numpy; the engine supplies the scorer (:mod:`sweep.engine.search`), so this module is
tested with plain functions standing in for a model.

A candidate is a set of removed units (``--unit``: blocks, attention or MLP branches, or both kinds). Its fitness is
a per-token mean over calibration windows: the calibration NLL (its exponential is the calibration perplexity) or,
with ``--fitness kl``, the KL divergence to the full model's next-token distribution. Lower is better. The scorer
returns per-window sums (window w: ``values[w]``, weighing ``tokens[w]`` tokens), so any prefix of the windows gives
a fitness, and two candidates can be compared *paired* on the same windows (:mod:`sweep.intervals`).

One generation (the parent is the leader so far)::

    offspring  = up to OFFSPRING unseen mutants of the leader (swap removed units for kept ones)
    windows m  = FIRST_WINDOWS, 2 m, 4 m, ... up to all W
    on [0, m): every offspring still alive is scored on the new windows (one trie pass: they share prefixes);
               one whose perplexity change against the leader has a paired interval above 0 at ``level`` is
               dropped (no fixed number survives: as many as cannot be told worse)
    at m = W:  the best survivor replaces the leader if its fitness on all windows is lower

Example, 4 windows, FIRST_WINDOWS 2: a leader with per-window NLL [10, 12, 11, 9] and an offspring with
[13, 15, 14, 12] (worse on every window) is dropped after 2 windows: every bootstrap resample of windows 0-1 has it
worse. One with [9, 12, 12, 9] cannot be told apart on two windows, goes on to all 4, and replaces the leader only if
its sum (42) is below the leader's (42): a tie keeps the leader.

Seeds (the heuristics' choices and seeded random ones) are raced the same way against the first seed. The search
stops when the next slice would spend more than ``budget_tokens`` calibration tokens (a token scored for one
candidate counts once, shared trie work or not, as EvoPress counts); when the leader is a local optimum (every
single-swap neighbour seen) and :data:`PATIENCE` generations found nothing better; or when no unseen mutant is left.

Determinism and resuming: all randomness comes from one ``numpy`` generator seeded with ``seed``, and scores are
looked up in ``known`` (the stored per-window values) before the scorer is asked. A killed search, started again
with what it had stored, replays the same choices without recomputing them and goes on where it stopped: it ends
exactly where an uninterrupted one ends.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from sweep import intervals, steps, strategies
from sweep.errors import PlanError
from sweep.steps import Edit, normalized

OFFSPRING = 16
"""Mutants drawn per generation (EvoPress: 32 on 2,048 tokens, then 2 on more). Racing decides how many survive."""
FIRST_WINDOWS = 4
"""Windows of the first slice of a generation's race: below 4 a paired interval over windows says little."""
MORE_SWAPS = 0.25
"""Chance that a mutant takes one more swap than the last (1 swap: 75 %, 2: 19 %, 3: 5 %, ...), so the search can
step past a leader all of whose single-swap neighbours are worse."""
DRAWS_PER_OFFSPRING = 40
"""Random draws tried per wanted mutant before the search concludes the leader's neighbourhood is spent."""
RANDOM_SEEDS = 2
"""Seeded random candidates added to the heuristics' seeds."""
PATIENCE = 4
"""Generations without a better leader after which a search whose leader has no unseen single-swap neighbour left
stops (``converged``): it is a local optimum, and the multi-swap mutants have not found a way out."""


@dataclass(frozen=True)
class Size:
    """What a candidate must remove: exactly ``n`` units, or units holding at least ``budget`` of all parameters."""

    n: int | None = None
    budget: float | None = None
    """A fraction of all parameters (``--budget-params``)."""

    @property
    def label(self) -> str:
        """How the store and the report name the size: ``n=8`` or ``params>=0.158``."""
        return f"n={self.n}" if self.n is not None else f"params>={self.budget:g}"

    @classmethod
    def from_label(cls, label: str) -> Size:
        """Inverse of :attr:`label`: ``"n=8"`` -> Size(n=8), ``"params>=0.158"`` -> Size(budget=0.158).

        Raises:
            ValueError: neither form.
        """
        if label.startswith("n="):
            return cls(n=int(label[2:]))
        if label.startswith("params>="):
            return cls(budget=float(label[len("params>="):]))
        raise ValueError(f"not a search size: {label!r}")


SIGNALS = {"ppl": "calib-ppl", "kl": "calib-kl"}
"""``--fitness`` -> the signal its choices are stored with in ``strategy_choices``."""


def signal_name(fitness: str, size: Size) -> str:
    """The ``strategy_choices.signal`` of a search's choice: ``calib-ppl``, or at a budget ``calib-ppl@params>=0.158``
    (the budget is named there, as ``n`` then holds the units the choice removes)."""
    return SIGNALS[fitness] if size.n is not None else f"{SIGNALS[fitness]}@{size.label}"


def search_id(unit: str, fitness: str, size: Size, seed: int, level: float) -> str:
    """The ``search_candidates.search`` of one search: every setting that changes what it does, so that a resume
    never mixes two (the budget is not one of them: a larger one continues a search).
    Example: ``search_id("block", "ppl", Size(n=8), 0, 0.95) == "block/ppl/n=8/seed=0/level=0.95"``."""
    return f"{unit}/{fitness}/{size.label}/seed={seed}/level={level:g}"


def parse_search_id(text: str) -> tuple[str, str, Size] | None:
    """(unit, fitness, size) of a :func:`search_id`; None for text of another form."""
    parts = text.split("/")
    try:
        return (parts[0], parts[1], Size.from_label(parts[2])) if len(parts) >= 3 and parts[1] in SIGNALS else None
    except ValueError:
        return None


@dataclass(frozen=True)
class Problem:
    """The units a search may remove, the size it must meet, and (for a parameter budget) what each unit weighs."""

    units: tuple[Edit, ...]
    """Removable units in model order (:func:`sweep.steps.unit_edits`)."""
    size: Size
    unit_params: Mapping[Edit, int] = field(default_factory=dict)
    """Parameters of each unit (a block's includes its norms): needed for a parameter budget."""
    total_params: int = 0
    """All parameters of the model (embeddings included), the budget's denominator."""

    def removed_params(self, chosen: Sequence[Edit]) -> int:
        return sum(self.unit_params[u] for u in chosen)

    def meets(self, chosen: Sequence[Edit]) -> bool:
        if self.size.n is not None:
            return len(chosen) == self.size.n
        return self.removed_params(chosen) >= self.size.budget * self.total_params

    def check(self) -> None:
        """Raises PlanError when no candidate can meet the size."""
        if self.size.n is not None and not 1 <= self.size.n < len(self.units):
            raise PlanError(f"`--n` {self.size.n}: search removes 1 to {len(self.units) - 1} of {len(self.units)} units")
        if self.size.budget is not None:
            if not self.unit_params or not self.total_params:
                raise PlanError("`--budget-params` needs the parameters of every unit")
            if not 0 < self.size.budget < self.removed_params(self.units) / self.total_params:
                top = self.removed_params(self.units) / self.total_params
                raise PlanError(f"`--budget-params` {self.size.budget:g}: the units hold {top:.4f} of all "
                                "parameters; give a fraction between 0 and that")


Scorer = Callable[[list[tuple[Edit, ...]], int, int], list[np.ndarray]]
"""(candidates, first window, stop window) -> per-window values of each candidate on windows [first, stop), (stop -
first,) arrays; NaN or inf for a candidate that diverged."""


@dataclass
class Scored:
    """One candidate as far as the search has measured it."""

    units: tuple[Edit, ...]
    values: np.ndarray
    """(m,) per-window values on windows [0, m)."""
    generation: int
    status: str = "racing"
    """racing (measured on a first part of the windows), dropped (worse than the leader at the level), scored
    (all windows), leader (it led the search at some point)."""
    spent: int = 0
    """Calibration tokens the search had spent after this candidate's last slice."""

    @property
    def key(self) -> str:
        return steps.variant_key(normalized(self.units)) if self.units else ""


@dataclass(frozen=True)
class Settings:
    budget_tokens: int
    """Calibration tokens the search may spend (:func:`default_budget`)."""
    level: float = 0.95
    """Coverage of the paired interval that drops an offspring (``--search-level``)."""
    seed: int = 0
    resamples: int = intervals.RESAMPLES
    offspring: int = OFFSPRING


def default_budget(size_units: int, n_units: int, calib_tokens: int) -> int:
    """The default ``--search-budget``: ``2 * size_units * n_units`` full calibration passes, about twice what
    greedy spends to reach that size (it scores n_units, n_units - 1, ... candidates per round). Racing makes most
    candidates cost a fraction of a pass, and the trie shares their leading layers, so the time is far less.

    Example: 8 of 30 layers on 2,048 calibration tokens -> 2 * 8 * 30 * 2,048 = 983,040 tokens.
    """
    return 2 * max(1, size_units) * n_units * calib_tokens


@dataclass
class Result:
    best: Scored
    """The leader at the end: its values cover every window."""
    candidates: list[Scored]
    """Every candidate scored, in the order first scored."""
    spent: int
    generations: int
    stopped: str
    """Why it stopped: ``budget``, ``converged`` (a local optimum, :data:`PATIENCE`) or ``neighbourhood`` (no
    unseen mutant left)."""

    def trajectory(self, tokens: Sequence[float]) -> list[tuple[int, float]]:
        """(tokens spent, best fitness) each time the leader changed: the report's trajectory figure."""
        return trajectory(self.candidates, tokens)


def trajectory(candidates: Sequence[Scored], tokens: Sequence[float]) -> list[tuple[int, float]]:
    """The running best fitness over the candidates scored on every window, in the order they completed (by tokens
    spent then): ``[(spent, fitness), ...]``, one point per improvement.

    Example: completions (spent 100, fitness 3.1), (250, 3.3), (400, 2.9) -> [(100, 3.1), (400, 2.9)].
    """
    total, n_windows = float(np.sum(tokens)), len(tokens)
    points, best = [], math.inf
    for c in sorted((c for c in candidates if len(c.values) == n_windows and c.status != "dropped"),
                    key=lambda c: c.spent):
        fitness = float(np.sum(c.values)) / total
        if fitness < best:
            best = fitness
            points.append((c.spent, best))
    return points


class Search:
    """One search (one size). ``known``: stored per-window values by variant key (windows [0, m)), for resuming;
    ``on_scored``: called with a candidate each time it is measured further or changes status (to store it)."""

    def __init__(self, problem: Problem, tokens: Sequence[float], scorer: Scorer, settings: Settings,
                 known: Mapping[str, np.ndarray] | None = None, on_scored: Callable[[Scored], None] = lambda c: None,
                 on_progress: Callable[[int, float], None] = lambda spent, best: None):
        problem.check()
        self.problem = problem
        self.tokens = np.asarray(tokens, dtype=np.float64)  # (W,)
        self.scorer = scorer
        self.settings = settings
        self.known = dict(known or {})
        self.on_scored = on_scored
        self.on_progress = on_progress
        self.rng = np.random.default_rng(settings.seed)
        self.seen: dict[str, Scored] = {}
        self.spent = 0
        self.generation = 0
        self.stopped = ""

    # ------------------------------------------------------------------------------------------ fitness

    @property
    def n_windows(self) -> int:
        return len(self.tokens)

    def fitness(self, c: Scored) -> float:
        """Per-token mean of the windows measured so far (inf for a diverged candidate)."""
        total = float(np.sum(c.values))
        return total / float(self.tokens[: len(c.values)].sum()) if len(c.values) and math.isfinite(total) else math.inf

    def _slices(self) -> list[int]:
        """Window counts after each slice of a race: 4, 8, 16, ... W (W alone when it has fewer than 8)."""
        stops, m = [], FIRST_WINDOWS
        while m < self.n_windows:
            stops.append(m)
            m *= 2
        return stops + [self.n_windows]

    def _cost(self, alive: Sequence[Scored], stop: int) -> int:
        return int(sum(self.tokens[len(c.values):stop].sum() for c in alive))

    def _measure(self, alive: list[Scored], stop: int) -> bool:
        """Extend every candidate of ``alive`` to windows [0, stop); False (nothing measured) if over the budget."""
        todo = [c for c in alive if len(c.values) < stop]
        if not todo:
            return True
        cost = self._cost(todo, stop)
        if self.spent + cost > self.settings.budget_tokens:
            self.stopped = "budget"
            return False
        by_start: dict[int, list[Scored]] = {}
        for c in todo:  # what is stored already (a resumed search) is not measured again
            have = len(self.known.get(c.key, ()))
            if have < stop:
                by_start.setdefault(have, []).append(c)
        for start, group in by_start.items():
            for c, values in zip(group, self.scorer([c.units for c in group], start, stop)):
                before = self.known.get(c.key, np.zeros(0))
                self.known[c.key] = np.concatenate([before[:start], np.asarray(values, dtype=np.float64)])
        self.spent += cost
        for c in todo:
            c.values = self.known[c.key][:stop]
            c.spent = self.spent
            if len(c.values) == self.n_windows:
                c.status = "scored"
            self.on_scored(c)
        return True

    def _worse(self, c: Scored, leader: Scored) -> bool:
        """Worse than the leader on the windows measured so far, at the level (always, if it diverged)."""
        m = len(c.values)
        if not math.isfinite(float(np.sum(c.values))):
            return True
        if m < FIRST_WINDOWS and m < self.n_windows:
            return False
        change = intervals.change_intervals(c.values[None, :], self.tokens[:m], leader.values[:m],
                                            self.settings.resamples, self.settings.seed, self.settings.level)[0]
        return change.low > 0

    def race(self, candidates: list[Scored], leader: Scored) -> Scored | None:
        """The best of ``candidates`` still alive on every window (None if all were dropped or the budget ran out)."""
        alive = list(candidates)
        for stop in self._slices():
            if not alive or not self._measure(alive, stop):
                return None
            for c in alive:
                if self._worse(c, leader):
                    c.status = "dropped"
                    self.on_scored(c)
            alive = [c for c in alive if c.status != "dropped"]
        return min(alive, key=self.fitness, default=None)

    # ------------------------------------------------------------------------------------------ candidates

    def _new(self, units: Sequence[Edit]) -> Scored | None:
        """A candidate not seen before (None if seen): units in model order."""
        order = {u: i for i, u in enumerate(self.problem.units)}
        units = tuple(sorted(set(units), key=order.__getitem__))
        c = Scored(units, np.zeros(0), self.generation)
        if c.key in self.seen:
            return None
        self.seen[c.key] = c
        return c

    def repair(self, chosen: list[Edit], keep: Edit | None = None) -> list[Edit]:
        """A budget candidate meeting its budget: add random kept units while below it, then drop random removed ones
        (never ``keep``, the unit a mutation just added) while it stays at or above it. Counts are left alone."""
        if self.problem.size.n is not None:
            return chosen
        chosen = list(chosen)
        kept = [u for u in self.problem.units if u not in chosen]
        self.rng.shuffle(kept)
        while not self.problem.meets(chosen) and kept:
            chosen.append(kept.pop())
        for unit in [chosen[i] for i in self.rng.permutation(len(chosen))]:
            trial = [u for u in chosen if u != unit]
            if unit != keep and self.problem.meets(trial):
                chosen = trial
        return chosen

    def mutant(self, parent: Sequence[Edit]) -> list[Edit]:
        """``parent`` with k removed units swapped for kept ones (k = 1, then one more with :data:`MORE_SWAPS`)."""
        chosen = list(parent)
        swaps = 1
        while self.rng.random() < MORE_SWAPS and swaps < len(chosen):
            swaps += 1
        added = None
        for _ in range(swaps):
            kept = [u for u in self.problem.units if u not in chosen]
            if not kept or not chosen:
                break
            out = chosen[int(self.rng.integers(len(chosen)))]
            added = kept[int(self.rng.integers(len(kept)))]
            chosen = [u for u in chosen if u != out] + [added]
        return self.repair(chosen, keep=added)

    def random_candidate(self) -> list[Edit]:
        units = list(self.problem.units)
        if self.problem.size.n is not None:
            picks = self.rng.choice(len(units), size=self.problem.size.n, replace=False)
            return [units[int(i)] for i in picks]
        return self.repair([])

    def offspring(self, leader: Scored) -> list[Scored]:
        out: list[Scored] = []
        for _ in range(self.settings.offspring * DRAWS_PER_OFFSPRING):
            if len(out) == self.settings.offspring:
                break
            c = self._new(self.mutant(leader.units))
            if c is not None:
                out.append(c)
        return out

    # ------------------------------------------------------------------------------------------ the search

    def run(self, seeds: Sequence[Sequence[Edit]]) -> Result:
        """Race the seeds (the first is scored on every window and leads), then generations until the budget or the
        neighbourhood is spent. Seeds that do not meet the size are repaired (budget) or refused (count).

        Raises:
            PlanError: no seed, or a count seed of the wrong size.
        """
        pool = [list(s) for s in seeds] + [self.random_candidate() for _ in range(RANDOM_SEEDS)]
        starts = []
        for units in pool:
            units = self.repair(units)
            if not self.problem.meets(units):
                raise PlanError(f"search seed {steps.variant_key(normalized(tuple(units)))!r} does not remove "
                                f"{self.problem.size.label}")
            c = self._new(units)
            if c is not None:
                starts.append(c)
        leader = starts[0]
        if not self._measure([leader], self.n_windows):
            raise PlanError(f"`--search-budget` {self.settings.budget_tokens:,} tokens does not cover scoring one "
                            f"candidate on all {int(self.tokens.sum()):,} calibration tokens")
        leader = self._lead(leader)
        best = self.race(starts[1:], leader)
        if best is not None and self.fitness(best) < self.fitness(leader):
            leader = self._lead(best)
        since = 0  # generations since the leader last changed
        while not self.stopped:
            if since >= PATIENCE and self._local_optimum(leader):
                self.stopped = "converged"
                break
            self.generation += 1
            children = self.offspring(leader)
            if not children:
                self.stopped = "neighbourhood"
                break
            best = self.race(children, leader)
            since += 1
            if best is not None and self.fitness(best) < self.fitness(leader):
                leader, since = self._lead(best), 0
            self.on_progress(self.spent, self.fitness(leader))
        return Result(leader, list(self.seen.values()), self.spent, self.generation, self.stopped)

    def _local_optimum(self, leader: Scored) -> bool:
        """Every single swap of one removed unit for one kept unit of the leader has been seen (counts only: a
        budget's repaired mutants have no such finite neighbourhood, so it runs to its budget)."""
        if self.problem.size.n is None:
            return False
        kept = [u for u in self.problem.units if u not in leader.units]
        for out in leader.units:
            for unit in kept:
                swapped = tuple(u for u in leader.units if u != out) + (unit,)
                if steps.variant_key(normalized(swapped)) not in self.seen:
                    return False
        return True

    def _lead(self, c: Scored) -> Scored:
        c.status = "leader"
        self.on_scored(c)
        self.on_progress(self.spent, self.fitness(c))
        return c


# ---------------------------------------------------------------------------------------------- the strategy


def parse_budgets(text: str | None) -> list[float]:
    """``--budget-params "0.158,0.2106"`` -> [0.158, 0.2106] (fractions of all parameters, each in (0, 1)).

    Raises:
        PlanError: malformed text or a fraction outside (0, 1).
    """
    if not text:
        return []
    try:
        budgets = sorted({float(part) for part in str(text).split(",") if part.strip()})
    except ValueError:
        raise PlanError(f"`--budget-params` must look like 0.158 or 0.158,0.2106; got {text!r}") from None
    if not budgets or not all(0 < b < 1 for b in budgets):
        raise PlanError(f"`--budget-params` fractions must lie between 0 and 1; got {text!r}")
    return budgets


def sizes_of(settings, n_sizes: Sequence[int]) -> list[Size]:
    """The sizes a search runs at: the budgets of ``--budget-params`` when given, else the counts of ``--n``."""
    budgets = parse_budgets(settings.budget_params)
    return [Size(budget=b) for b in budgets] if budgets else [Size(n=n) for n in n_sizes]


def strategy_name(unit: str) -> str:
    """``search`` over blocks; over branches ``search-attn``, ``search-mlp``, ``search-mix`` (as greedy's)."""
    return "search" if unit == "block" else f"search-{unit}"


def _block_seeds(problem: Problem, cal, unit: str) -> list[list[Edit]]:
    """Angular's and Block Influence's block choices, turned into the search's units: for a count, the blocks that
    give n units (mix: n / 2 blocks, when n is even); for a budget, the fewest blocks that meet it."""
    if cal.signals is None:
        return []
    per_block = 2 if unit == "mix" else 1
    if problem.size.n is not None:
        counts = [problem.size.n // per_block] if problem.size.n % per_block == 0 else []
    else:
        counts = list(range(1, cal.n_layers))
    seeds = []
    for chooser in (strategies.choose_angular, strategies.choose_block_influence):
        for m in counts:
            try:
                blocks = chooser([m], cal)[0].removed
            except PlanError:  # angular has no block of that size without the final layer
                continue
            units = strategies.units_in(blocks, problem.units)
            if problem.meets(units):
                seeds.append(units)
                break
    return seeds


def _path_seed(problem: Problem, path: Sequence, units: Sequence[Edit]) -> list[Edit] | None:
    """The first prefix of a greedy path that meets the size, in the search's units. A budget the whole path does not
    meet gets the whole path (the search's repair adds kept units until it does); a count it does not reach, None."""
    for step in path:
        chosen = strategies.units_in(step.removed, units)
        if problem.meets(chosen):
            return chosen
    if path and problem.size.budget is not None:
        return strategies.units_in(path[-1].removed, units)
    return None


def seeds_for(problem: Problem, cal) -> list[list[Edit]]:
    """The population a search starts from, best-founded first: greedy's choice (its path over ``--unit``; for a
    budget also a stored path over blocks), then angular's and Block Influence's (:func:`_block_seeds`). The search
    adds seeded random ones. The first seed leads at the start, so the search never ends worse on calibration
    than it."""
    searcher, unit = cal.searcher, cal.settings.unit
    paths = []
    if problem.size.n is not None:
        paths.append(searcher.greedy_path(problem.size.n))
    else:
        paths += [p for p in (searcher.stored_path(unit), searcher.stored_path("block")) if p]
    seeds = [s for s in (_path_seed(problem, p, problem.units) for p in paths) if s is not None]
    return seeds + _block_seeds(problem, cal, unit)


def choose_search(sizes: Sequence[int], cal) -> list:
    """``search``: for each size (``--n``, or each fraction of ``--budget-params``), the candidate the search ends
    with (:class:`Search`), started from :func:`seeds_for`. ``cal.searcher`` (:mod:`sweep.engine.search`) scores
    candidates on the calibration windows and stores each one."""
    unit, searcher = cal.settings.unit, cal.searcher
    units = tuple(steps.unit_edits(unit, cal.n_layers))
    choices = []
    for size in sizes_of(cal.settings, sizes):
        problem = Problem(units, size, searcher.unit_params, searcher.total_params)
        problem.check()
        seeds = seeds_for(problem, cal)
        if not seeds:
            seeds = [list(units[:size.n])] if size.n is not None else [[]]
        result = searcher.run(problem, seeds)
        fitness = float(np.sum(result.best.values)) / searcher.calib_tokens
        signal = signal_name(cal.settings.fitness, size)
        score = math.exp(fitness) if cal.settings.fitness == "ppl" else fitness
        choices.append(strategies.Choice(strategy_name(unit), size.n if size.n is not None else len(result.best.units),
                                         normalized(result.best.units), signal, score))
    return choices
