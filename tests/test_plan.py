"""Plans: strategies -> variants. Pure Python; each strategy is checked against an independent computation."""
from __future__ import annotations

import subprocess
import sys

import pytest

from sweep.errors import PlanError, UnknownNameError
from sweep.plan import (
    EXHAUSTIVE_LIMIT, STRATEGIES, PlanSpec, count_variants, kept_layers, parse_key, parse_range, parse_remove,
    plan_variants, variant_key,
)


def subsets(n_layers: int, sizes: set[int] | None = None) -> set[tuple[int, ...]]:
    """Every subset of range(n_layers) (by bit mask, not itertools), optionally only those of the given sizes."""
    found = set()
    for mask in range(2**n_layers):
        removed = tuple(i for i in range(n_layers) if mask >> i & 1)
        if sizes is None or len(removed) in sizes:
            found.add(removed)
    return found


def contiguous_runs(n_layers: int, sizes: set[int]) -> set[tuple[int, ...]]:
    """Every run of consecutive layers whose length is in ``sizes``."""
    return {r for r in subsets(n_layers, sizes) if r == tuple(range(r[0], r[0] + len(r)))}


# ------------------------------------------------------------------------------------------ import


def test_plan_module_does_not_import_torch():
    code = "import sys, sweep.plan; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


# ------------------------------------------------------------------------------------------ keys


def test_variant_key_is_sorted_and_comma_joined():
    assert variant_key([3, 1]) == "1,3"
    assert variant_key((10, 2, 7)) == "2,7,10"


def test_baseline_key_is_empty_string():
    assert variant_key([]) == ""
    assert parse_key("") == ()


@pytest.mark.parametrize("removed", [(), (0,), (1, 3), (2, 7, 10), tuple(range(12))])
def test_parse_key_inverts_variant_key(removed):
    assert parse_key(variant_key(removed)) == removed


def test_kept_layers_are_the_complement_of_removed():
    assert kept_layers([1, 2], 4) == [0, 3]
    assert kept_layers([], 3) == [0, 1, 2]


# ------------------------------------------------------------------------------------------ parse_range


@pytest.mark.parametrize("text, sizes", [("2", [2]), ("1-3", [1, 2, 3]), ("1-3,6", [1, 2, 3, 6]),
                                         (" 4 , 1-2 ", [1, 2, 4]), ("2,2,1-2", [1, 2]), (3, [3])])
def test_parse_range_accepts_numbers_ranges_and_lists(text, sizes):
    assert parse_range(text, "--k") == sizes


@pytest.mark.parametrize("text", ["", "a", "1-", "-2", "3-1", "1,,2", "1-2-3", "0", "0-2", "1.5"])
def test_parse_range_rejects_malformed_text_naming_the_flag(text):
    with pytest.raises(PlanError, match="--k"):
        parse_range(text, "--k")


# ------------------------------------------------------------------------------------------ strategies


def test_single_removes_each_layer_once():
    assert set(plan_variants(6, PlanSpec(strategy="single"))) == subsets(6, {0, 1})


@pytest.mark.parametrize("k, sizes", [("2", {2}), ("1-3", {1, 2, 3}), ("1,4", {1, 4})])
def test_combinations_are_every_subset_of_the_k_sizes(k, sizes):
    variants = plan_variants(5, PlanSpec(strategy="combinations", k=k))
    assert set(variants) == subsets(5, sizes | {0})


def test_exhaustive_is_every_nonempty_subset_plus_baseline():
    variants = plan_variants(5, PlanSpec(strategy="exhaustive"))
    assert len(variants) == 2**5 - 1 + 1
    assert set(variants) == subsets(5)


@pytest.mark.parametrize("n, sizes", [("1", {1}), ("1-3", {1, 2, 3}), ("2,4", {2, 4})])
def test_last_n_removes_the_last_layers(n, sizes):
    variants = plan_variants(6, PlanSpec(strategy="last-n", n=n))
    assert set(variants) == {()} | {tuple(range(6 - size, 6)) for size in sizes}


@pytest.mark.parametrize("n, sizes", [("2", {2}), ("1-3", {1, 2, 3}), ("5", {5})])
def test_blocks_are_every_contiguous_run_of_the_n_sizes(n, sizes):
    variants = plan_variants(5, PlanSpec(strategy="blocks", n=n))
    assert set(variants) == {()} | contiguous_runs(5, sizes)


def test_explicit_gives_the_listed_groups_plus_baseline():
    variants = plan_variants(5, PlanSpec(strategy="explicit", remove="1,3;2,3,4"))
    assert variants == [(), (1, 3), (2, 3, 4)]


def test_explicit_groups_are_canonicalised():
    assert plan_variants(5, PlanSpec(strategy="explicit", remove="3,1; 1,3 ;4,2,3")) == [(), (1, 3), (2, 3, 4)]


def test_union_of_strategies_has_no_duplicates():
    spec = PlanSpec(strategy="single,blocks,last-n,combinations", k="1-2", n="1-2")
    variants = plan_variants(4, spec)
    assert len(variants) == len(set(variants))
    assert set(variants) == subsets(4, {0, 1, 2})  # blocks and last-n are subsets of the combinations


