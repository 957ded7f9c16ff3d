"""The variant-key grammar (units and order edits) and the plans over units. Pure Python."""
from __future__ import annotations

import itertools

import pytest

from sweep import steps
from sweep.errors import PlanError, UnknownNameError, VariantKeyError
from sweep.plan import PlanSpec, count_variants, parse_key, parse_remove, plan_variants, variant_key
from sweep.strategies import greedy_path


@pytest.mark.parametrize("key, canonical, sequence", [
    ("", "", "0,1,2,3,4,5"),
    ("3,1", "1,3", "0,2,4,5"),
    ("m5,a3,1", "1,a3,m5", "0,2,3m,4,5a"),
    ("a2,m2", "2", "0,1,3,4,5"),
    ("r2", "r2", "0,1,2,2,3,4,5"),
    ("r2-3", "r2-3", "0,1,2,3,2,3,4,5"),
    ("s1", "s1", "0,2,1,3,4,5"),
    ("v1-3", "v1-3", "0,3,2,1,4,5"),
    ("p1-2", "p1-2", "0,1+2,3,4,5"),
    ("p2-3,a0", "a0,p2-3", "0m,1,2+3,4,5"),
    ("r1-1", "r1", "0,1,1,2,3,4,5"),
])
def test_keys_are_canonical_and_denote_their_steps(key, canonical, sequence):
    variant = parse_key(key)
    assert variant_key(variant) == canonical
    assert parse_key(canonical) == variant  # round trip
    assert steps.steps_text(steps.steps_of(variant, 6)) == sequence


def test_block_keys_are_unchanged():
    for removed in itertools.combinations(range(5), 2):
        assert variant_key(removed) == ",".join(map(str, removed))
        assert parse_key(variant_key(removed)) == removed


@pytest.mark.parametrize("key, message", [
    ("r2,2", "both removed and reordered"), ("a2,r2", "both removed and reordered"), ("s1-3", "swaps a layer"),
    ("v1-2", "at least 3"), ("p4", "at least 2"), ("x3", "bad edit"), ("3-4", "one layer each"),
    ("r2-3,s3", "overlap"), ("7", "out of range"), ("r6", "out of range"), ("p4-6", "out of range"),
])
def test_malformed_or_conflicting_keys_are_refused(key, message):
    with pytest.raises(VariantKeyError, match=message):
        steps.steps_of(parse_key(key), 6)


def test_every_step_sequence_calls_each_kept_unit_once_per_occurrence():
    for key, calls in (("r1-2", 6), ("p0-3", 4), ("1,a2", 3), ("v0-2,r3", 5)):
        assert steps.n_calls(steps.steps_of(parse_key(key), 4)) == calls


@pytest.mark.parametrize("unit, want", [
    ("attn", [(), ("a0",), ("a1",), ("a2",)]),
    ("mlp", [(), ("m0",), ("m1",), ("m2",)]),
    ("mix", [(), ("a0",), ("m0",), ("a1",), ("m1",), ("a2",), ("m2",)]),
])
def test_single_over_units(unit, want):
    assert plan_variants(3, PlanSpec(strategy="single", unit=unit)) == want


def test_mix_combinations_merge_both_branches_of_a_layer_into_the_block():
    variants = plan_variants(2, PlanSpec(strategy="combinations", k="2", unit="mix"))
    assert (0,) in variants and (1,) in variants and ("a0", "a1") in variants
    assert len(variants) == 1 + 6  # baseline + C(4, 2)


def test_blocks_and_last_n_over_units_follow_the_unit_order():
    assert plan_variants(2, PlanSpec(strategy="blocks", n="2", unit="mix")) == [(), (0,), (1,), ("m0", "a1")]
    assert plan_variants(3, PlanSpec(strategy="last-n", n="1-2", unit="attn")) == [(), ("a2",), ("a1", "a2")]


def test_exhaustive_count_over_units_matches_the_plan():
    for unit in ("attn", "mix"):
        spec = PlanSpec(strategy="exhaustive,repeat", unit=unit)
        assert count_variants(3, spec) == len(plan_variants(3, spec))


def test_order_strategies_stay_among_the_middle_layers_by_default():
    assert plan_variants(5, PlanSpec(strategy="repeat,swap,reverse,parallel")) == [
        (), ("r1",), ("s1",), ("v1-3",), ("p1-2",), ("r2",), ("s2",), ("p2-3",), ("r3",)]
    assert plan_variants(5, PlanSpec(strategy="repeat", span="2", positions="0,3")) == [(), ("r0-1",), ("r3-4",)]


def test_unit_and_order_flags_are_checked():
    with pytest.raises(UnknownNameError, match="--unit"):
        plan_variants(4, PlanSpec(unit="heads"))
    with pytest.raises(PlanError, match="--unit attn"):
        plan_variants(4, PlanSpec(strategy="repeat", unit="attn"))
    with pytest.raises(PlanError, match="whole blocks"):
        plan_variants(4, PlanSpec(strategy="single,angular", unit="mix"))
    with pytest.raises(PlanError, match="--positions"):
        plan_variants(4, PlanSpec(strategy="repeat", positions="9"))
    with pytest.raises(PlanError, match="swap"):
        plan_variants(4, PlanSpec(strategy="swap", span="3"))


def test_explicit_groups_may_be_any_key():
    assert parse_remove("1,3;a2,m0;r1-2", 4) == [(1, 3), ("m0", "a2"), ("r1-2",)]
    with pytest.raises(PlanError, match="'a2,r2'"):
        parse_remove("a2,r2", 4)


def test_n_removed_counts_layers_of_block_variants_and_branches_otherwise():
    counts = {key: steps.n_removed(parse_key(key)) for key in ("", "1,3", "a1", "1,a3", "m1,2,a3", "r2", "a1,r2")}
    assert counts == {"": 0, "1,3": 2, "a1": 1, "1,a3": 3, "m1,2,a3": 4, "r2": 0, "a1,r2": 1}


def test_variant_kinds():
    kinds = {key: steps.variant_kind(parse_key(key)) for key in ("", "1", "a1,a2", "m3", "1,a2", "a1,m2", "r1",
                                                                    "1,s2")}
    assert kinds == {"": "baseline", "1": "block", "a1,a2": "attn", "m3": "mlp", "1,a2": "mix", "a1,m2": "mix",
                     "r1": "order", "1,s2": "order"}


def test_greedy_over_mix_units_matches_brute_force_of_each_round():
    # A made-up calibration perplexity: each unit has a cost, a whole block a discount.
    cost = {"a0": 3.0, "m0": 5.0, "a1": 1.0, "m1": 2.0, "a2": 4.0, "m2": 0.5}

    def ppl(variant):
        units = [u for e in variant for u in ([f"a{e}", f"m{e}"] if isinstance(e, int) else [e])]
        return 10 + sum(cost[u] for u in units) - 1.5 * sum(isinstance(e, int) for e in variant)

    path = greedy_path(3, 4, lambda cands: [ppl(c) for c in cands], units=steps.unit_edits("mix", 3))
    chosen: list = []
    for step in path:
        options = {u: ppl(parse_key(variant_key([*chosen, u]))) for u in cost if u not in chosen}
        best = min(options, key=lambda u: (options[u], list(cost).index(u)))
        assert step.calib_ppl == options[best] and step.layer == steps.unit_layer(best)
        chosen.append(best)
    assert [variant_key(s.removed) for s in path] == ["m2", "a1,m2", "1,m2", "1,2"]
    resumed = greedy_path(3, 4, lambda cands: [ppl(c) for c in cands], done=path[:2], units=steps.unit_edits("mix", 3))
    assert resumed == path
