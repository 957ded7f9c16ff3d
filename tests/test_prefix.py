"""Prefix sharing (trie) against the per-variant reference evaluation."""
from __future__ import annotations

import itertools
import math
import sqlite3

import pytest
import torch

from sweep.engine import adapters, perplexity, trie
from sweep.config import SweepConfig
from sweep.engine.data import TokenizedText
from sweep.plan import kept_layers, variant_key
from sweep.engine.runner import run_sweep
from sweep.engine.data import EvalSetup
from sweep.engine.worker import Worker
from tiny import FAMILIES, tiny_model

ALL_SUBSETS = [r for k in range(5) for r in itertools.combinations(range(4), k)]


def worker_for(model, engine="trie", n_tokens=300, max_length=64, stride=32) -> Worker:
    ids = torch.randint(0, 96, (n_tokens,), generator=torch.Generator().manual_seed(0))
    cfg = SweepConfig(latency="off", batch_size=4, engine=engine)
    return Worker(model, TokenizedText(ids.numpy(), n_tokens, "t", "t"), EvalSetup(max_length, stride, None), cfg)


@pytest.mark.parametrize("family", FAMILIES)
def test_trie_equals_per_variant_evaluation_on_every_subset(family):
    worker = worker_for(tiny_model(family))
    assert worker.trie_ok
    rows = {r["removed"]: r for r in worker.evaluate_many(ALL_SUBSETS)}
    for removed in ALL_SUBSETS:
        reference = worker.evaluate(removed)
        got = rows[variant_key(removed)]
        assert got["ppl"] == pytest.approx(reference["ppl"], rel=1e-6), (family, removed)
        assert got["n_tokens"] == reference["n_tokens"] and got["params"] == reference["params"]
        assert got["window_nll"] == pytest.approx(reference["window_nll"], rel=1e-6)
        assert got["window_tokens"] == reference["window_tokens"]
        assert math.fsum(got["window_nll"]) == got["nll_sum"] and sum(got["window_tokens"]) == got["n_tokens"]


def test_trie_on_slices_of_windows_gives_exactly_the_whole_texts_per_window_losses():
    worker = worker_for(tiny_model("gpt2"))
    whole = {r["removed"]: r for r in worker.evaluate_many(ALL_SUBSETS)}
    n_windows = worker.n_windows()
    head = {r["removed"]: r for r in worker.evaluate_many(ALL_SUBSETS, (0, 4))}
    tail = {r["removed"]: r for r in worker.evaluate_many(ALL_SUBSETS[3:9], (4, n_windows))}
    for key, row in tail.items():
        assert head[key]["window_nll"] + row["window_nll"] == whole[key]["window_nll"]  # bit for bit


def test_trie_counts_its_layer_and_head_calls():
    worker = worker_for(tiny_model("gpt2"))
    counts = trie.CallCounts()
    kept = {variant_key(r): kept_layers(r, 4) for r in ALL_SUBSETS}
    trie.trie_perplexities(worker.model, kept, worker.head_loss, worker.token_ids, 64, 32, 4, counts=counts)
    n_batches = len(perplexity.window_batches(perplexity.scored_windows(300, 64, 32), 4))
    assert counts.batches == n_batches
    assert counts.head_calls == 16 * n_batches  # one per variant: no two variants keep the same layers
    # 2^4 - 1 trie nodes, of which the unpruned path 0, 0-1, 0-1-2 comes from the capture forward (3 layers)
    assert counts.layer_calls == (15 - 3 + 3) * n_batches


SINGLES = [(), (0,), (1,), (2,), (3,)]


def chunked_trie(worker, chunks, captures):
    """Perplexities and call counts of the single removals run as several tries (a sweep's chunks)."""
    counts, rows = trie.CallCounts(), {}
    for chunk in chunks:
        kept = {variant_key(r): kept_layers(r, 4) for r in chunk}
        rows.update(trie.trie_perplexities(worker.model, kept, worker.head_loss, worker.token_ids, 64, 32, 4,
                                           counts=counts, captures=captures))
    return rows, counts


