"""Perplexity against an independent implementation of the transformers guide's recipe."""
from __future__ import annotations

import math
import shutil

import pytest
import torch

from sweep.engine import adapters, device, latency, models, perplexity
from sweep.config import SweepConfig
from sweep.engine.data import TokenizedText
from sweep.engine.data import EvalSetup
from sweep.engine.worker import Worker
from tiny import tiny_model


def recipe_perplexity(model, input_ids: torch.Tensor, max_length: int, stride: int) -> float:
    """The guide "Perplexity of fixed-length models", written out as the guide does it (batch 1, labels=)."""
    nll, tokens = recipe_windows(model, input_ids, max_length, stride)
    return math.exp(sum(nll) / sum(tokens))


def recipe_windows(model, input_ids: torch.Tensor, max_length: int,
                   stride: int) -> tuple[list[float], list[int]]:
    """The guide's recipe, keeping each window's ``loss * num_loss_tokens`` and ``num_loss_tokens`` (windows that
    weigh nothing left out)."""
    seq_len = input_ids.size(1)
    nll_sum, n_tokens, prev_end_loc = [], [], 0
    for begin_loc in range(0, seq_len, stride):
        end_loc = min(begin_loc + max_length, seq_len)
        trg_len = end_loc - prev_end_loc
        ids = input_ids[:, begin_loc:end_loc]
        target_ids = ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            loss = model(ids, labels=target_ids).loss
        num_loss_tokens = (target_ids != -100).sum().item() - target_ids.size(0)
        if num_loss_tokens:
            nll_sum.append(loss.item() * num_loss_tokens)
            n_tokens.append(num_loss_tokens)
        prev_end_loc = end_loc
        if end_loc == seq_len:
            break
    return nll_sum, n_tokens


def make_worker(model, ids: torch.Tensor, max_length: int, stride: int, batch_size: int = 4) -> Worker:
    tokens = TokenizedText(ids.numpy(), n_bytes=len(ids), fingerprint="test", name="test")
    cfg = SweepConfig(batch_size=batch_size, latency="off")
    return Worker(model, tokens, EvalSetup(max_length, stride, None), cfg)


@pytest.fixture(scope="module")
def gpt2_and_ids():
    model = tiny_model("gpt2", vocab=96)
    ids = torch.randint(0, 96, (1, 700), generator=torch.Generator().manual_seed(0))
    return model, ids


@pytest.mark.parametrize("max_length,stride", [(128, 128), (128, 64), (100, 37), (16, 1), (64, 64)])
def test_perplexity_equals_guide_recipe(gpt2_and_ids, max_length, stride):
    model, ids = gpt2_and_ids
    if stride == 1:
        ids = ids[:, :60]  # the stride-1 recipe is a forward per token: keep it short
    want = recipe_perplexity(model, ids, max_length, stride)
    got = make_worker(model, ids[0], max_length, stride).evaluate([])["ppl"]
    assert got == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2"])
def test_perplexity_equals_recipe_for_other_families(family):
    model = tiny_model(family, vocab=96)
    ids = torch.randint(0, 96, (1, 300), generator=torch.Generator().manual_seed(4))
    want = recipe_perplexity(model, ids, 96, 48)
    assert make_worker(model, ids[0], 96, 48).evaluate([])["ppl"] == pytest.approx(want, rel=1e-5)


def test_pruned_variant_perplexity_equals_recipe_on_pruned_model(gpt2_and_ids):
    model, ids = gpt2_and_ids
    worker = make_worker(model, ids[0], 128, 128)
    got = worker.evaluate([0, 2])
    with adapters.pruned(model, [0, 2]):
        want = recipe_perplexity(model, ids, 128, 128)
    assert got["ppl"] == pytest.approx(want, rel=1e-5)
    assert got["n_layers"] == 2 and got["removed"] == "0,2" and got["kept_layers"] == "1,3"


@pytest.mark.parametrize("max_length,stride", [(128, 64), (100, 37)])
def test_per_window_losses_equal_the_recipe_window_by_window_and_add_up_to_the_nll(gpt2_and_ids, max_length,
                                                                                  stride):
    model, ids = gpt2_and_ids
    want_nll, want_tokens = recipe_windows(model, ids, max_length, stride)
    row = make_worker(model, ids[0], max_length, stride).evaluate([])
    assert row["window_tokens"] == want_tokens
    assert row["window_nll"] == pytest.approx(want_nll, rel=1e-5)
    assert math.fsum(row["window_nll"]) == row["nll_sum"] and sum(row["window_tokens"]) == row["n_tokens"]


