"""The GPU code paths, run on CPU: automatic batch size and out-of-memory halving under a simulated memory budget,
bfloat16 against float32, compiled head + loss and compiled layers against eager."""
from __future__ import annotations

import shutil

import pytest
import torch

from sweep.config import SweepConfig
from sweep.engine import device, perplexity
from sweep.engine.data import EvalSetup, TokenizedText
from sweep.engine.worker import Worker
from tiny import tiny_model

MAX_LENGTH = 64
N_TOKENS = 9 * MAX_LENGTH + 10  # nine full windows and a shorter last one of 10 tokens
needs_compiler = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                                    reason="torch.compile (inductor) on CPU needs a C compiler")


class FakeMemory:
    """A :class:`device.MemoryProbe` with a scripted free memory and peak: what a GPU of that size would report."""

    def __init__(self, free_bytes: int, window_peak_bytes: int):
        self.free, self.window_peak = free_bytes, window_peak_bytes
        self.peaks_started = 0

    def free_bytes(self) -> int:
        return self.free

    def start_peak(self) -> int:
        self.peaks_started += 1
        return 1000  # resident weights

    def peak_bytes(self) -> int:
        return 1000 + self.window_peak


class MemoryBudget:
    """Out of memory for any forward over more than ``max_windows`` windows, as a GPU with less memory would be."""

    def __init__(self, model, max_windows: int):
        self.max_windows, self.seen = max_windows, []
        self.handle = model.get_input_embeddings().register_forward_pre_hook(self.check)

    def check(self, module, args):
        windows = args[0].shape[0]
        self.seen.append(windows)
        if windows > self.max_windows:
            raise torch.OutOfMemoryError(f"CUDA out of memory (simulated: {windows} windows)")


@pytest.fixture(scope="module")
def model():
    return tiny_model("gpt2", n_layers=4, vocab=96)


def tokens() -> TokenizedText:
    ids = torch.randint(0, 96, (N_TOKENS,), generator=torch.Generator().manual_seed(0))
    return TokenizedText(ids.numpy(), N_TOKENS, "t", "t")


def worker(model, batch_size=0, memory=None, **cfg) -> Worker:
    config = SweepConfig(latency="off", batch_size=batch_size, **cfg)
    return Worker(model, tokens(), EvalSetup(MAX_LENGTH, MAX_LENGTH, None), config, memory=memory)


REMOVALS = [(), (1,), (0, 3), (0, 1, 2, 3)]


@pytest.fixture(scope="module")
def reference(model):
    """Perplexities one window at a time (nothing batched, nothing to run out of memory)."""
    return {r: row["ppl"] for r, row in zip(REMOVALS, worker(model, batch_size=1).evaluate_many(REMOVALS))}


def test_automatic_batch_fills_the_simulated_free_memory(model):
    hidden_bytes = MAX_LENGTH * 32 * 4  # one window's residual stream (1, T, H) in float32
    per_window = 50_000 + (4 + 1) * hidden_bytes  # the measured peak + the trie's L + 1 streams
    memory = FakeMemory(free_bytes=int(6.5 * per_window / device.MEMORY_HEADROOM), window_peak_bytes=50_000)
    chosen = worker(model, memory=memory)
    assert memory.peaks_started == 1 and chosen.batch_size == 6
    assert worker(model, memory=FakeMemory(10**12, 50_000)).batch_size == 10  # never more than the 10 windows


def test_out_of_memory_halves_the_batch_and_gives_the_same_perplexities(model, reference):
    chosen = worker(model, memory=FakeMemory(10**12, 50_000))  # 10 windows per batch planned
    budget = MemoryBudget(model, max_windows=5)
    try:
        rows = chosen.evaluate_many(REMOVALS)
    finally:
        budget.handle.remove()
    # the 9 equal windows are too many, then 5 + 4 fit, and the short last window goes alone
    assert budget.seen == [9, 5, 4, 1]
    for removed, row in zip(REMOVALS, rows):
        assert row["status"] == "ok" and row["ppl"] == pytest.approx(reference[removed], rel=1e-6)


def test_a_budget_below_half_the_batch_makes_failed_rows_not_a_crash(model):
    chosen = worker(model, memory=FakeMemory(10**12, 50_000))
    budget = MemoryBudget(model, max_windows=2)
    try:
        rows = chosen.evaluate_many(REMOVALS)
    finally:
        budget.handle.remove()
    assert [r["status"] for r in rows] == ["failed"] * len(REMOVALS)
    assert all("out of memory at batch size 5" in r["error"] for r in rows)


@pytest.mark.parametrize("head", ["online", "chunked"])
def test_bfloat16_perplexity_stays_within_the_documented_bound_of_float32(head):
    fp32 = tiny_model("gpt2", n_layers=4, vocab=96)
    bf16 = tiny_model("gpt2", n_layers=4, vocab=96).to(torch.bfloat16)
    want = worker(fp32, batch_size=4, head=head).evaluate_many(REMOVALS)
    got = worker(bf16, batch_size=4, head=head).evaluate_many(REMOVALS)
    deviation = max(abs(g["ppl"] / w["ppl"] - 1) for g, w in zip(got, want))
    assert 0 < deviation <= perplexity.BFLOAT16_PPL_BOUND


@needs_compiler
@pytest.mark.slow
def test_compiled_head_in_the_worker_equals_eager_including_the_short_last_window(model, reference):
    compiled = worker(model, batch_size=4, head="chunked", compile="on")
    rows = compiled.evaluate_many(REMOVALS)
    assert compiled.head_loss.compiled, "fell back to eager: the test would compare eager with eager"
    for removed, row in zip(REMOVALS, rows):
        assert row["ppl"] == pytest.approx(reference[removed], rel=1e-5)


@needs_compiler
@pytest.mark.slow
def test_compiled_decoder_layers_equal_eager():
    compiled_model = tiny_model("gpt2", n_layers=2, vocab=96)
    eager = worker(tiny_model("gpt2", n_layers=2, vocab=96), batch_size=4).evaluate_many([(), (0,), (1,)])
    compiled = worker(compiled_model, batch_size=4, compile_layers=True)
    assert compiled.trie_ok
    for got, want in zip(compiled.evaluate_many([(), (0,), (1,)]), eager):
        assert got["ppl"] == pytest.approx(want["ppl"], rel=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head", ["online", "chunked"])
def test_heads_on_gpu_agree_with_float32_on_cpu(dtype, head, reference):
    model = tiny_model("gpt2", n_layers=4, vocab=96).to("cuda", dtype)
    rows = worker(model, batch_size=0, head=head).evaluate_many(REMOVALS)  # automatic batch from CUDA memory
    bound = 1e-5 if dtype == torch.float32 else perplexity.BFLOAT16_PPL_BOUND
    for removed, row in zip(REMOVALS, rows):
        assert row["status"] == "ok" and row["ppl"] == pytest.approx(reference[removed], rel=bound)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_adaptive_latency_on_gpu_with_cuda_events():
    from sweep.engine import latency

    model = tiny_model("gpt2", n_layers=2, vocab=96).to("cuda")
    repeats = latency.Repeats(min_repeats=5, max_repeats=30, budget_s=20.0)
    rows = latency.measure_latency(model, {"full": (), "one": (1,)}, seq=16, decode_tokens=4, repeats=repeats, seed=0)
    for columns in rows.values():
        assert 5 <= columns["prefill_repeats"] <= 30 and columns["prefill_ms"] > 0
        assert columns["latency_noisy"] in (0, 1) and columns["decode_ms_per_token"] > 0