def test_capture_cache_makes_chunked_tries_cost_what_one_trie_costs_with_the_same_losses():
    worker = worker_for(tiny_model("llama"))
    one, one_counts = chunked_trie(worker, [SINGLES], None)
    chunks = [SINGLES[:2], SINGLES[2:4], SINGLES[4:]]
    plain, plain_counts = chunked_trie(worker, chunks, None)
    cache = trie.CaptureCache(trie.CAPTURE_CACHE_BYTES)
    cached, cached_counts = chunked_trie(worker, chunks, cache)
    n_batches = one_counts.batches
    # without the cache each chunk pays the capture forward (3 layers per batch) again; with it, only the first
    assert plain_counts.layer_calls == one_counts.layer_calls + 2 * 3 * n_batches
    assert cached_counts.layer_calls == one_counts.layer_calls and cached_counts.head_calls == one_counts.head_calls
    for key in one:
        assert cached[key].window_nll == plain[key].window_nll == one[key].window_nll  # bit for bit
    assert 0 < cache.nbytes <= trie.CAPTURE_CACHE_BYTES and len(cache._entries) == n_batches


def test_capture_cache_keeps_nothing_over_its_budget_and_checks_the_tokens_of_a_hit():
    worker = worker_for(tiny_model("gpt2"))
    chunks = [SINGLES[:2], SINGLES[2:]]
    _, plain_counts = chunked_trie(worker, chunks, None)
    tiny_budget = trie.CaptureCache(1024)  # smaller than one capture: every chunk captures again
    _, counts = chunked_trie(worker, chunks, tiny_budget)
    assert counts.layer_calls == plain_counts.layer_calls and tiny_budget.nbytes == 0
    cache = trie.CaptureCache(trie.CAPTURE_CACHE_BYTES)
    ids = worker.token_ids[:64][None]  # (1, 64)
    first, computed = cache.capture(worker.model, ids, 0)
    assert computed and cache.capture(worker.model, ids, 0) == (first, False)
    other = (ids + 1) % 96  # same shape and first window, other tokens: a miss, captured anew
    again, computed = cache.capture(worker.model, other, 0)
    assert computed and not torch.equal(again.hidden, first.hidden)
    cache.clear()
    assert cache.nbytes == 0 and cache.capture(worker.model, other, 0)[1]


def test_cpu_worker_pays_the_capture_forward_once_across_evaluations():
    worker = worker_for(tiny_model("gpt2"))
    fresh = worker_for(tiny_model("gpt2"))
    worker.evaluate_many(SINGLES[:2])
    before = worker.calls.layer_calls
    rows = worker.evaluate_many(SINGLES[2:])
    kept = {variant_key(r): kept_layers(r, 4) for r in SINGLES[2:]}
    root = trie.build_trie(kept)
    # the second trie runs its nodes less the unpruned prefix, which the first one's capture forward still holds
    replays = trie.layer_calls(root) - trie.unpruned_prefix(root, 4)
    assert worker.calls.layer_calls - before == replays * worker.calls.batches // 2
    assert [r["window_nll"] for r in rows] == [r["window_nll"] for r in fresh.evaluate_many(SINGLES[2:])]


def test_exhaustive_trie_costs_one_layer_call_per_nonempty_prefix():
    for n_layers in (3, 4, 6):
        removals = [r for k in range(n_layers + 1) for r in itertools.combinations(range(n_layers), k)]
        root = trie.build_trie({variant_key(r): kept_layers(r, n_layers) for r in removals})
        assert trie.layer_calls(root) == 2**n_layers - 1
        per_variant = sum(n_layers - len(r) for r in removals)
        assert per_variant == n_layers * 2 ** (n_layers - 1)


def test_trie_shares_prefixes_of_single_removals():
    # Removing each of 4 layers: [1,2,3], [0,2,3], [0,1,3], [0,1,2] + baseline [0,1,2,3].
    kept = {variant_key(r): kept_layers(r, 4) for r in [(), (0,), (1,), (2,), (3,)]}
    root = trie.build_trie(kept)
    assert trie.layer_calls(root) == 4 + 3 + 2 + 1  # vs 4 + 4*3 = 16 one by one
    assert root.children[0].children[1].children[2].keys == ["3"]


def count_device_reads(monkeypatch) -> dict[str, int]:
    """Count Tensor -> Python reads (each a host-device sync on a GPU) by wrapping the methods that do them."""
    counts = {"reads": 0}
    for name in ("item", "tolist", "cpu", "__float__", "__bool__", "__int__"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, **kwargs):
            counts["reads"] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return counts


def test_trie_reads_device_values_a_fixed_number_of_times_whatever_the_variant_count(monkeypatch):
    # A read per leaf would stall a GPU once per variant per batch; reads must not grow with the variants.
    worker = worker_for(tiny_model("gpt2"))
    token_ids, head = worker.token_ids, worker.head_loss

    def reads(removals) -> int:
        kept = {variant_key(r): kept_layers(r, 4) for r in removals}
        with monkeypatch.context() as patch:
            counts = count_device_reads(patch)
            trie.trie_perplexities(worker.model, kept, head, token_ids, 64, 32, 4)
        return counts["reads"]

    assert reads(ALL_SUBSETS) == reads([(), (1,)])


