"""Choosing layers from signals (angular, block-influence, greedy), torch-free, against brute-force references."""
from __future__ import annotations

import itertools
import math
import random
import subprocess
import sys

import pytest

from sweep.errors import PlanError, UnknownNameError
from sweep.plan import PlanSpec, plan_variants, strategy_names
from sweep.strategies import (GreedyStep, angular_choice, block_influence_choice, choose, greedy_path)


def random_distances(n_layers: int, seed: int) -> dict[tuple[int, int], float]:
    rng = random.Random(seed)
    return {(l, n): rng.random() for n in range(1, n_layers + 1) for l in range(n_layers - n + 1)}


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("allow_last", [False, True])
def test_angular_choice_is_the_minimal_admissible_block(seed, allow_last):
    L = 7
    d = random_distances(L, seed)
    for n in range(1, L if not allow_last else L + 1):
        removed, score = angular_choice(d, n, L, allow_last)
        # Reference: every block of n contiguous layers, the final layer only when allowed.
        blocks = [tuple(range(l, l + n)) for l in range(L - n + 1) if allow_last or l + n - 1 < L - 1]
        best = min(blocks, key=lambda b: d[(b[0], n)])
        assert removed == best and score == d[(best[0], n)]


def test_angular_never_removes_the_final_layer_unless_allowed():
    d = {(l, n): 1.0 for n in range(1, 5) for l in range(5 - n)}
    d[(2, 2)] = 0.0  # the block (2, 3) ending at the final layer is the closest
    assert angular_choice(d, 2, 4)[0] == (0, 1)  # tie among the rest -> lowest start
    assert angular_choice(d, 2, 4, allow_last=True)[0] == (2, 3)


def test_angular_on_all_layers_needs_allow_last():
    d = random_distances(4, 0)
    with pytest.raises(PlanError, match="--allow-last"):
        angular_choice(d, 4, 4)
    assert angular_choice(d, 4, 4, allow_last=True)[0] == (0, 1, 2, 3)


def test_angular_nan_distance_never_wins():
    d = {(l, 1): 0.5 for l in range(4)}
    d[(0, 1)] = math.nan
    assert angular_choice(d, 1, 4)[0] == (1,)


def test_angular_missing_distance_is_named():
    with pytest.raises(PlanError, match=r"d\(0, 2\)"):
        angular_choice({(0, 1): 0.1}, 2, 4)


@pytest.mark.parametrize("seed", range(5))
def test_block_influence_removes_the_n_lowest_layers(seed):
    rng = random.Random(seed)
    bi = [rng.random() for _ in range(8)]
    for n in range(1, 9):
        removed, score = block_influence_choice(bi, n)
        assert len(removed) == n and list(removed) == sorted(removed)
        # Every kept layer has BI at least that of every removed one.
        assert max(bi[i] for i in removed) <= min((bi[i] for i in range(8) if i not in removed), default=math.inf)
        assert score == pytest.approx(sum(bi[i] for i in removed))


def test_block_influence_ties_go_to_the_lower_layer_and_nan_is_kept():
    assert block_influence_choice([0.2, 0.1, 0.1, math.nan], 2)[0] == (1, 2)
    assert block_influence_choice([0.2, 0.1, 0.1, math.nan], 3)[0] == (0, 1, 2)
    with pytest.raises(PlanError):
        block_influence_choice([0.1, 0.2], 3)


def interacting_cost(n_layers: int, seed: int):
    """A synthetic 'calibration perplexity' with pairwise interactions, so greedy != sum of singles."""
    rng = random.Random(seed)
    single = [rng.random() for _ in range(n_layers)]
    pair = {(i, j): rng.random() - 0.5 for i, j in itertools.combinations(range(n_layers), 2)}
    calls = []

    def cost(removed):
        removed = sorted(removed)  # the same float sum whatever the order the layers come in
        return 10 + sum(single[i] for i in removed) + sum(pair[p] for p in itertools.combinations(sorted(removed), 2))

    def calib_ppl(candidates):
        calls.append(list(candidates))
        return [cost(c) for c in candidates]

    return cost, calib_ppl, calls


@pytest.mark.parametrize("seed", range(4))
def test_greedy_path_matches_a_brute_force_check_of_each_round(seed):
    L = 6
    cost, calib_ppl, _ = interacting_cost(L, seed)
    path = greedy_path(L, L, calib_ppl)
    removed: tuple[int, ...] = ()
    for k, step in enumerate(path, start=1):
        # Brute force: every layer still present, removed on top of the previous rounds.
        options = {layer: cost(removed + (layer,)) for layer in range(L) if layer not in removed}
        best = min(options, key=lambda layer: (options[layer], layer))
        assert step.step == k and step.layer == best and step.calib_ppl == options[best]
        removed = tuple(sorted(removed + (best,)))
        assert step.removed == removed


def test_greedy_resumes_from_stored_steps_without_rescoring_them():
    cost, calib_ppl, calls = interacting_cost(5, 1)
    full = greedy_path(5, 3, calib_ppl)
    calls.clear()
    stored = []
    resumed = greedy_path(5, 3, calib_ppl, done=full[:2], on_step=stored.append)
    assert resumed == full
    assert len(calls) == 1 and all(len(c) == 3 for c in calls[0])  # only round 3 was scored
    assert stored == [full[2]]


def test_greedy_treats_nan_as_worst():
    path = greedy_path(3, 1, lambda candidates: [math.nan, 5.0, 7.0])
    assert path[0].layer == 1
    path = greedy_path(3, 1, lambda candidates: [math.nan, math.nan, math.nan])
    assert path[0].layer == 0  # all failed: deterministic, lowest layer


def test_choose_reads_the_greedy_path_prefixes():
    path = [GreedyStep(1, 2, (2,), 11.0), GreedyStep(2, 0, (0, 2), 12.0), GreedyStep(3, 3, (0, 2, 3), 13.0)]
    picks = choose("greedy", [1, 3], 4, path=path)
    assert [(c.n, c.removed, c.score) for c in picks] == [(1, (2,), 11.0), (3, (0, 2, 3), 13.0)]
    with pytest.raises(PlanError, match="3 steps"):
        choose("greedy", [4], 4, path=path)


def test_choose_without_its_signal_is_an_error():
    with pytest.raises(PlanError, match="signal"):
        choose("angular", [1], 4)


def test_signal_strategies_are_valid_names_and_plan_only_the_baseline_by_themselves():
    assert strategy_names("angular,block-influence,greedy") == ["angular", "block-influence", "greedy"]
    assert plan_variants(4, PlanSpec(strategy="angular,greedy", n="1-2")) == [()]
    with pytest.raises(UnknownNameError, match="did you mean 'angular'"):
        strategy_names("angualr")


def test_signal_strategies_check_n_against_the_layer_count():
    with pytest.raises(PlanError, match="--n"):
        plan_variants(4, PlanSpec(strategy="greedy", n="5"))


def test_plan_and_strategies_do_not_import_torch():
    code = "import sys, sweep.strategies, sweep.plan, sweep.store; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
