"""Angular distance, Block Influence and the greedy path on tiny models, against independent references."""
from __future__ import annotations

import contextlib
import math
import sqlite3
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from sweep import store
from sweep.engine import adapters, models, perplexity, similarity
from sweep.cli import main
from sweep.config import SweepConfig
from sweep.engine.runner import run_sweep
from tiny import tiny_model, db_rows, train_briefly

IDENTITY_LAYERS = (1, 2)


# ---------------------------------------------------------------------------------------------- reference


@contextlib.contextmanager
def final_norm_removed(model):
    """output_hidden_states' last entry is taken after the final norm: swap the norm for an identity."""
    owner, name = (model.transformer, "ln_f") if hasattr(model, "transformer") else (model.model, "norm")
    saved = getattr(owner, name)
    setattr(owner, name, nn.Identity())
    try:
        yield
    finally:
        setattr(owner, name, saved)


def reference_signals(model, sequences: list[torch.Tensor]) -> dict:
    """Per-token loops in float64 numpy over each (unpadded) sequence run on its own."""
    L = model.config.num_hidden_layers
    ang_all, ang_last, bi = np.zeros((L + 1, L + 1)), np.zeros((L + 1, L + 1)), np.zeros(L)
    n_tokens = 0
    with final_norm_removed(model), torch.no_grad():
        for seq in sequences:
            hidden = model(seq[None], output_hidden_states=True).hidden_states  # L+1 x (1, T, H)
            h = [x[0].double().numpy() for x in hidden]
            for l in range(L):
                for m in range(l + 1, L + 1):
                    for t in range(len(seq)):
                        cos = h[l][t] @ h[m][t] / (np.linalg.norm(h[l][t]) * np.linalg.norm(h[m][t]))
                        angle = math.acos(min(1.0, max(-1.0, cos))) / math.pi
                        ang_all[l, m] += angle
                        ang_last[l, m] += angle if t == len(seq) - 1 else 0.0
                        bi[l] += (1 - cos) if m == l + 1 else 0.0
            n_tokens += len(seq)
    return {"all": ang_all / n_tokens, "last": ang_last / len(sequences), "bi": bi / n_tokens}


def padded(sequences: list[torch.Tensor], pad_id: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)], mask[row, : len(seq)] = seq, 1
    return ids, mask


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_distances_and_block_influence_match_an_independent_reference(family):
    model = tiny_model(family, n_layers=4)
    gen = torch.Generator().manual_seed(1)
    sequences = [torch.randint(2, 96, (n,), generator=gen) for n in (12, 7, 12, 3)]
    ids, mask = padded(sequences)
    # Two batches, the first with padding: the averages are over real tokens of both.
    got = similarity.layer_signals(model, [(ids[:2], mask[:2]), (ids[2:], mask[2:])])
    want = reference_signals(model, sequences)
    L = 4
    for n in range(1, L + 1):
        for l in range(L - n + 1):
            assert got.angular_all[(l, n)] == pytest.approx(want["all"][l, l + n], abs=2e-6)
            assert got.angular_last[(l, n)] == pytest.approx(want["last"][l, l + n], abs=2e-6)
    assert got.block_influence == pytest.approx(list(want["bi"]), abs=2e-6)
    assert got.n_tokens == sum(len(s) for s in sequences) and got.n_sequences == 4


def test_padding_does_not_change_the_signals():
    model = tiny_model("gpt2", n_layers=3)
    seq = torch.arange(2, 12)
    alone = similarity.layer_signals(model, [padded([seq])])
    with_pad = similarity.layer_signals(model, [padded([seq, torch.arange(2, 22)], pad_id=0)])
    reference = similarity.layer_signals(model, [padded([torch.arange(2, 22)])])
    # Averages of a padded batch = token-weighted averages of the two sequences run alone.
    for key, value in with_pad.angular_all.items():
        expected = (alone.angular_all[key] * 10 + reference.angular_all[key] * 20) / 30
        assert value == pytest.approx(expected, abs=2e-6)
        assert with_pad.angular_last[key] == pytest.approx(
            (alone.angular_last[key] + reference.angular_last[key]) / 2, abs=2e-6)


