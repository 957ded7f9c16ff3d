"""The LM head + loss variants against the plain cross-entropy of full logits, and the worker's choice of head."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sweep.config import SweepConfig
from sweep.engine import perplexity
from sweep.engine.data import EvalSetup, TokenizedText
from sweep.engine.worker import Worker
from tiny import tiny_model


def reference_nll(hidden, weight, bias, labels, softcap=None):
    """Per-token NLL from the whole logits tensor, as F.cross_entropy computes it."""
    logits = F.linear(hidden, weight, bias)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits, labels, reduction="none")


def case(rows=37, width=16, vocab=1000, scale=1.0, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, width, generator=gen, dtype=dtype)
    weight = torch.randn(vocab, width, generator=gen, dtype=dtype) * scale
    bias = torch.randn(vocab, generator=gen, dtype=dtype)
    labels = torch.randint(0, vocab, (rows,), generator=gen)
    labels[:3] = torch.tensor([0, vocab - 1, vocab // 2])  # first and last column of the vocabulary
    return hidden, weight, bias, labels


@pytest.mark.parametrize("tile_bytes", [64 * 4 * 37, 1 << 14, 1 << 30])  # one column block ... the whole vocabulary
@pytest.mark.parametrize("with_bias,softcap", [(False, None), (True, None), (True, 30.0)])
def test_online_head_equals_cross_entropy_of_full_logits_in_float64(tile_bytes, with_bias, softcap):
    # vocab 1000 is not a multiple of any block size: the last block is narrower, and labels fall in it
    hidden, weight, bias, labels = case(scale=3.0)  # large logits: the log-sum-exp must not overflow
    bias = bias if with_bias else None
    online = perplexity.OnlineHeadLoss(weight, bias, softcap, tile_bytes)
    assert online.block_size(len(labels)) * len(labels) * 4 <= max(tile_bytes, 64 * 4 * len(labels))
    got = online(hidden, labels)
    want = reference_nll(hidden, weight, bias, labels, softcap)
    assert got.dtype == torch.float64
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-12), (got - want).abs().max()


def test_online_head_equals_float32_cross_entropy_to_float32_rounding():
    hidden, weight, _, labels = case(rows=300, width=64, vocab=5000, scale=0.05, dtype=torch.float32)
    online = perplexity.OnlineHeadLoss(weight, tile_bytes=1 << 16)
    got, plain = online(hidden, labels), reference_nll(hidden, weight, None, labels)
    exact = reference_nll(hidden.double(), weight.double(), None, labels)
    assert got.dtype == torch.float32 and got.shape == labels.shape
    # as close to the float64 truth as the plain float32 cross-entropy is (both are float32 computations)
    assert (got.double() - exact).abs().max() <= 4 * (plain.double() - exact).abs().max() + 1e-6
    assert torch.allclose(got, plain, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_online_head_redoes_a_block_whose_logits_overflow_the_first_blocks_shift(dtype):
    # Later blocks are shifted by block 0's maximum; one logit far above it (1e3 in float32, 1e4 in float64, past
    # exp's range) makes its block overflow, which must be detected and redone exactly.
    hidden, weight, bias, labels = case(rows=8, width=4, vocab=640, scale=0.01, dtype=dtype)
    big = 1e3 if dtype == torch.float32 else 1e4
    weight[300] = big / hidden.abs().sum(1).max()  # block 2 of 128-column blocks
    labels[3:] = 300
    online = perplexity.OnlineHeadLoss(weight, bias, tile_bytes=128 * 4 * 8)
    assert online.block_size(8) == 128
    got, want = online(hidden, labels), reference_nll(hidden.double(), weight.double(), bias.double(), labels)
    assert torch.isfinite(got).all()
    assert torch.allclose(got.double(), want, rtol=1e-5 if dtype == torch.float32 else 1e-12, atol=1e-3), \
        (got.double() - want).abs().max()


def test_online_head_reuses_its_tile_across_calls_of_one_size():
    hidden, weight, _, labels = case(dtype=torch.float32)
    online = perplexity.OnlineHeadLoss(weight, tile_bytes=1 << 12)
    first = online(hidden, labels)
    tile = online._buffers[1]
    second = online(hidden, labels)
    assert online._buffers[1] is tile and torch.equal(first, second)  # no fresh memory per chunk
    online(hidden[:5], labels[:5])
    assert online._buffers[0][0] == 5  # another size: new buffers (the old ones freed)


def test_online_head_in_bfloat16_stays_close_to_float32():
    hidden, weight, _, labels = case(rows=64, width=32, vocab=2000, scale=0.2, dtype=torch.float32)
    want = perplexity.OnlineHeadLoss(weight)(hidden, labels)
    got = perplexity.OnlineHeadLoss(weight.bfloat16())(hidden.bfloat16(), labels)
    assert got.dtype == torch.float32
    assert (got - want).abs().max() < 0.05  # bfloat16 logits: 8 bits of mantissa


def test_window_nll_with_the_online_head_equals_the_chunked_head():
    model = tiny_model("gpt2", vocab=96)
    head = model.get_output_embeddings()
    hidden = torch.randn(3, 50, 32, generator=torch.Generator().manual_seed(1))
    input_ids = torch.randint(0, 96, (3, 50), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        online, n_online = perplexity.window_nll(perplexity.OnlineHeadLoss(head.weight, tile_bytes=1024),
                                                 hidden, input_ids, 40)
        chunked, n_chunked = perplexity.window_nll(head, hidden, input_ids, 40)
    assert n_online == n_chunked == 40 and torch.allclose(online, chunked, rtol=1e-6)


def worker(model, head="auto", n_tokens=300) -> Worker:
    ids = torch.randint(0, 96, (n_tokens,), generator=torch.Generator().manual_seed(0))
    cfg = SweepConfig(latency="off", batch_size=4, head=head)
    return Worker(model, TokenizedText(ids.numpy(), n_tokens, "t", "t"), EvalSetup(64, 32, None), cfg)


@pytest.mark.parametrize("family", ["gpt2", "gemma2"])  # gemma2: soft-capped logits
def test_cpu_worker_uses_the_online_head_and_it_agrees_with_the_chunked_one(family):
    model = tiny_model(family)
    online, chunked = worker(model), worker(model, head="chunked")
    assert isinstance(online.head_loss, perplexity.OnlineHeadLoss)
    assert isinstance(chunked.head_loss, perplexity.HeadLoss) and not chunked.head_loss.compiled
    removals = [(), (1,), (0, 2)]
    for a, b in zip(online.evaluate_many(removals), chunked.evaluate_many(removals)):
        assert a["ppl"] == pytest.approx(b["ppl"], rel=1e-6)


def test_fused_head_without_cuda_falls_back_to_the_chunked_head_with_a_warning():
    with pytest.warns(UserWarning, match="liger-kernel and CUDA"):
        fallback = worker(tiny_model("gpt2"), head="fused")
    assert isinstance(fallback.head_loss, perplexity.HeadLoss)
