"""The real-model lane (``pytest -m real``, ``make test-real``): SmolLM2-135M-Instruct read from its Q4_1 GGUF file
(fetched once into .cache/models; every test skips, saying why, when it cannot be). What holds on tiny random
models must hold on a real checkpoint too: sweep's rows equal physical removal plus the guide's recipe, angular
distances equal a direct computation from the hidden states, and a damaged file is one clear error."""
from __future__ import annotations

import math
import sqlite3

import numpy as np
import pytest
import torch

from conftest import ROOT, WIKITEXT_TEST, need_shared
from sweep.config import SweepConfig
from sweep.engine import adapters, models, similarity
from sweep.errors import ModelLoadError

pytestmark = pytest.mark.real

CACHE = ROOT / ".cache" / "sweep"
"""The default --cache-dir of a sweep run in the project, so the lane, the demo and `make sweep` share one
converted checkpoint."""


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    model = models.load_model(str(smollm2_gguf), dtype="float32", device="cpu", cache_dir=str(CACHE))
    tokenizer = models.load_tokenizer(str(smollm2_gguf), cache_dir=str(CACHE))
    return model, tokenizer


@pytest.fixture(scope="module")
def wikitext_ids(smollm2):
    """The first 256 tokens of the WikiText-2 test text (its first 4,000 characters are more than enough, and
    byte-level BPE splits at spaces, so they tokenize as the whole text does)."""
    need_shared(WIKITEXT_TEST)
    import pyarrow.parquet as pq

    text = "\n\n".join(pq.read_table(WIKITEXT_TEST).column("text").to_pylist())
    return smollm2[1](text[:4000], return_tensors="pt").input_ids[:, :256]


def test_the_file_is_the_model_the_issue_describes(smollm2):
    model, tokenizer = smollm2
    assert model.config.model_type == "llama" and len(adapters.decoder_layers(model)) == 30
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (9, 3)
    assert len(tokenizer) == 49_152 and model.config.tie_word_embeddings
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1]:])


def recipe_perplexity(model, input_ids: torch.Tensor, max_length: int, stride: int) -> float:
    """The guide's windows and weights (tests/test_measure.py), with each window's loss in float64."""
    seq_len, nll_sum, n_tokens, prev_end = input_ids.size(1), 0.0, 0, 0
    for begin in range(0, seq_len, stride):
        end = min(begin + max_length, seq_len)
        ids = input_ids[:, begin:end]
        targets = ids.clone()
        targets[:, : -(end - prev_end)] = -100
        with torch.no_grad():
            logits = model(ids).logits.double()[:, :-1]  # (1, T-1, V): position t predicts token t+1
        labels = targets[:, 1:]
        scored = labels != -100
        loss = torch.nn.functional.cross_entropy(logits[scored], labels[scored])
        nll_sum += loss.item() * int(scored.sum())
        n_tokens += int(scored.sum())
        prev_end = end
        if end == seq_len:
            break
    return math.exp(nll_sum / n_tokens)


def test_single_removals_equal_the_recipe_on_the_physically_pruned_model(smollm2, smollm2_gguf, wikitext_ids,
                                                                        tmp_path):
    from sweep.engine.runner import run_sweep

    # The guide's recipe takes its loss from transformers, which casts the logits to float32 (`logits.float()`):
    # over 49,152 logits that alone moves this perplexity by 1.5e-5 (46.28628 against 46.28699 with the same
    # windows and a float64 loss). So the reference is the recipe with its loss in float64; sweep agrees with it
    # to about 2e-7.
    model = smollm2[0]
    db = tmp_path / "real.db"
    cfg = SweepConfig(model=str(smollm2_gguf), data=str(WIKITEXT_TEST), db=str(db), cache_dir=str(CACHE),
                      max_length=128, max_tokens=256, strategy="explicit", remove="0;14;29", latency="off")
    run_sweep(cfg, log=lambda s: None, progress=False)
    got = dict(sqlite3.connect(db).execute("select removed, ppl from results"))
    assert set(got) == {"", "0", "14", "29"}
    assert got[""] == pytest.approx(recipe_perplexity(model, wikitext_ids, 128, 128), rel=1e-5)
    for layer in (0, 14, 29):
        with adapters.pruned(model, [layer]):
            assert got[str(layer)] == pytest.approx(recipe_perplexity(model, wikitext_ids, 128, 128), rel=1e-5)
    assert got["0"] > 10 * got[""] and got["14"] < 2 * got[""]  # layer 0 is catastrophic, a middle layer cheap


def test_angular_distances_equal_a_direct_computation_from_the_hidden_states(smollm2, wikitext_ids):
    from test_similarity import final_norm_removed

    model, _ = smollm2
    ids = wikitext_ids[:, :96].reshape(2, 48)  # two sequences
    got = similarity.layer_signals(model, [(ids, torch.ones_like(ids))])
    with final_norm_removed(model), torch.no_grad():
        hidden = np.stack([h.double().numpy() for h in model(ids, output_hidden_states=True).hidden_states])
    unit = hidden / np.linalg.norm(hidden, axis=-1, keepdims=True)  # (L+1, B, T, H)
    n_layers = 30
    for l in range(n_layers):
        for n in range(1, n_layers - l + 1):
            cos = np.clip((unit[l] * unit[l + n]).sum(-1), -1.0, 1.0)  # (B, T)
            angle = np.arccos(cos) / math.pi
            assert got.angular_all[(l, n)] == pytest.approx(angle.mean(), abs=1e-5)
            assert got.angular_last[(l, n)] == pytest.approx(angle[:, -1].mean(), abs=1e-5)


def test_a_truncated_copy_of_the_real_file_is_named_truncated_or_corrupt(smollm2_gguf, tmp_path):
    cut = tmp_path / "cut.gguf"
    with open(smollm2_gguf, "rb") as src:
        cut.write_bytes(src.read(smollm2_gguf.stat().st_size * 3 // 4))
    with pytest.raises(ModelLoadError, match="truncated or corrupt"):
        models.load_model(str(cut), device="cpu", cache_dir=str(tmp_path / "cache"))