def test_repeated_strategy_name_adds_nothing():
    assert plan_variants(4, PlanSpec(strategy="single,single")) == plan_variants(4, PlanSpec(strategy="single"))


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_baseline_is_first_in_every_plan(strategy):
    remove = "1,2" if strategy == "explicit" else None
    variants = plan_variants(4, PlanSpec(strategy=strategy, remove=remove, k="2", n="2"))
    assert variants[0] == ()
    assert variants.count(()) == 1


def test_plan_is_ordered_by_size_then_lexicographically():
    variants = plan_variants(5, PlanSpec(strategy="exhaustive"))
    assert variants == sorted(subsets(5), key=lambda r: (len(r), r))


def test_plan_on_a_model_without_layers_raises():
    with pytest.raises(PlanError, match="0 decoder layers"):
        plan_variants(0, PlanSpec())


# ------------------------------------------------------------------------------------------ limits


def test_exhaustive_over_the_limit_needs_force_and_states_the_count():
    assert EXHAUSTIVE_LIMIT == 16
    with pytest.raises(PlanError, match="131,071") as info:
        plan_variants(17, PlanSpec(strategy="exhaustive"))
    assert "--force" in str(info.value)


def test_exhaustive_at_the_limit_needs_no_force():
    assert len(plan_variants(EXHAUSTIVE_LIMIT, PlanSpec(strategy="exhaustive"))) == 2**EXHAUSTIVE_LIMIT


def test_count_variants_with_force_counts_without_enumerating():
    # 2^60 variants could never be enumerated: a prompt answer shows the count is computed.
    assert count_variants(60, PlanSpec(strategy="exhaustive", force=True)) == 2**60
    assert count_variants(17, PlanSpec(strategy="exhaustive", force=True)) == 131_071 + 1


@pytest.mark.parametrize("spec", [
    PlanSpec(strategy="single"),
    PlanSpec(strategy="exhaustive"),
    PlanSpec(strategy="combinations,blocks", k="1-2", n="3"),
    PlanSpec(strategy="exhaustive,single"),
    PlanSpec(strategy="explicit", remove="0;1,2;0"),
])
def test_count_variants_equals_length_of_plan(spec):
    assert count_variants(5, spec) == len(plan_variants(5, spec))


@pytest.mark.parametrize("n_layers, spec", [
    (17, PlanSpec(strategy="exhaustive")),
    (4, PlanSpec(strategy="exhaustive,explicit", remove="9")),
    (4, PlanSpec(strategy="exhaustive,combinations", k="5")),
])
def test_count_variants_rejects_the_plans_plan_variants_rejects(n_layers, spec):
    with pytest.raises(PlanError):
        plan_variants(n_layers, spec)
    with pytest.raises(PlanError):
        count_variants(n_layers, spec)


def test_combinations_k_beyond_layer_count_raises():
    with pytest.raises(PlanError, match="--k"):
        plan_variants(4, PlanSpec(strategy="combinations", k="5"))


@pytest.mark.parametrize("strategy", ["last-n", "blocks"])
def test_block_size_beyond_layer_count_raises(strategy):
    with pytest.raises(PlanError, match="--n"):
        plan_variants(4, PlanSpec(strategy=strategy, n="1-5"))


# ------------------------------------------------------------------------------------------ explicit


@pytest.mark.parametrize("remove, layer", [("4", "4"), ("1,3;2,9", "9"), ("-1", "-1")])
def test_explicit_out_of_range_layer_raises_naming_it(remove, layer):
    with pytest.raises(PlanError, match=rf"layer {layer} is out of range.*0-3"):
        parse_remove(remove, 4)


def test_explicit_repeated_layer_raises_naming_it():
    with pytest.raises(PlanError, match="repeats layer 2"):
        parse_remove("0;2,1,2", 4)


@pytest.mark.parametrize("remove", ["", ";", " ; "])
def test_explicit_empty_remove_raises(remove):
    with pytest.raises(PlanError, match="--remove"):
        parse_remove(remove, 4)


def test_explicit_non_integer_layer_raises():
    with pytest.raises(PlanError, match="'1,a'"):
        parse_remove("1,a", 4)


def test_explicit_strategy_without_remove_raises():
    with pytest.raises(PlanError, match="--remove"):
        plan_variants(4, PlanSpec(strategy="explicit"))


# ------------------------------------------------------------------------------------------ names


def test_unknown_strategy_lists_valid_names_and_suggests_a_close_one():
    with pytest.raises(UnknownNameError) as info:
        plan_variants(4, PlanSpec(strategy="single,singel"))
    message = str(info.value)
    assert "'singel'" in message
    assert "did you mean 'single'" in message
    for name in STRATEGIES:
        assert name in message


def test_empty_strategy_raises_listing_valid_names():
    with pytest.raises(PlanError, match="exhaustive"):
        plan_variants(4, PlanSpec(strategy=" , "))


@pytest.mark.parametrize("strategy", ["single", "exhaustive", "single,last-n"])
def test_remove_without_the_explicit_strategy_is_refused_not_ignored(strategy):
    spec = PlanSpec(strategy=strategy, remove="1,3")
    for planner in (plan_variants, count_variants):
        with pytest.raises(PlanError, match="`--remove` is only used by `--strategy explicit`"):
            planner(4, spec)


def test_remove_with_explicit_among_other_strategies_adds_its_groups():
    assert plan_variants(4, PlanSpec(strategy="single,explicit", remove="1,3")) == \
        [(), (0,), (1,), (2,), (3,), (1, 3)]