def test_a_slice_of_windows_gives_exactly_the_whole_texts_numbers_for_those_windows(gpt2_and_ids):
    model, ids = gpt2_and_ids
    worker = make_worker(model, ids[0], 64, 32, batch_size=4)
    whole = worker.evaluate([1])
    n_windows = worker.n_windows()
    assert n_windows == len(whole["window_nll"]) > 8
    head, tail = worker.evaluate([1], (0, 8)), worker.evaluate([1], (8, n_windows))
    assert head["window_nll"] + tail["window_nll"] == whole["window_nll"]  # bit for bit: the same batches
    assert head["window_tokens"] + tail["window_tokens"] == whole["window_tokens"]


def test_batch_size_does_not_change_perplexity(gpt2_and_ids):
    model, ids = gpt2_and_ids
    one = make_worker(model, ids[0], 64, 64, batch_size=1).evaluate([1])["ppl"]
    many = make_worker(model, ids[0], 64, 64, batch_size=7).evaluate([1])["ppl"]
    assert many == pytest.approx(one, rel=1e-6)


def test_token_count_matches_recipe_definition():
    # 10 tokens, windows of 4 with stride 2: the guide counts (4-1) + 3 * (2-1) = 6 loss tokens.
    assert [(w.begin, w.end, w.n_targets) for w in perplexity.windows(10, 4, 2)] == [
        (0, 4, 4), (2, 6, 2), (4, 8, 2), (6, 10, 2)]
    model = tiny_model("gpt2", vocab=96)
    ids = torch.arange(10) % 96
    assert make_worker(model, ids, 4, 2).evaluate([])["n_tokens"] == 6


def test_nll_sum_and_ppl_are_consistent_and_bpb_uses_bytes(gpt2_and_ids):
    model, ids = gpt2_and_ids
    row = make_worker(model, ids[0], 128, 128).evaluate([])
    assert row["ppl"] == pytest.approx(math.exp(row["nll_sum"] / row["n_tokens"]), rel=1e-12)
    # One token per byte here, so bits per byte = log2(ppl).
    assert row["bpb"] == pytest.approx(math.log2(row["ppl"]), rel=1e-9)


def test_nan_perplexity_is_recorded_as_diverged(gpt2_and_ids):
    model, ids = gpt2_and_ids
    worker = make_worker(model, ids[0], 128, 128)
    with torch.no_grad():
        layer = adapters.decoder_layers(model)[3]
        saved = layer.mlp.c_proj.weight.clone()
        layer.mlp.c_proj.weight.fill_(float("nan"))
        try:
            row = worker.evaluate([])
            kept_fine = worker.evaluate([3])
        finally:
            layer.mlp.c_proj.weight.copy_(saved)
    assert row["status"] == "diverged" and "nan" in row["error"].lower()
    assert kept_fine["status"] == "ok"


def test_out_of_memory_is_a_failed_row_after_one_smaller_batch(gpt2_and_ids, monkeypatch):
    model, ids = gpt2_and_ids
    worker = make_worker(model, ids[0], 128, 128, batch_size=4)
    tried = []

    def oom(*args, **kwargs):
        tried.append(args[5])  # batch_size
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(perplexity, "perplexity", oom)
    row = worker.evaluate([1])
    assert tried == [4, 2]
    assert row["status"] == "failed" and "out of memory" in row["error"]
    assert row["params"] > 0  # what could be measured still is


def test_out_of_memory_retry_with_smaller_batch_gives_the_same_result(gpt2_and_ids, monkeypatch):
    model, ids = gpt2_and_ids
    worker = make_worker(model, ids[0], 128, 128, batch_size=4)
    want = worker.evaluate([1])["ppl"]
    real = perplexity.perplexity

    def oom_once(*args, **kwargs):
        if args[5] == 4:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return real(*args, **kwargs)

    monkeypatch.setattr(perplexity, "perplexity", oom_once)
    row = worker.evaluate([1])
    assert row["status"] == "ok" and row["ppl"] == pytest.approx(want, rel=1e-6)


