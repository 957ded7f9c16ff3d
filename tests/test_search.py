"""``--strategy search`` (sweep/search.py): the optimizer on synthetic objectives with a known optimum, then the
engine on tiny seeded models against exhaustive search of the same objective, resuming, budgets and KL."""
from __future__ import annotations

import itertools
import math
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sweep import search, store
from sweep.config import SweepConfig
from sweep.engine import adapters, models, perplexity, similarity
from sweep.engine.runner import run_sweep
from sweep.errors import PlanError
from tiny import tiny_model, db_rows, train_briefly

# ---------------------------------------------------------------------------------------------- synthetic objective


class Objective:
    """Per-window values of a removal: a per-unit cost plus pairwise interactions, over noisy windows (each window
    weighs 256 tokens). An exhaustive minimum over all subsets is the reference."""

    def __init__(self, n_units: int = 12, n_windows: int = 16, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.base = rng.normal(0, 1, (n_units, n_windows)) + rng.normal(3, 1, (n_units, 1))  # (U, W)
        self.pair = rng.normal(0, 0.3, (n_units, n_units))
        self.units = tuple(range(n_units))
        self.tokens = np.full(n_windows, 256.0)
        self.calls = 0

    def values(self, chosen) -> np.ndarray:
        """(W,) per-window values of removing ``chosen``."""
        chosen = sorted(chosen)
        pairs = sum(self.pair[a, b] for a, b in itertools.combinations(chosen, 2))
        return 100 + self.base[chosen].sum(axis=0) + pairs

    def total(self, chosen) -> float:
        return float(self.values(chosen).sum())

    def scorer(self, candidates, first, stop):
        self.calls += len(candidates)
        return [self.values(c)[first:stop] for c in candidates]

    def exhaustive(self, n: int) -> tuple:
        return min(itertools.combinations(self.units, n), key=self.total)

    def greedy(self, n: int) -> list:
        chosen: list = []
        for _ in range(n):
            chosen = min((chosen + [u] for u in self.units if u not in chosen), key=self.total)
        return chosen


def _search(obj: Objective, size: search.Size, budget_passes: float | None = None, **kw) -> search.Search:
    n = size.n or 3
    budget = (search.default_budget(n, len(obj.units), int(obj.tokens.sum())) if budget_passes is None
              else int(budget_passes * obj.tokens.sum()))
    problem = search.Problem(obj.units, size, kw.pop("unit_params", {}), kw.pop("total_params", 0))
    return search.Search(problem, obj.tokens, obj.scorer, search.Settings(budget, **kw), **{
        k: kw.pop(k) for k in list(kw) if k in ("known", "on_scored")})


@pytest.mark.parametrize("seed", [0, 1, 3])
def test_search_from_greedy_finds_the_exhaustive_optimum_with_a_fraction_of_its_tokens(seed):
    obj = Objective(seed=seed)
    spent = exhaustive = 0
    for n in range(1, 7):
        result = _search(obj, search.Size(n=n)).run([obj.greedy(n)])
        assert result.best.units == obj.exhaustive(n), n
        spent += result.spent
        exhaustive += math.comb(len(obj.units), n) * obj.tokens.sum()
    assert spent < exhaustive / 5


def test_the_search_never_ends_worse_than_its_first_seed_and_its_choice_is_the_best_fully_scored():
    obj = Objective(seed=5)
    seed_units = [0, 1, 2, 3]
    result = _search(obj, search.Size(n=4)).run([seed_units])
    assert obj.total(result.best.units) <= obj.total(seed_units)
    full = [c for c in result.candidates if len(c.values) == len(obj.tokens) and c.status != "dropped"]
    assert obj.total(result.best.units) == pytest.approx(min(obj.total(c.units) for c in full))
    assert all(len(c.units) == 4 for c in result.candidates)


def test_an_offspring_worse_on_every_window_is_dropped_after_the_first_slice():
    tokens = np.full(8, 100.0)
    leader_values = np.arange(8, dtype=float) + 10
    scores = {(0,): leader_values, (1,): leader_values + 3}  # (1,) worse on every window
    seen: list[tuple] = []

    def scorer(candidates, first, stop):
        seen.extend((c, first, stop) for c in candidates)
        return [scores.get(c, leader_values + 5)[first:stop] for c in candidates]

    s = search.Search(search.Problem((0, 1, 2), search.Size(n=1)), tokens, scorer, search.Settings(10**6))
    leader = s._new([0])
    s._measure([leader], 8)
    offspring = s._new([1])
    assert s.race([offspring], leader) is None
    assert offspring.status == "dropped" and len(offspring.values) == search.FIRST_WINDOWS
    assert ((1,), 0, search.FIRST_WINDOWS) in seen and not any(c == (1,) and stop == 8 for c, _, stop in seen)


def test_the_same_seed_gives_the_same_search():
    runs = [_search(Objective(seed=2), search.Size(n=5), seed=7).run([[0, 1, 2, 3, 4]]) for _ in range(2)]
    assert [(c.key, c.status, c.spent) for c in runs[0].candidates] == \
           [(c.key, c.status, c.spent) for c in runs[1].candidates]


def test_a_killed_search_resumed_from_what_it_stored_ends_as_an_uninterrupted_one():
    whole = _search(Objective(seed=4), search.Size(n=5)).run([[0, 1, 2, 3, 4]])
    stored: dict[str, np.ndarray] = {}
    obj = Objective(seed=4)
    calls = {"n": 0}

    def dying(candidates, first, stop):
        calls["n"] += 1
        if calls["n"] == 12:
            raise KeyboardInterrupt  # as a kill in the middle of a generation
        return obj.scorer(candidates, first, stop)

    problem = search.Problem(obj.units, search.Size(n=5))
    settings = search.Settings(search.default_budget(5, 12, int(obj.tokens.sum())))
    with pytest.raises(KeyboardInterrupt):
        search.Search(problem, obj.tokens, dying, settings,
                      on_scored=lambda c: stored.__setitem__(c.key, c.values.copy())).run([[0, 1, 2, 3, 4]])
    obj.calls = 0
    resumed = search.Search(problem, obj.tokens, obj.scorer, settings, known=stored).run([[0, 1, 2, 3, 4]])
    assert resumed.best.key == whole.best.key and resumed.spent == whole.spent
    assert [(c.key, c.status, c.spent) for c in resumed.candidates] == \
           [(c.key, c.status, c.spent) for c in whole.candidates]
    assert 0 < obj.calls < sum(1 for _ in whole.candidates)  # only what the killed one had not stored


def test_the_budget_bounds_the_tokens_spent():
    obj = Objective(seed=6)
    for passes in (3, 10, 30):
        result = _search(obj, search.Size(n=4), budget_passes=passes).run([[0, 1, 2, 3]])
        assert result.spent <= passes * obj.tokens.sum()
        assert result.stopped in ("budget", "converged", "neighbourhood")
    with pytest.raises(PlanError, match="does not cover scoring one candidate"):
        _search(obj, search.Size(n=4), budget_passes=0.5).run([[0, 1, 2, 3]])


def test_a_parameter_budget_is_met_by_every_candidate_and_not_exceeded_by_a_whole_unit():
    obj = Objective(n_units=12, seed=8)
    params = {u: 100 + 50 * (u % 3) for u in obj.units}  # three unit sizes, like attention, MLP and blocks
    total = 4000
    s = _search(obj, search.Size(budget=0.2), budget_passes=60, unit_params=params, total_params=total)
    result = s.run([[0, 1, 2, 3, 4, 5]])  # more than the budget: repaired down
    for c in result.candidates:
        removed = sum(params[u] for u in c.units)
        assert removed >= 0.2 * total
        assert all(removed - params[u] < 0.2 * total for u in c.units if c.generation == 0)  # seeds: minimal
    assert search.Size(budget=0.2).label == "params>=0.2"


def test_budget_and_size_errors_are_named():
    with pytest.raises(PlanError, match="between 0 and 1"):
        search.parse_budgets("0.2,1.5")
    with pytest.raises(PlanError, match="must look like"):
        search.parse_budgets("a lot")
    assert search.parse_budgets("0.2106,0.158") == [0.158, 0.2106]
    with pytest.raises(PlanError, match="removes 1 to 3 of 4"):
        search.Problem((0, 1, 2, 3), search.Size(n=4)).check()
    with pytest.raises(PlanError, match="hold"):
        search.Problem((0, 1), search.Size(budget=0.9), {0: 1, 1: 1}, 10).check()


def test_trajectory_is_the_running_best_of_fully_scored_candidates():
    tokens = np.full(2, 1.0)
    mk = lambda values, spent, status="scored": search.Scored((0,), np.array(values, float), 0, status, spent)
    points = search.trajectory([mk([2, 2], 300), mk([1.5, 1.5], 100), mk([1, 1], 200, "dropped"), mk([1], 50),
                                mk([1, 0.5], 400)], tokens)
    assert points == [(100, 1.5), (400, 0.75)]


# ---------------------------------------------------------------------------------------------- on tiny models

DATA = Path(__file__).parent / "data"
SEARCH_LAYERS = 10


@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory, byte_tokenizer_dir) -> Path:
    """A 10-layer GPT-2 (64 wide) trained for 40 seeded steps on the sample text, so layers differ in what they
    cost (random weights make every removal about equally useless)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(byte_tokenizer_dir)
    model = tiny_model("gpt2", n_layers=SEARCH_LAYERS, vocab=256, seed=4)
    train_briefly(model, tokenizer, (DATA / "sample.txt").read_text(), steps=40, lr=3e-3)
    out = tmp_path_factory.mktemp("trained-gpt2")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _cfg(model_dir, tmp_path, **overrides) -> SweepConfig:
    values = dict(model=str(model_dir), db=str(tmp_path / "r.db"), cache_dir=str(tmp_path / "cache"),
                  data=str(DATA / "sample.txt"), calib_data=str(DATA / "calib.txt"), max_length=64,
                  max_tokens=512, calib_max_tokens=1024, latency="off", strategy="search")
    values.update(overrides)
    return SweepConfig(**values)


_rows = db_rows


def _calibration_nll(model, ids, removed) -> float:
    """The plain model without ``removed`` on every calibration window: no trie, no split head, no slices."""
    with adapters.pruned(model, removed):
        result = perplexity.perplexity(lambda x: model(x).logits, lambda h: h, ids, 64, 64, 4, ids.device)
    return result.nll_sum


def test_search_finds_the_exhaustive_optimum_of_calibration_perplexity_with_far_fewer_tokens(trained_dir, tmp_path):
    cfg = _cfg(trained_dir, tmp_path, n="2,5,8")
    run_sweep(cfg, log=lambda s: None, progress=False)
    model = models.load_model(cfg.model, dtype="float32", device="cpu")
    db = store.open_db(cfg.db)
    cal = similarity.open_calibration(cfg, model, models.tokenizer_for(cfg), db)
    ids = cal.token_ids
    choices = {r["n"]: r for r in _rows(cfg.db, "select * from strategy_choices where strategy = 'search'")}
    spent = {r["search"]: r["spent"] for r in _rows(cfg.db, "select search, max(spent) as spent from "
                                                             "search_candidates group by search")}
    for n in (2, 5, 8):
        every = {c: _calibration_nll(model, ids, c) for c in itertools.combinations(range(SEARCH_LAYERS), n)}
        best = min(every.values())
        chosen = tuple(int(x) for x in choices[n]["removed"].split(","))
        assert every[chosen] <= best * (1 + 1e-6), n  # the optimum, up to float ties
        n_tokens = len(ids) - math.ceil(len(ids) / 64)  # the guide's weights: one label fewer per window
        assert math.exp(every[chosen] / n_tokens) == pytest.approx(choices[n]["score"], rel=1e-5)
        exhaustive_tokens = len(every) * n_tokens
        used = spent[f"block/ppl/n={n}/seed=0/level=0.95"]
        assert used < exhaustive_tokens * (0.5 if n == 5 else 1.0), (n, used, exhaustive_tokens)
    # Every choice is then measured on the test text like any other strategy's.
    measured = {r["removed"] for r in _rows(cfg.db, "select removed from results where status = 'ok'")}
    assert {c["removed"] for c in choices.values()} <= measured


def _sweep_argv(cfg: SweepConfig) -> list[str]:
    return ["run", "--model", cfg.model, "--db", cfg.db, "--cache-dir", cfg.cache_dir, "--data", cfg.data,
            "--calib-data", cfg.calib_data, "--max-length", str(cfg.max_length), "--max-tokens", str(cfg.max_tokens),
            "--calib-max-tokens", str(cfg.calib_max_tokens), "--latency", cfg.latency, "--strategy", cfg.strategy,
            "--n", cfg.n, "--quiet"]


def _sweep_cli(cfg: SweepConfig, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sweep", *_sweep_argv(cfg)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=600)


def test_a_search_killed_with_sigkill_resumes_and_ends_as_an_uninterrupted_one(trained_dir, tmp_path):
    from sweep.cli import main

    whole = _cfg(trained_dir, tmp_path / "whole", n="4", calib_max_tokens=512)
    (tmp_path / "whole").mkdir()
    assert main(_sweep_argv(whole)) == 0  # the uninterrupted search, in this process
    columns = "search, removed, generation, status, n_windows, fitness, spent"
    expected = _rows(whole.db, f"select {columns} from search_candidates order by search, spent, removed")
    victim = next(r["removed"] for r in expected if r["generation"] >= 2 and r["status"] == "dropped")
    (tmp_path / "killed").mkdir()
    killed = _cfg(trained_dir, tmp_path / "killed", n="4", calib_max_tokens=512, cache_dir=whole.cache_dir)
    faults = {"SWEEP_FAULTS": f"kill-once={victim}", "SWEEP_FAULTS_DIR": str(tmp_path / "killed")}
    assert _sweep_cli(killed, faults).returncode == -9
    partial = _rows(killed.db, f"select {columns} from search_candidates")
    assert 0 < len(partial) < len(expected)
    again = _sweep_cli(killed, faults)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resuming from" in again.stdout + again.stderr
    got = _rows(killed.db, f"select {columns} from search_candidates order by search, spent, removed")
    assert [(r["removed"], r["status"], r["spent"]) for r in got] == \
           [(r["removed"], r["status"], r["spent"]) for r in expected]
    for a, b in zip(got, expected):
        assert a["fitness"] == pytest.approx(b["fitness"], rel=1e-9, abs=1e-12)
    choice = "select removed from strategy_choices where strategy = 'search'"
    assert _rows(killed.db, choice) == _rows(whole.db, choice)


def test_kl_fitness_equals_a_direct_kl_of_the_pruned_model_against_the_full_one(trained_dir, tmp_path):
    from sweep.engine.search import Searcher

    cfg = _cfg(trained_dir, tmp_path, fitness="kl", calib_max_tokens=512)
    model = models.load_model(cfg.model, dtype="float32", device="cpu")
    db = store.open_db(cfg.db)
    cal = similarity.open_calibration(cfg, model, models.tokenizer_for(cfg), db)
    searcher = Searcher(cal, db, similarity.unit_key(cal), lambda n: [], lambda unit: [], log=lambda s: None,
                        progress=False)
    candidates = [(3,), (1, 7), (0, 4, 5)]
    got = searcher.scorer(candidates, 0, len(searcher.tokens))
    ids = cal.token_ids
    windows = ids[: len(ids) // 64 * 64].view(-1, 64)  # (W, 64): the calibration windows
    with torch.no_grad():
        log_p = torch.log_softmax(model(windows).logits[:, :-1].double(), dim=-1)  # (W, 63, V)
        for removed, values in zip(candidates, got):
            with adapters.pruned(model, removed):
                log_q = torch.log_softmax(model(windows).logits[:, :-1].double(), dim=-1)
            direct = (log_p.exp() * (log_p - log_q)).sum(dim=-1)  # (W, 63) per position
            # the guide's weights: each window's mean over its 63 scored positions, weighing 63 tokens
            expected = (direct.mean(dim=1) * 63).numpy()
            assert values == pytest.approx(expected, rel=1e-3, abs=1e-6)  # float32 log-probabilities
    assert searcher.signal == "calib-kl"
    assert all(v.min() >= -1e-6 for v in got)  # a KL is never negative


def test_a_parameter_budget_over_mixed_units_is_met_by_every_candidate(tmp_path, byte_tokenizer_dir):
    from transformers import AutoTokenizer

    model = tiny_model("llama", n_layers=6, vocab=256, seed=2)
    out = tmp_path / "llama"
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(byte_tokenizer_dir).save_pretrained(out)
    cfg = _cfg(out, tmp_path, unit="mix", budget_params="0.1,0.2", search_budget=40_000)
    run_sweep(cfg, log=lambda s: None, progress=False)
    total = sum(p.numel() for p in model.parameters())
    layers = adapters.decoder_layers(model)

    def branch_params(unit: str) -> int:  # independent: the modules' own parameters, with each branch's norm
        layer = layers[int(unit[1:])]
        parts = ("self_attn", "input_layernorm") if unit[0] == "a" else ("mlp", "post_attention_layernorm")
        return sum(p.numel() for name in parts for p in getattr(layer, name).parameters())

    rows = _rows(cfg.db, "select search, removed from search_candidates")
    assert {r["search"].split("/")[2] for r in rows} == {"params>=0.1", "params>=0.2"}
    for row in rows:
        budget = float(row["search"].split("/")[2].split(">=")[1])
        units = [u for edit in row["removed"].split(",")
                 for u in ((f"a{edit}", f"m{edit}") if edit.isdigit() else (edit,))]
        assert sum(branch_params(u) for u in units) >= budget * total, row
    choices = _rows(cfg.db, "select signal, removed from strategy_choices where strategy = 'search-mix'")
    assert sorted(c["signal"] for c in choices) == ["calib-ppl@params>=0.1", "calib-ppl@params>=0.2"]