def test_residual_stream_ends_with_the_last_layer_output_before_the_final_norm():
    model = tiny_model("gpt2", n_layers=3)
    ids = torch.arange(2, 18)[None]
    streams = adapters.capture_residual_stream(model, ids)
    assert len(streams) == 4
    with torch.no_grad():
        normed = model(ids, output_hidden_states=True).hidden_states
        with final_norm_removed(model):
            raw = model(ids, output_hidden_states=True).hidden_states
    for got, want in zip(streams, raw):
        torch.testing.assert_close(got, want)
    assert not torch.allclose(streams[-1], normed[-1], atol=1e-3)  # the pitfall the hooks avoid


def test_calibration_batches_pad_the_last_window_and_mask_it():
    batches = list(similarity.calibration_batches(torch.arange(10), max_length=4, batch_size=3, pad_id=0))
    assert [b[0].tolist() for b in batches] == [[[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 0, 0]]]
    assert [b[1].tolist() for b in batches] == [[[1] * 4, [1] * 4, [1, 1, 0, 0]]]
    # A short window alone in its batch needs no padding.
    batches = list(similarity.calibration_batches(torch.arange(10), max_length=4, batch_size=2, pad_id=0))
    assert [b[0].tolist() for b in batches] == [[[0, 1, 2, 3], [4, 5, 6, 7]], [[8, 9]]]


def test_signal_rows_round_trip_through_the_store(tmp_path):
    signals = similarity.layer_signals(tiny_model("gpt2", n_layers=3), [padded([torch.arange(2, 12)])])
    db = store.open_db(tmp_path / "s.db")
    key = {"model_id": store.upsert_model(db, "m", None, "float32", 3, "X"), "weights": "w", "calib_fingerprint": "c"}
    store.record_layer_similarity(db, key, "calib", similarity.signal_rows(signals))
    rows = store.read_layer_similarity(db, key)
    assert len(rows) == 3 * 4 // 2 * 2 + 3
    assert similarity.signals_from_rows(rows, 3) == signals
    assert similarity.signals_from_rows(rows[:-1], 3) is None  # incomplete: recompute


# ---------------------------------------------------------------------------------------------- identity layers


def _zero_output_projections(model, layers) -> None:
    """Attention out-projection and MLP down-projection, weights and biases: the layer becomes h -> h."""
    for i in layers:
        block = model.transformer.h[i]
        for proj in (block.attn.c_proj, block.mlp.c_proj):
            for p in proj.parameters():
                p.data.zero_()
                p.requires_grad_(False)