def test_params_of_matches_pruned_model(gpt2_and_ids):
    model, ids = gpt2_and_ids
    worker = make_worker(model, ids[0], 128, 128)
    with adapters.pruned(model, [1, 2]):
        want = adapters.total_params(model)
    assert worker.params_of([1, 2])[0] == want


def test_summarize_gives_median_and_iqr():
    timing = latency.summarize([5.0, 1.0, 3.0, 2.0, 4.0])
    assert timing.median_ms == 3.0 and timing.iqr_ms == 2.0 and timing.repeats == 5


def test_latency_is_measured_per_signature_with_positive_times(gpt2_and_ids):
    model, ids = gpt2_and_ids
    cfg = SweepConfig(latency_seq=8, latency_repeats=20, latency_warmup=1, decode_tokens=2)
    worker = Worker(model, TokenizedText(ids[0].numpy(), 700, "t", "t"), EvalSetup(128, 128, None), cfg)
    result = worker.measure_latency({"a": [], "b": [0, 1]})
    assert set(result) == {"a", "b"}
    for columns in result.values():
        assert columns["prefill_ms"] > 0 and columns["prefill_iqr_ms"] >= 0 and 20 <= columns["prefill_repeats"] <= 60
        assert columns["decode_ms_per_token"] > 0
    assert result["b"]["latency_from"] == "0,1"


