"""The engine side of ``--strategy search``: score candidates on the calibration windows, store each one.

:mod:`sweep.search` decides (torch-free); a :class:`Searcher` gives it what it needs from the loaded model:

- the scorer: a list of candidates and a window range -> each candidate's per-window values, from one
  prefix-sharing trie pass (:meth:`sweep.engine.worker.Worker.evaluate_many` on the calibration text);
- with ``--fitness kl`` the values are KL divergences to the full model (:class:`perplexity.KLHeadLoss`), whose
  log-probabilities on the calibration windows are computed once;
- the parameters of every unit (for ``--budget-params``), the greedy path to seed from, and the store:
  every candidate is written as soon as it is measured (``search_candidates``), and read back to resume.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
from tqdm.auto import tqdm

from sweep import Log, search, steps, store
from sweep.engine import perplexity
from sweep.engine.data import EvalSetup
from sweep.engine.worker import Worker
from sweep.errors import SweepError
from sweep.store.schema import WINDOW_NLL

KL_REFERENCE_LIMIT = 4 * 2**30
"""Bytes the full model's calibration log-probabilities may take for ``--fitness kl`` (tokens x vocabulary x 4)."""


class Searcher:
    """What :func:`sweep.search.choose_search` asks of the engine, for one calibration text and unit."""

    def __init__(self, cal, db, key: dict, greedy_path: Callable[[int], list], stored_path: Callable[[str], list],
                 log: Log = print, progress: bool = True):
        cfg = cal.cfg
        self.cfg, self.db, self.key, self.log, self.progress = cfg, db, key, log, progress
        self.greedy_path, self.stored_path = greedy_path, stored_path
        self.worker = Worker(cal.model, cal.tokens, EvalSetup(cal.max_length, cal.max_length, cfg.calib_max_tokens),
                             cfg)
        windows = perplexity.scored_windows(len(self.worker.token_ids), cal.max_length, cal.max_length)
        self.tokens = np.array([w.n_targets - 1 for w in windows], dtype=np.float64)  # (W,) the guide's weights
        self.calib_tokens = float(self.tokens.sum())
        self.calib_name = cal.tokens.name
        self.signal = search.SIGNALS[cfg.fitness]
        if cfg.fitness == "kl":
            self.worker.head_loss = self._kl_head()
        units = steps.unit_edits(cfg.unit, cal.n_layers)
        self.total_params = self.worker.total_params
        self.unit_params = {u: self.total_params - self.worker.params_of((u,))[0] for u in units}

    def _kl_head(self) -> perplexity.KLHeadLoss:
        """The KL head, with the full model's log-probabilities on every calibration window (computed now, once).

        Raises:
            SweepError: they would not fit in :data:`KL_REFERENCE_LIMIT`.
        """
        w, vocab = self.worker, self.worker.model.config.vocab_size
        need = len(w.token_ids) * vocab * 4
        if need > KL_REFERENCE_LIMIT:
            raise SweepError(f"--fitness kl keeps the full model's log-probabilities on the calibration text: "
                             f"{len(w.token_ids):,} tokens x {vocab:,} = {need / 2**30:.1f} GiB; lower "
                             f"--calib-max-tokens to at most {KL_REFERENCE_LIMIT // (vocab * 4):,}")
        reference = perplexity.reference_log_probs(w.hidden_fn, w.logits_fn, w.token_ids, w.setup.max_length,
                                                   w.batch_size)
        return perplexity.KLHeadLoss(w.logits_fn, reference)

    def search_id(self, size: search.Size) -> str:
        """The ``search`` column of this run's search at ``size`` (:func:`sweep.search.search_id`)."""
        return search.search_id(self.cfg.unit, self.cfg.fitness, size, self.cfg.seed, self.cfg.search_level)

    def scorer(self, candidates: list[tuple], first: int, stop: int) -> list[np.ndarray]:
        """Per-window values of ``candidates`` on calibration windows [first, stop): one trie pass (NaN if diverged
        or failed)."""
        rows = self.worker.evaluate_many([steps.normalized(c) for c in candidates], window_range=(first, stop))
        return [np.asarray(row[WINDOW_NLL], dtype=np.float64) if row["status"] == "ok" and row.get(WINDOW_NLL)
                else np.full(stop - first, math.nan) for row in rows]

    def budget(self, problem: search.Problem, seeds: Sequence[Sequence]) -> int:
        """``--search-budget``, or :func:`sweep.search.default_budget` for the size (a budget's: its first seed's)."""
        if self.cfg.search_budget is not None:
            return self.cfg.search_budget
        size = problem.size.n if problem.size.n is not None else len(seeds[0]) if seeds else 1
        return search.default_budget(size, len(problem.units), int(self.calib_tokens))

    def run(self, problem: search.Problem, seeds: Sequence[Sequence]) -> search.Result:
        """One search, resumed from its stored candidates; every candidate is stored as it is measured."""
        sid = self.search_id(problem.size)
        stored = store.read_search_candidates(self.db, self.key, sid)
        known = {row["removed"]: row["window_values"] for row in stored}
        settings = search.Settings(self.budget(problem, seeds), self.cfg.search_level, self.cfg.seed,
                                   self.cfg.resamples)
        self.log(f"search {problem.size.label} over {len(problem.units)} {self.cfg.unit} units: at most "
                 f"{settings.budget_tokens:,} calibration tokens ({settings.budget_tokens / self.calib_tokens:.0f} "
                 f"passes of {int(self.calib_tokens):,} tokens of {self.calib_name}), {len(seeds)} seed(s)"
                 + (f", resuming from {len(stored)} stored candidates" if stored else ""))
        bar = tqdm(total=settings.budget_tokens, desc=f"search {problem.size.label}", unit="tok", unit_scale=True,
                   disable=not self.progress, dynamic_ncols=True)

        def save(c: search.Scored) -> None:
            fitness = float(np.sum(c.values)) / float(self.tokens[: len(c.values)].sum()) if len(c.values) else None
            store.record_search_candidate(self.db, self.key, sid, {
                "removed": c.key, "n_units": len(c.units), "generation": c.generation, "status": c.status,
                "n_windows": len(c.values), "fitness": fitness, "spent": c.spent, "window_values": c.values})

        def progress(spent: int, best: float) -> None:
            bar.update(min(spent, bar.total) - bar.n)
            bar.set_postfix_str(f"best {self.signal} {self._shown(best):.4g}")

        try:
            result = search.Search(problem, self.tokens, self.scorer, settings, known, save, progress).run(seeds)
        finally:
            bar.close()
        self.log(f"  search {problem.size.label}: {len(result.candidates)} candidates in {result.generations} "
                 f"generations, {result.spent:,} tokens (stopped: {result.stopped}); best removes "
                 f"{result.best.key}: {self.signal} {self._shown(self._fitness(result.best)):.4g}")
        return result

    def _fitness(self, c: search.Scored) -> float:
        return float(np.sum(c.values)) / self.calib_tokens

    def _shown(self, fitness: float) -> float:
        """Calibration perplexity from a mean NLL; KL as it is."""
        return math.exp(fitness) if self.signal == "calib-ppl" and fitness < 700 else fitness