def test_runner_trie_and_per_variant_engines_store_the_same_perplexities(tiny_gpt2_dir, sample_text_file, tmp_path):
    results = {}
    for engine in ("trie", "per-variant"):
        db = tmp_path / f"{engine}.db"
        cfg = SweepConfig(model=str(tiny_gpt2_dir), data=str(sample_text_file), db=str(db), engine=engine,
                          cache_dir=str(tmp_path / "cache"), max_length=64, max_tokens=1024, strategy="exhaustive",
                          latency="off")
        summary = run_sweep(cfg, log=lambda s: None, progress=False)
        assert summary.measured == 16
        conn = sqlite3.connect(db)
        results[engine] = dict(conn.execute("select removed, ppl from results"))
        assert_window_losses_add_up(db, 16)
    assert results["trie"].keys() == results["per-variant"].keys()
    for key, ppl in results["per-variant"].items():
        assert results["trie"][key] == pytest.approx(ppl, rel=1e-6)


def test_architecture_that_cannot_replay_falls_back_to_per_variant(monkeypatch):
    from sweep.engine import adapters

    def broken(*args, **kwargs):
        raise RuntimeError("cannot replay")

    monkeypatch.setattr(adapters, "capture_layer_calls", broken)
    worker = worker_for(tiny_model("llama"))
    assert not worker.trie_ok
    rows = worker.evaluate_many([(), (1,)])
    assert [r["status"] for r in rows] == ["ok", "ok"]


def test_layer_that_writes_into_its_input_falls_back_to_per_variant(monkeypatch):
    # Its straight-path outputs are right, but in the trie it would corrupt the stream its siblings read.
    from sweep.engine import adapters

    replay = adapters.call_layer

    def mutating(model, index, hidden, calls):
        out = replay(model, index, hidden, calls)
        if index == 2:
            hidden.mul_(1.5)
        return out

    monkeypatch.setattr(adapters, "call_layer", mutating)
    assert not worker_for(tiny_model("gpt2")).trie_ok


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen2"])
def test_trie_equals_per_variant_in_bfloat16_on_gpu(family):
    """On GPU in bfloat16 the trie and physical removal agree within 1e-3 relative perplexity."""
    worker = worker_for(tiny_model(family).to("cuda", torch.bfloat16), n_tokens=600)
    assert worker.device.type == "cuda" and worker.trie_ok
    rows = {r["removed"]: r for r in worker.evaluate_many(ALL_SUBSETS)}
    for removed in ALL_SUBSETS:
        assert rows[variant_key(removed)]["ppl"] == pytest.approx(worker.evaluate(removed)["ppl"], rel=1e-3)


def test_time_estimate_counts_shared_layers_once(monkeypatch):
    worker = worker_for(tiny_model("gpt2"))  # 4 layers; 300 tokens in windows of 64, stride 32, batch 4
    monkeypatch.setattr(worker, "_batch_seconds", lambda: (13.0, 1.0))  # full, head only: 3 s per layer
    n_batches = -(-len(perplexity.windows(300, 64, 32)) // 4)
    # Exhaustive over 4 layers: 16 heads; 15 trie nodes + 3 capture layers - the 3 the unpruned prefix reuses,
    # or 32 layer calls one by one.
    assert worker.estimate_seconds(ALL_SUBSETS) == pytest.approx(n_batches * (16 * 1.0 + 3.0 * (15 + 3 - 3)))
    assert worker.estimate_seconds(ALL_SUBSETS, shared=False) == pytest.approx(n_batches * (16 * 1.0 + 3.0 * 32))
    assert worker.estimate_seconds([(1,)]) == pytest.approx(n_batches * (1.0 + 3.0 * 3))


def assert_window_losses_add_up(db, n_variants: int) -> None:
    """Every result row has its per-window losses, which add up exactly to its NLL sum and token count."""
    from sweep import store

    conn = sqlite3.connect(db)
    rows = {r[0]: r[1:] for r in conn.execute("SELECT removed, setup_id, nll_sum, n_tokens FROM results")}
    assert len(rows) == n_variants
    setup = next(iter(rows.values()))[0]
    losses = store.read_window_losses(str(db), setup)
    assert losses.keys() == rows.keys()
    for key, (_, nll_sum, n_tokens) in rows.items():
        nll, tokens = losses[key]
        assert math.fsum(nll) == nll_sum and int(tokens.sum()) == n_tokens