def test_one_token_last_window_adds_nothing(gpt2_and_ids):
    # 129 tokens in windows of 64: the last window holds one token and has no target to score.
    model, ids = gpt2_and_ids
    with_tail = make_worker(model, ids[0, :129], 64, 64).evaluate([])
    without = make_worker(model, ids[0, :128], 64, 64).evaluate([])
    assert with_tail["status"] == "ok"
    assert with_tail["ppl"] == pytest.approx(without["ppl"], rel=1e-9)
    assert with_tail["n_tokens"] == without["n_tokens"]


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                    reason="torch.compile (inductor) on CPU needs a C compiler")
@pytest.mark.slow
def test_compiled_head_loss_equals_eager(gpt2_and_ids):
    """The fused (compiled) head + loss gives the eager NLL: same float32 math, different kernels."""
    model, ids = gpt2_and_ids
    head = model.get_output_embeddings()
    hidden = torch.randn(3, 300, 32, generator=torch.Generator().manual_seed(1))
    input_ids = torch.randint(0, 96, (3, 300), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        compiled = perplexity.HeadLoss(head, compiled=True)
        got, n_got = perplexity.window_nll(compiled, hidden, input_ids, 280)
        want, n_want = perplexity.window_nll(head, hidden, input_ids, 280)
    assert compiled.compiled, "fell back to eager: the test would compare eager with eager"
    assert n_got == n_want == 280
    assert torch.allclose(got, want, rtol=1e-5)
    # Reference from full logits, no chunking: sum of -log p(label) over scored positions.
    logp = torch.log_softmax(head(hidden).double(), dim=-1)[:, 19:299]
    reference = -logp.gather(-1, input_ids[:, 20:300, None]).squeeze(-1).sum(dim=1)
    assert torch.allclose(got, reference, rtol=1e-5)


@pytest.mark.parametrize("batch", [1, 3, 7])
def test_head_never_sees_more_than_head_rows_and_chunking_does_not_change_the_nll(gpt2_and_ids, monkeypatch, batch):
    model, _ = gpt2_and_ids
    head = model.get_output_embeddings()
    hidden = torch.randn(batch, 50, 32, generator=torch.Generator().manual_seed(3))
    input_ids = torch.randint(0, 96, (batch, 50), generator=torch.Generator().manual_seed(4))
    rows_seen = []

    def spy(h):
        rows_seen.append(h.shape[:-1].numel())
        return head(h)

    with torch.no_grad():
        whole, _ = perplexity.window_nll(head, hidden, input_ids, 45)  # HEAD_ROWS = 4096: one chunk
        monkeypatch.setattr(perplexity, "HEAD_ROWS", 8)
        chunked, n_scored = perplexity.window_nll(spy, hidden, input_ids, 45)
    assert n_scored == 45 and max(rows_seen) <= 8 * 2 and len(rows_seen) > 1  # sizes differ by <= 1 position
    assert sum(rows_seen) == batch * 45  # every scored position exactly once
    assert torch.allclose(chunked, whole, rtol=1e-6)


@pytest.mark.parametrize("first,length,batch", [(1, 1024, 16), (1, 2048, 12), (5, 9, 1), (1, 300, 100), (1, 2, 64)])
def test_head_chunks_cover_every_position_once_in_balanced_sizes(monkeypatch, first, length, batch):
    chunks = perplexity.head_chunks(first, length, batch)
    assert chunks[0][0] == first and chunks[-1][1] == length
    assert all(a[1] == b[0] for a, b in zip(chunks, chunks[1:]))  # contiguous, no overlap
    sizes = [stop - start for start, stop in chunks]
    assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1
    assert max(sizes) * batch <= max(perplexity.HEAD_ROWS, batch)  # the row budget holds (one position at least)


def test_head_loss_falls_back_to_eager_when_compile_fails(gpt2_and_ids, monkeypatch):
    model, ids = gpt2_and_ids
    head = model.get_output_embeddings()
    loss = perplexity.HeadLoss(head, compiled=True)

    def broken(*args):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(loss, "_compiled_nll", broken)
    hidden = torch.randn(2, 10, 32)
    with pytest.warns(UserWarning, match="no compiler here"), torch.no_grad():
        got = loss(hidden, ids[:, :20].view(2, 10))
    assert not loss.compiled and got.shape == (2, 10)


def test_head_loss_does_not_blame_the_compiler_for_a_device_error(gpt2_and_ids, monkeypatch):
    model, ids = gpt2_and_ids
    loss = perplexity.HeadLoss(model.get_output_embeddings(), compiled=True)

    def failing_gpu(*args):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(loss, "_compiled_nll", failing_gpu)
    with pytest.raises(RuntimeError, match="illegal memory access"), torch.no_grad():
        loss(torch.randn(4, 32), ids[0, :4])
    assert loss.compiled  # not switched to eager for good


@pytest.mark.parametrize("free_gib,per_window_gib,n_windows", [(40, 1.5, 62), (1, 3, 10), (80, 0.01, 300), (8, 1, 3)])
def test_batch_size_for_fits_free_memory(free_gib, per_window_gib, n_windows):
    gib = 2**30
    batch = device.batch_size_for(int(free_gib * gib), int(per_window_gib * gib), n_windows)
    assert 1 <= batch <= min(device.MAX_AUTO_BATCH, n_windows)
    fits = batch * per_window_gib <= device.MEMORY_HEADROOM * free_gib
    assert fits or batch == 1  # a batch of 1 is always tried: its OOM is a failed row
    if batch < min(device.MAX_AUTO_BATCH, n_windows):  # not capped: one more window would not fit
        assert (batch + 1) * per_window_gib > device.MEMORY_HEADROOM * free_gib


def test_worker_batch_size_auto_on_cpu_and_fixed_when_given(gpt2_and_ids):
    from sweep.config import CPU_BATCH_SIZE

    model, ids = gpt2_and_ids
    tokens = TokenizedText(ids[0].numpy(), n_bytes=ids.shape[1], fingerprint="t", name="t")
    auto = Worker(model, tokens, EvalSetup(64, 64, None), SweepConfig(batch_size=0, latency="off"))
    fixed = Worker(model, tokens, EvalSetup(64, 64, None), SweepConfig(batch_size=3, latency="off"))
    assert (auto.batch_size, fixed.batch_size) == (CPU_BATCH_SIZE, 3)
    assert not auto.head_loss.compiled  # compile=auto compiles on CUDA only
    assert auto.evaluate([1])["ppl"] == pytest.approx(fixed.evaluate([1])["ppl"], rel=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_auto_batch_size_on_gpu_fits_and_evaluates():
    model = tiny_model("llama").to("cuda", torch.bfloat16)
    ids = torch.randint(0, 96, (4096,), generator=torch.Generator().manual_seed(0))
    tokens = TokenizedText(ids.numpy(), n_bytes=4096, fingerprint="t", name="t")
    worker = Worker(model, tokens, EvalSetup(64, 64, None), SweepConfig(batch_size=0, latency="off"))
    assert worker.head_loss.compiled and 1 <= worker.batch_size <= 64
    rows = worker.evaluate_many([(), (1,), (0, 2)])
    assert [r["status"] for r in rows] == ["ok"] * 3 and worker.head_loss.compiled
