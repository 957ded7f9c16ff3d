"""A made-up results.db for report, figure and findings tests: 6 layers, layer 2 critical, no model needed.

Perplexity of a variant = BASE_PPL × the product of its removed layers' FACTORS (× PAIR_BOOST when layers 1 and
4 both go), so every number a test expects can be recomputed independently from these constants.
"""
from __future__ import annotations

import itertools
import math
from pathlib import Path

from sweep import store
from sweep.plan import variant_key

MODEL = "org/critical-6"
N_LAYERS = 6
BASE_PPL = 20.0
FACTORS = {0: 1.30, 1: 1.05, 2: 40.0, 3: 1.02, 4: 1.08, 5: 1.20}
"""Perplexity multiplier of removing each layer: layer 2 is critical, layer 3 the cheapest."""
PAIR_BOOST = 3.0
"""Removing layers 1 and 4 together costs this much more than their factors say."""
DIVERGED = "3,5"
FAILED = "0,5"
BLOCK_PARAMS = 1_000_000
EMBEDDING_PARAMS = 4_000_000
BASE_MS = 12.0


def fixture_ppl(removed: tuple[int, ...]) -> float:
    ppl = BASE_PPL * math.prod(FACTORS[i] for i in removed)
    return ppl * (PAIR_BOOST if {1, 4} <= set(removed) else 1.0)


def variants(max_removed: int = 3) -> list[tuple[int, ...]]:
    """The baseline, every single, every pair and every triple."""
    return [c for k in range(max_removed + 1) for c in itertools.combinations(range(N_LAYERS), k)]


def result_row(setup: str, removed: tuple[int, ...]) -> dict:
    key, kept = variant_key(removed), N_LAYERS - len(removed)
    ppl = fixture_ppl(removed)
    row = {
        "setup_id": setup, "removed": key, "n_removed": len(removed), "n_layers": kept,
        "params": EMBEDDING_PARAMS + BLOCK_PARAMS * kept, "params_non_embedding": BLOCK_PARAMS * kept,
        "nll_sum": 1000 * math.log(ppl), "n_tokens": 1000, "n_bytes": 4000, "ppl": ppl,
        "prefill_ms": BASE_MS * kept / N_LAYERS, "prefill_iqr_ms": 0.1, "prefill_repeats": 20,
        "decode_ms_per_token": 1.0, "status": "ok", "device": "cpu", "measured_at": "2024-03-01T00:00:00+00:00",
    }
    if key == DIVERGED:
        row.update(status="diverged", ppl=math.inf, error="perplexity is inf")
    if key == FAILED:
        row.update(status="failed", ppl=None, nll_sum=None, prefill_ms=None, error="CUDA out of memory")
    return row


def make_results_db(path: Path, model: str = MODEL, max_removed: int = 3, max_length: int = 128) -> Path:
    db = store.open_db(path)
    model_id = store.upsert_model(db, model, None, "float32", N_LAYERS, "GPT2LMHeadModel")
    setup = store.upsert_setup(db, model_id, {"data": "wikitext-2-raw-v1", "data_fingerprint": "beef",
                                              "data_tokens": 1000, "max_length": max_length, "stride": max_length,
                                              "max_tokens": 1000, "latency_seq": 64, "engine_version": "1"})
    for removed in variants(max_removed):
        store.record_result(db, result_row(setup, removed))
    db.close()
    return path