@pytest.fixture(scope="module")
def identity_model_dir(tmp_path_factory, byte_tokenizer_dir, sample_text_file) -> Path:
    """A 4-layer GPT-2 whose layers 1 and 2 are exact identities, briefly trained so the others matter."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(byte_tokenizer_dir)
    model = tiny_model("gpt2", n_layers=4, vocab=256, seed=3)
    _zero_output_projections(model, IDENTITY_LAYERS)
    train_briefly(model, tokenizer, sample_text_file.read_text(), steps=30, lr=1e-2)
    out = tmp_path_factory.mktemp("identity-gpt2")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def calib_text_file(tmp_path_factory) -> Path:
    """Calibration text distinct from the evaluation text (fixed in tests/data, so it never drifts)."""
    out = tmp_path_factory.mktemp("calib") / "calib.txt"
    out.write_text((Path(__file__).parent / "data" / "calib.txt").read_text())
    return out


def _cfg(model_dir, tmp_path, **overrides) -> SweepConfig:
    values = dict(model=str(model_dir), db=str(tmp_path / "r.db"), cache_dir=str(tmp_path / "cache"),
                  max_length=64, calib_max_tokens=1024, latency="off")
    values.update(overrides)
    return SweepConfig(**values)


_rows = db_rows


def test_identity_block_has_zero_distance_and_every_strategy_removes_it_first(
        identity_model_dir, sample_text_file, calib_text_file, tmp_path):
    cfg = _cfg(identity_model_dir, tmp_path, data=str(sample_text_file), max_tokens=1024,
               calib_data=str(calib_text_file), strategy="angular,block-influence,greedy", n="1-2")
    summary = run_sweep(cfg, log=lambda s: None, progress=False)
    signal = {(r["metric"], r["start"], r["size"]): r["value"]
              for r in _rows(cfg.db, "select * from layer_similarity")}
    for metric in ("angular-last", "angular-all"):
        assert signal[(metric, 1, 2)] < 1e-6  # h_1 = h_2 = h_3 exactly (cos clamped to 1)
        assert all(v > 1e-3 for (m, l, n), v in signal.items() if m == metric and n == 2 and l != 1)
    assert signal[("block-influence", 1, 1)] < 1e-9 and signal[("block-influence", 2, 1)] < 1e-9
    choices = {(r["strategy"], r["n"]): r["removed"] for r in _rows(cfg.db, "select * from strategy_choices")}
    assert {s for s, _ in choices} == {"angular", "block-influence", "greedy"}
    for strategy in ("angular", "block-influence", "greedy"):
        assert choices[(strategy, 1)] in ("1", "2")
        assert choices[(strategy, 2)] == "1,2"
    # Each chosen variant is measured like any other, on the evaluation setup.
    measured = {r["removed"] for r in _rows(cfg.db, "select removed from results")}
    assert {"", "1,2", choices[("greedy", 1)]} <= measured and summary.failed == 0
    baseline, pruned = (next(r["ppl"] for r in _rows(cfg.db, "select * from results") if r["removed"] == key)
                        for key in ("", "1,2"))
    assert pruned == pytest.approx(baseline, rel=1e-6)  # removing identities changes nothing
    # A second run reuses the stored signals and greedy path and measures nothing.
    logs: list[str] = []
    again = run_sweep(cfg, log=logs.append, progress=False)
    assert again.measured == 0 and any("reusing" in line for line in logs)
    assert not any(line.startswith("greedy:") for line in logs)


def test_plan_says_signal_variants_are_not_counted(tiny_gpt2_dir, sample_text_file, tmp_path):
    from sweep.engine import describe_plan

    logs: list[str] = []
    info = describe_plan(_cfg(tiny_gpt2_dir, tmp_path, data=str(sample_text_file), strategy="single,greedy",
                              n="1-2"), log=logs.append)
    assert info["variants"] == 5 and any("plus up to 2 variants that greedy choose" in line for line in logs)


def test_greedy_path_on_4_layers_matches_brute_force_of_each_round(tiny_gpt2_dir, sample_text_file, tmp_path):
    cfg = _cfg(tiny_gpt2_dir, tmp_path, calib_data=str(sample_text_file), max_length=32, calib_max_tokens=512)
    model = models.load_model(cfg.model, dtype="float32", device="cpu")
    from sweep.engine.models import tokenizer_for as load_tokenizer

    db = store.open_db(cfg.db)
    cal = similarity.open_calibration(cfg, model, load_tokenizer(cfg), db)
    path = similarity.ensure_greedy_path(cal, db, 4, log=lambda s: None, progress=False)
    ids = cal.token_ids

    def brute_ppl(removed) -> float:  # the plain model on every window, no trie, no split head
        with adapters.pruned(model, removed):
            return perplexity.perplexity(lambda x: model(x).logits, lambda h: h, ids, 32, 32, 4, ids.device).ppl

    removed: tuple[int, ...] = ()
    for step in path:
        options = {layer: brute_ppl(tuple(sorted(removed + (layer,)))) for layer in range(4) if layer not in removed}
        assert step.calib_ppl == pytest.approx(options[step.layer], rel=1e-5)
        assert options[step.layer] <= min(options.values()) * (1 + 1e-5)  # the round's best (up to float ties)
        removed = step.removed
    assert sorted(s.layer for s in path) == [0, 1, 2, 3]
    # Stored, and reused without scoring anything again.
    assert [r["layer"] for r in store.read_greedy_steps(db, cal.key)] == [s.layer for s in path]
    assert similarity.ensure_greedy_path(cal, db, 2, log=lambda s: None, progress=False) == path[:2]


def test_signals_are_reused_for_the_same_calibration_and_recomputed_for_another(
        tiny_gpt2_dir, sample_text_file, tmp_path):
    cfg = _cfg(tiny_gpt2_dir, tmp_path, calib_data=str(sample_text_file), max_length=32, calib_max_tokens=256)
    logs: list[str] = []
    first = similarity.run_similarity(cfg, log=logs.append, progress=False)
    second = similarity.run_similarity(cfg, log=logs.append, progress=False)
    assert first == second and sum("reusing" in line for line in logs) == 1
    similarity.run_similarity(SweepConfig(**{**cfg.__dict__, "calib_max_tokens": 128}), log=logs.append,
                              progress=False)
    fingerprints = {r["calib_fingerprint"] for r in _rows(cfg.db, "select calib_fingerprint from layer_similarity")}
    assert len(fingerprints) == 2


def test_cli_similarity_prints_the_signals_and_stores_them(capsys, tiny_gpt2_dir, sample_text_file, tmp_path):
    db = tmp_path / "s.db"
    rc = main(["similarity", "--model", str(tiny_gpt2_dir), "--calib-data", str(sample_text_file),
               "--max-length", "32", "--calib-max-tokens", "256", "--db", str(db),
               "--cache-dir", str(tmp_path / "c"), "--quiet"])
    out = capsys.readouterr().out
    assert rc == 0 and "BI" in out and "angular" in out
    assert len(_rows(db, "select * from layer_similarity")) == 4 * 5 // 2 * 2 + 4


def test_cli_similarity_with_missing_calibration_file_is_named(capsys, tiny_gpt2_dir, tmp_path):
    rc = main(["similarity", "--model", str(tiny_gpt2_dir), "--calib-data", str(tmp_path / "nope.txt"),
               "--db", str(tmp_path / "s.db"), "--quiet"])
    assert rc == 2 and "nope.txt" in capsys.readouterr().err


def test_angular_on_every_layer_without_allow_last_is_refused_before_measuring(
        capsys, tiny_gpt2_dir, sample_text_file, tmp_path):
    rc = main(["run", "--model", str(tiny_gpt2_dir), "--data", str(sample_text_file), "--max-length", "32",
               "--calib-data", str(sample_text_file), "--strategy", "angular", "--n", "4", "--latency", "off",
               "--db", str(tmp_path / "r.db"), "--cache-dir", str(tmp_path / "c"), "--quiet"])
    assert rc == 2 and "--allow-last" in capsys.readouterr().err
    assert not (tmp_path / "r.db").exists()  # refused by the planner, before the model loads or the DB is made


def test_similarity_on_the_shared_wikitext_validation_split_with_the_real_tokenizer(tmp_path):
    from conftest import GPT2_TOKENIZER, SHARED, need_shared

    validation = need_shared(SHARED / "data" / "wikitext-2-v1" / "validation.parquet")
    need_shared(GPT2_TOKENIZER)
    model_dir = tmp_path / "gpt2-tiny"
    tiny_model("gpt2", n_layers=3, vocab=50257).save_pretrained(model_dir)
    cfg = _cfg(model_dir, tmp_path, tokenizer=str(GPT2_TOKENIZER), calib_data=str(validation),
               max_length=128, calib_max_tokens=600)
    signals = similarity.run_similarity(cfg, log=lambda s: None, progress=False)
    # 600 tokens in windows of 128: 4 full windows and one of 88 tokens (padded in its batch, then masked).
    assert signals.n_tokens == 600 and signals.n_sequences == 5
    assert all(0.0 <= d <= 1.0 for d in signals.angular_all.values())


def test_calibration_out_of_memory_halves_the_batch_and_gives_the_same_signals(
        tiny_gpt2_dir, sample_text_file, tmp_path, monkeypatch):
    from sweep.engine.models import tokenizer_for as load_tokenizer

    cfg = _cfg(tiny_gpt2_dir, tmp_path, calib_data=str(sample_text_file), max_length=32, calib_max_tokens=512,
               batch_size=8)
    model = models.load_model(cfg.model, dtype="float32", device="cpu")
    db = store.open_db(cfg.db)
    cal = similarity.open_calibration(cfg, model, load_tokenizer(cfg), db)
    want = similarity.layer_signals(model, similarity.calibration_batches(cal.token_ids, 32, 8, int(cal.token_ids[0])))
    real, sizes = similarity.layer_signals, []

    def small_memory(model, batches, progress=lambda: None):
        batches = list(batches)
        sizes.append(len(batches[0][0]))
        if sizes[-1] > 2:  # pretend more than 2 windows do not fit
            raise torch.OutOfMemoryError("injected")
        return real(model, batches, progress)

    monkeypatch.setattr(similarity, "layer_signals", small_memory)
    logs = []
    got = similarity.ensure_signals(cal, db, log=logs.append, progress=False)
    assert sizes == [8, 4, 2] and any("retrying with 2 window" in line for line in logs)
    assert got.angular_last == pytest.approx(want.angular_last, rel=1e-9)
    assert got.block_influence == pytest.approx(want.block_influence, rel=1e-9)
